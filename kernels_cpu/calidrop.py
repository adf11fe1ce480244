"""CaliDrop's decode step for one layer on the CPU (calidrop.c): torch tensors in, (out, lse) and the
new calibration state out. Reference twin: CalibrationTier.partial's ops path (kvrt/cache/methods/calidrop.py).
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch

from kvrt.kernels_cpu.build import library
from kvrt.kernels_cpu.decode import DTYPES, channels_contiguous

GRANULARITY = {"head": 0, "kv_head": 1, "layer": 2}
i64, ptr = ctypes.c_int64, ctypes.c_void_p


class State(ctypes.Structure):
    _fields_ = [("proxy", ptr), ("lse", ptr), ("mean_key", ptr), ("out", ptr), ("pairs", ptr), ("p_b", i64),
                ("p_h", i64), ("p_t", i64), ("extent", i64), ("lengths", ptr), ("active", ptr), ("counts", ptr)]


class Next(ctypes.Structure):
    _fields_ = [("proxy", ptr), ("lse", ptr), ("mean_key", ptr), ("out", ptr), ("counts", ptr)]


def _kernel():
    """kvrt_calidrop with its C signature."""
    fn = library().kvrt_calidrop
    if fn.argtypes is None:
        c_int, c_float = ctypes.c_int, ctypes.c_float
        fn.argtypes = [ptr, c_int, i64, i64, c_int, c_int, c_int, c_int, c_float, c_float, c_float, c_int,
                       ctypes.POINTER(State), ctypes.POINTER(Next), ptr, ptr, c_int]
        fn.restype = c_int
    return fn


def calidrop_step(q, kv_heads: int, scale: float, theta1: float, theta2: float, granularity: str, proxy, out, lse, mean_key,
                  pairs, pair_lengths, active, counts):
    """One decode step of a calibration tier.

    q [B, Hq, 1, D] (Hq = G·kv_heads); the state: proxy float32 [B, Hq, D], out [B, Hq, 1, D] in q's dtype, lse float32
    [B, Hq, 1], mean_key float32 [B, Hq, 1, D] (rule=taylor) or None (rule=paper); pairs: the evicted
    tier [B, Hkv, E, 2D] in q's dtype (each key beside its value) or None, row b holding
    pair_lengths[b] tokens (None: all E); active: bool [B], rows whose branches count; counts: int32
    [B, 3] (calibrate, recompute, skip). Returns (out, lse) of the tier for q — lse −inf where a head
    skips — and the new (proxy, out, lse, mean_key, counts); the inputs are left as they were."""
    b, hq, _, d = q.shape
    q = channels_contiguous(q)
    proxy, lse, counts = proxy.float().contiguous(), lse.float().contiguous(), counts.to(torch.int32).contiguous()
    out = out.to(q.dtype).contiguous()
    mean_key = None if mean_key is None else mean_key.float().contiguous()
    keep = [np.ascontiguousarray(active, dtype=np.int32)]
    state = State(proxy=proxy.data_ptr(), lse=lse.data_ptr(), out=out.data_ptr(), counts=counts.data_ptr(),
                  active=keep[0].ctypes.data, mean_key=None if mean_key is None else mean_key.data_ptr())
    if pairs is not None:
        pairs = channels_contiguous(pairs.to(q.dtype))
        state.pairs, state.extent = pairs.data_ptr(), pairs.shape[2]
        state.p_b, state.p_h, state.p_t = pairs.stride(0), pairs.stride(1), pairs.stride(2)
        if pair_lengths is not None:
            keep.append(np.ascontiguousarray(pair_lengths, dtype=np.int32))
            state.lengths = keep[-1].ctypes.data
    new = (torch.empty_like(proxy), torch.empty_like(out), torch.empty_like(lse),
           None if mean_key is None else torch.empty_like(mean_key), torch.empty_like(counts))
    following = Next(proxy=new[0].data_ptr(), out=new[1].data_ptr(), lse=new[2].data_ptr(),
                     mean_key=None if new[3] is None else new[3].data_ptr(), counts=new[4].data_ptr())
    result, result_lse = torch.empty(b, hq, 1, d, dtype=q.dtype), torch.empty(b, hq, 1, dtype=torch.float32)
    failed = _kernel()(q.data_ptr(), DTYPES[q.dtype], q.stride(0), q.stride(1), b, hq, kv_heads, d, scale, theta1, theta2,
                       GRANULARITY[granularity], state, following, result.data_ptr(), result_lse.data_ptr(),
                       torch.get_num_threads())
    if failed:
        raise MemoryError("kvrt's CPU CaliDrop kernel could not allocate its working memory")
    return result, result_lse, new
