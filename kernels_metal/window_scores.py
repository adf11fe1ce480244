"""SnapKV's observation-window scores (arXiv 2404.14469) in two passes: window_lse.metal (each window
query's log-sum-exp), then window_scores.metal (per key, the probabilities summed over the window and
averaged over the KV head's query heads). No [W, S] score matrix is stored.
Reference twin: MLXOps.window_scores."""

from __future__ import annotations

import mlx.core as mx

from kvrt.kernels_metal.sources import launch, meta, scalar


def window_scores_metal(q, k, scale: float) -> mx.array:
    """float32 [B, Hkv, S] from the newest W queries q [B, Hq, W, D] over keys k [B, Hkv, S, D] (W <= S)."""
    b, hq, w, d = q.shape
    _, hkv, s, _ = k.shape
    g, bh = hq // hkv, b * hkv
    # q and k go in as they are (a slice of the chunk's queries; at a prompt, a view of the newest tier's
    # buffer): both kernels read them through their strides, so neither is copied
    (lse,) = launch("window_lse", [q, k, meta(s, hkv), scalar(scale)], [("D", d), ("W", w), ("ROWS", g * w)],
                    grid=(32, g * w, bh), threadgroup=(32, 1, 1), outputs=[((bh, g * w), mx.float32)])
    (out,) = launch("window_scores", [q, k, lse, meta(s, hkv), scalar(scale)],
                    [("D", d), ("W", w), ("ROWS", g * w), ("G", g)],
                    grid=(s, 1, bh), threadgroup=(min(s, 256), 1, 1), outputs=[((bh, s), mx.float32)])
    return out.reshape(b, hkv, s)
