"""StreamingLLM (Xiao et al., arXiv 2309.17453): attention sinks plus the most recent tokens.

Keeps the first `sinks` tokens (default 4) and the newest `budget − sinks`, and keeps
evicting during decode so a long generation stays within budget. Unlike the original,
positions stay absolute (keys are never re-rotated), as in SnapKV.
"""

from __future__ import annotations

from kvrt.errors import InvalidValue
from kvrt.cache.methods.base import INF, Candidates, EvictionMethod
from kvrt.cache.ops import Array, Ops


class StreamingLLM(EvictionMethod):
    name = "streaming"
    options = {**EvictionMethod.options, "sinks": int}
    evicts_during_decode = True

    def __init__(self, budget=None, ratio=None, sinks: int = 4):
        if sinks < 0:
            raise InvalidValue(f"streaming: sinks must be >= 0, got {sinks}")
        self.sinks = sinks
        super().__init__(budget, ratio)

    def min_budget(self) -> int:
        return self.sinks

    def why_min(self) -> str:
        return f"the {self.sinks} sink tokens"

    def scores(self, ops: Ops, c: Candidates) -> Array:
        positions = ops.to_float32(c.positions)  # newer is better ...
        return ops.where(c.positions < self.sinks, ops.full(positions.shape, INF, positions), positions)
