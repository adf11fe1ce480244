"""H2O heavy hitters (Zhang et al., arXiv 2306.14048): accumulated attention plus a recent window.

Each token's score is the attention it has received from every query so far (prompt
queries at prefill, computed blockwise; then each decode query), averaged over the query
heads of its KV head. The budget is split half heavy hitters, half most recent tokens
(the split CaliDrop used); eviction continues during decode.
"""

from __future__ import annotations

from kvrt.errors import InvalidValue
from kvrt.cache.methods.base import INF, Candidates, EvictionMethod
from kvrt.cache.ops import Array, Ops
from kvrt.cache.token_state import TokenState


class AttentionSums(TokenState):
    """H2O's per-layer state: the attention each full-precision token has received, float32 [B, Hkv, S]."""

    def observe(self, q: Array, keys: Array, scale: float, block: int) -> None:
        """Add the chunk's attention to each candidate's running sum. The sums before it cover all but
        the chunk's own T tokens, whose sums start at zero."""
        ops, before = self.ops, self.values
        seen = accumulated_attention(ops, q, keys, scale, block)
        if before is None:
            self.values = seen
        else:
            b, h, t = seen.shape[0], seen.shape[1], q.shape[2]
            self.values = seen + ops.concat([before, ops.full((b, h, t), 0.0, before)], axis=2)
        self.unscored = 0


class H2O(EvictionMethod):
    name = "h2o"
    options = {**EvictionMethod.options, "recent": float}
    evicts_during_decode = True
    token_state = AttentionSums

    def __init__(self, budget=None, ratio=None, recent: float = 0.5):
        if not 0 <= recent <= 1:
            raise InvalidValue(f"h2o: recent is a share of the budget in [0, 1], got {recent}")
        self.recent = recent  # share of the budget given to the most recent tokens
        super().__init__(budget, ratio)

    def scores(self, ops: Ops, c: Candidates) -> Array:
        window = max(1, int(round(c.budget * self.recent)))
        recent = c.positions > c.offset - 1 - window  # the window newest positions (always contiguous)
        return ops.where(recent, ops.full(c.state.shape, INF, c.state), c.state)


def accumulated_attention(ops: Ops, q: Array, k: Array, scale: float, block: int) -> Array:
    """Σ over the chunk's queries of their attention over k (causal for the chunk's own keys),
    averaged over each KV head's query heads: float32 [B, Hkv, S]. Query blocks bound memory.
    q: [B, Hq, T, D] for the newest T tokens of k [B, Hkv, S, D]."""
    t, s = q.shape[2], k.shape[2]
    total = None
    for start in range(0, t, block):
        probs = ops.attention_probs(q[:, :, start : start + block], k, scale, causal_offset=s - t + start)
        part = ops.mean(ops.sum(probs, axis=3), axis=2)
        total = part if total is None else total + part
    return total
