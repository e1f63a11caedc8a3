"""Credit per cell instead of per sequence: is the sequence-level advantage what holds RL back on tiny Sudoku?

Not SPG. The loop is spg_min.train's (same rollouts, block-wise masks shared within a group, mu = 2 AdamW updates),
with one change: instead of one advantage per completion, A_b = r_b - mean_group(r) (Eq. 4), every empty cell gets
its own, A_{b,i} = right_{b,i} - mean_group(right_{., i}), on the token that writes it, and each token's ELBO term
(Eq. 2, the summand of `elbo`) is weighted by it. The tokens of given cells and of the tags get no weight. README
"Results" compares it with SPG from the same warm start.

Run: OMP_NUM_THREADS=1 python bench/cell_credit.py --lr 5e-5 --max-steps 150 --out /tmp/cell_credit
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import spg_min as S    # noqa: E402
import tasks as T      # noqa: E402

FIRST_CELL = 2         # the tiny Sudoku completion: <answer> \n d_0 ... d_15 \n </answer>, cell i at token 2 + i


def cell_advantages(comp: torch.Tensor, examples: list[dict], group_size: int, digit_ids: dict) -> torch.Tensor:
    """Per-token advantages [B, Lg] for completions comp [B, Lg] (groups of group_size contiguous rows).

    right_{b,i} = 1 if token FIRST_CELL + i of row b is the solution's digit of empty cell i, else 0 (a token that is
    not the digit, the tags included, counts wrong); A_{b,i} = right_{b,i} - its group's mean. 0 at every other token.
    """
    B, Lg = comp.shape
    right, empty = torch.zeros(B, Lg), torch.zeros(B, Lg, dtype=torch.bool)
    for b, ex in enumerate(examples):
        for i, (given, digit) in enumerate(zip(ex["puzzle"], ex["solution"])):
            if given == "0" and FIRST_CELL + i < Lg:
                empty[b, FIRST_CELL + i] = True
                right[b, FIRST_CELL + i] = float(comp[b, FIRST_CELL + i].item() == digit_ids[digit])
    mean = right.view(-1, group_size, Lg).mean(1, keepdim=True).expand(-1, group_size, Lg).reshape(B, Lg)
    return (right - mean) * empty


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--max-steps", type=int, default=150)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-n", type=int, default=256)
    p.add_argument("--warm-start-steps", type=int, default=S.TINY_PRESET["warm_start_steps"])
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--cache-dir", default=".cache")
    p.add_argument("--out", required=True, help="metrics.jsonl and summary.json go here")
    args = p.parse_args(argv)
    cfg = S.parse_config(["--task", "sudoku", "--model", "tiny", "--out", args.out, "--seed", str(args.seed),
                          "--lr", str(args.lr), "--warm-start-steps", str(args.warm_start_steps),
                          "--eval-n", str(args.eval_n), "--cache-dir", args.cache_dir])
    torch.manual_seed(cfg.seed)                                   # start-up only, as spg_min.train
    tok, style, ids = S.load_tokenizer(cfg)
    mask_id, stop_ids = ids["mask"], (ids["eos"], ids["eot"])
    task, train_set = T.get_task("sudoku"), S.load_train_set(cfg, tok, style)
    eval_set = T.load_eval("sudoku", cfg.data_dir, n=cfg.eval_n, seed=cfg.seed)
    model = S.load_model(cfg, len(tok))
    if cfg.warm_start_steps:
        S.sft_warm_start(model, tok, cfg, style=style, mask_id=mask_id, eos_id=ids["eos"])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=S.ADAM_BETAS, weight_decay=cfg.weight_decay)
    digit_ids = {str(d): tok.convert_tokens_to_ids(str(d)) for d in range(10)}
    evaluate = lambda: S.evaluate(model, tok, task, eval_set, cfg, style=style, mask_id=mask_id, stop_ids=stop_ids)[0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"config": vars(args), "eval_before": evaluate()}
    print(f"held-out before: {summary['eval_before']}", flush=True)
    g, n = cfg.group_size, cfg.num_prompts
    with open(out / "metrics.jsonl", "w") as log:
        for step in range(args.max_steps):
            order = torch.randperm(len(train_set), generator=S.make_generator(cfg.seed, step, 0))[:n]
            examples = [train_set[i] for i in order.tolist() for _ in range(g)]
            group_ids = torch.arange(n).repeat_interleave(g)
            prompt_ids, prompt_attn = S.encode_prompts(
                tok, [T.build_prompt("sudoku", ex, style=style) for ex in examples[::g]])
            prompt_ids, prompt_attn = prompt_ids.repeat_interleave(g, 0), prompt_attn.repeat_interleave(g, 0)
            model.eval()
            seqs = S.generate(model, prompt_ids, prompt_attn, gen_length=cfg.gen_length, block_length=cfg.block_length,
                              steps=cfg.steps, temperature=cfg.temperature, mask_id=mask_id,
                              generator=S.make_generator(cfg.seed, step, 1))
            model.train()
            P = prompt_ids.shape[1]
            comp = seqs[:, P:]
            c = S.completion_mask(comp, stop_ids)
            _, rewards, _ = S.score_rewards(task, S.decode_completions(tok, comp, c), examples)
            adv = cell_advantages(comp, examples, g, digit_ids) * c                       # [B, Lg]
            active = adv.ne(0).any(-1).nonzero()[:, 0]
            attn = torch.cat([prompt_attn, torch.ones_like(comp)], 1)
            loss = grad_norm = torch.zeros(())
            for it in range(cfg.mu if len(active) else 0):                 # no cell with an advantage: no update
                masked, t = S.FORWARD_PROCESS[cfg.masking](
                    c[active], P, m=cfg.num_mc, block_length=cfg.block_length, p_mask_prompt=cfg.p_mask_prompt,
                    group_ids=group_ids[active], generator=S.make_generator(cfg.seed, step, 2, it))
                logp = S.masked_logprobs(model, seqs[active], attn[active], masked, mask_id=mask_id,
                                         Lg=comp.shape[1])                                 # [B', m, Lg]
                counted = masked[..., P:] & c[active][:, None]
                elbo_terms = (counted * logp / t[..., None]).mean(1)                      # [B', Lg], sum_k = elbo
                loss = -(adv[active] * elbo_terms).sum() / c.sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
            row = {"step": step + 1, "reward/mean": rewards.mean().item(), "loss": loss.item(),
                   "grad_norm": grad_norm.item()}
            if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.max_steps:
                row["eval"] = evaluate()
            log.write(json.dumps(row) + "\n")
            log.flush()
            print(json.dumps(row), flush=True)
    summary["eval_after"] = evaluate()
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"held-out before: {summary['eval_before']}\nheld-out after:  {summary['eval_after']}")
    return summary


if __name__ == "__main__":
    main()
