"""Fused decode attention over a layer's tiers on the CPU (decode.c): torch tensors in, (out, lse) out.

The tiers come as segments (kvrt.cache.attention.DenseSegment / PackedSegment): their stored arrays as they
lie, read through their strides (channels contiguous), never copied or dequantized whole. An extra
partial (CaliDrop's) is merged into the result. Reference twin: merge_partials over the tiers' own
partials (LayerCache's per-tier path).
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch

from kvrt.cache.attention import PackedSegment
from kvrt.kernels_cpu.build import library

DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
MAX_GROUP, MAX_DIM = 64, 256  # query heads per KV head and head dim the kernels hold (common.h, decode.c)
i64, ptr = ctypes.c_int64, ctypes.c_void_p


class Segment(ctypes.Structure):
    _fields_ = [("packed", ctypes.c_int32), ("bits", ctypes.c_int32), ("group", ctypes.c_int32),
                ("vgroup", ctypes.c_int32), ("n_slots", ctypes.c_int32), ("dtype", ctypes.c_int32),
                ("extent", i64), ("lengths", ptr), ("bias", ptr), ("bias_b", i64), ("bias_h", i64),
                ("k", ptr), ("v", ptr), ("k_b", i64), ("k_h", i64), ("k_t", i64), ("v_b", i64), ("v_h", i64),
                ("v_t", i64), ("ks", ptr), ("kz", ptr), ("ks_b", i64), ("ks_h", i64), ("ks_g", i64),
                ("vs", ptr), ("vz", ptr), ("vs_b", i64), ("vs_h", i64), ("vs_t", i64),
                ("slots", ptr), ("sl_b", i64), ("sl_h", i64), ("sl_g", i64)]


def _kernel():
    """kvrt_decode with its C signature (ctypes would pass 64-bit strides and pointers as int otherwise)."""
    fn = library().kvrt_decode
    if fn.argtypes is None:
        c_int = ctypes.c_int
        fn.argtypes = [ptr, c_int, i64, i64, c_int, c_int, c_int, c_int, c_int, ctypes.c_float,
                       ctypes.POINTER(Segment), c_int, ptr, c_int, i64, i64, ptr, ptr, i64, i64, ptr, c_int]
        fn.restype = c_int
    return fn


def supports(q: torch.Tensor, kv_heads: int) -> bool:
    """Whether the CPU kernels take these decode queries q [B, Hq, 1, D] (and can be built here)."""
    b, hq, t, d = q.shape
    return (q.device.type == "cpu" and t == 1 and q.dtype in DTYPES and d <= MAX_DIM and hq % kv_heads == 0
            and hq // kv_heads <= MAX_GROUP and library() is not None)


def channels_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x itself when its last axis is contiguous (a buffer's view), else a copy: the kernels step channels by 1."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _lengths(lengths, keep: list):
    """A row-length array as the kernel reads it (int32, contiguous), kept alive in `keep`; NULL for None."""
    if lengths is None:
        return None
    array = np.ascontiguousarray(lengths, dtype=np.int32)
    keep.append(array)
    return array.ctypes.data


def _same_strides(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A scale and its zero read with one set of strides: as they are when their buffers grew alike."""
    a, b = channels_contiguous(a), channels_contiguous(b)
    return (a, b) if a.stride() == b.stride() else (a.contiguous(), b.contiguous())


def _packed(seg: PackedSegment, keep: list) -> Segment:
    keys, values = seg.keys, seg.values
    kc, vc = channels_contiguous(keys.codes), channels_contiguous(values.codes)
    ks, kz = _same_strides(keys.scale, keys.zero)
    vs, vz = _same_strides(values.scale, values.zero)
    slots = None if seg.slots is None else channels_contiguous(seg.slots)
    keep += [kc, vc, ks, kz, vs, vz, slots]
    out = Segment(packed=1, bits=keys.bits, group=keys.group, vgroup=values.group, dtype=DTYPES[ks.dtype],
                  extent=keys.shape[2], lengths=_lengths(seg.lengths, keep),
                  k=kc.data_ptr(), v=vc.data_ptr(), k_b=kc.stride(0), k_h=kc.stride(1), k_t=kc.stride(2),
                  v_b=vc.stride(0), v_h=vc.stride(1), v_t=vc.stride(2),
                  ks=ks.data_ptr(), kz=kz.data_ptr(), ks_b=ks.stride(0), ks_h=ks.stride(1), ks_g=ks.stride(2),
                  vs=vs.data_ptr(), vz=vz.data_ptr(), vs_b=vs.stride(0), vs_h=vs.stride(1), vs_t=vs.stride(2))
    if slots is not None:
        out.slots, out.n_slots = slots.data_ptr(), slots.shape[3]
        out.sl_b, out.sl_h, out.sl_g = slots.stride(0), slots.stride(1), slots.stride(2)
    return _biased(out, seg.bias, keys.shape[:3], keep)


def _dense(seg, keep: list) -> Segment:
    k, v = channels_contiguous(seg.k), channels_contiguous(seg.v)
    keep += [k, v]
    out = Segment(packed=0, dtype=DTYPES[k.dtype], extent=k.shape[2], lengths=_lengths(seg.lengths, keep),
                  k=k.data_ptr(), v=v.data_ptr(), k_b=k.stride(0), k_h=k.stride(1), k_t=k.stride(2),
                  v_b=v.stride(0), v_h=v.stride(1), v_t=v.stride(2))
    return _biased(out, seg.bias, k.shape[:3], keep)


def _biased(segment: Segment, bias, shape, keep: list) -> Segment:
    """The segment with its key bias, if it has one: float32 [B, Hkv, S] (or broadcast to it: a head or
    batch axis of 1 is read with stride 0), tokens contiguous."""
    if bias is not None:
        bias = bias.float().expand(*shape)
        bias = bias if bias.stride(-1) == 1 else bias.contiguous()
        keep.append(bias)
        segment.bias, segment.bias_b, segment.bias_h = bias.data_ptr(), bias.stride(0), bias.stride(1)
    return segment


def decode_tiers(q: torch.Tensor, segments, scale: float, extra=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Hq, 1, Dv] in q's dtype, lse [B, Hq, 1] float32) of decode queries q [B, Hq, 1, D] over
    every segment's keys, merged with `extra` = (out, lse) of another tier. Dv is the values' width:
    D, but for CaliDrop's pairs (each key beside its value, 2D wide: one pass gives the mean key too)."""
    b, hq, _, d = q.shape
    first = segments[0]
    hkv, dv = (first.keys.shape[1], d) if isinstance(first, PackedSegment) else (first.k.shape[1], first.v.shape[-1])
    keep: list = []
    structs = (Segment * len(segments))(*(_packed(s, keep) if isinstance(s, PackedSegment) else _dense(s, keep)
                                          for s in segments))
    q = channels_contiguous(q)
    out = torch.empty(b, hq, 1, dv, dtype=q.dtype)
    lse = torch.empty(b, hq, 1, dtype=torch.float32)
    x_out = x_lse = None
    x_dtype = x_b = x_h = 0
    if extra is not None:
        x_out, x_lse = channels_contiguous(extra[0]), extra[1].float().contiguous()
        x_dtype, x_b, x_h = DTYPES[x_out.dtype], x_out.stride(0), x_out.stride(1)
    failed = _kernel()(
        q.data_ptr(), DTYPES[q.dtype], q.stride(0), q.stride(1), b, hq, hkv, d, dv, scale,
        structs, len(segments), None if x_out is None else x_out.data_ptr(), x_dtype, x_b, x_h,
        None if x_lse is None else x_lse.data_ptr(), out.data_ptr(), out.stride(0), out.stride(1), lse.data_ptr(),
        torch.get_num_threads())
    if failed:
        raise MemoryError("kvrt's CPU decode kernel could not allocate its working memory")
    return out, lse


def quantized_decode(q, keys, values, scale: float, key_bias=None, lengths=None):
    """Ops.quantized_kernel's call on the CPU: (out, lse) of decode queries over a whole quantized tier
    (kvrt.cache.quant.QuantizedKeys / QuantizedValues), key_bias float32 [B, Hkv, S] or None, lengths int32 [B]
    (each row's flushed tokens) or None."""
    rows = None if lengths is None else lengths.cpu().numpy()
    return decode_tiers(q, [PackedSegment(keys, values, rows, None, key_bias)], scale)
