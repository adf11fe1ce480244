"""SnapKV's observation-window scores at prefill without the [B, Hkv, G, W, S] float32
probabilities: the newest W queries' softmax over the prompt's keys (query t sees keys
j <= S - W + t), summed over the W queries and averaged over each KV head's G query heads.
Two passes over the keys, both with tl.dot: pass 1 (per KV head, tile of query rows, split of
the keys) finds each row's max and sum, merged across splits into the row's lse; pass 2 (per KV
head, block of keys) recomputes the scores, turns them into probabilities with the row's lse and
sums them over the rows.

Reference twin: Ops.window_scores (attention_probs(...).sum(dim=3).mean(dim=2)).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvrt.kernels_cuda.decode import exact_dot, split_count


@triton.jit
def _window_row_lse(
    q_ptr, k_ptr, lse_ptr,
    S, W, HKV, ROWS, scale, split_len,
    s_q_bh, s_q_r,  # q as [B·Hkv, ROWS, D], row r = g·W + t
    s_k_b, s_k_h, s_k_t,  # k as a [B, Hkv, S, D] view, channels contiguous
    s_l_bh, s_l_split,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    bh = tl.program_id(0)
    tile = tl.program_id(1)
    split = tl.program_id(2)
    b = (bh // HKV).to(tl.int64)  # a whole cache buffer can pass 2³¹ elements
    h = (bh % HKV).to(tl.int64)
    rows = tile * BLOCK_R + tl.arange(0, BLOCK_R)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < ROWS
    dim_ok = dims < D
    q = tl.load(q_ptr + bh * s_q_bh + rows[:, None] * s_q_r + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    k_head = k_ptr + b * s_k_b + h * s_k_h
    horizon = S - W + rows % W
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_R], tl.float32)
    start = split * split_len
    stop = tl.minimum(start + split_len, S)
    for n0 in range(start, stop, BLOCK_N):
        tok = n0 + tl.arange(0, BLOCK_N)
        ok = tok < stop
        k = tl.load(k_head + tok[:, None] * s_k_t + dims[None, :], mask=ok[:, None] & dim_ok[None, :], other=0.0)
        scores = exact_dot(q, tl.trans(k)) * scale
        scores = tl.where(ok[None, :] & (tok[None, :] <= horizon[:, None]), scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # this split may hide every key of a row
        correction = tl.exp(tl.where(m == float("-inf"), float("-inf"), m - safe))
        l = l * correction + tl.sum(tl.exp(scores - safe[:, None]), axis=1)
        m = m_new
    lse = tl.where(l == 0.0, float("-inf"), m + tl.log(tl.where(l == 0.0, 1.0, l)))
    tl.store(lse_ptr + bh * s_l_bh + split * s_l_split + rows, lse, mask=row_ok)


@triton.jit
def _window_key_scores(
    q_ptr, k_ptr, lse_ptr, out_ptr,
    S, W, HKV, ROWS, G, scale,
    s_q_bh, s_q_r, s_k_b, s_k_h, s_k_t, s_l_bh, s_o_bh,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    bh = tl.program_id(0)
    block = tl.program_id(1)
    b = (bh // HKV).to(tl.int64)
    h = (bh % HKV).to(tl.int64)
    tok = block * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    ok = tok < S
    dim_ok = dims < D
    k = tl.load(k_ptr + b * s_k_b + h * s_k_h + tok[:, None] * s_k_t + dims[None, :],
                mask=ok[:, None] & dim_ok[None, :], other=0.0)  # read once, scored against every row
    total = tl.zeros([BLOCK_N], tl.float32)
    for r0 in range(0, ROWS, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < ROWS
        q = tl.load(q_ptr + bh * s_q_bh + rows[:, None] * s_q_r + dims[None, :],
                    mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        lse = tl.load(lse_ptr + bh * s_l_bh + rows, mask=row_ok, other=0.0)
        scores = exact_dot(q, tl.trans(k)) * scale
        visible = row_ok[:, None] & ok[None, :] & (tok[None, :] <= (S - W + rows % W)[:, None])
        total += tl.sum(tl.where(visible, tl.exp(scores - lse[:, None]), 0.0), axis=0)
    tl.store(out_ptr + bh * s_o_bh + tok, total / G, mask=ok)


def window_scores(q, k, scale: float, splits: int | None = None, block_n: int = 64):
    """float32 [B, Hkv, S]: the softmax of the newest W queries q [B, Hq, W, D] over the prompt's
    keys k [B, Hkv, S, D] (W <= S; may be a view of a larger buffer), summed over the W queries
    and averaged over each KV head's query heads. splits: of the keys in pass 1 (None: enough to fill the GPU)."""
    b, hq, w, d = q.shape
    _, hkv, s, _ = k.shape
    if w > s:
        raise ValueError(f"an observation window of {w} queries needs at least as many keys, got {s}")
    g = hq // hkv
    rows = g * w
    if k.stride(-1) != 1:
        k = k.contiguous()  # the kernels step channels by 1
    qr = q.reshape(b * hkv, rows, d).contiguous()  # row r = g·W + t
    block_d = triton.next_power_of_2(d)
    block_r = min(64, max(16, triton.next_power_of_2(rows)))  # tl.dot needs 16 rows; 64 keeps registers in bounds
    tiles = triton.cdiv(rows, block_r)
    if splits is None:
        splits = split_count(b * hkv * tiles, s, q.device, min_len=1024)
    split_len = triton.cdiv(triton.cdiv(s, splits), block_n) * block_n
    splits = triton.cdiv(s, split_len)
    part = torch.empty(b * hkv, splits, rows, device=q.device, dtype=torch.float32)
    _window_row_lse[(b * hkv, tiles, splits)](
        qr, k, part, s, w, hkv, rows, scale, split_len,
        qr.stride(0), qr.stride(1), k.stride(0), k.stride(1), k.stride(2), part.stride(0), part.stride(1),
        D=d, BLOCK_D=block_d, BLOCK_R=block_r, BLOCK_N=block_n,
    )
    lse = torch.logsumexp(part, dim=1).contiguous()  # every row sees key 0, so no row's lse is -inf
    out = torch.empty(b * hkv, s, device=q.device, dtype=torch.float32)
    _window_key_scores[(b * hkv, triton.cdiv(s, block_n))](
        qr, k, lse, out, s, w, hkv, rows, g, scale,
        qr.stride(0), qr.stride(1), k.stride(0), k.stride(1), k.stride(2), lse.stride(0), out.stride(0),
        D=d, BLOCK_D=block_d, BLOCK_R=block_r, BLOCK_N=block_n,
    )
    return out.reshape(b, hkv, s)
