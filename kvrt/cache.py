"""The layer cache: tiers of the same layer's K/V, attended to by one (out, lse) merge.

The model hands each layer's new q, k, v (keys after RoPE, per KV head) to
`LayerCache.attend`, which stores them and returns the attention output. Prefill goes
through the same call with T > 1 and is computed in query blocks, so the score matrix
never exceeds `query_block × S` per head; eviction and quantization (later tiers) hook
into `attend` after a layer's prompt attention, while that layer is still in hand.
"""

from __future__ import annotations

from typing import Iterable

from kvrt.attention import merge_partials
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

    def arrays(self) -> list[Array]:
        """Every array this tier stores (what nbytes counts)."""
        return [buf.data for buf in (self.keys, self.values) if buf.data is not None]


class LayerCache:
    """One layer's KV cache: an ordered set of tiers, the newest tokens in `self.newest`."""

    def __init__(self, ops: Ops, layer_idx: int, query_block: int = 512):
        self.ops = ops
        self.layer_idx = layer_idx
        self.query_block = query_block
        self.newest = FullPrecisionTier(ops)
        self.tiers = [self.newest]
        self.offset = 0  # absolute position of the next token

    def attend(self, q: Array, k: Array, v: Array, scale: float) -> Array:
        """Store k/v [B, Hkv, T, D] and return attention out [B, Hq, T, D] of q [B, Hq, T, D].

        Query t (absolute position offset + t) sees every earlier token and the new ones up to t.
        """
        base = self.newest.length
        self.newest.append(k, v)
        self.offset += k.shape[2]
        t = q.shape[2]
        if t == 1:  # decode: every stored key is visible
            return self._attend_block(q, scale, causal_offset=None)
        if self.ops.fused_prefill and all(tier is self.newest for tier in self.tiers if tier.length):
            # a lone tier needs no lse, and a flash kernel bounds memory itself: one call, no blocks
            return self.newest.partial(q, scale, base, with_lse=False)[0]
        blocks = [
            self._attend_block(q[:, :, s : s + self.query_block], scale, causal_offset=base + s)
            for s in range(0, t, self.query_block)
        ]
        return blocks[0] if len(blocks) == 1 else self.ops.concat(blocks, axis=2)

    def _attend_block(self, q: Array, scale: float, causal_offset: int | None) -> Array:
        active = [tier for tier in self.tiers if tier.length]
        with_lse = len(active) > 1  # a lone tier needs no merge, so skip computing its lse
        parts = [
            tier.partial(q, scale, causal_offset if tier is self.newest else None, with_lse)
            for tier in active
        ]
        out, _ = merge_partials(self.ops, parts)
        return out

    def trim(self, n: int) -> int:
        """Forget the newest n tokens (chat rewinds to a shared prefix); returns how many went."""
        n = self.newest.trim(n)
        self.offset -= n
        return n

    def arrays(self) -> list[Array]:
        return [a for tier in self.tiers for a in tier.arrays()]

    def nbytes(self) -> int:
        """Bytes of every stored array, metadata included, as allocated."""
        return sum(self.ops.nbytes(a) for a in self.arrays())


class KVCache:
    """The whole model's cache: one LayerCache per decoder layer."""

    def __init__(self, ops: Ops, num_layers: int, query_block: int = 512):
        self.ops = ops
        self.layers = [LayerCache(ops, i, query_block) for i in range(num_layers)]

    @property
    def offset(self) -> int:
        """Tokens every layer holds (a forward interrupted mid-model leaves early layers ahead)."""
        return min(layer.offset for layer in self.layers)

    def trim(self, n: int) -> int:
        return [layer.trim(n) for layer in self.layers][0]

    def rewind_to(self, length: int) -> None:
        """Keep only the first `length` tokens in every layer (also repairs a forward cut short mid-layer)."""
        for layer in self.layers:
            layer.trim(max(layer.offset - length, 0))

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def __iter__(self) -> Iterable[LayerCache]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> LayerCache:
        return self.layers[i]
