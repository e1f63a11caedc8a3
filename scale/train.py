"""spg_min's training loop, data-parallel over ranks: FSDP2 (bf16/float32 base) or a replicated 4-bit base + LoRA.

Launch (several nodes, SLURM and the paper's settings: scale/README.md):
    torchrun --standalone --nproc_per_node 8 scale/train.py --task gsm8k --load-in-4bit false --num-prompts 16
    torchrun --standalone --nproc_per_node 2 scale/train.py --task sudoku --model tiny     # CPU, gloo
The loop is spg_min.train's, built from its pure functions. What distribution changes, and why:
  1. each rank takes num_prompts / world WHOLE groups: prompts j = rank*k .. rank*k+k-1 of the single-process
     order for (seed, step), so group means (Eq. 4) need no collective and the union over ranks is that batch;
  2. rollouts and masks are drawn per group, from generators keyed by (seed, step, j) and (seed, step, it, j),
     so the update does not depend on the number of ranks or the micro-batch, except through LoRA's dropout
     masks, drawn from each rank's own stream; spg_min draws one generator for the whole batch, so its
     rollouts differ from these for the same seed (README "Equivalence");
  3. the loss is divided by the GLOBAL completion-token count (all-reduced) and gradients are SUMMED over
     ranks, so the gradient equals the single-process one for any world size and accumulation (B31);
  4. every rank runs the same number of forwards (FSDP all-gathers in each): zero-advantage groups are skipped
     only down to the largest number of active groups on any rank; the fillers add exactly 0;
  5. a step whose loss or gradient is not finite on ANY rank is skipped on every rank (B32);
  6. rank 0 gathers and writes checkpoints (trainable weights, optimizer, step) and logs; --resume continues.
Bad input (--out, --eval-file, ...) stops each rank with the message and exit status 2 (torchrun then reports
exitcode 2 and exits 1).
"""
import argparse
import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model as M  # noqa: E402
import spg_min as S  # noqa: E402
import tasks as T  # noqa: E402

SUM, MIN, MAX = dist.ReduceOp.SUM, dist.ReduceOp.MIN, dist.ReduceOp.MAX


def all_reduce(x, op, device):
    """A number or tensor reduced over ranks, as a float64 CPU tensor (NCCL needs it on the GPU on the way)."""
    x = torch.as_tensor(x, dtype=torch.float64, device=device).clone()
    dist.all_reduce(x, op=op)
    return x.cpu()


def all_gather(x, device):
    """[n, ...] on every rank -> [world * n, ...] in rank order (= the single-process batch order), on CPU."""
    parts = [torch.empty_like(x, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.to(device))
    return torch.cat(parts).cpu()


def shard_model(model, shard, device):
    """FSDP2 on each decoder layer, then on the decoder body and on the LM head: spg_min calls those two directly
    (never model.forward, which would build [B, L, V] logits), so each runs FSDP's hooks as its own root."""
    if shard == "ddp":                                # replicated; the loop sums gradients by hand
        return model
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda"
          else MixedPrecisionPolicy())                # CPU: float32 throughout
    head_mp = MixedPrecisionPolicy(param_dtype=torch.float32)  # float32 logits (load_model's M.float32_head)
    decoder, head = M.decoder_and_head(model)
    for unit in (*decoder.layers, decoder, head):     # inner units first
        fully_shard(unit, mp_policy=head_mp if unit is head else mp)   # the head casts its bf16 input up
        unit.set_gradient_divide_factor(1.0)          # SUM over ranks, not FSDP's default mean ...
        unit.set_force_sum_reduction_for_comms(True)  # ... as a plain SUM (gloo has no PREMUL_SUM)
    return model


def groups_per_rank(num_prompts: int, world: int) -> int:
    """Prompts (whole groups of g completions) each rank takes; a group never straddles ranks (field case B15)."""
    if num_prompts % world:
        raise SystemExit(f"--num-prompts {num_prompts} must be a multiple of the number of ranks ({world}): each "
                         f"rank takes whole groups; try --num-prompts {-(-num_prompts // world) * world}")
    return num_prompts // world


def save_checkpoint(out, step, model, opt, cfg, rank):
    """A collective: trainable weights and optimizer state gathered to rank 0's CPU, written in spg_min's layout
    (eval.py reads it; spg_min's resume does not: the RNG states are per rank, the optimizer state name-keyed)."""
    model_sd, optim_sd = get_state_dict(model, opt, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
    trainable = {n for n, q in model.named_parameters() if q.requires_grad}   # FSDP2 keeps the names
    model_sd = {n: v for n, v in model_sd.items() if n in trainable}  # a 4-bit base adds its quantisation state
    rng_states = [None] * dist.get_world_size()         # every rank's global RNGs (LoRA dropout): exact --resume
    dist.all_gather_object(rng_states, (torch.get_rng_state(),
                                        torch.cuda.get_rng_state() if torch.cuda.is_available() else None))
    if rank == 0:
        final, tmp = out / f"ckpt_{step:06d}", out / f".tmp_ckpt_{step:06d}"
        tmp.mkdir(parents=True, exist_ok=True)
        meta = {"step": step, "world_size": dist.get_world_size(), "config": dataclasses.asdict(cfg)}
        torch.save({"model": model_sd, "optimizer": optim_sd, "torch_rng_per_rank": rng_states, **meta},
                   tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        os.replace(tmp, final)
    dist.barrier()


def main(argv=None):
    p = argparse.ArgumentParser(description="SPG over several ranks; every other flag is spg_min's",
                                allow_abbrev=False)
    p.add_argument("--shard", choices=["fsdp", "ddp"], default=None, help="default: ddp for a 4-bit base, else fsdp")
    p.add_argument("--resume", nargs="?", const=True, default=False,
                   help="continue from the newest checkpoint in --out (takes no value, unlike spg_min's --resume)")
    args, rest = p.parse_known_args(argv)
    if args.resume not in (True, False):
        p.error(f"scale/train.py --resume takes no value (got {args.resume!r}): pass --resume to continue "
                "the run in --out, or leave it out and pass a fresh --out to start anew")
    cfg = S.parse_config(rest)
    if cfg.estimator == "d1":
        p.error("scale/ runs SPG only: run the d1 baseline (--estimator d1) with spg_min.py")
    four_bit = cfg.load_in_4bit                       # parse_config refuses it with the tiny model
    shard = args.shard or ("ddp" if four_bit else "fsdp")
    if shard == "fsdp" and four_bit:
        p.error("--shard fsdp cannot shard a 4-bit (bitsandbytes NF4) base: use --shard ddp, "
                "or --load-in-4bit false to shard a bf16 base")
    out = S.check_out(cfg)                            # writable (UsageError, exit 2, before any rank starts)
    latest = S.latest_checkpoint(out) if out.is_dir() else None
    if latest and not args.resume:
        p.error(f"{out} already holds {latest.name}: pass --resume to continue, or a fresh --out")
    if latest and S.checkpoint_writer(latest) == "spg_min":
        p.error(f"{latest} was written by spg_min.py: continue it with spg_min.py (its optimizer state is keyed "
                "by position, not by name), or pass a fresh --out")
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(cfg.seed)                       # start-up: every rank draws the same LoRA init
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    k, g, m = groups_per_rank(cfg.num_prompts, world), cfg.group_size, cfg.num_mc
    log = print if rank == 0 else (lambda *a, **kw: None)
    # ---- data, model, optimizer: every rank loads the same model; rank 0 warm-starts the tiny one and broadcasts
    task = T.get_task(cfg.task, d1_compat=cfg.d1_compat)
    eval_set = T.load_eval(cfg.task, cfg.data_dir, eval_file=cfg.eval_file, n=cfg.eval_n, seed=cfg.seed)
    tok, style, ids = S.load_tokenizer(cfg)
    train_set = S.load_train_set(cfg, tok, style)
    model = S.load_model(cfg, len(tok))
    model = model.to(device) if style == "tiny" else model           # LLaDA is loaded onto this rank's GPU already
    mask_id, stop_ids = ids["mask"], (ids["eos"], ids["eot"])
    if style == "tiny" and cfg.warm_start_steps and not latest:      # a resumed run loads its weights, as spg_min
        if rank == 0:
            S.sft_warm_start(model, tok, cfg, style=style, mask_id=mask_id, eos_id=ids["eos"])
        for t in model.state_dict().values():
            dist.broadcast(t, 0)
    model = shard_model(model, shard, device)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=S.ADAM_BETAS, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    start_step = 0
    summary = {"config": dataclasses.asdict(cfg), "world_size": world, "shard": shard, "nonfinite_steps": 0}
    torch.manual_seed(S.make_generator(cfg.seed, -1, rank).initial_seed())  # this rank's dropout stream (no step is -1)
    if latest:                  # every rank reads the full state (--out on a shared filesystem) and keeps its shard
        state = torch.load(latest / "state.pt", map_location="cpu", weights_only=False)
        S.check_fits(state["model"], model, latest)   # every rank raises alike (FSDP2 keeps the parameter names)
        if changed := S.changed_settings(state.get("config", {}), cfg):
            log(f"resumed with a changed config: {', '.join(changed)}")
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=StateDictOptions(full_state_dict=True, strict=False))
        S.use_settings(opt, cfg)                    # the command's lr, eps and weight decay, as spg_min
        start_step, summary = state["step"], {**S.resumed_summary(out, cfg), "world_size": world, "shard": shard}
        if len(state.get("torch_rng_per_rank") or []) == world:  # same world size: each rank's own RNG streams
            saved = state["torch_rng_per_rank"][rank]
            cpu_rng, cuda_rng = saved if isinstance(saved, (tuple, list)) else (saved, None)   # older: CPU only
            torch.set_rng_state(cpu_rng)
            if cuda and cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng)
        if rank == 0:           # drop metrics rows logged after the checkpoint; the skip count goes on from there
            summary["nonfinite_steps"] = S.nonfinite_steps_at(out, start_step)
    elif rank == 0:                                   # a run killed before its first save: its log is kept aside
        S.start_log_over(out)

    def evaluate(desc):
        """Every rank scores an equal slice (padded with the last example, so all run the same forwards)."""
        n, per = len(eval_set), -(-len(eval_set) // world)
        mine = [eval_set[min(i, n - 1)] for i in range(rank * per, (rank + 1) * per)]
        _, rows = S.evaluate(model, tok, task, mine, cfg, style=style, mask_id=mask_id, stop_ids=stop_ids, desc=desc)
        scores = all_gather(torch.tensor([r["score"] for r in rows], dtype=torch.float64), device)[:n]
        return T.aggregate(cfg.task, scores.tolist(), eval_set)

    if start_step == 0:
        summary["eval_before"] = evaluate("eval before RL")
        log(f"held-out before RL: {summary['eval_before']}")
    elif "eval_before" not in summary and "eval_at_resume" not in summary:   # a checkpoint without summary.json:
        summary["eval_at_resume"] = {"step": start_step, **evaluate(f"eval at step {start_step}")}  # start unknown
        log(f"held-out at step {start_step} (resumed; before RL: not known): {summary['eval_at_resume']}")
    dist.barrier()                                    # every rank has read summary.json before rank 0 rewrites it
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        S.write_summary(out, summary)
    stop_signal, nonfinite_in_a_row = [], 0
    handlers = {sig: signal.signal(sig, lambda *_: stop_signal.append(1)) for sig in (signal.SIGINT, signal.SIGTERM)}
    for step in range(start_step, cfg.max_steps):
        t0 = time.time()
        # ---- rollouts: this rank's k prompts of the single-process batch, one group of g completions at a time
        order = torch.randperm(len(train_set), generator=S.make_generator(cfg.seed, step, 0))[:cfg.num_prompts]
        groups, t_rollout = [], 0.0           # t_rollout: decoding only, as in spg_min (rewards not counted)
        model.eval()
        for j in range(rank * k, (rank + 1) * k):             # j: the prompt's place in the global batch
            ex = train_set[int(order[j])]
            ids, attn = S.encode_prompts(tok, [T.build_prompt(cfg.task, ex, split="train", style=style)], device=device)
            ids, attn = ids.repeat(g, 1), attn.repeat(g, 1)                                   # [g, P]
            t_gen = time.time()
            seqs = S.generate(model, ids, attn, gen_length=cfg.gen_length, block_length=cfg.block_length,
                              steps=cfg.steps, temperature=cfg.temperature, mask_id=mask_id,
                              generator=S.make_generator(cfg.seed, step, 1, j, device=device))   # [g, L]
            t_rollout += time.time() - t_gen
            comp = seqs[:, ids.shape[1]:]                                                     # [g, Lg]
            c = S.completion_mask(comp, stop_ids)                                             # [g, Lg]
            per_fn, rewards, missing = S.score_rewards(task, S.decode_completions(tok, comp, c), [ex] * g)
            adv = S.group_advantages(rewards, torch.zeros(g, dtype=torch.long)).to(device)    # [g] (Eq. 4)
            groups.append(dict(j=j, seqs=seqs, P=ids.shape[1], c=c, adv=adv, per_fn=per_fn, rewards=rewards,
                               missing=missing, attn=torch.cat([attn, torch.ones_like(comp)], 1)))
        model.train()
        num_tokens = all_reduce(sum(gr["c"].sum() for gr in groups), SUM, device).long().to(device)  # GLOBAL (B31)
        n_run = int(all_reduce(sum(bool(gr["adv"].any()) for gr in groups), MAX, device))
        run = sorted(groups, key=lambda gr: not gr["adv"].any())[:n_run]   # active groups first, then 0-adv fillers
        # ---- mu inner updates, each with fresh masks (Alg. 1); micro-batches of a group's g rows
        losses, grad_norms, bounds, skipped = [], [], {}, 0
        for it in range(cfg.mu):
            opt.zero_grad(set_to_none=True)
            loss_sum = torch.zeros((), device=device)
            for gr in run:
                masked, t = S.FORWARD_PROCESS[cfg.masking](
                    gr["c"], gr["P"], m=m, block_length=cfg.block_length, p_mask_prompt=cfg.p_mask_prompt,
                    generator=S.make_generator(cfg.seed, step, 2, it, gr["j"], device=device),
                    group_ids=torch.zeros(len(gr["c"]), dtype=torch.long))                   # [g, m, L], [g, m]
                for sl in (slice(lo, lo + cfg.micro_batch) for lo in range(0, g, cfg.micro_batch)):
                    elbo_b, eubo_b = S.sequence_bounds(model, gr["seqs"][sl], gr["attn"][sl], gr["c"][sl], masked[sl],
                                                       t[sl], beta=cfg.beta, mask_id=mask_id)    # [b], [b]
                    loss, scored = S.spg_loss(gr["adv"][sl], elbo_b, eubo_b, num_tokens=num_tokens,
                                              estimator=cfg.estimator, omega=cfg.omega)
                    bounds = scored if gr["adv"].any() else bounds          # a 0-advantage filler is not logged
                    loss.backward()
                    loss_sum += loss.detach()
            if shard == "ddp" and n_run:   # SUM, not mean: each rank's loss already carries 1 / (global token count)
                for q in params:
                    dist.all_reduce(q.grad)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if n_run else torch.zeros(())
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm   # FSDP: DTensor
            losses.append(all_reduce(loss_sum, SUM, device).item())                # = the single-process loss
            grad_norms.append(grad_norm.item())
            if all_reduce(float(torch.isfinite(loss_sum) and torch.isfinite(grad_norm)), MIN, device):  # B32
                opt.step()
                nonfinite_in_a_row = 0
            else:                          # the same decision on every rank, so no rank waits in a collective
                skipped, nonfinite_in_a_row = skipped + 1, nonfinite_in_a_row + 1
                summary["nonfinite_steps"] = summary.get("nonfinite_steps", 0) + 1
                if nonfinite_in_a_row >= S.MAX_NONFINITE_IN_A_ROW:
                    raise RuntimeError(f"{S.MAX_NONFINITE_IN_A_ROW} non-finite losses or gradients in a row: "
                                       "lower --lr or check the data")
        # ---- gather rewards; rank 0 logs one line and one metrics.jsonl row
        cat = lambda key: torch.cat([gr[key] for gr in groups])
        c_rank = cat("c")                                                                 # [k * g, Lg]
        lengths = c_rank.sum(-1, keepdim=True).cpu().double()                             # c lives on the GPU
        completions = torch.cat([gr["seqs"][:, gr["P"]:] for gr in groups])                # [k * g, Lg]
        repeated = S.repeated_token_fraction(completions, c_rank, stop_ids) * len(completions)   # this rank's count
        t_rollout = all_reduce(t_rollout, MAX, device).item()                           # the slowest rank's
        tokens_per_s = all_reduce(c_rank.numel(), SUM, device).item() / t_rollout        # all ranks' tokens
        stats = all_gather(torch.cat([cat("rewards")[:, None], cat("per_fn"), lengths], 1), device)
        rewards, per_fn, lengths = stats[:, 0], stats[:, 1:-1], stats[:, -1]
        adv_all = S.group_advantages(rewards, torch.arange(len(rewards)) // g)           # as spg_min counts them
        zero_var = (adv_all.view(-1, g) == 0).all(-1).float().mean().item()
        dt = time.time() - t0
        row = {"step": step + 1, "reward/mean": rewards.mean().item(), "reward/std": rewards.std().item(),
               **{f"reward/{name}": per_fn[:, f].mean().item() for f, (name, _, _) in enumerate(task.reward_funcs)},
               "reward/missing": int(all_reduce(sum(gr["missing"] for gr in groups), SUM, device)),
               "reward/frac_zero_adv_groups": zero_var, "gen/len": lengths.mean().item(),
               "loss": sum(losses) / len(losses), "grad_norm": sum(grad_norms) / len(grad_norms), "lr": cfg.lr,
               "health/repeated_frac": all_reduce(repeated, SUM, device).item() / len(rewards),
               "skipped": skipped, "nonfinite_steps": summary.get("nonfinite_steps", 0), **bounds,
               "time/rollout_s": t_rollout, "time/step_s": dt, "tokens_per_s": tokens_per_s}
        if row["health/repeated_frac"] > S.REPEAT_ALARM:
            log(S.collapse_warning(row["health/repeated_frac"], step + 1))
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.max_steps:
            row["eval"] = evaluate(f"eval step {step + 1}")
        if rank == 0:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(S.metrics_line(row))
        log(f"step {step + 1:5d}/{cfg.max_steps} | reward {row['reward/mean']:.3f} | loss {row['loss']:+.4f} | grad "
            f"{row['grad_norm']:.3f} | zero-adv {zero_var:.2f} | skipped {skipped} | {dt:.1f}s", flush=True)
        stop = all_reduce(len(stop_signal), MAX, device)      # a signal on any rank stops all at the same step
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps or stop:
            save_checkpoint(out, step + 1, model, opt, cfg, rank)
        if stop:
            log(f"stopped by a signal after step {step + 1}; continue with the same command plus --resume")
            dist.destroy_process_group()
            return 130
    for sig, handler in handlers.items():             # a signal stops the final evaluation at once, as in spg_min
        signal.signal(sig, handler)
    summary["eval_after"], summary["steps"] = evaluate("eval after RL"), max(cfg.max_steps, start_step)
    if rank == 0:
        S.write_summary(out, summary)
    log(f"held-out before RL: {summary.get('eval_before', 'not known')}\nheld-out after RL:  {summary['eval_after']}")
    dist.destroy_process_group()
    return 0


def leave(status):
    """Exit without Python's teardown, every file already written and closed. Two-rank CPU runs that had finished
    and written everything sometimes aborted while the interpreter shut down ("terminate called without an active
    exception", SIGABRT: 2 of 14 in one CI run, none in 34 here). Our reading, not confirmed: a gloo worker thread
    still frees a finished collective's tensors then, and takes the GIL to do it (pytorch/pytorch#179291 shows
    the same race without destroy_process_group). Skipping the teardown leaves it no interpreter to trip on."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    try:
        status = main()
    except T.UsageError as err:                       # bad input (--out, --eval-file, ...): the message, exit 2
        rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))
        print(f"scale/train.py: error{f' [rank {rank}]' if rank else ''}: {err}", file=sys.stderr)  # every rank:
        sys.exit(2)                                   # torchrun may stop the others before they get to print
    leave(status)
