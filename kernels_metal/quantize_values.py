"""Quantize and pack values per token (quantize_values.metal). Reference twin: kvrt.cache.quant.quantize_values
(bit-exact)."""

from __future__ import annotations

import mlx.core as mx

from kvrt.errors import KvrtError
from kvrt.kernels_metal.sources import launch, meta
from kvrt.cache.quant import QuantizedValues, codes_per_word


def quantize_values_metal(v, bits: int, group: int) -> QuantizedValues:
    """v [B, Hkv, S, D] → QuantizedValues over groups of `group` channels (dividing D), packed along channels."""
    per = codes_per_word(bits)
    b, h, s, d = v.shape
    if group <= 0 or d % group or d % per:
        raise KvrtError(f"value group {group} must divide the head dim {d}, itself a multiple of {per}")
    inputs = [v.reshape(b * h, s, d), meta(s)]
    template = [("T", v.dtype), ("D", d), ("BITS", bits), ("GV", group)]
    codes, scale, zero = launch("quantize_values", inputs, template, grid=(32, s, b * h), threadgroup=(32, 1, 1),
                                outputs=[((b * h, s, d // per), mx.int32), ((b * h, s, d // group), v.dtype),
                                         ((b * h, s, d // group), v.dtype)])
    return QuantizedValues(codes.reshape(b, h, s, d // per), scale.reshape(b, h, s, d // group),
                           zero.reshape(b, h, s, d // group), bits, group, (b, h, s, d))
