"""One request: a prompt carried through prefill (in chunks), decode and finish.

Every path runs its tokens through here: `Model.generate/stream/chat`, a ChatSession's turns,
`kvrt eval` and `kvrt serve` (kvrt.generation.scheduler runs the steps). The request owns the one
token handler: its sampler, its detokenizer and stop strings, the end-of-sequence and length
checks, cancellation and its stats (defined in kvrt.generation.stats).
"""

from __future__ import annotations

import time
from typing import Callable, Protocol, Sequence

from kvrt.cache.admission import prompt_chunks
from kvrt.cache.spec import CacheSpec
from kvrt.generation.logprobs import TokenLogprob, score, score_rows
from kvrt.generation.sampling import Sampler, SamplingParams
from kvrt.generation.stats import GenerationStats
from kvrt.generation.stops import StopMatcher
from kvrt.models.tokenizer import StreamingDetokenizer


class Listener(Protocol):
    """Who hears of a request as it runs on another thread (kvrt.serving.engine.Handle)."""

    cancelled: bool  # its client went away: the request ends at its next step

    def piece(self, text: str) -> None: ...
    def finished(self, request: "Request") -> None: ...
    def failed(self, exc: BaseException) -> None: ...


class Request:
    """A prompt (`ids`, the tokens after what `cache` already holds) and what it has become: the
    tokens sampled (`tokens`, an end-of-sequence one included), the text pieces emitted (`pieces`),
    its stats once it has closed. `cache`: a fresh one of `spec` unless given (a chat turn's); the
    request leaves it holding the prompt and every sampled token but the last. `logprobs`: score each
    token it samples, with that many alternatives (kvrt.generation.logprobs); `prompt_logprobs`:
    score the prompt's own tokens too (all but the first). `max_tokens` 0 only prefills (scoring)."""

    def __init__(self, model, ids: Sequence[int], spec: CacheSpec, params: SamplingParams, max_tokens: int,
                 stop: Sequence[str] = (), *, cache=None, listener: Listener | None = None,
                 progress: Callable[[int, int], None] | None = None, logprobs: int | None = None,
                 prompt_logprobs: bool = False):
        self.runtime, self.tokenizer = model.runtime, model.tokenizer
        self.ids, self.spec, self.params, self.max_tokens = list(ids), spec, params, max_tokens
        self.prompt_ids = self.ids  # the whole prompt, of which `ids` are the tokens still to feed
        self.keep: Callable[["Request"], None] | None = None  # handed the cache of a request that ends well
        self.listener, self.progress = listener, progress
        self.logprobs, self.prompt_logprobs = logprobs, prompt_logprobs
        self.scores: list[TokenLogprob] = []  # per token sampled (an end-of-sequence one too), with `logprobs`
        self.prompt_scores: list[TokenLogprob] = []  # per prompt token after the first, with `prompt_logprobs`
        self.cache = cache if cache is not None else self.runtime.new_cache(spec)
        self.need = 0  # KV bytes a server reserves for it (kvrt.cache.admission)
        self.fed = 0  # prompt tokens prefilled so far
        self.chunks: list[int] | None = None
        self.logits = None
        self.sampler = Sampler(params)
        self.history = list(ids)  # what a repetition penalty looks back over
        self.detok = StreamingDetokenizer(self.tokenizer)
        self.matcher = StopMatcher(stop)
        self.tokens: list[int] = []
        self.pieces: list[str] = []
        self.generated = 0  # tokens of text
        self.last = None  # the token the next decode step feeds
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.stats = GenerationStats(prompt_tokens=len(self.ids))
        self._prefill_seconds = 0.0
        self._t_first = self._t_last = 0.0

    def resume(self, cache, held: int) -> None:
        """Start from a cache that already holds the prompt's first `held` tokens: only the rest is fed."""
        self.cache, self.ids = cache, self.prompt_ids[held:]

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def cancelled(self) -> bool:
        return self.listener is not None and self.listener.cancelled

    # --- prefill ---------------------------------------------------------------------
    def prefill(self, chunk: int | None) -> bool:
        """Feed the prompt's next chunk (`chunk` tokens, None: all of it); True once the whole prompt is
        in. The cache compresses after the last chunk only (KVCache.hold), which is never shorter than
        its eviction's observation window, so a prompt in chunks compresses exactly as a whole one."""
        start = time.perf_counter()
        if self.chunks is None:
            self.chunks = prompt_chunks(len(self.ids), chunk, self.cache.last_chunk_min)
        end = self.fed + self.chunks.pop(0)
        self.cache.hold(end < len(self.ids))
        self.logits = self.runtime.forward(self.ids[self.fed : end], self.cache, all_logits=self.prompt_logprobs,
                                           progress=self.progress)
        if self.prompt_logprobs:  # each position scores the prompt token after it
            rows = self.runtime.ops.to_numpy(self.logits)
            self.prompt_scores += score_rows(rows, self.ids[self.fed + 1 : end + 1], self.logprobs or 0)
        self.fed = end
        self._prefill_seconds += time.perf_counter() - start
        return end == len(self.ids)

    def start(self) -> bool:
        """Sample the first token from the prompt's logits; True when that already finished the request."""
        if self.max_tokens == 0:
            return self.finish("length")
        return self.accept(self.logits[-1])

    def batch_key(self) -> tuple:
        """Requests with equal keys share a batched cache: those of one cache spec (apart, the rare ones
        whose eviction has not yet fixed its budgets: a one-token prompt under a quantized spec)."""
        return str(self.spec), self.cache.layers[0].budget is None

    def nbytes(self) -> int:
        return self.cache.nbytes() if self.cache is not None else 0

    # --- tokens ------------------------------------------------------------------------
    def accept(self, logits) -> bool:
        """Sample the next token from its logits row and emit its text; True when the request has
        finished (then `close` it)."""
        token = self.sampler(self.runtime.ops, logits, self.history)
        self._t_last = time.perf_counter()
        self._t_first = self._t_first or self._t_last
        self.history.append(token)
        self.tokens.append(token)
        if self.logprobs is not None:
            self.scores.append(score(self.runtime.ops.to_numpy(logits), token, self.logprobs))
        if token in self.tokenizer.eos_token_ids:
            return self.finish("eos")
        self.generated += 1
        self.last = token
        self.emit(self.matcher.push(self.detok.add_token(token)))
        if self.matcher.stopped:
            return self.finish("stop")
        if self.generated >= self.max_tokens:
            return self.finish("length")
        return self.cancelled and self.finish("cancelled")

    def emit(self, piece: str) -> None:
        if piece:
            self.pieces.append(piece)
            if self.listener is not None:
                self.listener.piece(piece)

    def finish(self, reason: str) -> bool:
        """Stop ("eos", "stop", "length" or "cancelled"); the last text is emitted now."""
        if reason != "cancelled":
            tail = self.matcher.push(self.detok.finalize())
            self.emit(tail + ("" if self.matcher.stopped else self.matcher.flush()))
        self.finish_reason = reason
        return True

    def close(self) -> None:
        """After leaving its batch (or stopped before it ended: "interrupted"): fill in the stats from
        its own cache, let go of the cache and tell the listener."""
        stats = self.stats
        stats.finish_reason = self.finish_reason or "interrupted"
        stats.generation_tokens = self.generated
        stats.prompt_tps = self.fed / max(self._prefill_seconds, 1e-9)
        if len(self.tokens) > 1:
            stats.generation_tps = (len(self.tokens) - 1) / max(self._t_last - self._t_first, 1e-9)
        if self.cache is not None:
            stats.kv_bytes, stats.kv_host_bytes = self.cache.nbytes(), self.cache.host_nbytes()
            stats.cache = self.cache.stats()
        stats.peak_memory_bytes = self.runtime.peak_memory_bytes()
        if self.keep is not None and self.cache is not None and self.finish_reason in ("eos", "stop", "length"):
            self.keep(self)
        self.cache = None
        if self.listener is not None:
            self.listener.finished(self)

    def fail(self, exc: BaseException) -> None:
        """End with an error (a failed forward): the caller sees `exc`."""
        self.error, self.cache, self.finish_reason = exc, None, "error"
        if self.listener is not None:
            self.listener.failed(exc)

    def held_ids(self) -> list[int]:
        """The tokens its cache holds, in order: the prompt and every sampled token fed back."""
        return (self.prompt_ids + self.tokens)[: self.cache.offset]

    @property
    def first_token_at(self) -> float | None:
        """perf_counter time of the first sampled token (None before it)."""
        return self._t_first or None
