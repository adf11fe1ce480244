"""Tiny random HF models and a GGUF writer for them (llama.cpp conventions), for tests.

`write_tiny_hf_model` makes an HF folder (config, safetensors, tokenizer.json,
tokenizer_config.json with a chat template); `hf_folder_to_gguf` writes it as a
GGUF the way llama.cpp's converter would (Q/K rows permuted for llama, rope scaling
as keys or, for Llama 3, as the rope_freqs tensor), in F32, Q8_0 or a K-quant mix.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import gguf
from gguf.quants import quantize
from safetensors.numpy import load_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Mistral-style: BOS comes from the template itself, [INST] blocks, raise_exception on bad roles.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>"]
TRAIN_TEXT = [
    "The capital of France is Paris. The quick brown fox jumps over the lazy dog.",
    "Numbers like 12345 and 3.14159 appear in text; so does 2024-06-01.",
    "Ünïcödé wörds, naïve café, 日本語のテキスト, 中文文本, emoji 🙂🚀👍🏽 and more!",
    "def hello(name):\n    return f'Hello, {name}!'\n\n",
    "I'm sure you've seen it. They'll say we'd done it, isn't it?",
] * 3

QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

ARCH_GGUF = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
ARCH_PRE = {"llama": "smollm", "mistral": "smollm", "qwen2": "qwen2", "qwen3": "qwen2", "gemma3": "qwen2"}


def _tiny_tokenizer(arch: str) -> Tokenizer:
    """Train a small byte-level BPE whose pre-tokenizer matches the arch's real one."""
    tk = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if ARCH_PRE[arch] == "smollm":
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tk.normalizer = normalizers.NFC()
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(TRAIN_TEXT, trainer)
    if arch.startswith("qwen"):
        tk.add_tokens([AddedToken("<tool_call>", special=False, normalized=False)])  # user-defined token
    if arch == "mistral":
        bos = tk.token_to_id("<s>")
        tk.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    else:
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
    return tk


def write_tiny_hf_model(folder, arch: str = "llama", seed: int = 0, **config) -> Path:
    """Write a tiny random HF model folder of ``arch`` (llama|mistral|qwen2|qwen3|gemma3); ``config``
    overrides the config's fields (sizes, max_position_embeddings, rope_parameters, ...)."""
    import torch
    import transformers as tf

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tk = _tiny_tokenizer(arch)
    common = dict(vocab_size=tk.get_vocab_size(), hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
                  bos_token_id=tk.token_to_id("<s>" if arch == "mistral" else "<|im_start|>"),
                  eos_token_id=tk.token_to_id("</s>" if arch == "mistral" else "<|im_end|>"))
    own = {"llama": dict(tie_word_embeddings=False), "mistral": dict(tie_word_embeddings=False, sliding_window=None),
           "qwen2": dict(tie_word_embeddings=True), "qwen3": dict(head_dim=32, tie_word_embeddings=False),
           # three local layers (window 16) and a global one, like Gemma 3's 5:1 in miniature
           "gemma3": dict(head_dim=16, query_pre_attn_scalar=16, num_hidden_layers=4, sliding_window=16,
                          layer_types=["sliding_attention"] * 3 + ["full_attention"], tie_word_embeddings=True)}[arch]
    config_class = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config,
                    "qwen3": tf.Qwen3Config, "gemma3": tf.Gemma3TextConfig}[arch]
    cfg = config_class(**{**common, **own, **config})
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # random norms/biases too, so a misplaced tensor shows up
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.05 + (1.0 if "norm" in name else 0.0))
    model.save_pretrained(folder)
    tk.save(str(folder / "tokenizer.json"))
    mistral = arch == "mistral"
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>" if mistral else "<|im_start|>",
        "eos_token": "</s>" if mistral else "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "add_bos_token": mistral,
        "clean_up_tokenization_spaces": False,
        "chat_template": MISTRAL_TEMPLATE if mistral else CHATML_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    return folder


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf Q/K row permutation (rotary halves -> pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_tensor_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}.{_TO_GGUF[rest]}"


def _tokenizer_metadata(folder: Path):
    """Token list (by id), llama.cpp token types and 'a b' merges from tokenizer.json."""
    tj = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    by_id = {i: t for t, i in tj["model"]["vocab"].items()}
    types = {i: 1 for i in by_id}
    for a in tj["added_tokens"]:
        by_id[a["id"]] = a["content"]
        types[a["id"]] = 3 if a["special"] else 4
    n = max(by_id) + 1
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    return tokens, [types.get(i, 5) for i in range(n)], merges


# A K-quant mix like llama.cpp's Q4_K_M/Q5_K_M: GGUF weight -> type, or one type per layer (by layer % 3).
K_MIX = {
    "token_embd.weight": "Q4_K", "output.weight": "Q6_K",
    "attn_q.weight": "Q4_K", "attn_k.weight": "Q5_K", "attn_output.weight": "Q4_K",
    "ffn_gate.weight": "Q4_K", "ffn_up.weight": "Q4_K",
    "attn_v.weight": ("Q4_K", "Q5_K", "Q6_K"), "ffn_down.weight": ("Q4_K", "Q5_K", "Q6_K"),
}
# llama.cpp's fallback (llama-quant.cpp) for a tensor whose rows are not whole 256-value K blocks
K_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def k_mix_type(gguf_name: str, row: int) -> gguf.GGMLQuantizationType:
    """The K_MIX type of a 2-D weight whose rows hold `row` values (after llama.cpp's fallback)."""
    parts = gguf_name.split(".")
    kind = ".".join(parts[2:]) if parts[0] == "blk" else gguf_name
    name = K_MIX[kind] if isinstance(K_MIX[kind], str) else K_MIX[kind][int(parts[1]) % 3]
    if row % gguf.QK_K:
        name = K_FALLBACK[name]
    return gguf.GGMLQuantizationType[name]


def random_blocks(qtype: gguf.GGMLQuantizationType, shape: tuple[int, int], rng: np.random.Generator,
                  byte_cap: int = 0x3C) -> np.ndarray:
    """Random raw blocks [rows, bytes] of `qtype` for a [rows, cols] tensor. Every byte is below
    `byte_cap`, so each fp16 scale inside a block (high byte < 0x3C) is finite and below 1."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return rng.integers(0, byte_cap, size=(shape[0], shape[1] // block * size), dtype=np.uint8)


def llama3_rope_freqs(rope: dict, head_dim: int) -> np.ndarray:
    """The rope_freqs tensor [head_dim/2] llama.cpp's converter writes for Llama 3 rope scaling:
    per pair the divisor of its frequency (1, `factor`, or the ramp between), from float32 frequencies."""
    base = rope.get("rope_theta", 10000.0)
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _add_rope_scaling(w: gguf.GGUFWriter, cfg: dict, head_dim: int) -> None:
    """Rope scaling as llama.cpp's convert_hf_to_gguf writes it: linear and yarn as keys, Llama 3
    as the rope_freqs tensor with no keys at all."""
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    elif kind == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        for hf_key, add in (("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
                            ("attention_factor", w.add_rope_scaling_yarn_attn_factor),
                            ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                            ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
            if rope.get(hf_key) is not None:
                add(rope[hf_key])
    elif kind == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_freqs({"rope_theta": cfg.get("rope_theta", 10000.0), **rope},
                                                            head_dim))


def hf_folder_to_gguf(folder, gguf_path, qtype: str = "F32", arch: str | None = None, seed: int = 0) -> Path:
    """Write an HF folder from `write_tiny_hf_model` as a GGUF.

    qtype: F32; Q8_0 (2-D weights whose rows allow it); or K_MIX, where each 2-D weight takes
    its `k_mix_type`: fallback types hold the quantized weight, K-quant types (which the gguf
    package cannot quantize) hold `random_blocks` drawn from `seed` instead of the HF weight."""
    folder, gguf_path = Path(folder), Path(gguf_path)
    cfg = json.loads((folder / "config.json").read_text())
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    g_arch = arch or ARCH_GGUF[cfg["model_type"]]
    w = gguf.GGUFWriter(str(gguf_path), g_arch)
    n_head, n_kv, hidden = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or hidden // n_head
    w.add_name(folder.name)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(cfg.get("rope_theta") or cfg.get("rope_parameters", {}).get("rope_theta", 10000.0))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_rope_dimension_count(head_dim)
    if head_dim != hidden // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    tokens, types, merges = _tokenizer_metadata(folder)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(ARCH_PRE.get(cfg["model_type"], "gpt-2"))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index(tok_cfg["bos_token"]))
    w.add_eos_token_id(tokens.index(tok_cfg["eos_token"]))
    w.add_add_bos_token(bool(tok_cfg.get("add_bos_token")))
    w.add_chat_template(tok_cfg["chat_template"])
    _add_rope_scaling(w, cfg, head_dim)

    rng = np.random.default_rng(seed)
    for name, t in load_file(str(folder / "model.safetensors")).items():
        t, g_name = t.astype(np.float32), gguf_tensor_name(name)
        if g_arch == "llama" and name.endswith("q_proj.weight"):
            t = _permute(t, n_head)
        elif g_arch == "llama" and name.endswith("k_proj.weight"):
            t = _permute(t, n_kv)
        if qtype == "Q8_0" and t.ndim == 2 and t.shape[-1] % 32 == 0:
            q = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(g_name, quantize(t, q), raw_dtype=q)
        elif qtype == "K_MIX" and t.ndim == 2:
            q = k_mix_type(g_name, t.shape[-1])
            data = random_blocks(q, t.shape, rng, byte_cap=0x14) if q.name.endswith("_K") else quantize(t, q)
            w.add_tensor(g_name, data, raw_dtype=q)
        else:
            w.add_tensor(g_name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return gguf_path


# ------------------------------------------- Gemma 2, Gemma 3, Phi-3 (see kvrt/models/gguf_archs.py)

# name -> (transformers config class, GGUF architecture, tokenizer kind written into the GGUF)
TINY_ARCHS = {
    "gemma2": ("Gemma2Config", "gemma2", "spm-gemma"),
    "gemma3": ("Gemma3TextConfig", "gemma3", "spm-gemma"),
    "phi3": ("Phi3Config", "phi3", "gpt-4o"),  # Phi-4-mini-like: byte-level BPE, partial rotary, LongRoPE, tied
    "phi3-split": ("Phi3Config", "phi3", "spm-phi3"),  # Phi-3-mini-like, written with separate q/k/v, gate/up
}
O200K_REGEX = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
_GEMMA_USER = ["\n", "\n\n", "  ", "   "]  # llama.cpp stores Gemma's whitespace pieces as user-defined tokens
_PHI3_ADDED = ["<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>"]


def tiny_spm_vocab(kind: str) -> dict:
    """A small SentencePiece-BPE vocab the way llama.cpp's converter stores one (tokens by id, scores,
    types: 1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte), for kind spm-gemma (no prefix
    space, Gemma's specials and whitespace pieces) or spm-phi3 (prefix space, Phi-3's added tokens at the end)."""
    gemma = kind == "spm-gemma"
    tk = Tokenizer(models.BPE())
    tk.normalizer = normalizers.Replace(" ", "▁")
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never" if gemma else "always")
    tk.train_from_iterator(TRAIN_TEXT, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    pieces = [t for t, _ in sorted(tk.get_vocab().items(), key=lambda kv: kv[1])]  # alphabet, then merges in order
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    if gemma:
        head = [(t, 3) for t in _GEMMA_SPECIALS] + [(t, 4) for t in _GEMMA_USER]
        tail = []
    else:
        head, tail = [("<unk>", 2), ("<s>", 3), ("</s>", 3)], [(t, 3) for t in _PHI3_ADDED]
    taken = {t for t, _ in head + tail} | set(byte_tokens)  # a piece the trainer also learned ("\n") stays user-defined
    entries = head + [(t, 6) for t in byte_tokens] + [(p, 1) for p in pieces if p not in taken] + tail
    tokens = [t for t, _ in entries]
    scores = [-float(i) if ty == 1 else (0.0 if ty == 6 else -1000.0) for i, (_, ty) in enumerate(entries)]
    ids = {t: i for i, t in enumerate(tokens)}
    special = ("<bos>", "<eos>", "<unk>", "<pad>") if gemma else ("<s>", "<|endoftext|>", "<unk>", "<|endoftext|>")
    return {"model": "llama", "pre": "default", "tokens": tokens, "scores": scores, "types": [ty for _, ty in entries],
            "add_space_prefix": not gemma, "add_bos": True,
            **{k: ids[t] for k, t in zip(("bos", "eos", "unk", "pad"), special)}}


def tiny_o200k_tokenizer() -> Tokenizer:
    """A small byte-level BPE split the way Phi-4-mini's (GPT-4o's o200k) tokenizer.json splits."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(O200K_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<|endoftext|>", "<|user|>", "<|end|>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(TRAIN_TEXT, trainer)
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    return tk


def write_tiny_arch_model(folder, arch: str, seed: int = 0, **config) -> Path:
    """A tiny random HF folder of a TINY_ARCHS model: config + weights, plus `gguf_vocab.json`, the
    tokenizer metadata `arch_folder_to_gguf` writes (and, for byte-level BPE, its `tokenizer.json`).

    gemma3: 7 layers (sliding but each 6th), head_dim != hidden/heads, an 8-token window, linear rope
    scaling on the global layers (as Gemma 3 4B+ has), local rope base 10000 (llama.cpp's);
    gemma2: soft-capping small enough to bite; phi3: partial rotary 0.75, LongRoPE past 64 tokens, tied;
    phi3-split: untied, no LongRoPE, a sliding window. ``config`` overrides config fields."""
    import torch
    import transformers as tf

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    class_name, _, tok_kind = TINY_ARCHS[arch]
    if tok_kind == "gpt-4o":
        tk = tiny_o200k_tokenizer()
        tk.save(str(folder / "tokenizer.json"))
        tokens, types, merges = _tokenizer_metadata(folder)
        ids = {t: i for i, t in enumerate(tokens)}
        vocab = {"model": "gpt2", "pre": "gpt-4o", "tokens": tokens, "types": types, "merges": merges,
                 "add_bos": False, "bos": ids["<|endoftext|>"], "eos": ids["<|end|>"], "pad": ids["<|endoftext|>"]}
    else:
        vocab = tiny_spm_vocab(tok_kind)
    (folder / "gguf_vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    rng = np.random.default_rng(seed + 1)
    common = dict(vocab_size=len(vocab["tokens"]), hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
                  bos_token_id=vocab["bos"], eos_token_id=vocab["eos"], pad_token_id=vocab["pad"])
    gemma_rope = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                  "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}
    longrope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                "long_factor": np.round(rng.uniform(1, 4, 6), 3).tolist(),
                "short_factor": np.round(rng.uniform(1, 1.5, 6), 3).tolist()}
    own = {
        "gemma2": dict(num_hidden_layers=3, head_dim=32, query_pre_attn_scalar=32, sliding_window=8,
                       attn_logit_softcapping=2.0, final_logit_softcapping=1.5, tie_word_embeddings=True,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        "gemma3": dict(num_hidden_layers=7, head_dim=32, query_pre_attn_scalar=32, sliding_window=8,
                       rope_parameters=gemma_rope, tie_word_embeddings=True),
        "phi3": dict(num_hidden_layers=2, rope_parameters=longrope, original_max_position_embeddings=64,
                     tie_word_embeddings=True, sliding_window=None),
        "phi3-split": dict(num_hidden_layers=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                           original_max_position_embeddings=256, tie_word_embeddings=False, sliding_window=16),
    }[arch]
    cfg = getattr(tf, class_name)(**{**common, **own, **config})
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # random norms too, so a misplaced or unshifted one shows up
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "norm" in name else 0.05)
                    + (1.0 if "norm" in name and arch.startswith("phi3") else 0.0))
    model.save_pretrained(folder)
    return folder


_GEMMA_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight", "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
}
_PHI3_TO_GGUF = {"self_attn.qkv_proj.weight": "attn_qkv.weight", "mlp.gate_up_proj.weight": "ffn_up.weight"}


def arch_folder_to_gguf(folder, gguf_path, qtype: str = "F32", leave_out: tuple = ()) -> Path:
    """Write a `write_tiny_arch_model` folder as a GGUF the way llama.cpp's converter would: +1 on every
    Gemma norm, no Q/K permutation, Gemma 3's rope base of the global layers, Phi-3's fused qkv and
    gate_up (the phi3-split variant writes them separately, as llama.cpp also reads them), LongRoPE as
    rope_factors tensors plus attn_factor and the original context length. qtype: F32 or Q8_0;
    leave_out: GGUF tensor names not to write (a broken file)."""
    folder, gguf_path = Path(folder), Path(gguf_path)
    cfg = json.loads((folder / "config.json").read_text())
    vocab = json.loads((folder / "gguf_vocab.json").read_text())
    split = cfg["model_type"] == "phi3" and vocab["model"] == "llama"
    g_arch = {"gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3"}[cfg["model_type"]]
    w = gguf.GGUFWriter(str(gguf_path), g_arch)
    n_head, n_kv, hidden = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or hidden // n_head
    rope = cfg.get("rope_parameters") or {}
    rope = rope.get("full_attention", rope)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(rope["rope_theta"])
    if g_arch.startswith("gemma"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_sliding_window(cfg["sliding_window"])
        if g_arch == "gemma2":
            w.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
            w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
        elif rope.get("rope_type") == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(rope["factor"])
    else:
        rope_dim = int(head_dim * rope.get("partial_rotary_factor", 1.0))
        w.add_rope_dimension_count(rope_dim)
        w.add_rope_scaling_orig_ctx_len(cfg["original_max_position_embeddings"])
        w.add_sliding_window(cfg.get("sliding_window") or 0)
        if rope.get("long_factor"):
            original = cfg["original_max_position_embeddings"]
            scale = cfg["max_position_embeddings"] / original
            w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)))
            for kind in ("long", "short"):
                if f"rope_factors_{kind}.weight" not in leave_out:
                    w.add_tensor(f"rope_factors_{kind}.weight", np.array(rope[f"{kind}_factor"], dtype=np.float32))
    w.add_tokenizer_model(vocab["model"])
    w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    if "scores" in vocab:
        w.add_token_scores(vocab["scores"])
    if "merges" in vocab:
        w.add_token_merges(vocab["merges"])
    if vocab["model"] == "llama" and not vocab["add_space_prefix"]:
        w.add_add_space_prefix(False)
    w.add_bos_token_id(vocab["bos"])
    w.add_eos_token_id(vocab["eos"])
    w.add_pad_token_id(vocab["pad"])
    if "unk" in vocab:
        w.add_unk_token_id(vocab["unk"])
    w.add_add_bos_token(vocab["add_bos"])

    def add(name, t):
        if name in leave_out:
            return
        if qtype == "Q8_0" and t.ndim == 2 and t.shape[-1] % 32 == 0:
            q = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(name, quantize(t, q), raw_dtype=q)
        else:
            w.add_tensor(name, t)

    ff, q_rows, kv_rows = cfg["intermediate_size"], n_head * head_dim, n_kv * head_dim
    for name, t in load_file(str(folder / "model.safetensors")).items():
        t = t.astype(np.float32)
        if name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue
        if g_arch.startswith("gemma") and name.endswith("norm.weight"):
            t = t + np.float32(1.0)  # llama.cpp stores Gemma's 1 + w
        top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}
        if name in top:
            add(top[name], t)
            continue
        _, _, layer, rest = name.split(".", 3)
        if split and rest == "self_attn.qkv_proj.weight":
            for part, rows in zip("qkv", np.split(t, [q_rows, q_rows + kv_rows])):
                add(f"blk.{layer}.attn_{part}.weight", rows)
        elif split and rest == "mlp.gate_up_proj.weight":
            add(f"blk.{layer}.ffn_gate.weight", t[:ff])
            add(f"blk.{layer}.ffn_up.weight", t[ff:])
        else:
            g_rest = {**_TO_GGUF, **(_GEMMA_TO_GGUF if g_arch.startswith("gemma") else _PHI3_TO_GGUF)}[rest]
            add(f"blk.{layer}.{g_rest}", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return gguf_path
