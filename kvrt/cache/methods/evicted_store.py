"""Where CaliDrop keeps the evicted tokens it may recompute over: in full precision, or
quantized in kvrt's KIVI format (`calidrop:offload=int2|int4|int8`, groups of 32 tokens)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from kvrt.cache import rows as batch_rows
from kvrt.cache.attention import merge_partials
from kvrt.cache.buffer import SeqBuffer
from kvrt.cache.layer_shape import LayerShape
from kvrt.cache.methods.kivi import KIVI
from kvrt.errors import InvalidValue
from kvrt.cache.ops import Array, Ops

OFFLOAD_GROUP = 32  # KIVI's paper setting: tokens per key group of the quantized evicted tier
OFFLOADS = ("none", "int2", "int4", "int8")


def check_offload(offload: str) -> None:
    if offload not in OFFLOADS:
        raise InvalidValue(f"calidrop: offload must be one of {', '.join(OFFLOADS)}, got {offload}")


def paired_partial(ops: Ops, q: Array, pairs: Array, scale: float, bias: Array | None = None,
                   mean_key: bool = False) -> tuple:
    """(out, lse) of q over tokens stored as pairs [B, Hkv, E, 2D] (each key beside its value), and
    with `mean_key` the keys' mean under the same weights: the pairs serve as values, one pass."""
    d = pairs.shape[-1] // 2
    out, lse = ops.partial_attention(q, pairs[..., :d], pairs if mean_key else pairs[..., d:], scale, None, True, bias)
    return (out[..., d:], lse, out[..., :d]) if mean_key else (out, lse)


def evicted_store(ops: Ops, offload: str):
    """Full precision in host memory (offload=none), or quantized on the device, 4-14x smaller."""
    check_offload(offload)
    return FullStore(ops, host=True) if offload == "none" else QuantizedStore(ops, int(offload[3:]))


def evicted_store_bytes(shape: LayerShape, offload: str, first: int, more: int) -> int:
    """The most bytes `evicted_store(ops, offload)` holds for a layer of this shape that evicts `first`
    tokens at once, then `more` one at a time."""
    if offload == "none":
        return FullStore.bytes_for(shape, first, more)
    return QuantizedStore.bytes_for(shape, int(offload[3:]), first, more)


class FullStore:
    """Evicted tokens [B, Hkv, E, D] as they came, each token's key and value side by side in one
    growable buffer [B, Hkv, E, 2D], in host memory if `host`. Growable: decode-time eviction adds a
    token per step, and appending must not copy the whole tier. Side by side: one attention with
    the pairs as values gives the partial and rule=taylor's mean key together."""

    def __init__(self, ops: Ops, host: bool = False, step: int = 64):
        self.ops, self.host, self.step = ops, host, step
        self.pairs = SeqBuffer(ops, step)

    @property
    def length(self) -> int:
        return self.pairs.length

    def lengths(self) -> np.ndarray:
        return self.pairs.lengths()

    def take(self, rows: Sequence[int]) -> "FullStore":
        out = FullStore(self.ops, self.host, self.step)
        out.pairs = self.pairs.take(rows)
        return out

    @staticmethod
    def stack(parts: Sequence["FullStore"], counts: Sequence[int]) -> "FullStore":
        out = FullStore(parts[0].ops, parts[0].host, parts[0].step)
        out.pairs = SeqBuffer.stack([p.pairs for p in parts], counts)
        return out

    def signature(self, row: int) -> tuple:
        return (int(self.lengths()[row]) if self.length else 0,)

    def add(self, k: Array, v: Array, pairs: Array | None = None) -> None:
        """Store k, v [B, Hkv, E, D]; `pairs`: the same side by side, where the caller has them."""
        pairs = self.ops.concat([k, v], axis=-1) if pairs is None else pairs
        self.pairs.append(self.ops.to_host(pairs) if self.host else pairs)

    def tokens(self) -> tuple[Array, Array]:
        """Every stored token in full precision, in the order added (views into the buffer)."""
        pairs = self.pairs.view()
        d = pairs.shape[-1] // 2
        return pairs[..., :d], pairs[..., d:]

    def local_to(self, q: Array) -> bool:
        """Whether attending with q reads the tier where it lies (no copy to q's device first)."""
        if self.pairs.data is None:
            return True  # nothing to move
        pairs = self.pairs.view()
        return self.ops.to_device_of(pairs, q) is pairs

    def pairs_of(self) -> tuple[Array | None, np.ndarray | None]:
        """What a fused CaliDrop step reads: the pairs [B, Hkv, E, 2D] as stored (None when empty) and
        each row's own length (None when all rows hold E)."""
        if not self.length:
            return None, None
        return self.pairs.view(), batch_rows.short_rows(self.pairs.row_lengths, self.length)

    def partial(self, q: Array, scale: float, heads: list[int] | None, mean_key: bool = False) -> tuple:
        """(out, lse) of q over the tier, and with `mean_key` the keys' mean under the same weights."""
        ops = self.ops
        pairs = ops.to_device_of(self.pairs.view(), q)
        bias = batch_rows.length_bias(ops, self.pairs.row_lengths, self.length, pairs)
        if heads is not None:
            pairs = ops.select_heads(pairs, heads)
            bias = None if bias is None else ops.select_heads(bias, heads)
        return paired_partial(ops, q, pairs, scale, bias, mean_key)

    def arrays(self) -> list[Array]:
        return [self.pairs.stored()] if self.pairs.data is not None else []

    @staticmethod
    def bytes_for(shape: LayerShape, first: int, more: int, step: int = 64) -> int:
        """Its pairs buffer after `first` tokens at once (none if 0), then `more` one at a time."""
        return shape.tokens(SeqBuffer.capacity_after([first] * bool(first), step, more))


class QuantizedStore:
    """Evicted tokens in whole quantized groups, the last partial group in full precision; on the device."""

    def __init__(self, ops: Ops, bits: int):
        self.ops, self.config = ops, self.format(bits)
        self.groups = self.config.new_tier(ops)
        self.rest = FullStore(ops, step=OFFLOAD_GROUP)  # less than a group waits here between flushes

    @property
    def length(self) -> int:
        return self.groups.length + self.rest.length

    def lengths(self) -> np.ndarray:
        """Evicted tokens held per batch row (groups and the full-precision rest)."""
        groups, rest = self.groups.lengths(), self.rest.lengths()
        return groups if not len(rest) else rest if not len(groups) else groups + rest

    def take(self, rows: Sequence[int]) -> "QuantizedStore":
        out = QuantizedStore(self.ops, self.config.bits)
        out.groups, out.rest = self.groups.take(rows), self.rest.take(rows)
        return out

    @staticmethod
    def stack(parts: Sequence["QuantizedStore"], counts: Sequence[int]) -> "QuantizedStore":
        out = QuantizedStore(parts[0].ops, parts[0].config.bits)
        out.groups = type(out.groups).stack([p.groups for p in parts], counts)
        out.rest = FullStore.stack([p.rest for p in parts], counts)
        return out

    def signature(self, row: int) -> tuple:
        groups = self.groups.lengths()
        return (int(groups[row]) if len(groups) else 0, *self.rest.signature(row))

    def add(self, k: Array, v: Array, pairs: Array | None = None) -> None:
        self.rest.add(k, v, pairs)
        m = self.config.groups_to_flush(self.rest.length) * self.config.group
        if m:
            k, v = self.rest.tokens()
            self.groups.add(k[..., :m, :], v[..., :m, :])
            self.rest = FullStore(self.ops, step=OFFLOAD_GROUP)
            if k.shape[2] > m:
                self.rest.add(k[..., m:, :], v[..., m:, :])  # appending copies them into the new buffers

    def tokens(self) -> tuple[Array, Array]:
        """Every stored token, dequantized (a cap re-selection re-stores them)."""
        parts = [self.groups.block(0, self.groups.length // self.config.group)] if self.groups.length else []
        parts += [self.rest.tokens()] if self.rest.length else []
        if len(parts) == 1:
            return parts[0]
        return tuple(self.ops.concat([p[i] for p in parts], axis=2) for i in range(2))

    def local_to(self, q: Array) -> bool:
        return True  # kept on the device

    def pairs_of(self) -> None:
        return None  # its groups are packed: the step takes the ops path

    def partial(self, q: Array, scale: float, heads: list[int] | None, mean_key: bool = False) -> tuple:
        """As FullStore.partial; the mean key takes one more pass, over the dequantized keys."""
        ops = self.ops
        parts = [self.groups.partial(q, scale, None, True, heads)] if self.groups.length else []
        parts += [self.rest.partial(q, scale, heads)] if self.rest.length else []
        out, lse = merge_partials(ops, parts)
        if not mean_key:
            return out, lse
        k, _ = self.tokens()
        k = k if heads is None else ops.select_heads(k, heads)
        lengths = batch_rows.short_rows(self.lengths(), k.shape[2])
        return out, lse, ops.partial_attention(q, k, k, scale, key_lengths=lengths)[0]

    def arrays(self) -> list[Array]:
        return self.groups.arrays() + self.rest.arrays()

    @staticmethod
    def format(bits: int) -> KIVI:
        """kvrt's KIVI format for it: groups of OFFLOAD_GROUP tokens, flushed whole (no residual)."""
        return KIVI(bits=bits, group=OFFLOAD_GROUP, residual=0)

    @classmethod
    def bytes_for(cls, shape: LayerShape, bits: int, first: int, more: int) -> int:
        """Its groups and full-precision rest (buffers of a group) after `first` tokens at once, then
        `more` one at a time: a quantized layer's, with nothing evicted from it."""
        return cls.format(bits).layer_bytes(shape, 0, first, first, more, None, OFFLOAD_GROUP)
