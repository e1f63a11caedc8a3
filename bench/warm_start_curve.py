"""How fast the supervised warm start moves: held-out accuracy at several warm-start budgets, in one run.

The same steps as spg_min's `sft_warm_start` (`warm_start_setup`: the same data, AdamW and generator; `sft_step`),
evaluated greedily on the held-out set at each budget in --steps, so the number at 200 is that of the 200-step
warm start a `spg_min.py --model tiny` run builds and caches (tests/test_train.py checks the weights are equal). RL from a given
budget is worth comparing with the next budgets here: they show what supervision on the true solutions does with
the same number of steps.

Run: OMP_NUM_THREADS=1 python bench/warm_start_curve.py --steps 100,200,300,400,600   (about 10 minutes)
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import spg_min as S    # noqa: E402
import tasks as T      # noqa: E402


def budgets(text: str) -> list[int]:
    try:
        values = sorted({int(x) for x in text.split(",")})
    except ValueError:
        values = []
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive step counts separated by commas, e.g. 100,200")
    return values


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", default="sudoku", choices=["sudoku", "countdown"])
    p.add_argument("--steps", type=budgets, default=[100, 200, 300, 400, 600], help="warm-start budgets, e.g. 100,200")
    p.add_argument("--eval-n", type=int, default=256)
    args = p.parse_args()
    cfg = S.parse_config(["--task", args.task, "--model", "tiny", "--out", "runs/warm_start_curve",
                          "--eval-n", str(args.eval_n)])
    tok, style, ids = S.load_tokenizer(cfg)
    task, model = T.get_task(cfg.task), S.load_model(cfg, len(tok))
    eval_set = T.load_eval(cfg.task, cfg.data_dir, eval_file=cfg.eval_file, n=cfg.eval_n, seed=cfg.seed)
    examples, opt, gen = S.warm_start_setup(model, tok, cfg, style)      # as sft_warm_start
    done = 0
    for budget in args.steps:
        for _ in range(budget - done):
            loss = S.sft_step(model, opt, tok, examples, cfg.task, gen_length=cfg.gen_length, style=style,
                              mask_id=ids["mask"], eos_id=ids["eos"], generator=gen)
        done = budget
        metrics, _ = S.evaluate(model, tok, task, eval_set, cfg, style=style, mask_id=ids["mask"],
                                stop_ids=(ids["eos"], ids["eot"]))
        print(json.dumps({"warm_start_steps": budget, "loss": round(loss, 4), **metrics}), flush=True)


if __name__ == "__main__":
    main()
