"""Why RL does not move the tiny Sudoku model: how consistent is the SPG gradient, and where does it point?

From the cached tiny warm start (spg_min's `sft_warm_start`, built if missing), draw NB rollout batches (N prompts
x G completions each, at temperature T), and for each take the gradient of the SPG loss exactly as `spg_min.train`
computes it (group advantages, block-wise masks shared within a group, the bounds, `spg_loss`). Report:

  cos      the mean pairwise cosine between the NB batch gradients: ~0 means each batch gradient is mostly noise,
           near 1 means every batch points the same way (signal, or a bias shared by all batches);
  step     held-out and training-puzzle greedy cell accuracy (256 each) and the sampled training reward at T,
           after one step of L2 length ETA along the normalised mean gradient (descent on the loss).

--reward ones swaps the Sudoku reward for the fraction of "1" digits in the answer, a reward the model can learn
easily: the control that shows the update itself works. --sft instead trains on the ground-truth solutions
through the same loss path (A = 1 for every row) with AdamW for --sft-steps steps and reports held-out accuracy
every 10 steps: does the block-masked ELBO, with or without prompt masking, teach the model what SFT teaches?

Run: OMP_NUM_THREADS=1 python bench/gradient_probe.py [--p-mask-prompt 0.15] [--temperature 0.3] [--estimator elbo]
     [--reward ones] [--num-mc 8] [--unshared-masks] [--etas 0.05,0.1] | [--sft --lr 5e-5 --sft-steps 20]
     (about 2 min per call)
"""
import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import spg_min as S    # noqa: E402
import tasks as T      # noqa: E402

PROBE_SEED = 7         # rollout / mask generators: make_generator(PROBE_SEED, batch, purpose)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--p-mask-prompt", type=float, default=S.TINY_PRESET.get("p_mask_prompt", 0.15))
    p.add_argument("--num-mc", type=int, default=2)
    p.add_argument("--estimator", default="mix", choices=sorted(S.NEG_BOUND))
    p.add_argument("--masking", default="block", choices=sorted(S.FORWARD_PROCESS))
    p.add_argument("--unshared-masks", action="store_true",
                   help="draw every completion's masks on its own instead of once per group (README deviation 6)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--num-batches", type=int, default=6)
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--group-size", type=int, default=6)
    p.add_argument("--etas", default="0.05,0.1")
    p.add_argument("--reward", default="task", choices=["task", "ones"])
    p.add_argument("--sft", action="store_true")
    p.add_argument("--sft-steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--eval-n", type=int, default=256)
    p.add_argument("--cache-dir", default=".cache")
    p.add_argument("--warm-start-steps", type=int, default=None,
                   help="supervised steps before the probe [the tiny preset's; --quick: 30]")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run for the tests")
    a = p.parse_args(argv)
    if a.quick:
        a.warm_start_steps = 30 if a.warm_start_steps is None else a.warm_start_steps
        a.num_batches, a.num_prompts, a.group_size, a.eval_n, a.sft_steps, a.etas = 2, 4, 4, 16, 2, "0.05"
    return a


def ones_reward(texts):
    """[B] fraction of the 16 answer cells that are "1" (the control reward)."""
    return torch.tensor([(T.closed_answer_tag(t) or "").count("1") / 16 for t in texts])


def main(argv=None):
    a = parse(argv)
    torch.set_num_threads(1)
    cfg = S.Config(task="sudoku", model="tiny", cache_dir=a.cache_dir, **S.TINY_PRESET)
    cfg.eval_n = a.eval_n
    tok, style, ids = S.load_tokenizer(cfg)
    mask_id, stop = ids["mask"], (ids["eos"], ids["eot"])
    task = T.get_task("sudoku")
    train = T.load_train("sudoku", seed=1)
    held_out = T.load_eval("sudoku", n=a.eval_n)
    base = S.load_model(cfg, len(tok))
    if a.warm_start_steps is not None:
        cfg.warm_start_steps = a.warm_start_steps
    S.sft_warm_start(base, tok, cfg, style=style, mask_id=mask_id, eos_id=ids["eos"])   # cached as spg_min's
    train_probe = [train[i] for i in torch.randperm(len(train), generator=torch.Generator().manual_seed(5))]
    train_probe = train_probe[:a.eval_n]

    def accuracy(net, examples):
        return round(S.evaluate(net, tok, task, examples, cfg, style=style, mask_id=mask_id, stop_ids=stop,
                                desc="eval")[0]["accuracy"], 2)

    def rollout(net, examples, temperature, generator):
        prompts, attn = S.encode_prompts(tok, [T.build_prompt("sudoku", e, style=style) for e in examples])
        net.eval()
        seqs = S.generate(net, prompts, attn, gen_length=cfg.gen_length, block_length=cfg.block_length,
                          steps=cfg.steps, temperature=temperature, mask_id=mask_id, generator=generator)
        net.train()
        comp = seqs[:, prompts.shape[1]:]
        c = S.completion_mask(comp, stop)
        texts = S.decode_completions(tok, comp, c)
        _, r, _ = S.score_rewards(task, texts, examples)
        r = ones_reward(texts) if a.reward == "ones" else r
        return seqs, torch.cat([attn, torch.ones_like(comp)], 1), c, prompts.shape[1], r

    def sampled_reward(net):
        examples = [e for e in train_probe[:64] for _ in range(4)]
        return round(rollout(net, examples, a.temperature, torch.Generator().manual_seed(99))[-1].mean().item(), 4)

    if a.sft:
        net, gen = copy.deepcopy(base), torch.Generator().manual_seed(0)
        opt = torch.optim.AdamW(net.parameters(), lr=a.lr, betas=S.ADAM_BETAS, weight_decay=0.0)
        print(f"{vars(a)}\nstep 0: held-out {accuracy(net, held_out)}", flush=True)
        for step in range(a.sft_steps):
            batch = [train[i] for i in torch.randint(len(train), (a.num_prompts * a.group_size,), generator=gen)]
            prompts, attn = S.encode_prompts(tok, [T.build_prompt("sudoku", e, style=style) for e in batch])
            target = S.encode_targets(tok, "sudoku", batch, gen_length=cfg.gen_length, eos_id=ids["eos"], style=style)
            c = S.completion_mask(target, stop)
            seqs, full_attn = torch.cat([prompts, target], 1), torch.cat([attn, torch.ones_like(target)], 1)
            for _ in range(cfg.mu):
                masked, t = S.FORWARD_PROCESS[a.masking](c, prompts.shape[1], m=a.num_mc, block_length=cfg.block_length,
                                                         p_mask_prompt=a.p_mask_prompt, generator=gen)
                elbo_b, _ = S.sequence_bounds(net, seqs, full_attn, c, masked, t, beta=cfg.beta, mask_id=mask_id)
                loss = -elbo_b.sum() / c.sum()
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
                opt.step()
            if (step + 1) % 10 == 0 or step + 1 == a.sft_steps:
                print(f"step {step + 1}: held-out {accuracy(net, held_out)}", flush=True)
        return

    grads, rewards = [], []
    for b in range(a.num_batches):
        order = torch.randperm(len(train), generator=S.make_generator(PROBE_SEED, b, 0))[:a.num_prompts]
        examples = [train[i] for i in order.tolist() for _ in range(a.group_size)]
        seqs, attn, c, P, r = rollout(base, examples, a.temperature, S.make_generator(PROBE_SEED, b, 1))
        group_ids = torch.arange(a.num_prompts).repeat_interleave(a.group_size)
        adv = S.group_advantages(r, group_ids)
        masked, t = S.FORWARD_PROCESS[a.masking](c, P, m=a.num_mc, block_length=cfg.block_length,
                                                 p_mask_prompt=a.p_mask_prompt,
                                                 generator=S.make_generator(PROBE_SEED, b, 2),
                                                 group_ids=None if a.unshared_masks else group_ids)
        elbo_b, eubo_b = S.sequence_bounds(base, seqs, attn, c, masked, t, beta=cfg.beta, mask_id=mask_id)
        loss, _ = S.spg_loss(adv, elbo_b, eubo_b, num_tokens=c.sum(), estimator=a.estimator, omega=cfg.omega)
        base.zero_grad()
        loss.backward()
        grads.append(torch.cat([q.grad.flatten() for q in base.parameters()]))
        rewards.append(r.mean().item())
    G = torch.stack(grads)                                                             # [NB, params]
    cos = torch.nn.functional.cosine_similarity(G[:, None], G[None], dim=-1)
    pairwise = cos[~torch.eye(len(G), dtype=torch.bool)].mean().item()                 # off-diagonal mean
    print(f"{vars(a)}\ncos {pairwise:.3f} | grad norm {G.norm(dim=1).mean():.4f} | "
          f"rollout reward {sum(rewards) / len(rewards):.3f}")
    print(f"eta 0: held-out {accuracy(base, held_out)} | train greedy {accuracy(base, train_probe)} | "
          f"sampled reward (T={a.temperature}) {sampled_reward(base)}", flush=True)
    direction = G.mean(0) / G.mean(0).norm().clamp_min(1e-12)                        # 0 if all advantages are 0
    for eta in map(float, a.etas.split(",")):
        net = copy.deepcopy(base)
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(torch.nn.utils.parameters_to_vector(net.parameters())
                                                - eta * direction, net.parameters())
        print(f"eta {eta}: held-out {accuracy(net, held_out)} | train greedy {accuracy(net, train_probe)} | "
              f"sampled reward (T={a.temperature}) {sampled_reward(net)}", flush=True)


if __name__ == "__main__":
    main()
