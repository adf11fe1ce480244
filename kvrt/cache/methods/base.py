"""Eviction written once: a method only scores candidate tokens; budgets and selection live here.

A compression of one layer looks at its candidates (the kept tokens, then the newest ones),
asks the method for a score per (batch, KV head, token) — protected tokens score +inf —
and keeps the `budget` best per KV head. Scores are per KV head (query heads of a GQA
group averaged), so the stored tiers really shrink.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvrt.errors import InvalidValue
from kvrt.cache.layer_shape import LayerShape
from kvrt.cache.ops import Array, Ops
from kvrt.cache.tiers import FullPrecisionTier, KeptTier
from kvrt.cache.token_state import TokenState

INF = float("inf")


@dataclass
class Candidates:
    """What one layer's compression chooses from: kept tokens first, then the newest ones."""

    k: Array  # [B, Hkv, S, D], after RoPE
    positions: Array  # int32 [B, Hkv, S], absolute
    state: Array | None  # float32 [B, Hkv, S]: the method's TokenState values (H2O: attention received so far)
    q: Array  # [B, Hq, T, D]: the queries of the chunk just attended (its keys are the last T)
    scale: float
    offset: int  # absolute position of the next token
    budget: int  # tokens this layer keeps per KV head


class EvictionMethod:
    """Base class: `budget=` tokens kept per layer and KV head, or `ratio=` of the prompt."""

    name = "?"
    options: dict[str, type] = {"budget": int, "ratio": float}
    evicts_during_decode = False  # streaming and H2O keep a generation within budget
    token_state: type[TokenState] | None = None  # per-token state it scores with, kept per layer (H2O's sums)
    # the fewest tokens the last chunk of a prompt fed in chunks may have: the queries the method
    # scores with must all be in it (SnapKV's observation window); 0 when any chunk will do
    last_chunk_min = 0

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

    def new_token_state(self, ops: Ops) -> TokenState | None:
        """A layer's per-token state (`token_state`), or None for a method that scores without one."""
        return self.token_state(ops) if self.token_state is not None else None

    def compresses_chunk(self, t: int) -> bool:
        """Whether a chunk of t new tokens (t = 1: a decode step) may trigger a compression."""
        return t > 1 or self.evicts_during_decode

    def scores(self, ops: Ops, c: Candidates) -> Array:
        """float32 [B, Hkv, S]: higher is kept first; +inf is always kept."""
        raise NotImplementedError

    # --- what a layer evicting this way comes to hold (kvrt/cache/admission.py) --------------------
    def held_tokens(self, budget: int, prompt: int, new: int, quantized: bool) -> tuple[int, int]:
        """(tokens kept after the prompt's eviction, tokens evicted in all) of a layer of this budget."""
        decode_evicts = self.evicts_during_decode and not quantized  # a quantizer defers eviction to chunks
        return min(prompt, budget), max(prompt + (new if decode_evicts else 0) - budget, 0)

    def layer_bytes(self, shape: LayerShape, layer: int, budget: int, chunks: list[int], new: int,
                    quantizer=None) -> int:
        """The most bytes a global layer of this budget holds over a request (its prompt in `chunks`,
        then `new` tokens): its kept and newest tiers, or the quantizer's layer, and the token state."""
        prompt = sum(chunks)
        if quantizer is not None:
            kept, _ = self.held_tokens(budget, prompt, new, True)
            held = quantizer.layer_bytes(shape, layer, kept, prompt, new, budget)
            # its state covers the full-precision tokens: the kept ones, then at most residual + group
            covered = min(kept + new, max(kept, quantizer.residual + quantizer.group))
        else:
            held = self._full_precision_bytes(shape, budget, chunks, new)
            covered = min(prompt + new, budget + 1)  # the budget and the decode token its step evicts
        return held + (self.token_state.bytes_for(shape, covered) if self.token_state is not None else 0)

    def _full_precision_bytes(self, shape: LayerShape, budget: int, chunks: list[int], new: int) -> int:
        """A layer without a quantizer: the newest tier's buffers, and the kept tier after eviction."""
        prompt = sum(chunks)
        if prompt + new <= budget or (prompt <= budget and not self.evicts_during_decode):
            return FullPrecisionTier.bytes_for(shape, chunks, new)  # never evicts: every token in the newest tier
        kept = KeptTier.bytes_for(shape, budget)
        if self.evicts_during_decode:  # each step evicts its token: the newest tier is empty between steps
            before = FullPrecisionTier.bytes_for(shape, chunks, max(budget - prompt, 0)) if prompt <= budget else 0
            return max(before, kept)
        return kept + FullPrecisionTier.bytes_for(shape, [], new)


def selection(ops: Ops, scores: Array, budget: int) -> tuple[Array, Array]:
    """(kept indices ascending, evicted indices) per KV head: the `budget` highest scores win."""
    order = ops.argsort_desc(scores)
    return ops.sort(order[..., :budget]), order[..., budget:]
