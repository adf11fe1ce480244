"""Compile kvrt's Metal kernel bodies with g++ and run them on the CPU, as mx.fast.metal_kernel would on a GPU.

`source_for` assembles a kernel the way MLX does (mlx.core.fast.metal_kernel's write_signature: the header, a
`template <...>` line, `[[kernel]] void custom_kernel_<name>...(` with inputs `const device T* name`
(`constant` under 8 elements, `&` for 0-d), each followed, when the body mentions them and the input has an
axis, by `const constant int* name_shape`, `const constant int64_t* name_strides` (element strides) and
`const constant int& name_ndim`, one [[buffer]] each; then outputs `device T* name`, then every thread
attribute whose name occurs in the body, then the body, then the explicit instantiation), behind
tests/kernels/metal_stub.h.
`EmulatedKernel` stands in for mx.fast.metal_kernel: called like the real kernel, it compiles that
source into a shared library (cached per session by the source's hash) with an entry that
tests/kernels/metal_runtime.cpp calls once per GPU thread (each a fiber, switched at barriers and simdgroup
operations), and returns the outputs as mx arrays. Inputs reach the kernel as MLX hands them over: a
kernel built with ensure_row_contiguous=True (the default) gets a row-major copy of every input that is
not row-contiguous, one built with False gets each input as it lies, with the array's own element strides
(read through the buffer protocol, the strides MLX keeps) and a pointer to its first element. Every buffer
sits between guard bands of 0xFF bytes (NaN for floats, -1 for ints): an out-of-bounds read poisons the
result and an out-of-bounds write is reported; outputs start as 0xFF so an unwritten element shows. The
gaps a strided view skips (a capacity buffer's unused rows, the other heads' rows) are 0xFF as well, so a
kernel that ignores an input's strides reads poison.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

HERE = Path(__file__).resolve().parent
STUB = HERE / "metal_stub.h"
RUNTIME = HERE / "metal_runtime.cpp"
GUARD = 4096  # bytes of 0xFF before and after every buffer
CXX = os.environ.get("CXX", "g++")

# MLX's list, in its order: (attribute, Metal type, first slot in the runtime's attribute array)
ATTRIBUTES = [
    ("dispatch_quadgroups_per_threadgroup", "uint", 30),
    ("dispatch_simdgroups_per_threadgroup", "uint", 29),
    ("dispatch_threads_per_threadgroup", "uint3", 23),
    ("grid_origin", "uint3", 31),
    ("grid_size", "uint3", 15),
    ("quadgroup_index_in_threadgroup", "uint", 27),
    ("quadgroups_per_threadgroup", "uint", 28),
    ("simdgroup_index_in_threadgroup", "uint", 20),
    ("simdgroups_per_threadgroup", "uint", 21),
    ("thread_execution_width", "uint", 22),
    ("thread_index_in_quadgroup", "uint", 26),
    ("thread_index_in_simdgroup", "uint", 19),
    ("thread_index_in_threadgroup", "uint", 18),
    ("thread_position_in_grid", "uint3", 0),
    ("thread_position_in_threadgroup", "uint3", 3),
    ("threadgroup_position_in_grid", "uint3", 6),
    ("threadgroups_per_grid", "uint3", 12),
    ("threads_per_grid", "uint3", 15),
    ("threads_per_simdgroup", "uint", 22),
    ("threads_per_threadgroup", "uint3", 9),
]

TYPE_NAME = {mx.float32: "float", mx.float16: "float16_t", mx.bfloat16: "bfloat16_t", mx.int32: "int32_t",
             mx.uint32: "uint32_t", mx.int16: "int16_t", mx.uint16: "uint16_t", mx.int8: "int8_t",
             mx.uint8: "uint8_t", mx.int64: "int64_t", mx.uint64: "uint64_t", mx.bool_: "bool"}


def attributes_used(source: str) -> list[tuple[str, str, int]]:
    """The thread attributes MLX adds to the signature: those whose name occurs anywhere in the body."""
    return [a for a in ATTRIBUTES if a[0] in source]


def template_text(template) -> str:
    """`<float16_t, 128, 1>`: MLX writes dtypes by name, ints in decimal and bools as 1 or 0."""
    parts = []
    for _, value in template:
        if isinstance(value, mx.Dtype):
            parts.append(TYPE_NAME[value])
        else:
            parts.append(str(int(value)))
    return "<" + ", ".join(parts) + ">"


def kernel_name(name: str, template, input_dtypes, input_sizes, input_ndims, output_dtypes) -> str:
    full = "custom_kernel_" + name
    if template:
        text = template_text(template)
        full += "_" + text.replace("<", "_").replace(">", "_").replace(", ", "_")[:-1]
    for dtype, size, ndim in zip(input_dtypes, input_sizes, input_ndims):
        full += "_" + TYPE_NAME[dtype] + ("s" if ndim == 0 else "c" if size < 8 else "")
    for dtype in output_dtypes:
        full += "_" + TYPE_NAME[dtype]
    return full


# What MLX passes after an input whose name + suffix occurs in the body (anywhere, comments too), in this
# order, each in its own [[buffer]]: (suffix, Metal parameter type, numpy dtype of the bytes MLX sets)
SHAPE_INFOS = [("shape", "const constant int*", np.int32), ("strides", "const constant int64_t*", np.int64),
               ("ndim", "const constant int&", np.int32)]


def buffer_slots(input_names, input_ndims, source) -> list[tuple[int, str]]:
    """The kernel's input buffers in [[buffer]] order: (input index, "data" or a SHAPE_INFOS suffix). MLX
    adds an input's shape/strides/ndim only when the input has at least one axis."""
    slots = []
    for i, (n, ndim) in enumerate(zip(input_names, input_ndims)):
        slots.append((i, "data"))
        if ndim > 0:
            slots += [(i, suffix) for suffix, _, _ in SHAPE_INFOS if f"{n}_{suffix}" in source]
    return slots


def source_for(name, input_names, output_names, source, header, template, input_dtypes, input_sizes, input_ndims,
               output_dtypes, atomic_outputs=False) -> tuple[str, str]:
    """(kernel name, the Metal source mx.fast.metal_kernel would compile), behind metal_stub.h."""
    if atomic_outputs:
        raise NotImplementedError("atomic outputs are not emulated")
    fname = kernel_name(name, template, input_dtypes, input_sizes, input_ndims, output_dtypes)
    lines = [f'#include "{STUB}"', header]
    if template:
        kinds = ["typename" if isinstance(v, mx.Dtype) else "bool" if isinstance(v, bool) else "int"
                 for _, v in template]
        lines.append("template <" + ", ".join(f"{k} {n}" for k, (n, _) in zip(kinds, template)) + ">")
    params = []
    slots = buffer_slots(input_names, input_ndims, source)
    for index, (i, kind) in enumerate(slots):
        n = input_names[i]
        if kind == "data":
            space = "constant" if input_sizes[i] < 8 else "device"
            ref = "&" if input_ndims[i] == 0 else "*"
            params.append(f"  const {space} {TYPE_NAME[input_dtypes[i]]}{ref} {n} [[buffer({index})]]")
        else:
            ctype = next(c for suffix, c, _ in SHAPE_INFOS if suffix == kind)
            params.append(f"  {ctype} {n}_{kind} [[buffer({index})]]")
    for j, (n, dtype) in enumerate(zip(output_names, output_dtypes)):
        params.append(f"  device {TYPE_NAME[dtype]}* {n} [[buffer({len(slots) + j})]]")
    params += [f"  {t} {a} [[{a}]]" for a, t, _ in attributes_used(source)]
    lines.append(f"[[kernel]] void {fname}(\n" + ",\n".join(params) + ") {")
    lines.append(source)
    lines.append("}")
    if template:
        inst = fname + template_text(template)
        lines.append(f'template [[host_name("{fname}")]] [[kernel]] decltype({inst}) {inst};')
    return fname, "\n".join(lines) + "\n"


def entry_for(fname, template, input_names, input_dtypes, input_ndims, output_names, output_dtypes, source) -> str:
    """The C entry the runtime calls once per thread: typed buffers and attribute values into the kernel."""
    args = []
    slots = buffer_slots(input_names, input_ndims, source)
    for index, (i, kind) in enumerate(slots):
        if kind == "data":
            cast = f"static_cast<const {TYPE_NAME[input_dtypes[i]]}*>(b[{index}])"
            args.append(f"*{cast}" if input_ndims[i] == 0 else cast)
        elif kind == "strides":
            args.append(f"static_cast<const int64_t*>(b[{index}])")
        else:
            cast = f"static_cast<const int*>(b[{index}])"
            args.append(f"*{cast}" if kind == "ndim" else cast)
    for j, dtype in enumerate(output_dtypes):
        args.append(f"static_cast<{TYPE_NAME[dtype]}*>(b[{len(slots) + j}])")
    for _, t, slot in attributes_used(source):
        args.append(f"uint3{{a[{slot}], a[{slot + 1}], a[{slot + 2}]}}" if t == "uint3" else f"a[{slot}]")
    call = fname + (template_text(template) if template else "")
    return (f'\nextern "C" void kvrt_entry(void** b, const unsigned* a) {{\n  {call}(' + ", ".join(args) + ");\n}\n")


def compile_check(text: str, workdir: Path) -> subprocess.CompletedProcess:
    """g++ -std=c++17 -fsyntax-only over an assembled kernel (Metal's attributes ignored)."""
    path = workdir / (hashlib.sha256(text.encode()).hexdigest()[:16] + "_syntax.cpp")
    path.write_text(text)
    return subprocess.run([CXX, "-std=c++17", "-fsyntax-only", "-Wall", "-Wno-attributes", "-Wno-unused-variable",
                           "-Wno-unknown-pragmas", str(path)], capture_output=True, text=True)


class Toolchain:
    """The per-session build folder, the runtime library, and compiled kernels by source hash."""

    def __init__(self, workdir: Path | None = None):
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="kvrt-metal-"))
        self.libraries: dict[str, ctypes.CDLL] = {}
        runtime = self.workdir / "runtime.so"
        if not runtime.exists():
            self._cxx([str(RUNTIME), "-o", str(runtime)])
        self.runtime = ctypes.CDLL(str(runtime), mode=ctypes.RTLD_GLOBAL)  # kernels resolve kvrt_* here
        self.runtime.kvrt_run_grid.restype = ctypes.c_int

    def _cxx(self, args):
        done = subprocess.run([CXX, "-std=c++17", "-O1", "-shared", "-fPIC", "-Wno-attributes", *args],
                              capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError("g++ failed:\n" + done.stderr[-4000:])

    def library(self, text: str) -> ctypes.CDLL:
        key = hashlib.sha256(text.encode()).hexdigest()[:20]
        if key not in self.libraries:
            src, lib = self.workdir / f"{key}.cpp", self.workdir / f"{key}.so"
            if not lib.exists():
                src.write_text(text)
                self._cxx([str(src), "-o", str(lib)])
            self.libraries[key] = ctypes.CDLL(str(lib))
        return self.libraries[key]


def to_numpy(x: mx.array) -> np.ndarray:
    if x.dtype == mx.bfloat16:
        return np.array(mx.view(x, mx.uint16))
    return np.array(x)


def from_numpy(a: np.ndarray, dtype) -> mx.array:
    if dtype == mx.bfloat16:
        return mx.view(mx.array(a), mx.bfloat16)
    return mx.array(a)


def guarded(nbytes: int) -> np.ndarray:
    """A byte buffer of GUARD + nbytes + GUARD, all 0xFF."""
    return np.full(GUARD + max(nbytes, 1) + GUARD, 0xFF, dtype=np.uint8)


def as_mlx_holds_it(x: mx.array) -> tuple[np.ndarray, list[int]]:
    """x's elements where MLX keeps them (a zero-copy numpy view through the buffer protocol, which exports
    the array's own strides) and those strides in elements: what MLX's array::strides() holds and
    metal_kernel passes as `<name>_strides`. bfloat16 goes through a uint16 view, which keeps the strides."""
    a = np.asarray(mx.view(x, mx.uint16) if x.dtype == mx.bfloat16 else x)
    return a, [s // a.itemsize for s in a.strides]


def row_contiguous(shape, strides) -> bool:
    """MLX's flag (check_contiguity): dense row-major, axes of size 1 ignored whatever their stride."""
    step = 1
    for n, s in zip(reversed(shape), reversed(strides)):
        if n != 1 and s != step:
            return False
        step *= n
    return True


def row_major(shape) -> list[int]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.insert(0, step)
        step *= n
    return strides


def lay_out(a: np.ndarray, strides: list[int]) -> tuple[np.ndarray, int]:
    """(guarded buffer, byte offset of element 0): a's elements at their strides from element 0, as a view's
    pointer and strides address them in MLX's buffer; every byte no element occupies stays 0xFF."""
    item = a.itemsize
    lo = sum((n - 1) * s for n, s in zip(a.shape, strides) if n > 0 and s < 0)
    hi = sum((n - 1) * s for n, s in zip(a.shape, strides) if n > 0 and s > 0)
    count = hi - lo + 1 if a.size else 0
    buf = guarded(count * item)
    if a.size:
        region = buf[GUARD:GUARD + count * item].view(a.dtype)
        view = np.lib.stride_tricks.as_strided(region[-lo:], shape=a.shape, strides=[s * item for s in strides],
                                               writeable=True)
        view[...] = a
    return buf, GUARD - lo * item


class EmulatedKernel:
    """Called like an mx.fast.metal_kernel object; runs the body on the CPU through g++ and the runtime."""

    def __init__(self, toolchain: Toolchain, name, input_names, output_names, source, header="",
                 ensure_row_contiguous=True, atomic_outputs=False, **_):
        self.toolchain, self.name = toolchain, name
        self.input_names, self.output_names = list(input_names), list(output_names)
        self.source, self.header, self.atomic_outputs = source, header, atomic_outputs
        self.ensure_row_contiguous = ensure_row_contiguous
        self.calls = []

    def _input(self, x: mx.array) -> tuple[np.ndarray, list[int]]:
        """The elements and strides the kernel sees: as they lie, unless ensure_row_contiguous makes MLX copy
        a non-row-contiguous input into a fresh row-major array first (custom_kernel.cpp's check_input)."""
        a, strides = as_mlx_holds_it(x)
        if self.ensure_row_contiguous and not row_contiguous(a.shape, strides):
            a = np.ascontiguousarray(a)
            strides = row_major(a.shape)
        return a, strides

    def __call__(self, *, inputs, output_shapes, output_dtypes, grid, threadgroup, template=None, init_value=None,
                 verbose=False, stream=None):
        template = list(template or [])
        inputs = [x if isinstance(x, mx.array) else mx.array(x) for x in inputs]
        dtypes, sizes, ndims = [x.dtype for x in inputs], [x.size for x in inputs], [x.ndim for x in inputs]
        fname, text = source_for(self.name, self.input_names, self.output_names, self.source, self.header, template,
                                 dtypes, sizes, ndims, list(output_dtypes), self.atomic_outputs)
        text += entry_for(fname, template, self.input_names, dtypes, ndims, self.output_names, list(output_dtypes),
                          self.source)
        lib = self.toolchain.library(text)
        laid = [self._input(x) for x in inputs]
        self.calls.append(dict(name=fname, grid=tuple(grid), threadgroup=tuple(threadgroup), template=template,
                               strides={n: s for n, (_, s) in zip(self.input_names, laid)}))
        buffers, pointers, names = [], [], []  # names: what each input buffer holds, for the reports below
        for i, kind in buffer_slots(self.input_names, ndims, self.source):
            a, strides = laid[i]
            if kind == "data":
                buf, at = lay_out(a, strides)
            else:
                value = {"shape": list(a.shape), "strides": strides, "ndim": [a.ndim]}[kind]
                host = np.array(value, dtype=next(d for suffix, _, d in SHAPE_INFOS if suffix == kind))
                buf, at = lay_out(host, [1])
            buffers.append(buf)
            pointers.append(buf.ctypes.data + at)
            names.append(self.input_names[i] + ("" if kind == "data" else "_" + kind))
        before = [buf.copy() for buf in buffers]
        outs = []
        for shape, dtype in zip(output_shapes, output_dtypes):
            count = int(np.prod(shape)) if len(shape) else 1
            buf = guarded(count * dtype.size)
            if init_value is not None:
                host = np.full(count, init_value, dtype=np.float32).astype(to_numpy(mx.zeros(1, dtype=dtype)).dtype)
                buf[GUARD:GUARD + host.nbytes] = host.view(np.uint8)
            outs.append((buf, tuple(shape), dtype, count))
            buffers.append(buf)
            pointers.append(buf.ctypes.data + GUARD)
        pointers = (ctypes.c_void_p * len(buffers))(*pointers)
        g = (ctypes.c_uint * 3)(*grid)
        tg = (ctypes.c_uint * 3)(*threadgroup)
        message = ctypes.create_string_buffer(512)
        entry = ctypes.cast(lib.kvrt_entry, ctypes.c_void_p)
        if self.toolchain.runtime.kvrt_run_grid(entry, pointers, g, tg, message, 512):
            raise RuntimeError(f"{self.name}: {message.value.decode()}")
        for buf in buffers:
            if (buf[:GUARD] != 0xFF).any() or (buf[len(buf) - GUARD:] != 0xFF).any():
                raise RuntimeError(f"{self.name} wrote outside a buffer")
        for buf, old, n in zip(buffers, before, names):
            if not np.array_equal(buf, old):
                raise RuntimeError(f"{self.name} wrote into its input {n}")
        results = []
        for buf, shape, dtype, count in outs:
            npdtype = to_numpy(mx.zeros(1, dtype=dtype)).dtype
            host = buf[GUARD:GUARD + count * dtype.size].view(npdtype).reshape(shape).copy()
            results.append(from_numpy(host, dtype))
        return results


class Recorder:
    """Stands in for mx.fast.metal_kernel without running anything: keeps each call's arguments, returns zeros."""

    def __init__(self):
        self.built, self.calls = [], []

    def __call__(self, name, input_names, output_names, source, header="", ensure_row_contiguous=True, **options):
        self.built.append(dict(name=name, inputs=list(input_names), outputs=list(output_names), source=source,
                               ensure_row_contiguous=ensure_row_contiguous))
        recorder = self

        def call(*, inputs, output_shapes, output_dtypes, grid, threadgroup, template=None, **_):
            recorder.calls.append(dict(name=name, inputs=dict(zip(input_names, inputs)), grid=tuple(grid),
                                       ensure_row_contiguous=ensure_row_contiguous,
                                       threadgroup=tuple(threadgroup), template=dict(template or []),
                                       outputs=[(tuple(s), d) for s, d in zip(output_shapes, output_dtypes)],
                                       source=source))
            return [mx.zeros(s, dtype=d) for s, d in zip(output_shapes, output_dtypes)]

        return call
