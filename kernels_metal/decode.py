"""Decode attention over full-precision keys and values (decode.metal), split over the sequence and
merged by log-sum-exp. Reference twin: MLXOps.partial_attention."""

from __future__ import annotations

import mlx.core as mx

from kvrt.kernels_metal import splits as split_merge
from kvrt.kernels_metal.quantized_decode import fits  # the same register layout and row limit
from kvrt.kernels_metal.sources import meta, placeholder, row_lengths, scalar

__all__ = ["decode_attention", "fits"]


def decode_attention(q, k, v, scale: float, causal_offset: int | None = None, key_bias=None,
                     splits: int | None = None, *, lengths=None):
    """(out [B, Hq, T, D] in q's dtype, lse [B, Hq, T] float32) of q over k/v [B, Hkv, S, D]; query t
    sees keys 0 .. causal_offset + t (all when None); key_bias float32 [B, Hkv, S] or None; lengths int32
    [B] or None: row b's keys j >= lengths[b] are hidden as a −inf bias would hide them, and never read
    (a row of length 0 sees no key: out 0, lse −inf)."""
    b, hq, t, d = q.shape
    _, hkv, s, _ = k.shape
    if s == 0:
        return split_merge.no_keys(q)
    span, n = split_merge.plan(s, splits)
    offset = s if causal_offset is None else causal_offset  # offset s: every key visible to every query
    # every array goes in as it is, no reshape: the kernel reads them through their strides (sources.py builds
    # it with ensure_row_contiguous=False), so a SeqBuffer's view of the cache is not copied at each step
    inputs = [
        q, k, v, key_bias.astype(mx.float32) if key_bias is not None else placeholder(mx.float32),
        row_lengths(lengths, b) if lengths is not None else placeholder(mx.int32),
        meta(s, span, n, offset, hkv), scalar(scale),
    ]
    template = [("D", d), ("ROWS", (hq // hkv) * t), ("TQ", t), ("HAS_BIAS", key_bias is not None),
                ("HAS_LENGTHS", lengths is not None)]
    return split_merge.launch_merged("decode", q, hkv, n, inputs, template)
