"""KIVI (Liu et al., arXiv 2402.02750): 2/4/8-bit KV in groups, the newest tokens in full precision.

The newest tokens stay in the full-precision tier (the residual); whenever it holds
`residual + group` tokens, its oldest `group` are flushed into the quantized tier (keys per
channel over the group's tokens, values per token over `value_group` channels; format in
kvrt/cache/quant.py). A prompt flushes all its complete groups at once, keeping at least
`residual` tokens in full precision. Attention over the quantized tier dequantizes a few
groups at a time and merges the blocks by log-sum-exp, so the whole cache is never held
in full precision. OTT's outlier tracing (arXiv 2505.10938) builds on this tier.
"""

from __future__ import annotations

from math import gcd
from typing import Sequence

import numpy as np

from kvrt.cache import rows as batch_rows
from kvrt.cache.attention import PackedSegment, merge_partials
from kvrt.cache.buffer import SeqBuffer
from kvrt.cache.layer_shape import LayerShape
from kvrt.cache.tiers import FullPrecisionTier, KeptTier
from kvrt.errors import InvalidValue
from kvrt.cache.ops import Array, Ops
from kvrt.cache.quant import QuantizedKeys, QuantizedValues, codes_per_word, dequantize_keys, dequantize_values
from kvrt.cache.quant import mean_substituted, quantize_keys, quantize_values


class KIVI:
    name = "kivi"
    options = {"bits": int, "group": int, "residual": int, "value_group": int}

    def __init__(self, bits: int = 2, group: int = 32, residual: int = 128, value_group: int = 0):
        if bits not in (2, 4, 8):
            raise InvalidValue(f"{self.name}: bits must be 2, 4 or 8, got {bits}")
        per = codes_per_word(bits)
        if group <= 0 or group % per:
            raise InvalidValue(f"{self.name}: group must be a positive multiple of {per} tokens for {bits}-bit codes, got {group}")
        if residual < 0:
            raise InvalidValue(f"{self.name}: residual must be >= 0, got {residual}")
        if value_group < 0:
            raise InvalidValue(f"{self.name}: value_group must be >= 0 (0 = as the key group, within the head dim), got {value_group}")
        self.bits, self.group, self.residual, self.value_group = bits, group, residual, value_group

    def value_group_for(self, head_dim: int) -> int:
        """Channels per value group: as set, or by default KIVI's one group size for keys and values,
        brought down to a divisor of the head dim (gcd(group, head_dim))."""
        return self.value_group or gcd(self.group, head_dim)

    def tier_type(self, layer_idx: int) -> type["QuantizedTier"]:
        """The quantized tier layer `layer_idx` stores its groups in."""
        return QuantizedTier

    def new_tier(self, ops: Ops, layer_idx: int = 0) -> "QuantizedTier":
        return self.tier_type(layer_idx)(ops, self)

    def groups_to_flush(self, residual_length: int) -> int:
        """How many whole groups leave the residual, keeping at least `residual` tokens there."""
        return max(residual_length - self.residual, 0) // self.group

    def layer_bytes(self, shape: LayerShape, layer: int, kept: int, prompt: int, new: int, budget: int | None,
                    step: int = 64) -> int:
        """The most bytes a quantized layer holds over a request: its full-precision tokens (at most
        residual + group, in buffers of `step` rows), the groups as their buffers grow (a prompt's
        groups at once, then one a flush) with what its tier keeps beside them (`stored_bytes`), at the
        worst moment, since the full-precision part shrinks as the groups grow. `kept`: the tokens the
        prompt leaves after eviction (of a `budget`; None: no eviction), then `new` tokens one at a time."""
        r, g = self.residual, self.group
        first = max(kept - r, 0) // g * g  # flushed with the prompt
        last = max(kept + new - r, 0) // g * g
        rest = kept - first  # full-precision tokens right after the prompt
        flushes = [first // g] * bool(first) + [1] * ((last - first) // g)  # in groups
        tier = self.tier_type(layer)
        packed = [tier.stored_bytes(self, shape, flushes[:n]) for n in range(len(flushes) + 1)]
        if kept + new <= r + g:  # never flushes during decode
            return FullPrecisionTier.bytes_for(shape, [kept], new, step) + packed[-1]
        residual = FullPrecisionTier.bytes_for(shape, [r], g, step)  # re-stored at each flush, then filled up
        if budget is not None and prompt > budget:  # evicted: the kept tier hands its tokens over a group a flush
            done = bool(first)
            phases = [KeptTier.bytes_for(shape, left) + FullPrecisionTier.bytes_for(shape, [], r + g - left, step)
                      + packed[done + k]
                      for k, left in enumerate(range(rest, 0, -g))]
            return max(phases + [residual + packed[-1]])
        return max(FullPrecisionTier.bytes_for(shape, [rest], r + g - rest, step), residual) + packed[-1]


class QuantizedTier:
    """Flushed groups: key codes [B, Hkv, S/P, D] with scale/zero [B, Hkv, S/G, D]; value codes
    [B, Hkv, S, D/P] with scale/zero [B, Hkv, S, D/gv]. Every array grows along axis -2."""

    name = "quantized"
    BLOCK_GROUPS = 16  # groups dequantized at once: bounds the full-precision temporaries

    def __init__(self, ops: Ops, config: KIVI):
        self.ops, self.config = ops, config
        names = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero")
        # one row can be a whole group (scales) or several tokens (packed codes): grow without a fixed step
        self.buffers = {name: SeqBuffer(ops, step=1) for name in names}
        self.length = 0  # tokens flushed (the longest row's, in a batch)
        self.row_lengths: np.ndarray | None = None  # per row, when the rows of a batch differ
        self.shape = None  # (B, Hkv, D)

    def lengths(self) -> np.ndarray:
        return batch_rows.per_row(self.row_lengths, 0 if self.shape is None else self.shape[0], self.length)

    def padding_bias(self, first: int, last: int) -> Array | None:
        """−inf on the group slots first..last-1 that a shorter row of a batch has not filled."""
        if self.row_lengths is None:
            return None
        g = self.config.group
        like = self.buffers["k_scale"].view()
        return batch_rows.length_bias(self.ops, self.row_lengths - first * g, (last - first) * g, like)

    def take(self, rows: Sequence[int]) -> "QuantizedTier":
        out = self._empty_like()
        if self.shape is None:
            return out
        out.buffers = {name: buf.take(rows) for name, buf in self.buffers.items()}
        lengths = self.lengths()[list(rows)]
        out.length, out.row_lengths = int(lengths.max()), batch_rows.ragged(lengths)
        out.shape = (len(rows), *self.shape[1:])
        return out

    @staticmethod
    def stack(parts: Sequence["QuantizedTier"], counts: Sequence[int]) -> "QuantizedTier":
        out = parts[0]._empty_like()
        shape = next((p.shape for p in parts if p.shape is not None), None)
        if shape is None:
            return out
        out.buffers = {name: SeqBuffer.stack([p.buffers[name] for p in parts], counts) for name in out.buffers}
        lengths = np.concatenate([p.lengths() if p.shape is not None else np.zeros(c, dtype=np.int64)
                                  for p, c in zip(parts, counts)])
        out.length, out.row_lengths = int(lengths.max()), batch_rows.ragged(lengths)
        out.shape = (sum(counts), *shape[1:])
        return out

    def _empty_like(self) -> "QuantizedTier":
        return QuantizedTier(self.ops, self.config)

    def add(self, k: Array, v: Array, traced: Array | None = None) -> None:
        """Quantize and store whole groups: k, v [B, Hkv, n·G, D]; traced (bool [B, Hkv, n·G]) marks
        OTT's outlier slots, which take the mean of their group's other keys first. A fused kernel
        quantizes where the device has one; kvrt.cache.quant's ops path is its reference twin."""
        cfg, ops = self.config, self.ops
        value_group = cfg.value_group_for(v.shape[3])
        if v.shape[3] % value_group:
            raise InvalidValue(f"{cfg.name}: value_group {value_group} must divide the head dim {v.shape[3]}")
        kernels = ops.quantizers(k)
        if kernels is not None:
            qk, qv = kernels[0](k, cfg.bits, cfg.group, traced), kernels[1](v, cfg.bits, value_group)
        else:
            keys = k if traced is None else mean_substituted(ops, k, traced, cfg.group)
            qk, qv = quantize_keys(ops, keys, cfg.bits, cfg.group), quantize_values(ops, v, cfg.bits, value_group)
        for name, array in zip(self.buffers, (qk.codes, qk.scale, qk.zero, qv.codes, qv.scale, qv.zero)):
            self.buffers[name].append(array)
        self.length += k.shape[2]
        self.shape = (k.shape[0], k.shape[1], k.shape[3])

    def add_rows(self, rows: Sequence[int], k: Array, v: Array, batch: int) -> None:
        """Quantize and store whole groups k, v [len(rows), Hkv, n·G, D] after these rows' own groups,
        in place, the other rows of the `batch` untouched (rows of a batch flush at different steps)."""
        part = self._part_for(rows)
        part.add(k, v)
        self._adopt_added(rows, part, batch)

    def _part_for(self, rows: Sequence[int]) -> "QuantizedTier":
        """An empty tier for these rows, holding what their next groups depend on (OTT's pools)."""
        return self._empty_like()

    def _adopt_added(self, rows: Sequence[int], part: "QuantizedTier", batch: int) -> None:
        for name, buf in self.buffers.items():
            buf.append_rows(rows, part.buffers[name].view(), batch)
        lengths = self.lengths() if self.shape is not None else np.zeros(batch, dtype=np.int64)
        lengths[list(rows)] += part.length
        self.length, self.row_lengths = int(lengths.max()), batch_rows.ragged(lengths)
        self.shape = (batch, *part.shape[1:])

    def stored(self, first: int, last: int) -> tuple[QuantizedKeys, QuantizedValues]:
        """Groups first..last-1 as stored (views of the packed words, scales and zeros)."""
        cfg, buf = self.config, self.buffers
        per, g = codes_per_word(cfg.bits), cfg.group
        b, h, d = self.shape
        s = (last - first) * g
        a, z = first * g, last * g
        keys = QuantizedKeys(buf["k_codes"].view()[..., a // per : z // per, :], buf["k_scale"].view()[..., first:last, :],
                             buf["k_zero"].view()[..., first:last, :], cfg.bits, g, (b, h, s, d))
        values = QuantizedValues(buf["v_codes"].view()[..., a:z, :], buf["v_scale"].view()[..., a:z, :],
                                 buf["v_zero"].view()[..., a:z, :], cfg.bits, cfg.value_group_for(d), (b, h, s, d))
        return keys, values

    def block(self, first: int, last: int) -> tuple[Array, Array]:
        """Dequantized keys and values of groups first..last-1: [B, Hkv, (last-first)·G, D] each."""
        keys, values = self.stored(first, last)
        return dequantize_keys(self.ops, keys), dequantize_values(self.ops, values)

    def partial(self, q: Array, scale: float, causal_offset: int | None, with_lse: bool, heads: list[int] | None = None):
        """(out, lse) of q over every flushed token (no causal mask: flushed tokens precede every
        query): the backend's fast path where it has one (a fused kernel, mx.quantized_matmul), else
        a block of groups at a time, dequantized and merged by lse. `heads`: only these KV heads
        (q holds just their query heads), as CaliDrop's recompute asks."""
        ops, cfg = self.ops, self.config
        groups = self.length // cfg.group
        kernel = None if heads is not None else ops.quantized_kernel(q, self.shape[1], cfg.group,
                                                                     cfg.value_group_for(self.shape[2]))
        if kernel is not None:
            lengths = batch_rows.short_rows(self.row_lengths, groups * cfg.group)
            lengths = None if lengths is None else ops.row_values(lengths, q)  # the kernel skips a row's padding
            fused = kernel(q, *self.stored(0, groups), scale, key_bias=self.block_bias(0, groups), lengths=lengths)
            return merge_partials(ops, [fused] + self.extra_partials(q, scale, None))
        parts = []
        for first in range(0, groups, self.BLOCK_GROUPS):
            last = min(first + self.BLOCK_GROUPS, groups)
            keys, values = self.block(first, last)
            bias = batch_rows.add_bias(self.block_bias(first, last), self.padding_bias(first, last))
            if heads is not None:
                keys, values = ops.select_heads(keys, heads), ops.select_heads(values, heads)
                bias = None if bias is None else ops.select_heads(bias, heads)
            parts.append(ops.partial_attention(q, keys, values, scale, None, True, bias))
        return merge_partials(ops, parts + self.extra_partials(q, scale, heads))

    def segments(self) -> list:
        """What a fused decode kernel reads: the packed groups as stored (each row to its own length),
        then the tokens kept beside them."""
        groups = self.length // self.config.group
        lengths = batch_rows.short_rows(self.row_lengths, groups * self.config.group)
        return [PackedSegment(*self.stored(0, groups), lengths, self.traced_slots())] + self.extra_segments()

    def traced_slots(self) -> Array | None:
        """int32 [B, Hkv, groups, O]: slots whose tokens are read elsewhere (OTT's pools); none here."""
        return None

    def extra_segments(self) -> list:
        """Segments of the tokens this tier keeps beside the groups (OTT's outlier pools); none here."""
        return []

    def block_bias(self, first: int, last: int) -> Array | None:
        """Key bias [B, Hkv, S] for groups first..last-1 (OTT hides its traced slots); none here."""
        return None

    def extra_partials(self, q: Array, scale: float, heads: list[int] | None) -> list:
        """Partials over tokens this tier keeps beside the groups (OTT's outlier pools); none here."""
        return []

    @classmethod
    def stored_bytes(cls, config: KIVI, shape: LayerShape, flushes: list[int]) -> int:
        """Its arrays after these flushes (in groups): packed codes, scales and zeros in buffers of one
        row a step (`buffers`), and what a subclass keeps beside them."""
        per, gv, g, d = codes_per_word(config.bits), config.value_group_for(shape.dim), config.group, shape.dim
        word, scale = 4, shape.itemsize  # int32 code words; scales and zeros in the model dtype
        total = SeqBuffer.capacity_after([n * g // per for n in flushes], 1) * d * word  # key codes
        total += 2 * SeqBuffer.capacity_after(flushes, 1) * d * scale  # key scale, zero
        total += SeqBuffer.capacity_after([n * g for n in flushes], 1) * (d // per * word + 2 * d // gv * scale)
        return total * shape.heads

    def traced_per_head(self) -> float | None:
        """Tokens kept out of the groups per KV head (OTT's outlier pools, for --verbose); None: it traces none."""
        return None

    def trim(self, n: int) -> int:
        return 0  # quantized tokens cannot be un-fed; only the residual rewinds

    def arrays(self) -> list[Array]:
        return [buf.data for buf in self.buffers.values() if buf.data is not None]
