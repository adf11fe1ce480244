"""Tiers: one layer's tokens stored one way each; every tier answers `partial(q) -> (out, lse)`.

The full-precision tier holds tokens as they came (the newest tokens, and the whole cache
when nothing is compressed); the kept tier holds what eviction selected, with each
token's absolute position. CaliDrop's calibration tier lives with its method
(kvrt/cache/methods/calidrop.py).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from kvrt.cache import rows as batch_rows
from kvrt.cache.attention import DenseSegment
from kvrt.cache.buffer import SeqBuffer
from kvrt.cache.layer_shape import LayerShape
from kvrt.cache.ops import Array, Ops


class FullPrecisionTier:
    """Tokens kept as they came, in the model dtype: keys/values [B, Hkv, S, D]."""

    name = "full"

    def __init__(self, ops: Ops):
        self.ops = ops
        self.keys = SeqBuffer(ops)
        self.values = SeqBuffer(ops)

    @property
    def length(self) -> int:
        return self.keys.length

    def append(self, k: Array, v: Array) -> None:
        self.keys.append(k)
        self.values.append(v)

    def lengths(self) -> np.ndarray:
        """Tokens held per batch row."""
        return self.keys.lengths()

    def partial(self, q: Array, scale: float, causal_offset: int | None, with_lse: bool, window: int | None = None):
        """(out, lse) of q [B, Hq, T, D] over this tier; causal_offset and window as in
        Ops.partial_attention (a window reads only the keys its queries can see). Rows of a batch
        shorter than the longest hide their padding through the key bias."""
        end = self.length if causal_offset is None else min(self.length, causal_offset + q.shape[2])
        start = 0 if window is None or causal_offset is None else max(0, causal_offset - window + 1)
        lengths = batch_rows.short_rows(self.keys.row_lengths, end)
        if start:
            causal_offset, lengths = causal_offset - start, None if lengths is None else lengths - start
        keys, values = self.keys.view(end)[..., start:, :], self.values.view(end)[..., start:, :]
        return self.ops.partial_attention(q, keys, values, scale, causal_offset, with_lse, key_lengths=lengths,
                                          window=window)

    def segments(self) -> list[DenseSegment]:
        """What a fused decode kernel reads: the buffers' stored tokens, each row to its own length."""
        lengths = batch_rows.short_rows(self.keys.row_lengths, self.length)
        return [DenseSegment(self.keys.view(), self.values.view(), lengths)]

    def drop_front(self, drop: np.ndarray) -> None:
        """Drop each row's oldest drop[b] tokens (a sliding window moving on)."""
        self.keys.drop_front(drop)
        self.values.drop_front(drop)

    def take(self, rows: Sequence[int]) -> "FullPrecisionTier":
        out = FullPrecisionTier(self.ops)
        out.keys, out.values = self.keys.take(rows), self.values.take(rows)
        return out

    @staticmethod
    def stack(parts: Sequence["FullPrecisionTier"], counts: Sequence[int]) -> "FullPrecisionTier":
        out = FullPrecisionTier(parts[0].ops)
        out.keys = SeqBuffer.stack([p.keys for p in parts], counts)
        out.values = SeqBuffer.stack([p.values for p in parts], counts)
        return out

    def trim(self, n: int) -> int:
        self.values.trim(n)
        return self.keys.trim(n)

    def clear(self) -> None:
        """Drop every token and the buffers themselves (a compression moved them elsewhere)."""
        self.keys, self.values = SeqBuffer(self.ops), SeqBuffer(self.ops)

    def arrays(self) -> list[Array]:
        """Every array this tier stores (what nbytes counts)."""
        return [buf.stored() for buf in (self.keys, self.values) if buf.data is not None]

    @staticmethod
    def bytes_for(shape: LayerShape, appends: Sequence[int], singles: int = 0, step: int = 64) -> int:
        """Bytes its buffers (of `step`) allocate for these appends, then `singles` one-token ones."""
        return shape.tokens(SeqBuffer.capacity_after(appends, step, singles))


class KeptTier:
    """Tokens eviction selected, per KV head: k/v [B, Hkv, S, D] and their absolute positions
    (int32 [B, Hkv, S]). Rebuilt whole at each compression; the keys were rotated at their
    own positions and are never re-rotated, and every kept token precedes every newer one."""

    name = "kept"

    def __init__(self, ops: Ops):
        self.ops = ops
        self.k = self.v = self.positions = None
        self.row_lengths: np.ndarray | None = None  # per row, when the rows of a batch differ

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def lengths(self) -> np.ndarray:
        return batch_rows.per_row(self.row_lengths, 0 if self.k is None else self.k.shape[0], self.length)

    def replace(self, k: Array, v: Array, positions: Array) -> None:
        self.k, self.v, self.positions = k, v, positions
        self.row_lengths = None

    def partial(self, q: Array, scale: float, causal_offset: int | None, with_lse: bool, key_bias: Array | None = None):
        """(out, lse) over the kept tokens (all precede the queries); `key_bias` hides those outside
        a local layer's window."""
        lengths = batch_rows.short_rows(self.row_lengths, self.length)
        return self.ops.partial_attention(q, self.k, self.v, scale, None, with_lse, key_bias, key_lengths=lengths)

    def segments(self) -> list[DenseSegment]:
        """What a fused decode kernel reads: the kept tokens, each row to its own length."""
        return [DenseSegment(self.k, self.v, batch_rows.short_rows(self.row_lengths, self.length))]

    def take(self, rows: Sequence[int]) -> "KeptTier":
        out = KeptTier(self.ops)
        if self.k is None:
            return out
        lengths = self.lengths()[list(rows)]
        n = int(lengths.max())
        out.k, out.v = (batch_rows.take(self.ops, a, rows, -2, n) for a in (self.k, self.v))
        out.positions = batch_rows.take(self.ops, self.positions, rows, -1, n)
        out.row_lengths = batch_rows.ragged(lengths)
        return out

    @staticmethod
    def stack(parts: Sequence["KeptTier"], counts: Sequence[int]) -> "KeptTier":
        ops, out = parts[0].ops, KeptTier(parts[0].ops)
        out.k = batch_rows.stack(ops, [p.k for p in parts], counts, -2, 0)
        if out.k is None:
            return out
        out.v = batch_rows.stack(ops, [p.v for p in parts], counts, -2, 0)
        out.positions = batch_rows.stack(ops, [p.positions for p in parts], counts, -1, -1)
        lengths = [p.lengths() if p.k is not None else np.zeros(c, dtype=np.int64) for p, c in zip(parts, counts)]
        out.row_lengths = batch_rows.ragged(np.concatenate(lengths))
        return out

    def drop_front(self, drop: np.ndarray) -> None:
        """Drop each row's oldest drop[b] tokens (a row flushing a group into the quantized tier): each
        row that drops moves its rest to its front, in place; the tier empties when every row has."""
        lengths = self.lengths()
        left = lengths - drop
        if not left.any():
            return self.replace(None, None, None)
        self.k, self.v = (batch_rows.move_to_front(self.ops, a, drop, lengths, -2) for a in (self.k, self.v))
        self.positions = batch_rows.move_to_front(self.ops, self.positions, drop, lengths, -1)
        self.row_lengths = left if (left < self.length).any() else None

    def trim(self, n: int) -> int:
        return 0  # compressed tokens cannot be un-fed; only the newest tier rewinds

    def arrays(self) -> list[Array]:
        return [a for a in (self.k, self.v, self.positions) if a is not None]

    @staticmethod
    def bytes_for(shape: LayerShape, tokens: int) -> int:
        """Bytes of `tokens` kept tokens: k, v and int32 positions, arrays of exactly that length."""
        return shape.tokens(tokens) + shape.per_head(tokens)
