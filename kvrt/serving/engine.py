"""Continuous batching over compressed caches: the engine behind `kvrt serve`.

One background thread owns the model and runs the one scheduler (kvrt.generation.scheduler) turn
after turn: each turn admits waiting requests while their KV fits the memory budget, prefills one
chunk of the oldest admitted request (so running decodes never wait longer than one chunk), and
then steps every batch once. A request leaves its batch when it finishes or its client goes away.

Admission is by KV bytes: a request is admitted only while the bytes reserved by the
running ones (each the larger of what its cache holds now and what its spec will need at
its longest, `kvrt.cache.admission.kv_bytes_needed`) plus its own need, plus the prompt cache's
entries, fit `kv_memory`; entries of the prompt cache are dropped, least recently used first, before a
request is made to wait. The rest wait in a bounded FIFO; beyond it `submit` raises QueueFull (HTTP 429).

An admitted request starts from the prompt cache's best entry for its tokens, and a request that
ends well leaves its cache there (kvrt.serving.prompt_cache).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from kvrt.cache.admission import kv_bytes_needed
from kvrt.cache.spec import CacheSpec
from kvrt.errors import InvalidValue, KvrtError
from kvrt.generation.request import Request
from kvrt.generation.sampling import SamplingParams
from kvrt.generation.scheduler import Scheduler
from kvrt.serving.prompt_cache import DEFAULT_BYTES, PromptCache

FINISHED = object()  # the end of a request's event stream


class QueueFull(KvrtError):
    """Every running slot is taken and the waiting queue is full (HTTP 429)."""


@dataclass
class Handle:
    """One request as its caller sees it: text pieces as they are decoded (iterate), then the totals.
    The engine thread tells it what happens (kvrt.generation.request.Listener)."""

    id: int
    prompt_tokens: int
    spec: CacheSpec
    completion_tokens: int = 0
    finish_reason: str | None = None  # "stop", "length" or "cancelled" once finished
    kv_bytes: int = 0  # what the request's cache held at its end
    cached_tokens: int = 0  # prompt tokens the prompt cache held already (not prefilled again)
    tokens: list[int] = field(default_factory=list)  # the ids sampled, once finished (an end-of-sequence one too)
    scores: list = field(default_factory=list)  # with logprobs: per token sampled, a generation.logprobs.TokenLogprob
    prompt_scores: list = field(default_factory=list)  # with prompt logprobs: per prompt token after the first
    submitted: float = field(default_factory=time.perf_counter)  # perf_counter times: latency, time to first token
    first_token_at: float | None = None
    finished_at: float | None = None
    _events: queue.Queue = field(default_factory=queue.Queue, repr=False)
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)

    def __iter__(self) -> Iterator[str]:
        while True:
            piece = self.next()
            if piece is None:
                return
            yield piece

    def next(self, timeout: float | None = None) -> str | None:
        """The next text piece, or None when the request has finished (raises what the engine hit)."""
        item = self._events.get(timeout=timeout)
        if item is FINISHED:
            self._events.put(FINISHED)  # later calls see the end too
            return None
        if isinstance(item, BaseException):
            self._events.put(FINISHED)
            raise item
        return item

    def text(self) -> str:
        return "".join(self)

    def cancel(self) -> None:
        """Stop generating (the client went away): the engine frees the request at its next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    # --- what the engine thread tells it ---------------------------------------------------
    def piece(self, text: str) -> None:
        self._events.put(text)

    def finished(self, request: Request) -> None:
        """OpenAI's finish reasons name an end-of-sequence token "stop" too."""
        reason = request.stats.finish_reason
        self.completion_tokens, self.finish_reason = request.generated, "stop" if reason == "eos" else reason
        self.kv_bytes, self.first_token_at = request.stats.kv_bytes, request.first_token_at
        self.tokens, self.scores, self.prompt_scores = request.tokens, request.scores, request.prompt_scores
        self.finished_at = time.perf_counter()
        self._events.put(FINISHED)

    def failed(self, exc: BaseException) -> None:
        self.finish_reason = "error"
        self._events.put(exc if isinstance(exc, KvrtError) else KvrtError(f"generation failed: {exc}"))


@dataclass
class Counters:
    """Totals since start, for /metrics (tokens/s are averaged over a recent window)."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    requests_finished: int = 0
    requests_rejected: int = 0
    window: deque = field(default_factory=lambda: deque(maxlen=512))  # (time, prompt tokens, generated tokens)

    def add(self, prompt: int, generated: int) -> None:
        self.prompt_tokens += prompt
        self.generation_tokens += generated
        self.window.append((time.monotonic(), prompt, generated))

    def rates(self, span: float = 10.0) -> tuple[float, float]:
        """(prompt tokens/s, generation tokens/s) over the last `span` seconds."""
        now = time.monotonic()
        recent = [(t, p, g) for t, p, g in self.window if now - t <= span]
        if not recent:
            return 0.0, 0.0
        elapsed = max(now - recent[0][0], 1e-3) if len(recent) > 1 else span
        return sum(p for _, p, _ in recent) / elapsed, sum(g for _, _, g in recent) / elapsed


class Engine:
    """Serve many requests on one model with continuous batching (see the module docstring)."""

    def __init__(self, model, cache: str | CacheSpec = "full", max_batch: int = 8, kv_memory: int | None = None,
                 max_queue: int = 64, prefill_chunk: int = 256, prompt_cache: int = DEFAULT_BYTES):
        """`prompt_cache`: the prompt cache's bound in bytes (0: none)."""
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1:
            raise InvalidValue("max_batch and prefill_chunk must be >= 1 and max_queue >= 0")
        self.model = model
        self.spec = CacheSpec.parse(cache)
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.kv_memory = kv_memory
        self.prompts = PromptCache(prompt_cache) if prompt_cache > 0 else None
        self.waiting: deque[Request] = deque()
        self.admitted: list[Request] = []  # admitted by a caller's thread; the engine thread starts them
        self.counters = Counters()
        self._ids = 0
        self._wake = threading.Condition()
        self.scheduler = Scheduler(model, prefill_chunk, lock=self._wake)
        self._thread: threading.Thread | None = None
        self._stop = False
        self._turn_started: float | None = None  # monotonic time the running turn began (None: between turns)

    # --- the caller's side (any thread) -------------------------------------------------
    def submit(self, ids: Sequence[int], *, max_tokens: int = 256, params: SamplingParams | None = None,
               cache: str | CacheSpec | None = None, stop: Sequence[str] = (), prompt_cache: bool = True,
               logprobs: int | None = None, prompt_logprobs: bool = False) -> Handle:
        """Queue a request; raises InvalidValue for a bad one, QueueFull when the queue is full.
        `prompt_cache`: whether it may start from, and leave its cache in, the prompt cache (one that
        scores its prompt only leaves it: it must feed every prompt token). `logprobs`,
        `prompt_logprobs` and `max_tokens` 0: see kvrt.generation.request.Request."""
        ids = list(ids)
        if not ids:
            raise InvalidValue("the prompt has no tokens")
        if max_tokens < 0:
            raise InvalidValue(f"max_tokens must be >= 0, got {max_tokens}")
        context = self.model.context_length
        if context and len(ids) + max_tokens > context:
            raise InvalidValue(f"the prompt is {len(ids)} tokens and {max_tokens} more are asked for, but the "
                               f"model's context is {context}")
        spec = self.spec if cache is None else CacheSpec.parse(cache)
        need = kv_bytes_needed(self.model.runtime, spec, len(ids), max_tokens, self.prefill_chunk)
        if self.kv_memory is not None and need > self.kv_memory:
            raise InvalidValue(f"this request needs {need} bytes of KV cache at {spec} but --kv-memory is "
                               f"{self.kv_memory}")
        with self._wake:
            self._ids += 1
            handle = Handle(self._ids, len(ids), spec)
            request = Request(self.model, ids, spec, params or SamplingParams(), max_tokens, stop, listener=handle,
                              logprobs=logprobs, prompt_logprobs=prompt_logprobs)
            request.need = need
            if prompt_cache and self.prompts is not None:
                request.keep = self._keep
            self.waiting.append(request)
            self._admit()  # admitted now if it fits; else it waits, if the queue has room
            if len(self.waiting) > self.max_queue:
                self.waiting.pop()
                self.counters.requests_rejected += 1
                raise QueueFull(f"server busy: {self.max_queue} requests already wait; retry later")
            self._wake.notify()
        return handle

    def metrics(self) -> dict:
        """What /metrics reports: requests running and waiting, KV bytes in use and the budget, tokens/s."""
        with self._wake:
            prompt_tps, generation_tps = self.counters.rates()
            return {"running": self._running(), "waiting": len(self.waiting), "kv_bytes": self.scheduler.held(),
                    "kv_budget_bytes": self.kv_memory or 0, "kv_reserved_bytes": self._reserved(),
                    "prompt_tokens_total": self.counters.prompt_tokens,
                    "generation_tokens_total": self.counters.generation_tokens,
                    "requests_finished_total": self.counters.requests_finished,
                    "requests_rejected_total": self.counters.requests_rejected,
                    "prompt_tokens_per_second": prompt_tps, "generation_tokens_per_second": generation_tps,
                    **(self.prompts or PromptCache(0)).metrics()}

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="kvrt-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    def turn_seconds(self) -> float:
        """How long the engine's current turn has run (0 between turns): a stuck engine keeps growing it."""
        started = self._turn_started
        return 0.0 if started is None else time.monotonic() - started

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- the engine thread ----------------------------------------------------------------
    def _reserved(self, extra: Request | None = None) -> int:
        """KV bytes the admitted requests (and `extra`) may come to hold: a batch is rectangular, so
        each of its rows is reserved at its longest row's need; never less than the caches hold now."""
        requests = self.scheduler.requests() + self.admitted + ([extra] if extra is not None else [])
        keys: dict = {}
        for request in requests:
            keys.setdefault(str(request.spec), []).append(request.need)
        projected = sum(len(needs) * max(needs) for needs in keys.values())
        return max(projected, self.scheduler.held())

    def _room_for(self, request: Request) -> bool:
        """Whether a request fits now; the prompt cache's entries go (least recently used first, the one
        it would continue from last) before it is made to wait."""
        if self._running() >= self.max_batch:
            return False
        if self.kv_memory is None:
            return True
        if self.prompts is None:
            return self._reserved(request) <= self.kv_memory
        spare = self.prompts.find(request.spec, request.prompt_ids)[0] if self._reuses(request) else None
        while self._reserved(request) + self.prompts.nbytes > self.kv_memory:
            if not self.prompts.drop_oldest(spare):
                if spare is None:
                    return False
                spare = None  # only the entry it would continue from is left: that goes too
        return True

    def _keep(self, request: Request) -> None:
        """A request that ended well leaves its cache in the prompt cache (on the engine thread)."""
        with self._wake:
            self.prompts.store(request)

    def _loop(self) -> None:
        while True:
            with self._wake:
                self._admit()
                while not (self._stop or self._running()):
                    self._wake.wait()
                    self._admit()
                if self._stop:
                    break
                self._start_admitted()
            self._turn_started = time.monotonic()
            done = self.scheduler.turn()
            self._turn_started = None
            with self._wake:
                self.counters.add(done.prompt_tokens, done.sampled)  # prompt tokens count as they are prefilled
                self.counters.requests_finished += done.finished
        for request in self.scheduler.requests() + self.admitted + list(self.waiting):
            request.fail(KvrtError("the server is shutting down"))

    def _admit(self) -> None:
        while self.waiting and self._room_for(self.waiting[0]):
            self.admitted.append(self.waiting.popleft())
        for request in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(request)
            request.finish("cancelled")
            request.close()

    def _start_admitted(self) -> None:
        """Hand the admitted requests to the scheduler, each from its prompt cache entry if it has one
        (on the engine thread: MLX arrays belong to the thread that made them)."""
        for request in self.admitted:
            if self._reuses(request):
                request.listener.cached_tokens = self.prompts.attach(request)
            self.scheduler.add(request)
        self.admitted.clear()

    @staticmethod
    def _reuses(request: Request) -> bool:
        """Whether a request starts from the prompt cache: one that uses it, unless it scores its prompt
        (every prompt token must then be fed)."""
        return request.keep is not None and not request.prompt_logprobs

    def _running(self) -> int:
        return len(self.scheduler) + len(self.admitted)
