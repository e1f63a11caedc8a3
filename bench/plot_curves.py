"""Plot training reward and held-out accuracy per step from one or more run directories (metrics.jsonl).

Usage: python bench/plot_curves.py runs/seed1 runs/seed2 runs/seed3 --out docs/sudoku_tiny.png
"""
import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_run(run: Path):
    """(steps, reward means, rollout temperature, eval steps, eval accuracies); step 0 is the evaluation before RL."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    evals = []
    if "eval_before" in summary:              # a run resumed from a bare checkpoint has none ...
        evals.append((0, summary["eval_before"]["accuracy"]))
    if "eval_at_resume" in summary:           # ... but an evaluation at the checkpoint's step
        evals.append((summary["eval_at_resume"]["step"], summary["eval_at_resume"]["accuracy"]))
    evals += [(r["step"], r["eval"]["accuracy"]) for r in rows if "eval" in r]
    if "eval_after" in summary:               # absent until the run ends
        evals.append((summary["steps"], summary["eval_after"]["accuracy"]))
    eval_steps, accuracy = zip(*sorted(evals)) if evals else ((), ())
    return ([r["step"] for r in rows], [r["reward/mean"] for r in rows], summary["config"]["temperature"],
            eval_steps, accuracy)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=Path("docs/curves.png"))
    p.add_argument("--title", default="SPG on 4x4 Sudoku, tiny model, CPU")
    args = p.parse_args()
    fig, (ax_r, ax_e) = plt.subplots(1, 2, figsize=(10, 3.8))
    for run in args.runs:
        steps, reward, temperature, eval_steps, acc = read_run(run)
        ax_r.plot(steps, reward, lw=1, label=run.name)
        ax_e.plot(eval_steps, acc, marker="o", ms=3, label=run.name)
    ax_r.set(xlabel="step (rollout batch)", ylabel="mean training reward", title=f"reward of the rollouts (T = {temperature})")
    ax_e.set(xlabel="step (rollout batch)", ylabel="held-out cell accuracy (%)", title="greedy held-out evaluation")
    for ax in (ax_r, ax_e):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(args.title)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
