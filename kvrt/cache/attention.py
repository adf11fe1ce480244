"""The one idea of kvrt: attention over a cache is a log-sum-exp merge of per-tier partials.

Each tier (kept, quantized, outliers, residual, calibration ...) returns the attention of
the queries over its own keys as (out_i, lse_i). Because the tiers hold disjoint key sets,
the exact softmax over their union is

    lse = log Σ_i exp(lse_i),    out = Σ_i exp(lse_i − lse) · out_i

so full attention, eviction, calibration and quantized attention differ only in which
tiers take part; a kernel is just a faster partial for one tier.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from kvrt.cache.ops import Array, Ops

if TYPE_CHECKING:
    import numpy as np

    from kvrt.cache.quant import QuantizedKeys, QuantizedValues


def merge_partials(ops: Ops, parts: Sequence[tuple[Array, Array]]) -> tuple[Array, Array]:
    """Merge (out [B, Hq, T, D], lse [B, Hq, T]) partials over disjoint key sets into one."""
    if len(parts) == 1:
        return parts[0]
    lse = ops.logsumexp([p_lse for _, p_lse in parts])
    # a row that sees no key in any part (a short row of a batch) has lse −inf: weigh it 0, not nan
    finite = ops.where(lse > float("-inf"), lse, 0.0)
    out = None
    for p_out, p_lse in parts:
        weight = ops.expand_last(ops.exp(p_lse - finite))
        term = weight * p_out
        out = term if out is None else out + term
    return ops.cast_like(out, parts[0][0]), lse


# What a fused decode kernel reads of each tier: its stored arrays, as they lie. The kernel's
# (out, lse) is merge_partials over the tiers' own partials, in one pass (its reference twin).


@dataclass
class DenseSegment:
    """Full-precision keys and values [B, Hkv, S, D] (views into a tier's buffers), row b holding its
    first lengths[b] tokens (None: all S); bias: None or float32 [B, Hkv, S] (−inf hides a key)."""

    k: Array
    v: Array
    lengths: "np.ndarray | None" = None
    bias: Array | None = None


@dataclass
class PackedSegment:
    """A quantized tier's groups as stored (kvrt/cache/quant.py), row b holding lengths[b] tokens (whole
    groups; None: all); slots: None or OTT's traced slots int32 [B, Hkv, groups, O] (−1: none), hidden;
    bias: None or float32 [B, Hkv, S]."""

    keys: "QuantizedKeys"
    values: "QuantizedValues"
    lengths: "np.ndarray | None" = None
    slots: Array | None = None
    bias: Array | None = None
