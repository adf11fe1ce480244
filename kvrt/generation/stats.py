"""The generator at the centre: prefill a prompt into a cache, then yield tokens one by one.

Everything else (library API, CLI, chat, eval) is built on `generate_tokens` and
`stream_text`; a backend runtime only has to provide `forward(ids, cache)`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Protocol, Sequence

from kvrt.errors import InvalidValue
from kvrt.generation.sampling import Sampler, SamplingParams
from kvrt.models.tokenizer import StreamingDetokenizer, Tokenizer


class Runtime(Protocol):
    """What a backend provides (backends/torch/runtime.py, backends/mlx/runtime.py).

    `forward` may be called from several threads: each runtime runs one forward at a time (its
    lock), and every other piece of state a call touches (its cache, its stats) is its own.
    `progress(done, total)` is called as the model's layers finish a multi-token chunk."""

    backend: str
    ops: object
    windows: list  # per layer, the sliding window of a local layer, or None for a global one

    def new_cache(self, spec="full"): ...
    def forward(self, ids: list[int], cache, all_logits: bool = False,
                progress: Callable[[int, int], None] | None = None): ...
    def synchronize(self) -> None: ...
    def peak_memory_bytes(self) -> int: ...


def check_token_ids(ids: Sequence[int], vocab_size: int | None) -> None:
    """What every runtime's forward refuses: no tokens, or ids outside the vocabulary."""
    if not ids:
        raise InvalidValue("a forward needs at least one token id")
    if vocab_size and not all(0 <= i < vocab_size for i in ids):
        raise InvalidValue(f"token ids must lie in [0, {vocab_size}); got {min(ids)}..{max(ids)}")


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    peak_memory_bytes: int = 0
    kv_bytes: int = 0
    kv_host_bytes: int = 0  # the part of kv_bytes in host memory (CaliDrop's evicted tier)
    finish_reason: str = "length"  # "length", "eos", "stop" or "interrupted"
    truncated_tokens: int = 0  # prompt tokens --truncate cut from the middle to fit the context
    dropped_turns: int = 0  # oldest chat turns left out to fit the context
    cache: dict = field(default_factory=dict)  # the cache's own counters (CaliDrop branches ...)
    _t_start: float = field(default=0.0, repr=False)
    _t_first: float = field(default=0.0, repr=False)

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}

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


def generate_tokens(
    runtime: Runtime,
    prompt_ids: Sequence[int],
    cache,
    params: SamplingParams,
    max_tokens: int,
    eos_ids: set[int] = frozenset(),
    stats: GenerationStats | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[int]:
    """Yield up to max_tokens new token ids; the cache ends holding the prompt and all but the last.

    prompt_ids are the tokens after what `cache` already holds (a chat turn's suffix).
    `stats` is filled in as generation proceeds (prompt/decode speed, memory, KV bytes);
    `progress(layers done, layers)` follows the prompt through the model.
    """
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(prompt_ids)
    stats._t_start = time.perf_counter()
    paths = getattr(runtime.ops, "paths", None)
    if paths is not None:
        paths.clear()  # this thread's kernel paths, from this generation on
    try:
        yield from _sampled_tokens(runtime, prompt_ids, cache, params, max_tokens, eos_ids, stats, progress)
    finally:  # also when stopped early (stop string, Ctrl-C): the stats describe the cache as it is
        stats.kv_bytes, stats.kv_host_bytes = cache.nbytes(), cache.host_nbytes()
        stats.cache = cache.stats()
        stats.peak_memory_bytes = runtime.peak_memory_bytes()


def _sampled_tokens(runtime, prompt_ids, cache, params, max_tokens, eos_ids, stats, progress) -> Iterator[int]:
    sampler = Sampler(params)
    history = list(prompt_ids)
    logits = runtime.forward(list(prompt_ids), cache, progress=progress)
    for step in range(max_tokens):
        token = sampler(runtime.ops, logits[-1], history)
        now = time.perf_counter()
        if step == 0:
            stats._t_first = now
            stats.prompt_tps = len(prompt_ids) / max(now - stats._t_start, 1e-9)
        else:
            stats.generation_tps = step / max(now - stats._t_first, 1e-9)
        stats.generation_tokens = step + 1
        history.append(token)
        if token in eos_ids:
            stats.finish_reason = "eos"
            stats.generation_tokens = step  # the end-of-sequence token is not text
            yield token
            break
        yield token
        if step + 1 < max_tokens:
            logits = runtime.forward([token], cache)


class StopMatcher:
    """Holds back streamed text that could still turn into a stop string."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Add text; return what is safe to emit now (all of it, up to a stop, or minus a possible prefix)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def stream_text(
    runtime: Runtime,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int],
    cache,
    params: SamplingParams,
    max_tokens: int,
    stop: Sequence[str] = (),
    stats: GenerationStats | None = None,
    generated: list[int] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[str]:
    """Yield text pieces as tokens arrive: whole UTF-8 characters only, stop strings cut off.

    `generated` (if given) receives every new token id, so a chat can track what the cache holds.
    """
    stats = stats if stats is not None else GenerationStats()
    detok = StreamingDetokenizer(tokenizer)
    matcher = StopMatcher(stop)
    tokens = generate_tokens(runtime, prompt_ids, cache, params, max_tokens, tokenizer.eos_token_ids, stats,
                             progress)
    try:
        for token in tokens:
            if generated is not None:
                generated.append(token)
            if token in tokenizer.eos_token_ids:
                break
            piece = matcher.push(detok.add_token(token))
            if piece:
                yield piece
            if matcher.stopped:
                stats.finish_reason = "stop"
                return
        tail = matcher.push(detok.finalize())
        if matcher.stopped:
            stats.finish_reason = "stop"
        else:
            tail += matcher.flush()
        if tail:
            yield tail
    finally:
        tokens.close()  # runs generate_tokens' own finally: KV bytes, cache counters, peak memory
