"""The one scheduler: requests prefilled in chunks, then decoded together in batches.

A request's prompt is prefilled alone into its own cache; it then joins the `Batch` of its cache
spec: requests whose caches share a spec and per-layer budgets, stacked into one KVCache of B
rows (kvrt.cache.kvcache: per-row lengths, padding masked). Each decode step runs the model once
for all rows, each at its own position, and samples each row with its own sampler; a finished
request leaves the batch and its memory goes with it. A sequence's greedy tokens do not depend on
what runs beside it.

Each `turn` prefills one chunk of the oldest admitted request (so running decodes never wait longer
than one chunk) and then steps every batch once. `kvrt.generation.stream` runs one request as a batch
of one on the caller's thread (Model.generate/stream, chat turns), `run_requests` runs many to the end
there (generate([...]), kvrt eval --batch), and the server's engine thread calls `turn` itself
(kvrt.serving.engine).
"""

from __future__ import annotations

from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Sequence

from kvrt.cache.kvcache import stack_caches
from kvrt.generation.request import Request


class Batch:
    """Requests decoded together: one batched cache, one model call per step for all of them."""

    def __init__(self, model, requests: list[Request], in_place: bool = False):
        self.runtime, self.in_place = model.runtime, in_place
        self.rows: list[Request] = []
        self.cache = None
        for request in requests:
            self.join(request)

    def __len__(self) -> int:
        return len(self.rows)

    def join(self, request: Request) -> None:
        """Add a prefilled request: its one-row cache is stacked under the batch's (and then dropped)."""
        self.cache = request.cache if self.cache is None else stack_caches([self.cache, request.cache])
        request.cache = None
        self.rows.append(request)

    def leave(self, requests: list[Request]) -> None:
        """Take requests out and close them; each takes its own rows of the cache along, cut to its
        length (its stats measure them), and their memory goes with them. `in_place`: a batch of one
        hands its cache back as it is instead (no copy; a chat turn keeps the very cache)."""
        stay = [i for i, r in enumerate(self.rows) if r not in requests]
        for request in requests:
            whole = self.in_place and len(self.rows) == 1
            request.cache = self.cache if whole else self.cache.take([self.rows.index(request)])
        self.cache = self.cache.take(stay) if stay else None
        self.rows = [self.rows[i] for i in stay]
        for request in requests:
            request.close()

    def nbytes(self) -> int:
        return 0 if self.cache is None else self.cache.nbytes()

    def step(self) -> list[Request]:
        """One decode step for every row; returns the requests that finished (they have left)."""
        if len(self.rows) == 1:  # a lone sequence steps as it prefilled: one token through forward
            logits = self.runtime.forward([self.rows[0].last], self.cache)
        else:
            logits = self.runtime.decode([row.last for row in self.rows], self.cache)
        finished = [row for i, row in enumerate(self.rows) if row.accept(logits[i])]
        if finished:
            self.leave(finished)
        return finished


@dataclass
class Turn:
    """What one turn did: prompt tokens prefilled, tokens sampled, requests finished."""

    prompt_tokens: int = 0
    sampled: int = 0
    finished: int = 0


class Scheduler:
    """Admitted requests, prefilling and in batches (see the module docstring). `lock` guards the
    queues and batches when other threads read or add to them (the server's engine); the forwards
    run outside it. A failure belongs to its request (or its batch), never to the others.
    `in_place`: see Batch.leave."""

    def __init__(self, model, prefill_chunk: int | None = 512, lock=None, in_place: bool = False):
        self.model, self.prefill_chunk, self.in_place = model, prefill_chunk, in_place
        self.lock = lock if lock is not None else nullcontext()
        self.prefilling: deque[Request] = deque()
        self.batches: dict[tuple, Batch] = {}

    def add(self, request: Request) -> None:
        self.prefilling.append(request)

    def requests(self) -> list[Request]:
        return [r for b in self.batches.values() for r in b.rows] + list(self.prefilling)

    def __len__(self) -> int:
        return sum(len(b) for b in self.batches.values()) + len(self.prefilling)

    def held(self) -> int:
        """KV bytes the running caches hold now (batches and prefills)."""
        return sum(b.nbytes() for b in self.batches.values()) + sum(r.nbytes() for r in self.prefilling)

    def turn(self) -> Turn:
        """One prefill chunk of the oldest admitted request, then one decode step of every batch."""
        done = Turn()
        if self.prefilling:
            request = self.prefilling[0]
            fed = request.fed
            try:
                complete = request.cancelled or request.prefill(self.prefill_chunk)
            except Exception as exc:
                with self.lock:
                    self.prefilling.popleft()
                request.fail(exc)
                complete = False
            done.prompt_tokens = request.fed - fed
            if complete:
                with self.lock:
                    self.prefilling.popleft()
                    self._start(request, done)
        for key, batch in list(self.batches.items()):
            stepped = len(batch)
            try:
                finished = batch.step()
            except Exception as exc:
                finished = []
                for request in batch.rows:
                    request.fail(exc)
                batch.rows.clear()
            with self.lock:
                done.sampled += stepped
                done.finished += len(finished)
                if not batch.rows:
                    del self.batches[key]
        return done

    def _start(self, request: Request, done: Turn) -> None:
        """A prefilled request samples its first token (which may finish it) and joins its batch."""
        if request.cancelled:
            request.finish("cancelled")
            request.close()
            return
        done.sampled += 1
        if request.start():
            request.close()
            done.finished += 1
            return
        key = request.batch_key()
        if key in self.batches:
            self.batches[key].join(request)
        else:
            self.batches[key] = Batch(self.model, [request], self.in_place)

    def close(self) -> None:
        """Close every request still running as it is ("interrupted": the caller stopped early)."""
        with self.lock:
            for key, batch in list(self.batches.items()):
                try:
                    batch.leave(list(batch.rows))
                except Exception:  # a forward cut short left the batch uneven: its rows go without stats
                    for request in batch.rows:
                        request.cache = None
                        request.close()
                del self.batches[key]
            while self.prefilling:
                self.prefilling.popleft().close()


def run_requests(model, requests: Sequence[Request], max_batch: int = 8, prefill_chunk: int | None = 512) -> None:
    """Run requests to the end on the caller's thread, at most `max_batch` at once: as they finish,
    waiting ones take their place. Raises the first failure once all have ended."""
    waiting = deque(requests)
    scheduler = Scheduler(model, prefill_chunk)
    try:
        while waiting or len(scheduler):
            while waiting and len(scheduler) < max_batch:
                scheduler.add(waiting.popleft())
            scheduler.turn()
    finally:
        scheduler.close()
    failed = next((r.error for r in requests if r.error is not None), None)
    if failed is not None:
        raise failed
