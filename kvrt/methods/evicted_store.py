"""Where CaliDrop keeps the evicted tokens it may recompute over: in full precision, or
quantized in kvrt's KIVI format (`calidrop:offload=int2|int4|int8`, groups of 32 tokens)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from kvrt import rows as batch_rows
from kvrt.attention import merge_partials
from kvrt.buffer import SeqBuffer
from kvrt.errors import InvalidValue
from kvrt.ops import Array, Ops

OFFLOAD_GROUP = 32  # KIVI's paper setting: tokens per key group of the quantized evicted tier
OFFLOADS = ("none", "int2", "int4", "int8")


def check_offload(offload: str) -> None:
    if offload not in OFFLOADS:
        raise InvalidValue(f"calidrop: offload must be one of {', '.join(OFFLOADS)}, got {offload}")


def evicted_store(ops: Ops, offload: str):
    """Full precision in host memory (offload=none), or quantized on the device, 4-14x smaller."""
    check_offload(offload)
    return FullStore(ops, host=True) if offload == "none" else QuantizedStore(ops, int(offload[3:]))


class FullStore:
    """Evicted k/v [B, Hkv, E, D] as they came, in host memory if `host`, in growable buffers
    (decode-time eviction adds a token per step: appending must not copy the whole tier)."""

    def __init__(self, ops: Ops, host: bool = False, step: int = 64):
        self.ops, self.host, self.step = ops, host, step
        self.keys, self.values = SeqBuffer(ops, step), SeqBuffer(ops, step)

    @property
    def length(self) -> int:
        return self.keys.length

    def lengths(self) -> np.ndarray:
        return self.keys.lengths()

    def take(self, rows: Sequence[int]) -> "FullStore":
        out = FullStore(self.ops, self.host, self.step)
        out.keys, out.values = self.keys.take(rows), self.values.take(rows)
        return out

    @staticmethod
    def stack(parts: Sequence["FullStore"], counts: Sequence[int]) -> "FullStore":
        out = FullStore(parts[0].ops, parts[0].host, parts[0].step)
        out.keys = SeqBuffer.stack([p.keys for p in parts], counts)
        out.values = SeqBuffer.stack([p.values for p in parts], counts)
        return out

    def signature(self, row: int) -> tuple:
        return (int(self.lengths()[row]) if self.length else 0,)

    def add(self, k: Array, v: Array) -> None:
        if self.host:
            k, v = self.ops.to_host(k), self.ops.to_host(v)
        self.keys.append(k)
        self.values.append(v)

    def tokens(self) -> tuple[Array, Array]:
        """Every stored token in full precision, in the order added."""
        return self.keys.view(), self.values.view()

    def local_to(self, q: Array) -> bool:
        """Whether attending with q reads the tier where it lies (no copy to q's device first)."""
        k = self.keys.view()
        return self.ops.to_device_of(k, q) is k

    def partial(self, q: Array, scale: float, heads: list[int] | None) -> tuple[Array, Array]:
        ops = self.ops
        k, v = self.tokens()
        k, v = ops.to_device_of(k, q), ops.to_device_of(v, q)
        bias = batch_rows.length_bias(ops, self.keys.row_lengths, self.length, k)
        if heads is not None:
            k, v = ops.select_heads(k, heads), ops.select_heads(v, heads)
            bias = None if bias is None else ops.select_heads(bias, heads)
        return ops.partial_attention(q, k, v, scale, None, True, bias)

    def arrays(self) -> list[Array]:
        return [a for a in (self.keys.stored(), self.values.stored()) if a is not None]


class QuantizedStore:
    """Evicted tokens in whole quantized groups, the last partial group in full precision; on the device."""

    def __init__(self, ops: Ops, bits: int):
        from kvrt.methods.kivi import KIVI

        self.ops, self.config = ops, KIVI(bits=bits, group=OFFLOAD_GROUP, residual=0)
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

    def add(self, k: Array, v: Array) -> None:
        self.rest.add(k, v)
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

    def partial(self, q: Array, scale: float, heads: list[int] | None) -> tuple[Array, Array]:
        parts = [self.groups.partial(q, scale, None, True, heads)] if self.groups.length else []
        parts += [self.rest.partial(q, scale, heads)] if self.rest.length else []
        return merge_partials(self.ops, parts)

    def arrays(self) -> list[Array]:
        return self.groups.arrays() + self.rest.arrays()
