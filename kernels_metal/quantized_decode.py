"""Decode attention over a whole quantized tier (quantized_decode.metal), split over the sequence and
merged by log-sum-exp. Reference twin: QuantizedTier.partial's dequantize-a-block path."""

from __future__ import annotations

import mlx.core as mx

from kvrt.kernels_metal import splits as split_merge
from kvrt.kernels_metal.sources import meta, placeholder, row_lengths, scalar

MAX_ROWS = 16  # query rows per KV head held in registers (G·T at decode)


def fits(q: mx.array, kv_heads: int) -> bool:
    """Shapes the kernel handles: decode-sized rows, lanes owning D / 32 channels each."""
    d = q.shape[3]
    return q.shape[2] * (q.shape[1] // kv_heads) <= MAX_ROWS and d % 32 == 0 and d <= 256


def quantized_decode_attention(q, keys, values, scale: float, key_bias=None, splits: int | None = None, *,
                               lengths=None):
    """(out [B, Hq, T, D] in q's dtype, lse [B, Hq, T] float32) of q over kvrt.cache.quant.QuantizedKeys /
    QuantizedValues of S tokens; key_bias float32 [B, Hkv, S] or None (−inf hides a key); lengths int32 [B]
    or None: row b's tokens t >= lengths[b] (a whole number of groups) are hidden as a −inf bias would hide
    them, and never read (a row of length 0 sees no key: out 0, lse −inf)."""
    b, hq, t, d = q.shape
    _, hkv, s, _ = keys.shape
    if s == 0:
        return split_merge.no_keys(q)
    span, n = split_merge.plan(s, splits)
    # every array goes in as it is, no reshape: the kernel reads them through their strides (sources.py builds
    # it with ensure_row_contiguous=False), so the tier's views of its SeqBuffers are not copied at each step
    inputs = [
        q, keys.codes, keys.scale, keys.zero, values.codes, values.scale, values.zero,
        key_bias.astype(mx.float32) if key_bias is not None else placeholder(mx.float32),
        row_lengths(lengths, b) if lengths is not None else placeholder(mx.int32),
        meta(s, span, n, hkv, t), scalar(scale),
    ]
    template = [("KT", keys.scale.dtype), ("D", d), ("ROWS", (hq // hkv) * t), ("BITS", keys.bits),
                ("GROUP", keys.group), ("VGROUP", values.group), ("HAS_BIAS", key_bias is not None),
                ("HAS_LENGTHS", lengths is not None)]
    return split_merge.launch_merged("quantized_decode", q, hkv, n, inputs, template)
