"""Quantize and pack values (format: kvrt/cache/quant.py): per token over groups of `group` channels,
codes packed along the channels into int32 words; one program per (batch·KV head, block of
tokens). Reference twin: kvrt.cache.quant.quantize_values.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvrt.kernels_cuda.quantize_keys import INT_OF, _round_half_even, _scale_up
from kvrt.cache.quant import RANGE_CAP, QuantizedValues, codes_per_word


@triton.jit
def _quantize_value_block(v_ptr, codes_ptr, scale_ptr, zero_ptr, S,
                          s_v_bh, s_v_t, s_c_bh, s_c_t, s_s_bh, s_s_t,
                          BITS: tl.constexpr, GV: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr,
                          INT: tl.constexpr, CAP: tl.constexpr):
    bh = tl.program_id(0)
    PER: tl.constexpr = 32 // BITS
    TOP: tl.constexpr = (1 << BITS) - 1
    tok = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = tok < S
    dims = tl.arange(0, D)
    v = tl.load(v_ptr + bh * s_v_bh + tok[:, None] * s_v_t + dims[None, :], mask=ok[:, None], other=0.0)
    grouped = tl.reshape(v, [BLOCK_T, D // GV, GV])
    lo = tl.min(grouped, axis=2)
    span = tl.minimum(tl.max(grouped, axis=2).to(tl.float32) - lo.to(tl.float32), CAP)
    scale = _scale_up(span / TOP, v.dtype, INT)
    s32 = scale.to(tl.float32)
    x = (grouped.to(tl.float32) - lo.to(tl.float32)[:, :, None]) / tl.where(s32 == 0.0, 1.0, s32)[:, :, None]
    codes = tl.where(s32[:, :, None] == 0.0, 0.0, tl.minimum(tl.maximum(_round_half_even(x), 0.0), TOP))
    codes = tl.reshape(codes.to(tl.int32), [BLOCK_T, D // PER, PER])
    words = tl.sum(codes << (tl.arange(0, PER) * BITS)[None, None, :], axis=2)  # disjoint bit fields: sum = OR
    tl.store(codes_ptr + bh * s_c_bh + tok[:, None] * s_c_t + tl.arange(0, D // PER)[None, :], words,
             mask=ok[:, None])
    groups = tl.arange(0, D // GV)
    tl.store(scale_ptr + bh * s_s_bh + tok[:, None] * s_s_t + groups[None, :], scale, mask=ok[:, None])
    tl.store(zero_ptr + bh * s_s_bh + tok[:, None] * s_s_t + groups[None, :], lo, mask=ok[:, None])


def quantize_values_fused(v, bits: int, group: int, block_t: int = 16) -> QuantizedValues:
    """v [B, Hkv, S, D] → QuantizedValues (per token over `group` channels, packed along channels)."""
    per = codes_per_word(bits)
    b, h, s, d = v.shape
    vr = v.reshape(b * h, s, d).contiguous()
    codes = torch.empty(b * h, s, d // per, device=v.device, dtype=torch.int32)
    scale = torch.empty(b * h, s, d // group, device=v.device, dtype=v.dtype)
    zero = torch.empty_like(scale)
    _quantize_value_block[(b * h, triton.cdiv(s, block_t))](
        vr, codes, scale, zero, s, vr.stride(0), vr.stride(1), codes.stride(0), codes.stride(1),
        scale.stride(0), scale.stride(1),
        BITS=bits, GV=group, D=d, BLOCK_T=block_t, INT=INT_OF[v.dtype], CAP=RANGE_CAP,
    )
    return QuantizedValues(codes.reshape(b, h, s, d // per), scale.reshape(b, h, s, d // group),
                           zero.reshape(b, h, s, d // group), bits, group, (b, h, s, d))
