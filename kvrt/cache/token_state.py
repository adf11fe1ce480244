"""Per-token state an eviction method keeps beside a layer's cache (H2O's attention sums).

One float32 value per (batch row, KV head, full-precision token), laid out as the eviction
candidates are: the kept tier's tokens, then the newest tier's, each part padded to its longest
row. The layer cache moves the values with their tokens through this interface, whatever they
mean: a method subclasses `TokenState`, says how a chunk's attention updates them (`observe`),
and reads them as `Candidates.state` when it scores. A method without one has None.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from kvrt.cache import rows as batch_rows
from kvrt.cache.layer_shape import LayerShape
from kvrt.cache.ops import Array, Ops


class TokenState:
    """values: float32 [B, Hkv, kept + newest] (None until the first `observe`); `unscored`: the newest
    tokens of the chunk being attended, which have no value until `observe` covers them."""

    def __init__(self, ops: Ops):
        self.ops = ops
        self.values: Array | None = None
        self.unscored = 0

    @staticmethod
    def bytes_for(shape: LayerShape, tokens: int) -> int:
        """Bytes of the values over `tokens` full-precision tokens of a layer of this LayerShape."""
        return shape.per_head(tokens)

    def observe(self, q: Array, keys: Array, scale: float, block: int) -> None:
        """Take in a chunk's attention: q [B, Hq, T, D] are the queries of the newest T of the
        candidates' keys [B, Hkv, S, D]; queries are taken `block` at a time. Covers every token."""
        raise NotImplementedError

    def appended(self, count: int) -> None:
        """The newest tier took `count` tokens that no value covers until `observe`."""
        self.unscored = count

    def settled(self) -> None:
        """The chunk's compression is over: no token waits for `observe` any more."""
        self.unscored = 0

    def select(self, keep: Array) -> None:
        """Eviction kept these candidates (int [B, Hkv, budget], ascending): their values, in that order."""
        if self.values is not None:
            self.values = self.ops.gather_seq(self.values, keep)

    def drop_front(self, count: int) -> None:
        """The oldest `count` full-precision tokens left it (a quantizer flushed them)."""
        if self.values is not None:
            self.values = self.values[..., count:]

    def drop_back(self, count: int) -> None:
        """The newest `count` tokens were forgotten (a rewind)."""
        if count and self.values is not None:
            self.values = self.values[..., : self.values.shape[2] - count]

    def drop_newest_front(self, kept: int, drop: np.ndarray, newest_lengths: np.ndarray) -> None:
        """Each row's oldest drop[b] newest tokens left (a sliding window moved on); `kept`: the kept
        tier's length, `newest_lengths`: the newest tier's per row before the drop."""
        if self.values is None:
            return
        ops, values = self.ops, self.values
        newest = batch_rows.drop_front(ops, values[..., kept:], drop, newest_lengths, axis=-1)
        self.values = ops.concat([values[..., :kept], newest], axis=2) if kept else newest

    def reorder_kept(self, kept: int, order: Array) -> None:
        """The kept tier (of `kept` tokens) became these of its tokens (int [B, Hkv, n], n possibly 0)."""
        if self.values is None:
            return
        ops, newest = self.ops, self.values[..., kept:]
        if order.shape[2]:
            self.values = ops.concat([ops.gather_seq(self.values[..., :kept], order), newest], axis=2)
        else:
            self.values = newest

    def take(self, rows: Sequence[int], kept: int, kept_after: int, newest_after: int) -> "TokenState":
        """These batch rows only: the kept part (`kept` long) cut to `kept_after`, the newest part to
        the `newest_after` newest tokens those rows hold, less those not yet covered."""
        out = self._empty()
        out.unscored = self.unscored
        if self.values is None:
            return out
        ops = self.ops
        part = batch_rows.take(ops, self.values[..., :kept], rows, -1, kept_after)
        newest = batch_rows.take(ops, self.values[..., kept:], rows, -1, newest_after - self.unscored)
        out.values = ops.concat([part, newest], axis=2) if kept_after else newest
        return out

    @staticmethod
    def stack(parts: Sequence["TokenState"], kept: Sequence[int], counts: Sequence[int]) -> "TokenState":
        """One state holding every part's rows in order; `kept[i]`: part i's kept tier length, `counts[i]`
        its rows. Each part (kept, newest) is padded with zeros to the longest."""
        first = parts[0]
        out = first._empty()
        out.unscored = first.unscored
        if all(p.values is None for p in parts):
            return out
        ops = first.ops
        kept_parts = [p.values[..., :n] if n else None for p, n in zip(parts, kept)]
        newest_parts = [p.values[..., n:] for p, n in zip(parts, kept)]
        kept_all = batch_rows.stack(ops, kept_parts, counts, -1, 0.0)
        newest_all = batch_rows.stack(ops, newest_parts, counts, -1, 0.0)
        out.values = newest_all if kept_all is None else ops.concat([kept_all, newest_all], axis=2)
        return out

    def _empty(self) -> "TokenState":
        return type(self)(self.ops)

    def arrays(self) -> list[Array]:
        return [self.values] if self.values is not None else []
