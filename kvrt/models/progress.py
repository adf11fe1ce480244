"""Progress of long work on stderr: one line rewritten in place on a terminal, one line per step in logs.

Nothing shows until the work has run `delay` seconds, so quick work stays quiet; work that
outlasts it shows what is done, how long it took and how long the rest should take.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO


DELAY = 1.0  # seconds of work before progress shows


def quiet(*_) -> None:
    """The log of a caller that asked for none: work given it as its log shows no progress either."""


def duration(seconds: float) -> str:
    """1m05s, 2h03m, 9s."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def byte_count(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


class Progress:
    """`done` of `total` steps of `label`; `advance` or `update` as work finishes, `close` at the end.

    `unit` names a step ("layers", "samples"); `counts` formats a count (e.g. `byte_count`).
    In logs (stderr not a terminal) a line is written each time another `log_every` share of
    the total is done (0: every step; with no known total, every update).
    """

    def __init__(self, label: str, total: int, unit: str = "", *, delay: float | None = None, log_every: float = 0.0,
                 counts: Callable[[float], str] | None = None, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic, enabled: bool = True):
        self.label, self.total, self.unit = label, max(int(total), 0), unit
        self.delay = DELAY if delay is None else delay
        self.log_every, self.counts = log_every, counts or (lambda n: str(int(n)))
        self.stream = stream or sys.stderr
        self.terminal = bool(getattr(self.stream, "isatty", lambda: False)())
        self.clock = clock
        self.start = clock()
        self.done = 0
        self.shown = False  # a line is on the terminal, to be finished by close()
        self.logged, self.logged_done = 0.0, 0  # share and count at the last log line
        self.last_draw = 0.0
        self.enabled = enabled  # False: a caller that asked for silence

    def advance(self, n: int = 1, note: str = "") -> None:
        self.update(self.done + n, note)

    def update(self, done: int, note: str = "", total: int | None = None) -> None:
        """`done` steps so far (`total` may be learnt late, e.g. once the work reports it)."""
        if total is not None:
            self.total = max(int(total), 0)
        self.done = min(int(done), self.total) if self.total else int(done)
        now = self.clock()
        if not self.enabled or (now - self.start < self.delay and not self.shown):
            return  # quick work stays quiet, also when it finishes within the delay
        finished = bool(self.total) and self.done >= self.total
        if self.terminal:
            if finished or now - self.last_draw >= 0.1:
                self.stream.write("\r\033[K" + self.line(now, note))
                self.stream.flush()
                self.shown, self.last_draw = True, now
            return
        share = self.done / self.total if self.total else 0.0
        if self.done > self.logged_done and (not self.total or finished or share - self.logged >= self.log_every):
            self.stream.write(self.line(now, note) + "\n")
            self.stream.flush()
            self.shown, self.logged, self.logged_done = True, share, self.done

    def line(self, now: float, note: str = "") -> str:
        elapsed = now - self.start
        text = f"kvrt: {self.label}: {self.counts(self.done)}" + (f"/{self.counts(self.total)}" if self.total else "")
        text += f" {self.unit}" if self.unit else ""
        if self.total:
            text += f" ({100 * self.done / self.total:.0f}%)"
        text += f", {duration(elapsed)}"
        if 0 < self.done < self.total:
            text += f", ETA {duration(elapsed * (self.total - self.done) / self.done)}"
        return text + (f" | {note}" if note else "")

    def close(self) -> None:
        """End the terminal line (if one was drawn)."""
        if self.terminal and self.shown:
            self.stream.write("\n")
            self.stream.flush()
            self.shown = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
