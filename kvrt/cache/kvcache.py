"""The layer cache: tiers of the same layer's K/V, attended to by one (out, lse) merge.

The model hands each layer's new q, k, v (keys after RoPE, per KV head) to
`LayerCache.attend`, which stores them and returns the attention output. Prefill goes
through the same call with T > 1 and is computed in query blocks, so the score matrix
never exceeds `query_block × S` per head; eviction and quantization (later tiers) hook
into `attend` after a layer's prompt attention, while that layer is still in hand.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from kvrt.cache.attention import merge_partials
from kvrt.cache.methods.base import Candidates, selection
from kvrt.cache.ops import Array, Ops
from kvrt.cache.spec import CacheSpec
from kvrt.cache.tiers import FullPrecisionTier, KeptTier
from kvrt.cache.window import kept_bias, slide


class LayerCache:
    """One layer's KV cache: kept (after eviction), newest (full precision) and calibration tiers."""

    def __init__(self, ops: Ops, layer_idx: int, num_layers: int = 1, eviction=None, calibration=None,
                 quantization=None, query_block: int = 512, window: int | None = None):
        self.ops = ops
        self.window = window  # a local layer attends only its last `window` positions (kvrt/cache/window.py)
        if window is not None:  # a window is bounded already, and lets single tokens go (kvrt/cache/window.py)
            calibration = quantization = None
        self.layer_idx, self.num_layers = layer_idx, num_layers
        self.query_block = query_block
        self.eviction = eviction
        self.kept = KeptTier(ops)
        self.newest = FullPrecisionTier(ops)
        self.calibration = calibration.new_tier(ops) if calibration is not None else None
        self.quantized = quantization.new_tier(ops, layer_idx) if quantization is not None else None
        optional = [t for t in (self.quantized, self.calibration) if t is not None]
        self.tiers = [self.kept, self.newest] + optional
        # the eviction method's per-token state over the kept and newest tokens (H2O's sums), or None
        self.token_state = eviction.new_token_state(ops) if eviction is not None else None
        self.budget = None  # tokens kept per KV head, fixed by the first chunk (the prompt); per row in a batch
        # absolute positions of the newest tier's first token and of the next token: ints, or one
        # per row (numpy) in a batch whose rows differ
        self.newest_start = 0
        self.offset = 0
        self.rows = 1
        self.holding = False  # more of the prompt follows: compress once it is all in (see KVCache.hold)

    def _set_tiers(self) -> None:
        optional = [t for t in (self.quantized, self.calibration) if t is not None]
        self.tiers = [self.kept, self.newest] + optional

    def attend(self, q: Array, k: Array, v: Array, scale: float) -> Array:
        """Store k/v [B, Hkv, T, D] and return attention out [B, Hq, T, D] of q [B, Hq, T, D].

        Query t (absolute position offset + t) sees every earlier token and the new ones up to t.
        Eviction runs right after, while this layer's chunk is still in hand.
        """
        base = self.newest.length
        self.newest.append(k, v)
        self.offset = self.offset + k.shape[2]  # a new value: per-row offsets may be shared (newest_start)
        out = self._attention(q, scale, base)
        if self.token_state is not None:
            self.token_state.appended(k.shape[2])
        if self.rows > 1:
            self._compress_rows(q, scale)
        else:
            self._compress(q, scale)
        if self.token_state is not None:
            self.token_state.settled()
        return out

    def prefilled(self, q: Array, k: Array, v: Array, scale: float) -> None:
        """Take a chunk whose attention was already computed over an uncompressed cache (for
        instance once for a whole sweep of cache specs): store it and compress exactly as `attend`
        would. Valid for a layer's first chunk, whose outputs compression never changes."""
        if self.offset:
            raise ValueError("prefilled() takes only a layer's first chunk")
        self.newest.append(k, v)
        self.offset = self.offset + k.shape[2]  # a new value: per-row offsets may be shared (newest_start)
        self._compress(q, scale)

    def _compress(self, q: Array, scale: float) -> None:
        """After a chunk's attention: evict (if a method is set), then quantize whole groups (KIVI, OTT).

        Composed, eviction picks among full-precision tokens and its survivors are quantized;
        quantized tokens are final, so eviction runs on multi-token chunks (the prompt, later
        turns) and decode tokens flow through the residual into the quantized tier. A local
        layer first lets go of the tokens that left its window, then evicts among the rest."""
        evicts = self.eviction is not None and (self.quantized is None or q.shape[2] > 1)
        keys = None  # the candidates' keys, once built (the token state and the eviction read the same)
        if self.token_state is not None:  # it takes in every chunk and decode step (held chunks, a quantizer's
            # deferred eviction included), so that it covers every full-precision token a later chunk evicts among
            keys = self._after_kept(self.kept.k, self.newest.keys.view())
            self.token_state.observe(q, keys, scale, self.query_block)
        if self.window is not None:
            slide(self)
            keys = None  # the window let tokens go
        if evicts and not self.holding:  # the rest waits for the prompt's last chunk
            if self.rows > 1 and self._ragged():  # the window moved rows apart: each evicts on its own
                self._evict_apart(q, scale)
            else:
                self._evict(q, scale, keys)
        if self.quantized is not None and not self.holding:
            self._flush()

    def _attention(self, q: Array, scale: float, base: int) -> Array:
        t = q.shape[2]
        if t == 1:  # decode: every stored key is visible (a local layer's window: see kvrt/cache/window.py)
            return self._attend_block(q, scale, causal_offset=None)
        lone = all(tier is self.newest for tier in self.tiers if tier.length)
        if self.ops.fused_prefill and lone and self.window is None:
            # a lone tier needs no lse, and a flash kernel bounds memory itself: one call, no blocks
            return self.newest.partial(q, scale, base, with_lse=False)[0]
        blocks = [
            self._attend_block(q[:, :, s : s + self.query_block], scale, causal_offset=base + s)
            for s in range(0, t, self.query_block)
        ]
        return blocks[0] if len(blocks) == 1 else self.ops.concat(blocks, axis=2)

    def _attend_block(self, q: Array, scale: float, causal_offset: int | None) -> Array:
        active = [tier for tier in self.tiers if tier.length]
        if causal_offset is None and len(active) > 1 and self.window is None:
            kernel = self.ops.decode_kernel(q, self.newest.keys.data.shape[1])
            if kernel is not None:  # every tier in one pass: the same merge, without an op per tier
                return self._fused_decode(kernel, q, scale, active)
        with_lse = len(active) > 1  # a lone tier needs no merge, so skip computing its lse
        parts = [self._tier_partial(tier, q, scale, causal_offset, with_lse) for tier in active]
        out, _ = merge_partials(self.ops, parts)
        return out

    def _fused_decode(self, kernel, q: Array, scale: float, active: list) -> Array:
        """Decode attention through the backend's fused kernel: the stored tiers as segments, CaliDrop's
        partial (its own step, which updates its state) merged in."""
        stored = [tier for tier in active if tier is not self.calibration]
        extra = self.calibration.partial(q, scale, None, True) if self.calibration in active else None
        out, _ = kernel(q, [segment for tier in stored for segment in tier.segments()], scale, extra)
        return out

    def _tier_partial(self, tier, q: Array, scale: float, causal_offset: int | None, with_lse: bool):
        if tier is self.newest:
            return tier.partial(q, scale, causal_offset, with_lse, window=self.window)
        if tier is self.kept and self.window is not None:  # kept tokens may have left some queries' window
            first = self.offset - 1 if causal_offset is None else self.newest_start + causal_offset
            return tier.partial(q, scale, None, with_lse, key_bias=kept_bias(self, first, q.shape[2]))
        return tier.partial(q, scale, None, with_lse)

    def _after_kept(self, kept: Array | None, newest: Array) -> Array:
        """A kept-tier array followed by the newest tier's along the token axis: the candidates."""
        return self.ops.concat([kept, newest], axis=2) if self.kept.length else newest

    def _evict(self, q: Array, scale: float, keys: Array | None = None) -> None:
        method, ops, kept, newest = self.eviction, self.ops, self.kept, self.newest
        keys = self._after_kept(kept.k, newest.keys.view()) if keys is None else keys
        total = keys.shape[2]
        if self.budget is None:
            self.budget = method.layer_budget(self.layer_idx, self.num_layers, total)
        if total <= self.budget or not method.compresses_chunk(q.shape[2]):
            return
        positions = self._after_kept(kept.positions, self._positions(self.newest_start, newest.length, keys))
        offset = self._per_row(self.offset, keys)
        state = self.token_state
        candidates = Candidates(keys, positions, state.values if state is not None else None, q, scale, offset,
                                self.budget)
        scores = method.scores(ops, candidates)
        keep, drop = selection(ops, scores, self.budget)
        values = self._after_kept(kept.v, newest.values.view())
        kept.replace(ops.gather_seq(keys, keep), ops.gather_seq(values, keep), ops.gather_seq(positions, keep))
        if state is not None:
            state.select(keep)
        if self.calibration is not None:
            evicted = (ops.gather_seq(keys, drop), ops.gather_seq(values, drop), ops.gather_seq(scores, drop))
            self.calibration.add_evicted(*evicted, q, scale)
        newest.clear()
        self.newest_start = self.offset

    def _evict_apart(self, q: Array, scale: float) -> None:
        parts = [self.take([b]) for b in range(self.rows)]
        for b, part in enumerate(parts):
            part._evict(self.ops.take_rows(q, [b]), scale)
        self._adopt(stack_layers(parts))

    def _positions(self, start, count: int, like: Array) -> Array:
        """int32 [B, Hkv, count]: start .. start+count-1, from each row's own start in a batch."""
        if isinstance(start, np.ndarray):
            return self.ops.positions(0, count, like=like) + self.ops.row_values(start, like)[:, None, None]
        return self.ops.positions(start, count, like=like)

    def _per_row(self, value, like: Array):
        """An int, or per-row values as int32 [B, 1, 1] that broadcast over heads and tokens."""
        return self.ops.row_values(value, like)[:, None, None] if isinstance(value, np.ndarray) else value

    def _flush(self) -> None:
        """Move the oldest whole groups of the full-precision tokens (eviction's kept tokens, then
        the newest) into the quantized tier, keeping at least `residual` of them."""
        kept, newest, config = self.kept, self.newest, self.quantized.config
        groups = config.groups_to_flush(kept.length + newest.length)
        if not groups:
            return
        m = groups * config.group
        if newest.length:
            keys, values = self._after_kept(kept.k, newest.keys.view()), self._after_kept(kept.v, newest.values.view())
        else:  # eviction just moved every token into the kept tier
            keys, values = kept.k, kept.v
        self.quantized.add(keys[..., :m, :], values[..., :m, :])
        if self.token_state is not None:  # the token state follows the tokens still in full precision
            self.token_state.drop_front(m)
        if m < kept.length:  # the rest of the kept tokens stay in full precision, copied out of the old arrays
            rest = [self.ops.concat([a[..., m:, :]], axis=2) for a in (kept.k, kept.v)]
            kept.replace(*rest, self.ops.concat([kept.positions[..., m:]], axis=2))
            return
        drop = m - kept.length
        kept.replace(None, None, None)
        rest_k, rest_v = newest.keys.view()[..., drop:, :], newest.values.view()[..., drop:, :]
        newest.clear()  # the residual starts over in a buffer sized to what is left
        if rest_k.shape[2]:
            newest.append(rest_k, rest_v)
        self.newest_start = self.newest_start + drop

    def trimmable(self) -> int:
        """How many of the newest tokens `trim` can forget: only those still in the newest tier, since
        compressed ones cannot be un-fed (and a local layer keeps the window of the rewound position whole)."""
        n = self.newest.length
        if self.window is not None and self.newest_start:
            n = min(n, max(0, self.offset - self.window + 1 - self.newest_start))
        return n

    def trim(self, n: int) -> int:
        """Forget the newest n tokens (chat rewinds to a shared prefix), as many as it can; returns how many went."""
        n = self.newest.trim(min(n, self.trimmable()))
        self.offset = self.offset - n
        if self.token_state is not None:
            self.token_state.drop_back(n)
        return n

    # --- rows of a batch (kvrt/cache/rows.py) -----------------------------------------------
    def _compress_rows(self, q: Array, scale: float) -> None:
        """A decode step of a batch: compress the rows that need it, rows in the same state together
        (each such group runs the one-sequence code above on its own rows, cut to their lengths)."""
        evicts = self.eviction is not None and self.quantized is None and self.eviction.compresses_chunk(1)
        if not (evicts or self.quantized is not None or self.window is not None):
            return  # full, SnapKV, PyramidKV: decode tokens are only appended
        due = [b for b in range(self.rows) if self._row_due(b, evicts)]
        groups: dict[tuple, list[int]] = {}
        for b in due:
            groups.setdefault(self.signature(b), []).append(b)
        if len(groups) == 1 and len(due) == self.rows and not self._ragged():
            return self._compress(q, scale)  # every row in the same state: no regrouping
        if not groups:
            return
        held_state = self.token_state is not None and self.token_state.values is not None
        if not evicts and self.window is None and not held_state:  # a quantizer's flush (it moves no token state)
            for rows in groups.values():
                self._flush_rows(rows)
            return
        parts, order = [], []
        rest = [b for b in range(self.rows) if b not in due]
        if rest:
            parts.append(self.take(rest))
            order += rest
        for rows in groups.values():
            part = self.take(rows)
            part._compress(self.ops.take_rows(q, rows), scale)
            if part.token_state is not None:
                part.token_state.settled()  # its token state now covers the new token
            parts.append(part)
            order += rows
        merged = stack_layers(parts)
        position = {b: i for i, b in enumerate(order)}
        self._adopt(merged.take([position[b] for b in range(self.rows)]))

    def _flush_rows(self, rows: list[int]) -> None:
        """`_flush` for these rows of a batch (all in the same state), in place: their oldest whole
        groups quantized into their own places in the quantized tier, their full-precision rest
        moved to the front of their rows, the other rows untouched (no regrouping of the layer)."""
        kept, newest, config, ops = self.kept, self.newest, self.quantized.config, self.ops
        held_kept = int(kept.lengths()[rows[0]]) if kept.length else 0
        held_newest = int(newest.lengths()[rows[0]])
        m = config.groups_to_flush(held_kept + held_newest) * config.group
        parts = [(ops.take_rows(kept.k, rows)[..., :held_kept, :], ops.take_rows(kept.v, rows)[..., :held_kept, :])
                 ] if held_kept else []
        if m > held_kept:
            parts.append((ops.take_rows(newest.keys.view(), rows)[..., : m - held_kept, :],
                          ops.take_rows(newest.values.view(), rows)[..., : m - held_kept, :]))
        keys, values = (ops.concat([p[i] for p in parts], axis=2)[..., :m, :] for i in (0, 1))
        self.quantized.add_rows(rows, keys, values, self.rows)
        if held_kept:
            kept.drop_front(self._rows_mask(rows, min(m, held_kept)))
        if m > held_kept:
            drop = self._rows_mask(rows, m - held_kept)
            newest.drop_front(drop)
            self.newest_start = _shared(np.broadcast_to(np.asarray(self.newest_start), (self.rows,)) + drop)

    def _rows_mask(self, rows: list[int], n: int) -> np.ndarray:
        """n at these rows, 0 at the others: per-row counts of tokens to drop."""
        drop = np.zeros(self.rows, dtype=np.int64)
        drop[rows] = n
        return drop

    def _row_due(self, b: int, evicts: bool) -> bool:
        """Whether row b compresses after a decode token (as `_compress` would for it alone);
        `evicts`: the method evicts at decode (and no quantizer defers eviction to chunks)."""
        if self.window is not None:
            return True  # its window moves on every step
        held = (int(self.kept.lengths()[b]) if self.kept.length else 0) + int(self.newest.lengths()[b])
        if self.token_state is not None or (evicts and held > _row_value(self.budget, b)):  # a state takes each token
            return True
        return self.quantized is not None and self.quantized.config.groups_to_flush(held) > 0

    def _ragged(self) -> bool:
        return any(t.row_lengths is not None for t in (self.kept, self.quantized, self.calibration) if t is not None
                   ) or self.newest.keys.row_lengths is not None

    def signature(self, b: int) -> tuple:
        """Row b's tier lengths: rows with equal signatures can compress as one rectangular group."""
        sig = (int(self.kept.lengths()[b]) if self.kept.length else 0, int(self.newest.lengths()[b]),
               _row_value(self.budget, b))
        if self.quantized is not None:
            sig += (int(self.quantized.lengths()[b]) if self.quantized.shape is not None else 0,)
        if self.calibration is not None:
            sig += self.calibration.signature(b)
        return sig

    def take(self, rows: Sequence[int]) -> "LayerCache":
        """A layer cache of these batch rows only (a copy, cut to their lengths)."""
        rows = list(rows)
        out = self._like(len(rows))
        out.kept, out.newest = self.kept.take(rows), self.newest.take(rows)
        if self.quantized is not None:
            out.quantized = self.quantized.take(rows)
        if self.calibration is not None:
            out.calibration = self.calibration.take(rows)
        out._set_tiers()
        out.newest_start, out.offset, out.budget = (_rows_of(x, rows) for x in (self.newest_start, self.offset,
                                                                                 self.budget))
        if self.token_state is not None:
            out.token_state = self.token_state.take(rows, self.kept.length, out.kept.length, out.newest.length)
        return out

    def _like(self, rows: int) -> "LayerCache":
        out = LayerCache.__new__(LayerCache)
        out.ops, out.layer_idx, out.num_layers = self.ops, self.layer_idx, self.num_layers
        out.query_block, out.eviction, out.budget = self.query_block, self.eviction, self.budget
        out.window = self.window
        out.quantized = out.calibration = out.token_state = None
        out.rows, out.holding = rows, self.holding
        return out

    def _adopt(self, other: "LayerCache") -> None:
        """Take over another layer cache's rows (the regrouped batch)."""
        self.__dict__.update(other.__dict__)

    def arrays(self) -> list[Array]:
        extra = self.token_state.arrays() if self.token_state is not None else []
        return [a for tier in self.tiers for a in tier.arrays()] + extra

    def nbytes(self) -> int:
        """Bytes of every stored array, metadata included, as allocated."""
        return sum(self.ops.nbytes(a) for a in self.arrays())

    def host_nbytes(self) -> int:
        """The part of nbytes() held in host memory: CaliDrop's evicted tier with offload=none."""
        host = self.calibration.host_arrays() if self.calibration is not None else []
        return sum(self.ops.nbytes(a) for a in host)


def _row_value(value, row: int):
    """Row `row`'s entry of an int (every row's) or of per-row values."""
    return int(value[row]) if isinstance(value, np.ndarray) else value


def _rows_of(value, rows: list[int]):
    """An int position, or per-row positions at these rows (an int again when they agree)."""
    if value is None or not isinstance(value, np.ndarray):
        return value
    return _shared(value[rows])


def _shared(values: np.ndarray):
    """Per-row values as one int when every row agrees, else as they are."""
    return int(values[0]) if (values == values[0]).all() else values


def _per_row_values(layers: Sequence[LayerCache], attr: str) -> np.ndarray:
    return np.concatenate([np.broadcast_to(np.asarray(getattr(layer, attr)), (layer.rows,)) for layer in layers])


def stack_layers(parts: Sequence[LayerCache]) -> LayerCache:
    """One layer cache holding every part's rows in order; shorter rows are padded (kvrt/cache/rows.py)."""
    first, counts = parts[0], [p.rows for p in parts]
    out = first._like(sum(counts))
    out.kept = KeptTier.stack([p.kept for p in parts], counts)
    out.newest = FullPrecisionTier.stack([p.newest for p in parts], counts)
    if first.quantized is not None:
        out.quantized = type(first.quantized).stack([p.quantized for p in parts], counts)
    if first.calibration is not None:
        out.calibration = type(first.calibration).stack([p.calibration for p in parts], counts)
    out._set_tiers()
    if any(p.budget is not None for p in parts):  # PyramidKV's and ratio= budgets follow each prompt
        if any(p.budget is None for p in parts):
            raise ValueError("rows that have compressed and rows that have not cannot share a batch")
    for attr in ("newest_start", "offset") + (("budget",) if first.budget is not None else ()):
        setattr(out, attr, _shared(_per_row_values(parts, attr)))
    if first.token_state is not None:
        out.token_state = type(first.token_state).stack([p.token_state for p in parts], [p.kept.length for p in parts],
                                                        counts)
    return out


class KVCache:
    """The whole model's cache: one LayerCache per decoder layer, configured by a cache spec."""

    def __init__(self, ops: Ops, num_layers: int, spec: "str | CacheSpec" = "full", query_block: int = 512,
                 windows: Sequence[int | None] | None = None):
        """`windows`: per layer, the sliding window of a local layer, or None for a global one."""
        self.ops = ops
        self.spec = CacheSpec.parse(spec)
        eviction, calibration, quantization = self.spec.build()
        windows = list(windows) if windows is not None else [None] * num_layers
        if len(windows) != num_layers:
            raise ValueError(f"{len(windows)} layer windows for {num_layers} layers")
        self.layers = [LayerCache(ops, i, num_layers, eviction, calibration, quantization, query_block, windows[i])
                       for i in range(num_layers)]

    @property
    def offset(self) -> int:
        """Tokens every layer holds (a forward interrupted mid-model leaves early layers ahead)."""
        return min(layer.offset for layer in self.layers)

    @property
    def rows(self) -> int:
        """Sequences this cache holds (a batch has several)."""
        return self.layers[0].rows

    @property
    def last_chunk_min(self) -> int:
        """The fewest tokens the last chunk of a prompt fed in chunks may have, so that it compresses as
        the whole prompt would (SnapKV's observation window); 0 when any chunk will do."""
        eviction = self.layers[0].eviction
        return eviction.last_chunk_min if eviction is not None else 0

    def offsets(self) -> np.ndarray:
        """The absolute position of each row's next token."""
        return _per_row_values(self.layers[:1], "offset").copy()

    def hold(self, more: bool) -> None:
        """Say whether more of the prompt follows the next chunk. A prompt fed in chunks is then
        compressed once, after its last chunk, exactly as if it had come whole: every prompt query
        attends over the uncompressed prompt, and SnapKV's window, PyramidKV's budgets, H2O's sums
        and CaliDrop's proxy are those of the whole prompt. (Without it, each multi-token chunk
        compresses on its own, as a chat turn does.)"""
        for layer in self.layers:
            layer.holding = more

    def take(self, rows: Sequence[int]) -> "KVCache":
        """A cache of these rows only: a sequence leaving a batch, or the batch without it."""
        out = KVCache.__new__(KVCache)
        out.ops, out.spec = self.ops, self.spec
        out.layers = [layer.take(rows) for layer in self.layers]
        return out

    def trim(self, n: int) -> int:
        return [layer.trim(n) for layer in self.layers][0]

    def rewind_to(self, length: int) -> bool:
        """Keep only the first `length` tokens in every layer (also repairs a forward cut short
        mid-layer); False when compressed tokens stand in the way and the cache must be rebuilt."""
        for layer in self.layers:
            layer.trim(max(layer.offset - length, 0))
        return all(layer.offset == length for layer in self.layers)

    def can_rewind_to(self, length: int) -> bool:
        """Whether rewind_to(length) would succeed (this cache is left as it is)."""
        return all(layer.offset - layer.trimmable() <= length <= layer.offset for layer in self.layers)

    def prefix(self, length: int) -> "KVCache | None":
        """A one-row cache of this one's first `length` tokens (None where compressed tokens stand in the
        way). It shares this cache's arrays but never writes into them: its buffers are cut to their
        lengths, so what it is fed goes into new ones, and this cache may go on growing in place."""
        if self.rows != 1 or not self.can_rewind_to(length):
            return None
        out = self.take([0])
        out.rewind_to(length)
        return out.take([0])

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def host_nbytes(self) -> int:
        """The part of nbytes() kept in host memory rather than beside the model (CaliDrop's tier)."""
        return sum(layer.host_nbytes() for layer in self.layers)

    def stats(self) -> dict:
        """Per-cache counters for --verbose: CaliDrop's branch counts summed over layers; quantized
        tokens (per layer, of the tokens it holds) and OTT's traced outliers per traced KV head."""
        stats = {}
        tiers = [layer.calibration for layer in self.layers if layer.calibration is not None]
        if tiers:
            totals = [t.branch_counts() for t in tiers]
            stats["calidrop"] = {k: int(sum(c[k].sum() for c in totals)) for k in totals[0]}
        quantized = [layer.quantized for layer in self.layers if layer.quantized is not None]
        if quantized:
            held = max(layer.quantized.length + layer.kept.length + layer.newest.length for layer in self.layers
                       if layer.quantized is not None)  # local layers hold their window unquantized
            traced = [n for n in (t.traced_per_head() for t in quantized) if n is not None]
            stats["quantized"] = {"tokens": max(t.length for t in quantized), "of": held,
                                  "traced": sum(traced) / len(traced) if traced else 0.0}
        paths = getattr(self.ops, "paths", None)
        if paths:
            stats["kernels"] = dict(paths)
        return stats

    def __iter__(self) -> Iterable[LayerCache]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> LayerCache:
        return self.layers[i]


def stack_caches(caches: Sequence[KVCache]) -> KVCache:
    """One batched cache holding every cache's rows in order (they must share a spec and budgets)."""
    specs = {str(c.spec) for c in caches}
    if len(specs) > 1:
        raise ValueError(f"caches with different specs {sorted(specs)} cannot share a batch")
    out = KVCache.__new__(KVCache)
    out.ops, out.spec = caches[0].ops, caches[0].spec
    out.layers = [stack_layers(layers) for layers in zip(*(c.layers for c in caches))]
    return out
