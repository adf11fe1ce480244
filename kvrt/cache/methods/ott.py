"""OTT: KIVI with outlier-token tracing (arXiv 2505.10938, "Accurate KV Cache Quantization with
Outlier Tokens Tracing").

A few tokens have unusually *small* keys; inside a per-channel key group they stretch the
range every other token is quantized with. OTT keeps them out of the groups. At each flush,
per KV head, the candidates are the group's G new tokens plus the current outlier pool;
the `outliers` with the smallest key L1 norm (Σ|k| over channels) form the new pool, kept in
full precision. A new token that enters the pool leaves a slot in its group: the slot's key
is replaced by the mean of the group's other keys before min/max (so it widens no range),
and the slot is hidden in attention (its token is read from the pool instead, never twice).
A member pushed out of the pool moves to the overflow pool, also full precision; a head
traces only while its overflow pool can still take every current member, after that its
pool is frozen and its groups quantize as plain KIVI. The first `skip_layers` layers trace
nothing (the paper finds no such tokens there).

Choices where the paper leaves room, stated here:
- the substituted key is the mean of the group's untraced tokens; values are quantized per
  token, so a traced token's value slot cannot disturb others and is left as it is;
- ties in key magnitude keep the earlier candidate (current pool members come first).
"""

from __future__ import annotations

from typing import Sequence

from kvrt.cache import rows as batch_rows
from kvrt.cache.attention import DenseSegment
from kvrt.cache.buffer import SeqBuffer
from kvrt.cache.layer_shape import LayerShape
from kvrt.errors import InvalidValue
from kvrt.cache.methods.kivi import KIVI, QuantizedTier
from kvrt.cache.ops import Array, Ops

INF = float("inf")


class OTT(KIVI):
    name = "ott"
    options = {**KIVI.options, "outliers": int, "overflow": int, "skip_layers": int}

    # group 32 and residual 64, not the paper's 128 and 32: measured step by step on two models
    # (bench/RESULTS.md, issue 14), they beat kivi:bits=2 at fewer KV bytes; the paper's lose to it
    def __init__(self, bits: int = 2, group: int = 32, residual: int = 64, value_group: int = 0,
                 outliers: int = 3, overflow: int = 32, skip_layers: int = 2):
        super().__init__(bits, group, residual, value_group)
        if not 0 <= outliers < group:
            raise InvalidValue(f"ott: outliers must be >= 0 and below the group size {group}, got {outliers}")
        if overflow < 0 or skip_layers < 0:
            raise InvalidValue(f"ott: overflow and skip_layers must be >= 0, got {overflow} and {skip_layers}")
        self.outliers, self.overflow, self.skip_layers = outliers, overflow, skip_layers

    def tier_type(self, layer_idx: int) -> type[QuantizedTier]:
        return QuantizedTier if layer_idx < self.skip_layers else TracedTier


class TracedTier(QuantizedTier):
    """KIVI's quantized groups plus, per KV head: the outlier pool k/v [B, Hkv, O, D] with its
    key norms (float32 [B, Hkv, O], +inf marks an empty slot), the overflow pool k/v
    [B, Hkv, C, D] with a validity flag (float32 [B, Hkv, C]; C = `overflow` from the first
    flush), and per group the slots its traced tokens left (int32
    [B, Hkv, groups, O], −1 = none)."""

    POOLS = ("pool_k", "pool_v", "pool_norm", "over_k", "over_v", "over_valid")  # the arrays above, by name

    def __init__(self, ops: Ops, config: OTT):
        super().__init__(ops, config)
        self.pool_k = self.pool_v = self.pool_norm = None
        self.over_k = self.over_v = self.over_valid = None
        self.slots = SeqBuffer(ops, step=1, pad=-1)
        self._pools = None  # (pool_norm, over_valid, pools) for which pools() made its biases

    def _empty_like(self) -> "TracedTier":
        return TracedTier(self.ops, self.config)

    def take(self, rows: Sequence[int]) -> "TracedTier":
        out = super().take(rows)
        self._take_pools(out, rows)
        out.slots = self.slots.take(rows)
        return out

    def _take_pools(self, out: "TracedTier", rows: Sequence[int]) -> None:
        for name in self.POOLS:
            setattr(out, name, batch_rows.take(self.ops, getattr(self, name), rows))

    @staticmethod
    def stack(parts: Sequence["TracedTier"], counts: Sequence[int]) -> "TracedTier":
        out = QuantizedTier.stack(parts, counts)
        ops = out.ops
        # a row that has flushed nothing yet holds an empty pool: zeros with norm +inf, as _trace starts one
        out.pool_k = batch_rows.stack(ops, [p.pool_k for p in parts], counts, None, 0)
        out.pool_v = batch_rows.stack(ops, [p.pool_v for p in parts], counts, None, 0)
        out.pool_norm = batch_rows.stack(ops, [p.pool_norm for p in parts], counts, None, INF)
        out.over_k = batch_rows.stack(ops, [p.over_k for p in parts], counts, -2, 0)
        out.over_v = batch_rows.stack(ops, [p.over_v for p in parts], counts, -2, 0)
        out.over_valid = batch_rows.stack(ops, [p.over_valid for p in parts], counts, -1, 0)
        out.slots = SeqBuffer.stack([p.slots for p in parts], counts)
        return out

    def _part_for(self, rows: Sequence[int]) -> "TracedTier":
        part = self._empty_like()
        self._take_pools(part, rows)
        return part

    def _adopt_added(self, rows: Sequence[int], part: "TracedTier", batch: int) -> None:
        super()._adopt_added(rows, part, batch)
        if part.pool_k is None:  # outliers=0: nothing traced
            return
        ops = self.ops
        if self.pool_k is None:  # the batch's first flush: every other row holds an empty pool
            empty = {"pool_norm": INF}
            for name in self.POOLS:
                if getattr(part, name) is not None:
                    blank = ops.take_rows(getattr(part, name), [0] * batch)
                    setattr(self, name, ops.cast_like(ops.full(blank.shape, empty.get(name, 0.0), blank), blank))
        for name in self.POOLS:
            array, new = getattr(self, name), getattr(part, name)
            if array is None:
                continue
            axis = -1 if name in ("pool_norm", "over_valid") else -2
            for i, b in enumerate(rows):
                array = ops.write_row(array, b, 0, new[i : i + 1], axis)
            setattr(self, name, array)
        self._pools = None  # written in place: the pools' biases must be made again
        self.slots.append_rows(rows, part.slots.view(), batch)

    def add(self, k: Array, v: Array) -> None:
        """Trace and quantize whole groups, one group after another (each sees the pool the one before left)."""
        g, o = self.config.group, self.config.outliers
        if o == 0:
            return super().add(k, v)
        traced = [self._trace(k[..., i : i + g, :], v[..., i : i + g, :]) for i in range(0, k.shape[2], g)]
        super().add(k, v, traced[0] if len(traced) == 1 else self.ops.concat(traced, axis=2))

    def _trace(self, k: Array, v: Array) -> Array:
        """Update the pools with one group k/v [B, Hkv, G, D] and record its traced slots; returns
        them as bool [B, Hkv, G] (the quantizer replaces them by the mean of the rest)."""
        ops, o = self.ops, self.config.outliers
        b, h, g, d = k.shape
        if self.pool_k is None:  # an empty pool: every slot +inf, so the first group fills it
            self.pool_k, self.pool_v = k[..., :o, :] * 0, v[..., :o, :] * 0
            self.pool_norm = ops.full((b, h, o), INF, like=k)
            if self.config.overflow:  # an empty overflow pool at its bound (see _overflow)
                self.over_k, self.over_v = (batch_rows.pad_to(ops, x[..., :0, :], -2, self.config.overflow, 0)
                                            for x in (k, v))
                self.over_valid = ops.full((b, h, self.config.overflow), 0.0, like=k)
        norm = ops.sum(ops.abs(ops.to_float32(k)), axis=-1)  # [B, Hkv, G]
        members = ops.sum(ops.where(self.pool_norm < INF, 1.0, 0.0), axis=-1)  # [B, Hkv]
        free = self.config.overflow - (ops.sum(self.over_valid, axis=-1) if self.over_k is not None else 0.0)
        tracing = members <= free  # room for every member this flush could push out
        norm = ops.where(tracing[..., None], norm, INF)  # a frozen head lets no new token in
        candidates = ops.concat([self.pool_norm, norm], axis=2)  # [B, Hkv, O + G]: members first
        chosen = ops.argsort_desc(0.0 - candidates)[..., :o]  # the O smallest; ties keep the earlier
        ids = ops.positions(-o, o + g, like=k)  # a candidate's index in the group (members: negative)
        slots = ops.gather_seq(ids, chosen)  # [B, Hkv, O], from int32 ids (argsort's dtype varies)
        picked = ops.sum(ops.where(ids[:, :, None, :] == slots[..., None], 1.0, 0.0), axis=2) > 0.5
        pushed = (~picked[..., :o]) & (self.pool_norm < INF)  # members that lost their place
        self._overflow(pushed)
        self.pool_k = ops.gather_seq(ops.concat([self.pool_k, k], axis=2), chosen)
        self.pool_v = ops.gather_seq(ops.concat([self.pool_v, v], axis=2), chosen)
        self.pool_norm = ops.gather_seq(candidates, chosen)
        self.slots.append(ops.where(slots >= 0, slots, -1).reshape(b, h, 1, o))
        return picked[..., o:]

    def _overflow(self, pushed: Array) -> None:
        """Move the pushed-out members (bool [B, Hkv, O]) into the overflow pool, compacted so each
        head's valid entries come first. The pool has its full `overflow` slots from the first flush:
        sizing it by its fill would read a count back to the host at every flush, and a head stops
        tracing before it could push more than the pool takes (`tracing` in _trace)."""
        if self.over_k is None:  # overflow=0: a head traces only while nothing can be pushed out
            return
        ops = self.ops
        flags = ops.concat([self.over_valid, ops.where(pushed, 1.0, 0.0)], axis=2)
        order = ops.argsort_desc(flags)[..., : self.config.overflow]  # valid entries first, each head in its order
        self.over_k = ops.gather_seq(ops.concat([self.over_k, self.pool_k], axis=2), order)
        self.over_v = ops.gather_seq(ops.concat([self.over_v, self.pool_v], axis=2), order)
        self.over_valid = ops.gather_seq(flags, order)

    def block_bias(self, first: int, last: int) -> Array | None:
        """−inf on the traced slots of groups first..last-1, 0 elsewhere: [B, Hkv, n·G]."""
        if self.config.outliers == 0:
            return None
        ops, g = self.ops, self.config.group
        slots = self.slots.view()[..., first:last, :]  # [B, Hkv, n, O]
        b, h, n, o = slots.shape
        ids = ops.positions(0, g, like=slots).reshape(b, h, 1, 1, g)
        hidden = ops.sum(ops.where(slots[..., None] == ids, 1.0, 0.0), axis=3) > 0.5  # [B, Hkv, n, G]
        return ops.where(hidden, -INF, 0.0).reshape(b, h, n * g)

    def pools(self) -> list[tuple[Array, Array, Array]]:
        """The outlier and overflow pools as (k, v, bias), bias −inf on slots that hold no token (a row
        of a batch that has flushed nothing yet has an empty pool: every norm +inf). The biases change
        only when a flush changes the pools, so they are made once per flush, not per decode step."""
        if self.pool_k is None:
            return []
        if self._pools is None or self._pools[0] is not self.pool_norm or self._pools[1] is not self.over_valid:
            ops = self.ops
            pools = [(self.pool_k, self.pool_v, ops.where(self.pool_norm < INF, 0.0, -INF))]
            if self.over_k is not None:
                pools.append((self.over_k, self.over_v, ops.where(self.over_valid > 0.5, 0.0, -INF)))
            self._pools = (self.pool_norm, self.over_valid, pools)
        return self._pools[2]

    def extra_partials(self, q: Array, scale: float, heads: list[int] | None) -> list:
        ops, parts = self.ops, []
        for k, v, bias in self.pools():
            if heads is not None:
                k, v, bias = (ops.select_heads(x, heads) for x in (k, v, bias))
            parts.append(ops.partial_attention(q, k, v, scale, None, True, bias))
        return parts

    def traced_slots(self) -> Array | None:
        return self.slots.view() if self.config.outliers else None

    def extra_segments(self) -> list:
        return [DenseSegment(k, v, None, bias) for k, v, bias in self.pools()]

    @classmethod
    def stored_bytes(cls, config: OTT, shape: LayerShape, flushes: list[int]) -> int:
        """KIVI's groups, and once it has traced: the pools (k/v, norms, flags) and each group's slots."""
        total = super().stored_bytes(config, shape, flushes)
        if config.outliers and flushes:
            o, c = config.outliers, config.overflow
            total += shape.tokens(o + c) + shape.per_head(o + c)  # pool and overflow k/v, norms and flags
            total += SeqBuffer.capacity_after([], 1, sum(flushes)) * shape.heads * o * 4  # int32 slots, a group a row
        return total

    def traced_per_head(self) -> float:
        """Tokens held in the outlier and overflow pools, averaged over KV heads (for --verbose)."""
        if self.pool_norm is None:
            return 0.0
        members = self.ops.to_numpy(self.pool_norm < INF).sum(axis=-1)
        if self.over_valid is not None:
            members = members + self.ops.to_numpy(self.over_valid).sum(axis=-1)
        return float(members.mean())

    def arrays(self) -> list[Array]:
        extra = (self.pool_k, self.pool_v, self.pool_norm, self.over_k, self.over_v, self.over_valid, self.slots.data)
        return super().arrays() + [a for a in extra if a is not None]
