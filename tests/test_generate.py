"""Decoding (LLaDA semi-AR low-confidence remasking) on the tiny bidirectional model.

Run: python -m pytest -q tests/test_generate.py
"""
import types

import pytest
import torch

import model as M
import spg_min as S


@pytest.fixture(scope="module")
def tiny():
    tok = M.tiny_tokenizer()
    return M.tiny_model(len(tok), seed=0).eval(), tok, M.special_ids(tok)["mask"]


def record_inputs(net):
    """Capture the input_ids of every decoder call."""
    seen = []
    decoder, _ = M.decoder_and_head(net)
    handle = decoder.register_forward_pre_hook(lambda mod, args, kw: seen.append(kw["input_ids"].clone()),
                                               with_kwargs=True)
    return seen, handle


def test_per_block_schedule_and_no_mask_left(tiny):  # B21
    net, tok, mask_id = tiny
    ids, attn = S.encode_prompts(tok, ["Sudoku 0310200404001043", "hi"])
    P = ids.shape[1]
    seen, handle = record_inputs(net)
    out = S.generate(net, ids, attn, gen_length=64, block_length=16, steps=16, temperature=0.0, mask_id=mask_id)
    handle.remove()
    assert len(seen) == 16                                        # 4 blocks x 4 steps, one call each
    assert not (out[:, P:] == mask_id).any()
    assert torch.equal(out[:, :P], ids)                           # the prompt is never changed
    snapshots = seen + [out]
    for i in range(16):
        block = i // 4
        lo, hi = P + 16 * block, P + 16 * (block + 1)
        newly = (snapshots[i] == mask_id) & (snapshots[i + 1] != mask_id)
        assert newly[:, lo:hi].sum(-1).tolist() == [4, 4]         # schedule [4, 4, 4, 4] in every block
        assert not newly[:, :lo].any() and not newly[:, hi:].any()  # only the current block changes


def test_uneven_schedule_within_block(tiny):
    net, tok, mask_id = tiny
    ids, attn = S.encode_prompts(tok, ["abc"])
    seen, handle = record_inputs(net)
    out = S.generate(net, ids, attn, gen_length=16, block_length=16, steps=3, temperature=0.0, mask_id=mask_id)
    handle.remove()
    counts = [int(((a == mask_id) & (b != mask_id)).sum()) for a, b in zip(seen, seen[1:] + [out])]
    assert counts == [6, 5, 5]


def test_bad_schedule_raises(tiny):
    net, tok, mask_id = tiny
    ids, attn = S.encode_prompts(tok, ["abc"])
    with pytest.raises(ValueError, match="block_length"):
        S.generate(net, ids, attn, gen_length=60, block_length=16, steps=4, temperature=0.0, mask_id=mask_id)
    with pytest.raises(ValueError, match="steps"):
        S.generate(net, ids, attn, gen_length=64, block_length=16, steps=10, temperature=0.0, mask_id=mask_id)
    kw = dict(gen_length=16, block_length=16, steps=4, mask_id=mask_id)
    with pytest.raises(ValueError, match="remasking='low_confidance' is not one of"):
        S.generate(net, ids, attn, temperature=0.0, remasking="low_confidance", **kw)
    for sampling in (dict(temperature=1.0), dict(temperature=0.0, remasking="random")):   # STYLE: no global RNG
        with pytest.raises(ValueError, match="draws from a generator"):
            S.generate(net, ids, attn, **sampling, **kw)


def test_greedy_independent_of_batch_and_padding(tiny):  # B24
    net, tok, mask_id = tiny
    prompts = ["2+2=", "a thirty character long prompt", "Sudoku 0310200404001043"]
    kw = dict(gen_length=16, block_length=8, steps=8, temperature=0.0, mask_id=mask_id)
    ids, attn = S.encode_prompts(tok, prompts)
    together = S.generate(net, ids, attn, **kw)
    assert (attn == 0).any()                                      # the short prompts really are left-padded
    for row, p in enumerate(prompts):
        one_ids, one_attn = S.encode_prompts(tok, [p])
        alone = S.generate(net, one_ids, one_attn, **kw)
        assert torch.equal(together[row, -16:], alone[0, -16:])


def test_literal_mask_token_in_prompt_is_never_decoded(tiny):  # B26
    net, tok, mask_id = tiny
    ids, attn = S.encode_prompts(tok, ["keep <|mdm_mask|> this"])
    assert (ids == mask_id).any()
    out = S.generate(net, ids, attn, gen_length=8, block_length=8, steps=4, temperature=0.0, mask_id=mask_id)
    assert torch.equal(out[:, :ids.shape[1]], ids)
    assert not (out[:, ids.shape[1]:] == mask_id).any()


def test_sampling_reproducible_with_generator_and_random_remasking(tiny):
    net, tok, mask_id = tiny
    ids, attn = S.encode_prompts(tok, ["abc", "de"])
    kw = dict(gen_length=16, block_length=8, steps=8, temperature=0.9, mask_id=mask_id)
    a = S.generate(net, ids, attn, generator=torch.Generator().manual_seed(3), **kw)
    b = S.generate(net, ids, attn, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(a, b)
    r = S.generate(net, ids, attn, remasking="random", generator=torch.Generator().manual_seed(3), **kw)
    assert not (r == mask_id).any()


def test_temperature_samples_from_tempered_softmax():
    """With a model whose logits are fixed, the committed tokens follow softmax(logits / T)."""
    V, T = 4, 0.5
    logits = torch.tensor([1.0, 0.0, -1.0, -30.0])

    class Fixed(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, position_ids=None):
            return type("Out", (), {"last_hidden_state": torch.zeros(*input_ids.shape, 1)})()

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Fixed()
            self.lm_head = lambda h: logits.expand(*h.shape[:-1], V).clone()

    counts = torch.zeros(V)
    out = S.generate(Net(), torch.zeros(4000, 1, dtype=torch.long), torch.ones(4000, 1, dtype=torch.long),
                     gen_length=1, block_length=1, steps=1, temperature=T, mask_id=3,
                     generator=torch.Generator().manual_seed(0))
    counts += torch.bincount(out[:, 1], minlength=V)
    expected = torch.softmax(logits[:3] / T, -1)
    assert counts[3] == 0                                          # the mask token is never proposed
    assert torch.allclose(counts[:3] / 4000, expected, atol=0.03)


def test_sampled_confidence_is_the_untempered_probability(tiny, monkeypatch):
    """At T = 0.5 each step's confidence is softmax(logits)[sampled token] (LLaDA's low-confidence remasking
    scores the untempered distribution), recomputed here from the decoder's input at that step; the tempered
    probability, which differs at T = 0.5, is not what orders the commits."""
    net, tok, mask_id = tiny
    ids, attn = S.encode_prompts(tok, ["Sudoku 0310200404001043", "hi"])
    captured, commit = [], S.commit_tokens
    def recording_commit(block, proposal, confidence, k, mask_id):
        captured.append((proposal.clone(), confidence.clone()))
        return commit(block, proposal, confidence, k, mask_id)
    monkeypatch.setattr(S, "commit_tokens", recording_commit)
    seen, handle = record_inputs(net)
    S.generate(net, ids, attn, gen_length=16, block_length=8, steps=8, temperature=0.5, mask_id=mask_id,
               generator=torch.Generator().manual_seed(0))
    handle.remove()
    assert len(seen) == len(captured) == 8
    P, differs = ids.shape[1], 0
    for step, (x, (proposal, confidence)) in enumerate(zip(seen, captured)):
        lo = P + 8 * (step // 4)
        with torch.no_grad():
            logits = net.lm_head(S.hidden_states(net, x, torch.cat([attn, torch.ones(2, 16, dtype=attn.dtype)], 1)))
        logits = logits[:, lo:lo + 8].float()
        logits[..., mask_id] = -float("inf")
        untempered = logits.softmax(-1).gather(-1, proposal[..., None])[..., 0]
        tempered = (logits / 0.5).softmax(-1).gather(-1, proposal[..., None])[..., 0]
        assert torch.allclose(confidence, untempered, atol=1e-5)
        differs += not torch.allclose(confidence, tempered, atol=1e-3)
    assert differs == 8


def test_random_remasking_commits_in_the_generators_uniform_order(tiny):
    """remasking="random": each step commits the k still-masked positions with the highest uniform draws of the
    passed generator (the draws reproduced here), not the model's most confident ones."""
    net, tok, mask_id = tiny
    ids, attn = S.encode_prompts(tok, ["abc", "de"])
    P = ids.shape[1]
    seen, handle = record_inputs(net)
    out = S.generate(net, ids, attn, gen_length=8, block_length=8, steps=4, temperature=0.0, remasking="random",
                     mask_id=mask_id, generator=torch.Generator().manual_seed(3))
    handle.remove()
    draws, masked = torch.Generator().manual_seed(3), torch.ones(2, 8, dtype=torch.bool)
    for after in seen[1:] + [out]:
        u = torch.rand(2, 8, generator=draws).masked_fill(~masked, -1.0)      # [B, bl] this step's scores
        chosen = torch.zeros(2, 8, dtype=torch.bool).scatter(1, u.topk(2, -1).indices, True)
        assert torch.equal((after[:, P:] != mask_id) & masked, chosen)
        masked &= ~chosen


class _SureOnceCommitted(torch.nn.Module):
    """Hidden state 1 at a committed position, 0 at a masked one: committed positions are sure of token 0
    (p ~ 1), masked ones never reach p 0.9."""
    def __init__(self, mask_id):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.forward = lambda input_ids, attention_mask=None, position_ids=None: types.SimpleNamespace(
            last_hidden_state=(input_ids != mask_id).float()[..., None])
        sure, unsure = torch.tensor([9.0, 0, 0, 0, 0]), torch.tensor([1.0, 0.9, 0.8, 0, 0])
        self.lm_head = lambda h: torch.where(h == 1, sure, unsure)


def test_threshold_counts_only_masked_positions():
    """Fast-dLLM's threshold adds the MASKED positions above it: committed ones (here p ~ 1) must not count, so
    with no masked position ever above 0.9 the block takes the schedule's 4 steps and decodes as without it."""
    mask_id, calls = 4, []
    net = _SureOnceCommitted(mask_id)
    ids, attn = torch.tensor([[1]]), torch.ones(1, 1, dtype=torch.long)
    kw = dict(gen_length=4, block_length=4, steps=4, temperature=0.0, mask_id=mask_id)
    real_forward = net.model.forward
    net.model.forward = lambda *a, **k: (calls.append(1), real_forward(*a, **k))[1]
    out = S.generate(net, ids, attn, threshold=0.9, **kw)
    assert len(calls) == 4 and torch.equal(out, S.generate(net, ids, attn, **kw))
