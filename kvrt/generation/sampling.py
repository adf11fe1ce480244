"""Choosing the next token: greedy on the device, everything else on the host with numpy.

Sampling on the host keeps one implementation for every backend and makes a seed
give the same tokens on torch and MLX whenever their logits agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from kvrt.errors import InvalidValue
from kvrt.cache.ops import Array, Ops


@dataclass(frozen=True)
class SamplingParams:
    temp: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # 1 = off; CTRL's rule: positive logits divided, negative multiplied
    repetition_context_size: int = 20  # how many recent tokens the penalty looks at (mlx-lm's default)
    seed: int | None = None

    def __post_init__(self):
        finite = all(math.isfinite(x) for x in (self.temp, self.top_p, self.min_p, self.repetition_penalty))
        checks = [
            (finite, f"sampling values must be finite numbers, got temp={self.temp}, top_p={self.top_p}, "
                     f"min_p={self.min_p}, repetition_penalty={self.repetition_penalty}"),
            (self.temp >= 0, f"--temp must be >= 0, got {self.temp}"),
            (0 < self.top_p <= 1, f"--top-p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"--top-k must be >= 0, got {self.top_k}"),
            (0 <= self.min_p < 1, f"--min-p must be in [0, 1), got {self.min_p}"),
            (self.repetition_penalty > 0, f"--repetition-penalty must be > 0, got {self.repetition_penalty}"),
            (self.repetition_context_size >= 0, "--repetition-context-size must be >= 0"),
            (self.seed is None or self.seed >= 0, f"--seed must be >= 0, got {self.seed}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidValue(message)

    @property
    def greedy(self) -> bool:
        return self.temp == 0


class Sampler:
    """Stateful (seeded) next-token chooser; call it with one logits row [V]."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, ops: Ops, logits: Array, history: Sequence[int]) -> int:
        p = self.params
        if p.greedy and p.repetition_penalty == 1.0:
            return ops.argmax_last(logits)
        x = ops.to_numpy(logits).astype(np.float64)
        if p.repetition_penalty != 1.0 and p.repetition_context_size:
            x = penalize_repeats(x, history[-p.repetition_context_size :], p.repetition_penalty)
        if p.greedy:
            return int(np.argmax(x))
        return int(self.rng.choice(x.shape[0], p=filtered_probs(x / p.temp, p)))


def penalize_repeats(logits: np.ndarray, recent: Sequence[int], penalty: float) -> np.ndarray:
    ids = np.unique(np.asarray(recent, dtype=np.int64))
    if ids.size:
        logits = logits.copy()
        seen = logits[ids]
        logits[ids] = np.where(seen > 0, seen / penalty, seen * penalty)
    return logits


def filtered_probs(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """Softmax of tempered logits after top-k, min-p and top-p (nucleus) filtering, renormalized."""
    if p.top_k and p.top_k < logits.shape[0]:
        kth = np.partition(logits, -p.top_k)[-p.top_k]
        logits = np.where(logits >= kth, logits, -np.inf)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if p.min_p > 0:
        probs = np.where(probs >= p.min_p * probs.max(), probs, 0.0)
    if p.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        before = np.cumsum(probs[order]) - probs[order]  # mass of strictly more likely tokens
        drop = order[before >= p.top_p * probs.sum()]
        probs[drop] = 0.0
    return probs / probs.sum()
