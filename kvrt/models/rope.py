"""RoPE as transformers computes it, per rope type (default, linear, llama3, yarn, dynamic NTK,
longrope): each layer's rotation frequencies and the attention factor that scales cos and sin."""

from __future__ import annotations

import math

import numpy as np

from kvrt.errors import KvrtError
from kvrt.models.config import ModelArgs

ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic", "longrope")


def rope_type(args: ModelArgs) -> str:
    """The rope variant of `args`, or one clear error for a variant kvrt does not compute."""
    scaling = args.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind not in ROPE_TYPES:
        raise KvrtError(f"unsupported rope scaling '{kind}'; supported: {', '.join(ROPE_TYPES)}")
    if kind == "longrope":
        for key in ("short_factor", "long_factor"):
            if len(scaling.get(key) or ()) != args.rotary_dim // 2:
                raise KvrtError(f"longrope's {key} in the config needs {args.rotary_dim // 2} values "
                                "(one per rotated pair)")
    elif kind != "default" and "factor" not in scaling:
        raise KvrtError(f"rope scaling '{kind}' in the config has no factor")
    return kind


def rope_inv_freq(args: ModelArgs, seq_len: int | None = None) -> np.ndarray:
    """Per-pair rotation frequencies [rotary_dim/2] (float32) as transformers computes them.

    `seq_len` matters for dynamic NTK and longrope only: the frequencies of a forward whose last
    position is seq_len - 1 (transformers' `dynamic_rope_update` recomputes dynamic NTK's from max
    position + 1 once that exceeds max_position_embeddings, and switches longrope to its long
    factors once it exceeds original_max_position_embeddings). Only the first `rotary_dim` dims
    of a head rotate (Phi-4-mini's partial_rotary_factor)."""
    d = args.rotary_dim
    inv_freq = 1.0 / (args.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    scaling = args.rope_scaling or {}
    kind = rope_type(args)
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        inv_freq = llama3_scaled(inv_freq, scaling)
    elif kind == "yarn":
        inv_freq = yarn_scaled(inv_freq, scaling, args.rope_theta, args.max_position_embeddings)
    elif kind == "dynamic" and seq_len is not None and seq_len > args.max_position_embeddings:
        inv_freq = dynamic_ntk_inv_freq(args, seq_len)
    elif kind == "longrope":
        long = seq_len is not None and seq_len > scaling["original_max_position_embeddings"]
        inv_freq = inv_freq / np.asarray(scaling["long_factor" if long else "short_factor"], dtype=np.float64)
    return inv_freq.astype(np.float32)


def rope_attention_factor(args: ModelArgs) -> float:
    """What cos and sin are multiplied by: YaRN's and LongRoPE's attention factor, 1 for every other variant."""
    kind = rope_type(args)
    if kind == "longrope":
        return longrope_attention_factor(args.rope_scaling, args.max_position_embeddings)
    if kind != "yarn":
        return 1.0
    return yarn_attention_factor(args.rope_scaling, args.max_position_embeddings)


def longrope_attention_factor(scaling: dict, max_position_embeddings: int) -> float:
    """LongRoPE's cos/sin scale: `attention_factor` if given, else sqrt(1 + ln f / ln original) with
    f = `factor`, or max_position_embeddings / original where the config has none (Phi-3), as
    transformers' `_compute_longrope_parameters`."""
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or max_position_embeddings / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def llama3_scaled(inv_freq: np.ndarray, scaling: dict) -> np.ndarray:
    """Llama 3.1 rope scaling: long wavelengths divided by `factor`, short ones kept, a smooth ramp between.

    inv_freq: [head_dim/2]. The pretraining length defaults to 8192 only for callers that give none
    (`rope_parameters` fills it in from the config as transformers does)."""
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_context = scaling.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv_freq
    smooth = np.clip((old_context / wavelen - low) / (high - low), 0.0, 1.0)
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def _yarn_factor(scaling: dict, max_position_embeddings: int) -> float:
    # DeepSeek-V3 style configs leave factor out: transformers takes the ratio of the two lengths
    factor = scaling.get("factor")
    if factor is None:
        return max_position_embeddings / scaling["original_max_position_embeddings"]
    return float(factor)


def yarn_attention_factor(scaling: dict, max_position_embeddings: int) -> float:
    """YaRN's cos/sin scale: `attention_factor` if given, else 0.1·mscale·ln(factor) + 1 (over the
    same with mscale_all_dim when both are set), as transformers' `_compute_yarn_parameters`."""
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = _yarn_factor(scaling, max_position_embeddings)

    def mscale_of(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return mscale_of(factor, mscale) / mscale_of(factor, mscale_all_dim)
    return mscale_of(factor)


def yarn_scaled(inv_freq: np.ndarray, scaling: dict, base: float, max_position_embeddings: int) -> np.ndarray:
    """YaRN (arXiv 2309.00071) frequencies [head_dim/2]: pairs that rotate more than `beta_fast` times
    over the pretraining length keep their frequency, those under `beta_slow` are divided by `factor`,
    a linear ramp over pair index between (bounds floored/ceiled unless `truncate` is false)."""
    factor = _yarn_factor(scaling, max_position_embeddings)
    original = scaling["original_max_position_embeddings"]
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1
    dim = 2 * len(inv_freq)

    def pair_of(rotations: float) -> float:
        # the (fractional) pair index that completes `rotations` turns over `original` positions
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = pair_of(beta_fast), pair_of(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = np.clip((np.arange(len(inv_freq), dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    keep = 1.0 - ramp  # share of the unscaled (extrapolated) frequency
    return inv_freq / factor * (1.0 - keep) + inv_freq * keep


def dynamic_ntk_inv_freq(args: ModelArgs, seq_len: int) -> np.ndarray:
    """Dynamic NTK frequencies [head_dim/2] for a sequence of `seq_len` positions: the base grows
    to base·(factor·seq_len/max_pos − (factor − 1))^(d/(d−2)), as transformers'
    `_compute_dynamic_ntk_parameters`."""
    d, max_pos = args.rotary_dim, args.max_position_embeddings
    factor = float(args.rope_scaling["factor"])
    seq_len = max(seq_len, max_pos)
    base = args.rope_theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (d / (d - 2))
    return 1.0 / (base ** (np.arange(0, d, 2, dtype=np.float64) / d))
