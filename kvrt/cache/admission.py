"""What a request's KV cache can come to hold at its longest, reserved by the engine's admission.

Counted from the model's shapes and the cache spec, layer by layer, each part stating its own bytes
beside its code: the tiers' buffers by SeqBuffer's growth rule (kvrt/cache/tiers.py, buffer.py), an
evicting layer's kept and newest tiers and its method's token state (methods/base.py), a quantizer's
residual, packed groups and OTT's pools (methods/kivi.py, ott.py), CaliDrop's evicted tokens and
per-head vectors (methods/calidrop.py, evicted_store.py), a local layer's window (window.py). An
upper bound of `cache.nbytes()` over the request's whole life (tests/generation/test_batch.py),
close to it so that the memory compression saves becomes rows. The uncompressed prompt a
compressing spec holds while its prefill is still in chunks is not counted: the engine prefills
one request at a time and also never admits past what caches hold now.
"""

from __future__ import annotations

from kvrt.cache.layer_shape import LayerShape
from kvrt.cache.spec import CacheSpec
from kvrt.cache.tiers import FullPrecisionTier
from kvrt.cache.window import local_layer_bytes


def prompt_chunks(prompt: int, chunk: int | None, last_min: int = 0) -> list[int]:
    """The prompt's chunks as a request's prefill feeds them (the last one never shorter than
    `last_min`: the eviction method's `last_chunk_min`)."""
    if chunk is None:
        return [prompt]
    chunks, fed, last = [], 0, max(chunk, last_min)
    while fed < prompt:
        remaining = prompt - fed
        n = remaining if remaining < chunk + last else chunk
        chunks.append(n)
        fed += n
    return chunks


def kv_bytes_needed(runtime, spec: CacheSpec, prompt_tokens: int, max_tokens: int, chunk: int | None = None) -> int:
    """The most KV bytes a request's cache can hold at `spec`: prompt plus every generated token, its
    prompt fed in chunks of `chunk` (None: whole)."""
    layers, heads, dim, itemsize = runtime.kv_shape()
    shape = LayerShape(heads, dim, itemsize, runtime.query_heads)
    eviction, calibration, quantization = spec.build()
    chunks = prompt_chunks(prompt_tokens, chunk, eviction.last_chunk_min if eviction is not None else 0)
    total = 0
    for i, window in enumerate(runtime.windows):
        if window is not None:
            total += local_layer_bytes(shape, window, prompt_tokens + max_tokens)
        elif eviction is None:  # every token kept: quantized, or as it came
            total += (quantization.layer_bytes(shape, i, prompt_tokens, prompt_tokens, max_tokens, None)
                      if quantization is not None else FullPrecisionTier.bytes_for(shape, chunks, max_tokens))
        else:
            budget = eviction.layer_budget(i, layers, prompt_tokens)
            total += eviction.layer_bytes(shape, i, budget, chunks, max_tokens, quantization)
            if calibration is not None:
                _, evicted = eviction.held_tokens(budget, prompt_tokens, max_tokens, quantization is not None)
                total += calibration.layer_bytes(shape, evicted, prompt_tokens, budget)
    return total
