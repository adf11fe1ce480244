"""Quantize and pack key groups (quantize_keys.metal) with OTT's mean substitution of traced slots.
Reference twin: kvrt.cache.quant.mean_substituted + kvrt.cache.quant.quantize_keys (bit-exact)."""

from __future__ import annotations

import mlx.core as mx

from kvrt.errors import KvrtError
from kvrt.kernels_metal.sources import launch, meta, placeholder
from kvrt.cache.quant import QuantizedKeys, codes_per_word

MAX_D = 1024  # one thread per channel in a threadgroup


def quantize_keys_metal(k, bits: int, group: int, traced=None) -> QuantizedKeys:
    """k [B, Hkv, n·G, D] → QuantizedKeys; traced slots (bool [B, Hkv, n·G]) first take their group's
    untraced mean."""
    per = codes_per_word(bits)
    b, h, s, d = k.shape
    if group <= 0 or group % per or s % group:
        raise KvrtError(f"keys to quantize must be whole groups of a multiple of {per} tokens, "
                        f"got {s} tokens, group {group}")
    n, bh = s // group, b * h
    flags = traced.reshape(bh, s) if traced is not None else placeholder(mx.bool_)
    template = [("T", k.dtype), ("D", d), ("BITS", bits), ("GROUP", group), ("HAS_TRACED", traced is not None)]
    # a thread per (channel, group, batch·KV head)
    codes, scale, zero = launch("quantize_keys", [k.reshape(bh, s, d), flags, meta(s)], template, grid=(d, n, bh),
                                threadgroup=(min(d, 256), 1, 1),
                                outputs=[((bh, s // per, d), mx.int32), ((bh, n, d), k.dtype), ((bh, n, d), k.dtype)])
    return QuantizedKeys(codes.reshape(b, h, s // per, d), scale.reshape(b, h, n, d), zero.reshape(b, h, n, d),
                         bits, group, (b, h, s, d))
