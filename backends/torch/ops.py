"""The ops protocol (kvrt/cache/ops.py) for torch tensors, CPU or CUDA."""

from __future__ import annotations

import importlib.util
from typing import Sequence

import torch
import torch.nn.functional as F

from kvrt.cache.attention import DenseSegment
from kvrt.cache.ops import KernelPaths, kernels_allowed
from kvrt.cache.rows import add_bias, length_bias


def causal_mask(t: int, s: int, causal_offset: int, device, window: int | None = None) -> torch.Tensor:
    """Boolean [T, S]: query t may read key j iff j <= causal_offset + t (and, with a sliding
    window, j > causal_offset + t - window)."""
    rows = torch.arange(t, device=device)[:, None] + causal_offset
    keys = torch.arange(s, device=device)[None, :]
    visible = keys <= rows
    return visible if window is None else visible & (keys > rows - window)


def add_key_bias(scores: torch.Tensor, key_bias: torch.Tensor, g: int) -> torch.Tensor:
    """scores [B, Hkv, G·T, S] plus a key bias [B, Hkv, S] (every query) or [B, Hkv, T, S] (per query)."""
    if key_bias.ndim == 3:
        return scores + key_bias[:, :, None, :]
    b, h, t, s = key_bias.shape
    return (scores.view(b, h, g, t, s) + key_bias[:, :, None]).view(b, h, g * t, s)


def _shifts(bits: int, axis: int, ndim: int, device) -> torch.Tensor:
    """0, b, 2b, ... (one shift per code of a word) laid along `axis` of an ndim-array."""
    shape = [1] * ndim
    shape[axis] = 32 // bits
    return torch.arange(0, 32, bits, dtype=torch.int32, device=device).view(shape)


def decode_sized(q, kv_heads: int) -> bool:
    """Whether a KV head's query rows (G·T) fit the decode kernels, which hold them all in registers."""
    return q.shape[2] * (q.shape[1] // kv_heads) <= 16


class TorchOps(KernelPaths):
    name = "torch"
    fused_prefill = True  # SDPA's flash kernels (CPU and CUDA) work through the queries in tiles
    softcap = None  # Gemma 2's attention-logit soft-capping, set by the runtime (no kernel computes it)

    def kernels_on(self, x) -> bool:
        """Triton kernels run on CUDA tensors when triton imports, unless KVRT_KERNELS=off."""
        if not (x.is_cuda and kernels_allowed()):
            return False
        return importlib.util.find_spec("triton") is not None

    kernel_calls = 0  # kvrt's CPU kernels handed out, each run once (torch's profiler cannot see ctypes calls)

    def cpu_kernels_on(self, q, kv_heads: int) -> bool:
        """kvrt's C kernels (kernels_cpu/) take CPU decode queries unless KVRT_KERNELS=off, when they build."""
        if q.device.type != "cpu" or not kernels_allowed() or self.softcap is not None:
            return False
        from kvrt.kernels_cpu.decode import supports

        return supports(q, kv_heads)

    def decode_kernel(self, q, kv_heads):
        if not self.cpu_kernels_on(q, kv_heads):
            return None
        from kvrt.kernels_cpu.decode import decode_tiers

        self.paths["decode"] = "cpu"
        self.kernel_calls += 1  # the caller runs the kernel it asked for
        return decode_tiers

    def calidrop_kernel(self, q, kv_heads):
        if not self.cpu_kernels_on(q, kv_heads):
            self.paths["calidrop"] = "reference"
            return None
        from kvrt.kernels_cpu.calidrop import calidrop_step

        self.paths["calidrop"] = "cpu"
        self.kernel_calls += 1
        return calidrop_step

    def quantized_kernel(self, q, kv_heads, key_group, value_group):
        if self.cpu_kernels_on(q, kv_heads):
            from kvrt.kernels_cpu.decode import quantized_decode

            self.paths["quantized decode"] = "cpu"
            self.kernel_calls += 1
            return quantized_decode
        if not (decode_sized(q, kv_heads) and self.kernels_on(q)) or self.softcap is not None:
            self.paths["quantized decode"] = "reference"
            return None
        from kvrt.kernels_cuda.quantized_decode import quantized_decode_attention

        self.paths["quantized decode"] = "triton"
        return quantized_decode_attention

    def quantizers(self, x):
        if not self.kernels_on(x):
            self.paths["quantize"] = "reference"
            return None
        from kvrt.kernels_cuda.quantize_keys import quantize_keys_fused
        from kvrt.kernels_cuda.quantize_values import quantize_values_fused

        self.paths["quantize"] = "triton"
        return quantize_keys_fused, quantize_values_fused

    def window_scores(self, q, k, scale):
        if self.kernels_on(q) and self.softcap is None:
            from kvrt.kernels_cuda.window_scores import window_scores

            self.paths["window scores"] = "triton"
            return window_scores(q, k, scale)
        self.paths["window scores"] = "reference"
        probs = self.attention_probs(q, k, scale, causal_offset=k.shape[2] - q.shape[2])
        return probs.sum(dim=3).mean(dim=2)

    def alloc_seq(self, like, capacity):
        return like.new_zeros(*like.shape[:-2], capacity, like.shape[-1])

    def write_seq(self, buf, start, x):
        buf[..., start : start + x.shape[-2], :] = x
        return buf

    def concat(self, xs: Sequence[torch.Tensor], axis: int):
        return torch.cat(list(xs), dim=axis)

    def nbytes(self, x):
        return x.numel() * x.element_size()

    def take_rows(self, x, rows):
        return x.index_select(0, torch.tensor(list(rows), device=x.device))

    def write_rows(self, buf, starts, x):
        b, h, _, d = x.shape
        idx = torch.tensor(list(starts), device=buf.device).view(b, 1, 1, 1).expand(b, h, 1, d)
        return buf.scatter_(2, idx, x)

    def write_row(self, buf, row, start, x, axis=-2):
        end = start + x.shape[axis]
        if axis == -1:
            buf[row, ..., start:end] = x[0]
        else:
            buf[row, ..., start:end, :] = x[0]
        return buf

    def row_values(self, values, like):
        return torch.tensor([int(v) for v in values], dtype=torch.int32, device=like.device)

    def partial_attention(self, q, k, v, scale, causal_offset=None, with_lse=True, key_bias=None, key_lengths=None,
                          window=None):
        b, hq, t, d = q.shape
        hkv, s = k.shape[1], k.shape[2]
        window = window if causal_offset is not None else None
        # the kernels know neither soft-capping, nor a band mask, nor a per-query bias, nor values wider than keys
        plain = self.softcap is None and window is None and (key_bias is None or key_bias.ndim == 3) and v.shape[-1] == d
        kernel = plain and decode_sized(q, hkv) and self.kernels_on(q)
        # kvrt's C kernel: one decode query per head, over keys it may read whole (values may be wider)
        visible = causal_offset is None or (t == 1 and s <= causal_offset + 1)
        cpu = (self.softcap is None and window is None and visible and (key_bias is None or key_bias.ndim == 3)
               and t == 1 and self.cpu_kernels_on(q, hkv))
        if key_lengths is not None and not (kernel or cpu):  # the ops path hides a batch's padding through the bias
            key_bias, key_lengths = add_bias(key_bias, length_bias(self, key_lengths, s, k)), None
        square = causal_offset == 0 and s == t and window is None  # a fresh prompt: SDPA's own causal mask fits
        mask = None if causal_offset is None or square else causal_mask(t, s, causal_offset, q.device, window)
        decode = decode_sized(q, hkv)
        if not with_lse and key_bias is None and key_lengths is None and self.softcap is None:
            # no merge follows: the fused SDPA kernel is fastest and needs no lse
            if decode:
                self.paths["decode"] = "sdpa"
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=square, scale=scale, enable_gqa=hq != hkv
            )
            return out, None
        if cpu:
            from kvrt.kernels_cpu.decode import decode_tiers

            self.paths["decode"] = "cpu"
            self.kernel_calls += 1
            out, lse = decode_tiers(q, [DenseSegment(k, v, key_lengths, key_bias)], scale)
            return out, lse if with_lse else None
        if kernel:
            from kvrt.kernels_cuda.decode import decode_attention

            self.paths["decode"] = "triton"
            lengths = None if key_lengths is None else self.row_values(key_lengths, q)
            out, lse = decode_attention(q, k, v, scale, causal_offset, key_bias, lengths=lengths)
            return out, lse if with_lse else None
        if decode:
            self.paths["decode"] = "reference"
        g = hq // hkv
        # GQA without repeat_kv: fold each KV head's G query heads into the query axis
        qg = q.reshape(b, hkv, g * t, d)
        scores = self._capped(torch.matmul(qg, k.transpose(-1, -2)).float() * scale)
        if causal_offset is not None:
            mask = causal_mask(t, s, causal_offset, q.device, window)
            scores = scores.view(b, hkv, g, t, s).masked_fill(~mask, float("-inf")).view(b, hkv, g * t, s)
        if key_bias is not None:
            scores = add_key_bias(scores, key_bias, g)
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)
        # a row with every key hidden has lse -inf: subtract 0 there so its weights are 0, not nan
        probs = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)).to(v.dtype)
        out = torch.matmul(probs, v).view(b, hq, t, v.shape[-1])
        return out, lse.view(b, hq, t)

    def _capped(self, scores: torch.Tensor) -> torch.Tensor:
        """Scaled scores, soft-capped to (−softcap, softcap) when the model asks for it (Gemma 2)."""
        return scores if self.softcap is None else torch.tanh(scores / self.softcap) * self.softcap

    def attention_probs(self, q, k, scale, causal_offset=None):
        b, hq, t, d = q.shape
        hkv, s = k.shape[1], k.shape[2]
        scores = self._capped(torch.matmul(q.reshape(b, hkv, (hq // hkv) * t, d), k.transpose(-1, -2)).float() * scale)
        scores = scores.view(b, hkv, hq // hkv, t, s)
        if causal_offset is not None and causal_offset < s - 1:  # else even the first query sees every key
            scores = scores.masked_fill(~causal_mask(t, s, causal_offset, q.device), float("-inf"))
        return torch.softmax(scores, dim=-1)

    def sum(self, x, axis):
        return x.sum(dim=axis)

    def mean(self, x, axis):
        return x.mean(dim=axis)

    def sqrt(self, x):
        return torch.sqrt(x)

    def abs(self, x):
        return torch.abs(x)

    def pool1d(self, x, kernel, kind):
        b, h, s = x.shape
        flat = x.reshape(b * h, 1, s)
        if kind == "avg":
            pooled = F.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2)
        else:
            pooled = F.max_pool1d(flat, kernel, stride=1, padding=kernel // 2)
        return pooled.reshape(b, h, -1)[..., :s]

    def argsort_desc(self, x):
        return torch.argsort(x, dim=-1, descending=True, stable=True)

    def sort(self, idx):
        return torch.sort(idx, dim=-1).values

    def gather_seq(self, x, idx):
        if x.ndim == 3:
            return torch.gather(x, 2, idx)
        return torch.gather(x, 2, idx.unsqueeze(-1).expand(*idx.shape, x.shape[-1]))

    def positions(self, start, count, like):
        row = torch.arange(start, start + count, device=like.device, dtype=torch.int32)
        return row.expand(like.shape[0], like.shape[1], count).contiguous()

    def full(self, shape, value, like):
        return torch.full(shape, value, dtype=torch.float32, device=like.device)

    def where(self, cond, a, b):
        return torch.where(cond, a, b)

    def to_float32(self, x):
        return x.float()

    def any(self, x):
        return bool(x.any())

    def count(self, x):
        return int(x.sum())

    def select_heads(self, x, heads):
        return x[:, heads]

    def place_heads(self, values, heads, total):
        out = values.new_zeros(values.shape[0], total, *values.shape[2:])
        out[:, heads] = values
        return out

    def to_host(self, x):
        return x if x.device.type == "cpu" else x.to("cpu", non_blocking=True)

    def to_device_of(self, x, like):
        return x if x.device == like.device else x.to(like.device, non_blocking=True)

    def exp(self, x):
        return torch.exp(x)

    def logsumexp(self, xs):
        return torch.logsumexp(torch.stack(list(xs)), dim=0)

    def expand_last(self, x):
        return x.unsqueeze(-1)

    def cast_like(self, x, like):
        return x.to(like.dtype)

    # low-bit quantization (kvrt/cache/quant.py). torch has no uint32: words are int32 whose top code
    # holds the sign bit; `<<` wraps into it and `>>` is arithmetic, so unpacking masks after shifting.
    def amin(self, x, axis, keepdims=False):
        return torch.amin(x, dim=axis, keepdim=keepdims)

    def amax(self, x, axis, keepdims=False):
        return torch.amax(x, dim=axis, keepdim=keepdims)

    def cast_like_ceil(self, x, like):
        c = x.to(like.dtype)
        if c.dtype == x.dtype:
            return c
        # for c >= 0 the next representable value up is the bit pattern plus one
        as_int = {1: torch.int8, 2: torch.int16, 4: torch.int32}[c.element_size()]
        up = (c.view(as_int) + 1).view(c.dtype)
        return torch.where(c.to(x.dtype) < x, up, c)

    def quantize_codes(self, x, scale, zero, bits):
        scale = scale.float()
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = torch.round((x.float() - zero.float()) / safe).clamp_(0, (1 << bits) - 1)
        return torch.where(scale == 0, torch.zeros_like(q), q).to(torch.int32)

    def pack_codes(self, codes, bits, axis):
        # the codes' bit fields are disjoint, so an int32 sum of the shifted codes is their OR
        axis, per = axis % codes.ndim, 32 // bits
        c = codes.to(torch.int32).unflatten(axis, (codes.shape[axis] // per, per))
        return (c << _shifts(bits, axis + 1, c.ndim, c.device)).sum(dim=axis + 1, dtype=torch.int32)

    def unpack_codes(self, words, bits, axis, length):
        axis = axis % words.ndim
        codes = (words.unsqueeze(axis + 1) >> _shifts(bits, axis + 1, words.ndim + 1, words.device)) & ((1 << bits) - 1)
        codes = codes.flatten(axis, axis + 1)
        return codes if codes.shape[axis] == length else codes.narrow(axis, 0, length)

    def argmax_last(self, logits):
        return int(torch.argmax(logits))

    def to_numpy(self, x):
        return x.detach().float().cpu().numpy()
