"""Eviction written once: a method only scores candidate tokens; budgets and selection live here.

A compression of one layer looks at its candidates (the kept tokens, then the newest ones),
asks the method for a score per (batch, KV head, token) — protected tokens score +inf —
and keeps the `budget` best per KV head. Scores are per KV head (query heads of a GQA
group averaged), so the stored tiers really shrink.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvrt.errors import InvalidValue
from kvrt.cache.ops import Array, Ops

INF = float("inf")


@dataclass
class Candidates:
    """What one layer's compression chooses from: kept tokens first, then the newest ones."""

    k: Array  # [B, Hkv, S, D], after RoPE
    positions: Array  # int32 [B, Hkv, S], absolute
    accumulated: Array | None  # float32 [B, Hkv, S]: attention each token received so far (H2O)
    q: Array  # [B, Hq, T, D]: the queries of the chunk just attended (its keys are the last T)
    scale: float
    offset: int  # absolute position of the next token
    budget: int  # tokens this layer keeps per KV head


class EvictionMethod:
    """Base class: `budget=` tokens kept per layer and KV head, or `ratio=` of the prompt."""

    name = "?"
    options: dict[str, type] = {"budget": int, "ratio": float}
    evicts_during_decode = False  # streaming and H2O keep a generation within budget
    accumulates = False  # H2O keeps each token's attention sum up to date (see H2O.accumulate)

    def __init__(self, budget: int | None = None, ratio: float | None = None):
        if (budget is None) == (ratio is None):
            raise InvalidValue(f"{self.name} needs exactly one of budget=N (tokens kept) or ratio=R (fraction kept)")
        if ratio is not None and not 0 < ratio <= 1:
            raise InvalidValue(f"{self.name}: ratio must be in (0, 1], got {ratio}")
        if budget is not None:
            self.check_budget(budget, "budget")
        self.budget, self.ratio = budget, ratio

    def min_budget(self) -> int:
        """Budgets at or below this keep nothing the method could choose."""
        return 1

    def check_budget(self, budget: int, what: str) -> None:
        if budget <= self.min_budget():
            raise InvalidValue(f"{self.name}: {what} {budget} must exceed {self.min_budget()} ({self.why_min()})")

    def why_min(self) -> str:
        return "at least two tokens"

    def base_budget(self, prompt_len: int) -> int:
        """Tokens kept per KV head for a prompt of this length."""
        if self.budget is not None:
            return self.budget
        budget = max(1, round(self.ratio * prompt_len))
        self.check_budget(budget, f"ratio {self.ratio} of a {prompt_len}-token prompt keeps {budget} tokens; that")
        return budget

    def layer_budget(self, layer_idx: int, num_layers: int, prompt_len: int) -> int:
        return self.base_budget(prompt_len)

    def compresses_chunk(self, t: int) -> bool:
        """Whether a chunk of t new tokens (t = 1: a decode step) may trigger a compression."""
        return t > 1 or self.evicts_during_decode

    def scores(self, ops: Ops, c: Candidates) -> Array:
        """float32 [B, Hkv, S]: higher is kept first; +inf is always kept."""
        raise NotImplementedError


def selection(ops: Ops, scores: Array, budget: int) -> tuple[Array, Array]:
    """(kept indices ascending, evicted indices) per KV head: the `budget` highest scores win."""
    order = ops.argsort_desc(scores)
    return ops.sort(order[..., :budget]), order[..., budget:]
