"""The ops protocol: the few array primitives kvrt's policy code is written against.

Policy files under kvrt/ (cache tiers, the (out, lse) merge, eviction, calibration,
quantization bookkeeping) never import torch or mlx. They hold backend arrays and
call these ops; `backends/torch` and `backends/mlx` implement them, and a backend op
may dispatch to a kernel (kernels_cuda, kernels_metal) where the device has one.

Besides these calls, policy code may use only what both frameworks' arrays share:
`.shape`, `.ndim`, `.reshape(*shape)`, basic slicing (`x[:, :, a:b]`, `x[..., None]`),
elementwise arithmetic (+ - * /), comparisons (< > <= ==) between arrays and scalars or
broadcast arrays, and the boolean operators & | ~.

Shapes: B batch, Hq query heads, Hkv KV heads (Hq = G·Hkv), T queries, S keys, D head dim.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any, Protocol, Sequence

if TYPE_CHECKING:  # policy code never needs numpy itself
    import numpy as np

Array = Any  # a torch.Tensor or an mx.array, never mixed within one backend


def kernels_allowed() -> bool:
    """False when KVRT_KERNELS=off forces every op of every backend onto its reference twin."""
    return os.environ.get("KVRT_KERNELS", "auto") != "off"


class KernelPaths:
    """Which path each kernel-backed op took last ("triton", "reference" ...), for --verbose, kept per
    thread: threads that share one model's ops each report the paths of their own calls."""

    def __init__(self):
        self._local = threading.local()

    @property
    def paths(self) -> dict[str, str]:
        """This thread's {op: path}."""
        if not hasattr(self._local, "paths"):
            self._local.paths = {}
        return self._local.paths


class Ops(Protocol):
    name: str  # "torch" or "mlx"
    # True when partial_attention(with_lse=False) never materializes the T x S scores (a flash
    # kernel), so a lone tier may take a whole prompt in one call instead of query blocks
    fused_prefill: bool
    # attention-logit soft-capping of the model (Gemma 2: scores become softcap·tanh(scores/softcap)
    # before the softmax), or None; a runtime sets it on its own ops, and no kernel computes it
    softcap: float | None

    # --- storage -------------------------------------------------------------------
    def alloc_seq(self, like: Array, capacity: int) -> Array:
        """Zeros shaped like `like` [..., T, D] but with `capacity` rows on axis -2, same dtype/device."""

    def write_seq(self, buf: Array, start: int, x: Array) -> Array:
        """Store x [..., T, D] into buf[..., start:start+T, :]; returns the buffer (in place where possible)."""

    def concat(self, xs: Sequence[Array], axis: int) -> Array:
        """Join arrays along an axis."""

    def nbytes(self, x: Array) -> int:
        """Bytes the array really occupies (elements × itemsize of the stored dtype)."""

    # --- rows of a batch (kvrt/cache/rows.py) ---------------------------------------------------
    def take_rows(self, x: Array, rows: Sequence[int]) -> Array:
        """x[rows]: a subset of the batch axis (axis 0), in the order given."""

    def write_rows(self, buf: Array, starts: Sequence[int], x: Array) -> Array:
        """Store row b of x [B, H, 1, D] at buf[b, :, starts[b], :] (each row at its own length);
        returns the buffer (in place where possible)."""

    def write_row(self, buf: Array, row: int, start: int, x: Array, axis: int = -2) -> Array:
        """Store x (one row: [1, H, n(, D)]) at buf[row, :, start:start+n] along `axis` (-2 or -1), the
        other rows untouched; returns the buffer (in place where possible)."""

    def row_values(self, values: Sequence[int], like: Array) -> Array:
        """int32 [B] holding one host value per row, on like's device."""

    # --- math ----------------------------------------------------------------------
    def partial_attention(
        self, q: Array, k: Array, v: Array, scale: float, causal_offset: int | None = None, with_lse: bool = True,
        key_bias: Array | None = None, key_lengths: "np.ndarray | None" = None, window: int | None = None,
    ) -> tuple[Array, Array | None]:
        """Softmax attention of q over one tier's keys, with its log-sum-exp.

        q: [B, Hq, T, D], k: [B, Hkv, S, D] (GQA: query head h reads KV head h // G), v: [B, Hkv, S, Dv]
        (Dv = D but for CaliDrop, whose values carry the keys too: one pass gives output and mean key).
        causal_offset: None = every key visible; else query t sees keys 0 .. causal_offset + t.
        window: with causal_offset, a sliding window: query t sees keys causal_offset + t − window < j
        ≤ causal_offset + t (a local layer's prompt, its positions contiguous in this tier).
        key_bias: None, or float32 [B, Hkv, S] added to every query's scores (−inf hides a key:
        OTT's traced slots, empty pool slots), or [B, Hkv, T, S], one bias per query (a local layer's
        window over tokens whose positions are not contiguous).
        key_lengths: None, or host ints [B]: row b of a batch holds only its first key_lengths[b] keys
        (the rest is padding, hidden; a decode kernel does not read it).
        Returns out [B, Hq, T, Dv] in q's dtype and lse [B, Hq, T] in float32 (None if not with_lse).
        A query that sees no key at all gets out 0 and lse −inf, which the merge weighs as nothing.
        """

    def exp(self, x: Array) -> Array: ...

    def logsumexp(self, xs: Sequence[Array]) -> Array:
        """Elementwise log(Σ exp(x_i)) over a list of same-shaped float32 arrays."""

    def expand_last(self, x: Array) -> Array:
        """x[..., None]: broadcast a per-row scalar over the head dim."""

    def cast_like(self, x: Array, like: Array) -> Array:
        """x converted to like's dtype."""

    # --- scoring and selection (eviction, calibration) --------------------------------
    def attention_probs(self, q: Array, k: Array, scale: float, causal_offset: int | None = None) -> Array:
        """softmax(q·kᵀ·scale) over keys in float32, grouped by KV head: [B, Hkv, G, T, S]."""

    def window_scores(self, q: Array, k: Array, scale: float) -> Array:
        """SnapKV's observation-window scores, float32 [B, Hkv, S]: the attention of the newest
        W queries q [B, Hq, W, D] over all keys k [B, Hkv, S, D] (query t sees keys up to
        S − W + t), softmax in float32, summed over the W queries and averaged over each KV
        head's G query heads. Records which path ran in `self.paths`."""

    def sum(self, x: Array, axis: int) -> Array: ...

    def mean(self, x: Array, axis: int) -> Array: ...

    def sqrt(self, x: Array) -> Array: ...

    def abs(self, x: Array) -> Array: ...

    def pool1d(self, x: Array, kernel: int, kind: str) -> Array:
        """Pool [B, H, S] along S with window `kernel`, stride 1, padding kernel//2 ("avg" counts
        the zero padding, as torch's avg_pool1d does; "max"); same shape out."""

    def argsort_desc(self, x: Array) -> Array:
        """Indices [B, H, S] ordering x [B, H, S] from largest to smallest (ties: lower index first)."""

    def sort(self, idx: Array) -> Array:
        """Indices sorted ascending along the last axis."""

    def gather_seq(self, x: Array, idx: Array) -> Array:
        """x [B, H, S, ...] at indices idx [B, H, K] along S → [B, H, K, ...]."""

    def positions(self, start: int, count: int, like: Array) -> Array:
        """int32 [B, H, count] holding start .. start+count-1, shaped like like's first two axes."""

    def full(self, shape: tuple, value: float, like: Array) -> Array:
        """A float32 array of `shape` filled with `value`, on like's device."""

    def where(self, cond: Array, a: Array, b: Array) -> Array:
        """a where cond else b, broadcast; a or b may be a Python float (then float32)."""

    def to_float32(self, x: Array) -> Array: ...

    def any(self, x: Array) -> bool: ...

    def count(self, x: Array) -> int:
        """Number of true entries in a boolean array."""

    def select_heads(self, x: Array, heads: list[int]) -> Array:
        """x[:, heads]: a subset of the head axis (axis 1)."""

    def place_heads(self, values: Array, heads: list[int], total: int) -> Array:
        """Zeros with `total` heads on axis 1, holding `values` at `heads` (the inverse of select_heads)."""

    def to_host(self, x: Array) -> Array:
        """The array in host memory (CaliDrop's offloaded tier); unchanged where host and device share memory."""

    def to_device_of(self, x: Array, like: Array) -> Array:
        """x moved to like's device."""

    # --- low-bit quantization (the format lives in kvrt/cache/quant.py) -----------------------
    def amin(self, x: Array, axis: int, keepdims: bool = False) -> Array:
        """Smallest entry along an axis, in x's dtype."""

    def amax(self, x: Array, axis: int, keepdims: bool = False) -> Array:
        """Largest entry along an axis, in x's dtype."""

    def cast_like_ceil(self, x: Array, like: Array) -> Array:
        """x (float32, >= 0) converted to like's dtype, rounded up to the next representable
        value wherever plain conversion rounded down (a stored scale never shrinks)."""

    def quantize_codes(self, x: Array, scale: Array, zero: Array, bits: int) -> Array:
        """int32 clamp(round((x − zero) / scale), 0, 2^bits − 1), computed in float32 (round half
        to even); x, scale, zero broadcast. Where scale == 0 (a constant group) the code is 0."""

    def pack_codes(self, codes: Array, bits: int, axis: int) -> Array:
        """Pack int32 codes in [0, 2^bits) into int32 words of 32/bits codes each, along `axis`
        (its length a multiple of 32/bits): code i of a run of 32/bits consecutive codes lands
        at bits [i·bits, (i+1)·bits) of the word (the last code's top bit is the sign bit)."""

    def unpack_codes(self, words: Array, bits: int, axis: int, length: int) -> Array:
        """The inverse of pack_codes: int32 codes along `axis`, the first `length` of them."""

    def quantized_kernel(self, q: Array, kv_heads: int, key_group: int, value_group: int):
        """A faster path for attention of q over a whole quantized tier stored with these group
        sizes, called as kernel(q, QuantizedKeys, QuantizedValues, scale, key_bias=..., lengths=...) -> (out, lse)
        (lengths: None or int32 [B] on the device, each row's flushed tokens):
        a fused kernel, or a framework op that computes the format exactly; None where the backend
        has neither (the tier then dequantizes block by block: the reference twin).
        Records which path runs in `self.paths` for --verbose."""

    def decode_kernel(self, q: Array, kv_heads: int):
        """A fused decode attention over a layer's tiers for decode queries q [B, Hq, 1, D], called as
        kernel(q, segments, scale, extra) -> (out, lse): the tiers' stored arrays as
        kvrt.cache.attention.DenseSegment / PackedSegment, and extra = None or one more partial (out, lse)
        to merge in. None where the backend has none: the tiers then take their own partials and
        merge_partials (the reference twin). Records which path runs in `self.paths`."""

    def calidrop_kernel(self, q: Array, kv_heads: int):
        """CaliDrop's fused decode step (kvrt/cache/methods/calidrop.py: CalibrationTier.fused_partial says
        how it is called), or None where the backend has none (the twin: CalibrationTier.partial's ops
        path). Records which path runs in `self.paths`."""

    def quantizers(self, x: Array):
        """Fused quantize-and-pack kernels for arrays like x, as a pair
        (keys(k, bits, group, traced) -> QuantizedKeys, values(v, bits, group) -> QuantizedValues),
        or None where this device has none (kvrt.cache.quant's ops path is the reference twin).
        `traced` is None or bool [B, Hkv, S]: those key slots first take the float32 mean of the
        untraced keys of their group, cast to the model dtype (OTT). Records the path in `self.paths`."""

    # --- host boundary -------------------------------------------------------------
    def argmax_last(self, logits: Array) -> int:
        """Index of the largest entry of a 1-D logits row (greedy decoding without a host copy)."""

    def to_numpy(self, x: Array) -> np.ndarray:
        """A float32 host copy (sampling and tests live on the host)."""
