"""Batched generation: many sequences decoded together over one batched, compressed cache.

A `Row` is one sequence: its prompt is prefilled alone into a one-row cache (in chunks),
then it joins a `Batch` — rows whose caches share a spec and per-layer budgets, stacked
into one KVCache of B rows (kvrt.cache.kvcache: per-row lengths, padding masked). Each decode
step runs the model once for all rows, each at its own position, and samples each row
with its own sampler; a finished row leaves the batch and its memory goes with it.
A sequence's greedy tokens do not depend on what runs beside it.
"""

from __future__ import annotations

import time
from typing import Sequence

from kvrt.cache.kvcache import stack_caches
from kvrt.errors import KvrtError
from kvrt.generation.generate import GenerationStats, StopMatcher
from kvrt.generation.sampling import Sampler, SamplingParams
from kvrt.cache.spec import CacheSpec
from kvrt.models.tokenizer import StreamingDetokenizer


FINISHED = object()  # the end of a request's event stream (a Row's handle gets it when the row closes)


class Row:
    """One sequence of a batch: its prompt, sampler, detokenizer and stop strings, its stats, and
    where its text goes (`handle`, a kvrt.serving.engine.Handle, or None to keep only `text`)."""

    def __init__(self, model, ids: Sequence[int], spec: CacheSpec, params: SamplingParams, max_tokens: int,
                 stop: Sequence[str] = (), handle=None, need: int = 0):
        self.model, self.runtime = model, model.runtime
        self.ids, self.spec, self.params, self.max_tokens = list(ids), spec, params, max_tokens
        self.handle, self.need = handle, need
        self.cache = self.runtime.new_cache(spec)
        self.fed = 0  # prompt tokens prefilled so far
        self.logits = None
        self.sampler = Sampler(params)
        self.history = list(ids)
        self.detok = StreamingDetokenizer(model.tokenizer)
        self.matcher = StopMatcher(stop)
        self.tokens: list[int] = []  # every sampled token (an end-of-sequence one included)
        self.pieces: list[str] = []
        self.generated = 0  # tokens of text
        self.last = None  # the token the next decode step feeds
        self.finish_reason: str | None = None
        self.stats = GenerationStats(prompt_tokens=len(self.ids))
        self._prefill_seconds = 0.0
        self._t_first = self._t_last = 0.0

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    # --- prefill ---------------------------------------------------------------------
    def prefill(self, chunk: int) -> bool:
        """Feed the next `chunk` prompt tokens; True once the whole prompt is in. The cache compresses
        after the last chunk only (KVCache.hold), which is never shorter than the eviction method's
        observation window, so a prompt in chunks compresses exactly as a whole one."""
        start = time.perf_counter()
        remaining = len(self.ids) - self.fed
        last = max(chunk, getattr(self.cache.layers[0].eviction, "window", 0))
        end = self.fed + (remaining if remaining < chunk + last else chunk)
        self.cache.hold(end < len(self.ids))
        self.logits = self.runtime.forward(self.ids[self.fed : end], self.cache)
        self.fed = end
        self._prefill_seconds += time.perf_counter() - start
        return end == len(self.ids)

    def start(self) -> bool:
        """Sample the first token from the prompt's logits; True when that already finished the row."""
        return self.accept(self.sampler(self.runtime.ops, self.logits[-1], self.history))

    def batch_key(self) -> tuple:
        """Rows with equal keys share a batched cache: those of one cache spec (apart, the rare rows
        whose eviction has not yet fixed its budgets: a one-token prompt under a quantized spec)."""
        return str(self.spec), self.cache.layers[0].budget is None

    def nbytes(self) -> int:
        return self.cache.nbytes() if self.cache is not None else 0

    # --- tokens ------------------------------------------------------------------------
    def accept(self, token: int) -> bool:
        """Take a sampled token and emit its text; True when the row has finished (then `close` it)."""
        self._t_last = time.perf_counter()
        self._t_first = self._t_first or self._t_last
        if self.handle is not None and self.handle.first_token_at is None:
            self.handle.first_token_at = self._t_last
        self.history.append(token)
        self.tokens.append(token)
        if token in self.model.tokenizer.eos_token_ids:
            return self.finish("eos")
        self.generated += 1
        self.last = token
        self.emit(self.matcher.push(self.detok.add_token(token)))
        if self.matcher.stopped:
            return self.finish("stop")
        if self.generated >= self.max_tokens:
            return self.finish("length")
        return self.cancelled() and self.finish("cancelled")

    def emit(self, piece: str) -> None:
        if piece:
            self.pieces.append(piece)
            if self.handle is not None:
                self.handle._events.put(piece)

    def cancelled(self) -> bool:
        return self.handle is not None and self.handle.cancelled

    def finish(self, reason: str) -> bool:
        """Stop the row ("eos", "stop", "length" or "cancelled"); its last text is emitted now."""
        if reason != "cancelled":
            tail = self.matcher.push(self.detok.finalize())
            self.emit(tail + ("" if self.matcher.stopped else self.matcher.flush()))
        self.finish_reason = reason
        return True

    def close(self) -> None:
        """After the row has left its batch: fill in its stats from its own cache, free the cache
        and tell the handle. OpenAI's finish reasons name an end-of-sequence token "stop" too."""
        stats = self.stats
        stats.finish_reason = self.finish_reason or "interrupted"
        stats.generation_tokens = self.generated
        stats.prompt_tps = self.fed / max(self._prefill_seconds, 1e-9)
        if self.generated > 1:
            stats.generation_tps = (self.generated - 1) / max(self._t_last - self._t_first, 1e-9)
        if self.cache is not None:
            stats.kv_bytes, stats.cache = self.cache.nbytes(), self.cache.stats()
            stats.kv_host_bytes = self.cache.host_nbytes()
        stats.peak_memory_bytes = self.runtime.peak_memory_bytes()
        self.cache = None
        if self.handle is not None:
            reason = "stop" if self.finish_reason == "eos" else self.finish_reason
            self.handle.completion_tokens, self.handle.finish_reason = self.generated, reason
            self.handle.kv_bytes, self.handle.finished_at = stats.kv_bytes, time.perf_counter()
            self.handle._events.put(FINISHED)

    def fail(self, exc: BaseException) -> None:
        self.cache = None
        if self.handle is not None:
            self.handle.finish_reason = "error"
            self.handle._events.put(exc if isinstance(exc, KvrtError) else KvrtError(f"generation failed: {exc}"))


class Batch:
    """Rows decoded together: one batched cache, one model call per step for all of them."""

    def __init__(self, model, rows: list[Row]):
        self.model, self.runtime = model, model.runtime
        self.rows: list[Row] = []
        self.cache = None
        for row in rows:
            self.join(row)

    def __len__(self) -> int:
        return len(self.rows)

    def join(self, row: Row) -> None:
        """Add a prefilled row: its one-row cache is stacked under the batch's (and then dropped)."""
        self.cache = row.cache if self.cache is None else stack_caches([self.cache, row.cache])
        row.cache = None
        self.rows.append(row)

    def leave(self, rows: list[Row]) -> None:
        """Take finished rows out and close them; each takes its own rows of the cache along (its
        stats measure them), and their memory goes with them."""
        for row in rows:
            row.cache = self.cache.take([self.rows.index(row)])
        stay = [i for i, r in enumerate(self.rows) if r not in rows]
        self.cache = self.cache.take(stay) if stay else None
        self.rows = [self.rows[i] for i in stay]
        for row in rows:
            row.close()

    def nbytes(self) -> int:
        return 0 if self.cache is None else self.cache.nbytes()

    def step(self) -> list[Row]:
        """One decode step for every row; returns the rows that finished (they have left the batch)."""
        logits = self.runtime.decode([row.last for row in self.rows], self.cache)
        finished = [row for i, row in enumerate(self.rows)
                    if row.accept(row.sampler(self.runtime.ops, logits[i], row.history))]
        if finished:
            self.leave(finished)
        return finished


def generate_rows(model, rows: Sequence[Row], max_batch: int = 8, prefill_chunk: int = 512) -> None:
    """Run rows to the end on this thread, at most `max_batch` at once: each is prefilled alone,
    then joins the batch of its spec; as rows finish, waiting ones take their place."""
    waiting = list(rows)[::-1]
    batches: dict[tuple, Batch] = {}
    while waiting or batches:
        while waiting and sum(len(b) for b in batches.values()) < max_batch:
            row = waiting.pop()
            while not row.prefill(prefill_chunk):
                pass
            key = row.batch_key()
            if row.start():
                row.close()
            elif key in batches:
                batches[key].join(row)
            else:
                batches[key] = Batch(model, [row])
        for key, batch in list(batches.items()):
            batch.step()
            if not batch.rows:
                del batches[key]
