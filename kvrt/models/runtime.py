"""What a backend runtime provides (backends/torch/runtime.py, backends/mlx/runtime.py), and the
checks and readings every runtime shares."""

from __future__ import annotations

import resource
import sys
from typing import Callable, Protocol, Sequence

from kvrt.errors import InvalidValue


class Runtime(Protocol):
    """A model on a backend. `forward` may be called from several threads: each runtime runs one
    forward at a time (its lock), and every other piece of state a call touches (its cache, its
    stats) is its own. `progress(done, total)` is called as the model's layers finish a chunk."""

    backend: str
    ops: object
    windows: list  # per layer, the sliding window of a local layer, or None for a global one

    def new_cache(self, spec="full"): ...
    def forward(self, ids: list[int], cache, all_logits: bool = False,
                progress: Callable[[int, int], None] | None = None): ...
    def decode(self, tokens: list[int], cache): ...
    def synchronize(self) -> None: ...
    def peak_memory_bytes(self) -> int: ...


def check_token_ids(ids: Sequence[int], vocab_size: int | None) -> None:
    """What every runtime's forward refuses: no tokens, or ids outside the vocabulary."""
    if not ids:
        raise InvalidValue("a forward needs at least one token id")
    if vocab_size and not all(0 <= i < vocab_size for i in ids):
        raise InvalidValue(f"token ids must lie in [0, {vocab_size}); got {min(ids)}..{max(ids)}")


def peak_rss_bytes() -> int:
    """The process's peak resident memory (ru_maxrss is bytes on macOS, KiB on Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
