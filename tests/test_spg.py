"""The SPG objects against hand-computed values, invariants and plain reference computations.

Run: python -m pytest -q tests/test_spg.py
"""
import json
import math
import types
import warnings

import pytest
import torch

import model as M
import spg_min as S
import tasks as T


# ---------------------------------------------------------------- advantages (Eq. 4), B12-B14

def test_advantages_mean_centred_no_std():
    r = torch.tensor([1.0, 0.0, 1.0, 1.0])
    adv = S.group_advantages(r, torch.tensor([0, 0, 1, 1]))
    assert adv.tolist() == [0.5, -0.5, 0.0, 0.0]


def test_advantages_group_by_prompt_id_in_any_order():  # B14
    r = torch.tensor([1.0, 1.0, 0.0, 1.0])               # order P0, P1, P0, P1
    adv = S.group_advantages(r, torch.tensor([0, 1, 0, 1]))
    assert adv.tolist() == [0.5, 0.0, -0.5, 0.0]


def test_zero_variance_groups_are_exactly_zero():       # B12
    assert S.group_advantages(torch.full((4,), 2.0), torch.zeros(4, dtype=torch.long)).tolist() == [0.0] * 4
    r = torch.full((8,), 0.1, dtype=torch.float32)
    assert (S.group_advantages(r, torch.zeros(8, dtype=torch.long)) == 0).all()
    r = torch.tensor([0.35] * 7 + [0.95])
    adv = S.group_advantages(r, torch.zeros(8, dtype=torch.long))
    assert adv[-1].item() == pytest.approx(0.525, abs=1e-6) and adv[-1] <= 0.6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_reward_at_its_group_mean_gets_exactly_zero(dtype):  # B12 in a mixed group
    r = torch.tensor([0.1, 0.2, 0.3, 0.0, 1e-5], dtype=dtype)
    assert r[:3].double().mean() != r[1].double()                 # the plain difference is rounding, not 0
    adv = S.group_advantages(r, torch.tensor([0, 0, 0, 1, 1]))
    assert adv[1].item() == 0.0 and adv[0].item() == pytest.approx(-0.1) and adv[2].item() == pytest.approx(0.1)
    assert adv[3:].tolist() == pytest.approx([-5e-6, 5e-6], rel=1e-3)   # a real difference 10x the tie stays


def test_nan_reward_treated_as_zero_and_counted():      # B13
    class Task:
        reward_funcs = (("r1", lambda t, ex: ex["r1"], 1.0), ("r2", lambda t, ex: ex["r2"], 1.0))
    examples = [dict(r1=1, r2=0.5), dict(r1=0, r2=float("nan")), dict(r1=1, r2=0), dict(r1=1, r2=None)]
    _, total, missing = S.score_rewards(Task, ["a"] * 4, examples)
    assert total.tolist() == [1.5, 0.0, 1.0, 1.0] and missing == 2
    adv = S.group_advantages(total, torch.tensor([0, 0, 1, 1]))
    assert adv.tolist() == [0.75, -0.75, 0.0, 0.0]


def test_repeated_token_fraction_flags_the_b09_collapse():          # B09's health check
    eos, eot = 9, 8
    comp = torch.tensor([[5, 5, 5, 9, 1, 2],     # "!!!" then EOS: one repeated token (post-EOS tail ignored)
                         [5, 5, 5, 5, 5, 5],     # no stop token: still one repeated token
                         [5, 6, 5, 5, 9, 9],     # two distinct tokens
                         [5, 9, 9, 9, 9, 9],     # a single token is not a repetition
                         [8, 5, 5, 5, 5, 5]])    # empty completion (end of turn first)
    c = S.completion_mask(comp, (eos, eot))
    assert S.repeated_token_fraction(comp, c, (eos, eot)) == pytest.approx(2 / 5)
    assert S.repeated_token_fraction(comp[:2], c[:2], (eos, eot)) == 1.0 > S.REPEAT_ALARM


def test_a_failed_task_reward_is_counted_missing_and_warned():   # B13 through a real task's wrapped function
    task, good = T.get_task("sudoku"), {"puzzle": "3014002020004130", "solution": "3214142323414132"}
    broken = {"puzzle": good["puzzle"]}                                     # a malformed example: no gold grid
    text = T.target_completion("sudoku", good)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, total, missing = S.score_rewards(task, [text, text], [good, broken])
        assert total.tolist() == [1.0, 0.0] and missing == 1
        assert task.reward(text, broken) == 0.0 and task.score(text, broken) == 0.0  # never raise, never None
    messages = [str(w.message) for w in caught if w.category is UserWarning]   # not a dependency's deprecations
    assert [m.split(":")[0] for m in messages] == ["_sudoku_reward raised KeyError", "sample 1",    # the batch's
                                                   "_sudoku_reward raised KeyError",               # reward, score
                                                   "_sudoku_score raised KeyError"], messages
    assert "every reward function failed" in messages[1]


def test_one_missing_function_of_several_is_counted_without_the_all_failed_warning():   # B13
    task = T.Task("two", (("one", lambda c, ex: 1.0, 1.0), ("none", lambda c, ex: None, 1.0)), 2.0,
                  lambda c, ex: 0.0, str)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                    # a warning here fails the test
        per_fn, total, missing = S.score_rewards(task, ["a", "b"], [{}, {}])
    assert per_fn.tolist() == [[1.0, 0.0], [1.0, 0.0]] and total.tolist() == [1.0, 1.0] and missing == 2


# ---------------------------------------------------------------- completion mask, B19

def test_completion_mask_by_position_when_pad_equals_eos():
    E = 9
    c = S.completion_mask(torch.tensor([[11, 12, E, E, E], [11, 12, 13, 14, 15]]), (E,))
    assert c.int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert S.completion_mask(torch.tensor([[E, E]]), (E, 7)).int().tolist() == [[1, 0]]
    assert S.completion_mask(torch.tensor([[3, 7, E]]), (E, 7)).int().tolist() == [[1, 1, 0]]


# ---------------------------------------------------------------- ELBO (Eq. 2) and EUBO (Cor. 1)

def test_elbo_hand_computed():
    logp = torch.tensor([[[-1.0, -2.0, -3.0], [-0.5, -1.5, -4.0]]])      # [B=1, m=2, Lg=3]
    masked = torch.tensor([[[True, False, True], [False, True, True]]])
    t = torch.tensor([[2 / 3, 2 / 3]])
    # sample 1: (-1 - 3) / (2/3) = -6 ; sample 2: (-1.5 - 4) / (2/3) = -8.25 ; mean = -7.125
    assert S.elbo(logp, masked, t).item() == pytest.approx(-7.125)


def test_eubo_hand_computed():
    logp = torch.tensor([[[-1.0, -2.0], [-3.0, -4.0]]])                   # [1, 2, 2]
    masked = torch.tensor([[[True, True], [True, False]]])
    t = torch.tensor([[1.0, 0.5]])
    beta = 1.5
    tok0 = math.log(0.5 * (math.exp(beta * -1.0) / 1.0 + math.exp(beta * -3.0) / 0.5)) / beta
    tok1 = math.log(0.5 * (math.exp(beta * -2.0) / 1.0)) / beta
    assert S.eubo(logp, masked, t, beta).item() == pytest.approx(tok0 + tok1, rel=1e-6)


def test_eubo_in_log_space_for_tiny_probabilities():   # B09
    out = S.eubo(torch.tensor([[[-80.0]]]), torch.tensor([[[True]]]), torch.tensor([[0.5]]), 1.5)
    assert torch.isfinite(out).all()
    assert out.item() == pytest.approx((1.5 * -80 - math.log(0.5)) / 1.5, abs=1e-4)   # -79.538
    assert out.item() == pytest.approx(-79.538, abs=1e-3)


def test_eubo_leaves_out_unmasked_tokens_and_rescales():
    logp = torch.tensor([[[-1.0, -2.0, -3.0, -4.0]]])
    masked = torch.tensor([[[True, True, False, False]]])
    t = torch.tensor([[0.5]])
    base = S.eubo(logp, masked, t, 1.0)
    assert base.item() == pytest.approx((-1 - math.log(0.5)) + (-2 - math.log(0.5)))
    assert S.eubo(logp, masked, t, 1.0, lengths=torch.tensor([4])).item() == pytest.approx(2 * base.item())


def test_two_token_toy_of_appendix_e3():
    a, b, beta = 0.7, 0.2, 1.5
    logp = torch.log(torch.tensor([[[a], [b]]]))                          # two samples, one token
    masked = torch.ones(1, 2, 1, dtype=torch.bool)
    t = torch.ones(1, 2)
    assert S.elbo(logp, masked, t).item() == pytest.approx(0.5 * (math.log(a) + math.log(b)), rel=1e-6)
    assert S.eubo(logp, masked, t, beta).item() == pytest.approx(math.log((a**beta + b**beta) / 2) / beta, rel=1e-6)


def test_elbo_below_eubo_on_random_inputs():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        logp = torch.log_softmax(torch.randn(3, 4, 10, 7, generator=gen), -1)[..., 0]   # [B, m, Lg]
        masked = torch.ones(3, 4, 10, dtype=torch.bool)
        t = torch.ones(3, 4)
        assert (S.elbo(logp, masked, t) <= S.eubo(logp, masked, t, 1.0) + 1e-5).all()


def test_eubo_gradient_is_rho_beta_weighted_score():
    beta = 1.5
    logp = torch.tensor([[[-0.3], [-2.0], [-1.0]]], requires_grad=True)   # [1, m=3, 1]
    t = torch.tensor([[0.5, 1.0, 0.25]])
    S.eubo(logp, torch.ones(1, 3, 1, dtype=torch.bool), t, beta).sum().backward()
    w = torch.exp(beta * logp.detach()[0, :, 0]) / t[0]
    assert torch.allclose(logp.grad[0, :, 0], w / w.sum(), atol=1e-6)   # rho_beta, Prop. 1


def test_mixture_endpoints():
    e, u = torch.tensor([-3.0, -1.0]), torch.tensor([-2.0, -0.5])
    assert torch.equal(S.mixture_bound(e, u, 0.0), e) and torch.equal(S.mixture_bound(e, u, 1.0), u)
    assert torch.allclose(S.mixture_bound(e, u, 0.5), (e + u) / 2)


def test_spg_loss_picks_bound_by_advantage_sign():
    adv = torch.tensor([1.0, -2.0, 0.0])
    elbo_b, eubo_b = torch.tensor([-4.0, -6.0, -1.0]), torch.tensor([-3.0, -2.0, -1.0])
    for est, neg in [("mix", -4.0), ("eubo", -2.0), ("elbo", -6.0), ("zero", 0.0)]:
        loss, _ = S.spg_loss(adv, elbo_b, eubo_b, num_tokens=10, estimator=est, omega=0.5)
        assert loss.item() == pytest.approx(-(1.0 * -4.0 + -2.0 * neg) / 10)


def test_all_equal_rewards_give_zero_gradient():
    elbo_b = torch.tensor([-4.0, -6.0], requires_grad=True)
    adv = S.group_advantages(torch.tensor([2.0, 2.0]), torch.tensor([0, 0]))
    loss, _ = S.spg_loss(adv, elbo_b, elbo_b * 0.5, num_tokens=5)
    loss.backward()
    assert loss.item() == 0 and (elbo_b.grad == 0).all()


# ---------------------------------------------------------------- block-wise masking (Sec. 3.3)

def test_block_masking_invariants():
    bl, P, m = 4, 3, 5
    c = torch.zeros(6, 16, dtype=torch.bool)
    for row, n in enumerate([16, 13, 9, 4, 1, 6]):
        c[row, :n] = True
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        masked, t = S.block_forward_process(c, P, m=m, block_length=bl, p_mask_prompt=0.0, generator=gen)
        comp = masked[..., P:]
        assert not masked[..., :P].any()                                       # p = 0: prompt clean
        for b in range(6):
            n = int(c[b].sum())
            for j in range(m):
                mj = comp[b, j]
                first = int(mj[:n].nonzero()[0]) if mj[:n].any() else None
                blk = first // bl
                assert blk <= (n - 1) // bl                                    # a block holding completion
                assert not mj[:blk * bl].any()                                 # earlier blocks clean
                assert mj[(blk + 1) * bl:].all() and mj[n:].all()              # later blocks, post-EOS masked
                in_block = mj[blk * bl:min((blk + 1) * bl, n)]
                assert 1 <= in_block.sum() <= len(in_block)
                assert t[b, j].item() == pytest.approx(mj[:n].sum().item() / n)


def test_block_masking_masks_exactly_the_drawn_count_in_the_drawn_block():
    """Replay the generator: the first two U(0,1) draws [B, m] pick the block and the count (in that order)."""
    bl, P, m = 4, 3, 3
    c = torch.zeros(5, 16, dtype=torch.bool)
    for row, n in enumerate([16, 13, 9, 4, 1]):
        c[row, :n] = True
    masked, _ = S.block_forward_process(c, P, m=m, block_length=bl, p_mask_prompt=0.3,
                                        generator=torch.Generator().manual_seed(11))
    replay = torch.Generator().manual_seed(11)
    u_block, u_count = torch.rand((5, m), generator=replay), torch.rand((5, m), generator=replay)
    for b in range(5):
        n = int(c[b].sum())
        for j in range(m):
            start = int(u_block[b, j] * ((n - 1) // bl + 1)) * bl            # uniform over non-empty blocks
            n_in = min(bl, n - start)
            drawn = int(u_count[b, j] * n_in) + 1                          # uniform over 1..n_in
            assert masked[b, j, P + start:P + start + n_in].sum().item() == drawn
            assert masked[b, j, P + start + n_in:].all()                   # later blocks and post-EOS


def test_block_masking_count_is_uniform_and_reproducible():
    c = torch.ones(4000, 8, dtype=torch.bool)
    gen = torch.Generator().manual_seed(1)
    masked, _ = S.block_forward_process(c, 2, m=1, block_length=8, p_mask_prompt=0.15, generator=gen)
    counts = torch.bincount(masked[:, 0, 2:].sum(-1), minlength=9)[1:]            # 1..8, one block
    assert (counts > 4000 / 8 * 0.8).all() and (counts < 4000 / 8 * 1.2).all()
    assert abs(masked[:, 0, :2].float().mean().item() - 0.15) < 0.02           # prompt perturbation rate
    again, _ = S.block_forward_process(c, 2, m=1, block_length=8, p_mask_prompt=0.15,
                                       generator=torch.Generator().manual_seed(1))
    assert torch.equal(masked, again)


def test_clean_block_perturbation_only_hits_earlier_blocks():
    c = torch.ones(2000, 8, dtype=torch.bool)
    masked, _ = S.block_forward_process(c, 0, m=1, block_length=4, p_mask_prompt=0.5,
                                        generator=torch.Generator().manual_seed(2))
    chosen_second = ~masked[:, 0, 4:].all(-1)          # block 2 was the chosen one (partly masked)
    rate = masked[chosen_second, 0, :4].float().mean().item()
    assert 0.4 < rate < 0.6                             # earlier clean block perturbed at ~p


def test_random_masking_counts_and_post_eos():
    c = torch.zeros(1000, 10, dtype=torch.bool)
    c[:, :6] = True
    masked, t = S.random_forward_process(c, 0, m=1, p_mask_prompt=0.0, generator=torch.Generator().manual_seed(3))
    assert masked[:, 0, 6:].all()
    n = masked[:, 0, :6].sum(-1)
    assert n.min() >= 1 and n.max() <= 6 and torch.allclose(t[:, 0], n / 6)


def test_masked_and_counted_positions_b17():
    # prompt 4, completion 4 with c = [1,1,1,0], all completion tokens masked: the ELBO uses 3 tokens only
    eos = 6
    c = S.completion_mask(torch.tensor([[5, 3, eos, 2]]), (eos,))          # [1, Lg]: the last token follows the EOS
    assert c.tolist() == [[True, True, True, False]]
    logp = torch.tensor([[[-1.0, -2.0, -3.0, -100.0]]])
    counted = torch.ones(1, 1, 4, dtype=torch.bool) & c[:, None]           # [1, m, Lg]: masked and counted
    t = counted.sum(-1) / c.sum(-1)
    elbo = S.elbo(logp, counted, t)
    assert elbo.item() == pytest.approx(-6.0)                               # the sum over the 3 tokens, t = 1
    # ... and the loss divides by the completion's 3 tokens (not 4): the per-sequence value is their mean, -2
    loss, _ = S.spg_loss(torch.ones(1), elbo, elbo, num_tokens=c.sum(), estimator="mix", omega=0.5)
    assert loss.item() == pytest.approx(2.0)


class _PositionwiseStub(torch.nn.Module):
    """A model whose logits at position i depend only on token i and position i: hidden = emb(z_i) + pos_i."""
    def __init__(self, L, V, generator):
        super().__init__()
        self.model, self.lm_head = torch.nn.Module(), torch.nn.Linear(V, V, bias=False)
        self.model.emb, self.model.pos = torch.nn.Embedding(V, V), torch.nn.Parameter(torch.zeros(L, V))
        self.model.forward = lambda input_ids, attention_mask, position_ids: types.SimpleNamespace(
            last_hidden_state=self.model.emb(input_ids) + self.model.pos)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator))


def test_sequence_bounds_score_only_the_real_completion_tokens_b17():
    gen = torch.Generator().manual_seed(0)
    P, Lg, V, eos, mask_id = 4, 4, 8, 6, 7
    seqs = torch.tensor([[1, 2, 3, 4, 5, 3, eos, 2]])                       # completion [5, 3, EOS, 2]
    attn, c = torch.ones_like(seqs), S.completion_mask(seqs[:, P:], (eos,))
    assert c.tolist() == [[True, True, True, False]]
    masked = torch.cat([torch.rand(1, 1, P, generator=gen) < 0.5, torch.ones(1, 1, Lg, dtype=torch.bool)], -1)
    t = torch.ones(1, 1)                                                    # 3 of the 3 real tokens masked
    stub = _PositionwiseStub(P + Lg, V, gen)
    bound = lambda s=seqs: S.sequence_bounds(stub, s, attn, c, masked, t, beta=1.0, mask_id=mask_id)[0].item()
    with torch.no_grad():                                                   # by hand: every completion input is MASK
        logp = torch.log_softmax(stub.lm_head(stub.model.emb.weight[mask_id] + stub.model.pos[P:]), -1)
    assert bound() == pytest.approx(sum(logp[k, seqs[0, P + k]].item() for k in range(3)), abs=1e-5)
    before = bound()
    with torch.no_grad():
        stub.model.pos[:P] += 5.0                                           # other logits at prompt positions
        stub.model.pos[P + 3] -= 5.0                                        # ... and at the post-EOS position
    assert bound() == before
    assert bound(torch.tensor([[1, 2, 3, 4, 5, 3, eos, 5]])) == before      # another post-EOS token
    with torch.no_grad():
        stub.model.pos[P + 1] += 1.0                                        # a counted position does count
    assert bound() != before



def test_sequence_bounds_eubo_by_hand_with_a_token_no_sample_masks():
    """The EUBO of sequence_bounds, m = 2, beta 1.5, t given: with l_k the log-prob of token k from a MASK input,
    token 0 (masked in sample 0 only) gives (1/b) log((1/2) e^(b l0) / 0.5) = l0; token 1 (masked in both) gives
    (1/b) log((1/2)(e^(b l1) / 0.5 + e^(b l1) / 0.25)) = l1 + log(3) / b; token 2, the EOS, is masked in no sample
    and left out, the sum rescaled by n / n_valid = 3 / 2 (Cor. 1). ELBO = ((l0 + l1) / 0.5 + l1 / 0.25) / 2. The
    post-EOS position, masked in both samples, counts in neither bound."""
    gen = torch.Generator().manual_seed(1)
    P, Lg, V, eos, mask_id, beta = 3, 4, 8, 6, 7, 1.5
    seqs = torch.tensor([[1, 2, 3, 5, 4, eos, 2]])                          # completion [5, 4, EOS, 2]
    attn, c = torch.ones_like(seqs), S.completion_mask(seqs[:, P:], (eos,))
    masked = torch.tensor([[[0, 0, 0, 1, 1, 0, 1], [0, 0, 0, 0, 1, 0, 1]]], dtype=torch.bool)   # [B=1, m=2, L]
    t = torch.tensor([[0.5, 0.25]])
    stub = _PositionwiseStub(P + Lg, V, gen)
    bounds = lambda: [b.item() for b in S.sequence_bounds(stub, seqs, attn, c, masked, t, beta=beta, mask_id=mask_id)]
    with torch.no_grad():
        logp = torch.log_softmax(stub.lm_head(stub.model.emb.weight[mask_id] + stub.model.pos[P:]), -1)
    l0, l1 = logp[0, 5].item(), logp[1, 4].item()
    elbo_b, eubo_b = bounds()
    assert elbo_b == pytest.approx(((l0 + l1) / 0.5 + l1 / 0.25) / 2, abs=1e-5)
    assert eubo_b == pytest.approx((l0 + l1 + math.log(3) / beta) * 3 / 2, abs=1e-5)
    with torch.no_grad():
        stub.model.pos[P + 3] -= 5.0                                        # the post-EOS position's logits
    assert bounds() == pytest.approx([elbo_b, eubo_b], abs=1e-6)


def test_masked_prompt_tokens_are_hidden_from_the_model():
    """masked_logprobs on the tiny (attending) model: a prompt token the forward process masked is replaced by MASK,
    so changing it changes nothing; changing a prompt token it left clean changes the completion's log-probs."""
    tok = M.tiny_tokenizer()
    net, mask_id = M.tiny_model(len(tok), seed=0).eval(), M.special_ids(tok)["mask"]
    seqs = torch.tensor([tok("Sudoku 1234 <answer>\n2143\n</answer>")["input_ids"]])   # [1, L]
    L, Lg = seqs.shape[1], 10
    masked = torch.zeros(1, 2, L, dtype=torch.bool)
    masked[:, :, L - Lg:L - Lg + 4] = True                                  # 4 completion tokens in both samples
    masked[:, 0, 3] = True                                                  # prompt token 3 hidden in sample 0 only
    logp = lambda s: S.masked_logprobs(net, s, torch.ones_like(s), masked, mask_id=mask_id, Lg=Lg)
    with torch.no_grad():
        before, after = logp(seqs), logp(torch.cat([seqs[:, :3], seqs[:, 3:4] + 1, seqs[:, 4:]], 1))
    assert torch.equal(before[:, 0], after[:, 0])                            # hidden: no change
    assert not torch.allclose(before[:, 1], after[:, 1], atol=1e-4)         # seen: the log-probs move

# ---------------------------------------------------------------- d1's diffu-GRPO baseline (spg_spec.md (g))

def d1_by_hand(logp, old, ref, adv, c, eps, beta):
    """The d1 loss with Python floats, one token at a time."""
    total, n = 0.0, 0
    for b in range(len(adv)):
        for k in range(len(logp[b])):
            if not c[b][k]:
                continue
            ratio = math.exp(logp[b][k] - old[b][k])
            surrogate = min(ratio * adv[b], min(max(ratio, 1 - eps), 1 + eps) * adv[b])
            kl = math.exp(ref[b][k] - logp[b][k]) - (ref[b][k] - logp[b][k]) - 1
            total, n = total + surrogate - beta * kl, n + 1
    return -total / n


def test_d1_loss_hand_computed():
    # ratios exp(+-1) = 2.72 / 0.37 lie outside [0.5, 1.5], exp(+-0.2) = 1.22 / 0.82 inside; A of both signs
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.8, -3.0, -1.0]])
    old = torch.tensor([[-2.0, -1.0, -0.7], [-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.5, -2.0, -0.2], [-0.8, -1.0, -4.0]])
    adv, c = torch.tensor([0.5, -1.0]), torch.tensor([[True, True, True], [True, True, False]])
    loss, stats = S.d1_loss(logp, old, ref, adv, c, epsilon=0.5, beta_kl=0.04)
    expected = d1_by_hand(logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), c.tolist(), 0.5, 0.04)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # by hand, row 0: A = 0.5, ratios e^1 (clipped to 1.5), e^-1 (0.368 < 0.5: min keeps the unclipped 0.368),
    # e^0.2 (inside); row 1: A = -1, ratios e^0.2 (inside), e^-1 (clip 0.5: min(-0.368, -0.5) = -0.5)
    surrogates = [0.5 * 1.5, 0.5 * math.exp(-1), 0.5 * math.exp(0.2), -math.exp(0.2), -0.5]
    kls = [math.exp(d) - d - 1 for d in (-0.5, 0.0, 0.3, 0.0, 2.0)]
    assert loss.item() == pytest.approx(-(sum(surrogates) - 0.04 * sum(kls)) / 5, rel=1e-6)
    assert stats["d1/clip_frac"] == pytest.approx(3 / 5) and stats["d1/kl"] == pytest.approx(sum(kls) / 5, rel=1e-6)


def test_d1_loss_without_kl_when_reference_equals_policy():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, stats = S.d1_loss(logp, logp.detach(), logp.detach(), torch.tensor([2.0]), torch.tensor([[True, True]]),
                            epsilon=0.5, beta_kl=0.04)
    assert stats["d1/kl"] == 0.0 and loss.item() == pytest.approx(-2.0)    # ratio 1: -A
    loss.backward()                                                         # d/dlogp_k of -A ratio_k / n = -A / n
    assert torch.allclose(logp.grad, torch.tensor([[-1.0, -1.0]]))
    loss, _ = S.d1_loss(logp, logp.detach(), logp.detach(), torch.tensor([2.0]), torch.tensor([[True, True]]),
                        epsilon=0.5, beta_kl=0.04, num_tokens=8)            # the whole batch's token count
    assert loss.item() == pytest.approx(-2.0 * 2 / 8)


def test_d1_masking_masks_the_completion_and_prompt_at_rate_p():
    c = torch.zeros(4000, 6, dtype=torch.bool)
    c[:, :4] = True                                                         # post-EOS tail masked too
    masked, t = S.d1_forward_process(c, 5, m=1, p_mask_prompt=0.15, generator=torch.Generator().manual_seed(0))
    assert masked.shape == (4000, 1, 11) and masked[..., 5:].all() and (t == 1).all()
    assert abs(masked[..., :5].float().mean().item() - 0.15) < 0.01
    again, _ = S.d1_forward_process(c, 5, m=1, p_mask_prompt=0.15, generator=torch.Generator().manual_seed(0))
    assert torch.equal(masked, again)
    none, _ = S.d1_forward_process(c, 5, m=1, p_mask_prompt=0.0, generator=torch.Generator().manual_seed(0))
    assert not none[..., :5].any()


# ---------------------------------------------------------------- decoding schedule (B21, B22)

def test_transfer_schedule():
    assert S.transfer_schedule(16, 4) == [4, 4, 4, 4]
    assert S.transfer_schedule(16, 3) == [6, 5, 5]
    assert sum(S.transfer_schedule(32, 16)) == 32


def test_commit_tokens_rows_with_nothing_to_reveal():   # B22
    M = 99
    block = torch.tensor([[1, 2, 3, 4], [M, 5, M, M]])
    proposal = torch.tensor([[7, 7, 7, 7], [8, 8, 8, 8]])
    conf = torch.tensor([[0.9, 0.9, 0.9, 0.9], [0.1, 0.9, 0.7, 0.2]])
    out = S.commit_tokens(block, proposal, conf, torch.tensor([0, 1]), M)
    assert out[0].tolist() == [1, 2, 3, 4]
    assert out[1].tolist() == [M, 5, 8, M]
    out = S.commit_tokens(block, proposal, conf, torch.tensor([2, 10]), M)   # k above #masked is clamped
    assert out[0].tolist() == [1, 2, 3, 4] and out[1].tolist() == [8, 5, 8, 8]


def test_schedule_errors():
    cfg = S.Config(gen_length=60, block_length=16)
    with pytest.raises(ValueError, match="block_length"):
        S.validate(cfg)
    with pytest.raises(ValueError, match="steps"):
        S.validate(S.Config(gen_length=64, block_length=16, steps=10))


def test_group_members_share_masks_and_groups_differ():
    c = torch.ones(6, 16, dtype=torch.bool)
    c[2, 10:] = False                                   # a shorter completion in group 0
    gid = torch.tensor([0, 0, 0, 1, 1, 1])
    masked, t = S.block_forward_process(c, 5, m=3, block_length=4, p_mask_prompt=0.3, group_ids=gid,
                                        generator=torch.Generator().manual_seed(4))
    assert torch.equal(masked[0], masked[1]) and torch.equal(masked[3], masked[5])
    assert not torch.equal(masked[0], masked[3])
    assert torch.equal(masked[2, :, :5], masked[0, :, :5])      # shared prompt perturbation
    assert masked[2, :, 5 + 10:].all()                          # its own post-EOS tail is still masked
    # each member's masks keep the unshared distribution: the mean mask rate over many draws agrees
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)
    shared = torch.stack([S.block_forward_process(c[:2], 0, m=1, block_length=4, p_mask_prompt=0.1,
                                                  group_ids=torch.zeros(2, dtype=torch.long), generator=gen_a)[0]
                          for _ in range(3000)]).float().mean(0)
    alone = torch.stack([S.block_forward_process(c[:2], 0, m=1, block_length=4, p_mask_prompt=0.1, generator=gen_b)[0]
                         for _ in range(3000)]).float().mean(0)
    assert torch.allclose(shared, alone, atol=0.04)


def run_keys(seed, steps=range(201), ranks=8):
    """The seeds of every generator one run draws: train()'s (step, 0 | 1 | 2, it), scale/'s per-group (step, 1, j)
    and (step, 2, it, j), and scale/'s dropout stream per rank (-1, rank)."""
    purposes = [(0,), (1,), *[(2, it) for it in range(4)], *[(1, j) for j in range(8)],
                *[(2, it, j) for it in range(4) for j in range(8)]]
    return [S.make_generator(seed, step, *p).initial_seed() for step in steps for p in purposes] + \
        [S.make_generator(seed, -1, rank).initial_seed() for rank in range(ranks)]


def test_make_generator_gives_every_key_of_a_run_its_own_stream():
    """Within a run no two generators share a stream (step 2's rollout order is not step 1's masks, ...), and runs
    with seeds >= 1 share none either (seed 43 is not seed 42 shifted by a step). Seed 0's keys are those of other
    seeds at other steps (make_generator's docstring): its own run is still collision-free."""
    for seed in (0, 1, 42):
        keys = run_keys(seed)
        assert len(set(keys)) == len(keys), seed
    keys = [k for seed in range(1, 5) for k in run_keys(seed)]
    assert len(set(keys)) == len(keys)
    assert S.make_generator(0, 0, 2, 0).initial_seed() == S.make_generator(1, 2, 0).initial_seed()   # seed 0


def test_non_finite_values_are_missing_rewards_and_null_metrics():
    """An infinite reward counts as missing (0), as NaN does, so advantages stay finite (B13); metrics.jsonl writes
    inf, -inf and NaN as null (strict JSON). A near-tie below 1e-6 is rounding: advantage exactly 0 (B12)."""
    task = types.SimpleNamespace(reward_funcs=(("r", lambda text, ex: ex, 1.0),))
    with pytest.warns(UserWarning, match="every reward function failed"):
        _, total, missing = S.score_rewards(task, ["a", "b", "c"], [float("inf"), float("-inf"), 1.0])
    assert total.tolist() == [0.0, 0.0, 1.0] and missing == 2
    line = S.metrics_line({"loss": float("inf"), "g": float("-inf"), "n": float("nan"), "ok": 1.5})
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON {c}")) == {"loss": None, "g": None,
                                                                                         "n": None, "ok": 1.5}
    assert S.group_advantages(torch.tensor([0.0, 5e-7]), torch.zeros(2, dtype=torch.long)).tolist() == [0.0, 0.0]


def test_reward_text_ends_at_the_first_stop_token():
    """decode_completions gives the reward functions the completion up to its first EOS, special tokens dropped:
    a solved grid followed by EOS and a wrong grid scores 1.0, not the wrong grid's credit."""
    tok = M.tiny_tokenizer()
    eos = M.special_ids(tok)["eos"]
    ex = T.load_eval("sudoku", n=1, seed=42)[0]
    encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]
    right, wrong = f"<answer>\n{ex['solution']}\n</answer>", f"<answer>\n{ex['puzzle']}\n</answer>"
    comp = torch.tensor([encode(right) + [eos] + encode(wrong)])
    c = S.completion_mask(comp, (eos,))
    assert S.decode_completions(tok, comp, c) == [right]
    assert T.get_task("sudoku").reward(right, ex) == 1.0 and T.get_task("sudoku").reward(wrong, ex) == 0.0
