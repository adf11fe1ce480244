"""Phi-3 / Phi-3.5 / Phi-4-mini: the Llama block with fused projections.

q, k and v come from one `qkv_proj` and the MLP's gate and up from one `gate_up_proj` (the HF
module names, so checkpoints load as is). Partial rotary (Phi-4-mini) and LongRoPE are the rope's
business (backends/torch/rope.py).
"""

from __future__ import annotations

import torch
from torch import nn

from kvrt.backends.torch.layers import ACTIVATIONS, Attention, DecoderLayer
from kvrt.models.config import ModelArgs


class Phi3Attention(Attention):
    def build_projections(self, args: ModelArgs) -> None:
        self.q_size, self.kv_size = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
        self.qkv_proj = nn.Linear(args.hidden_size, self.q_size + 2 * self.kv_size, bias=False)
        self.o_proj = nn.Linear(self.q_size, args.hidden_size, bias=False)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        return (q.view(b, t, self.num_heads, self.head_dim), k.view(b, t, self.num_kv_heads, self.head_dim),
                v.view(b, t, self.num_kv_heads, self.head_dim))


class Phi3MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_up_proj = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)
        self.act = ACTIVATIONS[args.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # gate first, as the checkpoints store it
        return self.down_proj(self.act(gate) * up)


def phi3_layer(args: ModelArgs) -> DecoderLayer:
    return DecoderLayer(args, attention=Phi3Attention, mlp=Phi3MLP)
