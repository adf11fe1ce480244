"""A generation's stats, defined once for every path (library, CLI, eval, server).

- prompt_tokens: the tokens prefilled (a chat turn: only those its cache did not hold yet).
- prompt_tps: prompt_tokens over the seconds the prompt's forwards took, every chunk from the
  first one's start to the last one's logits (time queued or spent in other requests' steps is
  not counted).
- generation_tokens: tokens of text generated (an end-of-sequence token is not text).
- generation_tps: the tokens sampled after the first (an end-of-sequence one included: it took a
  decode step) over the seconds from the first token to the last.
- kv_bytes: what the request's own cache holds when it ends, allocation included; a request
  leaving a batch takes its rows out into a cache cut to its length (kvrt.generation.scheduler).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    peak_memory_bytes: int = 0
    kv_bytes: int = 0
    kv_host_bytes: int = 0  # the part of kv_bytes in host memory (CaliDrop's evicted tier)
    finish_reason: str = "length"  # "length", "eos", "stop", "cancelled" (its client left) or "interrupted"
    truncated_tokens: int = 0  # prompt tokens --truncate cut from the middle to fit the context
    dropped_turns: int = 0  # oldest chat turns left out to fit the context
    cache: dict = field(default_factory=dict)  # the cache's own counters (CaliDrop branches ...)

    def as_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        text = (
            f"prompt: {self.prompt_tokens} tokens, {self.prompt_tps:.1f} tok/s | "
            f"generation: {self.generation_tokens} tokens, {self.generation_tps:.1f} tok/s | "
            f"peak memory: {self.peak_memory_bytes / 2**30:.3f} GiB | kv cache: {self.kv_bytes / 2**20:.2f} MiB"
        )
        if self.kv_host_bytes:
            text += f" (of which {self.kv_host_bytes / 2**20:.2f} MiB in host memory)"
        calidrop = self.cache.get("calidrop")
        if calidrop:
            total = max(sum(calidrop.values()), 1)
            text += " | calidrop " + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in calidrop.items())
        quantized = self.cache.get("quantized")
        if quantized:
            text += (f" | quantized {quantized['tokens']}/{quantized['of']} tokens per layer, "
                     f"{quantized['traced']:.1f} outliers per traced KV head")
        kernels = self.cache.get("kernels")
        if kernels:
            text += " | kernels: " + ", ".join(f"{k} {v}" for k, v in kernels.items())
        if self.truncated_tokens:
            text += f" | truncated {self.truncated_tokens} prompt tokens"
        if self.dropped_turns:
            text += f" | dropped {self.dropped_turns} oldest turns"
        return text
