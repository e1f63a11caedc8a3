"""Decoding throughput: spg_min.generate against a plain re-implementation of LLaDA's published sampler.

The plain sampler (`plain_generate`, ML-GSAI/LLaDA generate.py @ b7e6c35) runs the whole model each step and gets
logits for the WHOLE canvas [B, L, V], takes the Gumbel-max / argmax and a float64 softmax over all of it, sets the
confidence to -inf outside the current block and picks the top-k per row. spg_min.generate projects only the bl
positions of the current block through the LM head; its decoder calls are the plain sampler's (12 full passes here),
so at a small vocabulary the two cost the same. Both run on the same model and inputs, greedy (T = 0), and their
outputs must be identical (asserted; the script exits 1 otherwise). The fast modes (Fast-dLLM, arXiv 2505.22618)
are generate(threshold=t) (confidence-threshold decoding, the schedule as a floor; a row whose block is done leaves
the forward batch) and generate(kv_cache="prefix" | "dual") (approximate KV caches refreshed at each block's first
step), alone and combined; we report their speed and the fraction of generated tokens equal to default greedy.

Shapes: "tiny" = model.tiny_model(len(tiny_tokenizer())) (V = 108, hidden 128, 4 layers); "LLaDA proportions" =
LLaDA's vocabulary (V = 126,464, its mask/eos ids) over a narrow body (hidden 64, 2 layers), built by the same
tiny_model (a LlamaConfig with is_causal = False set before construction, float32). Weights are random;
--checkpoint adds rows with trained ones. Inputs: the first B Sudoku held-out prompts (tiny style, all 46 tokens
long, so no padding: the plain sampler, like LLaDA's, passes no attention mask). Gen 24, block 8, steps 12.

Work per token: forwards/token = decoder calls / gen_length (what the issue asks; a call may cover fewer rows or
positions in the fast modes), and work/token = (rows x positions run by the decoder, summed over calls) / (B x L) /
gen_length, i.e. in units of one full forward of the batch: the plain sampler's 0.5 is 12 full passes / 24 tokens.

Timing: repetitions alternate the implementations (A, B, C, A, B, C, ...) and we report medians and ratios of
medians, because this machine is shared and noisy. Threads default to 1: with 2 threads on 2 busy cores every small
op waits for a spinning OpenMP worker (7.8 ms vs 2.7 us for one elementwise [560, 64] multiply, measured here).

--checkpoint PATH (a state_dict .pt of the tiny model; layer sizes are read from it): also greedy Sudoku cell
accuracy on the 256 held-out puzzles (one batch) for the plain sampler, the default and each fast mode, and
throughput rows for those weights.

Run: python bench/decode.py [--quick] [--checkpoint PATH] [--threshold 0.9 0.5] [--out bench/results/decode.md]
"""
import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import model as M      # noqa: E402
import spg_min as S    # noqa: E402
import tasks as T      # noqa: E402

GEN = dict(gen_length=24, block_length=8, steps=12)   # spg_min.TINY_PRESET's decoding shape
LLADA_VOCAB = 126_464                                 # LLaDA-8B's embedding rows (config.json vocab_size)


# ----------------------------------------------------------------------------------------------------
# LLaDA's sampler, as published: full logits over the whole canvas every step.

def add_gumbel_noise(logits, temperature, generator=None):
    """LLaDA generate.py: exp(logits) / (-log u)^T in float64 (arXiv:2409.02908); T = 0 returns the logits."""
    if temperature == 0:
        return logits
    logits = logits.double()
    noise = torch.rand(logits.shape, dtype=torch.float64, generator=generator)
    return logits.exp() / (-torch.log(noise)) ** temperature


@torch.no_grad()
def plain_generate(model, prompt, *, gen_length, block_length, steps, temperature, mask_id, generator=None):
    """LLaDA's generate(): prompt [B, P] (unpadded) -> [B, P + Lg]. One deviation: the mask token is never proposed
    (logits[..., mask_id] = -inf), as in spg_min.generate; a trained LLaDA never ranks it first, a random model may."""
    B, P = prompt.shape
    x = torch.cat([prompt, prompt.new_full((B, gen_length), mask_id)], 1)              # [B, L]
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    for b in range(num_blocks):
        num_transfer = S.transfer_schedule(block_length, steps_per_block)           # same for every row here
        for i in range(steps_per_block):
            mask_index = x == mask_id                                                # [B, L]
            logits = model(x).logits                                                 # [B, L, V]
            logits[..., mask_id] = -math.inf
            x0 = add_gumbel_noise(logits, temperature, generator).argmax(-1)         # [B, L]
            p = torch.softmax(logits.double(), -1)                                   # [B, L, V] float64
            x0_p = p.gather(-1, x0[..., None])[..., 0]                               # [B, L]
            x0_p[:, P + (b + 1) * block_length:] = -math.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -math.inf)
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(B):
                _, select = torch.topk(confidence[j], k=num_transfer[i])
                transfer[j, select] = True
            x[transfer] = x0[transfer]
    return x


# ----------------------------------------------------------------------------------------------------
# Measurement helpers

def count_forwards(model):
    """A list that grows by (rows, positions) of the input ids at each decoder call, and the hook handle."""
    calls = []
    decoder, _ = M.decoder_and_head(model)

    def record(_, args, kwargs):
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        calls.append(tuple(ids.shape))
    return calls, decoder.register_forward_pre_hook(record, with_kwargs=True)


def work_per_token(calls, batch, seq_len):
    """(decoder calls, rows x positions run in units of one full [batch, seq_len] forward) per generated token."""
    return len(calls) / GEN["gen_length"], sum(b * n for b, n in calls) / (batch * seq_len * GEN["gen_length"])


def interleaved(fns: dict, reps: int) -> dict:
    """{name: (median wall s, median CPU s, last output, decoder call shapes of one run)}; repetitions alternate fns."""
    wall, cpu, outs, calls = {n: [] for n in fns}, {n: [] for n in fns}, {}, {}
    for _ in range(reps):
        for name, (fn, counter) in fns.items():
            counter.clear()
            t0, c0 = time.perf_counter(), time.process_time()
            outs[name] = fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            calls[name] = list(counter)
    return {n: (statistics.median(wall[n]), statistics.median(cpu[n]), outs[n], calls[n]) for n in fns}


def sudoku_inputs(tok, n):
    ex = T.load_eval("sudoku")[:n]
    ids, attn = S.encode_prompts(tok, [T.build_prompt("sudoku", e, split="eval", style="tiny") for e in ex])
    assert bool(attn.all()), "the plain sampler ignores padding: use prompts of one length"
    return ex, ids, attn


def load_checkpoint(path, vocab_size):
    """The tiny model with the layer sizes read from the state_dict (so older or newer presets load)."""
    sd = torch.load(path, map_location="cpu")
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("model.layers."))
    net = M.tiny_model(vocab_size, hidden_size=sd["model.embed_tokens.weight"].shape[1], num_layers=layers,
                       intermediate_size=sd["model.layers.0.mlp.up_proj.weight"].shape[0])
    net.load_state_dict(sd)
    return net.eval()


def samplers(thresholds):
    """spg_min.generate's modes under test: {name: extra keyword arguments}."""
    modes = {"spg_min.generate": {}}
    modes |= {f"generate(threshold={t})": dict(threshold=t) for t in thresholds}
    modes |= {f"generate(kv_cache={c})": dict(kv_cache=c) for c in ("prefix", "dual")}
    modes |= {f"generate(threshold={t}, kv_cache={c})": dict(threshold=t, kv_cache=c)
              for t in thresholds for c in ("prefix", "dual")}
    return modes


PLAIN = "plain (LLaDA generate.py)"


def throughput_rows(shape, model, tok, batch, reps, thresholds):
    """Markdown rows for one shape, whether generate == plain (greedy), and {sampler: wall-clock speed-up}."""
    mask_id = M.special_ids(tok)["mask"]
    _, ids, attn = sudoku_inputs(tok, batch)
    P, L = ids.shape[1], ids.shape[1] + GEN["gen_length"]
    counter, handle = count_forwards(model)
    fns = {PLAIN: (lambda: plain_generate(model, ids, temperature=0.0, mask_id=mask_id, **GEN), counter)}
    for name, kw in samplers(thresholds).items():
        fns[name] = (lambda kw=kw: S.generate(model, ids, attn, temperature=0.0, mask_id=mask_id, **kw, **GEN), counter)
    res = interleaved(fns, reps)
    handle.remove()
    plain_t, plain_cpu, plain_out, _ = res[PLAIN]
    default_out = res["spg_min.generate"][2]
    rows, speedups = [], {}
    for name, (t, cpu, out, calls) in res.items():
        same = (out[:, P:] == default_out[:, P:]).float().mean().item()
        forwards, work = work_per_token(calls, batch, L)
        speedups[name] = plain_t / t
        rows.append(f"| {shape} | {name} | {batch} | {t:.3f} | {batch * GEN['gen_length'] / t:,.0f} | "
                    f"{forwards:.3f} | {work:.3f} | {plain_t / t:.2f}x | {plain_cpu / cpu:.2f}x | {same:.3f} |")
    return rows, torch.equal(plain_out, default_out), speedups


def sudoku_accuracy(model, tok, thresholds):
    """Greedy Sudoku held-out cell accuracy (tasks.aggregate) of the plain sampler and each generate mode: one batch
    of all 256 puzzles per sampler, timed once. Returns markdown rows and {sampler: (speed-up vs plain, accuracy)}."""
    ids_map = M.special_ids(tok)
    task, mask_id, stop_ids = T.get_task("sudoku"), ids_map["mask"], (ids_map["eos"], ids_map["eot"])
    examples = T.load_eval("sudoku")
    ids, attn = S.encode_prompts(tok, [T.build_prompt("sudoku", e, split="eval", style="tiny") for e in examples])
    assert bool(attn.all()), "the plain sampler ignores padding: use prompts of one length"
    fns = {PLAIN: lambda: plain_generate(model, ids, temperature=0.0, mask_id=mask_id, **GEN)}
    for name, kw in samplers(thresholds).items():
        fns[name] = lambda kw=kw: S.generate(model, ids, attn, temperature=0.0, mask_id=mask_id, **kw, **GEN)
    outs, seconds, calls = {}, {}, {}
    for name, fn in fns.items():
        counter, handle = count_forwards(model)
        t0 = time.perf_counter()
        outs[name] = fn()[:, ids.shape[1]:]
        seconds[name], calls[name] = time.perf_counter() - t0, list(counter)
        handle.remove()
    rows, summary = [], {}
    for name, comp in outs.items():
        texts = S.decode_completions(tok, comp, S.completion_mask(comp, stop_ids))
        agg = T.aggregate("sudoku", [task.score(t, e) for t, e in zip(texts, examples)], examples)
        score = ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in agg.items())
        same = (comp == outs["spg_min.generate"]).float().mean().item()
        forwards, work = work_per_token(calls[name], len(examples), ids.shape[1] + GEN["gen_length"])
        speedup = seconds[PLAIN] / seconds[name]
        summary[name] = (speedup, agg["accuracy"])
        rows.append(f"| {name} | {len(examples)} | {score} | {forwards:.3f} | {work:.3f} | {seconds[name]:.2f} | "
                    f"{speedup:.2f}x | {same:.3f} |")
    return rows, summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small batches and 1 repetition (< 30 s on 2 cores)")
    p.add_argument("--checkpoint", help="state_dict .pt of the tiny model: adds trained-weight rows + Sudoku accuracy")
    p.add_argument("--threshold", type=float, nargs="+", default=[0.9, 0.5],
                   help="confidence thresholds of the fast modes")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "decode.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    reps, tiny_b, llada_b = (1, 16, 2) if args.quick else (7, 64, 8)
    tok = M.tiny_tokenizer()
    big_tok = M.tiny_tokenizer(mask_id=M.MASK_ID, eos_id=M.EOS_ID, vocab_size=LLADA_VOCAB)
    shapes = [("tiny", M.tiny_model(len(tok)).eval(), tok, tiny_b),
              ("LLaDA proportions (V=126,464, d=64, 2 layers)",
               M.tiny_model(LLADA_VOCAB, hidden_size=64, num_layers=2, num_heads=4).eval(), big_tok, llada_b)]
    if args.checkpoint:
        shapes.append(("tiny, checkpoint", load_checkpoint(args.checkpoint, len(tok)), tok, tiny_b))
    timing = f"medians of {reps} interleaved repetitions" if reps > 1 else "one run each (--quick)"
    lines = ["## Decoding throughput (greedy; gen 24, block 8, steps 12; Sudoku prompts, P = 46)", "",
             f"{timing}, {args.threads} thread(s); s and tokens/s: wall clock; "
             "forwards/token = decoder calls / gen_length; work/token = rows x positions through the decoder / "
             "(B x L) / gen_length (full forwards of the batch per token); speed-up = plain's median / this median, "
             "in wall-clock and in process CPU time (less sensitive to other jobs on the machine); same = fraction "
             "of generated tokens equal to spg_min.generate's", "",
             "| shape | sampler | B | s | tokens/s | forwards/token | work/token | speed-up vs plain (wall) | (CPU) | "
             "same as default |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    all_identical, summary = True, []
    for shape, net, tk, batch in shapes:
        rows, identical, speedups = throughput_rows(shape, net, tk, batch, reps, args.threshold)
        lines += rows
        all_identical &= identical
        fast = max((n for n in speedups if n.startswith("generate(")), key=speedups.get)
        summary.append(f"- {shape}: spg_min.generate = **{speedups['spg_min.generate']:.2f}x** the plain sampler "
                       f"(identical output: {identical}); fastest fast mode {fast} = **{speedups[fast]:.2f}x**")
        print(f"{shape}: spg_min.generate output identical to plain: {identical}", flush=True)
    lines += ["", *summary, "", f"spg_min.generate output identical to plain (greedy), all shapes: **{all_identical}**"]
    if args.checkpoint:
        net = shapes[-1][1]
        rows, acc = sudoku_accuracy(net, tok, args.threshold)
        lines += ["", f"## Sudoku held-out, greedy, one batch of 256 ({args.checkpoint})", "",
                  "| sampler | puzzles | score (tasks.aggregate, %) | forwards/token | work/token | s | "
                  "speed-up vs plain | same as default |",
                  "|---|---|---|---|---|---|---|---|", *rows, ""]
        base = acc["spg_min.generate"][1]
        lines += [f"- {name}: {sp:.2f}x the plain sampler, cell accuracy {a:.1f} ({a - base:+.1f} points vs default)"
                  for name, (sp, a) in acc.items() if name.startswith("generate(")]
    table = "\n".join(lines) + "\n"
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table)
    return 0 if all_identical else 1


if __name__ == "__main__":
    sys.exit(main())
