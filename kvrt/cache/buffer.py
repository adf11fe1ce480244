"""SeqBuffer: the one growable buffer along the sequence axis that every stored tier uses."""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from kvrt.cache import rows as batch_rows
from kvrt.cache.ops import Array, Ops


class SeqBuffer:
    """Rows of shape [..., D] appended along axis -2, stored in one preallocated array.

    Capacity grows by at least `step` rows and by an eighth of itself, so decode copies the
    buffer rarely (amortized O(1) per token) while the slack stays small; the cache's
    `nbytes` counts the allocation itself (unused capacity included).
    """

    def __init__(self, ops: Ops, step: int = 64, pad: float = 0):
        self.ops = ops
        self.step = step
        self.pad = pad  # what fills a short row of a batch
        self.data: Array | None = None
        self.length = 0  # the longest row's
        self.row_lengths: np.ndarray | None = None  # per row, when the rows of a batch differ
        # after a sliding window dropped the oldest rows, `data` is a view into this allocation
        self.allocation: Array | None = None
        self.dropped = 0  # rows dropped off the front of the allocation since it was made

    def lengths(self) -> np.ndarray:
        """Rows stored per batch row."""
        return batch_rows.per_row(self.row_lengths, 0 if self.data is None else self.data.shape[0], self.length)

    @property
    def capacity(self) -> int:
        return 0 if self.data is None else self.data.shape[-2]

    def append(self, x: Array) -> None:
        """x: [..., T, D]; stored after the current rows (in a batch of rows that differ, T = 1 and
        each row's token goes after that row's own)."""
        needed = self.length + x.shape[-2]
        if needed > self.capacity:
            self._grow(x, needed)
        if self.row_lengths is None:
            self.data = self.ops.write_seq(self.data, self.length, x)
            self.length = needed
            return
        if x.shape[-2] != 1:
            raise ValueError("rows of different lengths take one token each")
        self.data = self.ops.write_rows(self.data, self.row_lengths.tolist(), x)
        self.row_lengths = self.row_lengths + 1
        self.length = needed

    @staticmethod
    def grown_capacity(capacity: int, needed: int, step: int) -> int:
        """The capacity a buffer of `capacity` rows grows to when it must hold `needed` (> capacity):
        by at least an eighth, in whole steps (admission reserves memory by this rule: `capacity_after`)."""
        target = max(needed, capacity + capacity // 8)
        return -(-target // step) * step

    @classmethod
    def capacity_after(cls, appends: Iterable[int], step: int = 64, singles: int = 0) -> int:
        """Rows a buffer of this `step` allocates when fed these appends (row counts) one after another,
        then `singles` appends of one row each (decode), counted in as many steps as it grows."""
        capacity = length = 0
        for rows in appends:
            length += rows
            if length > capacity:
                capacity = cls.grown_capacity(capacity, length, step)
        while capacity < length + singles:
            capacity = cls.grown_capacity(capacity, capacity + 1, step)
        return capacity

    @staticmethod
    def sliding_capacity(held: int, step: int = 64) -> int:
        """A bound on the rows allocated by a buffer that never holds more than `held` rows, dropping
        its oldest (a sliding window): up to a step dropped but not yet released (`drop_front`), and
        growth by an eighth in whole steps."""
        rows = held + step
        return rows + rows // 8 + step

    def _grow(self, like: Array, needed: int) -> None:
        capacity = self.grown_capacity(self.capacity, needed, self.step)
        grown = self.ops.alloc_seq(like, capacity)
        if self.length:
            grown = self.ops.write_seq(grown, 0, self.view())
        self.data, self.allocation, self.dropped = grown, None, 0

    def stored(self) -> Array | None:
        """The whole allocation (what the cache's nbytes counts), rows dropped at the front included."""
        return self.allocation if self.allocation is not None else self.data

    def append_rows(self, rows: Sequence[int], x: Array, batch: int) -> None:
        """x [len(rows), ..., n, D]: stored after each of these rows' own entries, in place, the other
        rows untouched (one row of a batch flushing a group while the rest decode); `batch`: the
        rows the buffer holds, allocated here if nothing was stored yet."""
        lengths = self.lengths() if self.data is not None else np.zeros(batch, dtype=np.int64)
        needed = int(lengths[list(rows)].max()) + x.shape[-2]
        if needed > self.capacity:
            like = self.data if self.data is not None else self.ops.take_rows(x, [0] * batch)
            self._grow(like, needed)
        for i, b in enumerate(rows):
            self.data = self.ops.write_row(self.data, b, int(lengths[b]), x[i : i + 1])
            lengths[b] += x.shape[-2]
        self.length, self.row_lengths = int(lengths.max()), batch_rows.ragged(lengths)

    def drop_front(self, drop: np.ndarray) -> None:
        """Drop each row's oldest drop[b] rows (a sliding window moving on, a row flushing a group).
        Dropped evenly, the rows left stay in place as a view into the allocation until `step` rows
        have gone, then move to an allocation of their own; dropped unevenly, each row that drops
        moves its rest to its front, in place."""
        lengths = self.lengths()
        kept = lengths - drop
        if (drop == drop[0]).all() and self.dropped + int(drop[0]) < self.step:
            self.allocation, self.dropped = self.stored(), self.dropped + int(drop[0])
            self.data = self.data[..., int(drop[0]):, :]  # the capacity after the rows stays usable
        elif (drop == drop[0]).all():
            rest = self.view()[..., int(drop[0]):, :]
            capacity = -(-(int(kept.max()) + 1) // self.step) * self.step
            self.data = self.ops.write_seq(self.ops.alloc_seq(rest, capacity), 0, rest)
            self.allocation, self.dropped = None, 0
        else:
            self.data = batch_rows.move_to_front(self.ops, self.data, drop, lengths, axis=-2)
        self.length, self.row_lengths = int(kept.max()), batch_rows.ragged(kept)

    def view(self, end: int | None = None) -> Array:
        """The stored rows [..., :end, :] (all of them by default)."""
        return self.data[..., : self.length if end is None else end, :]

    def trim(self, n: int) -> int:
        """Drop the newest n rows (kept allocated for reuse); returns how many were dropped."""
        if self.row_lengths is not None:
            raise ValueError("a batch of rows of different lengths cannot be trimmed")
        n = min(n, self.length)
        self.length -= n
        return n

    def take(self, rows: Sequence[int]) -> "SeqBuffer":
        """A buffer of these batch rows only, cut to the longest of them."""
        out = SeqBuffer(self.ops, self.step, self.pad)
        if self.data is None:
            return out
        lengths = self.lengths()[list(rows)]
        out.length = int(lengths.max()) if len(lengths) else 0
        out.data = batch_rows.take(self.ops, self.view(), rows, -2, out.length)
        out.row_lengths = batch_rows.ragged(lengths)
        return out

    @staticmethod
    def stack(parts: Sequence["SeqBuffer"], counts: Sequence[int]) -> "SeqBuffer":
        """One buffer holding every part's rows in order (`counts[i]` rows each), short rows padded."""
        first = parts[0]
        out = SeqBuffer(first.ops, first.step, first.pad)
        views = [p.view() if p.data is not None else None for p in parts]
        out.data = batch_rows.stack(first.ops, views, counts, -2, first.pad)
        if out.data is None:
            return out
        lengths = np.concatenate([p.lengths() if p.data is not None else np.zeros(c, dtype=np.int64)
                                  for p, c in zip(parts, counts)])
        out.length, out.row_lengths = int(lengths.max()), batch_rows.ragged(lengths)
        return out
