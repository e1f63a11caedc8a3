"""Time and peak memory of one SPG update (forward + backward of the loss pass) as the vocabulary grows.

One update = per-token log-probs of the completion -> elbo / eubo -> spg_loss -> backward, on b = 4 sequences
(P = 16 prompt + Lg = 48 completion tokens, L = 64; two with an early EOS), m = 2 block-masked copies each
(N = 8 rows), advantages (+1, -1, +0.5, -0.5) so that both the ELBO and the mixture bound are used. Model: the
tiny bidirectional Llama with hidden 64, 2 layers, vocabulary V. Three ways to get the log-probs:
  direct           full float32 logits [N, L, V] from the model's forward, log_softmax, gather (what most code does);
  spg_min          spg_min.completion_logprobs as shipped: the LM head on the Lg completion positions only, in
                   chunks of LOGP_CHUNK_BYTES // (4 V) rows (checkpointed, spg_min.TargetLogprob: one [rows, V]
                   buffer, its gradient written in place), logsumexp + gather;
  spg_min, chunk R the same with chunk_rows=R passed to spg_min.target_logprobs (--chunk-rows).
Loss values and every parameter gradient must match the direct computation (asserted; the script exits 1
otherwise).

Peak memory, two honest ways, both relative to the state just before the update (model, inputs, no grads):
  tensors  the peak of live tensor bytes from torch.profiler's allocation events (profile_memory=True): every
           CPU tensor allocation and free, in order; deterministic; blind to the allocator's own overhead.
  RSS      the process's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs just before
           the update) minus its RSS then, in a fresh subprocess per measurement: what the OS really saw,
           allocator and BLAS workspace included. The child runs with MALLOC_MMAP_THRESHOLD_=1 MiB: under glibc's
           default dynamic threshold, freed ~32 MB chunks stay in the heap and the same run measured 154-339 MB.
  (tracemalloc cannot see torch's allocations; torch has no CPU allocator statistics.)
Timing: repetitions alternate between the implementations; medians; ratios of medians (shared, noisy machine).

Run: python bench/loss.py [--quick] [--chunk-rows 64] [--out bench/results/loss.md]
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from itertools import accumulate
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import model as M      # noqa: E402
import spg_min as S    # noqa: E402

LLADA_VOCAB = 126_464                  # LLaDA-8B's embedding rows
B_SEQ, M_MC, P, LG, BLOCK = 4, 2, 16, 48, 16
ADVANTAGES = (1.0, -1.0, 0.5, -0.5)
EOS_AT = {1: 30, 3: 40}                # row -> completion position of an early EOS


def make_problem(V: int, seed: int = 0):
    """Model and one rollout batch at vocabulary V: (model, z [N, L], attn, targets [N, Lg], masked, t, c, adv)."""
    net = M.tiny_model(V, hidden_size=64, num_layers=2, num_heads=4, seed=seed).eval()   # no dropout anyway
    gen = torch.Generator().manual_seed(seed)
    mask_id, eos = V - 1, V - 2
    seqs = torch.randint(0, V - 2, (B_SEQ, P + LG), generator=gen)                       # [b, L]
    for row, k in EOS_AT.items():
        seqs[row, P + k:] = eos
    c = S.completion_mask(seqs[:, P:], [eos])                                             # [b, Lg]
    masked, t = S.block_forward_process(c, P, m=M_MC, block_length=BLOCK, p_mask_prompt=0.15, generator=gen)
    z = torch.where(masked, mask_id, seqs[:, None]).view(B_SEQ * M_MC, -1)               # [N, L]
    targets = seqs[:, P:].repeat_interleave(M_MC, 0)                                      # [N, Lg]
    return net, z, torch.ones_like(z), targets, masked, t, c, torch.tensor(ADVANTAGES)


def logp_direct(net, z, attn, targets):
    logits = net(input_ids=z, attention_mask=attn, position_ids=S.positions_from_mask(attn)).logits.float()  # [N,L,V]
    return F.log_softmax(logits, -1)[:, -targets.shape[1]:].gather(-1, targets[..., None])[..., 0]        # [N, Lg]


def logp_chunked(rows):
    def fn(net, z, attn, targets):
        _, head = M.decoder_and_head(net)
        h = S.hidden_states(net, z, attn)[:, -targets.shape[1]:]                          # [N, Lg, d]
        return S.target_logprobs(head, h, targets, chunk_rows=rows)
    return fn


def implementations(chunk_rows: list[int]):
    return {"direct": logp_direct, f"spg_min (LOGP_CHUNK_BYTES={S.LOGP_CHUNK_BYTES >> 20} MiB)": S.completion_logprobs,
            **{f"spg_min, chunk_rows={r}": logp_chunked(r) for r in chunk_rows}}


def update(logp_fn, net, z, attn, targets, masked, t, c, adv):
    """One SPG update's loss pass: forward + backward (gradients accumulate into .grad). Returns the loss."""
    logp = logp_fn(net, z, attn, targets).view(B_SEQ, M_MC, LG)                           # [b, m, Lg]
    counted = masked[..., P:] & c[:, None]                                                # [b, m, Lg]
    elbo_b = S.elbo(logp, counted, t)                                                     # [b]
    eubo_b = S.eubo(logp, counted, t, beta=1.5, lengths=c.sum(-1))                        # [b]
    loss, _ = S.spg_loss(adv, elbo_b, eubo_b, num_tokens=c.sum(), estimator="mix", omega=0.5)
    loss.backward()
    return loss.detach()


def tensor_peak_bytes(fn) -> int:
    """Peak of live tensor bytes allocated while fn() runs, from the profiler's allocation events."""
    from torch._C._profiler import _EventType
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()

    def walk(nodes):
        for n in nodes:
            yield n
            yield from walk(n.children)
    events = sorted((n.start_time_ns, n.extra_fields.alloc_size)
                    for n in walk(prof.profiler.kineto_results.experimental_event_tree())
                    if n.tag == _EventType.Allocation)
    return max([0, *accumulate(size for _, size in events)])


def _status_mb(key):
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024


def rss_child(impl: str, V: int, chunk_rows: list[int]):
    """In a fresh process: resident high-water mark of one update minus the RSS just before it (MB)."""
    problem = make_problem(V)
    fn = implementations(chunk_rows)[impl]
    update(fn, *problem)                    # warm-up (lazy init), then measure a second update
    problem[0].zero_grad(set_to_none=True)
    before = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")                                         # reset VmHWM
    update(fn, *problem)
    print(json.dumps({"rss_peak_mb": _status_mb("VmHWM") - before}))


def rss_peak_mb(impl, V, chunk_rows, threads):
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    out = subprocess.run([sys.executable, __file__, "--rss-child", impl, "--vocab", str(V), "--threads", str(threads),
                          "--chunk-rows", *map(str, chunk_rows)], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["rss_peak_mb"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="3 vocabulary sizes, one tuned chunk size, 2 repetitions, "
                   "RSS only at the largest V and not for the tuned rows (< 1 min)")
    p.add_argument("--chunk-rows", type=int, nargs="+", help="chunk sizes of the tuned spg_min rows "
                   "(default: 64 with --quick, else 32 64 128 256)")
    p.add_argument("--threads", type=int, default=1, help="1: two threads on 2 shared cores spin-wait (see decode.py)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "loss.md"))
    p.add_argument("--rss-child", help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.chunk_rows = args.chunk_rows or ([64] if args.quick else [32, 64, 128, 256])
    if args.rss_child:
        return rss_child(args.rss_child, args.vocab, args.chunk_rows)
    vocabs = [64, 8192, LLADA_VOCAB] if args.quick else [64, 1024, 8192, 32768, LLADA_VOCAB]
    reps = 2 if args.quick else 5
    impls = implementations(args.chunk_rows)
    N, L = B_SEQ * M_MC, P + LG
    lines = ["## One SPG update (forward + backward of the loss pass) vs vocabulary size", "",
             f"N = {N} rows (b = {B_SEQ} sequences x m = {M_MC}), L = {L} (Lg = {LG}), hidden 64, 2 layers, float32, "
             f"{args.threads} thread(s); time = median of {reps} interleaved repetitions; memory = peak above the "
             "pre-update state (tensors: profiler allocation events; RSS: VmHWM in a fresh process, '-' = not run); "
             "ratio = direct / this", "",
             "| V | [N, L, V] f32 logits MB | implementation | ms | time vs direct | peak tensors MB | "
             "direct / this (tensors) | peak RSS MB | direct / this (RSS) | max rel. grad diff |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    all_equal, ratios = True, {}
    for V in vocabs:
        problem = make_problem(V)
        net = problem[0]
        times, grads, losses = {n: [] for n in impls}, {}, {}
        for _ in range(reps):
            for name, fn in impls.items():
                net.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                losses[name] = update(fn, *problem)
                times[name].append(time.perf_counter() - t0)
                grads[name] = [q.grad.clone() for q in net.parameters()]
        peaks = {}
        for name, fn in impls.items():
            net.zero_grad(set_to_none=True)
            peaks[name] = tensor_peak_bytes(lambda: update(fn, *problem)) / 2**20
        run_rss = V == vocabs[-1] or (not args.quick and V >= 8192)    # a few MB below that: noise
        measured = [n for n in impls if run_rss and not (args.quick and "chunk_rows" in n)]  # quick: direct, shipped
        rss = {name: rss_peak_mb(name, V, args.chunk_rows, args.threads) if name in measured else None
               for name in impls}
        ref = "direct"
        for name in impls:
            grad_diff = max(((g - g0).abs().max() / g0.abs().max().clamp_min(1e-12)).item()
                            for g, g0 in zip(grads[name], grads[ref]))
            equal = torch.allclose(losses[name], losses[ref], rtol=1e-5, atol=1e-7) and grad_diff < 1e-4
            all_equal &= equal
            t_ratio = statistics.median(times[name]) / statistics.median(times[ref])
            ratios[(V, name)] = peaks[ref] / peaks[name]
            rss_cols = (f"{rss[name]:.0f} | {rss[ref] / max(rss[name], 1e-9):.1f}x" if rss[name] is not None
                        else "- | -")
            ms = 1e3 * statistics.median(times[name])
            lines.append(f"| {V:,} | {N * L * V * 4 / 2**20:.1f} | {name} | {ms:.0f} | {t_ratio:.2f} | "
                         f"{peaks[name]:.1f} | {ratios[(V, name)]:.1f}x | {rss_cols} | "
                         f"{grad_diff:.1e}{'' if equal else ' MISMATCH'} |")
        print(f"V={V}: done", flush=True)
    lines += ["", f"- equal loss and gradients (all V, all implementations): **{all_equal}**"]
    for name in list(impls)[1:]:
        r = ratios[(LLADA_VOCAB, name)]
        lines.append(f"- at V = {LLADA_VOCAB:,}, {name}: peak tensor memory = 1/{r:.1f} of direct "
                     f"({'meets' if r >= 4 else 'misses'} the <= 1/4 target)")
    table = "\n".join(lines) + "\n"
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table)
    return 0 if all_equal else 1


if __name__ == "__main__":
    sys.exit(main())
