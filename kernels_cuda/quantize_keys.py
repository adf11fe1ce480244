"""Quantize and pack key groups (format: kvrt/cache/quant.py), with OTT's mean substitution: one
program per (batch·KV head, group) loads the group's G × D keys, replaces its traced slots by
the mean of the other keys (per channel), takes min/max per channel, stores scale (rounded up
into the model dtype) and zero, and packs the codes along the tokens into int32 words.

Reference twin: OTT's substitution in kvrt/cache/methods/ott.py + kvrt.cache.quant.quantize_keys.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvrt.cache.quant import RANGE_CAP, QuantizedKeys, codes_per_word

INT_OF = {torch.float16: tl.int16, torch.bfloat16: tl.int16, torch.float32: tl.int32}


@triton.jit
def _scale_up(wanted, dtype: tl.constexpr, INT: tl.constexpr):
    """wanted (float32, >= 0) in the model dtype, rounded up where conversion rounded down."""
    scale = wanted.to(dtype)
    up = (scale.to(INT, bitcast=True) + 1).to(dtype, bitcast=True)  # next representable value up
    return tl.where(scale.to(tl.float32) < wanted, up, scale)


@triton.jit
def _round_half_even(x):
    r = tl.floor(x + 0.5)
    return tl.where((r - x == 0.5) & (r - 2.0 * tl.floor(r * 0.5) == 1.0), r - 1.0, r)


@triton.jit
def _quantize_key_group(k_ptr, traced_ptr, codes_ptr, scale_ptr, zero_ptr,
                        s_k_bh, s_k_t, s_t_bh, s_c_bh, s_c_w, s_s_bh, s_s_g,
                        BITS: tl.constexpr, G: tl.constexpr, D: tl.constexpr, HAS_TRACED: tl.constexpr,
                        INT: tl.constexpr, CAP: tl.constexpr):
    bh = tl.program_id(0)
    group = tl.program_id(1)
    PER: tl.constexpr = 32 // BITS
    TOP: tl.constexpr = (1 << BITS) - 1
    tok = group * G + tl.arange(0, G)
    dims = tl.arange(0, D)
    k = tl.load(k_ptr + bh * s_k_bh + tok[:, None] * s_k_t + dims[None, :])  # [G, D], model dtype
    if HAS_TRACED:  # OTT: traced slots take the mean of the group's other keys, in the model dtype
        traced = tl.load(traced_ptr + bh * s_t_bh + tok) != 0
        kf = tl.where(traced[:, None], 0.0, k.to(tl.float32))
        rest = G - tl.sum(traced.to(tl.float32), axis=0)
        mean = tl.sum(kf, axis=0) / rest
        k = tl.where(traced[:, None], mean[None, :].to(k.dtype), k)
    lo = tl.min(k, axis=0)
    hi = tl.max(k, axis=0)
    span = tl.minimum(hi.to(tl.float32) - lo.to(tl.float32), CAP)
    scale = _scale_up(span / TOP, k.dtype, INT)
    s32 = scale.to(tl.float32)
    x = (k.to(tl.float32) - lo.to(tl.float32)[None, :]) / tl.where(s32 == 0.0, 1.0, s32)[None, :]
    codes = tl.where(s32[None, :] == 0.0, 0.0, tl.minimum(tl.maximum(_round_half_even(x), 0.0), TOP)).to(tl.int32)
    shifts = (tl.arange(0, PER) * BITS)[None, :, None]
    words = tl.sum(tl.reshape(codes, [G // PER, PER, D]) << shifts, axis=1)  # disjoint bit fields: sum = OR
    rows = group * (G // PER) + tl.arange(0, G // PER)
    tl.store(codes_ptr + bh * s_c_bh + rows[:, None] * s_c_w + dims[None, :], words)
    tl.store(scale_ptr + bh * s_s_bh + group * s_s_g + dims, scale)
    tl.store(zero_ptr + bh * s_s_bh + group * s_s_g + dims, lo)


def quantize_keys_fused(k, bits: int, group: int, traced=None) -> QuantizedKeys:
    """k [B, Hkv, n·G, D] → QuantizedKeys, traced slots (bool [B, Hkv, n·G]) mean-substituted first."""
    per = codes_per_word(bits)
    b, h, s, d = k.shape
    n = s // group
    kr = k.reshape(b * h, s, d).contiguous()
    codes = torch.empty(b * h, s // per, d, device=k.device, dtype=torch.int32)
    scale = torch.empty(b * h, n, d, device=k.device, dtype=k.dtype)
    zero = torch.empty_like(scale)
    tr = traced.reshape(b * h, s).to(torch.int8).contiguous() if traced is not None else codes
    _quantize_key_group[(b * h, n)](
        kr, tr, codes, scale, zero,
        kr.stride(0), kr.stride(1), tr.stride(0), codes.stride(0), codes.stride(1), scale.stride(0), scale.stride(1),
        BITS=bits, G=group, D=d, HAS_TRACED=traced is not None, INT=INT_OF[k.dtype], CAP=RANGE_CAP,
    )
    return QuantizedKeys(codes.reshape(b, h, s // per, d), scale.reshape(b, h, n, d), zero.reshape(b, h, n, d),
                         bits, group, (b, h, s, d))
