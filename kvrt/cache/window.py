"""Sliding-window (local) layers: attend only the last W positions, and hold no more than that.

A query at position p sees the keys at positions p − W < k ≤ p, as transformers masks a
sliding-window layer (Gemma 2/3's local layers, Mistral v0.1, Phi-3). After each chunk the
layer lets go of every token the next query can no longer see (`slide`), so between steps a
local layer holds at most W − 1 tokens per KV head, and W while it attends a decode token:

- the newest tier drops its oldest tokens (positions are contiguous there, the same for every
  KV head);
- the kept tier (what eviction chose, positions per KV head) keeps the tokens still inside the
  window, each head's moved to the front; heads that keep fewer are padded with tokens that
  left the window, which the window bias (`kept_bias`) hides from attention.

Inside the window a spec applies as on a global layer: eviction chooses among the window's
tokens with its own scores and budget. Quantization and CaliDrop do not apply to local layers
(see LayerCache): a window is already bounded, and their stored forms (groups of G tokens,
a calibration term summed over evicted tokens) cannot let single tokens leave it.
"""

from __future__ import annotations

import numpy as np

from kvrt.cache import rows as batch_rows
from kvrt.cache.buffer import SeqBuffer
from kvrt.cache.layer_shape import LayerShape
from kvrt.cache.ops import Array

INF = float("inf")


def slide(layer) -> None:
    """Drop from `layer` (a LayerCache with a window) every token the next query cannot see."""
    horizon = layer.offset - layer.window  # positions at or below it have left the window
    _slide_newest(layer, horizon)
    if layer.kept.length:
        _slide_kept(layer, horizon)


def _slide_newest(layer, horizon) -> None:
    newest = layer.newest
    if not newest.length:
        return
    lengths = newest.lengths()
    drop = np.clip(np.broadcast_to(horizon + 1 - np.asarray(layer.newest_start), lengths.shape), 0, lengths)
    if not drop.any():
        return
    if layer.token_state is not None:  # the method's per-token state loses the same tokens
        layer.token_state.drop_newest_front(layer.kept.length, drop, lengths)
    newest.drop_front(drop)
    start = layer.newest_start + drop
    layer.newest_start = int(start[0]) if (start == start[0]).all() else start


def _slide_kept(layer, horizon) -> None:
    """Keep each KV head's tokens still inside the window, moved to the front in their order."""
    ops, kept = layer.ops, layer.kept
    alive = kept.positions > layer._per_row(horizon, kept.positions)
    length = kept.length
    counts = ops.to_numpy(ops.sum(ops.where(alive, 1.0, 0.0), axis=2)).astype(np.int64)  # [B, Hkv]
    if counts.min() == length:
        return
    longest = int(counts.max())
    # alive tokens first, each group in its stored order (stable sort on a key that ranks them so)
    index = ops.to_float32(ops.positions(0, length, like=kept.positions))
    order = ops.argsort_desc(ops.where(alive, 2.0 * length - index, length - index))[..., :longest]
    if layer.token_state is not None:
        layer.token_state.reorder_kept(length, order)
    if not longest:
        kept.replace(None, None, None)
        return
    kept.replace(ops.gather_seq(kept.k, order), ops.gather_seq(kept.v, order), ops.gather_seq(kept.positions, order))
    kept.row_lengths = batch_rows.ragged(counts.max(axis=1))


def local_layer_bytes(shape: LayerShape, window: int, tokens: int) -> int:
    """The most bytes a local layer holds over a request of `tokens` tokens: at most its window, in a
    newest tier whose buffers drop their oldest tokens whole steps at a time."""
    return shape.tokens(SeqBuffer.sliding_capacity(min(tokens, window)))


def kept_bias(layer, first_query, count: int) -> Array:
    """float32 key bias over the kept tier: 0 inside the window of each query, −inf outside.
    [B, Hkv, S] for one query (decode), [B, Hkv, T, S] for `count` queries from `first_query`."""
    ops, positions = layer.ops, layer.kept.positions
    if count == 1:
        return ops.where(positions > layer._per_row(first_query - layer.window, positions), 0.0, -INF)
    queries = ops.positions(0, count, like=positions) + layer._per_row(first_query, positions)  # [B, Hkv, T]
    return ops.where(positions[:, :, None, :] > (queries - layer.window)[..., None], 0.0, -INF)
