"""What a request's KV cache can come to hold at its longest, reserved by the engine's admission.

Counted from the model's shapes and the cache spec, tier by tier, as the arrays are allocated: a
growable buffer at the capacity SeqBuffer's own growth rule gives it (kvrt/cache/buffer.py), a quantized
tier's residual at its bound (residual + group tokens), its groups packed, OTT's pools at their sizes,
CaliDrop's evicted tier and per-head vectors. An upper bound of `cache.nbytes()` over the request's
whole life (tests/generation/test_batch.py), close to it so that the memory compression saves becomes rows.
The uncompressed prompt a compressing spec holds while its prefill is still in chunks is not
counted: the engine prefills one request at a time and also never admits past what caches hold now.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from kvrt.cache.buffer import SeqBuffer
from kvrt.cache.quant import codes_per_word
from kvrt.cache.spec import CacheSpec


def capacity_after(appends: Iterable[int], step: int) -> int:
    """Rows a SeqBuffer allocates when fed these appends (row counts) one after another."""
    capacity = length = 0
    for rows in appends:
        length += rows
        if length > capacity:
            capacity = SeqBuffer.grown_capacity(capacity, length, step)
    return capacity


def one_by_one(first: list[int], more: int, step: int) -> int:
    """capacity_after(first + [1] * more), in as many steps as the buffer grows (not one per row)."""
    capacity, length = capacity_after(first, step), sum(first)
    while capacity < length + more:
        capacity = SeqBuffer.grown_capacity(capacity, capacity + 1, step)
    return capacity


@dataclass
class LayerShape:
    """One layer's KV: `heads` KV heads of `dim` channels in a dtype of `itemsize` bytes; `query_heads`."""

    heads: int
    dim: int
    itemsize: int
    query_heads: int

    def tokens(self, rows: int) -> int:
        """Bytes of keys and values (or of pairs, each key beside its value) for `rows` token slots."""
        return 2 * rows * self.heads * self.dim * self.itemsize

    def per_head(self, rows: int, itemsize: int = 4) -> int:
        """Bytes of one scalar per KV head and token (positions, scores, H2O's sums)."""
        return rows * self.heads * itemsize


def prompt_chunks(prompt: int, chunk: int | None, window: int = 0) -> list[int]:
    """The prompt's chunks as batch.Row.prefill feeds them (the last one never shorter than `window`)."""
    if chunk is None:
        return [prompt]
    chunks, fed, last = [], 0, max(chunk, window)
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
    chunks = prompt_chunks(prompt_tokens, chunk, getattr(eviction, "window", 0))
    total = 0
    for i, window in enumerate(runtime.windows):
        if window is not None:  # a local layer holds at most its window, in a buffer that drops whole steps
            rows = min(prompt_tokens + max_tokens, window) + 64
            total += shape.tokens(rows + rows // 8 + 64)
            continue
        budget = eviction.layer_budget(i, layers, prompt_tokens) if eviction is not None else None
        kept, evicted = held_tokens(eviction, budget, quantization, prompt_tokens, max_tokens)
        if quantization is None:
            total += full_precision_bytes(shape, eviction, budget, chunks, max_tokens)
        else:
            total += quantized_bytes(shape, quantization, i, kept, prompt_tokens, max_tokens, budget)
        if eviction is not None and eviction.accumulates:  # H2O's float32 sums over its full-precision tokens
            total += shape.per_head(kept if quantization is not None else min(prompt_tokens + max_tokens, budget + 1))
        if calibration is not None:
            total += calibration_bytes(shape, calibration, evicted, prompt_tokens, budget)
    return total


def held_tokens(eviction, budget, quantization, prompt: int, new: int) -> tuple[int, int]:
    """(tokens kept after the prompt's eviction, tokens evicted in all)."""
    if eviction is None:
        return prompt, 0
    decode_evicts = eviction.evicts_during_decode and quantization is None  # quantized: chunks only
    return min(prompt, budget), max(prompt + (new if decode_evicts else 0) - budget, 0)


def full_precision_bytes(shape: LayerShape, eviction, budget, chunks: list[int], new: int) -> int:
    """A layer without quantization: the newest tier's buffers, and the kept tier after eviction."""
    prompt = sum(chunks)
    if eviction is None or (prompt + new <= budget) or (prompt <= budget and not eviction.evicts_during_decode):
        return shape.tokens(one_by_one(chunks, new, 64))  # never evicts: every token in the newest tier
    kept = shape.tokens(budget) + shape.per_head(budget)  # k, v and int32 positions, exact arrays
    if eviction.evicts_during_decode:  # each step evicts its token: the newest tier is empty between steps
        before = shape.tokens(one_by_one(chunks, max(budget - prompt, 0), 64)) if prompt <= budget else 0
        return max(before, kept)
    return kept + shape.tokens(one_by_one([], new, 64))


def quantized_bytes(shape: LayerShape, q, layer: int, kept: int, prompt: int, new: int, budget,
                    step: int = 64) -> int:
    """A quantized layer: its full-precision tokens (at most residual + group, in buffers of `step`
    rows), the packed groups as their buffers grow (a prompt's groups at once, then one group per
    flush), OTT's pools; at the worst moment, since the full-precision part shrinks as groups grow."""
    r, g = q.residual, q.group
    first = max(kept - r, 0) // g * g  # flushed with the prompt
    last = max(kept + new - r, 0) // g * g
    rest = kept - first  # full-precision tokens right after the prompt
    flushes = [first // g] * bool(first) + [1] * ((last - first) // g)  # in groups
    packed = [groups_bytes(shape, q, layer, flushes[:n]) for n in range(len(flushes) + 1)]
    if kept + new <= r + g:  # never flushes during decode
        return shape.tokens(one_by_one([kept], new, step)) + packed[-1]
    residual = shape.tokens(one_by_one([r], g, step))  # re-stored at each flush, then filled to residual + group
    if budget is not None and prompt > budget:  # evicted: the kept tier hands its tokens over a group a flush
        done = bool(first)
        phases = [shape.tokens(left) + shape.per_head(left) + shape.tokens(one_by_one([], r + g - left, step))
                  + packed[done + k]
                  for k, left in enumerate(range(rest, 0, -g))]
        return max(phases + [residual + packed[-1]])
    return max(shape.tokens(one_by_one([rest], r + g - rest, step)), residual) + packed[-1]


def groups_bytes(shape: LayerShape, q, layer: int, flushes: list[int]) -> int:
    """A quantized tier's arrays after these flushes (in groups): packed codes, scales and zeros in
    buffers of one row a step, and OTT's pools once it has traced."""
    per, gv, g = codes_per_word(q.bits), q.value_group_for(shape.dim), q.group
    word, scale = 4, shape.itemsize
    total = capacity_after([n * g // per for n in flushes], 1) * shape.dim * word  # key codes
    total += 2 * capacity_after(flushes, 1) * shape.dim * scale  # key scale, zero
    total += capacity_after([n * g for n in flushes], 1) * (shape.dim // per * word + 2 * shape.dim // gv * scale)
    total *= shape.heads
    if getattr(q, "outliers", 0) and layer >= q.skip_layers and flushes:
        o, c = q.outliers, q.overflow
        total += shape.tokens(o + c) + shape.per_head(o + c)  # pool and overflow k/v, norms and flags
        total += one_by_one([], sum(flushes), 1) * shape.heads * o * 4  # traced slots, a group at a time
    return total


def calibration_bytes(shape: LayerShape, calidrop, evicted: int, prompt: int, budget) -> int:
    """CaliDrop's tier: the evicted tokens (keys beside values) with their float32 scores, and per query
    head the proxy, the partial out and lse (and rule=taylor's mean key); the branch counts."""
    vectors = shape.query_heads * (shape.dim * 4 + shape.dim * shape.itemsize + 4) + 3 * 4
    if calidrop.rule == "taylor":
        vectors += shape.query_heads * shape.dim * 4
    if calidrop.recompute == "never" or not evicted:
        return vectors
    first = max(prompt - budget, 0)  # evicted with the prompt, then one per decode step (streaming, H2O)
    cap = calidrop.calibration_size
    if cap and evicted > cap:
        first, evicted = min(first, cap), cap + 1  # a capped tier is rebuilt at the cap, then takes one
    if calidrop.offload == "none":
        pairs = shape.tokens(one_by_one([first] * bool(first), evicted - first, 64))
    else:  # kvrt's KIVI format, groups of 32 (kvrt/cache/methods/evicted_store.py), and a full-precision rest
        from kvrt.cache.methods.evicted_store import OFFLOAD_GROUP
        from kvrt.cache.methods.kivi import KIVI

        groups = KIVI(bits=int(calidrop.offload[3:]), group=OFFLOAD_GROUP, residual=0)
        pairs = quantized_bytes(shape, groups, 0, first, first, evicted - first, None, OFFLOAD_GROUP)
    return vectors + pairs + (shape.per_head(evicted) if cap else 0)  # scores: a capped tier's only
