"""One layer's KV shape, for counting the bytes a cache's tiers come to hold (kvrt/cache/admission.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LayerShape:
    """One layer's KV: `heads` KV heads of `dim` channels in a dtype of `itemsize` bytes; `query_heads`."""

    heads: int
    dim: int
    itemsize: int
    query_heads: int

    def tokens(self, rows: int) -> int:
        """Bytes of keys and values (or of pairs, each key beside its value) for `rows` token slots."""
        return 2 * rows * self.heads * self.dim * self.itemsize

    def per_head(self, rows: int, itemsize: int = 4) -> int:
        """Bytes of one scalar per KV head and token (positions, scores, H2O's sums)."""
        return rows * self.heads * itemsize
