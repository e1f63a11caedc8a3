"""Peak GPU memory and seconds per rollout and per update of the single-GPU recipe (LLaDA-8B, NF4 + LoRA).

    python bench/memory.py                                   # GPU: measures; CPU: prints the estimate
    python bench/memory.py --model ../shared/fixtures/llada_tiny --estimate

With a CUDA device it loads the model as `spg_min.py` does (4-bit NF4 base + LoRA), runs one rollout batch
(`--num-prompts` x `--group-size` completions of `--gen-length` tokens) and one SPG update, and reports
torch.cuda.max_memory_allocated and wall seconds. Without one (or with --estimate) it prints an estimate from the
model's config.json shapes; the activation term is the rough rule of 34 bytes x d per token per layer in bf16
(Korthikanti et al. 2022, no recomputation, attention scores not stored: SDPA), an approximation, not a measurement.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import spg_min as S  # noqa: E402

GB = 2**30
# 4 bits per weight, plus double quantisation's constants: an 8-bit absmax per block of 64 weights and a float32
# scale per block of 256 absmax values, 8/64 + 32/(64*256) = 0.127 bits per weight (QLoRA, arXiv 2305.14314, Sec. 3)
NF4_BYTES_PER_WEIGHT = (4 + 8 / 64 + 32 / (64 * 256)) / 8
LLADA_8B_SHAPES = dict(d_model=4096, n_layers=32, mlp_hidden_size=12288, embedding_size=126464, n_heads=32)


def shapes(model: str) -> dict:
    """d_model, n_layers, mlp_hidden_size, embedding_size of a local LLaDA-format dir, else LLaDA-8B's."""
    cfg_file = Path(model) / "config.json"
    return {**LLADA_8B_SHAPES, **json.loads(cfg_file.read_text())} if cfg_file.exists() else LLADA_8B_SHAPES


def estimate(sh: dict, cfg: S.Config, prompt_length: int) -> dict:
    """GB per component for the loss pass of one micro-batch (the larger of rollout and update)."""
    d, n, f, V = sh["d_model"], sh["n_layers"], sh["mlp_hidden_size"], sh.get("embedding_size") or sh["vocab_size"]
    linear = n * (4 * d * d + 3 * d * f)                          # q, k, v, o + gate, up, down (kv heads = heads)
    lora = n * cfg.lora_rank * ((d + d) * 3 + (d + f))            # q, k, v (d -> d) and up (d -> f)
    tokens = cfg.micro_batch * cfg.num_mc * (prompt_length + cfg.gen_length)
    return {
        "NF4 weights (0.5 B + double-quant constants)": linear * NF4_BYTES_PER_WEIGHT / GB,
        "embeddings + LM head (fp32 after k-bit preparation)": 2 * V * d * 4 / GB,
        "LoRA weights + grads + AdamW states (fp32)": lora * 4 * 4 / GB,
        "activations (34 B x d per token per layer, bf16)": 34 * d * tokens * n / GB,
        "logits chunk (LOGP_CHUNK_BYTES + LSE_ROWS rows: TargetLogprob)":
            S.LOGP_CHUNK_BYTES * (1 + S.LSE_ROWS / S.logits_chunk_rows(V)) / GB,
    }


def measure(cfg: S.Config, prompt_length: int) -> dict:
    """One rollout and one update on the GPU: peak memory (GB) and seconds."""
    tok, style, ids = S.load_tokenizer(cfg)
    model = S.load_model(cfg, len(tok))
    B = cfg.num_prompts * cfg.group_size
    prompt = torch.randint(1000, 20000, (B, prompt_length), device="cuda")
    attn = torch.ones_like(prompt)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    model.eval()
    seqs = S.generate(model, prompt, attn, gen_length=cfg.gen_length, block_length=cfg.block_length,
                      steps=cfg.steps, temperature=cfg.temperature, mask_id=ids["mask"],
                      generator=S.make_generator(cfg.seed, 0, 1, device=prompt.device))
    torch.cuda.synchronize()
    rollout_s, rollout_gb = time.time() - t0, torch.cuda.max_memory_allocated() / GB
    model.train()
    comp = seqs[:, prompt_length:]
    c = S.completion_mask(comp, (ids["eos"], ids["eot"]))
    full_attn = torch.cat([attn, torch.ones_like(comp)], 1)
    adv = torch.randn(B, device="cuda")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    for lo in range(0, B, cfg.micro_batch):
        sl = slice(lo, lo + cfg.micro_batch)
        masked, t = S.block_forward_process(c[sl], prompt_length, m=cfg.num_mc, block_length=cfg.block_length,
                                            p_mask_prompt=cfg.p_mask_prompt)
        e, u = S.sequence_bounds(model, seqs[sl], full_attn[sl], c[sl], masked, t, beta=cfg.beta, mask_id=ids["mask"])
        S.spg_loss(adv[sl], e, u, num_tokens=c.sum())[0].backward()
    opt.step()
    torch.cuda.synchronize()
    return {"rollout s": rollout_s, "rollout peak GB": rollout_gb, "update s": time.time() - t0,
            "update peak GB": torch.cuda.max_memory_allocated() / GB}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)  # the rest is spg_min's
    p.add_argument("--model", default=S.Config.model)
    p.add_argument("--prompt-length", type=int, default=200)
    p.add_argument("--estimate", action="store_true", help="print the shape-based estimate even with a GPU")
    args, rest = p.parse_known_args()
    cfg = S.parse_config(["--task", "gsm8k", "--model", args.model, *rest])
    est = estimate(shapes(args.model), cfg, args.prompt_length)
    print(f"| estimate for {args.model}, micro-batch {cfg.micro_batch} x m {cfg.num_mc}, "
          f"P {args.prompt_length} + Lg {cfg.gen_length} | GB |\n|---|---|")
    for name, gb in est.items():
        print(f"| {name} | {gb:.2f} |")
    print(f"| **total** | **{sum(est.values()):.2f}** |")
    if torch.cuda.is_available() and not args.estimate:
        for name, value in measure(cfg, args.prompt_length).items():
            print(f"measured {name}: {value:.2f}")


if __name__ == "__main__":
    main()
