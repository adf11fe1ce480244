"""The Metal sources and the mx.fast.metal_kernel objects built from them.

Each kernel body lives in `<name>.metal` (the body only: mx.fast.metal_kernel writes the signature from
the input and output names below, the arrays' dtypes and the template), with `common.metal` as the shared
header. The same files feed the C++ checks in tests/kernels/test_kernels_metal.py, so there is one source of truth.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

HERE = Path(__file__).resolve().parent
HEADER = "common"


@dataclass(frozen=True)
class Kernel:
    name: str  # the .metal file holding the body
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    # strided: built with ensure_row_contiguous=False, so MLX passes every input as it lies (a view's own
    # buffer and offset) and the body indexes each array through `<name>_strides`; otherwise MLX first copies
    # every input that is not row-contiguous, and the body indexes them as dense row-major arrays
    strided: bool = False


KERNELS = {k.name: k for k in (
    Kernel("quantized_decode", ("q", "kc", "ks", "kz", "vc", "vs", "vz", "bias", "lengths", "meta", "qscale"),
           ("out", "lse"), strided=True),
    Kernel("decode", ("q", "keys", "values", "bias", "lengths", "meta", "qscale"), ("out", "lse"), strided=True),
    Kernel("quantize_keys", ("k", "traced", "meta"), ("codes", "scales", "zeros")),
    Kernel("quantize_values", ("v", "meta"), ("codes", "scales", "zeros")),
    Kernel("window_lse", ("q", "k", "meta", "qscale"), ("lse",), strided=True),
    Kernel("window_scores", ("q", "k", "lse", "meta", "qscale"), ("out",), strided=True),
)}

_built: dict = {}


def source(name: str) -> str:
    """The text of `<name>.metal`."""
    return (HERE / f"{name}.metal").read_text()


def build(name: str):
    """The mx.fast.metal_kernel for `name`, built once (a new build JIT-compiles a new Metal library)."""
    maker = mx.fast.metal_kernel
    key = (name, maker)  # keyed by the maker too, so a test's stand-in never meets a cached real kernel
    if key not in _built:
        spec = KERNELS[name]
        _built[key] = maker(name=f"kvrt_{name}", input_names=list(spec.inputs), output_names=list(spec.outputs),
                            source=source(name), header=source(HEADER), ensure_row_contiguous=not spec.strided)
    return _built[key]


def launch(name: str, inputs: list, template: list, grid: tuple, threadgroup: tuple, outputs: list) -> list:
    """Run kernel `name`: `outputs` is a list of (shape, dtype); returns the output arrays."""
    return build(name)(inputs=inputs, template=template, grid=grid, threadgroup=threadgroup,
                       output_shapes=[tuple(s) for s, _ in outputs], output_dtypes=[d for _, d in outputs])


def meta(*values: int) -> mx.array:
    """Small int32 run-time parameters (lengths, offsets); mx passes arrays under 8 elements as `constant`."""
    return mx.array(list(values), dtype=mx.int32)


def scalar(value: float) -> mx.array:
    return mx.array([value], dtype=mx.float32)


def row_lengths(lengths, b: int) -> mx.array:
    """Per-row lengths as the decode kernels read them: int32 [B] (read through its stride, so a view is fine)."""
    if tuple(lengths.shape) != (b,):
        raise ValueError(f"lengths must have shape [{b}] (one per batch row), got {list(lengths.shape)}")
    return lengths if lengths.dtype == mx.int32 else lengths.astype(mx.int32)


def placeholder(dtype) -> mx.array:
    """A one-element stand-in for an absent optional input (bias, lengths, traced); the template flag keeps it
    unread."""
    return mx.zeros((1,), dtype=dtype)
