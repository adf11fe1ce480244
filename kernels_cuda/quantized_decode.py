"""Fused decode attention over kvrt's quantized tier (format: kvrt/cache/quant.py), split over the
sequence (flash-decoding): each program reads one KV head's packed key and value words with
their scales and zeros, dequantizes them in registers, and runs an online softmax for all the
query rows of that KV head (GQA: the head's data is read once), with tl.dot for q·kᵀ and p·v on
the dequantized tiles rounded to the model dtype, as the reference dequantizes. Each split
returns its (out, lse); the splits merge by log-sum-exp like any other tiers. With per-row lengths
(a batch stored rectangularly, each row padded at the end), a program stops at its row's length:
no word or scale past it is read, and a split wholly past it exits at once.

Reference twin: QuantizedTier.partial (dequantize a block, then Ops.partial_attention).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvrt.kernels_cuda.decode import exact_dot, merge_splits, row_lengths


@triton.jit
def _quantized_decode_split(
    q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, bias_ptr, len_ptr, out_ptr, lse_ptr,
    S, HKV, ROWS, scale, split_len,
    s_q_bh, s_q_r,  # q as [B·Hkv, ROWS, D]
    s_kc_bh, s_kc_w, s_ks_bh, s_ks_g, s_vc_bh, s_vc_t, s_vs_bh, s_vs_t, s_b_bh,
    s_o_bh, s_o_split, s_o_r, s_l_bh, s_l_split,
    BITS: tl.constexpr, GROUP: tl.constexpr, VGROUP: tl.constexpr, D: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    PER: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    R: tl.constexpr = BLOCK_R if BLOCK_R >= 16 else 16  # tl.dot needs 16 rows: pad
    rows = tl.arange(0, R)
    dims = tl.arange(0, D)
    row_ok = rows < ROWS
    q = tl.load(q_ptr + bh * s_q_bh + rows[:, None] * s_q_r + dims[None, :], mask=row_ok[:, None], other=0.0)
    m = tl.full([R], float("-inf"), tl.float32)
    l = tl.zeros([R], tl.float32)
    acc = tl.zeros([R, D], tl.float32)
    start = split * split_len
    stop = tl.minimum(start + split_len, S)
    if HAS_LENGTHS:
        stop = tl.minimum(stop, tl.load(len_ptr + bh // HKV))  # the row's padding: unread
    for n0 in range(start, stop, BLOCK_N):
        tok = n0 + tl.arange(0, BLOCK_N)
        ok = tok < stop
        # keys: word tok // PER holds code tok % PER; scale and zero per (group, channel)
        words = tl.load(kc_ptr + bh * s_kc_bh + (tok // PER)[:, None] * s_kc_w + dims[None, :], mask=ok[:, None], other=0)
        codes = (words >> ((tok % PER) * BITS)[:, None]) & MASK
        ks = tl.load(ks_ptr + bh * s_ks_bh + (tok // GROUP)[:, None] * s_ks_g + dims[None, :], mask=ok[:, None], other=0.0)
        kz = tl.load(kz_ptr + bh * s_ks_bh + (tok // GROUP)[:, None] * s_ks_g + dims[None, :], mask=ok[:, None], other=0.0)
        k = (codes.to(tl.float32) * ks.to(tl.float32) + kz.to(tl.float32)).to(ks.dtype)  # as dequantize_keys rounds
        scores = exact_dot(q, tl.trans(k)) * scale  # [R, BLOCK_N]
        if HAS_BIAS:
            scores += tl.load(bias_ptr + bh * s_b_bh + tok, mask=ok, other=0.0)[None, :]
        scores = tl.where(ok[None, :], scores, float("-inf"))
        # values: word d // PER of token tok holds channel d's code; scale and zero per (token, channel group)
        vwords = tl.load(vc_ptr + bh * s_vc_bh + tok[:, None] * s_vc_t + (dims // PER)[None, :], mask=ok[:, None], other=0)
        vcodes = (vwords >> ((dims % PER) * BITS)[None, :]) & MASK
        vs = tl.load(vs_ptr + bh * s_vs_bh + tok[:, None] * s_vs_t + (dims // VGROUP)[None, :], mask=ok[:, None], other=0.0)
        vz = tl.load(vz_ptr + bh * s_vs_bh + tok[:, None] * s_vs_t + (dims // VGROUP)[None, :], mask=ok[:, None], other=0.0)
        v = (vcodes.to(tl.float32) * vs.to(tl.float32) + vz.to(tl.float32)).to(vs.dtype)  # [BLOCK_N, D]
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
        p = tl.exp(scores - safe[:, None])
        correction = tl.exp(tl.where(m == float("-inf"), float("-inf"), m - safe))
        l = l * correction + tl.sum(p, axis=1)
        acc = acc * correction[:, None] + exact_dot(p.to(v.dtype), v)  # p rounds as the reference's does
        m = m_new
    empty = l == 0.0
    out = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, l)[:, None])
    lse = tl.where(empty, float("-inf"), m + tl.log(tl.where(empty, 1.0, l)))
    tl.store(out_ptr + bh * s_o_bh + split * s_o_split + rows[:, None] * s_o_r + dims[None, :], out, mask=row_ok[:, None])
    tl.store(lse_ptr + bh * s_l_bh + split * s_l_split + rows, lse, mask=row_ok)


def quantized_decode_attention(q, keys, values, scale: float, key_bias=None, splits: int | None = None,
                               block_n: int = 32, *, lengths=None):
    """(out [B, Hq, T, D] in q's dtype, lse [B, Hq, T] float32) of q over a quantized tier.

    keys/values: kvrt.cache.quant.QuantizedKeys / QuantizedValues of the whole tier (S tokens);
    key_bias: float32 [B, Hkv, S] or None; lengths: int32 [B] on q's device, or None: row b's tokens
    t >= lengths[b] (a whole number of groups) are hidden as a -inf bias would hide them, and never
    read (a row of length 0 sees no key: out 0, lse -inf)."""
    b, hq, t, d = q.shape
    _, hkv, s, _ = keys.shape
    g = hq // hkv
    rows = g * t
    if splits is None:
        splits = max(1, min(64, triton.cdiv(s, 512)))
    split_len = triton.cdiv(triton.cdiv(s, splits), block_n) * block_n
    splits = triton.cdiv(s, split_len)
    qr = q.reshape(b * hkv, rows, d).contiguous()
    kc, ks, kz = (x.reshape(b * hkv, x.shape[2], d).contiguous() for x in (keys.codes, keys.scale, keys.zero))
    vc = values.codes.reshape(b * hkv, s, -1).contiguous()
    vs = values.scale.reshape(b * hkv, s, -1).contiguous()
    vz = values.zero.reshape(b * hkv, s, -1).contiguous()
    bias = key_bias.reshape(b * hkv, s).contiguous().float() if key_bias is not None else vs  # unused when None
    lens = row_lengths(lengths, b, q.device) if lengths is not None else vs  # unused when None
    out = torch.empty(b * hkv, splits, rows, d, device=q.device, dtype=torch.float32)
    lse = torch.empty(b * hkv, splits, rows, device=q.device, dtype=torch.float32)
    block_r = max(triton.next_power_of_2(rows), 2)
    _quantized_decode_split[(b * hkv, splits)](
        qr, kc, ks, kz, vc, vs, vz, bias, lens, out, lse,
        s, hkv, rows, scale, split_len,
        qr.stride(0), qr.stride(1),
        kc.stride(0), kc.stride(1), ks.stride(0), ks.stride(1), vc.stride(0), vc.stride(1), vs.stride(0), vs.stride(1),
        bias.stride(0),
        out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
        BITS=keys.bits, GROUP=keys.group, VGROUP=values.group, D=d, BLOCK_R=block_r, BLOCK_N=block_n,
        HAS_BIAS=key_bias is not None, HAS_LENGTHS=lengths is not None,
    )
    merged, total = merge_splits(out, lse)
    return merged.reshape(b, hq, t, d).to(q.dtype), total.reshape(b, hq, t)
