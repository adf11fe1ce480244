"""GGUF -> HF facts for Gemma 2, Gemma 3 and Phi-3 (Phi-3.5, Phi-4-mini): llama.cpp's conventions, inverted.

`kvrt.models.gguf_convert` handles what every architecture shares (llama/qwen2/qwen3 need nothing
more) and asks this module for the rest: the config keys an architecture adds
(`arch_config`), its own per-layer tensor names (`LAYER_NAMES`), the tensors that only carry
config (`CONFIG_TENSORS`), and what its weights need after dequantization (`fix_tensor`,
`finish_tensors`). The facts, from llama.cpp's convert_hf_to_gguf.py and llama-model.cpp:

- Gemma 2/3: every `*norm.weight` is stored +1 (HF's Gemma RMSNorm scales by 1 + w); Q/K are not
  permuted; GELU (tanh); attention scaled by 1/sqrt(head_dim), except the 27B models (46 layers
  for Gemma 2, 62 for Gemma 3), scaled by 1/sqrt(hidden/heads); sliding-window layers are every
  layer but each 2nd (Gemma 2) or 6th (Gemma 3); Gemma 3's sliding layers use rope base 10000,
  unscaled, its global layers `rope.freq_base` and the file's rope scaling; Gemma 2 soft-caps
  attention and final logits (50 and 30 unless the file says otherwise).
- Phi-3: fused `attn_qkv` (q, k, v rows) and `ffn_up` (gate rows, then up rows), as in HF;
  LongRoPE as the `rope_factors_long/short` tensors with `rope.scaling.original_context_length`
  and `rope.scaling.attn_factor`; partial rotary as `rope.dimension_count` < head_dim
  (Phi-4-mini); `attention.sliding_window` 0 means none.
"""

from __future__ import annotations

import math

import numpy as np

from kvrt.errors import KvrtError

# GGUF architecture -> (HF architecture class, HF model_type)
ARCHS = {
    "gemma2": ("Gemma2ForCausalLM", "gemma2"),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text"),
    "phi3": ("Phi3ForCausalLM", "phi3"),
}

_GEMMA_LAYERS = {
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",  # llama's ffn_norm is HF's post_attention_layernorm
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
# Per-layer GGUF name -> HF name, where an architecture differs from (or adds to) llama's.
LAYER_NAMES = {
    "gemma2": _GEMMA_LAYERS,
    "gemma3": _GEMMA_LAYERS,
    # ffn_up is Phi-3's fused gate_up_proj (gate rows, then up rows), unless the file has an ffn_gate
    # too: then finish_tensors stacks the two
    "phi3": {"attn_qkv.weight": "self_attn.qkv_proj.weight", "ffn_up.weight": "mlp.gate_up_proj.weight"},
}
# Tensors that only carry config (read by arch_config), never a weight.
CONFIG_TENSORS = {"phi3": ("rope_factors_long.weight", "rope_factors_short.weight")}

_NORM_SHIFT = {"gemma2": 1.0, "gemma3": 1.0}  # what llama.cpp's converter added to every *norm.weight
_SWA_EVERY = {"gemma2": 2, "gemma3": 6}  # llama.cpp's set_swa_pattern(n): layer i slides unless i % n == n - 1
_LAYERS_27B = {"gemma2": 46, "gemma3": 62}  # llama.cpp's LLM_TYPE_27B, the one scaled by hidden/heads
_GEMMA3_LOCAL_BASE = 10000.0  # llama.cpp's rope_freq_base_train_swa for gemma3


def arch_config(arch: str, cfg: dict, meta, tensor) -> None:
    """Add `arch`'s own keys to `cfg` (the llama-style config gguf_config built), in place.

    meta(key, default): a GGUF metadata value; tensor(name): a GGUF tensor as float64, or None."""
    if arch not in ARCHS:
        return

    def get(key, default=None):
        return meta(f"{arch}.{key}", default)

    pad = meta("tokenizer.ggml.padding_token_id")
    if pad is not None:
        cfg["pad_token_id"] = int(pad)
    if arch in _NORM_SHIFT:
        _gemma_config(arch, cfg, get)
    elif arch == "phi3":
        _phi3_config(cfg, get, tensor)


def _gemma_config(arch: str, cfg: dict, get) -> None:
    n_layer = cfg["num_hidden_layers"]
    cfg["hidden_act"] = cfg["hidden_activation"] = "gelu_pytorch_tanh"
    cfg["attention_bias"] = False
    # HF scales scores by query_pre_attn_scalar**-0.5; llama.cpp by its f_attention_scale
    cfg["query_pre_attn_scalar"] = (cfg["hidden_size"] // cfg["num_attention_heads"]
                                    if n_layer == _LAYERS_27B[arch] else cfg["head_dim"])
    window = int(get("attention.sliding_window") or 0)
    cfg["sliding_window"] = window or None
    sliding = _sliding_layers(arch, n_layer, get("attention.sliding_window_pattern")) if window else [False] * n_layer
    cfg["layer_types"] = ["sliding_attention" if s else "full_attention" for s in sliding]
    if arch == "gemma2":
        # llama.cpp's defaults when the keys are absent are Gemma 2's own
        cfg["attn_logit_softcapping"] = float(get("attn_logit_softcapping", 50.0))
        cfg["final_logit_softcapping"] = float(get("final_logit_softcapping", 30.0))
        return
    final_cap = get("final_logit_softcapping")
    cfg["final_logit_softcapping"] = float(final_cap) if final_cap else None
    cfg["attn_logit_softcapping"] = None
    cfg["rope_local_base_freq"] = float(get("rope.freq_base_swa", _GEMMA3_LOCAL_BASE))
    every = _SWA_EVERY[arch]
    if window and sliding == [i % every < every - 1 for i in range(n_layer)]:
        cfg["sliding_window_pattern"] = every  # what mlx-lm and older readers go by (layer_types says it all)
    cfg["use_bidirectional_attention"] = False
    # rope_scaling (gguf_config's, from rope.scaling.*) applies to the global layers only, in
    # llama.cpp (freq_scale_swa = 1) as in HF (Gemma3TextConfig puts it on full_attention).


def _sliding_layers(arch: str, n_layer: int, pattern) -> list[bool]:
    """Which layers use the sliding window: the file's per-layer pattern if it has one, else llama.cpp's."""
    if isinstance(pattern, list):
        if len(pattern) != n_layer:
            raise KvrtError(f"GGUF {arch}.attention.sliding_window_pattern has {len(pattern)} entries "
                            f"for {n_layer} layers")
        return [bool(p) for p in pattern]
    every = int(pattern) if isinstance(pattern, (int, float)) and pattern else _SWA_EVERY[arch]
    return [i % every < every - 1 for i in range(n_layer)]


def _phi3_config(cfg: dict, get, tensor) -> None:
    head_dim = cfg.pop("head_dim")  # Phi3Config has none: always hidden / heads
    if head_dim != cfg["hidden_size"] // cfg["num_attention_heads"]:
        raise KvrtError(f"GGUF phi3 head size {head_dim} is not hidden/heads; HF's Phi3 cannot express it")
    rope_dim = int(get("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        cfg["partial_rotary_factor"] = rope_dim / head_dim  # Phi-4-mini rotates 3/4 of each head
    window = int(get("attention.sliding_window") or 0)  # 0: none (the converter's mark for Phi-4)
    cfg["sliding_window"] = window or None
    original = get("rope.scaling.original_context_length")
    if original is not None:
        cfg["original_max_position_embeddings"] = int(original)
    long, short = tensor("rope_factors_long.weight"), tensor("rope_factors_short.weight")
    if long is None and short is None:
        return
    if long is None or short is None:
        raise KvrtError("GGUF has only one of rope_factors_long/rope_factors_short; LongRoPE needs both")
    if long.size != rope_dim // 2 or short.size != rope_dim // 2:
        raise KvrtError(f"GGUF rope_factors_long/short have {long.size}/{short.size} values, "
                        f"expected {rope_dim // 2} each")
    if "rope_scaling" in cfg:
        raise KvrtError(f"GGUF has both LongRoPE factors and {cfg['rope_scaling']['rope_type']} rope scaling; "
                        "kvrt cannot carry both into one HF config")
    orig = cfg.setdefault("original_max_position_embeddings", cfg["max_position_embeddings"])
    scaling = {"rope_type": "longrope", "type": "longrope",
               "long_factor": _float32_list(long), "short_factor": _float32_list(short)}
    # llama.cpp multiplies cos/sin by rope.scaling.attn_factor; HF computes the same default itself
    factor = cfg["max_position_embeddings"] / orig
    default = math.sqrt(1 + math.log(factor) / math.log(orig)) if factor > 1 else 1.0
    attn = get("rope.scaling.attn_factor")
    if attn is not None and not math.isclose(float(attn), default, rel_tol=1e-6):
        scaling["attention_factor"] = float(attn)
    cfg["rope_scaling"] = scaling


def _float32_list(values: np.ndarray) -> list[float]:
    """Float32 values as the shortest decimals that read back as the same float32 (1.08, not 1.0800000429)."""
    return [float(str(v)) for v in np.asarray(values, dtype=np.float32).reshape(-1)]


def fix_tensor(arch: str, gguf_name: str, w: np.ndarray) -> np.ndarray:
    """Undo what llama.cpp's converter did to one tensor (float32 in, float32 out)."""
    shift = _NORM_SHIFT.get(arch)
    if shift and gguf_name.endswith("norm.weight"):
        return w - np.float32(shift)
    return w


def finish_tensors(arch: str, tensors: dict[str, np.ndarray], cfg: dict) -> dict[str, np.ndarray]:
    """Phi-3: fuse separate q/k/v into qkv_proj and gate/up into gate_up_proj, as HF's Phi3 wants them."""
    if arch != "phi3":
        return tensors
    ff = cfg["intermediate_size"]
    for i in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        qkv = [tensors.pop(f"{pre}self_attn.{p}_proj.weight", None) for p in "qkv"]
        if any(w is not None for w in qkv):
            if any(w is None for w in qkv) or f"{pre}self_attn.qkv_proj.weight" in tensors:
                raise KvrtError(f"GGUF layer {i} has an incomplete or duplicate set of attn_q/attn_k/attn_v/attn_qkv")
            tensors[f"{pre}self_attn.qkv_proj.weight"] = np.concatenate(qkv)
        head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
        qkv_rows = (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * head_dim
        fused = tensors.get(f"{pre}self_attn.qkv_proj.weight")
        if fused is None:
            raise KvrtError(f"GGUF layer {i} has no attention weights (attn_qkv, or attn_q, attn_k and attn_v)")
        if fused.shape[0] != qkv_rows:
            raise KvrtError(f"GGUF layer {i} attn_qkv has {fused.shape[0]} rows, expected {qkv_rows} (q, k and v)")
        gate, up = tensors.pop(f"{pre}mlp.gate_proj.weight", None), tensors.pop(f"{pre}mlp.gate_up_proj.weight", None)
        if up is None:
            raise KvrtError(f"GGUF layer {i} has no ffn_up tensor")
        if gate is not None:  # separate gate and up: stack them the way HF's gate_up_proj has them
            up = np.concatenate([gate, up])
        if up.shape[0] != 2 * ff:
            raise KvrtError(f"GGUF layer {i} ffn_up has {up.shape[0]} rows, expected {2 * ff} (gate and up)")
        tensors[f"{pre}mlp.gate_up_proj.weight"] = up
    return tensors


# Split regexes of the HF tokenizer.json files behind more `tokenizer.ggml.pre` names (each followed
# by byte-level mapping without its own regex). gpt-4o: tiktoken's o200k_base pattern, as Phi-4-mini's
# tokenizer.json has it (llama.cpp's LLAMA_VOCAB_PRE_TYPE_GPT4O quotes it as the original).
_O200K_REGEX = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_SPLITS = {"gpt-4o": _O200K_REGEX}
