"""CaliDrop (arXiv 2507.19906): calibrate attention with the tokens eviction dropped.

Queries at nearby positions are similar, so after eviction the last prompt query of each
query head (the proxy) attends once over that layer's evicted tokens; the partial output
and its log-sum-exp are kept. At each later query, per head, ρ = cos(q_t, proxy):
ρ > θ2 merges the stored partial into attention; ρ < θ1 recomputes it with q_t over the
evicted tier (which becomes the new proxy) and merges; otherwise no calibration. All of
it is one more tier in the (out, lse) merge: a head that skips contributes lse = −inf.

Choices where the paper is silent, kept as parameters:
- `granularity=head` tests ρ per query head; `kv_head` averages ρ over a KV head's
  query heads, so a GQA group decides together; `layer` takes the layer's lowest ρ, so one
  head that has moved away recomputes every head (a tier in the query's own memory is read
  whole for one head anyway, so there the other heads' exact partials cost nothing more).
- Later compressions (decode-time eviction, chat turns) merge their newly evicted
  tokens into the stored partial under the current proxy, so it stays exact for the proxy.
- The evicted tier lives in host memory (the same memory on a CPU or unified-memory
  device), capped at `calibration_size` tokens per KV head (0 = no cap; the highest
  eviction scores stay); `recompute=never` keeps no evicted tier at all, only the
  partial, and then ρ < θ1 means no calibration. `offload=int2|int4|int8` stores it
  quantized in kvrt's KIVI format instead (kvrt/cache/methods/evicted_store.py), on the device.
- `rule=taylor` (the default; kvrt's own variant, measured in bench/RESULTS.md) also keeps, per
  query head, the softmax-weighted mean of the evicted keys under the proxy — the gradient of the
  partial's lse with respect to the query, divided by the scale — and moves the reused lse to first
  order toward the current query: lse(q) ≈ lse(p) + scale·(q − p)·k̄. The evicted tier's weight in
  the merge then follows the query instead of staying the proxy's (one more vector per head). lse
  is convex in q, so this never overstates the evicted tier's true weight, where the stale lse can.
  So taylor's θ2 defaults to θ1: a head that does not recompute reuses the moved partial, with no
  band where the evicted tier is dropped (measured in bench/RESULTS.md: it recovers more of every
  base's loss, StreamingLLM's most, with the same recomputes). `rule=paper` reuses the stored
  partial as it is, between the paper's θ1 = 0.7 and θ2 = 0.85.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from kvrt.cache import rows as batch_rows
from kvrt.cache.attention import DenseSegment, merge_partials
from kvrt.errors import InvalidValue
from kvrt.cache.methods.base import selection
from kvrt.cache.layer_shape import LayerShape
from kvrt.cache.methods.evicted_store import check_offload, evicted_store, evicted_store_bytes, paired_partial
from kvrt.cache.ops import Array, Ops

BRANCHES = ("calibrate", "recompute", "skip")


class CaliDrop:
    name = "calidrop"
    options = {"theta1": float, "theta2": float, "calibration_size": int, "recompute": str, "granularity": str,
               "offload": str, "rule": str}
    RULES = ("taylor", "paper")

    def __init__(self, theta1: float = 0.7, theta2: float | None = None, calibration_size: int = 0,
                 recompute: str = "auto", granularity: str = "head", offload: str = "none", rule: str = "taylor"):
        if rule not in self.RULES:
            raise InvalidValue(f"calidrop: rule must be one of {', '.join(self.RULES)}, got {rule}")
        self.rule = rule
        if theta2 is None:  # the moved partial is safe to reuse wherever it is not recomputed; the paper's is not
            theta2 = theta1 if rule == "taylor" else 0.85
        if recompute not in ("auto", "never"):
            raise InvalidValue(f"calidrop: recompute must be auto or never, got {recompute}")
        if granularity not in ("head", "kv_head", "layer"):
            raise InvalidValue(f"calidrop: granularity must be head, kv_head or layer, got {granularity}")
        if calibration_size < 0:
            raise InvalidValue(f"calidrop: calibration_size must be >= 0, got {calibration_size}")
        for name, theta in (("theta1", theta1), ("theta2", theta2)):
            if not -1 <= theta <= 1:
                raise InvalidValue(f"calidrop: {name} is a cosine threshold in [-1, 1], got {theta}")
        if theta1 > theta2:  # below theta1 recomputes, above theta2 reuses: the bands must not cross
            raise InvalidValue(f"calidrop: theta1 must be <= theta2, got theta1={theta1} > theta2={theta2}")
        check_offload(offload)
        self.theta1, self.theta2, self.offload = theta1, theta2, offload
        self.calibration_size, self.recompute, self.granularity = calibration_size, recompute, granularity

    def new_tier(self, ops: Ops) -> "CalibrationTier":
        return CalibrationTier(ops, self)

    def layer_bytes(self, shape: LayerShape, evicted: int, prompt: int, budget: int) -> int:
        """The most bytes a layer's tier holds over a request that evicts `evicted` tokens in all (the
        prompt's beyond the `budget` at once, then one a decode step for StreamingLLM, H2O): the store
        of evicted tokens and their float32 scores (a capped tier's only), and per query head the proxy,
        the partial out and lse (and rule=taylor's mean key); the branch counts."""
        vectors = shape.query_heads * (shape.dim * 4 + shape.dim * shape.itemsize + 4) + 3 * 4
        if self.rule == "taylor":
            vectors += shape.query_heads * shape.dim * 4
        if self.recompute == "never" or not evicted:
            return vectors
        first = max(prompt - budget, 0)
        cap = self.calibration_size
        if cap and evicted > cap:
            first, evicted = min(first, cap), cap + 1  # a capped tier is rebuilt at the cap, then takes one
        pairs = evicted_store_bytes(shape, self.offload, first, evicted - first)
        return vectors + pairs + (shape.per_head(evicted) if cap else 0)


class CalibrationTier:
    """One layer's calibration state: the evicted tokens (a store, per KV head, with their eviction
    scores), proxy q [B, Hq, D], out [B, Hq, 1, D], lse [B, Hq, 1]."""

    name = "calibration"

    def __init__(self, ops: Ops, config: CaliDrop):
        self.ops, self.config = ops, config
        self.store = evicted_store(ops, config.offload)
        self.scores = None  # host float32 [B, Hkv, E]: the evicted tokens' eviction scores (calibration_size > 0)
        self.proxy = self.out = self.lse = None
        self.mean_key = None  # rule=taylor: float32 [B, Hq, 1, D], the evicted keys' mean under the proxy
        self.length = 0  # evicted tokens the stored partial covers (the most of any row, in a batch)
        self.row_lengths: np.ndarray | None = None  # per row, when the rows of a batch differ
        self.rows = 1
        self.kv_heads = None  # the model's, known from the first eviction
        # int32 [B, 3] on the device: each row's head-steps that calibrated, recomputed, skipped (BRANCHES);
        # kept there so that counting reads nothing back to the host during decode
        self.counts = None

    def lengths(self) -> np.ndarray:
        return batch_rows.per_row(self.row_lengths, self.rows, self.length)

    def branch_counts(self) -> dict[str, np.ndarray]:
        """{branch: int64 [B]}: head-steps per batch row that took each branch (a host read, for stats)."""
        counts = np.zeros((self.rows, 3), dtype=np.int64) if self.counts is None else self.ops.to_numpy(self.counts)
        return {name: counts[:, i].astype(np.int64) for i, name in enumerate(BRANCHES)}

    def signature(self, row: int) -> tuple:
        """What must match for rows to compress together: the partial's and the store's lengths."""
        return (int(self.lengths()[row]), *self.store.signature(row))

    def take(self, rows: Sequence[int]) -> "CalibrationTier":
        ops, rows = self.ops, list(rows)
        out = CalibrationTier(ops, self.config)
        out.store = self.store.take(rows)
        lengths = self.lengths()[rows]
        out.length, out.row_lengths = int(lengths.max()), batch_rows.ragged(lengths)
        out.rows, out.counts = len(rows), batch_rows.take(ops, self.counts, rows)
        out.kv_heads = self.kv_heads
        if out.length:  # rows that evicted nothing yet take no partial: their first eviction starts one
            out.proxy, out.out, out.lse = (batch_rows.take(ops, a, rows) for a in (self.proxy, self.out, self.lse))
            out.mean_key = batch_rows.take(ops, self.mean_key, rows)
            out.scores = batch_rows.take(ops, self.scores, rows, -1, int(out.store.lengths().max(initial=0)))
        return out

    @staticmethod
    def stack(parts: Sequence["CalibrationTier"], counts: Sequence[int]) -> "CalibrationTier":
        """Rows without a partial yet get proxy 0, out 0 and lse −inf: they calibrate with nothing."""
        ops, out = parts[0].ops, CalibrationTier(parts[0].ops, parts[0].config)
        out.store = type(parts[0].store).stack([p.store for p in parts], counts)
        lengths = np.concatenate([p.lengths() for p in parts])
        out.length, out.row_lengths = int(lengths.max()), batch_rows.ragged(lengths)
        out.rows, out.counts = sum(counts), batch_rows.stack(ops, [p.counts for p in parts], counts, None, 0)
        out.kv_heads = next((p.kv_heads for p in parts if p.kv_heads is not None), None)
        out.proxy = batch_rows.stack(ops, [p.proxy for p in parts], counts, None, 0.0)
        out.out = batch_rows.stack(ops, [p.out for p in parts], counts, None, 0.0)
        out.lse = batch_rows.stack(ops, [p.lse for p in parts], counts, None, float("-inf"))
        out.mean_key = batch_rows.stack(ops, [p.mean_key for p in parts], counts, None, 0.0)
        out.scores = batch_rows.stack(ops, [p.scores for p in parts], counts, -1, float("-inf"))
        return out

    def add_evicted(self, k: Array, v: Array, scores: Array, q: Array, scale: float) -> None:
        """Take newly evicted k/v [B, Hkv, E, D] (with their eviction scores) from a chunk whose
        last query q[:, :, -1] becomes the proxy on the first eviction."""
        ops = self.ops
        taylor = self.config.rule == "taylor"
        pairs = ops.concat([k, v], axis=-1)
        self.kv_heads = k.shape[1]
        if self.proxy is None:
            self.proxy = ops.to_float32(q[:, :, -1])
            self.out, self.lse, *mean_key = paired_partial(ops, q[:, :, -1:], pairs, scale, mean_key=taylor)
            if taylor:
                self.mean_key = ops.to_float32(mean_key[0])
        else:  # the stored partial stays exact for its proxy: merge in the new tokens under it
            self._merge_evicted(ops.cast_like(self.proxy[:, :, None, :], q), pairs, scale, taylor)
        self.length += k.shape[2]
        if self.config.recompute == "never":
            return
        self.store.add(k, v, pairs)
        cap = self.config.calibration_size
        if not cap:  # the eviction scores matter only to a capped tier
            return
        scores = ops.to_host(scores)
        self.scores = scores if self.scores is None else ops.concat([self.scores, scores], axis=2)
        if self.store.length > cap:  # keep the highest scores; a quantized store re-stores them
            keep, _ = selection(ops, self.scores, cap)
            k, v = self.store.tokens()
            self.store = evicted_store(ops, self.config.offload)
            self.store.add(ops.gather_seq(k, keep), ops.gather_seq(v, keep))
            self.scores = ops.gather_seq(self.scores, keep)

    def _merge_evicted(self, proxy_q: Array, pairs: Array, scale: float, taylor: bool) -> None:
        """Merge newly evicted pairs [B, Hkv, E, 2D] into the stored partial under the proxy (and the
        mean key, with the same weights). A fused decode kernel takes the stored partial as its extra
        tier (its mean key beside its output): one call where the ops path takes an attention and two
        merges; decode-time eviction (StreamingLLM, H2O) does this at every step."""
        ops = self.ops
        kernel = ops.decode_kernel(proxy_q, self.kv_heads)
        if kernel is not None:
            d = pairs.shape[-1] // 2
            stored = ops.concat([ops.cast_like(self.mean_key, self.out), self.out], axis=-1) if taylor else self.out
            segment = DenseSegment(pairs[..., :d], pairs if taylor else pairs[..., d:])
            merged, self.lse = kernel(proxy_q, [segment], scale, (stored, self.lse))
            self.out = merged[..., d:] if taylor else merged
            if taylor:
                self.mean_key = ops.to_float32(merged[..., :d])
            return
        out, lse, *mean_key = paired_partial(ops, proxy_q, pairs, scale, mean_key=taylor)
        if taylor:
            self.mean_key, _ = merge_partials(ops, [(self.mean_key, self.lse), (ops.to_float32(mean_key[0]), lse)])
        self.out, self.lse = merge_partials(ops, [(self.out, self.lse), (out, lse)])

    def similarity(self, q: Array) -> Array:
        """ρ = cos(q_t, proxy) per query head and query: float32 [B, Hq, T]."""
        ops = self.ops
        qf, proxy = ops.to_float32(q), self.proxy[:, :, None, :]
        dot = ops.sum(qf * proxy, axis=-1)
        norms = ops.sqrt(ops.sum(qf * qf, axis=-1)) * ops.sqrt(ops.sum(proxy * proxy, axis=-1))
        rho = dot / (norms + 1e-12)
        if self.config.granularity == "kv_head":  # one decision per GQA group
            b, hq, t = rho.shape
            grouped = rho.reshape(b, self.kv_heads, hq // self.kv_heads, t)
            rho = (grouped * 0 + ops.mean(grouped, axis=2)[:, :, None, :]).reshape(b, hq, t)
        elif self.config.granularity == "layer":  # one decision per layer and query: its least similar head's
            rho = rho * 0 + ops.amin(rho, axis=1, keepdims=True)
        return rho

    def partial(self, q: Array, scale: float, causal_offset: int | None, with_lse: bool):
        """(out, lse) of q [B, Hq, T, D]: the stored or recomputed partial, lse = −inf where skipped.
        Nothing is read back to the host here, but where the evicted tier lies in another memory than
        q (a host tier for a GPU): which KV heads ask decides what moves (`recomputed`)."""
        ops, cfg = self.ops, self.config
        local = self.store.local_to(q)
        paired = self.store.pairs_of() if local else None  # a fused step reads keys beside values
        kernel = ops.calidrop_kernel(q, self.kv_heads) if paired is not None else None
        if kernel is not None:
            return self.fused_partial(kernel, q, scale, *paired)
        rho = self.similarity(q)
        out, lse, proxy = self.out, self.lse, self.proxy
        recompute = rho < cfg.theta1
        calibrate = rho > cfg.theta2  # and not recompute (the bands do not cross: theta1 <= theta2)
        taylor = cfg.rule == "taylor"
        if taylor:  # the reused lse, moved to first order toward each query
            step = ops.sum((ops.to_float32(q) - proxy[:, :, None, :]) * self.mean_key, axis=-1) * scale
            lse = ops.where(calibrate, lse + step, lse)
        fresh = self.recomputed(q, recompute, scale, taylor, local) if self.store.length else None
        if fresh is None:
            recompute = rho < -2.0  # nothing to recompute over (or no head asks): all false
        else:
            fresh_out, fresh_lse, *mean_key = fresh
            out = ops.where(recompute[..., None], fresh_out, out)
            lse = ops.where(recompute, fresh_lse, lse)
            last = recompute[:, :, -1:]  # the chunk's last query becomes the new proxy where it recomputed
            self.out = ops.where(last[..., None], fresh_out[:, :, -1:], self.out)
            self.lse = ops.where(last, fresh_lse[:, :, -1:], self.lse)
            self.proxy = ops.where(last, ops.to_float32(q[:, :, -1]), self.proxy)
            if taylor:  # the new proxy's mean key came with its partial, in the same pass
                self.mean_key = ops.where(last[..., None], ops.to_float32(mean_key[0][:, :, -1:]), self.mean_key)
        used = calibrate | recompute
        self._count(calibrate, recompute)
        return out, ops.where(used, lse, ops.full(lse.shape, float("-inf"), lse))

    def fused_partial(self, kernel, q: Array, scale: float, pairs: Array | None, pair_lengths: np.ndarray | None):
        """The backend's fused step (kernels_cpu/calidrop.c): the same (out, lse), new state and counts
        as the ops path of `partial`, in one call that recomputes only for the heads that ask. pairs:
        the evicted tier [B, Hkv, E, 2D] (None: empty), row b holding pair_lengths[b] (None: all E)."""
        cfg = self.config
        out, lse, state = kernel(q, self.kv_heads, scale, cfg.theta1, cfg.theta2, cfg.granularity, self.proxy,
                                 self.out, self.lse, self.mean_key, pairs, pair_lengths, self.lengths() > 0,
                                 self._counts_for(q))
        self.proxy, self.out, self.lse, self.mean_key, self.counts = state
        return out, lse

    def _counts_for(self, like: Array) -> Array:
        """The branch counts, zeros before the first count."""
        if self.counts is None:
            self.counts = self.ops.row_values([0] * (3 * self.rows), like).reshape(self.rows, 3)
        return self.counts

    def _count(self, calibrate: Array, recompute: Array) -> None:
        """Branch counts per batch row, added on the device; a row of a batch that has evicted nothing
        yet counts nothing."""
        ops, b = self.ops, calibrate.shape[0]
        n_cal = ops.sum(ops.where(calibrate, 1.0, 0.0).reshape(b, -1), axis=1)[:, None]
        n_rec = ops.sum(ops.where(recompute, 1.0, 0.0).reshape(b, -1), axis=1)[:, None]
        total = calibrate.shape[1] * calibrate.shape[2]
        active = ops.row_values((self.lengths() > 0).astype(np.int32), calibrate)[:, None]
        counts = self._counts_for(calibrate)
        step = ops.concat([n_cal, n_rec, (n_cal + n_rec) * -1.0 + total], axis=1) * active
        self.counts = counts + ops.cast_like(step, counts)

    def recomputed(self, q: Array, recompute: Array, scale: float, mean_key: bool, local: bool) -> tuple | None:
        """(out, lse) of q over the evicted tier, and with `mean_key` the keys' mean under the same
        weights. A tier in q's own memory is read for every head at once (reading which heads ask
        would cost a host read per layer). A tier in another memory (host, for a GPU) is read only for
        the KV heads whose query heads ask for it (moving it costs more than attending): the other
        heads get zeros, which `recompute` masks out, and None when no head asks."""
        ops = self.ops
        if local:
            return self.store.partial(q, scale, None, mean_key)
        b, hq, t = recompute.shape
        g = hq // self.kv_heads
        asks = ops.to_numpy(recompute).reshape(b, self.kv_heads, g, t).any(axis=(0, 2, 3))
        need = [h for h in range(self.kv_heads) if asks[h]]
        if not need:
            return None
        if len(need) == self.kv_heads:
            return self.store.partial(q, scale, None, mean_key)
        heads = [h * g + j for h in need for j in range(g)]
        parts = self.store.partial(ops.select_heads(q, heads), scale, need, mean_key)
        return tuple(ops.place_heads(part, heads, hq) for part in parts)

    def trim(self, n: int) -> int:
        return 0

    def arrays(self) -> list[Array]:
        kept = (self.scores, self.proxy, self.out, self.lse, self.mean_key, self.counts)
        return self.store.arrays() + [a for a in kept if a is not None]

    def host_arrays(self) -> list[Array]:
        """The evicted tier when it is kept in host memory (offload=none), not on the device."""
        return self.store.arrays() if getattr(self.store, "host", False) else []
