"""Tests for model.py: bidirectional attention, LLaDA weight loading, left padding, 4-bit + LoRA, tokenizer.

Run: python -m pytest -q tests/test_model.py   (CPU, about 30 s on 2 cores)
Needs the fixture in ../shared/fixtures (a tiny checkpoint in LLaDA's exact format plus its expected logits);
the tests that use it skip when it is absent.
"""
import json
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
import model as M  # noqa: E402
import spg_min as S  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
LLADA_TINY = FIXTURES / "llada_tiny"
needs_fixture = pytest.mark.skipif(not (LLADA_TINY / "config.json").exists(),
                                   reason=f"LLaDA-format fixture not found at {LLADA_TINY}")


def logits(model, ids, mask=None, pos=None):
    """[B, L, V] float32 logits on the CPU (load_llada puts the model on CUDA when there is one)."""
    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    inputs = {k: v.to(model.device) for k, v in inputs.items() if v is not None}
    with torch.no_grad():
        return model(**inputs).logits.float().cpu()


def assert_bidirectional(model, ids):
    """Changing the LAST token must change the FIRST position's logits (no causal mask)."""
    changed = ids.clone()
    changed[:, -1] = (ids[:, -1] + 1) % 64
    assert (logits(model, ids)[:, 0] - logits(model, changed)[:, 0]).abs().max() > 1e-4


def assert_left_padding_ok(model, short, long, pad_id, atol=1e-5):
    """[short] left-padded next to [long] gives the same logits at real positions as [short] alone."""
    n_pad = long.shape[-1] - short.shape[-1]
    ids = torch.stack([torch.cat([torch.full((n_pad,), pad_id), short]), long])      # [2, L]
    mask = torch.ones_like(ids)
    mask[0, :n_pad] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    batched = logits(model, ids, mask, pos)                                           # [2, L, V]
    torch.testing.assert_close(batched[0, n_pad:], logits(model, short[None])[0], atol=atol, rtol=0)
    torch.testing.assert_close(batched[1], logits(model, long[None])[0], atol=atol, rtol=0)


def train_one_step(model, ids, mask_id, lr=1e-2):
    """One AdamW step on a masked-token loss: mask ~30% of positions, cross-entropy there."""
    gen = torch.Generator().manual_seed(0)
    ids = ids.to(model.device)
    masked = (torch.rand(ids.shape, generator=gen) < 0.3).to(model.device)
    noisy = torch.where(masked, torch.full_like(ids, mask_id), ids)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    loss = F.cross_entropy(model(input_ids=noisy).logits[masked].float(), ids[masked])
    loss.backward()
    opt.step()
    model.eval()
    return loss.item()


def base_snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def assert_lora_trained(model, before):
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.norm() > 0 for p in lora_b), "a LoRA B matrix did not move"
    for n, p in model.named_parameters():
        if n in before:
            assert torch.equal(p.detach(), before[n]), f"base weight {n} changed"


# ---------------------------------------------------------------------------------------------- tokenizer

def test_tiny_tokenizer_roundtrip_template_and_ids():
    tok = M.tiny_tokenizer()
    assert M.special_ids(tok) == {"mask": 107, "eos": 106, "eot": 105, "pad": 106} and len(tok) == 108
    text = "Think.\n<reasoning>2+2\t= 4</reasoning>\n<answer>4</answer>"
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text and tok.decode(ids, skip_special_tokens=True) == text
    assert tok.convert_tokens_to_ids("<answer>") in ids                       # tags are single tokens
    assert tok("é", add_special_tokens=False).input_ids == [tok.unk_token_id]
    assert tok.padding_side == "left"

    messages = [{"role": "system", "content": "dropped"}, {"role": "user", "content": "What is 2+2?"}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
                      "<|start_header_id|>assistant<|end_header_id|>\n\n")
    # B26: literal mask text in user content becomes the mask id, as with LLaDA's own tokenizer.
    assert M.special_ids(tok)["mask"] in tok("x <|mdm_mask|> y", add_special_tokens=False).input_ids


def test_a_tokenizer_that_names_no_mask_token_gets_llada_s(tmp_path):
    """LLaDA-8B-Instruct's tokenizer_config.json names no mask token; <|mdm_mask|> is then registered by name, so
    spg_min accepts it as special (the real tokenizer's files cannot be fetched here: the tiny one, edited)."""
    M.tiny_tokenizer().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del config["mask_token"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "extra_special_tokens": ["<|eot_id|>"]}))
    tok = M.load_tokenizer(tmp_path)
    assert tok.mask_token == M.MASK and 107 in tok.all_special_ids
    assert S.load_tokenizer(S.Config(model=str(tmp_path)))[2]["mask"] == 107


def test_a_saved_right_padding_tokenizer_loads_left_padded(tmp_path):
    """Prompts are left-padded whatever the tokenizer files say, so a batch's completions start at one column."""
    tok = M.tiny_tokenizer()
    tok.padding_side = "right"
    tok.save_pretrained(tmp_path)
    loaded = M.load_tokenizer(tmp_path)
    assert loaded.padding_side == "left"
    ids, attn = S.encode_prompts(loaded, ["a", "abc"])
    assert attn[0].tolist()[:2] == [0, 0] and attn[0, -1] == 1 and attn[1].all()


@needs_fixture
def test_fixture_tokenizer_ids_fit_the_fixture_model():
    cfg = json.loads((LLADA_TINY / "config.json").read_text())
    tok = M.load_tokenizer(LLADA_TINY)
    assert M.special_ids(tok)["mask"] == cfg["mask_token_id"] == 380
    assert M.special_ids(tok)["eos"] == cfg["eos_token_id"] == 381
    prompt = tok.apply_chat_template([{"role": "user", "content": "".join(M.CHARS) + "é <answer>"}],
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False).input_ids
    assert len(tok) == cfg["vocab_size"] == 384 and max(ids) < 384 and max(tok.get_vocab().values()) < 384


# ---------------------------------------------------------------------------------------------- tiny model

def test_tiny_model_seeded_bidirectional_and_left_padding():
    rng_before = torch.get_rng_state()
    model = M.tiny_model(108).eval()
    assert torch.equal(torch.get_rng_state(), rng_before), "tiny_model must not reseed the global RNG"
    assert 1.0e6 < sum(p.numel() for p in model.parameters()) < 1.2e6
    assert torch.equal(model.lm_head.weight, M.tiny_model(108).lm_head.weight)
    assert not torch.equal(model.lm_head.weight, M.tiny_model(108, seed=1).lm_head.weight)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (2, 12), generator=gen)
    assert_bidirectional(model, ids)
    assert_left_padding_ok(model, ids[0, :7], ids[1], pad_id=106)


def test_gradient_checkpointing_lora_trains_unquantized():
    """B27: unquantized base (no k-bit prep), LoRA on q/v, checkpointing on: LoRA still trains."""
    model = M.add_lora(M.tiny_model(108), r=8, targets=("q_proj", "v_proj"), gradient_checkpointing=True)
    assert model.get_base_model().is_activation_checkpointing
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    before = base_snapshot(model)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    train_one_step(model, ids, mask_id=107)
    assert_lora_trained(model, before)
    # decoder_and_head runs the LoRA layers: same logits as the full peft forward.
    decoder, head = M.decoder_and_head(model)
    with torch.no_grad():
        via_parts = head(decoder(input_ids=ids).last_hidden_state)  # tiny_model stays on the CPU
    torch.testing.assert_close(via_parts, logits(model, ids), atol=1e-6, rtol=0)
    all_linear = M.add_lora(M.tiny_model(108), r=4, targets="all-linear")
    assert sum(n.endswith("lora_A.default") for n, _ in all_linear.named_modules()) == 4 * 7


def test_lora_on_a_bf16_base_keeps_it_bf16():
    """B27: k-bit preparation (upcast to fp32) is for a 4-bit base only; on bf16 LLaDA it would double the memory."""
    model = M.add_lora(M.tiny_model(108).to(torch.bfloat16), r=4)
    base = [p.dtype for n, p in model.named_parameters() if "lora_" not in n]
    assert base and set(base) == {torch.bfloat16}


def test_a_tokenizer_without_llada_s_end_of_turn_is_refused():
    """A token missing from the vocabulary maps to unk: special_ids must not hand that out as eot."""
    tok = M.tiny_tokenizer()
    real = tok.convert_tokens_to_ids
    tok.convert_tokens_to_ids = lambda t: tok.unk_token_id if t == M.EOT else real(t)
    with pytest.raises(AssertionError, match="missing special token"):
        M.special_ids(tok)


# ---------------------------------------------------------------------------------------------- LLaDA format

def test_llada_config_reads_grouped_heads_and_a_padded_vocabulary():
    """n_kv_heads (grouped-query attention) and embedding_size (rows of a padded vocabulary) are LLaDA's names."""
    cfg = {"d_model": 96, "mlp_hidden_size": 200, "n_layers": 2, "n_heads": 6, "n_kv_heads": 6,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_sequence_length": 256, "eos_token_id": 381,
           "mask_token_id": 380, "vocab_size": 384, "embedding_size": 384}          # the fixture's fields
    grouped = M.llama_config_from_llada({**cfg, "n_heads": 6, "n_kv_heads": 2, "vocab_size": 382, "embedding_size": 400})
    assert (grouped.num_attention_heads, grouped.num_key_value_heads, grouped.vocab_size) == (6, 2, 400)
    plain = M.llama_config_from_llada({**cfg, "n_kv_heads": None, "embedding_size": None, "vocab_size": 382})
    assert (plain.num_key_value_heads, plain.vocab_size) == (6, 382)


@needs_fixture
def test_fixture_fp32_matches_expected_logits_bidirectional_and_padding():
    expected = torch.load(FIXTURES / "llada_tiny_expected.pt")
    model = M.load_llada(LLADA_TINY, dtype=torch.float32)
    assert not model.config.is_causal
    torch.testing.assert_close(logits(model, expected["input_ids"]), expected["logits"], atol=1e-5, rtol=0)
    assert_bidirectional(model, expected["input_ids"])
    assert_left_padding_ok(model, expected["input_ids"][0, :25], expected["input_ids"][1], pad_id=381)


@needs_fixture
def test_float32_head_gives_float32_logits_on_a_bf16_base():
    """spg_min.load_model's float32_head: a bf16 base (--load-in-4bit false) scores completions from float32 logits
    (spg_spec.md (h)11); without it the head runs in bf16."""
    ids = torch.load(FIXTURES / "llada_tiny_expected.pt")["input_ids"][:, :16]
    attn = torch.ones_like(ids)
    model = M.load_llada(LLADA_TINY, dtype=torch.bfloat16)
    _, head = M.decoder_and_head(model)
    assert head(S.hidden_states(model, ids, attn)).dtype == torch.bfloat16
    M.float32_head(model)
    h = S.hidden_states(model, ids, attn)
    assert h.dtype == head.weight.dtype == head(h).dtype == torch.float32
    assert M.decoder_and_head(model)[0].layers[0].mlp.up_proj.weight.dtype == torch.bfloat16   # the body stays bf16


def test_float32_head_of_a_tied_model_copies_the_head():
    """A LLaDA config with weight_tying shares head and embedding: the head gets a float32 copy, the embedding
    stays bf16 (casting the shared tensor broke the embedding lookup's dtype)."""
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    decoder, head = M.decoder_and_head(model)
    assert head.weight is decoder.embed_tokens.weight
    M.float32_head(model)
    ids = torch.arange(6)[None]
    h = S.hidden_states(model, ids, torch.ones_like(ids))
    assert decoder.embed_tokens.weight.dtype == torch.bfloat16 and head(h).dtype == torch.float32
    torch.testing.assert_close(head.weight, decoder.embed_tokens.weight.float())
    model.tie_weights()                                   # as from_pretrained / peft may call it later
    assert M.decoder_and_head(model)[1].weight.dtype == torch.float32


def write_llada_checkpoint(llama, folder):
    """Save a LlamaForCausalLM under LLaDA's weight names and config fields (the inverse of load_llada)."""
    block = {"input_layernorm": "attn_norm", "self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj",
             "self_attn.v_proj": "v_proj", "self_attn.o_proj": "attn_out", "post_attention_layernorm": "ff_norm",
             "mlp.gate_proj": "ff_proj", "mlp.up_proj": "up_proj", "mlp.down_proj": "ff_out"}
    top = {"model.embed_tokens": "wte", "model.norm": "ln_f", "lm_head": "ff_out"}
    state = {}
    for name, tensor in llama.state_dict().items():
        layer = re.match(r"model\.layers\.(\d+)\.(.+)\.weight", name)
        new = (f"blocks.{layer[1]}.{block[layer[2]]}" if layer else top[name.removesuffix(".weight")])
        state[f"model.transformer.{new}.weight"] = tensor.contiguous()
    folder.mkdir()
    save_file(state, folder / "model.safetensors")
    c = llama.config
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llada", "d_model": c.hidden_size, "n_heads": c.num_attention_heads,
        "n_kv_heads": c.num_key_value_heads, "n_layers": c.num_hidden_layers, "mlp_hidden_size": c.intermediate_size,
        "embedding_size": c.vocab_size, "vocab_size": c.vocab_size, "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_parameters["rope_theta"], "max_sequence_length": c.max_position_embeddings,
        "mask_token_id": 107, "eos_token_id": 106}))


def test_llada_roundtrip_and_4bit_close_to_fp32(tmp_path):
    """A tiny_model written in LLaDA's format loads back exactly; in 4-bit it equals the fp32 model with NF4
    round-tripped weights. Dims are multiples of 64: bnb's CPU NF4 kernel is only accurate there."""
    import bitsandbytes as bnb
    tiny = M.tiny_model(108).eval()
    write_llada_checkpoint(tiny, tmp_path / "ckpt")
    ids = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    reference = logits(tiny, ids)
    fp32 = M.load_llada(tmp_path / "ckpt", dtype=torch.float32)
    torch.testing.assert_close(logits(fp32, ids), reference, atol=1e-5, rtol=0)
    q4 = M.load_llada(tmp_path / "ckpt", load_in_4bit=True, dtype=torch.float32)
    assert q4.is_loaded_in_4bit
    assert_bidirectional(q4, ids)
    diff = (logits(q4, ids) - reference).abs()
    assert diff.max() < 0.25 and diff.mean() < 0.05  # measured: max 0.164, mean 0.036 (logit std 0.23)
    for name, linear in tiny.named_modules():  # the error is NF4 rounding alone: emulate it in fp32
        if isinstance(linear, torch.nn.Linear) and name != "lm_head":
            packed, state = bnb.functional.quantize_4bit(linear.weight.data, quant_type="nf4",
                                                         compress_statistics=True)
            linear.weight.data = bnb.functional.dequantize_4bit(packed, state)
    torch.testing.assert_close(logits(q4, ids), logits(tiny, ids), atol=1e-5, rtol=0)


@needs_fixture
@pytest.mark.filterwarnings("ignore:bitsandbytes 0.50")  # fixture d_model 96: see load_llada; CUDA unaffected
def test_an_spg_update_trains_lora_on_the_4bit_base(monkeypatch):
    """B27 through the loss pass itself (sequence_bounds calls the decoder and the head directly, under gradient
    checkpointing): one SPG step with A = [+1, -1] moves every LoRA B and no base weight. The same step with the
    logits in chunks of 5 rows (TargetLogprob under its checkpoint, as at LLaDA's vocabulary) gives the same
    gradients as the direct path."""
    ids = torch.load(FIXTURES / "llada_tiny_expected.pt")["input_ids"][:2]                # [2, 40]
    mask_id = M.special_ids(M.load_tokenizer(LLADA_TINY))["mask"]
    model = M.add_lora(M.load_llada(LLADA_TINY, load_in_4bit=True, dtype=torch.float32), gradient_checkpointing=True)
    before = base_snapshot(model)
    c = torch.ones(2, 16, dtype=torch.bool)                                              # the last 16: completion
    masked, t = S.block_forward_process(c, 24, m=2, block_length=8, p_mask_prompt=0.15,
                                        generator=torch.Generator().manual_seed(0))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]

    def lora_grads():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)                                                             # the same LoRA dropout
        elbo_b, eubo_b = S.sequence_bounds(model, ids, torch.ones_like(ids), c, masked, t, beta=1.5, mask_id=mask_id)
        S.spg_loss(torch.tensor([1.0, -1.0]), elbo_b, eubo_b, num_tokens=c.sum())[0].backward()
        return [p.grad.clone() for p in trainable]
    direct = lora_grads()
    monkeypatch.setattr(S, "LOGP_CHUNK_BYTES", 5 * 384 * 4)                              # 5 rows of V = 384
    chunked = lora_grads()
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(direct, chunked))
    torch.optim.AdamW(trainable, lr=1e-3).step()
    assert_lora_trained(model, before)


@needs_fixture
@pytest.mark.filterwarnings("ignore:bitsandbytes 0.50")  # fixture d_model 96: see load_llada; CUDA unaffected
def test_fixture_4bit_lora_trains_saves_and_reloads(tmp_path):
    import bitsandbytes as bnb
    from peft import PeftModel
    expected = torch.load(FIXTURES / "llada_tiny_expected.pt")
    ids = expected["input_ids"]
    base = M.load_llada(LLADA_TINY, load_in_4bit=True, dtype=torch.float32)
    n_4bit = sum(isinstance(m, bnb.nn.Linear4bit) for m in base.modules())
    assert n_4bit == 3 * 7                                                     # every decoder linear
    assert type(base.lm_head) is torch.nn.Linear and base.lm_head.weight.dtype == torch.float32
    assert base.model.embed_tokens.weight.dtype == torch.float32
    assert_bidirectional(base, ids)
    base_logits = logits(base, ids)

    model = M.add_lora(base, gradient_checkpointing=True)
    adapted = [n for n, m in model.named_modules() if n.endswith("lora_A")]
    assert len(adapted) == 3 * len(M.LORA_TARGETS_PAPER)
    paper = {f"model.layers.{i}.{m}" for i in range(3) for m in ("self_attn.q_proj", "self_attn.k_proj",
                                                                  "self_attn.v_proj", "mlp.up_proj")}   # spg_spec (h)9
    assert {n.removeprefix("base_model.model.").removesuffix(".lora_A") for n in adapted} == paper
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (128, 64, 0.05)   # the paper's (train.yaml)
    before = base_snapshot(model)
    train_one_step(model, ids, mask_id=M.special_ids(M.load_tokenizer(LLADA_TINY))["mask"])
    assert_lora_trained(model, before)
    trained = logits(model, ids)

    model.save_pretrained(tmp_path / "adapter")
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as f:
        assert len([k for k in f.keys() if "lora_" in k]) == 2 * len(adapted)   # B28: A and B per module
    fresh = M.load_llada(LLADA_TINY, load_in_4bit=True, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    assert (logits(reloaded, ids) - trained).abs().max() < 1e-5
    assert (trained - base_logits).abs().max() > 1e-4                        # and the adapter is not a no-op
