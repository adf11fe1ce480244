"""kvrt's compact decoder for Llama (SmolLM2), Mistral, Qwen2/2.5 and Qwen3.

Module names follow HF checkpoints so a safetensors state dict loads as is. Attention
computes q, k, v, applies RoPE and hands them to the layer cache, which stores the
keys (after RoPE, per KV head) and returns the attention output. A prompt runs layer
by layer over all its tokens; the MLP runs in token blocks to bound activation memory.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from kvrt.cache import KVCache, LayerCache
from kvrt.model_config import ModelArgs, rope_attention_factor, rope_inv_freq, rope_type

MLP_TOKEN_BLOCK = 512


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


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        self.scale = args.head_dim**-0.5
        bias = args.attention_bias
        self.q_proj = nn.Linear(args.hidden_size, args.num_heads * args.head_dim, bias=bias)
        self.k_proj = nn.Linear(args.hidden_size, args.num_kv_heads * args.head_dim, bias=bias)
        self.v_proj = nn.Linear(args.hidden_size, args.num_kv_heads * args.head_dim, bias=bias)
        self.o_proj = nn.Linear(args.num_heads * args.head_dim, args.hidden_size, bias=False)
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps)
        self.qk_norm = args.qk_norm

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        """x: [B, T, C]; cos/sin: [T, head_dim] (or [B, 1, T, head_dim], a position per row); returns [B, T, C]."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        out = cache.attend(q, k.contiguous(), v.contiguous(), self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, h: torch.Tensor, cos, sin, cache: LayerCache) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, cache)
        for s in range(0, h.shape[1], MLP_TOKEN_BLOCK):
            block = h[:, s : s + MLP_TOKEN_BLOCK]
            block += self.mlp(self.post_attention_layernorm(block))
        return h


class Backbone(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Backbone(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.register_buffer("inv_freq", torch.from_numpy(rope_inv_freq(args)), persistent=False)
        self.rope_scale = rope_attention_factor(args)  # YaRN scales cos and sin; 1 otherwise
        self.dynamic_rope = rope_type(args) == "dynamic"

    def tie_weights(self) -> None:
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def rope(self, start, length: int, dtype: torch.dtype):
        """cos/sin [T, head_dim] for absolute positions start .. start+T-1, cast to the model dtype;
        with one start per batch row (numpy), [B, 1, T, head_dim]: each row at its own position."""
        if isinstance(start, np.ndarray):
            if self.dynamic_rope and int(start.max()) + length > self.args.max_position_embeddings:
                # dynamic NTK's frequencies depend on each row's own length: one row at a time
                pairs = [self.rope(int(s), length, dtype) for s in start]
                return tuple(torch.stack([p[i] for p in pairs])[:, None] for i in range(2))
            positions = torch.from_numpy(start).to(self.inv_freq.device, torch.float32)[:, None]
            positions = positions + torch.arange(length, device=self.inv_freq.device, dtype=torch.float32)
            freqs = positions[..., None] * self.inv_freq  # [B, T, head_dim / 2]
            angles = torch.cat((freqs, freqs), dim=-1)[:, None]
            cos, sin = angles.cos(), angles.sin()
            if self.rope_scale != 1.0:
                cos, sin = cos * self.rope_scale, sin * self.rope_scale
            return cos.to(dtype), sin.to(dtype)
        inv_freq = self.inv_freq
        if self.dynamic_rope and start + length > self.args.max_position_embeddings:
            # dynamic NTK: this forward's frequencies follow its max position + 1, as transformers'
            # dynamic_rope_update; a local, never stored, so concurrent forwards cannot see each other's
            inv_freq = torch.from_numpy(rope_inv_freq(self.args, start + length)).to(inv_freq.device)
        positions = torch.arange(start, start + length, device=inv_freq.device, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
        angles = torch.cat((freqs, freqs), dim=-1)
        cos, sin = angles.cos(), angles.sin()
        if self.rope_scale != 1.0:
            cos, sin = cos * self.rope_scale, sin * self.rope_scale
        return cos.to(dtype), sin.to(dtype)

    def forward(self, tokens: torch.Tensor, cache: KVCache, all_logits: bool = False,
                layer_done: Callable[[int], None] | None = None) -> torch.Tensor:
        """tokens: [B, T] -> logits [B, T, V] (all_logits) or [B, 1, V] for the last position.
        `layer_done(i)` is called after layer i (progress of a long prompt)."""
        h = self.model.embed_tokens(tokens)
        cos, sin = self.rope(cache.offsets() if cache.rows > 1 else cache.offset, tokens.shape[1], h.dtype)
        for i, (layer, layer_cache) in enumerate(zip(self.model.layers, cache.layers)):
            h = layer(h, cos, sin, layer_cache)
            if layer_done is not None:
                layer_done(i)
        if not all_logits:
            h = h[:, -1:]
        return self.lm_head(self.model.norm(h))
