"""One request on the caller's thread: its text as it is decoded, with its stats.

`Model.generate/stream` and a ChatSession's turns run here: the one scheduler
(kvrt.generation.scheduler) with a batch of one, the whole prompt in one forward.
"""

from __future__ import annotations

from typing import Iterator

from kvrt.generation.request import Request
from kvrt.generation.scheduler import Scheduler
from kvrt.generation.stats import GenerationStats


class TextStream:
    """One generation's text as it arrives (iterate it), with that generation's own `stats`."""

    def __init__(self, pieces: Iterator[str], stats: GenerationStats):
        self.stats = stats
        self._pieces = pieces

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def text(self) -> str:
        """The rest of the text, all at once."""
        return "".join(self)

    def close(self) -> None:
        """Stop generating; the stats describe the cache as it is."""
        self._pieces.close()


def stream_alone(model, request: Request) -> TextStream:
    """The request's text pieces as they are decoded (nothing runs until the first is asked for)."""
    return TextStream(_pieces(model, request), request.stats)


def _pieces(model, request: Request) -> Iterator[str]:
    """Closed early (a stop the caller found, Ctrl-C), the request closes as it is; a failed forward
    raises here."""
    paths = getattr(model.runtime.ops, "paths", None)
    if paths is not None:
        paths.clear()  # this thread's kernel paths (the stats' "kernels"), from this request on
    scheduler = Scheduler(model, prefill_chunk=None, in_place=True)
    scheduler.add(request)
    sent = 0
    try:
        while len(scheduler):
            scheduler.turn()
            while sent < len(request.pieces):
                sent += 1
                yield request.pieces[sent - 1]
    finally:
        scheduler.close()
    if request.error is not None:
        raise request.error
