"""RoPE tables: cos/sin for a forward's positions, chosen per forward as transformers does.

Most rope variants have one frequency table. Two change with the sequence, as transformers'
`dynamic_rope_update` decides from the forward's last position + 1: dynamic NTK recomputes its
frequencies past max_position_embeddings, and LongRoPE switches from its short to its long factors
past original_max_position_embeddings. Keys already cached keep the rotation they were stored with.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from kvrt.models.config import ModelArgs
from kvrt.models.rope import rope_attention_factor, rope_inv_freq, rope_type


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of each head of x [B, H, T, D]; the rest pass through
    (partial rotary, Phi-4-mini)."""
    rotary = cos.shape[-1]
    if rotary == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rotary], x[..., rotary:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


class Rotary(nn.Module):
    """The rope of one set of layers (Gemma 3 has a second one for its sliding layers)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.kind = rope_type(args)
        self.scale = rope_attention_factor(args)  # YaRN and LongRoPE scale cos and sin; 1 otherwise
        # LongRoPE: the long factors apply once a forward reaches past the pretraining length
        self.original = (args.rope_scaling or {}).get("original_max_position_embeddings")
        self.place(None)

    def place(self, device) -> None:
        """(Re)compute the float32 tables on `device`: after a build on the meta device, or a cast of
        the model to a 16-bit dtype (the tables stay float32, as transformers keeps them)."""
        device = device or "cpu"
        table = torch.from_numpy(rope_inv_freq(self.args))
        self.register_buffer("inv_freq", table.to(device), persistent=False)
        if self.kind == "longrope":
            long = torch.from_numpy(rope_inv_freq(self.args, self.original + 1))
            self.register_buffer("long_inv_freq", long.to(device), persistent=False)

    def _inv_freq(self, end: int) -> torch.Tensor:
        """The frequencies of a forward whose last position is end - 1."""
        if self.kind == "dynamic" and end > self.args.max_position_embeddings:
            # a local, never stored, so concurrent forwards cannot see each other's
            return torch.from_numpy(rope_inv_freq(self.args, end)).to(self.inv_freq.device)
        if self.kind == "longrope" and end > self.original:
            return self.long_inv_freq
        return self.inv_freq

    def _rows_inv_freq(self, ends: np.ndarray) -> torch.Tensor:
        """[B, rotary_dim/2]: each row's frequencies from its own end, as if it ran alone."""
        if self.kind == "longrope":
            long = torch.from_numpy(ends > self.original).to(self.inv_freq.device)[:, None]
            return torch.where(long, self.long_inv_freq, self.inv_freq)
        if self.kind == "dynamic" and int(ends.max()) > self.args.max_position_embeddings:
            return torch.stack([self._inv_freq(int(e)) for e in ends])  # few rows, each its own base
        return self.inv_freq.expand(len(ends), -1)

    def forward(self, start, length: int, dtype: torch.dtype):
        """cos/sin [T, rotary_dim] for absolute positions start .. start+T-1, cast to `dtype`; with
        one start per batch row (numpy), [B, 1, T, rotary_dim]: each row at its own position."""
        device = self.inv_freq.device
        steps = torch.arange(length, device=device, dtype=torch.float32)
        if isinstance(start, np.ndarray):
            inv_freq = self._rows_inv_freq(start + length)
            positions = torch.from_numpy(start).to(device, torch.float32)[:, None] + steps
            freqs = positions[..., None] * inv_freq[:, None, :]  # [B, T, rotary_dim / 2]
        else:
            freqs = torch.outer(steps + start, self._inv_freq(start + length))
        angles = torch.cat((freqs, freqs), dim=-1)
        if freqs.dim() == 3:
            angles = angles[:, None]
        cos, sin = angles.cos(), angles.sin()
        if self.scale != 1.0:
            cos, sin = cos * self.scale, sin * self.scale
        return cos.to(dtype), sin.to(dtype)
