"""Flash-decoding splits: how the decode kernels cut the sequence, and the log-sum-exp merge of the splits'
(out, lse), the same merge kvrt.attention applies to tiers."""

from __future__ import annotations

import mlx.core as mx

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
