"""Gemma 2 and Gemma 3 decoder blocks.

Differences from the Llama block: RMSNorm scales by (1 + w), in float32; norms both before and
after attention and the MLP; a GELU (tanh) MLP; attention scaled by query_pre_attn_scalar^-1/2.
Gemma 3 also RMS-normalizes q and k per head. Soft-capping (Gemma 2's attention scores, final
logits) and the embedding scale live in the ops and in `Transformer`.
"""

from __future__ import annotations

import torch
from torch import nn

from kvrt.backends.torch.layers import MLP, MLP_TOKEN_BLOCK, Attention
from kvrt.cache.kvcache import LayerCache
from kvrt.models.config import ModelArgs


class GemmaRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))  # stored as an offset from 1
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # unlike Llama's, the weight multiplies in float32 too, before the cast back
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).to(x.dtype)


class GemmaDecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args, norm=GemmaRMSNorm)
        self.mlp = MLP(args)
        dim, eps = args.hidden_size, args.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(dim, eps)
        self.post_attention_layernorm = GemmaRMSNorm(dim, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(dim, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(dim, eps)

    def forward(self, h: torch.Tensor, cos, sin, cache: LayerCache) -> torch.Tensor:
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), cos, sin, cache))
        for s in range(0, h.shape[1], MLP_TOKEN_BLOCK):
            block = h[:, s : s + MLP_TOKEN_BLOCK]
            block += self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(block)))
        return h
