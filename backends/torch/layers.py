"""The decoder's building blocks, shared by every architecture kvrt runs on torch.

Module names follow HF checkpoints so a safetensors state dict loads as is. Attention
computes q, k, v, applies RoPE and hands them to the layer cache, which stores the keys
(after RoPE, per KV head) and returns the attention output. The MLP runs in token blocks
to bound activation memory.
"""

from __future__ import annotations

import torch
from torch import nn

from kvrt.backends.torch.rope import apply_rope
from kvrt.cache.kvcache import LayerCache
from kvrt.models.config import ModelArgs

MLP_TOKEN_BLOCK = 512

ACTIVATIONS = {
    "silu": nn.functional.silu,
    "gelu_pytorch_tanh": lambda x: nn.functional.gelu(x, approximate="tanh"),
    "gelu": nn.functional.gelu,
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalize in float32 like the reference implementations, then return to the model dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, norm: type[nn.Module] = RMSNorm):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        self.scale = args.attention_scale
        self.build_projections(args)
        if args.qk_norm:
            self.q_norm = norm(args.head_dim, args.rms_norm_eps)
            self.k_norm = norm(args.head_dim, args.rms_norm_eps)
        self.qk_norm = args.qk_norm

    def build_projections(self, args: ModelArgs) -> None:
        bias = args.attention_bias
        self.q_proj = nn.Linear(args.hidden_size, args.num_heads * args.head_dim, bias=bias)
        self.k_proj = nn.Linear(args.hidden_size, args.num_kv_heads * args.head_dim, bias=bias)
        self.v_proj = nn.Linear(args.hidden_size, args.num_kv_heads * args.head_dim, bias=bias)
        self.o_proj = nn.Linear(args.num_heads * args.head_dim, args.hidden_size, bias=False)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, C] -> q [B, T, Hq, D], k and v [B, T, Hkv, D]."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        return q, k, v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        """x: [B, T, C]; cos/sin: [T, rotary_dim] (or [B, 1, T, rotary_dim], a position per row); returns [B, T, C]."""
        b, t, _ = x.shape
        q, k, v = self.project(x)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = cache.attend(q, k.contiguous(), v.contiguous(), self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)
        self.act = ACTIVATIONS[args.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block (Llama, Mistral, Qwen, Phi-3): h += attn(norm(h)); h += mlp(norm(h))."""

    def __init__(self, args: ModelArgs, attention: type[Attention] = Attention, mlp: type[nn.Module] = MLP):
        super().__init__()
        self.self_attn = attention(args)
        self.mlp = mlp(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, h: torch.Tensor, cos, sin, cache: LayerCache) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, cache)
        for s in range(0, h.shape[1], MLP_TOKEN_BLOCK):
            block = h[:, s : s + MLP_TOKEN_BLOCK]
            block += self.mlp(self.post_attention_layernorm(block))
        return h
