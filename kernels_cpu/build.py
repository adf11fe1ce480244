"""Build the CPU kernels once per machine with the system C compiler, and load them with ctypes.

The C sources ship with kvrt; the first use compiles them (about a second) for this CPU
(`-march=native`, OpenMP where the compiler has it) into kvrt's cache folder, keyed by the sources,
the compiler and the CPU, so a later process loads the library directly. Where no compiler works,
kvrt says so in one warning line and every op takes its reference twin. `CC` picks the compiler.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

HERE = Path(__file__).parent
SOURCES = ("decode.c", "calidrop.c")
HEADERS = ("common.h",)
# -march=native: the kernels are built where they run; -fopenmp-simd: vector reductions without fast-math
BASE_FLAGS = ["-O3", "-shared", "-fPIC", "-std=gnu11", "-fopenmp-simd", "-Wno-psabi"]
TRIES = (["-march=native", "-fopenmp"], ["-march=native"], [])

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_failure: str | None = None


def _cpu_id() -> str:
    """What the compiled code depends on besides its sources: the machine and its instruction sets."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()} {flags}"


def _cache_dir() -> Path:
    from kvrt.models.store import kvrt_home

    folder = kvrt_home() / "kernels"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    except OSError:  # an unwritable KVRT_HOME: build per process instead
        return Path(tempfile.mkdtemp(prefix="kvrt-kernels-"))


def _compile(compiler: str, target: Path) -> str | None:
    """Compile into `target` (atomically); None on success, else the compiler's first error line."""
    error = "no compile attempted"
    for extra in TRIES:
        with tempfile.TemporaryDirectory(dir=target.parent) as work:
            out = Path(work) / target.name
            command = [compiler, *BASE_FLAGS, *extra, "-o", str(out), *(str(HERE / s) for s in SOURCES)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode == 0:
                os.replace(out, target)
                return None
            lines = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.splitlines() or [""]
            error = lines[0].strip()
    return error


def _build() -> ctypes.CDLL:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not compiler:
        raise OSError("no C compiler found (set CC)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    digest = hashlib.sha256()
    for name in SOURCES + HEADERS:
        digest.update((HERE / name).read_bytes())
    digest.update(f"{version}\n{BASE_FLAGS}{TRIES}\n{_cpu_id()}".encode())
    target = _cache_dir() / f"kvrt_cpu_{digest.hexdigest()[:16]}.so"
    if not target.exists():
        error = _compile(compiler, target)
        if error is not None:
            raise OSError(f"{compiler} failed: {error}")
    return ctypes.CDLL(str(target))


def library() -> ctypes.CDLL | None:
    """The CPU kernels, built on first use; None (after one warning line) where they cannot be built."""
    global _library, _failure
    if _library is not None or _failure is not None:
        return _library
    with _lock:
        if _library is None and _failure is None:
            try:
                _library = _build()
            except OSError as exc:
                _failure = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                print(f"kvrt: warning: CPU kernels unavailable ({_failure}); using the reference ops path",
                      file=sys.stderr)
    return _library
