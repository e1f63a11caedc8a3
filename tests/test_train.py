"""The SPG update on the tiny model, and the training script end to end.

Run: python -m pytest -q tests/test_train.py
"""
import copy
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers.pre_tokenizers import Whitespace

import model as M
import spg_min as S
from test_resume import chars_reward

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def setup():
    tok = M.tiny_tokenizer()
    net = M.tiny_model(len(tok), seed=0)
    mask_id = M.special_ids(tok)["mask"]
    ids, attn = S.encode_prompts(tok, ["Sudoku 0310200404001043", "Sudoku 1002020100030310"])
    comp = torch.tensor([tok("<answer>\n4312213434211243\n</answer>")["input_ids"] + [M.special_ids(tok)["eos"]] * 3,
                         tok("<answer>\n1432324141232314\n</answer>")["input_ids"] + [M.special_ids(tok)["eos"]] * 3])
    seqs = torch.cat([ids, comp], 1)
    full_attn = torch.cat([attn, torch.ones_like(comp)], 1)
    c = S.completion_mask(comp, [M.special_ids(tok)["eos"]])
    masked, t = S.block_forward_process(c, ids.shape[1], m=2, block_length=8, p_mask_prompt=0.15,
                                        generator=torch.Generator().manual_seed(0))
    return net, dict(seqs=seqs, attention_mask=full_attn, c=c, masked=masked, t=t), mask_id


def one_sgd_step(net, batch, mask_id, adv, estimator):
    opt = torch.optim.SGD(net.parameters(), lr=1e-2)
    elbo_b, eubo_b = S.sequence_bounds(net, **batch, beta=1.0, mask_id=mask_id)
    loss, _ = S.spg_loss(adv, elbo_b, eubo_b, num_tokens=batch["c"].sum(), estimator=estimator, omega=0.5)
    loss.backward()
    opt.step()
    with torch.no_grad():
        after = S.sequence_bounds(net, **batch, beta=1.0, mask_id=mask_id)
    return (elbo_b.detach(), eubo_b.detach()), after


def test_positive_advantage_raises_elbo(setup):
    net, batch, mask_id = setup
    (elbo0, _), (elbo1, _) = one_sgd_step(net, batch, mask_id, torch.tensor([1.0, 1.0]), "mix")
    assert (elbo1 > elbo0).all()


@pytest.mark.parametrize("estimator", ["mix", "eubo", "elbo"])
def test_negative_advantage_lowers_elbo_and_eubo(setup, estimator):
    net, batch, mask_id = setup
    (elbo0, eubo0), (elbo1, eubo1) = one_sgd_step(net, batch, mask_id, torch.tensor([-1.0, -1.0]), estimator)
    assert (elbo1 < elbo0).all() and (eubo1 < eubo0).all()


def test_zero_estimator_ignores_negatives(setup):
    net, batch, mask_id = setup
    before = [p.clone() for p in net.parameters()]
    one_sgd_step(net, batch, mask_id, torch.tensor([-1.0, -1.0]), "zero")
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_d1_positive_advantage_raises_the_completion_logprob(setup):
    """One SGD step on d1_loss (old = reference = the current policy, d1's first inner update) with A > 0 raises the
    log-prob of every completion under the same d1 mask; A < 0 lowers it."""
    net, batch, mask_id = setup
    c, Lg = batch["c"], batch["c"].shape[1]
    P = batch["seqs"].shape[1] - Lg
    masked, _ = S.d1_forward_process(c, P, m=1, p_mask_prompt=0.15, generator=torch.Generator().manual_seed(0))
    logp_of = lambda: S.masked_logprobs(net, batch["seqs"], batch["attention_mask"], masked, mask_id=mask_id,
                                        Lg=Lg)[:, 0]
    start = {k: v.clone() for k, v in net.state_dict().items()}
    for sign in (1.0, -1.0):
        net.load_state_dict(start)
        net.zero_grad(set_to_none=True)
        opt = torch.optim.SGD(net.parameters(), lr=1e-2)
        logp = logp_of()
        loss, _ = S.d1_loss(logp, logp.detach(), logp.detach(), torch.tensor([sign, sign]), c,
                            epsilon=0.5, beta_kl=0.04)
        loss.backward()
        opt.step()
        with torch.no_grad():
            change = torch.where(c, logp_of() - logp.detach(), 0.0).sum(-1)    # [B] sequence log-prob change
        assert (sign * change > 0).all()


def test_d1_reference_is_the_model_as_rl_starts(setup):
    """Full fine-tuning: a frozen copy that later updates do not move. LoRA: the same model, adapters disabled."""
    net, batch, mask_id = setup
    c, Lg = batch["c"], batch["c"].shape[1]
    masked, _ = S.d1_forward_process(c, batch["seqs"].shape[1] - Lg, m=1, p_mask_prompt=0.0)
    logp = lambda model: S.frozen_logprobs(model, batch["seqs"], batch["attention_mask"], masked, mask_id=mask_id,
                                           Lg=Lg, micro_batch=1)
    start = logp(net)
    ref, context = S.d1_reference(net)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01)                                                # training moves the policy ...
    with context():
        assert torch.equal(logp(ref), start) and not torch.equal(logp(net), start)   # ... not the reference
    assert not any(p.requires_grad for p in ref.parameters())
    lora = M.add_lora(M.tiny_model(net.config.vocab_size, seed=0), r=4, alpha=8, dropout=0.0)
    base = logp(lora)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.add_(0.1)                                             # the adapter now changes the output
    ref, context = S.d1_reference(lora)
    assert ref is lora and not torch.allclose(logp(lora), base)
    with context():
        assert torch.equal(logp(ref), base)


def test_frozen_logprobs_micro_batches_keep_their_padding():
    """d1's old and reference log-probs: rows with different left padding give the same values one at a time as
    together (each micro-batch takes its own rows' attention mask)."""
    tok = M.tiny_tokenizer()
    net, mask_id = M.tiny_model(len(tok), seed=0).eval(), M.special_ids(tok)["mask"]
    ids, attn = S.encode_prompts(tok, ["a thirty character long prompt", "hi"])
    seqs = torch.cat([ids, torch.randint(5, 60, (2, 8), generator=torch.Generator().manual_seed(0))], 1)
    attn = torch.cat([attn, torch.ones(2, 8, dtype=attn.dtype)], 1)
    masked = torch.zeros(2, 1, seqs.shape[1], dtype=torch.bool)
    masked[:, :, -8::2] = True
    one = S.frozen_logprobs(net, seqs, attn, masked, mask_id=mask_id, Lg=8, micro_batch=1)
    two = S.frozen_logprobs(net, seqs, attn, masked, mask_id=mask_id, Lg=8, micro_batch=2)
    torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-5)


def test_frozen_logprobs_run_without_dropout_and_give_training_back():
    """In eval mode (LoRA dropout 0.5 off: two calls agree), and the model is left in training mode as found."""
    tok = M.tiny_tokenizer()
    net = M.add_lora(M.tiny_model(len(tok), seed=0), r=4, alpha=8, dropout=0.5)
    for name, p in net.named_parameters():
        if "lora_B" in name:                                             # the adapter changes the output
            torch.nn.init.normal_(p, std=0.5, generator=torch.Generator().manual_seed(0))
    net.train()
    seqs = torch.randint(5, 60, (2, 12), generator=torch.Generator().manual_seed(1))
    masked = torch.zeros(2, 1, 12, dtype=torch.bool)
    masked[:, :, -6:] = True
    logp = lambda: S.frozen_logprobs(net, seqs, torch.ones_like(seqs), masked, mask_id=M.special_ids(tok)["mask"],
                                     Lg=6, micro_batch=2)
    first = logp()
    assert net.training and torch.equal(first, logp())


def test_micro_batches_accumulate_to_the_full_batch_gradient(setup):
    net, batch, mask_id = setup
    adv, n = torch.tensor([0.7, -0.4]), batch["c"].sum()

    def grads(chunks):
        net.zero_grad()
        for sl in chunks:
            part = {k: v[sl] for k, v in batch.items()}
            e, u = S.sequence_bounds(net, **part, beta=1.5, mask_id=mask_id)
            S.spg_loss(adv[sl], e, u, num_tokens=n)[0].backward()
        return [p.grad.clone() for p in net.parameters()]

    whole, parts = grads([slice(0, 2)]), grads([slice(0, 1), slice(1, 2)])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(whole, parts))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_logprobs_equal_direct_value_and_gradient(dtype):
    """The chunked path's value and gradients (TargetLogprob's hand-written backward, then the head's: h, weight,
    bias) against autograd through log_softmax, with weighted rows (a loss is not a plain sum), float32 and bf16."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50).to(dtype)
    h = torch.randn(3, 7, 16, dtype=dtype, requires_grad=True)
    targets = torch.randint(50, (3, 7))
    weights = torch.randn(3, 7)
    direct = torch.log_softmax(head(h).float(), -1).gather(-1, targets[..., None])[..., 0]
    chunked = S.target_logprobs(head, h, targets, chunk_rows=4)
    assert chunked.dtype == torch.float32 and torch.allclose(direct, chunked, atol=1e-6)
    g1 = torch.autograd.grad((weights * direct).sum(), [h, head.weight, head.bias])
    g2 = torch.autograd.grad((weights * chunked).sum(), [h, head.weight, head.bias])
    tol = dict(atol=1e-6, rtol=0) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)   # bf16: 8-bit mantissa
    assert all(a.dtype == b.dtype and torch.allclose(a.float(), b.float(), **tol) for a, b in zip(g1, g2))
    assert all(g.abs().max() > 1e-3 for g in g2)                       # every gradient is there


def test_chunked_logprobs_hold_one_chunk_of_logits(monkeypatch):
    """B33: the loss pass's peak extra memory, forward + backward through a frozen LM head (LLaDA's, under LoRA),
    is at most 1.5 chunks of LOGP_CHUNK_BYTES for every input size: a quarter chunk computed directly (autograd's
    four copies), just over it, just under and over one chunk, and 12 chunks (measured here: 1.0 to 1.2; 1.12 at
    LLaDA's V and 66-row chunks). The direct computation of 12 chunks holds all their logits."""
    sys.path.insert(0, str(ROOT / "bench"))
    from loss import tensor_peak_bytes
    torch.manual_seed(0)
    V, d, rows = 8_192, 32, 64
    monkeypatch.setattr(S, "LOGP_CHUNK_BYTES", rows * V * 4)          # chunks of 64 rows
    head = torch.nn.Linear(d, V, bias=False).requires_grad_(False)
    for n in (rows // 4, rows // 4 + 1, rows - 2, rows + 3, 12 * rows):
        h = torch.randn(1, n, d, requires_grad=True)
        targets = torch.randint(V, (1, n))
        peak = tensor_peak_bytes(lambda: S.target_logprobs(head, h, targets).sum().backward())
        assert peak <= 1.5 * S.LOGP_CHUNK_BYTES, (n, peak / S.LOGP_CHUNK_BYTES)
    direct = tensor_peak_bytes(lambda: torch.log_softmax(head(h), -1).gather(-1, targets[..., None]).sum().backward())
    assert direct >= 12 * S.LOGP_CHUNK_BYTES                           # the comparison measures what it should


def test_main_job_end_to_end_smoke(tmp_path):
    """The README's main command with a tiny budget: trains, evaluates, writes metrics and summary."""
    cmd = [sys.executable, str(ROOT / "spg_min.py"), "--task", "sudoku", "--model", "tiny", "--out", str(tmp_path),
           "--max-steps", "2", "--warm-start-steps", "3", "--eval-n", "16", "--eval-every", "1", "--num-prompts", "4",
           "--cache-dir", str(tmp_path / "cache")]
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=300, capture_output=True)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert 0 <= summary["eval_before"]["accuracy"] <= 100 and summary["eval_before"]["n"] == 16
    assert "accuracy" in summary["eval_after"] and summary["steps"] == 2
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward/mean", "reward/std", "reward/frac_zero_adv_groups", "gen/len", "loss", "grad_norm",
                "lr", "time/step_s", "tokens_per_s", "reward/missing", "health/repeated_frac"):
        assert key in rows[0]
    assert 0.0 <= rows[0]["reward/mean"] <= 1.0 and 0.0 <= rows[0]["health/repeated_frac"] <= 1.0
    assert rows[0]["reward/missing"] == 0                                  # real puzzles: every reward is a number
    assert len(list((tmp_path / "cache").glob("warm_*.pt"))) == 1
    generations = [json.loads(line) for line in (tmp_path / "eval_generations.jsonl").read_text().splitlines()]
    assert len(generations) == 16 and all(len(g["example"]["puzzle"]) == 16 for g in generations)   # tied to puzzles
    assert [g["example"] for g in generations] == S.T.load_eval("sudoku", n=16, seed=42)   # the run's seed draws them


@pytest.mark.parametrize("mu", [1, 2])
def test_train_d1_two_steps(tmp_path, monkeypatch, mu):
    """`--estimator d1` through train(): old and reference log-probs, clipped ratio and KL, 2 steps x mu. The
    reward is the completion's length (a 3-step warm start solves nothing), so that advantages are not all 0.
    With mu 1 the KL logged at step 1 is 0 (the policy is still the reference) and at step 2 it is not: the
    reference is the model as RL started, not the rollout policy of the step (which would give 0 again)."""
    def by_length(task, texts, examples):
        r = torch.tensor([len(t) / 30 for t in texts], dtype=torch.float64)
        return r[:, None], r, 0
    monkeypatch.setattr(S, "score_rewards", by_length)
    cfg = S.parse_config(["--task", "sudoku", "--model", "tiny", "--estimator", "d1", "--out", str(tmp_path),
                          "--max-steps", "2", "--warm-start-steps", "3", "--eval-n", "8", "--eval-every", "0",
                          "--num-prompts", "2", "--cache-dir", str(tmp_path / "cache"), "--mu", str(mu)])
    assert (cfg.num_mc, cfg.masking, cfg.d1_epsilon, cfg.d1_beta_kl) == (1, "d1", 0.5, 0.04)
    summary = S.train(cfg)
    assert summary["steps"] == 2 and summary["eval_after"]["n"] == 8
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert 0 <= r["d1/clip_frac"] <= 1 and math.isfinite(r["loss"]) and r["grad_norm"] > 0
        assert "bound/elbo" not in r and r["reward/frac_zero_adv_groups"] < 1
    assert rows[1]["d1/kl"] > 1e-6       # step 1's updates moved the policy away from the frozen reference
    if mu == 1:
        assert rows[0]["d1/kl"] < 1e-8   # step 1 scores the reference itself


FIXTURE = ROOT.parent / "shared" / "fixtures" / "llada_tiny"


@pytest.mark.skipif(not FIXTURE.is_dir(), reason="needs ../shared/fixtures/llada_tiny beside the checkout")
def test_llada_format_4bit_lora_path_end_to_end(tmp_path):
    """`--task gsm8k --model <LLaDA-format dir>`: 4-bit NF4 base + LoRA, paper prompts, whole loop, on CPU."""
    cmd = [sys.executable, str(ROOT / "spg_min.py"), "--task", "gsm8k", "--model", str(FIXTURE), "--max-steps", "2",
           "--out", str(tmp_path), "--gen-length", "32", "--block-length", "16", "--steps", "4", "--num-prompts", "1",
           "--group-size", "2", "--mu", "1", "--eval-n", "4", "--eval-batch", "4", "--lora-rank", "8",
           "--lora-alpha", "16", "--max-prompt-length", "600"]
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=300, capture_output=True)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["eval_after"]["n"] == 4
    state = torch.load(tmp_path / "ckpt_000002" / "state.pt", weights_only=False)
    assert state["model"] and all("lora_" in name for name in state["model"])   # only the adapter is trainable
    import eval as E                                   # eval.py reads the adapter back at its own rank (8, not 128)
    net = E.load_for_eval(str(FIXTURE), str(tmp_path / "ckpt_000002"), vocab_size=0)
    loaded = dict(net.named_parameters())
    assert all(torch.equal(loaded[name].float(), value.float()) for name, value in state["model"].items())


@pytest.mark.parametrize("estimator", ["mix", "elbo"])
def test_spg_raises_a_learnable_reward(estimator):
    """The whole update loop (rollouts -> rewards -> advantages -> block masks -> bounds -> loss -> AdamW)
    raises a reward a policy can learn quickly: the fraction of completion tokens equal to "1". A random tiny
    model emits "1" about 1 time in V = 108; a flipped sign, misaligned advantages or masks make it fall."""
    torch.manual_seed(0)
    tok = M.tiny_tokenizer()
    ids_ = M.special_ids(tok)
    one = tok("1", add_special_tokens=False)["input_ids"][0]
    net = M.tiny_model(len(tok), hidden_size=32, num_layers=2, seed=1)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    n, g, Lg = 4, 8, 8
    prompts, attn = S.encode_prompts(tok, [f"Sudoku {i}" for i in range(n)])
    prompts, attn = prompts.repeat_interleave(g, 0), attn.repeat_interleave(g, 0)
    group_ids = torch.arange(n).repeat_interleave(g)

    def rollout(step, temperature):
        net.eval()
        seqs = S.generate(net, prompts, attn, gen_length=Lg, block_length=4, steps=4, temperature=temperature,
                          mask_id=ids_["mask"], generator=S.make_generator(0, step, 1))
        net.train()
        comp = seqs[:, prompts.shape[1]:]
        c = S.completion_mask(comp, (ids_["eos"], ids_["eot"]))
        reward = ((comp == one) & c).sum(-1) / c.sum(-1)                                  # [B] in [0, 1]
        return seqs, c, reward.float()

    rewards = []
    for step in range(20):
        seqs, c, r = rollout(step, 1.0)
        rewards.append(r.mean().item())
        adv = S.group_advantages(r, group_ids)
        masked, t = S.block_forward_process(c, prompts.shape[1], m=2, block_length=4, p_mask_prompt=0.0,
                                            generator=S.make_generator(0, step, 2), group_ids=group_ids)
        elbo_b, eubo_b = S.sequence_bounds(net, seqs, torch.cat([attn, torch.ones_like(c, dtype=attn.dtype)], 1),
                                           c, masked, t, beta=1.0, mask_id=ids_["mask"])
        loss, _ = S.spg_loss(adv, elbo_b, eubo_b, num_tokens=c.sum(), estimator=estimator, omega=0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    _, _, greedy = rollout(99, 0.0)
    assert rewards[0] < 0.05
    assert sum(rewards[-3:]) / 3 > 0.3, rewards
    assert greedy.mean() > 0.3, greedy.mean()


def test_sft_step_loop_is_the_cached_warm_start(tmp_path, capsys):
    """sft_warm_start = warm_start_setup + sft_step repeated, bit for bit (bench/warm_start_curve.py relies on it);
    the warm start does not depend on the RL seed; a second call loads the cache instead of training."""
    cfgs = [S.parse_config(["--task", "sudoku", "--model", "tiny", "--out", str(tmp_path), "--warm-start-steps", "3",
                            "--seed", seed]) for seed in ("1", "2")]
    tok, style, ids = S.load_tokenizer(cfgs[0])
    warm = lambda: M.tiny_model(len(tok), seed=0)
    cached = [warm(), warm()]
    for net, cfg, name in zip(cached, cfgs, ("a.pt", "b.pt")):
        S.sft_warm_start(net, tok, cfg, style=style, mask_id=ids["mask"], eos_id=ids["eos"], path=tmp_path / name)
    looped = warm()
    examples, opt, gen = S.warm_start_setup(looped, tok, cfgs[0], style)
    for _ in range(3):
        S.sft_step(looped, opt, tok, examples, "sudoku", gen_length=cfgs[0].gen_length, style=style,
                   mask_id=ids["mask"], eos_id=ids["eos"], generator=gen)
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert same(cached[0], looped) and same(cached[0], cached[1])       # seeds 1 and 2: one warm start
    assert not same(cached[0], warm())                                  # and it trained
    printed = capsys.readouterr().out                                   # not silent, even without a terminal
    assert f"warm start: 3 supervised steps, then cached at {tmp_path / 'a.pt'}" in printed
    assert "warm start step    3/3 | loss " in printed
    reloaded = M.tiny_model(len(tok), seed=1)                           # a different init, replaced by the cache
    S.sft_warm_start(reloaded, tok, cfgs[0], style=style, mask_id=ids["mask"], eos_id=ids["eos"], path=tmp_path / "a.pt")
    assert same(cached[0], reloaded) and f"warm start: loaded {tmp_path / 'a.pt'}" in capsys.readouterr().out


def test_warm_start_cache_is_per_training_set(tmp_path, monkeypatch):
    """The warm start's cache file is named by its recipe: an --eval-file of training grids (left out of the set)
    gets its own file; one of held-out grids (nothing left out) and another RL seed share the default one; --data-dir
    folders with other GSM8K training files get their own, with the same files the same one; another prompt or
    answer template, chat template, padding side, pre-tokenizer or model size gets its own, and another process
    (another hash seed) computes the same name. The warm start trains on no held-out grid, and with the eval file
    on none of its grids either."""
    sudoku = lambda *flags: S.parse_config(["--task", "sudoku", "--model", "tiny", "--out", str(tmp_path),
                                            "--cache-dir", str(tmp_path / "cache"), *flags])
    base = sudoku()
    tok, style, ids = S.load_tokenizer(base)
    warm_set = lambda cfg: S.warm_start_setup(M.tiny_model(len(tok)), tok, cfg, style)[0]
    net = M.tiny_model(len(tok), seed=0)
    path = lambda cfg, examples, model=net, tok=tok: S.warm_start_path(cfg, model, tok, examples, style)
    name = lambda cfg: path(cfg, warm_set(cfg))
    trained = warm_set(base)
    plain = path(base, trained)
    assert re.fullmatch(rf"warm_sudoku_tiny_L{base.gen_length}_s{base.warm_start_steps}_[0-9a-f]{{8}}\.pt", plain.name)
    assert plain.parent == tmp_path / "cache" and path(base, trained[::-1]) != plain
    assert path(base, trained, model=M.tiny_model(len(tok), hidden_size=64)) != plain  # another model size
    other_chat, right_padded, whitespace = copy.deepcopy(tok), copy.deepcopy(tok), copy.deepcopy(tok)
    other_chat.chat_template = tok.chat_template.replace("<|eot_id|>", "<|eot_id|>\n")
    right_padded.padding_side = "right"
    whitespace.backend_tokenizer.pre_tokenizer = Whitespace()                # other ids for the same texts
    for other in (other_chat, right_padded, whitespace):
        assert path(base, trained, tok=other) != plain
    again = subprocess.run([sys.executable, "-c", (                    # another process, another hash seed
        "import spg_min as S, model as M; cfg = S.parse_config(" + repr(["--task", "sudoku", "--model", "tiny",
        "--out", str(tmp_path), "--cache-dir", str(tmp_path / "cache")]) + "); tok, style, _ = S.load_tokenizer(cfg);"
        " net = M.tiny_model(len(tok), seed=3); examples = S.warm_start_setup(net, tok, cfg, style)[0];"
        " print(S.warm_start_path(cfg, net, tok, examples, style))")], cwd=ROOT, timeout=120,
        env={**os.environ, "PYTHONHASHSEED": "1234"}, capture_output=True, text=True, check=True)
    assert again.stdout.strip() == str(plain)
    with monkeypatch.context() as patch:                               # another answer template
        patch.setattr(S.T, "target_completion", lambda task, ex, style: f"<answer>{ex['solution']}</answer>")
        assert path(base, trained) != plain
    with monkeypatch.context() as patch:                               # another prompt template
        patch.setattr(S.T, "build_prompt", lambda task, ex, split, style: f"Solve: {ex['puzzle']}")
        assert path(base, trained) != plain
    for constant, value in (("WARM_START_LR", 3e-3), ("WARM_START_BATCH", 32), ("WARM_START_SEED", 1),
                            ("ADAM_BETAS", (0.9, 0.95))):              # the optimizer and sampling constants
        with monkeypatch.context() as patch:
            patch.setattr(S, constant, value)
            assert path(base, trained) != plain, constant
    solutions = {ex["solution"] for ex in trained}
    assert len(solutions) == 200 and not solutions & {S.T.SUDOKU_GRIDS[i] for i in S.T.SUDOKU_HELDOUT}
    def csv(path, grids):                                              # the key reads the solution grid
        path.write_text("Puzzle,Solution\n" + "".join(f"0{g[1:]},{g}\n" for g in grids))
        return path
    held_out_grids = [S.T.SUDOKU_GRIDS[i] for i in S.T.SUDOKU_HELDOUT[:2]]
    assert name(sudoku("--eval-file", str(csv(tmp_path / "held_out.csv", held_out_grids)))) == plain
    assert name(sudoku("--seed", "7")) == plain
    grids = sorted(solutions)[:2]                                      # two training grids, as an --eval-file
    held = sudoku("--eval-file", str(csv(tmp_path / "two.csv", grids)), "--warm-start-steps", "1")
    with pytest.warns(UserWarning, match="left out 100 of 10000"):
        kept = warm_set(held)
    assert {ex["solution"] for ex in kept} == solutions - set(grids)
    assert path(held, kept) != path(held, trained)
    with pytest.warns(UserWarning, match="left out 100"):              # sft_warm_start names its file the same way
        built = S.sft_warm_start(net, tok, held, style=style, mask_id=ids["mask"], eos_id=ids["eos"])
    assert built.exists() and built == path(held, kept)
    rows = [{"question": f"What is {a} plus 1?", "answer": f"So {a + 1}.\n#### {a + 1}"} for a in range(4)]
    for folder, kept_rows in (("a", rows), ("b", rows[:3]), ("c", rows)):
        (tmp_path / folder / "gsm8k").mkdir(parents=True)
        (tmp_path / folder / "gsm8k" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept_rows))
    gsm8k = [name(S.parse_config(["--task", "gsm8k", "--model", "tiny", "--out", str(tmp_path), "--data-dir",
                                  str(tmp_path / folder)])) for folder in "abc"]
    assert gsm8k[0] != gsm8k[1] and gsm8k[0] == gsm8k[2]


@pytest.mark.parametrize("estimator", ["mix", "elbo"])
def test_train_raises_a_learnable_reward(tmp_path, monkeypatch, estimator):
    """train() itself, top to bottom, climbs a reward a policy can learn quickly (the fraction of "1" characters in
    the completion text), on a small model from scratch: a flipped sign or advantages paired with the wrong
    completions anywhere in the loop make it fall. The Sudoku puzzles are the prompts; the reward ignores them."""
    ones = lambda text, ex: text.count("1") / max(len(text), 1)
    monkeypatch.setitem(S.T.TASKS, "sudoku", dataclasses.replace(S.T.TASKS["sudoku"], reward_funcs=(("ones", ones, 1.0),)))
    monkeypatch.setattr(S, "load_model", lambda cfg, vocab: M.tiny_model(vocab, hidden_size=32, num_layers=2, seed=1))
    cfg = S.parse_config(["--task", "sudoku", "--model", "tiny", "--out", str(tmp_path), "--estimator", estimator,
                          "--max-steps", "30", "--warm-start-steps", "0", "--eval-n", "8", "--eval-every", "0",
                          "--num-prompts", "4", "--group-size", "8", "--gen-length", "8", "--block-length", "4",
                          "--steps", "4", "--mu", "1", "--lr", "1e-2", "--save-every", "100"])
    S.train(cfg)
    rewards = [json.loads(line)["reward/mean"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rewards[0] < 0.05                   # seeds 0-7: the last 3 steps average 0.93-1.0 (mix); mutations: ~0
    assert sum(rewards[-3:]) / 3 > 0.5, rewards


def test_warm_start_targets_and_loss(tmp_path, monkeypatch):
    """encode_targets: the solution's tokens, EOS-padded to Lg (cut when longer). sft_step scores every one of the
    Lg positions (the EOS padding is what the model learns to stop with) and its loss is the ELBO per token,
    -sum(ELBO) / (batch * Lg)."""
    tok = M.tiny_tokenizer()
    ids = M.special_ids(tok)
    ex = {"puzzle": "3014002020004130", "solution": "3214142323414132"}
    solution = tok(S.T.target_completion("sudoku", ex, style="tiny"), add_special_tokens=False)["input_ids"]
    padded = S.encode_targets(tok, "sudoku", [ex], gen_length=len(solution) + 5, eos_id=ids["eos"], style="tiny")
    assert padded[0].tolist() == solution + [ids["eos"]] * 5
    cut = S.encode_targets(tok, "sudoku", [ex], gen_length=len(solution) - 3, eos_id=ids["eos"], style="tiny")
    assert cut[0].tolist() == solution[:-3]
    net = M.tiny_model(len(tok), seed=0)
    cfg = S.parse_config(["--task", "sudoku", "--model", "tiny", "--out", str(tmp_path)])
    examples, opt, gen = S.warm_start_setup(net, tok, cfg, "tiny")
    seen, bounds = {}, S.sequence_bounds
    def recording_bounds(model, seqs, attn, c, masked, t, **kw):
        elbo_b, eubo_b = bounds(model, seqs, attn, c, masked, t, **kw)
        seen.update(c=c, elbo=elbo_b.detach())
        return elbo_b, eubo_b
    monkeypatch.setattr(S, "sequence_bounds", recording_bounds)
    loss = S.sft_step(net, opt, tok, examples, "sudoku", gen_length=cfg.gen_length, style="tiny",
                      mask_id=ids["mask"], eos_id=ids["eos"], generator=gen)
    assert seen["c"].shape == (S.WARM_START_BATCH, cfg.gen_length) and seen["c"].all()
    assert float(loss) == pytest.approx(-seen["elbo"].sum().item() / (S.WARM_START_BATCH * cfg.gen_length), rel=1e-6)


# ---- the loop's wiring (field cases B09, B14, B15; spg_spec.md (h)8, (h)12, (h)16)

LOOP = ["--task", "sudoku", "--model", "tiny", "--warm-start-steps", "0", "--eval-n", "5", "--eval-batch", "5",
        "--gen-length", "8", "--block-length", "4", "--steps", "4", "--save-every", "1", "--lr", "1e-3"]


def varied_reward(monkeypatch):
    """A reward that differs between completions (test_resume's), so advantages are not 0."""
    monkeypatch.setitem(S.T.TASKS, "sudoku", dataclasses.replace(S.T.TASKS["sudoku"],
                                                                 reward_funcs=(("chars", chars_reward, 1.0),)))


def test_rollouts_groups_and_masks_are_wired_as_the_paper_says(tmp_path, monkeypatch):
    """B14: rows g*k .. g*k+g-1 are prompt k's group (the same prompt ids, the same example, group id k);
    (h)12: rollouts and evaluation decode in eval mode without autograd; (h)8: each of the mu inner updates draws
    its own masks. Group 0's rewards tie, so only groups 1 and 2 are scored, with their own group ids."""
    first = []                                                            # group 0's puzzle
    chars = lambda text, ex: 0.5 if ex["puzzle"] == first[0] else chars_reward(text, ex)
    monkeypatch.setitem(S.T.TASKS, "sudoku", dataclasses.replace(S.T.TASKS["sudoku"], reward_funcs=(("chars", chars, 1.0),)))
    calls = {"generate": [], "rewards": [], "masks": []}
    generate, score_rewards, block = S.generate, S.score_rewards, S.FORWARD_PROCESS["block"]

    def recording_generate(model, prompt_ids, *a, **kw):             # the model's state in its forward passes
        seen = set()
        decoder, _ = M.decoder_and_head(model)                    # generate calls the decoder and the head itself
        hook = decoder.register_forward_pre_hook(lambda net, args: seen.add((model.training, torch.is_grad_enabled())))
        out = generate(model, prompt_ids, *a, **kw)
        hook.remove()
        calls["generate"].append((*seen.pop(), prompt_ids.clone()) if len(seen) == 1 else (seen, None, prompt_ids))
        return out

    def recording_rewards(task, texts, examples):
        first[:] = [examples[0]["puzzle"]]
        per_fn, rewards, missing = score_rewards(task, texts, examples)
        calls["rewards"].append((examples, rewards))
        return per_fn, rewards, missing

    def recording_block(c, P, **kw):
        masked, t = block(c, P, **kw)
        calls["masks"].append((masked, kw["group_ids"]))
        return masked, t
    monkeypatch.setattr(S, "generate", recording_generate)
    monkeypatch.setattr(S, "score_rewards", recording_rewards)
    monkeypatch.setitem(S.FORWARD_PROCESS, "block", recording_block)
    S.train(S.parse_config(LOOP + ["--out", str(tmp_path), "--max-steps", "1", "--num-prompts", "3",
                                   "--group-size", "4", "--mu", "3"]))
    assert [(training, grad) for training, grad, _ in calls["generate"]] == [(False, False)] * 3   # eval, RL, eval
    prompts, (examples, rewards) = calls["generate"][1][2], calls["rewards"][0]
    assert prompts.shape[0] == len(examples) == 12
    for k in range(3):
        rows = range(4 * k, 4 * k + 4)
        assert all(torch.equal(prompts[r], prompts[4 * k]) and examples[r] is examples[4 * k] for r in rows)
    assert len({e["puzzle"] for e in examples}) == 3                     # three different prompts
    assert len(calls["masks"]) == 3                                       # mu = 3 inner updates ...
    masks = [m for m, _ in calls["masks"]]
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])   # ... with fresh masks
    groups = torch.arange(3).repeat_interleave(4)                        # rows 4k .. 4k+3: group k
    active = S.group_advantages(rewards, groups) != 0                     # the rows the update scores
    assert not active[:4].any() and active.sum() >= 6                   # group 0 tied; most of the rest scored
    assert all(torch.equal(ids, groups[active]) for _, ids in calls["masks"])


def test_micro_batches_do_not_change_the_step(tmp_path, monkeypatch):
    """B15/B31: a group of 6 split into micro-batches of 2 accumulates to the step of one batch: the loss is
    normalised by the whole batch's completion tokens, whatever the split."""
    varied_reward(monkeypatch)
    rows = []
    for micro in ("2", "12"):
        out = tmp_path / micro
        S.train(S.parse_config(LOOP + ["--out", str(out), "--max-steps", "1", "--num-prompts", "2",
                                       "--group-size", "6", "--mu", "1", "--micro-batch", micro]))
        rows.append(json.loads((out / "metrics.jsonl").read_text()))
    assert rows[0]["reward/frac_zero_adv_groups"] < 1.0 and rows[0]["loss"] != 0.0      # something to accumulate
    assert rows[0]["reward/mean"] == rows[1]["reward/mean"]                            # the same rollouts
    assert rows[0]["loss"] == pytest.approx(rows[1]["loss"], rel=1e-5)                 # the same objective ...
    assert rows[0]["grad_norm"] == pytest.approx(rows[1]["grad_norm"], rel=1e-5)       # ... and gradient


def test_one_repeated_token_everywhere_is_logged_and_warned(tmp_path, monkeypatch, capsys):
    """B09: every completion is one token repeated: health/repeated_frac is 1 and the step prints the warning."""
    one = M.tiny_tokenizer().convert_tokens_to_ids("!")
    monkeypatch.setattr(S, "generate", lambda model, prompt_ids, *a, gen_length, **kw: torch.cat(
        [prompt_ids, torch.full((prompt_ids.shape[0], gen_length), one)], 1))
    S.train(S.parse_config(LOOP + ["--out", str(tmp_path), "--max-steps", "1", "--num-prompts", "2",
                                   "--group-size", "2", "--mu", "1"]))
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["health/repeated_frac"] == 1.0
    assert S.collapse_warning(1.0, 1) in capsys.readouterr().out


def test_each_task_runs_the_paper_s_optimizer_steps():
    """(h)16, paper App. G.2: rollout rounds x mu = 6000 / 4000 / 6000 / 2500 optimizer steps."""
    steps = {task: (lambda cfg: cfg.max_steps * cfg.mu)(S.parse_config(["--task", task]))
             for task in ("gsm8k", "math", "countdown", "sudoku")}
    assert steps == {"gsm8k": 6000, "math": 4000, "countdown": 6000, "sudoku": 2500}


# ---- the sixth mutation audit's survivors: each test below fails under the bug its comment names

def test_the_rl_training_set_is_drawn_with_the_run_s_seed():                          # S28
    tok = M.tiny_tokenizer()
    sets = [S.load_train_set(S.Config(task="sudoku", model="tiny", seed=s), tok, "tiny") for s in (1, 2)]
    assert sets[0] == S.T.load_train("sudoku", seed=1) and sets[0] != sets[1]
