"""Tiers: one layer's tokens stored one way each; every tier answers `partial(q) -> (out, lse)`.

The full-precision tier holds tokens as they came (the newest tokens, and the whole cache
when nothing is compressed); the kept tier holds what eviction selected, with each
token's absolute position. CaliDrop's calibration tier lives with its method
(kvrt/methods/calidrop.py).
"""

from __future__ import annotations

from kvrt.buffer import SeqBuffer
from kvrt.ops import Array, Ops


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

    def partial(self, q: Array, scale: float, causal_offset: int | None, with_lse: bool):
        """(out, lse) of q [B, Hq, T, D] over this tier; causal_offset as in Ops.partial_attention."""
        end = self.length if causal_offset is None else min(self.length, causal_offset + q.shape[2])
        return self.ops.partial_attention(
            q, self.keys.view(end), self.values.view(end), scale, causal_offset, with_lse
        )

    def trim(self, n: int) -> int:
        self.values.trim(n)
        return self.keys.trim(n)

    def clear(self) -> None:
        """Drop every token and the buffers themselves (a compression moved them elsewhere)."""
        self.keys, self.values = SeqBuffer(self.ops), SeqBuffer(self.ops)

    def arrays(self) -> list[Array]:
        """Every array this tier stores (what nbytes counts)."""
        return [buf.data for buf in (self.keys, self.values) if buf.data is not None]


class KeptTier:
    """Tokens eviction selected, per KV head: k/v [B, Hkv, S, D] and their absolute positions
    (int32 [B, Hkv, S]). Rebuilt whole at each compression; the keys were rotated at their
    own positions and are never re-rotated, and every kept token precedes every newer one."""

    name = "kept"

    def __init__(self, ops: Ops):
        self.ops = ops
        self.k = self.v = self.positions = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def replace(self, k: Array, v: Array, positions: Array) -> None:
        self.k, self.v, self.positions = k, v, positions

    def partial(self, q: Array, scale: float, causal_offset: int | None, with_lse: bool):
        return self.ops.partial_attention(q, self.k, self.v, scale, None, with_lse)

    def trim(self, n: int) -> int:
        return 0  # compressed tokens cannot be un-fed; only the newest tier rewinds

    def arrays(self) -> list[Array]:
        return [a for a in (self.k, self.v, self.positions) if a is not None]
