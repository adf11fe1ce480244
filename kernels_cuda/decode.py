"""Decode attention over a full-precision KV tier, split over the sequence (flash-decoding): each
program reads one KV head's keys and values once, straight from the cache buffer's strides (a
[:, :, :S] view, never copied), for all the G·T query rows of that head (GQA), with tl.dot for
q·kᵀ and p·v and an online softmax in float32. Each split returns its (out, lse); the splits
merge by log-sum-exp like any other tiers. With per-row lengths (a batch of sequences stored
rectangularly, each row padded at the end of the token axis), a program stops at its row's length:
it reads no key past it, and a split wholly past it exits at once (out 0, lse -inf, weighed as
nothing by the merge).

Reference twin: Ops.partial_attention(q, k, v, scale, causal_offset, with_lse=True, key_bias).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def exact_dot(a, b):
    """a·b (same dtype) accumulated in float32 with every product exact: fp16 runs on fp16 tensor
    cores; bf16 widens to fp32 and runs as tf32, which holds bf16 exactly (still tensor cores, and
    the interpreter computes bf16 dots wrong); fp32 runs as ieee, since tf32 would round it."""
    PRECISION: tl.constexpr = "ieee" if a.dtype == tl.float32 else "tf32"
    DOT_T: tl.constexpr = tl.float16 if a.dtype == tl.float16 else tl.float32
    return tl.dot(a.to(DOT_T), b.to(DOT_T), input_precision=PRECISION)


@triton.jit
def _decode_split(
    q_ptr, k_ptr, v_ptr, bias_ptr, len_ptr, out_ptr, lse_ptr,
    S, HKV, ROWS, T, causal_offset, scale, split_len,
    s_q_bh, s_q_r,  # q as [B·Hkv, ROWS, D]
    s_k_b, s_k_h, s_k_t, s_v_b, s_v_h, s_v_t,  # k, v as [B, Hkv, S, D] views, channels contiguous
    s_b_b, s_b_h,
    s_o_bh, s_o_split, s_o_r, s_l_bh, s_l_split,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, HAS_LENGTHS: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    R: tl.constexpr = BLOCK_R if BLOCK_R >= 16 else 16  # tl.dot needs 16 rows: pad
    b = (bh // HKV).to(tl.int64)  # a whole cache buffer can pass 2³¹ elements
    h = (bh % HKV).to(tl.int64)
    rows = tl.arange(0, R)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < ROWS
    dim_ok = dims < D
    q = tl.load(q_ptr + bh * s_q_bh + rows[:, None] * s_q_r + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    k_head = k_ptr + b * s_k_b + h * s_k_h
    v_head = v_ptr + b * s_v_b + h * s_v_h
    m = tl.full([R], float("-inf"), tl.float32)
    l = tl.zeros([R], tl.float32)
    acc = tl.zeros([R, BLOCK_D], tl.float32)
    start = split * split_len
    stop = tl.minimum(start + split_len, S)
    if CAUSAL:
        stop = tl.minimum(stop, causal_offset + T)  # no row sees past the last query's horizon
    if HAS_LENGTHS:
        stop = tl.minimum(stop, tl.load(len_ptr + b))  # keys from the row's length on are padding: unread
    horizon = causal_offset + rows % T  # row r = g·T + t sees keys j <= causal_offset + t
    for n0 in range(start, stop, BLOCK_N):
        tok = n0 + tl.arange(0, BLOCK_N)
        ok = tok < stop
        tile_ok = ok[:, None] & dim_ok[None, :]
        k = tl.load(k_head + tok[:, None] * s_k_t + dims[None, :], mask=tile_ok, other=0.0)
        v = tl.load(v_head + tok[:, None] * s_v_t + dims[None, :], mask=tile_ok, other=0.0)
        scores = exact_dot(q, tl.trans(k)) * scale  # scale after the dot, as the reference does
        if HAS_BIAS:
            scores += tl.load(bias_ptr + b * s_b_b + h * s_b_h + tok, mask=ok, other=0.0)[None, :]
        visible = ok[None, :]
        if CAUSAL:
            visible = visible & (tok[None, :] <= horizon[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
        p = tl.exp(scores - safe[:, None])
        correction = tl.exp(tl.where(m == float("-inf"), float("-inf"), m - safe))
        l = l * correction + tl.sum(p, axis=1)
        # p rounds to the values' dtype before the dot, as the reference's probs.to(v.dtype) does
        acc = acc * correction[:, None] + exact_dot(p.to(v.dtype), v)
        m = m_new
    empty = l == 0.0
    out = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, l)[:, None])
    lse = tl.where(empty, float("-inf"), m + tl.log(tl.where(empty, 1.0, l)))
    tl.store(out_ptr + bh * s_o_bh + split * s_o_split + rows[:, None] * s_o_r + dims[None, :], out,
             mask=row_ok[:, None] & dim_ok[None, :])
    tl.store(lse_ptr + bh * s_l_bh + split * s_l_split + rows, lse, mask=row_ok)


def split_count(programs: int, s: int, device, min_len: int = 256) -> int:
    """Splits of s keys so that `programs` programs per split make about two waves over the SMs,
    each split keeping at least min_len keys (shorter ones cost more to merge than they save)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    return max(1, min(triton.cdiv(2 * sms, programs), triton.cdiv(s, min_len), 256))


def merge_splits(out, lse):
    """The splits' (out [BH, splits, R, D], lse [BH, splits, R]) merged by log-sum-exp, as tiers
    merge: (out [BH, R, D], lse [BH, R]); a row empty in every split keeps out 0 and lse -inf."""
    total = torch.logsumexp(lse, dim=1)
    weights = torch.exp(lse - torch.where(torch.isinf(total), 0.0, total)[:, None])
    return (weights[..., None] * out).sum(dim=1), total


def row_lengths(lengths, b: int, device):
    """lengths as the kernels read them: int32 [B], contiguous, on the queries' device."""
    if tuple(lengths.shape) != (b,):
        raise ValueError(f"lengths must have shape [{b}] (one per batch row), got {list(lengths.shape)}")
    return lengths.to(device=device, dtype=torch.int32).contiguous()


def _channels_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()  # the kernel steps channels by 1


def decode_attention(q, k, v, scale: float, causal_offset: int | None = None, key_bias=None,
                     splits: int | None = None, block_n: int = 64, *, lengths=None):
    """(out [B, Hq, T, D] in q's dtype, lse [B, Hq, T] float32) of q over keys/values [B, Hkv, S, D].

    k, v may be views along the token axis of a larger buffer (read through their strides);
    causal_offset None: every key visible, else query t sees keys j <= causal_offset + t;
    key_bias: float32 [B, Hkv, S] added to the scores (-inf hides a key), or None;
    lengths: int32 [B] on q's device, or None: row b's keys j >= lengths[b] are hidden as a -inf
    bias would hide them, and never read (a row of length 0 sees no key: out 0, lse -inf).
    Meant for decode: G·T <= 16 query rows per KV head."""
    b, hq, t, d = q.shape
    _, hkv, s, _ = k.shape
    g = hq // hkv
    rows = g * t
    if s == 0:
        return q.new_zeros(q.shape), torch.full((b, hq, t), float("-inf"), device=q.device)
    k, v = _channels_contiguous(k), _channels_contiguous(v)
    if splits is None:
        splits = split_count(b * hkv, s, q.device)
    split_len = triton.cdiv(triton.cdiv(s, splits), block_n) * block_n
    splits = triton.cdiv(s, split_len)
    qr = q.reshape(b * hkv, rows, d).contiguous()  # row r = g·T + t; a few rows, cheap to copy
    bias = _channels_contiguous(key_bias.float()) if key_bias is not None else qr  # unused when None
    lens = row_lengths(lengths, b, q.device) if lengths is not None else qr  # unused when None
    out = torch.empty(b * hkv, splits, rows, d, device=q.device, dtype=torch.float32)
    lse = torch.empty(b * hkv, splits, rows, device=q.device, dtype=torch.float32)
    _decode_split[(b * hkv, splits)](
        qr, k, v, bias, lens, out, lse,
        s, hkv, rows, t, causal_offset or 0, scale, split_len,
        qr.stride(0), qr.stride(1),
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        bias.stride(0), bias.stride(1),
        out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
        D=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_R=triton.next_power_of_2(rows), BLOCK_N=block_n,
        HAS_BIAS=key_bias is not None, CAUSAL=causal_offset is not None, HAS_LENGTHS=lengths is not None,
    )
    merged, total = merge_splits(out, lse)
    return merged.reshape(b, hq, t, d).to(q.dtype), total.reshape(b, hq, t)
