"""Estimator and masking ablation on the tiny CPU model, beside the paper's Tables 3 and 4 and Figure 3.

What runs. For each task (Sudoku, Countdown), one warm-started tiny model: spg_min's cached warm start
(`sft_warm_start`, cached at `warm_start_path`; the first run of a task builds it, the others load it). From it,
for every config below and every seed, one `spg_min.train(Config)` run with the tiny preset (16 prompts x 6
completions per step, mu 2, AdamW 5e-5, T 1.0, greedy held-out evaluation every 25 steps on the 256 held-out
problems), the same number of steps and the same seeds for every config:

    zero, elbo, eubo, mix      SPG with that bound for negative advantages (Table 3), block-wise masking
    d1                         d1's diffu-GRPO baseline (`--estimator d1`: its own fully masked completion)
    eubo-random, mix-random    random masking instead of block-wise (Table 4)

EUBO on Countdown uses beta 2.0 (spg_min's default for that pair, App. G.2); everything else is the preset.
Each run writes OUT/<task>/<config>/seed<k>/ (metrics.jsonl, summary.json, run_time.json). A run whose
summary.json holds `eval_after` after --max-steps steps is done and skipped; an unfinished one, or one finished at
fewer steps, continues from its newest checkpoint (spg_min's `--resume auto`), so the script can be stopped and
started again. A finished run keeps only its last
checkpoint (13 MB each for the tiny model).

Outputs. OUT/ablation.md: per task x config, held-out accuracy after the last step (mean and min-max over
seeds), its change vs the warm start, the steps to reach the warm start + GAIN points (first evaluation at or
above it; mean over the seeds that reached it, and how many did; '-' if none), the mean training reward of the
last 10 steps (Countdown: 1.0 solved, 0.1 well-formed; the tiny model solves no held-out Countdown problem after
its warm start, 0.0% at 200 and at 600 warm-start steps, so there the reward is the informative column), beside
the paper's averages over lengths 128/256/512 (LLaDA-8B-Instruct + LoRA; Table 3 estimators, Table 4 masking,
Table 1 "D1"): compare the orderings, not the values. OUT/ablation.png: training reward per step, mean over
seeds, moving average over 10 steps, one panel per task (like the paper's Figure 3).

Length. The full ablation is 2 tasks x 7 configs x 3 seeds = 42 runs of 150 steps, one after another. Measured
on this 2-core machine, 1 thread, nothing else running: `--configs mix,d1 --seeds 1 --max-steps 10
--eval-every 5` took 68-71 s per run on both tasks, i.e. 4.6-5.1 s per step (mix and d1 alike) and ~7 s per
evaluation of 256 problems. A 150-step run with 7 evaluations: ~13 min; all 42: **about 9.5 hours**, plus the
two warm starts (~1.5 min each; the Sudoku one is shared with the main job's cache). On busy cores a step took
up to 1.5x longer (docs/results.md), so plan for 10-14 hours. Measured with `--max-steps 20 --eval-every 10`
(docs/results.md): 42 runs of 109-242 s, about 1.8 hours of run time for both tasks.

Run:  OMP_NUM_THREADS=1 python bench/ablation.py                 # the full ablation (hours), resumable
      OMP_NUM_THREADS=1 python bench/ablation.py --quick         # every config, 1 seed, 1 step, small eval (~1 min)
      OMP_NUM_THREADS=1 python bench/ablation.py --report-only   # tables and plot from the runs already done
"""
import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import spg_min as S    # noqa: E402

TASKS = ("sudoku", "countdown")
CONFIGS = {  # name: (spg_min flags, masking as shown in the table)
    "zero": (["--estimator", "zero"], "block"),
    "elbo": (["--estimator", "elbo"], "block"),
    "eubo": (["--estimator", "eubo"], "block"),
    "mix": (["--estimator", "mix"], "block"),
    "d1": (["--estimator", "d1"], "all (d1)"),
    "eubo-random": (["--estimator", "eubo", "--masking", "random"], "random"),
    "mix-random": (["--estimator", "mix", "--masking", "random"], "random"),
}
# Paper accuracy (%) averaged over generation lengths 128/256/512, spg_spec.md (f). Table 3 (estimators),
# Table 4 (masking: Countdown only), Table 1 (D1 and the LLaDA-8B-Instruct base the RL runs start from).
PAPER = {
    "sudoku": {"zero": 68.8, "elbo": 82.4, "eubo": 86.1, "mix": 90.0, "d1": 23.0},
    "countdown": {"zero": 45.5, "elbo": 67.1, "eubo": 69.3, "mix": 69.9, "d1": 32.1,
                  "eubo-random": 45.4, "mix-random": 62.8},
}
PAPER_BASE = {"sudoku": 19.9, "countdown": 17.5}   # LLaDA-8B-Instruct, Table 1: (5.7+27.7+26.2)/3, (18.8+16.8+16.8)/3
REWARD_TAIL = 10      # steps averaged for the "training reward at the end" column
SMOOTH = 10           # moving-average window of the reward curves
QUICK = dict(max_steps=1, seeds=1, eval_n=8, num_prompts=2, warm_start_steps=3, eval_every=1)


def run_dir(out: Path, task: str, config: str, seed: int) -> Path:
    return out / task / config / f"seed{seed}"


def config_for(task: str, config: str, seed: int, args) -> S.Config:
    """The spg_min Config of one run: the tiny preset, the config's flags, the shared budget and seed."""
    argv = ["--task", task, "--model", "tiny", *CONFIGS[config][0],
            "--seed", str(seed), "--max-steps", str(args.max_steps), "--eval-every", str(args.eval_every),
            "--eval-n", str(args.eval_n), "--out", str(run_dir(args.out, task, config, seed)),
            "--cache-dir", str(args.cache_dir)]
    argv += ["--num-prompts", str(args.num_prompts)] if args.num_prompts else []
    argv += ["--warm-start-steps", str(args.warm_start_steps)] if args.warm_start_steps is not None else []
    return S.parse_config(argv)


def is_done(run: Path, max_steps: int) -> bool:
    """Finished at this length: a run finished at fewer steps is continued from its last checkpoint, not reused."""
    summary = run / "summary.json"
    done = json.loads(summary.read_text()) if summary.exists() else {}
    return "eval_after" in done and done.get("steps") == max_steps


def run_one(cfg: S.Config) -> None:
    """Train one run (or continue it), record its wall time, keep only its last checkpoint."""
    run = Path(cfg.out)
    t0 = time.time()
    S.train(cfg)
    (run / "run_time.json").write_text(json.dumps({"seconds": time.time() - t0, "steps": cfg.max_steps}))
    for old in sorted(run.glob("ckpt_*"))[:-1]:
        shutil.rmtree(old)


def read_run(run: Path) -> dict:
    """One finished run: accuracy before/after, evaluations [(step, accuracy)], training reward per step."""
    summary = json.loads((run / "summary.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [(0, summary["eval_before"]["accuracy"])]
    evals += [(r["step"], r["eval"]["accuracy"]) for r in rows if "eval" in r]
    evals.append((summary["steps"], summary["eval_after"]["accuracy"]))
    return {"before": summary["eval_before"]["accuracy"], "after": summary["eval_after"]["accuracy"],
            "evals": evals, "reward": [r["reward/mean"] for r in rows]}


def steps_to_reach(evals, threshold):
    """First evaluated step whose held-out accuracy is >= threshold, or None. evals: [(step, accuracy)]."""
    return next((step for step, acc in evals if acc >= threshold), None)


def seed_summary(runs: list[dict], gain: float) -> dict:
    """Mean and range over seeds of the final accuracy and its change, steps to warm start + gain, final reward."""
    after = [r["after"] for r in runs]
    change = [r["after"] - r["before"] for r in runs]
    reached = [s for r in runs if (s := steps_to_reach(r["evals"], r["before"] + gain)) is not None]
    tail = [statistics.fmean(r["reward"][-REWARD_TAIL:]) for r in runs]
    return {"n": len(runs), "after": statistics.fmean(after), "lo": min(after), "hi": max(after),
            "change": statistics.fmean(change), "before": statistics.fmean(r["before"] for r in runs),
            "steps": statistics.fmean(reached) if reached else None, "reached": len(reached),
            "reward": statistics.fmean(tail)}


def markdown(results: dict, gain: float, args) -> str:
    """The ablation table: our tiny-model numbers beside the paper's."""
    lines = [f"# Estimator and masking ablation, tiny model ({args.max_steps} steps, seeds {args.seed_list})", "",
             "Held-out accuracy (%; Sudoku: cell accuracy) after the last step, mean [min, max] over seeds; change vs "
             f"the warm start; steps to reach the warm start + {gain:g} points (mean over the seeds that reached it, "
             f"(k/n) how many did); training reward averaged over the last {REWARD_TAIL} steps. Paper: LLaDA-8B-Instruct "
             "+ LoRA, average over lengths 128/256/512 (Table 3 estimators, Table 4 masking, Table 1 D1), and its "
             "change vs LLaDA-8B-Instruct. Compare orderings, not values.", "",
             "| task | config | masking | held-out after | change | steps to +gain | train reward (end) "
             "| paper | paper change |", "|---|---|---|---|---|---|---|---|---|"]
    for task in args.task_list:
        for config in args.config_list:
            s = results.get((task, config))
            paper = PAPER[task].get(config)
            paper_cells = f"{paper:.1f} | {paper - PAPER_BASE[task]:+.1f}" if paper is not None else "- | -"
            if s is None:
                lines.append(f"| {task} | {config} | {CONFIGS[config][1]} | not run | | | | {paper_cells} |")
                continue
            steps = f"{s['steps']:.0f} ({s['reached']}/{s['n']})" if s["steps"] is not None else "-"
            lines.append(f"| {task} | {config} | {CONFIGS[config][1]} | {s['after']:.1f} [{s['lo']:.1f}, {s['hi']:.1f}] "
                         f"| {s['change']:+.1f} | {steps} | {s['reward']:.3f} | {paper_cells} |")
    befores = {task: s["before"] for (task, _), s in results.items()}
    lines += ["", "Warm start (held-out accuracy before RL): "
              + ", ".join(f"{task} {acc:.1f}" for task, acc in befores.items()), ""]
    return "\n".join(lines)


def moving_average(values, window):
    """Trailing mean over up to `window` values: [n] -> [n]."""
    return [statistics.fmean(values[max(0, i + 1 - window):i + 1]) for i in range(len(values))]


def plot(curves: dict, args, path: Path) -> None:
    """Training reward per step, mean over seeds, smoothed; one panel per task (the paper's Figure 3)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(args.task_list), figsize=(5.5 * len(args.task_list), 3.8), squeeze=False)
    for ax, task in zip(axes[0], args.task_list):
        for config in args.config_list:
            runs = curves.get((task, config))
            if not runs:
                continue
            n = min(len(r) for r in runs)
            mean = [statistics.fmean(r[i] for r in runs) for i in range(n)]
            style = "--" if CONFIGS[config][1] == "random" else "-"
            ax.plot(range(1, n + 1), moving_average(mean, SMOOTH), style, lw=1.2, marker="." if n < 3 else None,
                    label=config)
        ax.set(title=f"{task} (tiny model)", xlabel="step (rollout batch)", ylabel="training reward")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"training reward per step\nmean over seeds, {SMOOTH}-step moving average", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None, help="default: bench/results/ablation (--quick: ablation_quick)")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--seeds", type=int, default=3, help="seeds 1..N")
    p.add_argument("--max-steps", type=int, default=S.TINY_PRESET["max_steps"], help="RL steps of every run")
    p.add_argument("--eval-every", type=int, default=S.TINY_PRESET["eval_every"])
    p.add_argument("--eval-n", type=int, default=256)
    p.add_argument("--num-prompts", type=int, default=None, help="default: the tiny preset's 16")
    p.add_argument("--warm-start-steps", type=int, default=None, help="default: the tiny preset's 200")
    p.add_argument("--cache-dir", type=Path, default=ROOT / ".cache", help="warm starts (shared with spg_min runs)")
    p.add_argument("--gain", type=float, default=5.0, help="points above the warm start for 'steps to +gain'")
    p.add_argument("--quick", action="store_true", help="every config, 1 seed, 1 step, small eval, fresh warm start")
    p.add_argument("--report-only", action="store_true", help="no training: tables and plot from finished runs")
    args = p.parse_args(argv)
    if args.out is None:  # a quick run never lands in the full run's folder (its 1-step runs would count as done)
        args.out = ROOT / "bench" / "results" / ("ablation_quick" if args.quick else "ablation")
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
        args.cache_dir = args.out / "cache"
    args.task_list, args.config_list = args.tasks.split(","), args.configs.split(",")
    args.seed_list = list(range(1, args.seeds + 1))
    unknown = [c for c in args.config_list if c not in CONFIGS] + [t for t in args.task_list if t not in TASKS]
    if unknown:
        p.error(f"unknown task or config {unknown}: choose from {TASKS} and {list(CONFIGS)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    jobs = [(task, config, seed) for task in args.task_list for config in args.config_list for seed in args.seed_list]
    for k, (task, config, seed) in enumerate(jobs):
        cfg = config_for(task, config, seed, args)
        if args.report_only or is_done(Path(cfg.out), args.max_steps):
            continue
        print(f"[{k + 1}/{len(jobs)}] {task} {config} seed {seed} -> {cfg.out}", flush=True)
        run_one(cfg)
    results, curves = {}, {}
    for task in args.task_list:
        for config in args.config_list:
            runs = [read_run(run_dir(args.out, task, config, s)) for s in args.seed_list
                    if is_done(run_dir(args.out, task, config, s), args.max_steps)]
            if runs:
                results[(task, config)] = seed_summary(runs, args.gain)
                curves[(task, config)] = [r["reward"] for r in runs]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ablation.md").write_text(markdown(results, args.gain, args))
    plot(curves, args, args.out / "ablation.png")
    print(f"wrote {args.out / 'ablation.md'} and {args.out / 'ablation.png'}")


if __name__ == "__main__":
    main()
