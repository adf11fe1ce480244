"""Convert a GGUF file (llama.cpp's format) into an HF-format model folder.

The folder holds ``config.json``, ``model.safetensors``, ``tokenizer.json`` and
``tokenizer_config.json`` so that every backend (torch, mlx-lm, transformers)
can load it the same way. Weights are dequantized with the ``gguf`` package, every
tensor type it can dequantize; rope scaling (including Llama 3's ``rope_freqs`` tensor)
becomes HF's ``rope_scaling``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from kvrt.models import gguf_archs
from kvrt.errors import KvrtError
from kvrt.models.rope import llama3_scaled, yarn_attention_factor
from kvrt.models.progress import Progress, quiet

# GGUF architecture -> (HF architecture class, HF model_type)
SUPPORTED_ARCHS = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    **gguf_archs.ARCHS,  # gemma2, gemma3, phi3: their own facts live in kvrt/models/gguf_archs.py
}

# Per-layer GGUF tensor name suffix -> HF name suffix.
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def read_gguf(gguf_path: Path) -> GGUFReader:
    """Open a GGUF file, turning any parse failure into a one-line KvrtError."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise KvrtError(f"no such GGUF file: {gguf_path}")
    try:
        reader = GGUFReader(gguf_path)
    except Exception as e:  # GGUFReader raises ValueError/IndexError/etc. on bad bytes
        raise KvrtError(f"{gguf_path.name} is not a readable GGUF file ({_one_line(e)})") from None
    size = gguf_path.stat().st_size
    for t in reader.tensors:
        # numpy memmap silently returns short slices on truncated files; check explicitly.
        if t.data_offset + int(t.n_bytes) > size or t.data.nbytes != int(t.n_bytes):
            raise KvrtError(f"{gguf_path.name} is truncated: tensor {t.name} extends past end of file")
    return reader


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def field(reader: GGUFReader, key: str, default=None):
    """Return a metadata value (str/int/float/bool/list) or ``default``."""
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception as e:
        raise KvrtError(f"corrupt GGUF metadata field {key} ({_one_line(e)})") from None


def gguf_config(reader: GGUFReader, n_vocab: int) -> dict:
    """Build an HF ``config.json`` dict from GGUF metadata."""
    arch = field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise KvrtError(
            f"unsupported GGUF architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}"
        )
    hf_arch, model_type = SUPPORTED_ARCHS[arch]

    def need(key):
        v = field(reader, f"{arch}.{key}")
        if v is None:
            raise KvrtError(f"GGUF metadata lacks {arch}.{key}")
        return v

    hidden = int(need("embedding_length"))
    n_head = int(need("attention.head_count"))
    n_kv = int(field(reader, f"{arch}.attention.head_count_kv", n_head))
    # key_length is only written when head_dim != hidden / n_head (e.g. Qwen3).
    head_dim = int(field(reader, f"{arch}.attention.key_length", hidden // n_head))
    names = {t.name for t in reader.tensors}
    bos = field(reader, "tokenizer.ggml.bos_token_id")
    eos = field(reader, "tokenizer.ggml.eos_token_id")
    cfg = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "rms_norm_eps": float(field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(field(reader, f"{arch}.context_length", 4096)),
        "vocab_size": int(field(reader, f"{arch}.vocab_size", n_vocab)),
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
        "torch_dtype": "float16",  # what the non-norm weights are stored as (see _store_dtype)
    }
    if bos is not None:
        cfg["bos_token_id"] = int(bos)
    if eos is not None:
        cfg["eos_token_id"] = int(eos)
    if model_type == "qwen2":
        cfg["attention_bias"] = True  # Qwen2 always has q/k/v biases
    elif model_type == "llama":
        cfg["attention_bias"] = any(n.endswith("attn_q.bias") for n in names)
        cfg["mlp_bias"] = False
    scaling = _rope_scaling(reader, arch, cfg)
    if scaling:
        cfg["rope_scaling"] = scaling
    gguf_archs.arch_config(arch, cfg, lambda key, default=None: field(reader, key, default),
                           lambda name: _tensor_f64(reader, name))
    return cfg


# ------------------------------------------------------------------ rope scaling

_LLAMA3_DEFAULT_CONTEXT = 8192  # what llama.cpp's converter assumes when a config names none
_FACTOR_RTOL = 1e-5  # how closely a reconstructed llama3 config must reproduce rope_freqs


def _rope_scaling(reader: GGUFReader, arch: str, cfg: dict) -> dict | None:
    """HF's rope_scaling for the GGUF: from the ``rope_freqs`` tensor (Llama 3) or ``{arch}.rope.scaling.*``."""
    key = f"{arch}.rope.scaling"
    kind = field(reader, f"{key}.type") or "linear"  # llama.cpp reads an untyped factor as linear
    if kind not in ("none", "linear", "yarn"):
        raise KvrtError(f"unsupported GGUF rope scaling {kind!r}; supported: linear, yarn, llama3 (rope_freqs)")
    # an old file's factor is rope.scale_linear; llama.cpp takes 0 (or none) as no scaling
    factor = float(field(reader, f"{key}.factor") or field(reader, f"{arch}.rope.scale_linear") or 1.0)
    scaled = kind != "none" and factor != 1.0
    freqs = _rope_freqs(reader)
    if freqs is not None:
        if scaled:
            raise KvrtError(f"GGUF has both a rope_freqs tensor and {kind} rope scaling; "
                            "kvrt cannot carry both into one HF config")
        original = int(field(reader, f"{key}.original_context_length", _LLAMA3_DEFAULT_CONTEXT))
        return llama3_from_rope_freqs(freqs, cfg["head_dim"], cfg["rope_theta"], original)
    if not scaled:
        return None
    attn_factor = float(field(reader, f"{key}.attn_factor", 1.0))  # llama.cpp multiplies cos/sin by it
    if kind == "yarn":
        return _yarn_scaling(reader, key, factor, attn_factor, cfg)
    if attn_factor != 1.0:
        raise KvrtError(f"GGUF linear rope scaling with attn_factor {attn_factor} has no HF rope_scaling equivalent")
    return {"rope_type": "linear", "type": "linear", "factor": factor}


def _yarn_scaling(reader: GGUFReader, key: str, factor: float, attn_factor: float, cfg: dict) -> dict:
    """HF's yarn rope_scaling from the GGUF yarn keys: the inverse of llama.cpp's convert_hf_to_gguf mapping."""
    ext = float(field(reader, f"{key}.yarn_ext_factor", 1.0))
    if ext != 1.0:
        # ggml mixes the YaRN ramp by ext_factor; HF's (and mlx-lm's) YaRN always uses the whole ramp
        raise KvrtError(f"GGUF yarn_ext_factor {ext} has no HF rope_scaling equivalent (only 1.0 does)")
    out = {"rope_type": "yarn", "type": "yarn", "factor": factor,
           # llama.cpp falls back to the training context when the original length is not given
           "original_max_position_embeddings": int(field(reader, f"{key}.original_context_length",
                                                         cfg["max_position_embeddings"]))}
    for gguf_key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"),
                             ("yarn_attn_factor", "attention_factor")):  # llama.cpp writes HF's attention_factor there
        value = field(reader, f"{key}.{gguf_key}")
        if value is not None:
            out[hf_key] = float(value)
    log_mul = field(reader, f"{key}.yarn_log_multiplier")
    if log_mul:
        # llama.cpp reads it as HF's mscale_all_dim and assumes mscale 1
        out["mscale"], out["mscale_all_dim"] = 1.0, float(log_mul)
    if attn_factor != 1.0:
        # rope.scaling.attn_factor multiplies llama.cpp's YaRN scale: fold it into HF's attention_factor
        out["attention_factor"] = yarn_attention_factor(out, cfg["max_position_embeddings"]) * attn_factor
    return out


def _rope_freqs(reader: GGUFReader) -> np.ndarray | None:
    """The ``rope_freqs.weight`` tensor (llama.cpp's per-pair frequency divisors) as float64, or None."""
    return _tensor_f64(reader, "rope_freqs.weight")


def _tensor_f64(reader: GGUFReader, name: str) -> np.ndarray | None:
    """The tensor `name`, flattened to float64, or None when the file has none."""
    for t in reader.tensors:
        if t.name == name:
            return np.asarray(_dequantized(t), dtype=np.float64).reshape(-1)
    return None


def llama3_from_rope_freqs(factors: np.ndarray, head_dim: int, rope_theta: float, original: int) -> dict | None:
    """HF's llama3 rope_scaling that reproduces llama.cpp's ``rope_freqs`` divisors [head_dim/2].

    llama.cpp's converter writes, per rotary pair with x = original / wavelength, 1 where
    x > high_freq_factor, `factor` where x < low_freq_factor, and 1/((1-s)/factor + s) on the
    ramp s = (x - low)/(high - low); it divides each pair's frequency by it. Only the ratios are
    identifiable, so `original` is fixed (the GGUF's original context length, else 8192) and
    factor, low and high are solved for; the result is checked against the tensor, and a tensor
    no llama3 config reproduces is one error."""
    if factors.shape != (head_dim // 2,) or not np.all(np.isfinite(factors)) or factors.min() <= 0:
        raise KvrtError(f"GGUF rope_freqs has {factors.size} values, expected {head_dim // 2} finite positive ones")
    if np.allclose(factors, 1.0, rtol=0, atol=_FACTOR_RTOL):
        return None  # no scaling at all
    if factors.min() < 1 - _FACTOR_RTOL:
        # llama3 only ever slows pairs down; anything else is some other scheme
        raise KvrtError(f"GGUF rope_freqs has a factor below 1 ({factors.min():.4g}); "
                        "it is not a Llama 3 rope scaling kvrt can reproduce")
    inv_freq = 1.0 / (rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    x = original * inv_freq / (2 * math.pi)
    factor = float(factors.max())
    for low, high in _llama3_ramp_candidates(factors, x, factor):
        if not 0 <= low < high:
            continue  # an inverted ramp can fit factors that fall with wavelength; no Llama 3 does that
        scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                   "original_max_position_embeddings": original}
        if np.allclose(inv_freq / llama3_scaled(inv_freq, scaling), factors, rtol=_FACTOR_RTOL, atol=0):
            return scaling
    raise KvrtError("GGUF rope_freqs tensor is not a Llama 3 rope scaling kvrt can reproduce "
                    f"(factors {np.round(factors, 4).tolist()})")


def _llama3_ramp_candidates(factors: np.ndarray, x: np.ndarray, factor: float):
    """(low_freq_factor, high_freq_factor) guesses, most natural first: Llama 3's own (1, 4), the
    line through the ramp pairs (rounded, then exact), else bounds inside the gap the pairs leave.

    factors, x: [head_dim/2], x = original context / wavelength of each pair."""
    yield 1.0, 4.0
    ramp = (factors > 1 + _FACTOR_RTOL) & (factors < factor * (1 - _FACTOR_RTOL))
    # on the ramp 1/factors is linear in x: 1/f = 1/factor + s (1 - 1/factor), s = (x - low)/(high - low)
    s = (1 / factors - 1 / factor) / (1 - 1 / factor)
    if ramp.sum() >= 2:
        slope, intercept = np.polyfit(x[ramp], s[ramp], 1)
        low, high = -intercept / slope, (1 - intercept) / slope
        yield round(float(low), 4), round(float(high), 4)
        yield float(low), float(high)
        return
    # fewer than two ramp pairs: any line through them that stays inside its neighbours fits
    below = x[factors >= factor * (1 - _FACTOR_RTOL)]  # pairs at the full factor: x <= low
    above = x[factors <= 1 + _FACTOR_RTOL]  # unscaled pairs: x >= high
    floor_x = float(below.max()) if below.size else 0.0
    ceil_x = float(above.min()) if above.size else 2 * float(x.max()) + 1
    if ramp.sum() == 1:
        x0, s0 = float(x[ramp][0]), float(s[ramp][0])
        width = min((x0 - floor_x) / s0, (ceil_x - x0) / (1 - s0))
        yield x0 - s0 * width, x0 + (1 - s0) * width
    else:
        gap = ceil_x - floor_x
        yield floor_x + gap / 3, floor_x + 2 * gap / 3


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's Q/K row interleave (it reorders rotary halves into pairs)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(gguf_name: str, arch: str | None = None) -> str | None:
    """Map a GGUF tensor name of `arch` (general.architecture; None: llama's names) to its HF name
    (None = not a weight: rope_freqs and the like, carried by the config)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    if gguf_name == "rope_freqs.weight" or gguf_name in gguf_archs.CONFIG_TENSORS.get(arch, ()):
        return None
    layer_names = {**_LAYER_NAMES, **gguf_archs.LAYER_NAMES.get(arch, {})}
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in layer_names:
        return f"model.layers.{parts[1]}.{layer_names[parts[2]]}"
    kinds = "llama/qwen2/qwen3" if arch not in gguf_archs.ARCHS else arch
    raise KvrtError(f"unsupported GGUF tensor {gguf_name!r} (not a dense {kinds} weight)")


def _store_dtype(ggml_type: GGMLQuantizationType):
    # F32 stays float32 (norms, small); the rest is float16 to halve the disk size.
    # (bfloat16 would be closer to training dtype but numpy needs ml_dtypes for it.)
    return np.float32 if ggml_type == GGMLQuantizationType.F32 else np.float16


def _dequantized(t) -> np.ndarray:
    """A GGUF tensor as float32 in numpy (row-major) shape, via the gguf package: every type it dequantizes."""
    try:
        data = dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise KvrtError(f"unsupported GGUF tensor type {t.tensor_type.name} for {t.name} "
                        "(the gguf package cannot dequantize it)") from None
    # t.shape lists dims fastest-first (ggml order); numpy wants them reversed.
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    return np.asarray(data, dtype=np.float32).reshape(shape)


def convert_tensors(reader: GGUFReader, cfg: dict, progress: Progress | None = None) -> dict[str, np.ndarray]:
    """Dequantize every weight and rename it to HF conventions (`progress` counts the tensors)."""
    permuted = cfg["model_type"] == "llama"  # only llama.cpp's llama path permutes Q/K
    arch = field(reader, "general.architecture")
    out = {}
    for t in reader.tensors:
        if progress is not None:
            progress.advance()
        name = hf_name(t.name, arch)
        if name is None:
            continue
        w = gguf_archs.fix_tensor(arch, t.name, _dequantized(t))
        if permuted and t.name.endswith("attn_q.weight"):
            w = _unpermute(w, cfg["num_attention_heads"])
        elif permuted and t.name.endswith("attn_k.weight"):
            w = _unpermute(w, cfg["num_key_value_heads"])
        out[name] = np.ascontiguousarray(w.astype(_store_dtype(t.tensor_type)))
    if "model.embed_tokens.weight" not in out:
        raise KvrtError("GGUF has no token_embd.weight tensor")
    return gguf_archs.finish_tensors(arch, out, cfg)


# ---------------------------------------------------------------- tokenizer

# Split regexes of the HF tokenizer.json files behind these `tokenizer.ggml.pre` names.
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = _LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")  # Qwen splits digits one by one
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4  # llama.cpp token types that must never be split


def _pre_tokenizer(pre: str | None, log=print):
    """Return (normalizer, pre_tokenizer) matching llama.cpp's pre-tokenizer name."""
    gpt2_style = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in ("smollm", "starcoder"):
        digits = pre_tokenizers.Digits(individual_digits=True)
        return None, pre_tokenizers.Sequence([digits, gpt2_style])
    if pre in ("llama-bpe", "qwen2") or pre in gguf_archs.PRE_SPLITS:
        regex = gguf_archs.PRE_SPLITS.get(pre) or (_LLAMA3_REGEX if pre == "llama-bpe" else _QWEN2_REGEX)
        split = pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False)
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
        norm = normalizers.NFC() if pre == "qwen2" else None  # Qwen's HF tokenizer normalizes to NFC
        return norm, pre_tokenizers.Sequence([split, byte_level])
    if pre not in ("gpt-2", "gpt2", "default", None):
        log(f"warning: unknown tokenizer pre-tokenizer {pre!r}; using GPT-2 byte-level splitting")
    return None, gpt2_style


def _gpt2_model(reader: GGUFReader, vocab: dict[str, int], log) -> Tokenizer:
    """Byte-level BPE from the GGUF merges, with the model's own pre-tokenizer."""
    merges = field(reader, "tokenizer.ggml.merges") or []
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    if any(len(p) != 2 for p in pairs):
        raise KvrtError("GGUF tokenizer has a malformed merge (expected 'left right')")
    tk = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    norm, pre = _pre_tokenizer(field(reader, "tokenizer.ggml.pre"), log)
    if norm is not None:
        tk.normalizer = norm
    tk.pre_tokenizer = pre
    tk.decoder = decoders.ByteLevel()
    return tk


def _spm_model(reader: GGUFReader, tokens: list[str], vocab: dict[str, int], types: list[int]) -> Tokenizer:
    """SentencePiece-BPE ("llama") vocab as a byte-fallback BPE, the way HF's Llama fast tokenizer does it."""
    scores = field(reader, "tokenizer.ggml.scores") or [-float(i) for i in range(len(tokens))]
    # SPM merges the pair whose result scores best; as ranked merges: every split of every
    # normal piece into two known pieces, ordered by the merged piece's score.
    ranked = []
    for piece, i in vocab.items():
        if types[i] != 1:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], i, vocab[left], vocab[right], left, right))
    ranked.sort()
    unk_id = field(reader, "tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None and 0 <= int(unk_id) < len(tokens) else None
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[(r[4], r[5]) for r in ranked], unk_token=unk,
                              fuse_unk=True, byte_fallback=True))
    prefix = bool(field(reader, "tokenizer.ggml.add_space_prefix", True))
    # Like SentencePiece and llama.cpp: spaces become ▁, and each text run (start of text or
    # after a special token) gets a leading ▁; no pre-splitting, merges see the whole run.
    steps = [normalizers.Prepend("▁")] if prefix else []
    tk.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tk.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tk


def build_tokenizer_files(reader: GGUFReader, log=print) -> tuple[str, dict, dict | None]:
    """Build (tokenizer.json text, tokenizer_config dict, generation_config or None)."""
    kind = field(reader, "tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise KvrtError(f"unsupported GGUF tokenizer {kind!r}; supported: 'gpt2' (byte-level BPE), "
                        "'llama' (SentencePiece BPE)")
    tokens = field(reader, "tokenizer.ggml.tokens") or []
    types = field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    if not tokens or len(types) != len(tokens):
        raise KvrtError("GGUF tokenizer metadata is incomplete (tokens/token_type)")
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)  # first id wins if a GGUF repeats a token string
    try:
        tk = _gpt2_model(reader, vocab, log) if kind == "gpt2" else _spm_model(reader, tokens, vocab, types)
    except KvrtError:
        raise
    except Exception as e:
        raise KvrtError(f"GGUF tokenizer vocab/merges are inconsistent ({_one_line(e)})") from None
    # Control (and SPM unknown) tokens are special, skippable in decode; user-defined ones are plain but atomic.
    tk.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                           for i, ty in enumerate(types) if ty == _CONTROL or (kind == "llama" and ty == _UNKNOWN)])
    tk.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                   for i, ty in enumerate(types) if ty == _USER_DEFINED])

    def tok_of(key):
        i = field(reader, key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos, eos = tok_of("tokenizer.ggml.bos_token_id"), tok_of("tokenizer.ggml.eos_token_id")
    arch = field(reader, "general.architecture")
    # llama.cpp's default when the key is absent: SPM models add BOS, byte-level BPE ones don't.
    add_bos = bool(field(reader, "tokenizer.ggml.add_bos_token", kind == "llama")) and bos is not None
    if add_bos:
        bos_id = int(field(reader, "tokenizer.ggml.bos_token_id"))
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    elif kind == "gpt2":
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": tok_of("tokenizer.ggml.unknown_token_id"),
        "pad_token": tok_of("tokenizer.ggml.padding_token_id"),
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(field(reader, f"{arch}.context_length", 4096)),
    }
    template = field(reader, "tokenizer.chat_template")
    if isinstance(template, str):
        tok_cfg["chat_template"] = template
    gen_cfg = None
    eot = field(reader, "tokenizer.ggml.eot_token_id")
    eos_id = field(reader, "tokenizer.ggml.eos_token_id")
    if eot is not None and eos_id is not None and int(eot) != int(eos_id):
        # Instruct models end turns with EOT (e.g. <|eot_id|>); stop on either.
        gen_cfg = {"eos_token_id": [int(eos_id), int(eot)]}
    return tk.to_str(), tok_cfg, gen_cfg


def convert_gguf(gguf_path: Path, out_dir: Path, log=print) -> Path:
    """Convert ``gguf_path`` into the HF folder ``out_dir`` (written atomically)."""
    gguf_path, out_dir, log = Path(gguf_path), Path(out_dir), log or quiet
    reader = read_gguf(gguf_path)
    tokens = field(reader, "tokenizer.ggml.tokens") or []
    cfg = gguf_config(reader, len(tokens))
    log(f"converting {gguf_path.name} → {out_dir} ({len(reader.tensors)} tensors)")
    tok_json, tok_cfg, gen_cfg = build_tokenizer_files(reader, log=log)
    with Progress(f"converting {gguf_path.name}", len(reader.tensors), "tensors", log_every=0.1,
                  enabled=log is not quiet) as progress:
        tensors = convert_tensors(reader, cfg, progress)
    cfg["vocab_size"] = int(tensors["model.embed_tokens.weight"].shape[0])
    if all(t.dtype == np.float32 for t in tensors.values()):
        cfg["torch_dtype"] = "float32"  # an all-F32 GGUF stays full precision

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        (tmp / "tokenizer.json").write_text(tok_json)
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
        if gen_cfg is not None:
            (tmp / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
        # each weight's GGUF type (HF name -> ggml type name): MLX keeps quantized ones quantized (a tensor
        # finish_tensors fused from several, as Phi-3's qkv_proj, has none and stays float there)
        arch = field(reader, "general.architecture")
        types = {name: t.tensor_type.name for t in reader.tensors if (name := hf_name(t.name, arch)) in tensors}
        (tmp / "gguf_types.json").write_text(json.dumps(types, indent=1) + "\n")
        _make_readable(tmp)
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _make_readable(folder: Path) -> None:
    """Give the result normal permissions (mkdtemp and safetensors create owner-only ones)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for f in folder.iterdir():
        os.chmod(f, 0o666 & ~umask)


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir``, replacing any old folder there."""
    old = None
    if out_dir.exists():
        # A folder can't be os.replace'd onto a non-empty folder: move the old one aside first.
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / "x")
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
