"""Models and tokenizers for spg-min: LLaDA-8B-Instruct as a plain bidirectional Llama, or a tiny one for CPU.

LLaDA's weights are exactly a Llama decoder's under OLMo-style names, so we load them into transformers' own
LlamaForCausalLM (no trust_remote_code) with `config.is_causal = False`, set BEFORE the model is built; a flag
passed to from_pretrained as a keyword is dropped silently. With is_causal=False transformers builds a
bidirectional mask that still honours the 2-D padding mask, so left-padded batches work when position ids come
from the mask: position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0).
Unlike LLaDA's own modeling file, which ignores attention_mask (spg_spec.md (h)10), this model honours it.

Shapes: B batch, L sequence length, V vocabulary, H hidden size.
"""
import functools
import json
import sys
import warnings
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

MASK_ID = 126336  # LLaDA <|mdm_mask|> (ML-GSAI/LLaDA generate.py, mask_id default)
EOS_ID = 126081   # LLaDA <|endoftext|>, also its pad token (generate.py:92)
EOT_ID = 126348   # LLaDA <|eot_id|>, ends an assistant turn (generate.py:98)
LLADA_HUB_ID = "GSAI-ML/LLaDA-8B-Instruct"
# Hub commit of LLaDA-8B-Instruct: the snapshot sha seen in many public scripts' HF-cache paths
# (".../models--GSAI-ML--LLaDA-8B-Instruct/snapshots/08b83a6..."); not checked against the hub from here.
LLADA_REVISION = "08b83a6feb34df1a6011b80c3c00c7563e963b07"
# LLaDA blocks name their linears q/k/v_proj, attn_out, ff_proj, up_proj, ff_out; of SPG's target list only
# q/k/v/up_proj exist there, so those are what the paper's runs adapted (spg_spec.md (h)9).
LORA_TARGETS_PAPER = ("q_proj", "k_proj", "v_proj", "up_proj")
NF4_BLOCKSIZE = 64  # bitsandbytes' default 4-bit block size

MASK, EOS, EOT, BOS = "<|mdm_mask|>", "<|endoftext|>", "<|eot_id|>", "<|startoftext|>"
HEADERS = ("<|start_header_id|>", "<|end_header_id|>")
TAGS = ("<reasoning>", "</reasoning>", "<answer>", "</answer>")  # single NON-special tokens: decode keeps them
CHARS = [chr(i) for i in range(32, 127)] + ["\n", "\t"]          # printable ASCII + newline + tab
# LLaDA's template shape: bos, then per turn header + trimmed content + <|eot_id|>; system turns are dropped here.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages if m['role'] != 'system' %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

# LLaDA (OLMo) weight names -> Llama names, as regexes for from_pretrained(key_mapping=...).
# The block-level ff_out is the SwiGLU down projection; the top-level ff_out is the LM head.
_BLOCK = r"^model\.transformer\.blocks\.(\d+)\."
LLADA_TO_LLAMA = {
    r"^model\.transformer\.wte\.": "model.embed_tokens.",
    r"^model\.transformer\.ln_f\.": "model.norm.",
    r"^model\.transformer\.ff_out\.": "lm_head.",
    **{_BLOCK + old + r"\.": r"model.layers.\1." + new + "." for old, new in [
        ("attn_norm", "input_layernorm"), ("q_proj", "self_attn.q_proj"), ("k_proj", "self_attn.k_proj"),
        ("v_proj", "self_attn.v_proj"), ("attn_out", "self_attn.o_proj"), ("ff_norm", "post_attention_layernorm"),
        ("ff_proj", "mlp.gate_proj"), ("up_proj", "mlp.up_proj"), ("ff_out", "mlp.down_proj")]},
}


@functools.lru_cache
def _tiny_backend_json(mask_id, eos_id, vocab_size):
    """Serialised character-level `tokenizers` backend; cached, and each caller gets its own fresh copy."""
    specials = [MASK, EOS, EOT, BOS, *HEADERS, "<unk>"]
    fixed = {t: i for t, i in [(MASK, mask_id), (EOS, eos_id)] if i is not None}
    vocab_size = vocab_size or max([len(CHARS) + len(specials) + len(TAGS), *[i + 1 for i in fixed.values()]])
    free = [i for i in range(vocab_size - 1, -1, -1) if i not in fixed.values()]  # top of the vocab first
    vocab = {c: i for i, c in enumerate(CHARS)}
    vocab.update({t: fixed[t] if t in fixed else free.pop(0) for t in specials + list(TAGS)})
    assert len(set(vocab.values())) == len(vocab) and max(vocab.values()) < vocab_size, "ids collide or overflow"
    unused = sorted(set(range(vocab_size)) - set(vocab.values()))  # filler rows, never produced by encoding
    vocab.update({f"<|reserved_{i}|>": i for i in unused})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")  # one token per character
    tok.decoder = decoders.Fuse()                                            # join characters without spaces
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAGS])
    return tok.to_str()


def tiny_tokenizer(*, mask_id=None, eos_id=None, vocab_size=None):
    """Character-level tokenizer with LLaDA's special-token names and chat template, for the tiny model.

    Ids: characters 0..96; mask and eos where given; other specials and tags from the top of the vocabulary
    down; unused ids are `<|reserved_i|>`, so len(tokenizer) == vocab_size (108 by default).
    Literal special-token text inside content (e.g. "<|mdm_mask|>") encodes to that special id, exactly as
    LLaDA's real tokenizer does (field case B26); escape it before templating if that matters.
    """
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_backend_json(mask_id, eos_id, vocab_size)),
        bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token="<unk>", mask_token=MASK,
        extra_special_tokens=[EOT, *HEADERS], padding_side="left", chat_template=CHAT_TEMPLATE)


def load_tokenizer(name_or_path, *, revision=None):
    """LLaDA's tokenizer from the hub or a local dir; for a dir without tokenizer files (the test fixture) a
    tiny_tokenizer whose mask/eos ids and vocabulary size come from the dir's config.json."""
    path = Path(name_or_path)
    if path.is_dir() and not (path / "tokenizer.json").exists():
        cfg = json.loads((path / "config.json").read_text())
        return tiny_tokenizer(mask_id=cfg["mask_token_id"], eos_id=cfg["eos_token_id"], vocab_size=cfg["vocab_size"])
    revision = None if path.is_dir() else (revision or LLADA_REVISION)
    tok = PreTrainedTokenizerFast.from_pretrained(name_or_path, revision=revision)
    tok.padding_side = "left"
    tok.pad_token = tok.pad_token or EOS
    if tok.mask_token is None and MASK in tok.get_vocab():  # LLaDA's tokenizer_config names no mask token
        tok.mask_token = MASK                               # (its own code passes mask_id by hand)
    return tok


def special_ids(tokenizer):
    """{"mask", "eos", "eot", "pad"} ids. A completion stops at eos or eot."""
    ids = {name: tokenizer.convert_tokens_to_ids(t) for name, t in [("mask", MASK), ("eos", EOS), ("eot", EOT)]}
    ids["pad"] = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ids["eos"]
    assert None not in ids.values() and tokenizer.unk_token_id not in ids.values(), f"missing special token: {ids}"
    return ids


def tiny_model(vocab_size, *, hidden_size=128, num_layers=4, num_heads=4, intermediate_size=None, max_len=512,
               seed=0):
    """A small bidirectional Llama in float32, seeded without touching the global RNG.

    Defaults: 4 layers x (66k attention + 197k SwiGLU) + 2 x V x 128 embeddings/head = 1.08M params at V=108.
    """
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, max_position_embeddings=max_len,
        tie_word_embeddings=False, use_cache=False, bos_token_id=None, eos_token_id=None)
    config.is_causal = False  # must be set before the model is built
    with torch.random.fork_rng(devices=[]):  # weight init draws from the global RNG; restore it afterwards
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).float()


def llama_config_from_llada(cfg):
    """LLaDA's config.json (OLMo field names) -> an equivalent bidirectional LlamaConfig."""
    assert cfg.get("block_type", "llama") == "llama" and cfg.get("layer_norm_type", "rms") == "rms"
    assert cfg.get("rope", True) and not cfg.get("alibi") and not cfg.get("include_bias"), "not a Llama block"
    config = LlamaConfig(
        vocab_size=cfg.get("embedding_size") or cfg["vocab_size"],  # rows of wte/ff_out; >= vocab_size if padded
        hidden_size=cfg["d_model"], intermediate_size=cfg["mlp_hidden_size"], num_hidden_layers=cfg["n_layers"],
        num_attention_heads=cfg["n_heads"], num_key_value_heads=cfg.get("n_kv_heads") or cfg["n_heads"],
        rms_norm_eps=cfg["rms_norm_eps"], rope_parameters={"rope_type": "default", "rope_theta": cfg["rope_theta"]},
        max_position_embeddings=cfg["max_sequence_length"], tie_word_embeddings=cfg.get("weight_tying", False),
        use_cache=False, bos_token_id=None, eos_token_id=cfg["eos_token_id"], pad_token_id=cfg.get("pad_token_id"))
    config.mask_token_id = cfg["mask_token_id"]
    config.is_causal = False  # must be set before the model is built
    return config


def load_llada(name_or_path, *, load_in_4bit=False, dtype=None, revision=None):
    """LLaDA-format checkpoint (hub id or local dir) -> transformers' bidirectional LlamaForCausalLM.

    dtype defaults to bfloat16 on CUDA, float32 on CPU; with load_in_4bit the linear layers of the decoder
    become NF4 (double-quantised, computing in dtype) while embeddings and lm_head stay in dtype.
    """
    path = Path(name_or_path)
    if not path.is_dir():
        from huggingface_hub import snapshot_download
        path = Path(snapshot_download(name_or_path, revision=revision or LLADA_REVISION,
                                      allow_patterns=["*.json", "*.safetensors"]))
    config = llama_config_from_llada(json.loads((path / "config.json").read_text()))
    cuda = torch.cuda.is_available()
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=["lm_head"]) if load_in_4bit else None
    model, info = LlamaForCausalLM.from_pretrained(
        path, config=config, key_mapping=LLADA_TO_LLAMA, quantization_config=quant, dtype=dtype,
        device_map={"": "cuda"} if cuda else None, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"]), f"LLaDA -> Llama renaming incomplete: {info}"
    if load_in_4bit and not cuda:
        import bitsandbytes as bnb
        for m in model.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                # bnb's CPU inference fast path (AVX512-BF16) repacks weights in place and needs in_features
                # % 64 == 0; keep eval on the same kernel as training.
                m.support_avx512bf16_for_cpu = False
                if m.in_features % NF4_BLOCKSIZE:
                    warnings.warn(f"bitsandbytes 0.50's CPU NF4 kernel dequantises in_features={m.in_features} "
                                  f"(not a multiple of {NF4_BLOCKSIZE}) inaccurately; CUDA is unaffected")
    return model.eval()


def float32_head(model):
    """Final norm and LM head in float32, the rest as loaded: logits and log-probs are then float32 on a bf16 base
    too (bf16 logits are rounded to 1/8 at |logit| 16-32; spg_spec.md (h)11). RMSNorm's float32 weight times its
    bf16 output gives the head a float32 input. A 4-bit base gets this from peft's prepare_model_for_kbit_training."""
    decoder, head = decoder_and_head(model)
    decoder.norm.float()
    if head.weight is decoder.embed_tokens.weight:  # tied: the head gets its own float32 copy, the embedding stays
        head.weight = torch.nn.Parameter(head.weight.detach().float(), requires_grad=head.weight.requires_grad)
        model.config.tie_word_embeddings = False   # or a later tie_weights() ties it back to the bf16 embedding
    else:
        head.float()
    return model


def add_lora(model, *, r=128, alpha=64, dropout=0.05, targets=LORA_TARGETS_PAPER, gradient_checkpointing=False):
    """Wrap `model` with LoRA adapters (base frozen). targets: module names, or "all-linear" (all but lm_head).

    Defaults are the paper's r=128, alpha=64, dropout 0.05 (spg_spec.md checklist).
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training  # see is_peft: imported on use

    if getattr(model, "is_loaded_in_4bit", False):
        # Upcasts norms/embeddings to fp32 and freezes the base. Only for a quantized model (field case B27).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if gradient_checkpointing:
        # Non-reentrant checkpointing plus input grads, else LoRA B can receive no gradient (B27).
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    target_modules = targets if targets == "all-linear" else list(targets)
    lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                      task_type="CAUSAL_LM")
    with warnings.catch_warnings():   # peft calls transformers' deprecated is_gradient_checkpointing: not ours to fix
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        return get_peft_model(model, lora)


def is_peft(model) -> bool:
    """True for a peft-wrapped (LoRA) model. peft is imported only where LoRA is used, in add_lora: importing it
    loads bitsandbytes, which prints a warning about missing CPU kernels that a tiny CPU run has no use for."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def decoder_and_head(model):
    """(decoder, lm_head) of a plain or peft-wrapped model. decoder(input_ids=[B, L], attention_mask=[B, L],
    position_ids=[B, L]).last_hidden_state is [B, L, H] (LoRA layers included); lm_head maps H -> V, so the
    caller can project only the positions it scores instead of materialising [B, L, V]."""
    base = model.get_base_model() if is_peft(model) else model
    return base.model, base.lm_head
