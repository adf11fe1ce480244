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
from kvrt.methods.base import Candidates, selection
from kvrt.ops import Array, Ops
from kvrt.spec import CacheSpec
from kvrt.tiers import FullPrecisionTier, KeptTier


class LayerCache:
    """One layer's KV cache: kept (after eviction), newest (full precision) and calibration tiers."""

    def __init__(self, ops: Ops, layer_idx: int, num_layers: int = 1, eviction=None, calibration=None,
                 quantization=None, query_block: int = 512):
        self.ops = ops
        self.layer_idx, self.num_layers = layer_idx, num_layers
        self.query_block = query_block
        self.eviction = eviction
        self.kept = KeptTier(ops)
        self.newest = FullPrecisionTier(ops)
        self.calibration = calibration.new_tier(ops) if calibration is not None else None
        self.quantized = quantization.new_tier(ops, layer_idx) if quantization is not None else None
        optional = [t for t in (self.quantized, self.calibration) if t is not None]
        self.tiers = [self.kept, self.newest] + optional
        self.accumulated = None  # H2O: float32 [B, Hkv, kept + newest], attention each token received
        self.budget = None  # tokens kept per KV head, fixed by the first chunk (the prompt)
        self.newest_start = 0  # absolute position of the newest tier's first token
        self.offset = 0  # absolute position of the next token

    def attend(self, q: Array, k: Array, v: Array, scale: float) -> Array:
        """Store k/v [B, Hkv, T, D] and return attention out [B, Hq, T, D] of q [B, Hq, T, D].

        Query t (absolute position offset + t) sees every earlier token and the new ones up to t.
        Eviction runs right after, while this layer's chunk is still in hand.
        """
        base = self.newest.length
        self.newest.append(k, v)
        self.offset += k.shape[2]
        out = self._attention(q, scale, base)
        self._compress(q, scale)
        return out

    def prefilled(self, q: Array, k: Array, v: Array, scale: float) -> None:
        """Take a chunk whose attention was already computed over an uncompressed cache (for
        instance once for a whole sweep of cache specs): store it and compress exactly as `attend`
        would. Valid for a layer's first chunk, whose outputs compression never changes."""
        if self.offset:
            raise ValueError("prefilled() takes only a layer's first chunk")
        self.newest.append(k, v)
        self.offset += k.shape[2]
        self._compress(q, scale)

    def _compress(self, q: Array, scale: float) -> None:
        """After a chunk's attention: evict (if a method is set), then quantize whole groups (KIVI, OTT).

        Composed, eviction picks among full-precision tokens and its survivors are quantized;
        quantized tokens are final, so eviction runs on multi-token chunks (the prompt, later
        turns) and decode tokens flow through the residual into the quantized tier."""
        if self.eviction is not None and (self.quantized is None or q.shape[2] > 1):
            self._evict(q, scale)
        if self.quantized is not None:
            self._flush()

    def _attention(self, q: Array, scale: float, base: int) -> Array:
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

    def _after_kept(self, kept: Array | None, newest: Array) -> Array:
        """A kept-tier array followed by the newest tier's along the token axis: the candidates."""
        return self.ops.concat([kept, newest], axis=2) if self.kept.length else newest

    def _evict(self, q: Array, scale: float) -> None:
        method, ops, kept, newest = self.eviction, self.ops, self.kept, self.newest
        keys = self._after_kept(kept.k, newest.keys.view())
        if method.accumulates:
            self.accumulated = method.accumulate(ops, self.accumulated, q, keys, scale, self.query_block)
        total = keys.shape[2]
        if self.budget is None:
            self.budget = method.layer_budget(self.layer_idx, self.num_layers, total)
        if total <= self.budget or not method.compresses_chunk(q.shape[2]):
            return
        positions = self._after_kept(kept.positions, ops.positions(self.newest_start, newest.length, like=keys))
        candidates = Candidates(keys, positions, self.accumulated, q, scale, self.offset, self.budget)
        scores = method.scores(ops, candidates)
        keep, drop = selection(ops, scores, self.budget)
        values = self._after_kept(kept.v, newest.values.view())
        kept.replace(ops.gather_seq(keys, keep), ops.gather_seq(values, keep), ops.gather_seq(positions, keep))
        if self.accumulated is not None:
            self.accumulated = ops.gather_seq(self.accumulated, keep)
        if self.calibration is not None:
            evicted = (ops.gather_seq(keys, drop), ops.gather_seq(values, drop), ops.gather_seq(scores, drop))
            self.calibration.add_evicted(*evicted, q, scale)
        newest.clear()
        self.newest_start = self.offset

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
        if self.accumulated is not None:  # H2O's scores follow the tokens still in full precision
            self.accumulated = self.accumulated[..., m:]
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
        self.newest_start += drop

    def trim(self, n: int) -> int:
        """Forget the newest n tokens (chat rewinds to a shared prefix); returns how many went.
        Only tokens still in the newest tier can go: compressed ones cannot be un-fed."""
        n = self.newest.trim(n)
        self.offset -= n
        if n and self.accumulated is not None:
            self.accumulated = self.accumulated[..., : self.accumulated.shape[2] - n]
        return n

    def arrays(self) -> list[Array]:
        extra = [self.accumulated] if self.accumulated is not None else []
        return [a for tier in self.tiers for a in tier.arrays()] + extra

    def nbytes(self) -> int:
        """Bytes of every stored array, metadata included, as allocated."""
        return sum(self.ops.nbytes(a) for a in self.arrays())


class KVCache:
    """The whole model's cache: one LayerCache per decoder layer, configured by a cache spec."""

    def __init__(self, ops: Ops, num_layers: int, spec: "str | CacheSpec" = "full", query_block: int = 512):
        self.ops = ops
        self.spec = CacheSpec.parse(spec)
        eviction, calibration, quantization = self.spec.build()
        self.layers = [LayerCache(ops, i, num_layers, eviction, calibration, quantization, query_block)
                       for i in range(num_layers)]

    @property
    def offset(self) -> int:
        """Tokens every layer holds (a forward interrupted mid-model leaves early layers ahead)."""
        return min(layer.offset for layer in self.layers)

    def trim(self, n: int) -> int:
        return [layer.trim(n) for layer in self.layers][0]

    def rewind_to(self, length: int) -> bool:
        """Keep only the first `length` tokens in every layer (also repairs a forward cut short
        mid-layer); False when compressed tokens stand in the way and the cache must be rebuilt."""
        for layer in self.layers:
            layer.trim(max(layer.offset - length, 0))
        return all(layer.offset == length for layer in self.layers)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def stats(self) -> dict:
        """Per-cache counters for --verbose: CaliDrop's branch counts summed over layers; quantized
        tokens (per layer, of the tokens it holds) and OTT's traced outliers per traced KV head."""
        stats = {}
        tiers = [layer.calibration for layer in self.layers if layer.calibration is not None]
        if tiers:
            stats["calidrop"] = {k: sum(t.counts[k] for t in tiers) for k in tiers[0].counts}
        quantized = [layer.quantized for layer in self.layers if layer.quantized is not None]
        if quantized:
            held = max(layer.quantized.length + layer.kept.length + layer.newest.length for layer in self.layers)
            traced = [t.traced_per_head() for t in quantized if hasattr(t, "traced_per_head")]
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
