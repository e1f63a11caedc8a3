"""Is it noise? Two controls for why RL does not move the tiny Sudoku model (README, "Results").

shuffle   One `spg_min.train` run whose rewards are permuted within each group before the advantages are taken:
          the update keeps every statistic of a real run (advantage sizes, masks, bounds, optimizer) but no reward
          signal, so its expected gradient is zero. If it damages the model as much as the real run, the damage
          comes from the update's noise, not from a reward-correlated bias. The permutation draws from its own
          generator (seeded with --seed); everything else is spg_min's. `--adam-eps` overrides AdamW's eps (1e-8)
          for the RL optimizer, in this run and in the real-reward run made with `--real`.
perturb   Gaussian noise of each std in --sigmas added to every weight of the cached warm start, then the greedy
          held-out evaluation: how far can the weights move in a random direction before accuracy drops?

Any flag after `--` goes to spg_min (task, warm start, learning rate, estimator, steps, ...).

Run: OMP_NUM_THREADS=1 python bench/noise_control.py shuffle --out /tmp/nc_shuffle -- --warm-start-steps 300 \
         --max-steps 20 --eval-every 10 --lr 3e-4 --estimator elbo           [--real] [--adam-eps 1e-4]
     OMP_NUM_THREADS=1 python bench/noise_control.py perturb --sigmas 3e-4,1e-3,3e-3 -- --warm-start-steps 300
"""
import argparse
import functools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import spg_min as S    # noqa: E402
import tasks as T      # noqa: E402


SHUFFLE_STREAM = 9_001   # make_generator part for the permutations: a stream spg_min never draws from


def shuffled_within_groups(rewards: torch.Tensor, group_ids: torch.Tensor, generator: torch.Generator):
    """rewards [B] permuted among the members of each group (group_ids [B]); the multiset of each group is kept."""
    out = rewards.clone()
    for gid in torch.unique(group_ids):
        idx = (group_ids == gid).nonzero().flatten()
        out[idx] = rewards[idx[torch.randperm(len(idx), generator=generator)]]
    return out


def warm_started(cfg):
    """(tokenizer, style, special ids, model) with the cached warm start loaded (built first if missing)."""
    tok, style, ids = S.load_tokenizer(cfg)
    model = S.load_model(cfg, len(tok))
    S.sft_warm_start(model, tok, S.load_train_set(cfg, tok, style), cfg, style=style,
                     mask_id=ids["mask"], eos_id=ids["eos"], path=S.warm_start_path(cfg))
    return tok, style, ids, model


def run_shuffle(args, cfg):
    warm_started(cfg)               # build the cache now, so that the eps override below reaches RL only
    if args.adam_eps is not None:   # spg_min builds its optimizer as torch.optim.AdamW(params, lr=..., ...)
        S.torch.optim.AdamW = functools.partial(torch.optim.AdamW, eps=args.adam_eps)
    if not args.real:
        gen, advantages = S.make_generator(cfg.seed, SHUFFLE_STREAM), S.group_advantages
        S.group_advantages = lambda r, g: advantages(shuffled_within_groups(r, g, gen), g)
    summary = S.train(cfg)
    print(json.dumps({"shuffled": not args.real, "adam_eps": args.adam_eps, "before": summary["eval_before"],
                      "after": summary["eval_after"]}))


def run_perturb(args, cfg):
    tok, style, ids, model = warm_started(cfg)
    task = T.get_task(cfg.task)
    eval_set = T.load_eval(cfg.task, cfg.data_dir, eval_file=cfg.eval_file, n=cfg.eval_n, seed=cfg.seed)
    warm, gen = {k: v.clone() for k, v in model.state_dict().items()}, S.make_generator(cfg.seed, 0)
    for sigma in [0.0, *args.sigmas]:
        model.load_state_dict(warm)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * sigma)
        metrics, _ = S.evaluate(model, tok, task, eval_set, cfg, style=style, mask_id=ids["mask"],
                                stop_ids=(ids["eos"], ids["eot"]))
        print(json.dumps({"sigma": sigma, **metrics}), flush=True)


def main():
    argv = sys.argv[1:]
    ours, theirs = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=["shuffle", "perturb"])
    p.add_argument("--out", default="runs/noise_control", help="shuffle: the run's --out")
    p.add_argument("--real", action="store_true", help="shuffle: keep the real rewards (the comparison run)")
    p.add_argument("--adam-eps", type=float, default=None, help="shuffle: AdamW eps for RL (default 1e-8)")
    p.add_argument("--sigmas", type=lambda s: [float(x) for x in s.split(",")], default=[3e-4, 1e-3, 3e-3])
    args = p.parse_args(ours)
    cfg = S.parse_config(["--task", "sudoku", "--model", "tiny", "--out", args.out, *theirs])
    (run_shuffle if args.mode == "shuffle" else run_perturb)(args, cfg)


if __name__ == "__main__":
    main()
