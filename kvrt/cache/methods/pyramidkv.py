"""PyramidKV (Cai et al., arXiv 2406.02069): SnapKV scoring with a per-layer budget pyramid.

With average budget C (window w included), β = 20 and L layers, for a prompt of n tokens:
min = (C−w)//β, max = 2(C−w) − min; if max ≥ n − w then max = n − w, min = 2(C−w) − max;
step = (max − min)//(L−1); layer l keeps max − l·step tokens plus the window, so lower
layers keep more. Fallbacks as in the reference: n < C keeps everything, and
n < 2(C−w) keeps a uniform C per layer.
"""

from __future__ import annotations

from kvrt.cache.methods.snapkv import SnapKV


class PyramidKV(SnapKV):
    name = "pyramidkv"
    options = {**SnapKV.options, "beta": int}

    def __init__(self, budget=None, ratio=None, window: int = 32, kernel: int = 5, pool: str = "avg", beta: int = 20):
        self.beta = beta
        super().__init__(budget, ratio, window, kernel, pool)

    def layer_budget(self, layer_idx: int, num_layers: int, prompt_len: int) -> int:
        c, w, n = self.base_budget(prompt_len), self.window, prompt_len
        if n < 2 * (c - w):
            return c
        low = (c - w) // self.beta
        high = 2 * (c - w) - low
        if high >= n - w:
            high = n - w
            low = 2 * (c - w) - high
        step = (high - low) // max(num_layers - 1, 1)
        return high - layer_idx * step + w
