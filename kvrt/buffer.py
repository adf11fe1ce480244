"""SeqBuffer: the one growable buffer along the sequence axis that every stored tier uses."""

from __future__ import annotations

from kvrt.ops import Array, Ops


class SeqBuffer:
    """Rows of shape [..., D] appended along axis -2, stored in one preallocated array.

    Capacity grows by at least `step` rows and by an eighth of itself, so decode copies the
    buffer rarely (amortized O(1) per token) while the slack stays small; the cache's
    `nbytes` counts the allocation itself (unused capacity included).
    """

    def __init__(self, ops: Ops, step: int = 64):
        self.ops = ops
        self.step = step
        self.data: Array | None = None
        self.length = 0

    @property
    def capacity(self) -> int:
        return 0 if self.data is None else self.data.shape[-2]

    def append(self, x: Array) -> None:
        """x: [..., T, D]; stored after the current rows."""
        needed = self.length + x.shape[-2]
        if needed > self.capacity:
            self._grow(x, needed)
        self.data = self.ops.write_seq(self.data, self.length, x)
        self.length = needed

    def _grow(self, like: Array, needed: int) -> None:
        target = max(needed, self.capacity + self.capacity // 8)
        capacity = -(-target // self.step) * self.step
        grown = self.ops.alloc_seq(like, capacity)
        if self.length:
            grown = self.ops.write_seq(grown, 0, self.view())
        self.data = grown

    def view(self, end: int | None = None) -> Array:
        """The stored rows [..., :end, :] (all of them by default)."""
        return self.data[..., : self.length if end is None else end, :]

    def trim(self, n: int) -> int:
        """Drop the newest n rows (kept allocated for reuse); returns how many were dropped."""
        n = min(n, self.length)
        self.length -= n
        return n
