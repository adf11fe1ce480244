"""kvrt's compact decoder: Llama (SmolLM2), Mistral, Qwen2/2.5, Qwen3, Gemma 2/3, Phi-3/Phi-4-mini.

The blocks live in layers.py (Llama family), gemma.py and phi3.py; this module puts them
together: embeddings, RoPE tables per forward (Gemma 3's sliding layers have their own), the
layers over a kvrt cache, the final norm and head. A prompt runs layer by layer over all its
tokens.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from kvrt.backends.torch.gemma import GemmaDecoderLayer, GemmaRMSNorm
from kvrt.backends.torch.layers import MLP_TOKEN_BLOCK, MLP, Attention, DecoderLayer, RMSNorm  # noqa: F401
from kvrt.backends.torch.phi3 import phi3_layer
from kvrt.backends.torch.rope import Rotary, rotate_half  # noqa: F401
from kvrt.cache.kvcache import KVCache
from kvrt.models.config import LOCAL, ModelArgs


def decoder_layer(args: ModelArgs) -> nn.Module:
    if args.gemma:
        return GemmaDecoderLayer(args)
    if args.model_type == "phi3":
        return phi3_layer(args)
    return DecoderLayer(args)


class Backbone(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(decoder_layer(args) for _ in range(args.num_layers))
        self.norm = (GemmaRMSNorm if args.gemma else RMSNorm)(args.hidden_size, args.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Backbone(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.rotary = Rotary(args)
        local = args.local_rope_args()
        self.local_rotary = Rotary(local) if local is not None else None  # Gemma 3's sliding layers
        self.local_layers = [kind == LOCAL for kind in args.layer_types] or [False] * args.num_layers
        # Gemma scales embeddings by sqrt(hidden), a float32 number cast to the model dtype
        self.embed_scale = args.hidden_size**0.5 if args.gemma else None
        self.final_softcap = args.final_logit_softcapping

    @property
    def inv_freq(self) -> torch.Tensor:
        """The global layers' float32 rope table (the short one for LongRoPE)."""
        return self.rotary.inv_freq

    def place_rope(self, device) -> None:
        """Compute the rope tables on `device` in float32 (after a meta build or a dtype cast)."""
        for rotary in (self.rotary, self.local_rotary):
            if rotary is not None:
                rotary.place(device)

    def tie_weights(self) -> None:
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def rope(self, start, length: int, dtype: torch.dtype):
        """cos/sin of the global layers (see Rotary.forward)."""
        return self.rotary(start, length, dtype)

    def forward(self, tokens: torch.Tensor, cache: KVCache, all_logits: bool = False,
                layer_done: Callable[[int], None] | None = None) -> torch.Tensor:
        """tokens: [B, T] -> logits [B, T, V] (all_logits) or [B, 1, V] for the last position.
        `layer_done(i)` is called after layer i (progress of a long prompt)."""
        h = self.model.embed_tokens(tokens)
        if self.embed_scale is not None:
            h = h * torch.tensor(self.embed_scale, dtype=torch.float32, device=h.device).to(h.dtype)
        start, length = (cache.offsets() if cache.rows > 1 else cache.offset), tokens.shape[1]
        tables = self.rotary(start, length, h.dtype)
        local_tables = self.local_rotary(start, length, h.dtype) if self.local_rotary is not None else tables
        for i, (layer, layer_cache) in enumerate(zip(self.model.layers, cache.layers)):
            cos, sin = local_tables if self.local_layers[i] else tables
            h = layer(h, cos, sin, layer_cache)
            if layer_done is not None:
                layer_done(i)
        if not all_logits:
            h = h[:, -1:]
        logits = self.lm_head(self.model.norm(h))
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits
