"""SnapKV (Li et al., arXiv 2404.14469): keep what the last prompt queries attend to.

The observation window is the last `window` (32) queries of the chunk; their softmax
attention (causal inside the window, float32) is summed per key, averaged over each KV
head's query heads (as kvpress does, instead of repeating KV), smoothed by 1-D pooling
(`kernel` 5, `pool` avg|max, stride 1, padding kernel//2) over the keys before the window,
and the top `budget − window` keys are kept together with the window itself.
The prompt is compressed once; decode tokens are appended (the cache then grows), and a
later multi-token chunk (a chat turn) compresses again with its own window.
"""

from __future__ import annotations

from kvrt.errors import InvalidValue
from kvrt.cache.methods.base import INF, Candidates, EvictionMethod
from kvrt.cache.ops import Array, Ops


class SnapKV(EvictionMethod):
    name = "snapkv"
    options = {**EvictionMethod.options, "window": int, "kernel": int, "pool": str}

    def __init__(self, budget=None, ratio=None, window: int = 32, kernel: int = 5, pool: str = "avg"):
        if window < 1:
            raise InvalidValue(f"{self.name}: window must be >= 1, got {window}")
        if kernel < 1 or kernel % 2 == 0:
            raise InvalidValue(f"{self.name}: kernel must be an odd number >= 1, got {kernel}")
        if pool not in ("avg", "max"):
            raise InvalidValue(f"{self.name}: pool must be avg or max, got {pool}")
        self.window, self.kernel, self.pool = window, kernel, pool
        super().__init__(budget, ratio)

    @property
    def last_chunk_min(self) -> int:
        return self.window  # the observation window's queries must all be in the prompt's last chunk

    def min_budget(self) -> int:
        return self.window

    def why_min(self) -> str:
        return f"the observation window of {self.window}"

    def scores(self, ops: Ops, c: Candidates) -> Array:
        w = min(self.window, c.q.shape[2], c.k.shape[2])
        attention = ops.window_scores(c.q[:, :, -w:], c.k, c.scale)
        prefix = attention[..., : c.k.shape[2] - w]
        pooled = ops.pool1d(prefix, self.kernel, self.pool)
        b, h = pooled.shape[0], pooled.shape[1]
        return ops.concat([pooled, ops.full((b, h, w), INF, pooled)], axis=2)
