"""Is it noise? Two controls for why RL does not move the tiny Sudoku model (README, "Results").

shuffle   One `spg_min.train` run whose rewards are permuted within each group before the advantages are taken:
          the update keeps the statistics of a real run (advantage sizes, masks, bounds, optimizer) but loses the
          reward signal. Only with `--estimator elbo` is its expected gradient zero: the other estimators score a
          row with the ELBO or with another bound depending on the sign of its advantage, so even random advantages
          push on the gap between the bounds; the control therefore refuses them. The permutations draw from their
          own generator stream (SHUFFLE_STREAM). `--real` makes the same run with the real rewards, for comparison.
          Each run is fresh (`--resume none`): a resumed control would restart its permutation stream.
perturb   Gaussian noise of each std in --sigmas (one draw each) added to every weight of the cached tiny warm
          start, then the greedy held-out evaluation: how far can the weights move in a random direction before
          accuracy drops?

Flags after `--` go to spg_min (warm start, learning rate, estimator, steps, `--adam-eps`, ...).

Run: OMP_NUM_THREADS=1 python bench/noise_control.py shuffle [--real] --out /tmp/nc_shuffled -- \\
         --warm-start-steps 300 --max-steps 20 --eval-every 10 --lr 3e-4 --estimator elbo [--adam-eps 1e-4]
     OMP_NUM_THREADS=1 python bench/noise_control.py perturb --sigmas 3e-4,1e-3,3e-3 -- --warm-start-steps 300
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import spg_min as S    # noqa: E402
import tasks as T      # noqa: E402

SHUFFLE_STREAM = 9_001   # make_generator part for the permutations: a stream spg_min never draws from
PERTURB_STREAM = 9_002   # ... and for the weight noise


def shuffled_within_groups(rewards: torch.Tensor, group_ids: torch.Tensor, generator: torch.Generator):
    """rewards [B] permuted among the members of each group (group_ids [B]); the multiset of each group is kept."""
    out = rewards.clone()
    for gid in torch.unique(group_ids):
        idx = (group_ids == gid).nonzero().flatten()
        out[idx] = rewards[idx[torch.randperm(len(idx), generator=generator)]]
    return out


def perturbed(state: dict, sigma: float, generator: torch.Generator) -> dict:
    """A copy of a state dict with N(0, sigma^2) noise added to every floating-point tensor (on the CPU)."""
    return {k: v + torch.randn(v.shape, generator=generator).to(v) * sigma if v.is_floating_point() else v.clone()
            for k, v in state.items()}


def run_shuffle(args, cfg):
    if cfg.estimator != "elbo" and not args.real:
        raise SystemExit(f"shuffle: --estimator {cfg.estimator} scores rows by the sign of their advantage, so shuffled "
                         "rewards still push on the gap between the bounds; pass `-- --estimator elbo`")
    if (Path(cfg.out) / "metrics.jsonl").exists():
        raise SystemExit(f"shuffle: {cfg.out} already holds a run; a control must start fresh: pass a new --out")
    if not args.real:   # train() looks group_advantages up in spg_min at each step, so this replacement reaches it
        gen, advantages = S.make_generator(cfg.seed, SHUFFLE_STREAM), S.group_advantages
        S.group_advantages = lambda r, g: advantages(shuffled_within_groups(r, g, gen), g)
    summary = S.train(cfg)
    print(json.dumps({"shuffled": not args.real, "adam_eps": cfg.adam_eps, "before": summary["eval_before"],
                      "after": summary["eval_after"]}))


def run_perturb(args, cfg):
    tok, style, ids = S.load_tokenizer(cfg)
    model = S.load_model(cfg, len(tok))
    S.sft_warm_start(model, tok, cfg, style=style, mask_id=ids["mask"], eos_id=ids["eos"])
    task = T.get_task(cfg.task)
    eval_set = T.load_eval(cfg.task, cfg.data_dir, eval_file=cfg.eval_file, n=cfg.eval_n, seed=cfg.seed)
    warm, gen = {k: v.clone() for k, v in model.state_dict().items()}, S.make_generator(cfg.seed, PERTURB_STREAM)
    for sigma in [0.0, *args.sigmas]:
        model.load_state_dict(perturbed(warm, sigma, gen))
        metrics, _ = S.evaluate(model, tok, task, eval_set, cfg, style=style, mask_id=ids["mask"],
                                stop_ids=(ids["eos"], ids["eot"]))
        print(json.dumps({"sigma": sigma, **metrics}), flush=True)


def positive_floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive numbers separated by commas, e.g. 3e-4,1e-3")
    return values


def parse(argv):
    ours, theirs = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                epilog="spg_min flags go after `--`, e.g. `perturb -- --warm-start-steps 300`")
    modes = p.add_subparsers(dest="mode", required=True)
    shuffle = modes.add_parser("shuffle", help="a train() run with rewards shuffled within each group")
    shuffle.add_argument("--out", required=True, help="the run's directory (must not hold a run)")
    shuffle.add_argument("--real", action="store_true", help="keep the real rewards (the comparison run)")
    perturb = modes.add_parser("perturb", help="held-out accuracy of the warm start under random weight noise")
    perturb.add_argument("--sigmas", type=positive_floats, default=[3e-4, 1e-3, 3e-3])
    args = p.parse_args(ours)
    out = ["--out", args.out, "--resume", "none"] if args.mode == "shuffle" else ["--out", "runs/noise_control"]
    cfg = S.parse_config(["--task", "sudoku", "--model", "tiny", *out, *theirs])
    if cfg.model != "tiny":
        p.error("the controls are for the tiny CPU model; drop --model")
    return args, cfg


def main(argv=None):
    args, cfg = parse(sys.argv[1:] if argv is None else argv)
    (run_shuffle if args.mode == "shuffle" else run_perturb)(args, cfg)


if __name__ == "__main__":
    main()
