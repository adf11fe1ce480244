"""Process memory readings shared by the backends' stats."""

import resource
import sys


def peak_rss_bytes() -> int:
    """The process's peak resident memory (ru_maxrss is bytes on macOS, KiB on Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
