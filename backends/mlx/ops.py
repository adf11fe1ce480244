"""The ops protocol (kvrt/cache/ops.py) for mx.arrays, on Metal or the CPU."""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx
import numpy as np

from kvrt.errors import KvrtError
from kvrt.cache.ops import KernelPaths, kernels_allowed
from kvrt.cache.rows import add_bias, length_bias


def causal_mask(t: int, s: int, causal_offset: int, window: int | None = None) -> mx.array:
    """Boolean [T, S]: query t may read key j iff j <= causal_offset + t (and, with a sliding
    window, j > causal_offset + t - window)."""
    rows, keys = mx.arange(t)[:, None] + causal_offset, mx.arange(s)[None, :]
    visible = keys <= rows
    return visible if window is None else visible & (keys > rows - window)


def add_key_bias(scores: mx.array, key_bias: mx.array, g: int) -> mx.array:
    """scores [B, Hkv, G·T, S] plus a key bias [B, Hkv, S] (every query) or [B, Hkv, T, S] (per query)."""
    if key_bias.ndim == 3:
        return scores + mx.expand_dims(key_bias, 2)
    b, h, t, s = key_bias.shape
    return (scores.reshape(b, h, g, t, s) + mx.expand_dims(key_bias, 2)).reshape(b, h, g * t, s)


def check_qkv(q: mx.array, k: mx.array, v: mx.array) -> None:
    """Reject shapes partial_attention cannot pair up, with one line saying which."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4 or v.shape[:3] != k.shape[:3]:
        raise KvrtError(f"attention wants q [B,Hq,T,D], k [B,Hkv,S,D] and v [B,Hkv,S,Dv], got {q.shape}, {k.shape}, "
                        f"{v.shape}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[1] % k.shape[1]:
        raise KvrtError(f"q {q.shape} does not fit k {k.shape}: batch and head dim must match, Hq a multiple of Hkv")


def _shifts(bits: int, axis: int, ndim: int) -> mx.array:
    """0, b, 2b, ... (one shift per code of a word) laid along `axis` of an ndim-array."""
    shape = [1] * ndim
    shape[axis] = 32 // bits
    return mx.arange(0, 32, bits, dtype=mx.int32).reshape(shape)


DECODE_ROWS = 16  # query rows per KV head (G·T) up to which partial_attention takes the decode kernel
QMM_ROWS = 16  # query rows per KV head up to which the quantized tier runs on mx.quantized_matmul off Metal
QMM_GROUPS = (32, 64, 128)  # the group sizes mx.quantized_matmul takes


class MLXOps(KernelPaths):
    name = "mlx"
    fused_prefill = False  # mlx's CPU attention may build the whole score matrix: keep query blocks
    softcap = None  # attention-logit soft-capping (Gemma 2), set by a runtime; no kernel computes it

    def kernels_on(self, x=None) -> bool:
        """Metal kernels (kernels_metal) run where MLX has Metal and the default device is the GPU, unless
        KVRT_KERNELS=off, which also turns off the quantized_matmul path below (the reference twins run).
        `x` is unused: with unified memory an array has no device, the stream decides (torch's takes one)."""
        return kernels_allowed() and mx.metal.is_available() and mx.default_device().type == mx.gpu

    def decode_kernel(self, q, kv_heads):
        return None  # each tier's partial, then merge_partials (a Metal kernel per tier where it has one)

    def calidrop_kernel(self, q, kv_heads):
        self.paths["calidrop"] = "reference"
        return None

    def quantized_kernel(self, q, kv_heads, key_group, value_group):
        from kvrt.kernels_metal.quantized_decode import fits, quantized_decode_attention

        if self.softcap is not None:
            self.paths["quantized decode"] = "reference"
            return None
        if fits(q, kv_heads) and self.kernels_on(q):
            self.paths["quantized decode"] = "metal"
            return quantized_decode_attention
        decode = q.shape[2] * (q.shape[1] // kv_heads) <= QMM_ROWS
        exact = key_group in QMM_GROUPS and value_group in QMM_GROUPS
        if decode and exact and kernels_allowed():
            self.paths["quantized decode"] = "quantized_matmul"
            return self._quantized_matmul_attention
        self.paths["quantized decode"] = "reference"
        return None

    def _quantized_matmul_attention(self, q, keys, values, scale, key_bias=None, lengths=None):
        """(out, lse) over a whole quantized tier with mx.quantized_matmul, which computes kvrt's format
        exactly: values are MLX's affine layout as stored (per token, groups of gv channels along the last
        axis, codes little-end-first in 32-bit words, x̂ = q·scale + zero); keys are too once the packed
        words are transposed to [D, S/P] (each channel's groups of G tokens then run along the last axis).
        No dequantized copy of the tier is made; scales go float32 so the scores are float32 [rows, S]."""
        b, hq, t, d = q.shape
        hkv = keys.shape[1]
        qg = q.reshape(b, hkv, (hq // hkv) * t, d).astype(mx.float32) * scale
        words = mx.view(keys.codes, mx.uint32).swapaxes(-1, -2)  # [B, Hkv, D, S/P]
        k_scale, k_zero = (x.astype(mx.float32).swapaxes(-1, -2) for x in (keys.scale, keys.zero))
        scores = mx.quantized_matmul(qg, words, k_scale, k_zero, transpose=False, group_size=keys.group,
                                     bits=keys.bits)
        if lengths is not None:  # a batch's padding groups: hidden through the bias
            key_bias = add_bias(key_bias, length_bias(self, lengths.tolist(), scores.shape[-1], keys.scale))
        if key_bias is not None:
            scores = scores + mx.expand_dims(key_bias, 2)
        lse = mx.logsumexp(scores, axis=-1, keepdims=True)
        probs = mx.exp(scores - mx.where(mx.isinf(lse), 0.0, lse))  # an all-hidden row: weights 0, not nan
        out = mx.quantized_matmul(probs, mx.view(values.codes, mx.uint32), values.scale.astype(mx.float32),
                                  values.zero.astype(mx.float32), transpose=False, group_size=values.group,
                                  bits=values.bits)
        return out.reshape(b, hq, t, d).astype(q.dtype), lse.reshape(b, hq, t)

    def quantizers(self, x):
        if x.shape[-1] <= 1024 and self.kernels_on(x):
            from kvrt.kernels_metal.quantize_keys import quantize_keys_metal
            from kvrt.kernels_metal.quantize_values import quantize_values_metal

            self.paths["quantize"] = "metal"
            return quantize_keys_metal, quantize_values_metal
        self.paths["quantize"] = "reference"
        return None

    def window_scores(self, q, k, scale):
        if q.shape[2] <= k.shape[2] and self.kernels_on(q) and self.softcap is None:
            from kvrt.kernels_metal.window_scores import window_scores_metal

            self.paths["window scores"] = "metal"
            return window_scores_metal(q, k, scale)
        self.paths["window scores"] = "reference"
        probs = self.attention_probs(q, k, scale, causal_offset=k.shape[2] - q.shape[2])
        return probs.sum(axis=3).mean(axis=2)

    def alloc_seq(self, like, capacity):
        return mx.zeros((*like.shape[:-2], capacity, like.shape[-1]), dtype=like.dtype)

    def write_seq(self, buf, start, x):
        if start + x.shape[-2] > buf.shape[-2]:
            raise KvrtError(f"write of {x.shape[-2]} rows at {start} overflows a buffer of {buf.shape[-2]}")
        # mlx slice assignment rebinds `buf` to the updated array (a donated, in-place update when unshared)
        buf[..., start : start + x.shape[-2], :] = x
        return buf

    def concat(self, xs: Sequence[mx.array], axis: int):
        return mx.concatenate(list(xs), axis=axis)

    def nbytes(self, x):
        return x.nbytes

    def take_rows(self, x, rows):
        return mx.take(x, mx.array(list(rows), dtype=mx.int32), axis=0)

    def write_rows(self, buf, starts, x):
        b, h, _, d = x.shape
        rows = mx.array([int(s) for s in starts], dtype=mx.int32).reshape(b, 1, 1, 1)
        idx = mx.broadcast_to(rows, (b, h, 1, d))
        return mx.put_along_axis(buf, idx, x, axis=2)

    def write_row(self, buf, row, start, x, axis=-2):
        end = start + x.shape[axis]
        if end > buf.shape[axis]:
            raise KvrtError(f"write of {x.shape[axis]} entries at {start} overflows a buffer of {buf.shape[axis]}")
        if axis == -1:  # slice assignment rebinds `buf` to the updated array, as in write_seq
            buf[row : row + 1, ..., start:end] = x
        else:
            buf[row : row + 1, ..., start:end, :] = x
        return buf

    def row_values(self, values, like):
        return mx.array([int(v) for v in values], dtype=mx.int32)

    def partial_attention(self, q, k, v, scale, causal_offset=None, with_lse=True, key_bias=None, key_lengths=None,
                          window=None):
        """q [B, Hq, T, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv] → (out [B, Hq, T, Dv] in q's dtype, lse [B, Hq, T]
        float32 or None)."""
        check_qkv(q, k, v)
        b, hq, t, d = q.shape
        hkv, s = k.shape[1], k.shape[2]
        g = hq // hkv
        window = window if causal_offset is not None else None
        # the kernels know neither soft-capping, nor a band mask, nor a per-query bias, nor values wider than keys
        plain = self.softcap is None and window is None and (key_bias is None or key_bias.ndim == 3) and v.shape[-1] == d
        if key_lengths is not None:
            from kvrt.kernels_metal.decode import decode_attention, fits

            if plain and g * t <= DECODE_ROWS and fits(q, hkv) and self.kernels_on(q):
                self.paths["decode"] = "metal"
                out, lse = decode_attention(q, k, v, scale, causal_offset, key_bias,
                                            lengths=self.row_values(key_lengths, q))
                return out, lse if with_lse else None
            key_bias = add_bias(key_bias, length_bias(self, key_lengths, s, k))  # the ops path: through the bias
        if not with_lse and key_bias is None and self.softcap is None and v.shape[-1] == d:
            # no merge follows: the fused kernel (GQA-aware, float32 softmax) needs no lse
            if causal_offset is None:
                mask = None
            elif causal_offset + t == s and window is None:  # the last query sees the last key: mlx's own causal mask
                mask = "causal"
            else:
                mask = causal_mask(t, s, causal_offset, window)
            if g * t <= DECODE_ROWS:
                self.paths["decode"] = "sdpa"
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask), None
        if g * t <= DECODE_ROWS:  # decode-sized: the Metal kernel reads each KV head once for its G·T rows
            from kvrt.kernels_metal.decode import decode_attention, fits

            if plain and fits(q, hkv) and self.kernels_on(q):
                self.paths["decode"] = "metal"
                out, lse = decode_attention(q, k, v, scale, causal_offset, key_bias)
                return out, lse if with_lse else None
            self.paths["decode"] = "reference"
        # GQA without repeat_kv: fold each KV head's G query heads into the query axis
        qg = q.reshape(b, hkv, g * t, d).astype(mx.float32)
        # scores in float32 so the lse of one tier is as exact as the merge needs
        scores = self._capped((qg @ k.astype(mx.float32).swapaxes(-1, -2)) * scale)
        if causal_offset is not None:
            visible = causal_mask(t, s, causal_offset, window)
            scores = mx.where(visible, scores.reshape(b, hkv, g, t, s), -mx.inf).reshape(b, hkv, g * t, s)
        if key_bias is not None:
            scores = add_key_bias(scores, key_bias, g)
        lse = mx.logsumexp(scores, axis=-1, keepdims=True)
        # a row with every key hidden has lse -inf: subtract 0 there so its weights are 0, not nan
        probs = mx.exp(scores - mx.where(mx.isinf(lse), 0.0, lse)).astype(v.dtype)
        out = (probs @ v).reshape(b, hq, t, v.shape[-1]).astype(q.dtype)
        return out, lse.reshape(b, hq, t)

    def _capped(self, scores: mx.array) -> mx.array:
        """Scaled scores, soft-capped to (−softcap, softcap) when the model asks for it (Gemma 2)."""
        return scores if self.softcap is None else mx.tanh(scores / self.softcap) * self.softcap

    def attention_probs(self, q, k, scale, causal_offset=None):
        b, hq, t, d = q.shape
        hkv, s = k.shape[1], k.shape[2]
        g = hq // hkv
        qg = q.reshape(b, hkv, g * t, d).astype(mx.float32)
        scores = self._capped((qg @ k.astype(mx.float32).swapaxes(-1, -2)) * scale).reshape(b, hkv, g, t, s)
        if causal_offset is not None and causal_offset < s - 1:  # else even the first query sees every key
            scores = mx.where(causal_mask(t, s, causal_offset), scores, -mx.inf)
        return mx.softmax(scores, axis=-1)

    def sum(self, x, axis):
        return mx.sum(x, axis=axis)

    def mean(self, x, axis):
        return mx.mean(x, axis=axis)

    def sqrt(self, x):
        return mx.sqrt(x)

    def abs(self, x):
        return mx.abs(x)

    def pool1d(self, x, kernel, kind):
        s, pad = x.shape[-1], kernel // 2
        fill = 0.0 if kind == "avg" else -mx.inf  # avg counts the zero padding, like torch's avg_pool1d
        padded = mx.pad(x, [(0, 0), (0, 0), (pad, pad)], constant_values=fill)
        windows = mx.stack([padded[..., i : i + s] for i in range(kernel)], axis=0)
        return mx.mean(windows, axis=0) if kind == "avg" else mx.max(windows, axis=0)

    def argsort_desc(self, x):
        return mx.argsort(-x, axis=-1)

    def sort(self, idx):
        return mx.sort(idx, axis=-1)

    def gather_seq(self, x, idx):
        if x.ndim == 3:
            return mx.take_along_axis(x, idx, axis=2)
        return mx.take_along_axis(x, mx.expand_dims(idx, -1), axis=2)

    def positions(self, start, count, like):
        row = mx.arange(start, start + count, dtype=mx.int32)
        return mx.broadcast_to(row, (like.shape[0], like.shape[1], count))

    def full(self, shape, value, like):
        return mx.full(shape, value, dtype=mx.float32)

    def where(self, cond, a, b):
        return mx.where(cond, a, b)

    def to_float32(self, x):
        return x.astype(mx.float32)

    def any(self, x):
        return bool(mx.any(x).item())

    def count(self, x):
        return int(mx.sum(x).item())

    def select_heads(self, x, heads):
        return x[:, mx.array(heads)]

    def place_heads(self, values, heads, total):
        out = mx.zeros((values.shape[0], total, *values.shape[2:]), dtype=values.dtype)
        out[:, mx.array(heads)] = values
        return out

    def to_host(self, x):
        return x  # unified memory: host and device arrays are the same memory

    def to_device_of(self, x, like):
        return x

    def exp(self, x):
        return mx.exp(x)

    def logsumexp(self, xs):
        return mx.logsumexp(mx.stack(list(xs)), axis=0)

    def expand_last(self, x):
        return mx.expand_dims(x, -1)

    def cast_like(self, x, like):
        return x.astype(like.dtype)

    # low-bit quantization (kvrt/cache/quant.py). Packed exactly as the torch backend packs (int32
    # words, code i at bits [i·b, (i+1)·b)), not with mx.quantize: its per-group affine layout
    # (scale and bias over groups along the last axis) cannot express per-channel key groups
    # along the token axis, and one byte-identical format lets torch and MLX share tests,
    # stored caches and the Triton/Metal kernels' reference twins. int32 (not uint32) keeps
    # the words' dtype equal across backends; unpacking masks after the arithmetic shift.
    def amin(self, x, axis, keepdims=False):
        return mx.min(x, axis=axis, keepdims=keepdims)

    def amax(self, x, axis, keepdims=False):
        return mx.max(x, axis=axis, keepdims=keepdims)

    def cast_like_ceil(self, x, like):
        c = x.astype(like.dtype)
        if c.dtype == x.dtype:
            return c
        # for c >= 0 the next representable value up is the bit pattern plus one
        as_int = {1: mx.int8, 2: mx.int16, 4: mx.int32}[c.dtype.size]
        up = mx.view(mx.view(c, as_int) + 1, c.dtype)
        return mx.where(c.astype(x.dtype) < x, up, c)

    def quantize_codes(self, x, scale, zero, bits):
        scale = scale.astype(mx.float32)
        safe = mx.where(scale == 0, 1.0, scale)
        q = mx.clip(mx.round((x.astype(mx.float32) - zero.astype(mx.float32)) / safe), 0, (1 << bits) - 1)
        return mx.where(scale == 0, 0, q).astype(mx.int32)

    def pack_codes(self, codes, bits, axis):
        # the codes' bit fields are disjoint, so an int32 sum of the shifted codes is their OR
        axis, per = axis % codes.ndim, 32 // bits
        shape = codes.shape
        c = codes.astype(mx.int32).reshape(*shape[:axis], shape[axis] // per, per, *shape[axis + 1 :])
        return mx.sum(mx.left_shift(c, _shifts(bits, axis + 1, c.ndim)), axis=axis + 1).astype(mx.int32)

    def unpack_codes(self, words, bits, axis, length):
        axis, per = axis % words.ndim, 32 // bits
        shifted = mx.right_shift(mx.expand_dims(words, axis + 1), _shifts(bits, axis + 1, words.ndim + 1))
        codes = mx.bitwise_and(shifted, (1 << bits) - 1)
        shape = words.shape
        codes = codes.reshape(*shape[:axis], shape[axis] * per, *shape[axis + 1 :])
        if codes.shape[axis] == length:
            return codes
        return mx.take(codes, mx.arange(length), axis=axis)

    def argmax_last(self, logits):
        return int(mx.argmax(logits.reshape(-1)).item())

    def to_numpy(self, x):
        # numpy has no bfloat16: cast on the device, then copy
        return np.array(x.astype(mx.float32))
