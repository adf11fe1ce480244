"""Choosing a backend and loading a model folder into it."""

from __future__ import annotations

import importlib.util
import platform
import sys
from pathlib import Path

from kvrt.errors import KvrtError

BACKENDS = ("auto", "torch", "mlx")
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float16": "float16", "fp16": "float16"}


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def pick_backend(requested: str = "auto") -> str:
    """auto: MLX on Apple Silicon, else torch (CUDA when there is an NVIDIA GPU, CPU otherwise). Off
    Apple Silicon, auto never picks MLX: its CPU backend prefills the default model at ~10 tokens/s,
    so it runs there only when asked for (`--backend mlx`: tests, checking what a Mac will run)."""
    if requested not in BACKENDS:
        raise KvrtError(f"unknown backend '{requested}'; choose one of: {', '.join(BACKENDS)}")
    if requested != "auto":
        return requested
    apple_silicon = sys.platform == "darwin" and platform.machine() == "arm64"
    if apple_silicon and installed("mlx_lm"):
        return "mlx"
    if installed("torch"):
        return "torch"
    if apple_silicon:
        raise KvrtError("no backend installed: pip install 'kvrt[mlx]' (or 'kvrt[torch]')")
    raise KvrtError("no backend for this machine: pip install 'kvrt[torch]' (MLX runs off Apple Silicon only "
                    "when asked for, with --backend mlx, and slowly)")


def load_runtime(folder: Path, backend: str = "auto", dtype: str | None = None, quantize_gguf: bool = True):
    """A backend runtime (see kvrt.models.runtime.Runtime) holding the model in `folder`. On MLX, the weights a
    GGUF held quantized load as MLX-quantized layers unless `quantize_gguf` is False (then as the
    converted floats, as torch always runs them)."""
    backend = pick_backend(backend)
    if dtype is not None:
        if dtype not in DTYPE_NAMES:
            raise KvrtError(f"unknown dtype '{dtype}'; choose one of: float32, bfloat16, float16")
        dtype = DTYPE_NAMES[dtype]
    if backend == "torch":
        if not installed("torch"):
            raise KvrtError("the torch backend needs torch: pip install 'kvrt[torch]'")
        from kvrt.backends.torch.runtime import TorchRuntime

        return TorchRuntime(folder, dtype=dtype)
    if not installed("mlx_lm"):
        raise KvrtError("the mlx backend needs mlx and mlx-lm: pip install 'kvrt[mlx]'")
    from kvrt.backends.mlx.runtime import MLXRuntime

    return MLXRuntime(folder, dtype=dtype, quantize_gguf=quantize_gguf)
