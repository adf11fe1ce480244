"""Flash-decoding splits: how the decode kernels cut the sequence, and the log-sum-exp merge of the splits'
(out, lse), the same merge kvrt.cache.attention applies to tiers."""

from __future__ import annotations

import mlx.core as mx

from kvrt.kernels_metal.sources import launch

MAX_SPLITS = 64
MIN_SPLIT = 128  # tokens per simdgroup before another split pays for its share of the merge


def plan(s: int, splits: int | None = None) -> tuple[int, int]:
    """(tokens per split, number of splits) covering s >= 1 tokens, no split empty."""
    if splits is None:
        splits = max(1, min(MAX_SPLITS, -(-s // MIN_SPLIT)))
    span = -(-s // max(1, min(splits, s)))
    return span, -(-s // span)


def merge(out: mx.array, lse: mx.array) -> tuple[mx.array, mx.array]:
    """out [BH, splits, R, D] and lse [BH, splits, R] (float32) → (out [BH, R, D], lse [BH, R])."""
    total = mx.logsumexp(lse, axis=1)
    # rows where every split is empty: total −inf, weights exp(−inf − 0) = 0, out 0
    weights = mx.exp(lse - mx.where(mx.isinf(total), 0.0, total)[:, None])
    return (weights[..., None] * out).sum(axis=1), total


def no_keys(q: mx.array) -> tuple[mx.array, mx.array]:
    """(out 0, lse −inf) of queries q [B, Hq, T, D] over an empty tier, which the merge weighs as nothing."""
    return mx.zeros(q.shape, dtype=q.dtype), mx.full(q.shape[:3], -mx.inf, dtype=mx.float32)


def launch_merged(name: str, q: mx.array, kv_heads: int, n: int, inputs: list, template: list):
    """Run split-decode kernel `name` (one simdgroup per (batch·KV head, split), n splits) and merge its
    splits: (out [B, Hq, T, D] in q's dtype, lse [B, Hq, T] float32)."""
    b, hq, t, d = q.shape
    bh, rows = b * kv_heads, (hq // kv_heads) * t
    out, lse = launch(name, inputs, template, grid=(32 * bh, n, 1), threadgroup=(32, 1, 1),
                      outputs=[((bh, n, rows, d), mx.float32), ((bh, n, rows), mx.float32)])
    out, lse = merge(out, lse)
    return out.reshape(b, hq, t, d).astype(q.dtype), lse.reshape(b, hq, t)
