"""The ops protocol (kvrt/ops.py) for torch tensors, CPU or CUDA."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def causal_mask(t: int, s: int, causal_offset: int, device) -> torch.Tensor:
    """Boolean [T, S]: query t may read key j iff j <= causal_offset + t."""
    rows = torch.arange(t, device=device)[:, None] + causal_offset
    return torch.arange(s, device=device)[None, :] <= rows


class TorchOps:
    name = "torch"
    fused_prefill = True  # SDPA's flash kernels (CPU and CUDA) work through the queries in tiles

    def alloc_seq(self, like, capacity):
        return like.new_zeros(*like.shape[:-2], capacity, like.shape[-1])

    def write_seq(self, buf, start, x):
        buf[..., start : start + x.shape[-2], :] = x
        return buf

    def concat(self, xs: Sequence[torch.Tensor], axis: int):
        return torch.cat(list(xs), dim=axis)

    def nbytes(self, x):
        return x.numel() * x.element_size()

    def partial_attention(self, q, k, v, scale, causal_offset=None, with_lse=True):
        b, hq, t, d = q.shape
        hkv, s = k.shape[1], k.shape[2]
        square = causal_offset == 0 and s == t  # a fresh prompt: SDPA's own (top-left) causal mask fits
        mask = None if causal_offset is None or square else causal_mask(t, s, causal_offset, q.device)
        if not with_lse:  # no merge follows: the fused SDPA kernel is fastest and needs no lse
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=square, scale=scale, enable_gqa=hq != hkv
            )
            return out, None
        g = hq // hkv
        # GQA without repeat_kv: fold each KV head's G query heads into the query axis
        qg = q.reshape(b, hkv, g * t, d)
        scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale
        if causal_offset is not None:
            mask = causal_mask(t, s, causal_offset, q.device)
            scores = scores.view(b, hkv, g, t, s).masked_fill(~mask, float("-inf")).view(b, hkv, g * t, s)
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)
        probs = torch.exp(scores - lse).to(v.dtype)
        out = torch.matmul(probs, v).view(b, hq, t, d)
        return out, lse.view(b, hq, t)

    def exp(self, x):
        return torch.exp(x)

    def logsumexp(self, xs):
        return torch.logsumexp(torch.stack(list(xs)), dim=0)

    def expand_last(self, x):
        return x.unsqueeze(-1)

    def cast_like(self, x, like):
        return x.to(like.dtype)

    def argmax_last(self, logits):
        return int(torch.argmax(logits))

    def to_numpy(self, x):
        return x.detach().float().cpu().numpy()
