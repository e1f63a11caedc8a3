"""Four changes to the tiny Sudoku RL run that were tried for the main job's bar and did not help (docs/results.md).

Each is one `spg_min.train` run of the tiny model whose warm start is built (or loaded from its cache) exactly as
the main job's; the change applies to RL only:

lora                LoRA adapters (peft, rank --rank, alpha --alpha, no dropout, every linear layer but the head) are
                    injected into the warm-started model, whose own weights are then frozen: the paper trains LLaDA
                    through LoRA, and a low-rank update has fewer directions for the noise to take.
frozen-embeddings   the token embeddings and the output head are frozen after the warm start: the collapsed runs
                    broke the rows of rarely sampled tokens (docs/results.md, "What limits RL here").
few-empties         RL's training puzzles are drawn with the clue counts in --clues (e.g. 12,13: 3 or 4 empty
                    cells), so that a sequence's advantage credits few cells; the warm start and the held-out set
                    keep the published clue counts.
kl-anchor           SPG's loss plus --kl-beta x the k3 KL to the warm start (d1's penalty, which SPG does not have),
                    on the completion tokens each masked copy hides, averaged over the m copies, divided by the
                    rollout batch's completion tokens like the SPG loss: it holds the weights that the noise moves.

Flags after `--` go to spg_min (learning rate, steps, seed, ...). A run starts fresh (`--resume none`); to continue
an interrupted one, repeat its command with `-- ... --resume auto`.

Run: OMP_NUM_THREADS=1 python bench/rl_variants.py lora --rank 16 --alpha 32 --out /tmp/rv_lora -- --lr 5e-4 \\
         --max-steps 75
     OMP_NUM_THREADS=1 python bench/rl_variants.py frozen-embeddings --out /tmp/rv_frozen -- --max-steps 75
     OMP_NUM_THREADS=1 python bench/rl_variants.py few-empties --clues 12,13 --out /tmp/rv_few -- --max-steps 75
     OMP_NUM_THREADS=1 python bench/rl_variants.py kl-anchor --kl-beta 0.04 --out /tmp/rv_kl -- --lr 1e-4 \\
         --max-steps 75
"""
import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import model as M      # noqa: E402
import spg_min as S    # noqa: E402
import tasks as T      # noqa: E402

# tasks draws SUDOKU_PER_GRID (50) distinct unique-completion puzzles per training grid and loops until it has them:
MIN_CLUES = 5    # some grids have only 12 such puzzles with 4 clues
MAX_CLUES = 14   # every grid has only 16 with 15 clues (at least 120 with 14, at least 400 with 5)


def after_warm_start(name: str, change):
    """spg_min.sft_warm_start, then change(model) in place and a line with the weights left to train. train() looks
    sft_warm_start up in spg_min when it runs and collects the parameters that still require grad right after it,
    so the change reaches RL only."""
    warm_start = S.sft_warm_start

    def wrapped(model, *args, **kwargs):
        path = warm_start(model, *args, **kwargs)
        change(model)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"{name}: {trainable:,} trainable weights", flush=True)
        return path
    return wrapped


def inject_lora(model, rank: int, alpha: int):
    """LoRA on every linear layer but the head, in place (peft replaces the layers inside `model` and freezes the
    rest; the PeftModel wrapper it returns is not needed)."""
    M.add_lora(model, r=rank, alpha=alpha, dropout=0.0, targets="all-linear")


def freeze_embeddings(model):
    """Freeze the token embeddings and the output head, in place."""
    model.get_input_embeddings().requires_grad_(False)
    model.get_output_embeddings().requires_grad_(False)


def rl_clue_counts(clues: list[int]):
    """RL's Sudoku training puzzles drawn with these clue counts (uniformly). Only train()'s own load_train_set
    call sees them: the warm start loads its set through warm_start_setup, which runs with the original loader,
    and the held-out set (load_eval) is never touched."""
    load, setup = S.load_train_set, S.warm_start_setup

    def load_few_empties(*args, **kwargs):
        published, T.SUDOKU_CLUES = T.SUDOKU_CLUES, {c: 1 for c in clues}
        try:
            return load(*args, **kwargs)
        finally:
            T.SUDOKU_CLUES = published

    def warm_start_setup(*args, **kwargs):
        S.load_train_set = load
        try:
            return setup(*args, **kwargs)
        finally:
            S.load_train_set = load_few_empties
    S.load_train_set, S.warm_start_setup = load_few_empties, warm_start_setup


def kl_anchor(beta_kl: float):
    """Patch spg_min so that each micro-batch's SPG loss gains beta_kl * sum_{j,k} counted_jk kl_jk / (m num_tokens),
    kl_jk = exp(ref - logp) - (ref - logp) - 1 (d1_loss's k3 estimator) under masked copy j, ref the log-probs of a
    frozen copy of the warm start under the same copy. Zero-advantage sequences, which train() skips, get none
    (d1 keeps them for its KL), so the weight is beta_kl times the fraction of completion tokens that train() scores.
    The patches of the bounds and the loss start once the warm start is done: its own steps (sft_step) call
    sequence_bounds too. train() calls sequence_bounds and then spg_loss for each micro-batch, which the state
    shared between the two relies on."""
    state = {}
    warm_start, spg_loss = S.sft_warm_start, S.spg_loss

    def warm_start_then_reference(model, *args, **kwargs):
        path = warm_start(model, *args, **kwargs)
        state["ref"], _ = S.d1_reference(model)         # the tiny model's reference: a frozen deep copy
        S.sequence_bounds, S.spg_loss = bounds_and_kl, loss_with_kl
        return path

    def bounds_and_kl(model, seqs, attention_mask, c, masked, t, *, beta, mask_id):
        Lg, m = c.shape[1], masked.shape[1]
        logp = S.masked_logprobs(model, seqs, attention_mask, masked, mask_id=mask_id, Lg=Lg)        # [b, m, Lg]
        with torch.no_grad():
            ref = S.masked_logprobs(state["ref"], seqs, attention_mask, masked, mask_id=mask_id, Lg=Lg)
        counted = masked[..., -Lg:] & c[:, None]                                                    # [b, m, Lg]
        log_ref_ratio = ref - logp
        kl = torch.where(counted, torch.exp(log_ref_ratio) - log_ref_ratio - 1, 0.0)               # [b, m, Lg]
        state["kl_sum"] = kl.sum() / m                    # over sequences, copies and tokens; mean over copies
        state["kl_mean"] = (kl.sum() / counted.sum().clamp_min(1)).item()      # per counted token, for the log
        return S.elbo(logp, counted, t), S.eubo(logp, counted, t, beta, lengths=c.sum(-1))

    def loss_with_kl(advantages, elbo_b, eubo_b, *, num_tokens, estimator="mix", omega=0.5):
        loss, stats = spg_loss(advantages, elbo_b, eubo_b, num_tokens=num_tokens, estimator=estimator, omega=omega)
        return loss + beta_kl * state["kl_sum"] / num_tokens, {**stats, "kl_anchor/kl": state["kl_mean"]}

    S.sft_warm_start = warm_start_then_reference


def clue_counts(text: str) -> list[int]:
    """--clues: comma-separated clue counts from MIN_CLUES to MAX_CLUES; argparse reports anything else."""
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(MIN_CLUES <= v <= MAX_CLUES for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give clue counts from {MIN_CLUES} to {MAX_CLUES} separated by "
                                         "commas, e.g. 12,13")
    return values


def parse(argv):
    """(our args, spg_min's Config) from the command line; spg_min's flags come after `--`."""
    ours, theirs = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="spg_min flags go after `--`")
    p.add_argument("variant", choices=["lora", "frozen-embeddings", "few-empties", "kl-anchor"])
    p.add_argument("--out", required=True, help="the run's directory (must not hold a run)")
    p.add_argument("--rank", type=int, default=16, help="lora: adapter rank")
    p.add_argument("--alpha", type=int, default=32, help="lora: adapter alpha")
    p.add_argument("--clues", type=clue_counts, default=[12, 13], help="few-empties: clue counts of RL's puzzles")
    p.add_argument("--kl-beta", type=float, default=0.04, help="kl-anchor: weight of the KL (d1's 0.04)")
    args = p.parse_args(ours)
    if not args.kl_beta >= 0:
        p.error(f"--kl-beta {args.kl_beta}: give a weight >= 0")
    cfg = S.parse_config(["--task", "sudoku", "--model", "tiny", "--out", args.out, "--resume", "none", *theirs])
    if args.variant == "kl-anchor" and cfg.estimator == "d1":
        p.error("kl-anchor adds a KL to SPG's loss; d1 (--estimator d1) has its own (--d1-beta-kl)")
    if cfg.model != "tiny" or cfg.task != "sudoku":
        p.error("the variants are for the tiny Sudoku run; drop --model and --task")
    if not cfg.warm_start_steps:
        p.error("the variants change RL after the warm start, which --warm-start-steps 0 skips: pass 1 or more")
    return args, cfg


def main(argv=None):
    """One run of the chosen variant. It patches spg_min and tasks for the rest of the process: one run per process."""
    args, cfg = parse(sys.argv[1:] if argv is None else argv)
    if args.variant == "lora":
        cfg = dataclasses.replace(cfg, lora_rank=args.rank, lora_alpha=args.alpha)   # summary.json records them
        S.sft_warm_start = after_warm_start("lora", lambda m: inject_lora(m, cfg.lora_rank, cfg.lora_alpha))
    elif args.variant == "frozen-embeddings":
        S.sft_warm_start = after_warm_start("frozen embeddings", freeze_embeddings)
    elif args.variant == "kl-anchor":
        kl_anchor(args.kl_beta)
    else:
        rl_clue_counts(args.clues)
    summary = S.train(cfg)
    print(json.dumps({"variant": args.variant, "before": summary["eval_before"], "after": summary["eval_after"]}))


if __name__ == "__main__":
    main()
