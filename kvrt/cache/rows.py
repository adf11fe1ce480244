"""Rows of a batch: every stored array holds one sequence per row (axis 0), each with its own length.

Tiers stay rectangular over the batch. A row that holds fewer tokens than the longest is
padded at the end of the token axis, and attention hides the padding through the key
bias every partial already takes (`length_bias`), so a row's attention sees exactly its
own tokens. Rows move between caches by `take` (a subset of rows, cut to their longest)
and by stacking (kvrt.cache.kvcache.stack_caches): a request's one-row cache joins a batch, a
finished one leaves it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from kvrt.cache.ops import Array, Ops

INF = float("inf")


def per_row(row_lengths: np.ndarray | None, rows: int, length: int) -> np.ndarray:
    """Each row's length: the per-row lengths where rows differ, else `length` for all `rows`."""
    return row_lengths if row_lengths is not None else np.full(rows, length)


def ragged(lengths: np.ndarray) -> np.ndarray | None:
    """The per-row lengths when rows differ; None when every row has the same length."""
    return None if len(lengths) == 0 or (lengths == lengths[0]).all() else lengths


def length_bias(ops: Ops, lengths: np.ndarray | None, extent: int, like: Array) -> Array | None:
    """float32 [B, H, extent] (B, H as like's first axes): 0 on row b's first lengths[b] keys and
    −inf after; None when no row is shorter than the extent (nothing to hide)."""
    lengths = short_rows(None if lengths is None else np.asarray(lengths), extent)
    if lengths is None:
        return None
    limit = ops.row_values(lengths, like)
    return ops.where(ops.positions(0, extent, like=like) < limit[:, None, None], 0.0, -INF)


def short_rows(lengths: np.ndarray | None, extent: int) -> np.ndarray | None:
    """Each row's length cut to the extent, or None when every row fills it (nothing to hide)."""
    if lengths is None or (lengths >= extent).all():
        return None
    return np.minimum(lengths, extent)


def add_bias(a: Array | None, b: Array | None) -> Array | None:
    """Two key biases combined (either may be None)."""
    if a is None or b is None:
        return b if a is None else a
    return a + b


def cut(x: Array, axis: int, n: int) -> Array:
    """x's first n entries along axis -1 or -2."""
    return x[..., :n] if axis == -1 else x[..., :n, :]


def cut_front(x: Array, axis: int, start: int, end: int) -> Array:
    """x's entries start..end-1 along axis -1 or -2."""
    return x[..., start:end] if axis == -1 else x[..., start:end, :]


def take(ops: Ops, x: Array | None, rows: Sequence[int], axis: int | None = None, extent: int | None = None):
    """Rows of x (all of them in order: x itself), cut to `extent` entries along `axis`."""
    if x is None:
        return None
    if axis is not None and extent is not None and x.shape[axis] > extent:
        x = cut(x, axis, extent)
    return x if list(rows) == list(range(x.shape[0])) else ops.take_rows(x, rows)


def stack(ops: Ops, parts: Sequence[Array | None], counts: Sequence[int], axis: int | None, pad: float,
          empty: Array | None = None) -> Array | None:
    """One array of every part's rows, each padded with `pad` along `axis` to the longest. A part
    that is None (nothing stored yet) becomes `counts[i]` rows of `empty` (default: padding only)."""
    template = next((p for p in parts if p is not None), None)
    if template is None:
        return None
    longest = max(p.shape[axis] for p in parts if p is not None) if axis is not None else None
    filled = []
    for part, count in zip(parts, counts):
        if part is None:
            part = empty if empty is not None else blank(ops, template, count, axis, pad)
            part = ops.take_rows(part, [0] * count) if part.shape[0] != count else part
        filled.append(part if axis is None else pad_to(ops, part, axis, longest, pad))
    return filled[0] if len(filled) == 1 else ops.concat(filled, axis=0)


def pad_to(ops: Ops, x: Array, axis: int, size: int, value: float) -> Array:
    """x extended along `axis` (-1 or -2) to `size` entries filled with `value`."""
    missing = size - x.shape[axis]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[axis] = missing
    return ops.concat([x, ops.cast_like(ops.full(tuple(shape), value, x), x)], axis=axis)


def blank(ops: Ops, like: Array, count: int, axis: int | None, pad: float) -> Array:
    """`count` rows shaped like `like`'s, holding nothing: zero entries along `axis` (else `pad` everywhere)."""
    rows = ops.take_rows(like, [0] * count)
    if axis is None:
        return ops.cast_like(ops.full(rows.shape, pad, rows), rows)
    return cut(rows, axis, 0)


def move_to_front(ops: Ops, x: Array, drop: np.ndarray, lengths: np.ndarray, axis: int) -> Array:
    """x [B, H, S(, D)] with each row that drops (drop[b] > 0) holding its entries drop[b]..lengths[b]-1
    at its front along `axis` (-1 or -2), in place where the backend can; the other rows untouched."""
    for b in np.flatnonzero(drop):
        b = int(b)
        x = ops.write_row(x, b, 0, cut_front(ops.take_rows(x, [b]), axis, int(drop[b]), int(lengths[b])), axis)
    return x


def drop_front(ops: Ops, x: Array, drop: np.ndarray, lengths: np.ndarray, axis: int) -> Array:
    """x [B, H, S(, D)] without each row's first drop[b] entries along `axis` (-1 or -2); rows
    then hold lengths[b] − drop[b] entries, padded at the end to the longest."""
    if (drop == drop[0]).all():
        n = int(drop[0])
        return x[..., n:] if axis == -1 else x[..., n:, :]
    rows = []
    for b in range(x.shape[0]):
        row = take(ops, x, [b])
        end = int(lengths[b])
        rows.append(cut_front(row, axis, int(drop[b]), end))
    return stack(ops, rows, [1] * len(rows), axis, 0.0)
