"""spg-min: Sandwiched Policy Gradient (SPG, arXiv 2510.09541) for masked diffusion LMs, in one file.

The objective (Eq. 5 / Alg. 1). For a prompt c, sample a group of g completions x_1..x_g from the model,
score each with rewards r_j and take advantages A_j = r_j - mean(r) (Eq. 4; no std normalisation). The
sequence log-likelihood log pi(x|c) of a diffusion LM is intractable, so SPG sandwiches it:

    J_SPG = E[ 1/g sum_j  1[A_j > 0] A_j L_ELBO(x_j|c)  +  1[A_j <= 0] A_j L_neg(x_j|c) ]

with L_ELBO the evidence lower bound (Eq. 2), and for negative advantages L_neg the Renyi upper bound
L~_EUBO (Corollary 1) or the mixture w L~_EUBO + (1-w) L_ELBO (Eq. 8). Maximising a lower bound pushes
log pi up; minimising an upper bound pushes it down. Both bounds are Monte Carlo estimates over m masked
copies of each sequence, masked block by block as the model decodes (block-wise masking, Sec. 3.3).
There is no importance ratio, no clipping and no KL; each rollout batch feeds mu optimizer steps, each with
freshly drawn masks.

Baseline `--estimator d1` (d1's diffu-GRPO, spg_spec.md (g)) shares rollouts, rewards, advantages, the mu inner
updates, the optimizer and evaluation, and replaces the bounds by d1's one-step per-token log-probs (completion
fully masked, prompt masked with probability p_mask_prompt) in a clipped-ratio objective with a k3 KL penalty to
a reference model (`d1_loss`).

Shapes (one alphabet throughout): B sequences in a batch (= prompts x g), g group size, P prompt length,
Lg generation length, L = P + Lg, V vocabulary, m Monte Carlo masked samples, bl block length, K = Lg / bl
blocks, d hidden size.

Deliberate differences from the authors' code (facebookresearch/SPG @ a1c7120; see README "Deviations"):
  1. fresh masks for every inner update, drawn from explicit generators (reference: one of 4096 seeds,
     picked by `_step % mu`, and every global RNG reseeded inside the loss);
  2. the EUBO is computed in log space (logsumexp over samples), so p**beta never underflows to 0
     and silently drops tokens (field case B09);
  3. log-probabilities in float32 from float32 logits (a float32 LM head in training), computed in chunks;
     rollouts under no_grad in eval mode (no LoRA dropout while sampling);
  4. the attention mask is honoured (left padding is invisible to the model), and sampling at T > 0 draws
     exactly from softmax(logits / T) (reference: bf16 Gumbel noise);
  5. block choice uniform over the blocks holding completion tokens (reference: randperm(K) % n_blocks);
  6. the g completions of a prompt share their mask draws (common random numbers): the tokens they share are
     masked alike, so their gradients largely cancel in sum_j A_j grad bound_j (sum_j A_j = 0; not exactly: the
     rest of each completion differs, and under the mixture so do the bounds of A > 0 and A < 0): less noise;
  7. groups with identical rewards have advantage exactly 0 and are skipped in the loss pass (same
     gradient, less compute), as is a completion whose reward is its group's mean up to rounding.

Run:  python spg_min.py --task sudoku --model tiny        # CPU, small model, minutes
      python spg_min.py --task gsm8k                      # one GPU: LLaDA-8B-Instruct, 4-bit NF4 + LoRA
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import inspect
import json
import math
import os
import re
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

import model as M
import tasks as T

ADAM_BETAS = (0.9, 0.99)      # train.yaml:23-25 of the reference
WARM_START_LR = 1e-3         # supervised warm start of the tiny model (AdamW)
WARM_START_BATCH = 64        # solutions per warm-start step
WARM_START_SEED = 7          # the warm start's data and masks: make_generator(0, WARM_START_SEED), not the RL seed
WARM_START_DATA_SEED = 42    # the training set the warm start draws from (Config's default seed), whatever the RL seed
WARM_START_LOG_EVERY = 50    # a warm-start progress line every N steps (tqdm's bar is off when output is not a tty)
ADVANTAGE_TIE = 1e-6         # |A| at or below this (x max(1, |r|)) is rounding: A = 0 exactly (field case B12)
MAX_NONFINITE_IN_A_ROW = 10  # skipped steps in a row before the run aborts
REPEAT_ALARM = 0.5           # warn when over half a batch's completions are one repeated token (field case B09)
LOGP_CHUNK_BYTES = 32 * 2**20  # float32 logits alive at once in the loss pass: 66 rows at V = 126,464 (bench/loss.py)
LSE_ROWS = 8                  # rows per logsumexp in TargetLogprob: its temporary is 8 rows of logits, not a chunk


# ----------------------------------------------------------------------------------------------------
# Configuration: paper defaults, with small named overrides per task and for the tiny CPU model.

@dataclass
class Config:
    # run
    task: str = "gsm8k"                 # gsm8k | math | countdown | sudoku
    model: str = "GSAI-ML/LLaDA-8B-Instruct"   # hub id, local LLaDA dir, or "tiny" (CPU model)
    out: str = "runs/spg"               # output directory (metrics.jsonl, summary.json, checkpoints)
    data_dir: str | None = None         # local data laid out like ../shared/data (no network)
    eval_file: str | None = None        # optional evaluation file (e.g. the published Sudoku CSV)
    seed: int = 42                      # all randomness derives from (seed, step)
    max_steps: int = 1500               # rollout rounds; each feeds mu optimizer steps (paper: 4 x 1500 = 6000)
    # rollouts
    num_prompts: int = 2                # prompts per rollout batch (paper: 16 over 8 GPUs)
    group_size: int = 6                 # g completions per prompt (Eq. 4)
    gen_length: int = 256               # Lg
    block_length: int = 32              # bl, for decoding and for block-wise masking
    steps: int = 128                    # decoding steps for Lg tokens (2 tokens per step)
    temperature: float = 0.9            # rollout temperature (Sudoku 0.3)
    max_prompt_length: int = 512        # longer prompts are refused at data loading
    d1_compat: bool = False             # GSM8K format rewards exactly as the reference's (single-line only, B01)
    # SPG objective
    estimator: str = "mix"              # bound for A <= 0: mix | eubo | elbo | zero; or d1 (the diffu-GRPO baseline)
    beta: float = 1.5                   # Renyi order of the EUBO (Sudoku 1.0, Countdown EUBO 2.0)
    omega: float = 0.5                  # mixture weight on the EUBO (Eq. 8)
    num_mc: int = 2                     # m masked samples per sequence
    p_mask_prompt: float = 0.15         # chance to mask each prompt / clean-block token
    masking: str = "block"              # block (paper) | random (Table 4 ablation) | d1 (all of the completion)
    mu: int = 4                         # inner optimizer steps per rollout batch
    micro_batch: int = 2                # sequences per forward/backward in the loss pass (24 GB: bench/memory.py)
    # d1 baseline (--estimator d1): values of SPG's d1 runs, train.yaml:69 and spg/slurm_scripts/d1 (spg_spec.md (e))
    d1_epsilon: float = 0.5             # clip range of the importance ratio, [1 - eps, 1 + eps]
    d1_beta_kl: float = 0.04            # weight of the k3 KL penalty to the reference model
    # optimisation
    lr: float = 3e-6                    # AdamW learning rate
    adam_eps: float = 1e-8              # AdamW eps (torch's default; bench/noise_control.py tries 1e-4)
    weight_decay: float = 0.1           # AdamW weight decay
    grad_clip: float = 0.2              # largest gradient L2 norm of an optimizer step
    load_in_4bit: bool = True           # NF4 base + LoRA (LLaDA only; the tiny preset sets it and LoRA off)
    lora_rank: int = 128                # LoRA r (reference train.yaml)
    lora_alpha: int = 64                # LoRA alpha (reference train.yaml)
    # evaluation and bookkeeping
    eval_every: int = 100               # greedy held-out evaluation every N steps (0: only before/after)
    eval_n: int = 256                   # held-out problems per evaluation
    eval_batch: int = 8                 # held-out problems decoded at once
    warm_start_steps: int = 0           # supervised masked-diffusion steps before RL (tiny model only)
    save_every: int = 100               # checkpoint every N steps (and at the end)
    resume: str = "auto"                # auto: newest checkpoint under --out | none: a new run only | a ckpt_* dir
    cache_dir: str = ".cache"           # warm-start checkpoints are cached here


TASK_DEFAULTS = {  # paper App. G.2 and spg_spec.md (e): 6000/4000/6000/2500 optimizer steps = rounds x mu (4)
    "gsm8k": dict(max_steps=1500),
    "math": dict(max_steps=1000),
    "countdown": dict(max_steps=1500),
    "sudoku": dict(max_steps=625, beta=1.0, temperature=0.3, max_prompt_length=1500,   # the 3-shot prompt (data.md 2.1)
                   micro_batch=1),   # its ~2,200-character prompt: 2 rows would need ~25 GB (bench/memory.py)
}
TINY_PRESET = dict(  # a ~1M-parameter model on 2 CPU cores; docs/results.md says how it was chosen
    gen_length=24, block_length=8, steps=12, num_prompts=16, group_size=6, mu=2, micro_batch=96,
    temperature=1.0, lr=5e-5, weight_decay=0.0, grad_clip=1.0, max_steps=150, eval_every=25,
    eval_batch=256, warm_start_steps=200, max_prompt_length=64, save_every=25,
    p_mask_prompt=0.0,  # the tiny prompt IS the puzzle: masking 15 % of its givens biases the gradient (docs/results.md)
    load_in_4bit=False, lora_rank=0, lora_alpha=0,  # every weight trains in float32: no 4-bit base, no LoRA
)

ESTIMATOR_DEFAULTS = {  # d1 scores one fully masked copy of the completion (spg_spec.md (g)2)
    "d1": dict(num_mc=1, masking="d1"),
}
TASK_ESTIMATOR_DEFAULTS = {  # the paper's one (task, estimator) exception: App. G.2, Table 12
    ("countdown", "eubo"): dict(beta=2.0),
}


def validate(cfg: Config) -> None:
    """Check every cross-field rule before any model or data is loaded; raise ValueError naming the fix."""
    def need(ok, msg):
        if not ok:
            raise ValueError(msg)
    need(cfg.task in T.TASKS, f"task={cfg.task!r}: choose from {', '.join(T.TASKS)}")
    need(min(cfg.gen_length, cfg.block_length, cfg.steps, cfg.num_prompts, cfg.eval_batch) >= 1,
         "gen_length, block_length, steps, num_prompts and eval_batch must be >= 1 (got "
         f"{cfg.gen_length}, {cfg.block_length}, {cfg.steps}, {cfg.num_prompts}, {cfg.eval_batch})")
    need(cfg.lr >= 0.0 and cfg.weight_decay >= 0.0 and cfg.grad_clip > 0.0,
         f"lr={cfg.lr} and weight_decay={cfg.weight_decay} must be >= 0, grad_clip={cfg.grad_clip} > 0")
    need(cfg.gen_length % cfg.block_length == 0,
         f"gen_length={cfg.gen_length} must be a multiple of block_length={cfg.block_length}")
    blocks = cfg.gen_length // cfg.block_length
    need(cfg.steps % blocks == 0 and cfg.steps >= blocks,
         f"steps={cfg.steps} must be a positive multiple of the number of blocks ({blocks})")
    need((cfg.gen_length // 2) % blocks == 0 and cfg.gen_length // 2 >= blocks,
         f"evaluation decodes in gen_length / 2 = {cfg.gen_length // 2} steps, which must be a positive multiple of "
         f"the number of blocks ({blocks}): choose a block_length that makes it one")
    need(cfg.group_size >= 2, f"group_size={cfg.group_size}: at least 2 completions per prompt are needed")
    need(cfg.estimator in [*NEG_BOUND, "d1"], f"estimator={cfg.estimator!r}: choose from {sorted(NEG_BOUND)} or d1")
    need(cfg.estimator != "d1" or (cfg.num_mc == 1 and cfg.masking == "d1"),
         f"estimator=d1 scores one fully masked copy: needs num_mc=1 and masking=d1 (got {cfg.num_mc}, {cfg.masking!r})")
    need(0.0 < cfg.d1_epsilon < 1.0, f"d1_epsilon={cfg.d1_epsilon} must lie in (0, 1)")
    need(cfg.d1_beta_kl >= 0.0, f"d1_beta_kl={cfg.d1_beta_kl} must be >= 0")
    need(cfg.masking in FORWARD_PROCESS, f"masking={cfg.masking!r}: choose from {sorted(FORWARD_PROCESS)}")
    need(cfg.beta > 0.0, f"beta={cfg.beta} must be > 0 (the Renyi order; Lemma 1's upper bound needs beta >= 1)")
    if cfg.beta < 1.0 and (cfg.estimator == "eubo" or (cfg.estimator == "mix" and cfg.omega > 0)):  # Table 12
        warnings.warn(f"beta={cfg.beta} < 1: the EUBO is then no upper bound of log pi (Lemma 1 needs beta >= 1); "
                      "the paper runs 0.5 and 0.75 as its 'implicit mixture' ablation (Table 12)")
    need(0.0 <= cfg.omega <= 1.0, f"omega={cfg.omega} must lie in [0, 1] (Eq. 8)")
    need(0.0 <= cfg.p_mask_prompt < 1.0, f"p_mask_prompt={cfg.p_mask_prompt} must lie in [0, 1)")
    need(cfg.num_mc >= 1 and cfg.mu >= 1 and cfg.micro_batch >= 1, "num_mc, mu and micro_batch must be >= 1")
    need(cfg.adam_eps > 0.0, f"adam_eps={cfg.adam_eps} must be > 0")
    need(cfg.max_steps >= 1 and cfg.eval_n >= 1 and cfg.save_every >= 1 and cfg.eval_every >= 0,
         f"max_steps, eval_n and save_every must be >= 1, eval_every >= 0 (got {cfg.max_steps}, {cfg.eval_n}, "
         f"{cfg.save_every}, {cfg.eval_every})")
    need(cfg.temperature >= 0.0, f"temperature={cfg.temperature} must be >= 0")
    need(cfg.model == "tiny" or (cfg.lora_rank >= 1 and cfg.lora_alpha > 0),   # alpha 0: LoRA's scale alpha/r is 0
         f"lora_rank={cfg.lora_rank} must be >= 1 and lora_alpha={cfg.lora_alpha} > 0 (alpha 0 trains nothing)")
    need(cfg.resume in ("auto", "none") or (Path(cfg.resume) / "state.pt").exists(),
         f"resume={cfg.resume!r}: pass auto, none, or a checkpoint directory holding state.pt")
    need(cfg.eval_file is None or Path(cfg.eval_file).is_file(),
         f"eval_file={cfg.eval_file!r} is not a file: pass --eval-file with an existing file (or leave it out)")


# ----------------------------------------------------------------------------------------------------
# The paper's objects, in paper order. Pure functions: tensors in, tensors out.

def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """A_j = r_j - mean of r over the completions of the same prompt (Eq. 4; no std division).

    rewards [B] float, group_ids [B] long (equal ids = same prompt; any order). Returns [B] float32.
    Computed in float64; a reward within ADVANTAGE_TIE x max(1, the group's largest |r|) of its group's mean
    gets exactly 0, so the ELBO/EUBO choice (A > 0) never depends on rounding (field case B12): a group of
    equal rewards, or the middle one of float32 [0.1, 0.2, 0.3] (mean 0.2 + 5e-9 in float64).
    """
    r = rewards.double()
    _, gid = torch.unique(group_ids, return_inverse=True)                           # [B] in 0..G-1
    n_groups = int(gid.max()) + 1
    total = torch.zeros(n_groups, dtype=r.dtype).index_add_(0, gid, r)
    count = torch.zeros(n_groups, dtype=r.dtype).index_add_(0, gid, torch.ones_like(r))
    scale = torch.ones(n_groups, dtype=r.dtype).scatter_reduce(0, gid, r.abs(), "amax")  # [G] max(1, |r|)
    adv = r - (total / count)[gid]
    tie = adv.abs() <= ADVANTAGE_TIE * scale[gid]                                    # [B] rounding, not signal
    return torch.where(tie, torch.zeros_like(adv), adv).float()


def is_stop_token(completion_ids: torch.Tensor, stop_ids) -> torch.Tensor:
    """[B, Lg] bool: the positions holding a stop token (EOS or end of turn)."""
    return torch.isin(completion_ids, torch.as_tensor(list(stop_ids), device=completion_ids.device))


def completion_mask(completion_ids: torch.Tensor, stop_ids) -> torch.Tensor:
    """c [B, Lg] bool: True up to and including the first stop token (EOS or end of turn), by position.

    Built from positions, not from token values, so pad == eos never drops the real EOS (B19).
    """
    is_stop = is_stop_token(completion_ids, stop_ids)
    stops_before = is_stop.long().cumsum(-1) - is_stop.long()                        # [B, Lg]
    return stops_before == 0


def repeated_token_fraction(completion_ids: torch.Tensor, c: torch.Tensor, stop_ids) -> float:
    """Fraction of completions [B, Lg] that are one token repeated (at least twice) before the first stop token.

    The collapse signature of field case B09 (every completion `!!!!`); train() logs it as `health/repeated_frac`
    and warns above REPEAT_ALARM. c [B, Lg] is completion_mask(completion_ids, stop_ids)."""
    real = c & ~is_stop_token(completion_ids, stop_ids)                                 # [B, Lg]
    first = completion_ids.gather(1, real.long().argmax(1, keepdim=True))               # [B, 1] first real token
    one_token = ((completion_ids == first) | ~real).all(1) & (real.sum(1) >= 2)         # [B]
    return one_token.float().mean().item()


def collapse_warning(repeated_frac: float, step: int) -> str:
    """The warning line for a step whose repeated_token_fraction is over REPEAT_ALARM."""
    return (f"warning: {repeated_frac:.0%} of step {step}'s completions are one repeated token, the collapse of "
            "field case B09; lower --lr or use --estimator mix")


def _uniform(shape, group_ids, generator, device) -> torch.Tensor:
    """U(0, 1) draws of shape [B, ...]. With group_ids [B], one draw per group, shared by its members
    (common random numbers: the g completions of a prompt are masked alike, so the gradients of the tokens they
    share largely cancel in sum_j A_j grad bound_j, as sum_j A_j = 0; not exactly, as the rest of each completion
    differs, and so may the bound; each bound keeps its distribution)."""
    if group_ids is None:
        return torch.rand(shape, generator=generator, device=device)
    _, gid = torch.unique(group_ids, return_inverse=True)
    n_groups = int(gid.max()) + 1 if gid.numel() else 0                               # 0: no active sequence
    return torch.rand((n_groups, *shape[1:]), generator=generator, device=device)[gid.to(device)]


def _random_subset(candidates, count, u) -> torch.Tensor:
    """Exactly count[...] positions chosen among candidates[..., L] (bool) by the order of scores u[..., L]."""
    rank = u.masked_fill(~candidates, 2.0).argsort(-1).argsort(-1)                   # 0 = first chosen
    return candidates & (rank < count.unsqueeze(-1))


def block_forward_process(c: torch.Tensor, prompt_len: int, *, m: int, block_length: int,
                          p_mask_prompt: float, generator=None, group_ids=None):
    """Block-wise masking for the MC bound estimates (Sec. 3.3; reference `forward_type=block_random`).

    c [B, Lg] bool completion mask. Per sequence and sample j: choose one of the blocks that hold
    completion tokens uniformly, mask a uniform count 1..n_in of its n_in real tokens, keep earlier blocks
    clean, mask later blocks and everything after the first EOS entirely; then mask prompt and clean
    earlier-block tokens independently with probability p_mask_prompt (unmasked tokens of the chosen
    block are not perturbed, as in the reference). group_ids [B] (optional): share the draws per group.
    Returns masked [B, m, P + Lg] bool and t [B, m] float, the masked fraction of the completion
    (# masked real completion tokens / |c|), used as w(t) = 1/t.
    """
    B, Lg = c.shape
    u = lambda *shape: _uniform((B, m, *shape), group_ids, generator, c.device)
    n_real = c.sum(-1)                                                               # [B] = |c|
    n_blocks = (n_real - 1) // block_length + 1                                      # [B] non-empty blocks
    start = (u() * n_blocks[:, None]).long() * block_length                          # [B, m] chosen block
    n_in = (n_real[:, None] - start).clamp(max=block_length)                         # [B, m] real tokens in it
    count = (u() * n_in).long() + 1                                                  # [B, m] in 1..n_in
    rel = torch.arange(Lg, device=c.device) - start[..., None]                        # [B, m, Lg]
    chosen = _random_subset((rel >= 0) & (rel < n_in[..., None]), count, u(Lg))      # [B, m, Lg]
    after = rel >= n_in[..., None]                  # later blocks, and the post-EOS tail of the chosen one
    earlier = (u(Lg) < p_mask_prompt) & (rel < 0)                                    # perturbed clean tokens
    comp = chosen | after | earlier | ~c[:, None, :]                                 # [B, m, Lg]
    prompt = u(prompt_len) < p_mask_prompt                                           # [B, m, P]
    t = (comp & c[:, None, :]).sum(-1) / n_real[:, None]                              # [B, m]
    return torch.cat([prompt, comp], -1), t.float()


def random_forward_process(c: torch.Tensor, prompt_len: int, *, m: int, block_length: int = 0,
                           p_mask_prompt: float, generator=None, group_ids=None):
    """Random masking (the paper's Table 4 ablation; reference `forward_type=random`).

    A uniform count 1..|c| of the real completion tokens is masked anywhere in the completion, the
    post-EOS tail is masked, and prompt tokens are masked with probability p_mask_prompt. Same arguments
    and returns as block_forward_process; block_length is unused.
    """
    B, Lg = c.shape
    u = lambda *shape: _uniform((B, m, *shape), group_ids, generator, c.device)
    n_real = c.sum(-1)
    count = (u() * n_real[:, None]).long() + 1                                       # [B, m] in 1..|c|
    comp = _random_subset(c[:, None, :].expand(B, m, Lg), count, u(Lg)) | ~c[:, None, :]
    prompt = u(prompt_len) < p_mask_prompt
    t = (comp & c[:, None, :]).sum(-1) / n_real[:, None]
    return torch.cat([prompt, comp], -1), t.float()


def d1_forward_process(c: torch.Tensor, prompt_len: int, *, m: int, block_length: int = 0,
                       p_mask_prompt: float, generator=None, group_ids=None):
    """d1's one-step masking (d1 `forward_process`; SPG's `forward_type=all`, spg_spec.md (b), (g)2).

    Every completion position is masked (the post-EOS tail included) and each prompt token independently with
    probability p_mask_prompt. Same arguments and returns as block_forward_process (c [B, Lg] -> masked
    [B, m, P + Lg], t [B, m] = 1); block_length is unused. d1 draws the prompt mask per row; here, as for the
    other forward processes, group_ids shares it within a group (deviation 6).
    """
    B, Lg = c.shape
    prompt = _uniform((B, m, prompt_len), group_ids, generator, c.device) < p_mask_prompt    # [B, m, P]
    comp = torch.ones(B, m, Lg, dtype=torch.bool, device=c.device)                           # [B, m, Lg]
    return torch.cat([prompt, comp], -1), torch.ones(B, m, device=c.device)


FORWARD_PROCESS = {"block": block_forward_process, "random": random_forward_process, "d1": d1_forward_process}


def elbo(logp: torch.Tensor, masked: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Sequence ELBO estimate (Eq. 2, linear schedule w(t) = 1/t): mean_j sum_k masked * logp / t_j.

    logp [B, m, Lg] log pi(x_k | z_j) of the true token, masked [B, m, Lg] bool (completion tokens up to
    and including the first EOS that sample j masked), t [B, m] the masked fraction. Returns [B] (nats).
    Uses the empirical mask ratio t_j for w(t) = 1/t, as the reference does (spg_spec.md (h)2).
    """
    per_sample = torch.where(masked, logp, 0.0).sum(-1) / t.clamp_min(1e-8)         # [B, m]
    return per_sample.mean(-1)                                                        # [B]


def eubo(logp: torch.Tensor, masked: torch.Tensor, t: torch.Tensor, beta: float,
         lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Renyi upper bound L~_EUBO (Corollary 1), estimated per token and summed over tokens:

        sum_k (1/beta) log( (1/m) sum_j masked_jk exp(beta logp_jk) / t_j )

    computed in log space (logsumexp over j), so logp = -80 stays finite and counted (field case B09).
    logp, masked [B, m, Lg]; t [B, m]. Tokens masked in no sample are left out and the sum is rescaled by
    lengths / n_valid (lengths [B] = |c|; None: no rescaling). Returns [B] (nats). The MC estimate of a
    log of an expectation is biased by Jensen's inequality; the paper accepts this (Cor. 1). Lemma 1 needs
    beta >= 1; the paper also runs 0.5 and 0.75 (Table 12, its "implicit mixture"), where it is no upper bound.
    """
    m = logp.shape[1]
    log_terms = beta * logp - torch.log(t.clamp_min(1e-8))[..., None]                # [B, m, Lg]
    log_terms = log_terms.masked_fill(~masked, -math.inf)
    valid = masked.any(1)                                                             # [B, Lg]
    per_token = (torch.logsumexp(log_terms, 1) - math.log(m)) / beta                  # [B, Lg]
    total = torch.where(valid, per_token, 0.0).sum(-1)                                # [B]
    if lengths is None:
        return total
    return total * lengths / valid.sum(-1).clamp_min(1)


def mixture_bound(elbo_b: torch.Tensor, eubo_b: torch.Tensor, omega: float) -> torch.Tensor:
    """L~_Mix = omega * L~_EUBO + (1 - omega) * L_ELBO (Eq. 8). [B] -> [B]."""
    return omega * eubo_b + (1.0 - omega) * elbo_b


NEG_BOUND = {  # the bound that scores negative-advantage completions (paper Table 3)
    "mix": lambda elbo_b, eubo_b, omega: mixture_bound(elbo_b, eubo_b, omega),
    "eubo": lambda elbo_b, eubo_b, omega: eubo_b,
    "elbo": lambda elbo_b, eubo_b, omega: elbo_b,
    "zero": lambda elbo_b, eubo_b, omega: torch.zeros_like(elbo_b),
}


def spg_loss(advantages, elbo_b, eubo_b, *, num_tokens, estimator="mix", omega=0.5):
    """The SPG loss (Eq. 5 / Alg. 1): -sum_b A_b * score_b / sum_b |c_b|.

    advantages, elbo_b, eubo_b [B]; score = ELBO where A > 0, else NEG_BOUND[estimator]. num_tokens is
    sum |c_b| over the WHOLE rollout batch (all micro-batches), so that accumulated micro-batches give
    the same gradient as one big batch. Returns (loss scalar, detached stats dict).
    """
    neg = NEG_BOUND[estimator](elbo_b, eubo_b, omega)                                 # [B]
    score = torch.where(advantages > 0, elbo_b, neg)                                  # [B]
    objective = (advantages * score).sum() / num_tokens                               # sum over sequences
    loss = -objective
    return loss, {"bound/elbo": elbo_b.detach().mean().item(), "bound/eubo": eubo_b.detach().mean().item()}


def d1_loss(logp, old_logp, ref_logp, advantages, c, *, epsilon, beta_kl, num_tokens=None):
    """d1's diffu-GRPO loss (d1 `DiffuGRPOTrainer.compute_loss`, spg_spec.md (g)1), per completion token k:

        ratio_k = exp(logp_k - old_logp_k)
        surrogate_k = min(ratio_k A, clip(ratio_k, 1 - eps, 1 + eps) A)
        kl_k = exp(ref_logp_k - logp_k) - (ref_logp_k - logp_k) - 1           (k3 estimator, >= 0)
        loss = -sum_{b,k} c_bk (surrogate_bk - beta_kl kl_bk) / num_tokens

    logp [B, Lg] (with grad), old_logp and ref_logp [B, Lg] (constants), advantages [B], c [B, Lg] bool (up to
    and including the first EOS). num_tokens defaults to sum c: the mean over all completion tokens of the batch,
    d1's normalisation (per token, not per sequence); pass the whole rollout batch's count when micro-batching.
    Returns (loss scalar, detached stats: mean KL per token, fraction of tokens with the ratio outside the clip range).
    """
    num_tokens = c.sum() if num_tokens is None else num_tokens
    adv = advantages[:, None]                                                         # [B, 1]
    ratio = torch.exp(logp - old_logp)                                                # [B, Lg]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - epsilon, 1 + epsilon) * adv)
    log_ref_ratio = ref_logp - logp                                                   # [B, Lg]
    kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1                                 # [B, Lg]
    per_token = torch.where(c, surrogate - beta_kl * kl, 0.0)                         # [B, Lg]
    objective = per_token.sum() / num_tokens                                          # sum over tokens
    loss = -objective
    clipped = (ratio.clamp(1 - epsilon, 1 + epsilon) != ratio) & c
    n = c.sum().clamp_min(1)
    return loss, {"d1/kl": (torch.where(c, kl, 0.0).sum() / n).item(), "d1/clip_frac": (clipped.sum() / n).item()}


# ----------------------------------------------------------------------------------------------------
# Model calls: the decoder body over all positions, the LM head only where logits are needed.

def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding: [B, L] -> [B, L]; a padded row is then computed like the row alone."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def hidden_states(model, ids, attention_mask):
    """[B, L] ids -> [B, L, d] final hidden states of the (bidirectional) decoder."""
    decoder, _ = M.decoder_and_head(model)
    out = decoder(input_ids=ids, attention_mask=attention_mask, position_ids=positions_from_mask(attention_mask))
    return out.last_hidden_state


class TargetLogprob(torch.autograd.Function):
    """log softmax(logits)[target]: logits [rows, V] float32, targets [rows] -> [rows]; values equal log_softmax's.

    Its backward writes d logp / d logits = onehot(target) - softmax into the saved logits' own buffer, so a chunk
    of the loss pass holds one [rows, V] float32 buffer, forward or backward (field case B33: at most 1.5 chunks;
    autograd's own gather + logsumexp holds four). That is safe only as target_logprobs uses it: under its
    checkpoint, whose recomputation gives the logits to this function alone, from a head that does not save its own
    output (nn.Linear does not)."""

    @staticmethod
    def forward(ctx, logits, targets):
        lse = torch.cat([torch.logsumexp(rows, -1) for rows in logits.split(LSE_ROWS)])     # [rows], no [rows, V] temp
        ctx.save_for_backward(logits, targets, lse)
        return logits.gather(-1, targets[:, None])[:, 0] - lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):                                                          # grad [rows]
        logits, targets, lse = ctx.saved_tensors
        g = logits.sub_(lse[:, None]).exp_().neg_()                                   # -softmax, in place
        g.scatter_add_(1, targets[:, None], torch.ones_like(lse)[:, None])            # onehot - softmax
        return g.mul_(grad[:, None]), None                                            # d loss / d logits


def logits_chunk_rows(V: int) -> int:
    """Rows of float32 logits over a vocabulary of V in one chunk of LOGP_CHUNK_BYTES (66 at LLaDA's 126,464)."""
    return max(1, LOGP_CHUNK_BYTES // (4 * V))


def target_logprobs(head, h: torch.Tensor, targets: torch.Tensor, chunk_rows: int | None = None):
    """log softmax(head(h))[target] in float32: h [..., d], targets [...] -> [...] (any leading shape).

    Rows whose logits fit a quarter chunk of LOGP_CHUNK_BYTES (autograd's four copies fit one; the tiny model's
    always do) are computed directly. More go chunk by chunk, each checkpointed under autograd and scored by
    TargetLogprob, so about one chunk of [rows, V] logits is alive at a time, forward or backward; value and
    gradient equal the direct computation. head is called as a module (scale/'s FSDP runs its hooks)."""
    def one_chunk(hc, tc):
        return TargetLogprob.apply(head(hc).float(), tc)                              # [rows]
    flat_h, flat_t = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    chunk_rows = chunk_rows or logits_chunk_rows(head.out_features)
    if 4 * flat_h.shape[0] <= chunk_rows:
        logits = head(flat_h).float()                                                 # [rows, V]
        return (logits.gather(-1, flat_t[:, None])[:, 0] - torch.logsumexp(logits, -1)).view(targets.shape)
    parts = []
    for i in range(0, flat_h.shape[0], chunk_rows):
        args = (flat_h[i:i + chunk_rows], flat_t[i:i + chunk_rows])
        parts.append(checkpoint(one_chunk, *args, use_reentrant=False) if torch.is_grad_enabled() else one_chunk(*args))
    return torch.cat(parts).view(targets.shape)


def completion_logprobs(model, z: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor):
    """log pi(x_k | z) at the Lg completion positions: z [N, L] (masked input), targets [N, Lg] -> [N, Lg]."""
    _, head = M.decoder_and_head(model)
    h = hidden_states(model, z, attention_mask)[:, -targets.shape[1]:]               # [N, Lg, d]
    return target_logprobs(head, h, targets)


def masked_logprobs(model, seqs, attention_mask, masked, *, mask_id: int, Lg: int):
    """log pi(x_k | z_j) of the true completion tokens under m masked copies: one forward pass over B * m rows.

    seqs, attention_mask [B, L]; masked [B, m, L] from a forward process. Returns [B, m, Lg] float32.
    """
    B, m, L = masked.shape
    z = torch.where(masked, mask_id, seqs[:, None])                                   # [B, m, L]
    return completion_logprobs(model, z.view(B * m, L), attention_mask.repeat_interleave(m, 0),
                               seqs[:, -Lg:].repeat_interleave(m, 0)).view(B, m, Lg)  # [B, m, Lg]


def sequence_bounds(model, seqs, attention_mask, c, masked, t, *, beta: float, mask_id: int):
    """ELBO and EUBO [B] of the completions seqs[:, -Lg:] under given masks: one forward pass over B * m copies.

    seqs, attention_mask [B, L]; c [B, Lg] completion mask; masked [B, m, L], t [B, m] from a forward process.
    """
    logp = masked_logprobs(model, seqs, attention_mask, masked, mask_id=mask_id, Lg=c.shape[1])  # [B, m, Lg]
    counted = masked[..., -c.shape[1]:] & c[:, None]                                  # [B, m, Lg]
    return elbo(logp, counted, t), eubo(logp, counted, t, beta, lengths=c.sum(-1))


@torch.no_grad()
def frozen_logprobs(model, seqs, attention_mask, masked, *, mask_id: int, Lg: int, micro_batch: int):
    """masked_logprobs of the single masked copy (m = 1) without grad, in eval mode, micro-batched: [B, Lg].

    d1's old log-probs (the rollout policy, before any inner update) and reference log-probs."""
    was_training = model.training
    model.eval()
    parts = [masked_logprobs(model, seqs[i:i + micro_batch], attention_mask[i:i + micro_batch],
                             masked[i:i + micro_batch], mask_id=mask_id, Lg=Lg)[:, 0]
             for i in range(0, len(seqs), micro_batch)]
    model.train(was_training)
    return torch.cat(parts) if parts else seqs.new_zeros((0, Lg), dtype=torch.float32)


def d1_reference(model):
    """(reference model, context) for d1's KL term, to be taken at the start of RL (after any warm start).

    A LoRA model is its own reference with the adapters disabled (peft `disable_adapter()`, as d1 does): the
    frozen base. A fully fine-tuned model (the tiny CPU model) gets a frozen deep copy of its weights now.
    """
    if M.is_peft(model):
        return model, model.disable_adapter
    return copy.deepcopy(model).requires_grad_(False), contextlib.nullcontext


# ----------------------------------------------------------------------------------------------------
# Decoding: LLaDA's semi-autoregressive low-confidence remasking (LLaDA generate.py, spg_spec.md (c)).

def transfer_schedule(n: int, steps: int) -> list[int]:
    """Tokens committed per step inside one block: n spread evenly, the remainder on the first steps ([6,5,5])."""
    return [n // steps + (1 if i < n % steps else 0) for i in range(steps)]


def commit_tokens(block, proposal, confidence, k, mask_id: int):
    """Commit the k[b] highest-confidence masked positions of each row: block, proposal, confidence [B, bl].

    k [B] long; rows with k = 0 or no masked position are left unchanged (B22). Never re-masks.
    """
    masked = block == mask_id
    k = torch.minimum(k, masked.sum(-1))
    rank = confidence.masked_fill(~masked, -math.inf).argsort(-1, descending=True).argsort(-1)
    chosen = masked & (rank < k[:, None])
    return torch.where(chosen, proposal, block)


def block_hidden(model, x: torch.Tensor, attn: torch.Tensor, lo: int, hi: int, cache=None,
                 dual: bool = False) -> torch.Tensor:
    """Final hidden states [B, hi - lo, d] of the current block x[:, lo:hi] (x, attn [B, L]).

    cache=None: one full pass over x, as LLaDA does. Fast-dLLM's approximate KV caches (arXiv 2505.22618
    Sec. 3.1) pass one transformers DynamicCache per block: while it is empty, a full pass fills it with the
    keys/values of every position; once filled,
      prefix (dual=False): only x[:, lo:] runs, attending to the cached keys/values of the prefix x[:, :lo];
      dual: only the block x[:, lo:hi] runs, attending to the cached prefix and suffix x[:, hi:] (the block's
        own cached entries are masked out; its fresh ones are appended for this call, then dropped).
    Cached entries are stale (they saw the block as it was at its first step): an approximation.
    """
    if cache is None:
        return hidden_states(model, x, attn)[:, lo:hi]
    decoder, _ = M.decoder_and_head(model)
    L, pos = x.shape[1], positions_from_mask(attn)
    if not cache.get_seq_length():
        start, end, kv_mask = 0, L, attn                                              # fill: a full pass
    elif dual:
        stale = attn.clone()
        stale[:, lo:hi] = 0
        start, end, kv_mask = lo, hi, torch.cat([stale, attn[:, lo:hi]], 1)          # [B, L + bl]
    else:
        start, end, kv_mask = lo, L, attn                                             # [B, lo + (L - lo)]
    # the cache is passed 4th positionally: its keyword is past_key_values in older transformers, cache in newer
    h = decoder(x[:, start:end], kv_mask, pos[:, start:end], cache, use_cache=True).last_hidden_state
    excess = cache.get_seq_length() - (L if dual else lo)                             # keep what later steps reuse
    if excess > 0:                                                                    # crop(0) is version-dependent
        cache.crop(-excess)                                                           # drop the last `excess`
    return h[:, lo - start:hi - start]


KV_CACHES = (None, "prefix", "dual")   # generate(kv_cache=...): none, or Fast-dLLM's prefix or dual cache
REMASKING = ("low_confidence", "random")   # generate(remasking=...): confidence order (LLaDA), or uniform scores


@torch.no_grad()
def generate(model, prompt_ids, attention_mask, *, gen_length, block_length, steps, temperature,
             remasking="low_confidence", mask_id, generator=None, threshold: float | None = None,
             kv_cache: str | None = None):
    """Semi-autoregressive decoding: [B, P] left-padded prompts -> [B, P + Lg] ids.

    Blocks of bl tokens left to right; each block gets steps_per_block = steps // K steps, and each
    step commits the k highest-confidence masked positions of the current block (confidence = the
    untempered probability of the sampled token; remasking="random" uses uniform scores). T = 0 is
    argmax; T > 0 samples exactly from softmax(logits / T). Positions outside the current block (the
    prompt included, even a literal mask token in it, B26) are never changed. The mask token itself is
    never proposed. Raises ValueError on a schedule that does not divide evenly (B21), and when sampling
    (T > 0 or random remasking) has no generator.

    Two optional fast modes from Fast-dLLM (arXiv 2505.22618), both off by default:
      threshold: each step commits max(k, #masked positions of the block with confidence > threshold)
        tokens per row, so the schedule is a floor (a threshold never met decodes exactly as None, and
        the loop always ends, B22).
      kv_cache="prefix" | "dual": later steps of a block reuse the keys/values of its first step for the
        prefix (and, "dual", the suffix), running only the rest (approximate; see block_hidden).
    A row whose block has no mask left leaves the forward batch until the next block, and a block stops
    once no row is left. Without a threshold every row finishes its block at the last step together, so
    this only saves work with one (Fast-dLLM stops the whole batch only).
    """
    if kv_cache not in KV_CACHES:
        raise ValueError(f"kv_cache={kv_cache!r} is not one of {KV_CACHES}")
    if remasking not in REMASKING:
        raise ValueError(f"remasking={remasking!r} is not one of {REMASKING}")
    if generator is None and (temperature > 0 or remasking == "random"):
        raise ValueError("sampling (temperature > 0 or remasking='random') draws from a generator: pass "
                         "generator=make_generator(seed, ...)")
    if gen_length % block_length or steps % (gen_length // block_length):
        raise ValueError(f"gen_length={gen_length} must be a multiple of block_length={block_length}, and "
                         f"steps={steps} a multiple of the number of blocks {gen_length // max(block_length, 1)}")
    from transformers import DynamicCache
    _, head = M.decoder_and_head(model)
    B, P = prompt_ids.shape
    x = torch.cat([prompt_ids, prompt_ids.new_full((B, gen_length), mask_id)], 1)     # [B, L]
    attn = torch.cat([attention_mask, attention_mask.new_ones(B, gen_length)], 1)     # [B, L]
    schedule = transfer_schedule(block_length, steps // (gen_length // block_length))
    for lo in range(P, P + gen_length, block_length):
        hi, cache = lo + block_length, DynamicCache() if kv_cache else None
        rows = torch.arange(B, device=x.device)                                      # [b] rows still decoding
        for k in schedule:
            xr, ar = x[rows], attn[rows]                                              # [b, L]
            logits = head(block_hidden(model, xr, ar, lo, hi, cache, kv_cache == "dual")).float()  # [b, bl, V]
            logits[..., mask_id] = -math.inf
            probs = logits.softmax(-1)                                                # untempered
            if temperature == 0:
                proposal = logits.argmax(-1)                                          # [b, bl]
            else:
                tempered = (logits / temperature).softmax(-1).view(-1, logits.shape[-1])
                proposal = torch.multinomial(tempered, 1, generator=generator).view(len(rows), block_length)
            if remasking == "random":
                confidence = torch.rand(len(rows), block_length, generator=generator, device=x.device)
            else:
                confidence = probs.gather(-1, proposal[..., None])[..., 0]
            block = xr[:, lo:hi]                                                      # [b, bl]
            n = torch.full((len(rows),), k, device=x.device)                          # [b] tokens to commit
            if threshold is not None:
                n = torch.maximum(n, ((block == mask_id) & (confidence > threshold)).sum(-1))
            block = commit_tokens(block, proposal, confidence, n, mask_id)
            x[rows, lo:hi] = block
            left = (block == mask_id).any(-1)                                         # [b] block not done yet
            if not left.all():
                rows = rows[left]
                if cache is not None:
                    cache.batch_select_indices(left.nonzero()[:, 0])
            if not len(rows):
                break
    return x


# ----------------------------------------------------------------------------------------------------
# Plumbing: prompts, rewards, evaluation, checkpoints. Side effects live here and in train(), not above.

def make_generator(seed: int, *parts: int, device="cpu") -> torch.Generator:
    """One generator per (seed, step, inner iteration, purpose): the one place seeds are derived.

    The key is (seed, parts...) read as digits p + 1 in base 1,000,003, so the keys one run draws (parts >= -1,
    a fixed number of parts per purpose) are all distinct, and so are those of runs with seeds >= 1. Seed 0 has a
    leading zero digit: its run's keys are other seeds' at other steps ((0, 0, 2, 0) is (1, 2, 0)), so compare
    seeds from 1 (tests/test_spg.py::test_make_generator_gives_every_key_of_a_run_its_own_stream)."""
    key = seed
    for p in parts:
        key = (key * 1_000_003 + p + 1) % (2**63 - 1)
    return torch.Generator(device=device).manual_seed(key)


def prompt_texts(tok, contents: list[str], prefill: str = "") -> list[str]:
    """User-turn contents -> chat-templated prompt strings, ending with the assistant header (and a prefill)."""
    return [tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True,
                                    tokenize=False) + prefill for c in contents]


def encode_prompts(tok, contents: list[str], prefill: str = "", device="cpu"):
    """User-turn contents -> left-padded ids [B, P] and attention mask [B, P] through the chat template."""
    enc = tok(prompt_texts(tok, contents, prefill), add_special_tokens=False, padding=True, return_tensors="pt")
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def within_prompt_limit(tok, examples: list[dict], contents: list[str], limit: int) -> list[dict]:
    """Training examples whose templated prompt fits in `limit` tokens; longer ones are refused (dropped and
    counted), never truncated, so no prompt loses its instructions (the reference left-truncates at 200
    tokens and cuts the format block of long MATH problems first, spg_spec.md (h)14)."""
    lengths = [len(ids) for ids in tok(prompt_texts(tok, contents), add_special_tokens=False)["input_ids"]]
    kept = [ex for ex, n in zip(examples, lengths) if n <= limit]
    if not kept:
        raise T.UsageError(f"every training prompt is longer than max_prompt_length={limit} tokens "
                            f"(shortest {min(lengths)}): raise --max-prompt-length")
    if len(kept) < len(examples):
        print(f"refused {len(examples) - len(kept)} of {len(examples)} training prompts longer than "
              f"max_prompt_length={limit} tokens")
    return kept


def decode_completions(tok, completion_ids, c) -> list[str]:
    """Completion text: the tokens of c (up to and including the first stop token), special tokens dropped, so the
    stop token itself and anything after it never reach a reward function."""
    return [tok.decode(row[keep], skip_special_tokens=True) for row, keep in zip(completion_ids.cpu(), c.cpu())]


def score_rewards(task, texts: list[str], examples: list[dict]):
    """Per-function rewards [B, F], the weighted total [B] and the count of missing values (field case B13).

    A value that is None, NaN or raised is missing: it counts 0 (the sample stays in its group, so one bad value
    never turns the batch's advantages into NaN), and a sample whose every function is missing is warned about."""
    per_fn, missing = torch.zeros(len(texts), len(task.reward_funcs), dtype=torch.float64), 0
    for i, (text, ex) in enumerate(zip(texts, examples)):
        missing_here = 0
        for f, (_, fn, weight) in enumerate(task.reward_funcs):
            try:
                value = fn(text, ex)
            except Exception:
                value = None
            if value is None or not math.isfinite(value):
                missing_here += 1
                value = 0.0
            per_fn[i, f] = weight * value
        if missing_here == len(task.reward_funcs):
            warnings.warn(f"sample {i}: every reward function failed (None, NaN or raised); its reward is 0")
        missing += missing_here
    return per_fn, per_fn.sum(-1), missing


def evaluate(model, tok, task, examples, cfg: Config, *, style: str, mask_id: int, stop_ids, desc="eval"):
    """Greedy evaluation of `examples` with the paper's decoding: T = 0, block bl, steps = Lg / 2. During training
    these are cfg.eval_n held-out problems (a seeded subset where the set is larger, e.g. GSM8K's 1,319); eval.py
    scores the full sets. Returns (metrics, rows)."""
    from tqdm import tqdm
    prefill = T.EVAL_PREFILL if style == "paper" else ""
    device = next(model.parameters()).device
    was_training, rows = model.training, []
    model.eval()
    for i in tqdm(range(0, len(examples), cfg.eval_batch), desc=desc, leave=False, disable=None):
        batch = examples[i:i + cfg.eval_batch]
        ids, attn = encode_prompts(tok, [T.build_prompt(cfg.task, ex, split="eval", style=style) for ex in batch],
                                   prefill, device)
        seqs = generate(model, ids, attn, gen_length=cfg.gen_length, block_length=cfg.block_length,
                        steps=cfg.gen_length // 2, temperature=0.0, mask_id=mask_id)
        comp = seqs[:, ids.shape[1]:]
        texts = decode_completions(tok, comp, completion_mask(comp, stop_ids))
        rows += [{"completion": t, "score": task.score(t, ex)} for t, ex in zip(texts, batch)]
    model.train(was_training)
    return T.aggregate(cfg.task, [r["score"] for r in rows], examples), rows


def encode_targets(tok, task: str, examples: list[dict], *, gen_length: int, eos_id: int, style: str,
                   device="cpu") -> torch.Tensor:
    """Correct completions (tasks.target_completion) as ids [B, Lg], cut to Lg and padded with EOS, as LLaDA's SFT."""
    targets = torch.full((len(examples), gen_length), eos_id)
    for row, ex in enumerate(examples):
        t_ids = tok(T.target_completion(task, ex, style=style), add_special_tokens=False)["input_ids"]
        targets[row, :len(t_ids)] = torch.tensor(t_ids[:gen_length])
    return targets.to(device)


def sft_step(model, opt, tok, train_examples: list[dict], task: str, *, gen_length: int, style: str, mask_id: int,
             eos_id: int, generator: torch.Generator) -> float:
    """One step of the warm start: WARM_START_BATCH solutions drawn with generator, -ELBO (Eq. 2) per token under
    random masks (the whole completion, EOS padding included), one AdamW step with clipping. Returns the loss."""
    device = next(model.parameters()).device
    idx = torch.randint(len(train_examples), (WARM_START_BATCH,), generator=generator).tolist()
    batch = [train_examples[i] for i in idx]
    ids, attn = encode_prompts(tok, [T.build_prompt(task, ex, split="train", style=style) for ex in batch],
                               device=device)
    targets = encode_targets(tok, task, batch, gen_length=gen_length, eos_id=eos_id, style=style,
                             device=device)                                           # [B, Lg]
    c = torch.ones_like(targets, dtype=torch.bool)
    masked, t = random_forward_process(c, ids.shape[1], m=1, p_mask_prompt=0.0, generator=generator)
    elbo_b, _ = sequence_bounds(model, torch.cat([ids, targets], 1), torch.cat([attn, torch.ones_like(targets)], 1),
                                c, masked, t, beta=1.0, mask_id=mask_id)              # [B]
    loss = -elbo_b.sum() / targets.numel()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()


def warm_start_setup(model, tok, cfg: Config, style: str):
    """(training examples, AdamW, generator) of the warm start. The examples are the task's training set drawn with
    WARM_START_DATA_SEED, so that the cached warm start is the same for every RL seed."""
    examples = load_train_set(dataclasses.replace(cfg, seed=WARM_START_DATA_SEED), tok, style)
    opt = torch.optim.AdamW(model.parameters(), lr=WARM_START_LR, betas=ADAM_BETAS)
    return examples, opt, make_generator(0, WARM_START_SEED)


def sft_warm_start(model, tok, cfg: Config, *, style, mask_id, eos_id, path: Path | None = None) -> Path:
    """Masked-diffusion supervised warm start (the ELBO objective, Eq. 2, on task solutions), cached at path
    (default: warm_start_path, named by its recipe); returns the path.

    Completions are padded with EOS to Lg and every position is trained, as in LLaDA's SFT. The budget
    is deliberately short so that RL has room to improve the model (bench/warm_start_curve.py: how fast it moves).
    """
    from tqdm import tqdm
    examples, opt, gen = warm_start_setup(model, tok, cfg, style)   # independent of the RL seed
    path = path or warm_start_path(cfg, model, tok, examples, style)
    if path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu"))
        print(f"warm start: loaded {path}", flush=True)
        return path
    print(f"warm start: {cfg.warm_start_steps} supervised steps, then cached at {path} for the next run", flush=True)
    bar = tqdm(range(cfg.warm_start_steps), desc="warm start (SFT)", disable=None)
    for i in bar:
        loss = sft_step(model, opt, tok, examples, cfg.task, gen_length=cfg.gen_length, style=style, mask_id=mask_id,
                        eos_id=eos_id, generator=gen)
        if (i + 1) % WARM_START_LOG_EVERY == 0 or i + 1 == cfg.warm_start_steps:
            bar.write(f"warm start step {i + 1:4d}/{cfg.warm_start_steps} | loss {loss:.3f}")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)
    return path


def warm_start_path(cfg: Config, model, tok, examples: list[dict], style: str) -> Path:
    """Where the tiny model's warm start is cached: one file per task, generation length, budget and recipe.

    The recipe is named by a short hash of what the warm start is made from: the texts of its training examples
    as the task writes them (prompt and target), the tokenizer (its full definition: vocabulary, normalisation,
    pre-tokenisation, special tokens; its chat template and padding side), the model's architecture, and the
    optimizer and sampling constants (WARM_START_LR, _BATCH, _SEED, ADAM_BETAS). So another --data-dir,
    --eval-file (whose problems the set leaves out) or --max-prompt-length, or an edit to a prompt or answer
    template, gets its own warm start, and a change that alters none of these shares it. Edits to the training
    code itself (sft_step, model.tiny_model's initialisation or dtype) are not seen: delete --cache-dir after them.
    """
    architecture = {k: v for k, v in model.config.to_diff_dict().items() if k != "transformers_version"}
    recipe = {
        "texts": [[T.build_prompt(cfg.task, ex, split="train", style=style),
                   T.target_completion(cfg.task, ex, style=style)] for ex in examples],
        "tokenizer": [tok.backend_tokenizer.to_str(), tok.chat_template, tok.padding_side, tok.bos_token],
        "model": architecture,
        "sft": [WARM_START_LR, WARM_START_BATCH, WARM_START_SEED, ADAM_BETAS],
    }
    digest = hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:8]
    return Path(cfg.cache_dir) / f"warm_{cfg.task}_tiny_L{cfg.gen_length}_s{cfg.warm_start_steps}_{digest}.pt"


def save_checkpoint(out: Path, step: int, model, opt, cfg: Config) -> Path:
    """Trainable weights, optimizer, step, RNG state and config, written to a temporary name and renamed."""
    final, tmp = out / f"ckpt_{step:06d}", out / f".tmp_ckpt_{step:06d}"
    tmp.mkdir(parents=True, exist_ok=True)
    trainable = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    torch.save({"model": trainable, "optimizer": opt.state_dict(), "step": step,
                "torch_rng": torch.get_rng_state(), "config": dataclasses.asdict(cfg),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}, tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps({"step": step, "config": dataclasses.asdict(cfg)}, indent=1))
    os.replace(tmp, final)
    return final


def read_summary(run: Path) -> dict:
    """A run directory's summary.json ({} where there is none)."""
    return json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}


def write_summary(out: Path, summary: dict) -> None:
    """summary.json written whole: to a temporary name, then renamed (a reader never sees half a file)."""
    (out / ".summary.json.tmp").write_text(json.dumps(summary, indent=1))
    os.replace(out / ".summary.json.tmp", out / "summary.json")


def in_run(ckpt: Path, out: Path) -> bool:
    """True when checkpoint directory ckpt, however spelt (links followed), lies in run directory out."""
    return ckpt.resolve().parent == out.resolve()


def run_checkpoints(out: Path) -> dict[Path, int]:
    """{checkpoint: step} of the run in out: its complete ckpt_NNNNNN directories (a link there to another run's
    checkpoint, a ckpt_final copy or a half-written .tmp_ckpt_* is not one)."""
    return {p: int(p.name[5:]) for p in out.glob("ckpt_*") if re.fullmatch(r"ckpt_\d{6}", p.name)
            and in_run(p, out) and (p / "state.pt").exists()}


def checkpoint_writer(ckpt: Path) -> str | None:
    """"scale" or "spg_min": the script that wrote a checkpoint (scale/'s meta.json names its world size); None
    without meta.json. Neither script resumes the other's: scale/'s RNG states are per rank and its optimizer
    state is keyed by parameter name, spg_min's by position."""
    meta = ckpt / "meta.json"
    if not meta.is_file():
        return None
    return "scale" if "world_size" in json.loads(meta.read_text()) else "spg_min"


def latest_checkpoint(out: Path) -> Path | None:
    steps = run_checkpoints(out)
    return max(steps, key=steps.get) if steps else None


def holds_run(out: Path) -> bool:
    return (out / "metrics.jsonl").exists() or (out / "summary.json").exists() or any(out.glob("ckpt_*"))


def supersede(out: Path, step: int) -> None:
    """Before a run restarts at `step` below where it had got to (an earlier checkpoint, or step 0 over a log),
    keep what the restart overwrites: its later checkpoints are moved, and metrics.jsonl, summary.json and
    eval_generations.jsonl copied, into a new out/superseded_<k>/. Nothing is deleted."""
    later = sorted(p for p, k in run_checkpoints(out).items() if k > step)
    recorded = read_summary(out).get("steps", 0)
    logged = step == 0 and (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size > 0
    if not (later or recorded > step or logged):
        return
    taken = [int(p.name[11:]) for p in out.glob("superseded_*") if p.name[11:].isdigit()]
    aside = out / f"superseded_{1 + max(taken, default=0)}"
    aside.mkdir()
    for name in ("metrics.jsonl", "summary.json", "eval_generations.jsonl"):
        if (out / name).exists():
            shutil.copyfile(out / name, aside / name)
    for p in later:
        os.replace(p, aside / p.name)
    print(f"the run in {out} had got further than step {step}: its record and later checkpoints are in {aside}")


def load_tokenizer(cfg: Config):
    """(tokenizer, prompt style, special ids), checked before any model is loaded."""
    if cfg.model != "tiny" and not torch.cuda.is_available() and not Path(cfg.model).is_dir():
        raise SystemExit(f"--model {cfg.model} is an 8B model and this machine has no CUDA GPU. "
                         "Use --model tiny to train the small CPU model, or run on a GPU.")
    tok = M.tiny_tokenizer() if cfg.model == "tiny" else M.load_tokenizer(cfg.model)
    ids = M.special_ids(tok)
    if ids["mask"] not in tok.all_special_ids:
        raise T.UsageError(f"mask id {ids['mask']} is an ordinary text token of this tokenizer: the model would "
                            "confuse text with masks; use a tokenizer with a special mask token")
    return tok, ("tiny" if cfg.model == "tiny" else "paper"), ids


def load_train_set(cfg: Config, tok, style: str) -> list[dict]:
    """The task's training examples (without the problems of cfg.eval_file) whose prompt fits in
    cfg.max_prompt_length tokens (within_prompt_limit)."""
    examples = T.load_train(cfg.task, cfg.data_dir, seed=cfg.seed, eval_file=cfg.eval_file)
    return within_prompt_limit(tok, examples, [T.build_prompt(cfg.task, ex, split="train", style=style)
                                               for ex in examples], cfg.max_prompt_length)


def load_model(cfg: Config, vocab_size: int):
    """The tiny CPU model, or a LLaDA checkpoint (4-bit NF4 base when cfg.load_in_4bit) with LoRA."""
    if cfg.model == "tiny":
        return M.tiny_model(vocab_size, seed=0)
    net = M.float32_head(M.load_llada(cfg.model, load_in_4bit=cfg.load_in_4bit))   # float32 logits (deviation 3)
    return M.add_lora(net, r=cfg.lora_rank, alpha=cfg.lora_alpha)


def check_out(cfg: Config) -> Path:
    """The run directory, checked but not created (train creates it once data and model have loaded); UsageError
    naming the fix if it cannot be written or (--resume none) holds a run."""
    out = Path(cfg.out)
    nearest = next(p for p in (out, *out.absolute().parents) if p.exists() or p.is_symlink())  # out, or its holder
    if not nearest.is_dir():
        raise T.UsageError(f"out={cfg.out} cannot be created ({nearest} is a file or a broken link): pass --out "
                           "with a directory")
    if not os.access(nearest, os.W_OK):
        raise T.UsageError(f"out={cfg.out} is not writable: pass --out with a writable directory")
    if cfg.resume == "none" and holds_run(out):
        raise T.UsageError(f"out={cfg.out} already holds a run: pass a new --out, or --resume auto to continue it")
    if cfg.resume not in ("auto", "none") and holds_run(out) and not in_run(Path(cfg.resume), out):
        raise T.UsageError(f"out={cfg.out} holds another run than resume={cfg.resume}: pass a new --out to branch "
                           "from that checkpoint")
    return out


def metrics_line(row: dict) -> str:
    """One metrics.jsonl line in strict JSON: a non-finite number (a skipped step's loss) is written as null."""
    return json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}) + "\n"


def start_log_over(out: Path) -> None:
    """A fresh start over a log (a run killed before its first save, or its checkpoints deleted): the log is kept
    aside (supersede), then cut."""
    if (out / "metrics.jsonl").exists():
        supersede(out, 0)
        cut_metrics(out, 0)


def resumed_summary(run: Path, cfg: Config) -> dict:
    """The summary a resumed run goes on with: run's record without its end (eval_after and steps are written
    again when it gets there), with this command's config (e.g. a longer --max-steps)."""
    summary = {k: v for k, v in read_summary(run).items() if k not in ("eval_after", "steps")}
    return {**summary, "config": dataclasses.asdict(cfg)}


def nonfinite_steps_at(out: Path, step: int) -> int:
    """Cut metrics.jsonl back to `step` (cut_metrics) for a resumed run; the count of skipped non-finite steps its
    last kept row had, from which the run goes on (0 without one)."""
    kept = cut_metrics(out, step)
    return json.loads(kept[-1]).get("nonfinite_steps", 0) if kept else 0


def cut_metrics(out: Path, step: int) -> list[str]:
    """Drop the metrics.jsonl rows logged after `step` (a resumed run logs them again); returns the rows kept."""
    path = out / "metrics.jsonl"
    kept = [l for l in path.read_text().splitlines() if json.loads(l)["step"] <= step] if path.exists() else []
    path.write_text("".join(l + "\n" for l in kept))
    return kept


def check_fits(saved: dict, model, ckpt: Path) -> None:
    """A checkpoint's weights (name -> tensor) must be exactly the model's trainable ones (the frozen weights are not
    saved), each of the parameter's full shape (an FSDP2 DTensor's .shape is the full one): UsageError naming how
    many it has not, lacks and has of another shape (another --lora-rank), else a resume would load part of it
    silently or fail inside load_state_dict."""
    trainable = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    extra, absent = saved.keys() - trainable.keys(), trainable.keys() - saved.keys()
    reshaped = [n for n in saved.keys() & trainable.keys() if saved[n].shape != trainable[n]]
    if extra or absent or reshaped:
        raise T.UsageError(f"{ckpt} does not fit this model ({len(extra)} weights it has not, {len(absent)} it lacks, "
                           f"{len(reshaped)} of another shape): resume with the run's own config")


def changed_settings(saved: dict, cfg: Config) -> list[str]:
    """The settings of cfg that differ from a checkpoint's saved config, as "name old -> new" (out, resume and
    max_steps, which a resume changes by design, left out; a setting the checkpoint predates is not listed)."""
    return [f"{k} {saved[k]!r} -> {v!r}" for k, v in dataclasses.asdict(cfg).items()
            if k not in ("out", "resume", "max_steps") and k in saved and saved[k] != v]


def use_settings(opt, cfg: Config) -> None:
    """A resumed optimizer takes this command's learning rate, Adam eps and weight decay, not its checkpoint's."""
    for group in opt.param_groups:
        group.update(lr=cfg.lr, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)


def resume_run(ckpt: Path, out: Path, model, opt, cfg: Config) -> tuple[int, dict]:
    """Load a checkpoint's weights, optimizer and RNG state; cut metrics.jsonl back to its step. The learning rate,
    Adam eps and weight decay are cfg's (a changed setting is printed). A checkpoint of another run directory
    branches it (into an --out that holds no run, check_out): its summary and its metrics up to the step are carried
    over. Resuming an earlier checkpoint of this run keeps what it overwrites (supersede). UsageError
    if it does not fit the model. Returns (its step, the run's summary with this config)."""
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
    check_fits(state["model"], model, ckpt)
    model.load_state_dict(state["model"], strict=False)   # strict=False: the frozen weights are not saved
    opt.load_state_dict(state["optimizer"])
    use_settings(opt, cfg)
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    step = state["step"]
    if changed := changed_settings(state.get("config", {}), cfg):
        print(f"resumed with a changed config: {', '.join(changed)}")
    origin = ckpt.resolve().parent                         # out, or another run this one branches off (check_out)
    if in_run(ckpt, out):
        supersede(out, step)
    elif (origin / "metrics.jsonl").is_file():
        shutil.copyfile(origin / "metrics.jsonl", out / "metrics.jsonl")
    summary = resumed_summary(origin, cfg)
    summary["nonfinite_steps"] = nonfinite_steps_at(out, step)
    return step, summary


# ----------------------------------------------------------------------------------------------------
# Training: rollouts -> rewards -> advantages -> mu inner updates -> log -> maybe eval / save.

def train(cfg: Config) -> dict:
    from tqdm import tqdm
    validate(cfg)                                   # every check comes before data and model loading
    torch.manual_seed(cfg.seed)                     # the global RNG (LoRA init and dropout) derives from the seed too
    out = check_out(cfg)
    ckpt = {"auto": latest_checkpoint(out), "none": None}.get(cfg.resume, Path(cfg.resume))
    if ckpt and checkpoint_writer(ckpt) == "scale":          # refused before anything loads
        raise T.UsageError(f"{ckpt} was written by scale/train.py: continue it with torchrun scale/train.py "
                           "--resume (eval.py --adapter scores it), or pass another --out")
    tok, style, ids = load_tokenizer(cfg)
    mask_id, stop_ids = ids["mask"], (ids["eos"], ids["eot"])
    task = T.get_task(cfg.task, d1_compat=cfg.d1_compat)
    train_set = load_train_set(cfg, tok, style)
    eval_set = T.load_eval(cfg.task, cfg.data_dir, eval_file=cfg.eval_file, n=cfg.eval_n, seed=cfg.seed)
    model = load_model(cfg, len(tok))
    out.mkdir(parents=True, exist_ok=True)          # only now: a run refused above leaves no empty --out behind
    device = next(model.parameters()).device
    if style == "tiny" and cfg.warm_start_steps and not (ckpt and cfg.estimator != "d1"):  # SPG resumes its weights
        sft_warm_start(model, tok, cfg, style=style, mask_id=mask_id, eos_id=ids["eos"])
    # d1's KL reference: the model as RL starts (the warm start; a resumed run's reference is the same)
    ref_model, ref_context = d1_reference(model) if cfg.estimator == "d1" else (None, None)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=ADAM_BETAS, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    fresh = {"config": dataclasses.asdict(cfg), "nonfinite_steps": 0}
    start_step, summary = resume_run(ckpt, out, model, opt, cfg) if ckpt else (0, fresh)
    if ckpt:
        print(f"resumed from {ckpt} (step {start_step} of {cfg.max_steps}"
              + ("; the run is complete: a larger --max-steps continues it)" if start_step >= cfg.max_steps else ")"))
        write_summary(out, summary)                   # a branch keeps its origin's record
    else:
        start_log_over(out)
    evaluate_now = lambda desc: evaluate(model, tok, task, eval_set, cfg, style=style, mask_id=mask_id,
                                         stop_ids=stop_ids, desc=desc)
    if "eval_before" not in summary and start_step == 0:
        summary["eval_before"], _ = evaluate_now("eval before RL")
        write_summary(out, summary)
        print(f"held-out before RL: {summary['eval_before']}")
    elif "eval_before" not in summary and "eval_at_resume" not in summary:   # a bare checkpoint: RL's start unknown
        scores, _ = evaluate_now(f"eval at step {start_step}")
        summary["eval_at_resume"] = {"step": start_step, **scores}
        write_summary(out, summary)
        print(f"held-out at step {start_step} (resumed; before RL: not known): {summary['eval_at_resume']}")
    stop_signal = []                                  # a signal ends the run after the step in progress
    handlers = {sig: signal.signal(sig, lambda *_: stop_signal.append(1)) for sig in (signal.SIGINT, signal.SIGTERM)}
    g, n_prompts = cfg.group_size, cfg.num_prompts
    nonfinite_in_a_row, step = 0, start_step
    bar = tqdm(range(start_step, cfg.max_steps), desc="SPG", initial=start_step, total=cfg.max_steps, disable=None)
    for step in bar:
        t0 = time.time()
        # ---- rollouts: g completions for each of n_prompts prompts, grouped contiguously
        order = torch.randperm(len(train_set), generator=make_generator(cfg.seed, step, 0))[:n_prompts]
        examples = [train_set[i] for i in order.tolist() for _ in range(g)]                  # B = n * g
        group_ids = torch.arange(n_prompts).repeat_interleave(g)                              # [B]
        prompt_ids, prompt_attn = encode_prompts(
            tok, [T.build_prompt(cfg.task, ex, split="train", style=style) for ex in examples[::g]], device=device)
        prompt_ids, prompt_attn = prompt_ids.repeat_interleave(g, 0), prompt_attn.repeat_interleave(g, 0)
        model.eval()
        seqs = generate(model, prompt_ids, prompt_attn, gen_length=cfg.gen_length, block_length=cfg.block_length,
                        steps=cfg.steps, temperature=cfg.temperature, mask_id=mask_id,
                        generator=make_generator(cfg.seed, step, 1, device=device))       # [B, L]
        model.train()
        P = prompt_ids.shape[1]
        comp = seqs[:, P:]                                                                # [B, Lg]
        c = completion_mask(comp, stop_ids)                                               # [B, Lg]
        attn = torch.cat([prompt_attn, torch.ones_like(comp)], 1)                        # [B, L]
        t_rollout = time.time() - t0
        # ---- rewards and advantages (Eq. 4)
        per_fn, rewards, missing = score_rewards(task, decode_completions(tok, comp, c), examples)
        adv = group_advantages(rewards, group_ids).to(device)                             # [B]
        active = (adv != 0).nonzero()[:, 0]           # zero-advantage sequences add no gradient: skip them
        if cfg.estimator == "d1" and cfg.d1_beta_kl > 0:
            active = torch.arange(len(adv), device=device)  # ... except through d1's KL term: keep them all
        num_tokens = c.sum()                          # the denominator counts every completion token
        # ---- masks for the mu inner updates (Alg. 1), fresh for each update, one generator per update
        masks = [FORWARD_PROCESS[cfg.masking](c[active], P, m=cfg.num_mc, block_length=cfg.block_length,
                                              p_mask_prompt=cfg.p_mask_prompt, group_ids=group_ids[active.cpu()],
                                              generator=make_generator(cfg.seed, step, 2, it, device=device))
                 for it in range(cfg.mu)]
        if cfg.estimator == "d1":                     # d1: old and reference log-probs, once, under each update's mask
            frozen = lambda net, masked: frozen_logprobs(net, seqs[active], attn[active], masked, mask_id=mask_id,
                                                         Lg=comp.shape[1], micro_batch=cfg.micro_batch)
            old_logp = [frozen(model, masked) for masked, _ in masks]                     # mu x [B', Lg]
            with ref_context():
                ref_logp = [frozen(ref_model, masked) for masked, _ in masks]             # mu x [B', Lg]
        # ---- mu inner updates
        losses, grad_norms, stats = [], [], {}
        for it, (masked, t) in enumerate(masks):
            opt.zero_grad(set_to_none=True)
            loss_sum = torch.zeros((), device=device)
            for lo in range(0, len(active), cfg.micro_batch):             # gradient accumulation
                idx, sl = active[lo:lo + cfg.micro_batch], slice(lo, lo + cfg.micro_batch)
                if cfg.estimator == "d1":
                    logp = masked_logprobs(model, seqs[idx], attn[idx], masked[sl], mask_id=mask_id,
                                           Lg=comp.shape[1])[:, 0]                # [b, Lg]
                    loss, stats = d1_loss(logp, old_logp[it][sl], ref_logp[it][sl], adv[idx], c[idx],
                                          epsilon=cfg.d1_epsilon, beta_kl=cfg.d1_beta_kl, num_tokens=num_tokens)
                else:
                    elbo_b, eubo_b = sequence_bounds(model, seqs[idx], attn[idx], c[idx], masked[sl], t[sl],
                                                     beta=cfg.beta, mask_id=mask_id)  # [b], [b]
                    loss, stats = spg_loss(adv[idx], elbo_b, eubo_b, num_tokens=num_tokens,
                                           estimator=cfg.estimator, omega=cfg.omega)
                loss.backward()
                loss_sum += loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if len(active) else torch.zeros(())
            if torch.isfinite(loss_sum) and torch.isfinite(grad_norm):
                opt.step()
                nonfinite_in_a_row = 0
            else:                                     # skip the step, count it, abort after too many
                nonfinite_in_a_row += 1
                summary["nonfinite_steps"] = summary.get("nonfinite_steps", 0) + 1
                if nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
                    raise RuntimeError(f"{MAX_NONFINITE_IN_A_ROW} non-finite losses or gradients in a row: "
                                       "lower --lr or check the data")
            losses.append(loss_sum.item())
            grad_norms.append(grad_norm.item())
        # ---- log one fixed-format line and one metrics.jsonl line
        dt = time.time() - t0
        zero_var = (adv.view(-1, g) == 0).all(-1).float().mean().item()
        row = {"step": step + 1, "reward/mean": rewards.mean().item(), "reward/std": rewards.std().item(),
               **{f"reward/{name}": per_fn[:, f].mean().item() for f, (name, _, _) in enumerate(task.reward_funcs)},
               "reward/missing": missing, "reward/frac_zero_adv_groups": zero_var,
               "gen/len": c.sum(-1).float().mean().item(), "loss": sum(losses) / len(losses),
               "health/repeated_frac": repeated_token_fraction(comp, c, stop_ids),
               "grad_norm": sum(grad_norms) / len(grad_norms), "lr": cfg.lr, **stats,
               "nonfinite_steps": summary.get("nonfinite_steps", 0),                      # skipped so far (cumulative)
               "time/rollout_s": t_rollout, "time/step_s": dt, "tokens_per_s": comp.numel() / t_rollout}
        if row["health/repeated_frac"] > REPEAT_ALARM:
            bar.write(collapse_warning(row["health/repeated_frac"], step + 1))
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.max_steps:
            row["eval"], _ = evaluate_now(f"eval step {step + 1}")
        with open(out / "metrics.jsonl", "a") as f:
            f.write(metrics_line(row))
        bar.write(f"step {step + 1:5d}/{cfg.max_steps} | reward {row['reward/mean']:.3f} | loss {row['loss']:+.4f} "
                  f"| grad {row['grad_norm']:.3f} | zero-adv {zero_var:.2f} | len {row['gen/len']:.1f} | {dt:.1f}s"
                  + (f" | eval {row['eval']}" if "eval" in row else ""))
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps or stop_signal:
            save_checkpoint(out, step + 1, model, opt, cfg)
        if stop_signal:
            print(f"stopped by a signal after step {step + 1}; resume with the same command")
            sys.exit(130)
    for sig, handler in handlers.items():             # Ctrl-C stops the final evaluation at once
        signal.signal(sig, handler)
    summary["eval_after"], rows = evaluate_now("eval after RL")
    with open(out / "eval_generations.jsonl", "w") as f:
        f.writelines(json.dumps({**r, "example": ex}) + "\n" for r, ex in zip(rows, eval_set))  # ex: the puzzle
    summary["steps"] = max(cfg.max_steps, start_step)  # a checkpoint past --max-steps is evaluated at its own step
    write_summary(out, summary)
    print(f"held-out before RL: {summary.get('eval_before', 'not known')}\nheld-out after RL:  {summary['eval_after']}")
    return summary


HELP_EPILOG = """the two runs (README):
  python spg_min.py --task sudoku --model tiny --out runs/demo   # the main job: a small model on CPU
  python spg_min.py --task gsm8k                                 # LLaDA-8B-Instruct, 4-bit with LoRA, one GPU
The defaults shown are Config's: --task's TASK_DEFAULTS (and TASK_ESTIMATOR_DEFAULTS: Countdown with the EUBO
has beta 2.0), then --model tiny's TINY_PRESET and --estimator d1's ESTIMATOR_DEFAULTS replace some of them, and a
flag given here replaces all of those."""


def parse_config(argv=None) -> Config:
    """CLI built from the Config dataclass; unknown flags, abbreviated flags and any value validate() refuses are
    usage errors (exit 2, the message names the fix).

    Precedence: flag > estimator (ESTIMATOR_DEFAULTS) > preset > task and estimator > task > default."""
    def boolean(text):                                # a typo is an error, not False
        if text.lower() not in ("1", "true", "yes", "0", "false", "no"):
            raise argparse.ArgumentTypeError(f"{text!r}: pass true or false")
        return text.lower() in ("1", "true", "yes")
    try:
        source = inspect.getsource(Config)
    except OSError:                                   # no .py source (a .pyc-only install): help without comments
        source = ""
    comments = {m[1]: m[2] for m in re.finditer(r"^ +(\w+): [^#\n]*# *(.*)$", source, re.M)}
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,  # --est is not --estimator
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=HELP_EPILOG)
    for f in dataclasses.fields(Config):
        kind = {"bool": boolean, "int": int, "float": float}.get(str(f.type).split(" ")[0], str)
        text = comments.get(f.name, "").replace("%", "%%")   # the field's comment in Config is its help
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=argparse.SUPPRESS,
                       help=f"{text} [default {f.default!r}]")
    given = vars(p.parse_args(argv))
    task = given.get("task", Config.task)
    preset = TINY_PRESET if given.get("model") == "tiny" else {}
    estimator = ESTIMATOR_DEFAULTS.get(given.get("estimator"), {})
    task_estimator = TASK_ESTIMATOR_DEFAULTS.get((task, given.get("estimator", Config.estimator)), {})
    cfg = Config(**{**TASK_DEFAULTS.get(task, {}), **task_estimator, **preset, **estimator, **given})
    try:
        validate(cfg)
        if cfg.model == "tiny" and (cfg.load_in_4bit or cfg.lora_rank or cfg.lora_alpha):
            raise ValueError("--load-in-4bit, --lora-rank and --lora-alpha apply to LLaDA; the tiny model trains "
                             "every weight in float32 (for LoRA on it: bench/rl_variants.py lora)")
    except ValueError as err:                         # a usage error, not a traceback; wrappers have their own usage
        p.exit(2, f"{p.prog}: error: {err}\n")
    return cfg


if __name__ == "__main__":
    try:
        train(parse_config())
    except T.UsageError as err:                       # bad input: the message, not a traceback
        print(f"{Path(sys.argv[0]).name}: error: {err}", file=sys.stderr)
        sys.exit(2)
