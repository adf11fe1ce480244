"""Continuous batching over compressed caches: the engine behind `kvrt serve`.

One background thread owns the model. Each turn of its loop it admits waiting requests
while their KV fits the memory budget, runs one prefill chunk of the oldest admitted
request (so running decodes never wait longer than one chunk), and then one decode step
for every running row. A request's cache is prefilled alone; it then joins the batch of
its cache spec (kvrt.generation.batch: rows with the same spec and per-layer budgets share one
batched cache) and leaves it when it finishes or its client goes away.

Admission is by KV bytes: a request is admitted only while the bytes reserved by the
running ones (each the larger of what its cache holds now and what its spec will need at
its longest, `kvrt.cache.admission.kv_bytes_needed`) plus its own need fit `kv_memory`. The rest wait
in a bounded FIFO; beyond it `submit` raises QueueFull (HTTP 429).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from kvrt.cache.admission import kv_bytes_needed
from kvrt.generation.batch import FINISHED, Batch, Row
from kvrt.errors import InvalidValue, KvrtError
from kvrt.generation.sampling import SamplingParams
from kvrt.cache.spec import CacheSpec


class QueueFull(KvrtError):
    """Every running slot is taken and the waiting queue is full (HTTP 429)."""


@dataclass
class Handle:
    """One request as its caller sees it: text pieces as they are decoded (iterate), then the totals."""

    id: int
    prompt_tokens: int
    spec: CacheSpec
    completion_tokens: int = 0
    finish_reason: str | None = None  # "stop", "length" or "cancelled" once finished
    kv_bytes: int = 0  # what the request's cache held at its end
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
        """Stop generating (the client went away): the engine frees the row at its next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


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
                 max_queue: int = 64, prefill_chunk: int = 256):
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1:
            raise InvalidValue("max_batch and prefill_chunk must be >= 1 and max_queue >= 0")
        self.model = model
        self.spec = CacheSpec.parse(cache)
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.kv_memory = kv_memory
        self.waiting: deque[Row] = deque()
        self.prefilling: deque[Row] = deque()
        self.batches: dict[tuple, Batch] = {}
        self.counters = Counters()
        self._ids = 0
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False

    # --- the caller's side (any thread) -------------------------------------------------
    def submit(self, ids: Sequence[int], *, max_tokens: int = 256, params: SamplingParams | None = None,
               cache: str | CacheSpec | None = None, stop: Sequence[str] = ()) -> Handle:
        """Queue a request; raises InvalidValue for a bad one, QueueFull when the queue is full."""
        ids = list(ids)
        if not ids:
            raise InvalidValue("the prompt has no tokens")
        if max_tokens < 1:
            raise InvalidValue(f"max_tokens must be >= 1, got {max_tokens}")
        context = self.model.context_length
        if context and len(ids) + max_tokens > context:
            raise InvalidValue(f"the prompt is {len(ids)} tokens and {max_tokens} more are asked for, but the "
                               f"model's context is {context}")
        spec = self.spec if cache is None else CacheSpec.parse(cache)
        runtime = self.model.runtime
        need = kv_bytes_needed(runtime, spec, len(ids), max_tokens, self.prefill_chunk)
        if self.kv_memory is not None and need > self.kv_memory:
            raise InvalidValue(f"this request needs {need} bytes of KV cache at {spec} but --kv-memory is "
                               f"{self.kv_memory}")
        with self._wake:
            self._ids += 1
            handle = Handle(self._ids, len(ids), spec)
            row = Row(self.model, ids, spec, params or SamplingParams(), max_tokens, stop, handle, need)
            self.waiting.append(row)
            self._admit()  # admitted now if it fits; else it waits, if the queue has room
            if len(self.waiting) > self.max_queue:
                self.waiting.pop()
                self.counters.requests_rejected += 1
                raise QueueFull(f"server busy: {self.max_queue} requests already wait; retry later")
            self._wake.notify()
        return handle

    def metrics(self) -> dict:
        """What /metrics reports: rows running and waiting, KV bytes in use and the budget, tokens/s."""
        with self._wake:
            running = sum(len(b) for b in self.batches.values()) + len(self.prefilling)
            kv = self._held()
            prompt_tps, generation_tps = self.counters.rates()
            return {"running": running, "waiting": len(self.waiting), "kv_bytes": kv,
                    "kv_budget_bytes": self.kv_memory or 0, "kv_reserved_bytes": self._reserved(),
                    "prompt_tokens_total": self.counters.prompt_tokens,
                    "generation_tokens_total": self.counters.generation_tokens,
                    "requests_finished_total": self.counters.requests_finished,
                    "requests_rejected_total": self.counters.requests_rejected,
                    "prompt_tokens_per_second": prompt_tps, "generation_tokens_per_second": generation_tps}

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

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- the engine thread ----------------------------------------------------------------
    def _rows(self) -> list[Row]:
        return [r for b in self.batches.values() for r in b.rows] + list(self.prefilling)

    def _reserved(self, extra: Row | None = None) -> int:
        """KV bytes the admitted rows (and `extra`) may come to hold: a batch is rectangular, so each
        of its rows is reserved at its longest row's need; never less than the caches hold now."""
        rows = self._rows() + ([extra] if extra is not None else [])
        keys: dict = {}
        for row in rows:
            keys.setdefault(str(row.spec), []).append(row.need)
        projected = sum(len(needs) * max(needs) for needs in keys.values())
        return max(projected, self._held())

    def _held(self) -> int:
        """KV bytes the running caches hold now (batches and prefills)."""
        return sum(b.nbytes() for b in self.batches.values()) + sum(r.nbytes() for r in self.prefilling)

    def _room_for(self, row: Row) -> bool:
        if len(self._rows()) >= self.max_batch:
            return False
        return self.kv_memory is None or self._reserved(row) <= self.kv_memory

    def _loop(self) -> None:
        while True:
            with self._wake:
                self._admit()
                while not (self._stop or self.prefilling or self.batches):
                    self._wake.wait()
                    self._admit()
                if self._stop:
                    break
            self._turn()
        for row in self._rows() + list(self.waiting):
            row.fail(KvrtError("the server is shutting down"))

    def _admit(self) -> None:
        while self.waiting and self._room_for(self.waiting[0]):
            self.prefilling.append(self.waiting.popleft())
        for row in [r for r in self.waiting if r.handle is not None and r.handle.cancelled]:
            self.waiting.remove(row)
            row.finish("cancelled")
            row.close()

    def _turn(self) -> None:
        """One prefill chunk (the oldest admitted request), then one decode step of every batch."""
        if self.prefilling:
            row = self.prefilling[0]
            fed = row.fed
            try:
                done = row.cancelled() or row.prefill(self.prefill_chunk)
                with self._wake:
                    self.counters.add(row.fed - fed, 0)  # prompt tokens count as they are prefilled
            except Exception as exc:  # a failure belongs to this request, never the server
                with self._wake:
                    self.prefilling.popleft()
                row.fail(exc)
                done = False
            if done:
                with self._wake:
                    self.prefilling.popleft()
                    self._after_prefill(row)
        for key, batch in list(self.batches.items()):
            stepped = len(batch)
            try:
                finished = batch.step()
            except Exception as exc:
                finished = []
                for row in batch.rows:
                    row.fail(exc)
                batch.rows.clear()
            with self._wake:
                self.counters.add(0, stepped)
                self.counters.requests_finished += len(finished)
                if not batch.rows:
                    del self.batches[key]

    def _after_prefill(self, row: Row) -> None:
        if row.cancelled():
            row.finish("cancelled")
            row.close()
            return
        finished = row.start()  # the first token may already finish it
        self.counters.add(0, row.generated)
        if finished:
            row.close()
            self.counters.requests_finished += 1
            return
        key = row.batch_key()
        if key in self.batches:
            self.batches[key].join(row)
        else:
            self.batches[key] = Batch(self.model, [row])
