"""Metal kernels (kernels_metal) against their reference twins, on a machine without Metal.

mx.fast.metal_kernel runs only on a Metal GPU, so the kernels are checked three ways here:

(a) Syntax: each kernel, assembled exactly as mx.fast.metal_kernel assembles it (header, the generated
    signature with its [[buffer(i)]] and thread attributes, the body, the explicit template
    instantiation), compiles with `g++ -std=c++17 -fsyntax-only -Wall` behind tests/kernels/metal_stub.h, which
    stubs Metal's address-space keywords, vector and half types, as_type, metal:: math, simd_sum/simd_max
    and threadgroup_barrier.
(b) Execution: the same source built by g++ into a shared library and run by tests/kernels/metal_runtime.cpp:
    the threadgroups of the grid one after another; the threads of a group as fibers on one CPU thread
    (ucontext), each running until threadgroup_barrier or a simdgroup operation, which release once every
    thread of the group (lane of the simdgroup) has arrived; threadgroup memory as static storage shared
    by the running group; simd_sum/simd_max an exchange among the 32 lanes of a simdgroup. The threads
    resume in reverse order after each release, so a read of another thread's write that lacks a barrier
    sees stale data deterministically (no std::thread: deterministic, and light on a shared CPU).
    mx.fast.metal_kernel is replaced by the emulator, so the Python wrappers run unchanged (layouts,
    grids, split merge), and their outputs are compared with the MLX reference twins on random inputs
    (bits 2/4/8, head dim 32-128, GQA 1/3/4/7, lengths no split or block multiple, float32, float16 and
    bfloat16, with and without −inf key bias, traced OTT slots, constant groups, batches of rows with per-row
    lengths whose padding is NaN): the quantizers bit-exact, attention and window scores within float
    tolerance. The decode and window kernels are built with ensure_row_contiguous=False and read their
    inputs through `<name>_strides`; their tests hand them the
    cache's arrays as the cache does, views of larger capacity buffers along the token axis (SeqBuffer.view),
    q as a slice or a transpose, and the emulator passes each view as MLX would (its own element strides,
    a pointer to its first element) with every byte the view skips set to 0xFF, so an index that ignores a
    stride reads NaN. Guard bands of 0xFF around every buffer turn an
    out-of-bounds read into NaN and report an out-of-bounds write; outputs start as 0xFF, so an element
    no thread writes shows; a barrier or simd operation after a thread of the group returned is reported.
(c) Dispatch: without Metal (or with KVRT_KERNELS=off) MLXOps takes its reference twins (the quantized
    tier: mx.quantized_matmul, itself checked against the twin); with the kernels forced on, each wrapper
    builds its mx.fast.metal_kernel call with a grid, threadgroup, template and outputs that agree with
    the shapes the kernel source indexes, and the strided kernels receive the cache's views themselves
    (same memory, same strides: no copy on the way, none by MLX).

What this cannot check:
- that Apple's Metal compiler accepts the code: g++ is not the Metal front end. MSL is C++14-based with its
  own rules; the stub erases address spaces, so a device/threadgroup/constant mismatch (a pointer or
  reference into the wrong space, a conditional mixing spaces), a Metal-only type rule or a missing
  metal:: overload passes here. bfloat16_t is emulated as MLX's pre-Metal-3.1 struct, not Metal's `bfloat`.
- the GPU's semantics and numbers: the real SIMD width and lane scheduling (always 32 lanes here), the
  order in which simd_sum adds (a butterfly here), math mode (fast/relaxed), fma contraction, denormal
  flushing, exp/log ulp errors, threadgroup memory limits (32 KB), the pipeline's
  maxTotalThreadsPerThreadgroup (only Metal's 1024 cap is checked), and real concurrency: fibers switch
  only at barriers, so races between threads that do synchronize correctly at those points but rely on
  device-memory ordering or atomics are not exercised. The quantizers' bit-exactness on a GPU rests on
  Metal's default (safe) math mode, where float division is correctly rounded and rint rounds half to
  even, as here.
- that a view is read in place on a Mac: the tests check that each wrapper hands mx.fast.metal_kernel the
  cache's views themselves and builds the kernel with ensure_row_contiguous=False; that MLX's GPU slice then
  shares the buffer (and passes the view's own strides, as its custom_kernel.cpp does) is MLX's behaviour,
  not exercised here.
- performance: nothing here measures speed, occupancy or register pressure.
"""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from metal_emulator import (EmulatedKernel, Recorder, Toolchain, as_mlx_holds_it, compile_check,  # noqa: E402
                            row_contiguous, source_for, to_numpy)

from kvrt.backends.mlx.ops import MLXOps  # noqa: E402
from kvrt.kernels_metal import sources  # noqa: E402
from kvrt.cache.quant import (QuantizedKeys, QuantizedValues, dequantize_keys, dequantize_values,  # noqa: E402
                        mean_substituted, quantize_keys, quantize_values)

pytestmark = pytest.mark.kernels


class ReferenceOps(MLXOps):
    """MLXOps held on its reference twins, whatever a test tells MLXOps about Metal."""

    def kernels_on(self, x=None):
        return False


OPS = ReferenceOps()
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
TOL = {"float32": 2e-5, "float16": 3e-3, "bfloat16": 2e-2}  # out is rounded to q's dtype


@pytest.fixture(scope="session")
def toolchain(tmp_path_factory):
    import shutil

    if shutil.which("g++") is None:
        pytest.skip("g++ is needed to compile the Metal bodies on the CPU")
    return Toolchain(tmp_path_factory.mktemp("metal-build"))


@pytest.fixture
def emulated(toolchain, monkeypatch):
    """mx.fast.metal_kernel replaced by the CPU emulator."""
    monkeypatch.setattr(mx.fast, "metal_kernel", lambda **kw: EmulatedKernel(toolchain, **kw))
    return toolchain


@pytest.fixture
def recorder(monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(mx.fast, "metal_kernel", rec)
    monkeypatch.setattr(MLXOps, "kernels_on", lambda self, x=None: True)
    return rec


def rand(rng, shape, dtype=mx.float32, scale=1.0):
    return mx.array((rng.standard_normal(shape) * scale).astype(np.float32)).astype(dtype)


def close(got, want, tol):
    np.testing.assert_allclose(np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32)), atol=tol, rtol=tol)


def same_bits(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.array_equal(to_numpy(got), to_numpy(want))


def other_rows(rng, shape, dtype):
    """Data unlike any test input: what sits past a view's end in its capacity buffer."""
    if dtype in (mx.int32, mx.uint32):
        return mx.array(rng.integers(-2**31, 2**31 - 1, shape, dtype=np.int64).astype(np.int32)).astype(dtype)
    return rand(rng, shape, dtype, scale=100.0)


def in_capacity(rng, x, extra=13, before=0, axis=-2):
    """x as the cache hands it over: a view of a larger buffer along `axis` (the token axis), with `before`
    and `extra` rows of other data around it, as SeqBuffer.view() slices its capacity (before=0) and
    QuantizedTier.stored slices that view again."""
    axis = axis % x.ndim

    def rows(n):
        shape = list(x.shape)
        shape[axis] = n
        return other_rows(rng, shape, x.dtype)

    buf = mx.concatenate([rows(before), x, rows(extra)], axis=axis)
    mx.eval(buf)
    view = buf[(slice(None),) * axis + (slice(before, before + x.shape[axis]),)]
    assert not row_contiguous(*layout(view)), "a view the kernel could read without its strides"
    return view


def layout(x):
    """(shape, element strides) of x as MLX holds it."""
    a, strides = as_mlx_holds_it(x)
    return a.shape, strides


def address(x) -> int:
    """Where x's first element lies: equal for a view and whatever shares its memory."""
    return as_mlx_holds_it(x)[0].__array_interface__["data"][0]


def passed_as_is(got, view) -> bool:
    """The kernel received `view` itself: the same memory, shape and strides (no copy on the way)."""
    return address(got) == address(view) and layout(got) == layout(view)


def hidden_bias(rng, b, hkv, s, count):
    """float32 [B, Hkv, S]: 0, with −inf on `count` random slots per head (OTT's traced slots)."""
    bias = np.zeros((b, hkv, s), np.float32)
    for i in range(b):
        for h in range(hkv):
            bias[i, h, rng.choice(s, count, replace=False)] = -np.inf
    return mx.array(bias)


def length_bias(lengths, hkv, s, bias=None):
    """float32 [B, Hkv, S]: the key bias equivalent to per-row `lengths` (0 below a row's length, −inf at and
    above), plus `bias`."""
    hidden = np.arange(s)[None, None, :] >= np.array(lengths)[:, None, None]
    out = np.broadcast_to(np.where(hidden, -np.inf, 0.0).astype(np.float32), (len(lengths), hkv, s))
    return mx.array(out) + bias if bias is not None else mx.array(out)


def poison_padding(lengths, x, per=1, fill=np.nan):
    """x with `fill` in each row's padding (token axis 2, from lengths[b] // per on). NaN keys and values: a
    kernel that lets a row's padding into its arithmetic returns NaN; a bias of 0 there shows those keys (a NaN
    or −inf bias would hide them)."""
    a = np.array(x.astype(mx.float32))
    for row, n in enumerate(lengths):
        a[row, :, n // per:] = fill
    return mx.array(a).astype(x.dtype)


def spread(lengths):
    """int32 lengths [B] as a strided view (every other element of a buffer), so the kernel must read them
    through their stride."""
    view = mx.array(np.repeat(np.array(lengths, np.int32), 2))[::2]
    assert layout(view)[1] == [2]
    return view


# --- (a) syntax -------------------------------------------------------------------------------

SYNTAX = {  # kernel: (template, input dtypes: None = the model dtype, output dtypes)
    "quantized_decode": ([("KT", None), ("D", 128), ("ROWS", 4), ("BITS", 2), ("GROUP", 128), ("VGROUP", 128),
                          ("HAS_BIAS", True), ("HAS_LENGTHS", True)],
                         [None, mx.int32, None, None, mx.int32, None, None, mx.float32, mx.int32, mx.int32,
                          mx.float32],
                         [mx.float32, mx.float32]),
    "decode": ([("D", 128), ("ROWS", 8), ("TQ", 2), ("HAS_BIAS", True), ("HAS_LENGTHS", True)],
               [None, None, None, mx.float32, mx.int32, mx.int32, mx.float32], [mx.float32, mx.float32]),
    "quantize_keys": ([("T", None), ("D", 128), ("BITS", 4), ("GROUP", 32), ("HAS_TRACED", True)],
                      [None, mx.bool_, mx.int32], [mx.int32, None, None]),
    "quantize_values": ([("T", None), ("D", 128), ("BITS", 2), ("GV", 32)], [None, mx.int32], [mx.int32, None, None]),
    "window_lse": ([("D", 64), ("W", 8), ("ROWS", 32)], [None, None, mx.int32, mx.float32], [mx.float32]),
    "window_scores": ([("D", 64), ("W", 8), ("ROWS", 32), ("G", 4)], [None, None, mx.float32, mx.int32, mx.float32],
                      [mx.float32]),
}


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("name", sorted(SYNTAX))
def test_each_kernel_compiles_as_mlx_assembles_it(name, dtype, tmp_path):
    template, ins, outs = SYNTAX[name]
    spec, model = sources.KERNELS[name], DTYPES[dtype]
    pick = lambda d: model if d is None else d  # noqa: E731
    template = [(n, pick(v) if v is None or isinstance(v, mx.Dtype) else v) for n, v in template]
    sizes = [3 if n in ("meta", "qscale", "lengths") else 4096 for n in spec.inputs]  # small arrays go to `constant`
    _, text = source_for(f"kvrt_{name}", spec.inputs, spec.outputs, sources.source(name), sources.source("common"),
                         template, [pick(d) for d in ins], sizes, [1] * len(ins), [pick(d) for d in outs])
    done = compile_check(text, tmp_path)
    assert done.returncode == 0 and not done.stderr, done.stderr[-3000:]


def test_only_the_intended_thread_attributes_reach_the_signature():
    """MLX adds every attribute whose name occurs anywhere in the body (comments too)."""
    from metal_emulator import attributes_used

    used = {name: {a for a, _, _ in attributes_used(sources.source(name))} for name in sources.KERNELS}
    assert used["quantized_decode"] == used["decode"] == {"threadgroup_position_in_grid", "thread_index_in_simdgroup"}
    for name in ("quantize_keys", "quantize_values", "window_lse", "window_scores"):
        assert used[name] == {"thread_position_in_grid"}, name


STRIDED = {  # kernel: the inputs its body reads through `<name>_strides` (the rest: small, dense, MLX's own)
    "quantized_decode": {"q", "kc", "ks", "kz", "vc", "vs", "vz", "bias", "lengths"},
    "decode": {"q", "keys", "values", "bias", "lengths"},
    "window_lse": {"q", "k"},
    "window_scores": {"q", "k"},
}


def test_the_strided_kernels_take_every_cache_array_with_its_strides():
    """MLX adds `const constant int64_t* <name>_strides` after an input the body names so (and _shape /
    _ndim likewise); the kernels built with ensure_row_contiguous=False are exactly those reading strides."""
    import re

    for name, spec in sources.KERNELS.items():
        _, text = source_for(f"kvrt_{name}", spec.inputs, spec.outputs, sources.source(name), sources.source("common"),
                             [], [mx.float32] * len(spec.inputs), [4096] * len(spec.inputs), [4] * len(spec.inputs),
                             [mx.float32] * len(spec.outputs))
        strided = set(re.findall(r"const constant int64_t\* (\w+)_strides \[\[buffer", text))
        assert strided == STRIDED.get(name, set()), name
        assert spec.strided == bool(strided), name  # no body indexes an array MLX may hand over as a view
        assert not re.search(r"_(shape|ndim) \[\[buffer", text), name
        slots = [int(i) for i in re.findall(r"\[\[buffer\((\d+)\)\]\]", text)]
        assert slots == list(range(len(spec.inputs) + len(strided) + len(spec.outputs))), name


STRIDED_COPY = """
const uint i = thread_position_in_grid.x;
if (i < uint(x_shape[0] * x_shape[1])) {
  const int r = int(i) / x_shape[1], c = int(i) % x_shape[1];
  out[i] = x_ndim == 2 ? x[r * x_strides[0] + c * x_strides[1]] : -1.0f;
}
"""
FLAT_COPY = """
const uint i = thread_position_in_grid.x;
if (i < 21) {
  out[i] = x[i];
}
"""


def test_the_emulator_hands_inputs_over_as_mlx_does(emulated):
    """ensure_row_contiguous=False: a view as it lies (its element strides, a pointer to its first element,
    the bytes it skips 0xFF); True: a row-major copy of an input that is not row-contiguous."""
    rng = np.random.default_rng(8)
    base = rand(rng, (5, 12))
    x = base[1:4, 2:9]  # starts inside its buffer; rows 12 elements apart
    want = np.array(x).reshape(-1)
    run = dict(inputs=[x], output_shapes=[(21,)], output_dtypes=[mx.float32], grid=(21, 1, 1), threadgroup=(32, 1, 1))
    strided = mx.fast.metal_kernel(name="strided", input_names=["x"], output_names=["out"], source=STRIDED_COPY,
                                   ensure_row_contiguous=False)
    (got,) = strided(**run)
    assert strided.calls[-1]["strides"] == {"x": [12, 1]}
    np.testing.assert_array_equal(np.array(got), want)
    flat = mx.fast.metal_kernel(name="flat", input_names=["x"], output_names=["out"], source=FLAT_COPY,
                                ensure_row_contiguous=False)
    (got,) = flat(**run)
    np.testing.assert_array_equal(np.array(got)[:7], want[:7])  # the first row, then the gap after it
    assert np.isnan(np.array(got)[7:12]).all()
    copied = mx.fast.metal_kernel(name="flat", input_names=["x"], output_names=["out"], source=FLAT_COPY)
    (got,) = copied(**run)
    assert copied.calls[-1]["strides"] == {"x": [7, 1]}
    np.testing.assert_array_equal(np.array(got), want)
    (got,) = strided(**{**run, "inputs": [mx.array(want).reshape(7, 3).T]})  # a transpose: strides [1, 3]
    assert strided.calls[-1]["strides"] == {"x": [1, 3]}
    np.testing.assert_array_equal(np.array(got), want.reshape(7, 3).T.reshape(-1))


# --- (b) execution against the reference twins -----------------------------------------------

DECODE_CASES = [  # bits, d, g (query heads per KV head), hkv, t (queries), dtype, biased
    (2, 64, 1, 2, 1, "float32", False),
    (4, 64, 3, 1, 1, "float32", True),
    (2, 128, 4, 2, 1, "float16", True),
    (4, 128, 7, 1, 2, "float16", False),
    (2, 64, 7, 1, 1, "bfloat16", True),
    (8, 64, 4, 1, 4, "float32", True),
]


@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("bits,d,g,hkv,t,dtype,biased", DECODE_CASES)
def test_quantized_decode_equals_its_reference(emulated, bits, d, g, hkv, t, dtype, biased, ragged):
    """ragged: a batch of 4 rows with per-row lengths in whole groups (full, 0, ending in the second split,
    ending in the third) against the twin given the equivalent key bias; each row's padding has NaN scales
    and zeros (and bias 0), so it must go unread."""
    from kvrt.kernels_metal.quantized_decode import quantized_decode_attention

    rng = np.random.default_rng(bits * 100 + d + g)
    s, dt, b = 112, DTYPES[dtype], 4 if ragged else 2  # 7 groups of 16; 3 splits of 38 tokens, the last one short
    k, v = rand(rng, (b, hkv, s, d), dt), rand(rng, (b, hkv, s, d), dt)
    q = rand(rng, (b, t, hkv * g, d), dt).swapaxes(1, 2)  # as a model lays it out: [B, T, Hq, D] transposed
    keys, values = quantize_keys(OPS, k, bits, 16), quantize_values(OPS, v, bits, 32)
    bias = want_bias = hidden_bias(rng, b, hkv, s, 9) if biased else None
    lengths = [s, 0, 48, 80] if ragged else None
    if ragged:
        want_bias = length_bias(lengths, hkv, s, bias)
    want_out, want_lse = OPS.partial_attention(q, dequantize_keys(OPS, keys), dequantize_values(OPS, values), 0.125,
                                               key_bias=want_bias)
    if ragged:
        keys = QuantizedKeys(keys.codes, poison_padding(lengths, keys.scale, 16),
                             poison_padding(lengths, keys.zero, 16), keys.bits, keys.group, keys.shape)
        values = QuantizedValues(values.codes, poison_padding(lengths, values.scale),
                                 poison_padding(lengths, values.zero), values.bits, values.group, values.shape)
        bias = poison_padding(lengths, bias, fill=0.0) if biased else None
    # the tier's arrays as QuantizedTier.stored hands them over: views of their capacity buffers
    before = 2 if bits == 4 else 0  # stored(first, ...) with first > 0 also starts inside the buffer
    keys = QuantizedKeys(*(in_capacity(rng, x, before=before) for x in (keys.codes, keys.scale, keys.zero)),
                         keys.bits, keys.group, keys.shape)
    values = QuantizedValues(*(in_capacity(rng, x, before=before) for x in (values.codes, values.scale, values.zero)),
                             values.bits, values.group, values.shape)
    bias = in_capacity(rng, bias, axis=-1) if biased else None
    lengths = mx.array(lengths, dtype=mx.int32) if ragged else None
    out, lse = quantized_decode_attention(q, keys, values, 0.125, key_bias=bias, splits=3, lengths=lengths)
    assert out.dtype == dt and out.shape == q.shape and lse.dtype == mx.float32
    close(out, want_out, TOL[dtype])
    close(lse, want_lse, 1e-4)


def test_a_split_with_every_key_hidden_weighs_nothing(emulated):
    from kvrt.kernels_metal.quantized_decode import quantized_decode_attention

    rng = np.random.default_rng(3)
    k, v, q = rand(rng, (1, 1, 64, 64)), rand(rng, (1, 1, 64, 64)), rand(rng, (1, 2, 1, 64))
    keys, values = quantize_keys(OPS, k, 2, 16), quantize_values(OPS, v, 2, 64)
    bias = np.zeros((1, 1, 64), np.float32)
    bias[..., :32] = -np.inf  # the whole first split
    out, lse = quantized_decode_attention(q, keys, values, 0.125, key_bias=mx.array(bias), splits=2)
    want_out, want_lse = OPS.partial_attention(q, dequantize_keys(OPS, keys)[..., 32:, :],
                                               dequantize_values(OPS, values)[..., 32:, :], 0.125)
    close(out, want_out, 1e-5)
    close(lse, want_lse, 1e-5)
    bias[...] = -np.inf  # every key hidden: out 0, lse −inf
    out, lse = quantized_decode_attention(q, keys, values, 0.125, key_bias=mx.array(bias), splits=2)
    assert np.all(np.array(out) == 0) and np.all(np.isneginf(np.array(lse)))


FULL_CASES = [  # d, g, hkv, t, causal_offset, dtype, biased
    (64, 1, 2, 1, None, "float32", False),
    (64, 4, 1, 3, 70, "float32", True),  # T = 3 queries, causal inside the tier
    (128, 7, 1, 2, 98, "float16", True),
    (64, 2, 2, 4, -2, "float32", False),  # the first queries see no key at all
    (32, 3, 1, 1, None, "bfloat16", True),
]


@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("d,g,hkv,t,causal_offset,dtype,biased", FULL_CASES)
def test_full_precision_decode_equals_partial_attention(emulated, d, g, hkv, t, causal_offset, dtype, biased, ragged):
    """ragged: a batch of 4 rows with per-row lengths (full, 0, ending on a split boundary, inside a split),
    handed over as a strided view, against the twin given the equivalent key bias; each row's padding is
    NaN (its bias 0), so it must go unread."""
    from kvrt.kernels_metal.decode import decode_attention

    rng = np.random.default_rng(d + g + t)
    s, dt = 100, DTYPES[dtype]
    b = 4 if ragged else 3 - hkv  # B·Hkv = 2: the view skips rows between heads or batches
    k, v = rand(rng, (b, hkv, s, d), dt), rand(rng, (b, hkv, s, d), dt)
    q = rand(rng, (b, t, hkv * g, d), dt).swapaxes(1, 2)  # as a model lays it out: [B, T, Hq, D] transposed
    bias = want_bias = hidden_bias(rng, b, hkv, s, 7) if biased else None
    lengths = [s, 0, 34, 53] if ragged else None  # 3 splits of 34 keys
    if ragged:
        want_bias = length_bias(lengths, hkv, s, bias)
    want_out, want_lse = OPS.partial_attention(q, k, v, 0.1, causal_offset, True, want_bias)
    if ragged:
        k, v = poison_padding(lengths, k), poison_padding(lengths, v)
        bias = poison_padding(lengths, bias, fill=0.0) if biased else None
    # k and v as FullPrecisionTier.partial hands them over: SeqBuffer views of their capacity buffers
    k, v = in_capacity(rng, k, extra=28), in_capacity(rng, v, extra=5)
    bias = in_capacity(rng, bias, axis=-1) if biased else None
    lengths = spread(lengths) if ragged else None
    out, lse = decode_attention(q, k, v, 0.1, causal_offset, bias, splits=3, lengths=lengths)
    assert out.dtype == dt and lse.dtype == mx.float32
    close(out, want_out, TOL[dtype])
    want, got = np.array(want_lse), np.array(lse)
    assert np.array_equal(np.isneginf(got), np.isneginf(want))
    np.testing.assert_allclose(got[np.isfinite(want)], want[np.isfinite(want)], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bits,dtype,with_traced", [(2, "float32", False), (2, "float16", True), (4, "float32", True),
                                                    (4, "bfloat16", True), (8, "float16", False)])
def test_quantize_keys_kernel_is_bit_exact(emulated, bits, dtype, with_traced):
    from kvrt.kernels_metal.quantize_keys import quantize_keys_metal

    rng = np.random.default_rng(bits + 10 * with_traced)
    k = rand(rng, (2, 3, 96, 64), DTYPES[dtype]) * mx.array(rng.random((2, 3, 96, 1)).astype(np.float32) * 5)
    k = k.astype(DTYPES[dtype])
    k[0, 1, 40:70, 7] = 0.5  # constant runs: scale 0, codes 0
    traced = mx.array(rng.random((2, 3, 96)) < 0.05) if with_traced else None
    want = quantize_keys(OPS, mean_substituted(OPS, k, traced, 32) if with_traced else k, bits, 32)
    got = quantize_keys_metal(k, bits, 32, traced)
    same_bits(got.codes, want.codes)
    same_bits(got.scale, want.scale)
    same_bits(got.zero, want.zero)


@pytest.mark.parametrize("bits,d,group,dtype", [(2, 64, 32, "float32"), (4, 128, 128, "float16"),
                                                (2, 64, 8, "bfloat16"), (8, 64, 64, "float32")])
def test_quantize_values_kernel_is_bit_exact(emulated, bits, d, group, dtype):
    """Group 8 with 2-bit codes: one word (16 codes) spans two groups."""
    from kvrt.kernels_metal.quantize_values import quantize_values_metal

    rng = np.random.default_rng(bits + d + group)
    v = rand(rng, (1, 2, 37, d), DTYPES[dtype], scale=4.0)  # 37 tokens: no block multiple
    v[0, 0, 5, :] = -2.0  # a constant token: scale 0
    want, got = quantize_values(OPS, v, bits, group), quantize_values_metal(v, bits, group)
    same_bits(got.codes, want.codes)
    same_bits(got.scale, want.scale)
    same_bits(got.zero, want.zero)


@pytest.mark.parametrize("g,w,d,dtype", [(1, 1, 64, "float32"), (4, 8, 64, "float32"), (7, 40, 32, "float16"),
                                         (2, 5, 128, "bfloat16")])
def test_window_scores_equal_the_reference(emulated, g, w, d, dtype):
    from kvrt.kernels_metal.window_scores import window_scores_metal

    rng = np.random.default_rng(g * w + d)
    s, dt = 300, DTYPES[dtype]  # two threadgroups of keys, the second one short
    k, q = rand(rng, (2, 2, s, d), dt), rand(rng, (2, 2 * g, w + 3, d), dt)[:, :, -w:]  # SnapKV: c.q[:, :, -w:]
    want = OPS.window_scores(q, k, 0.125)
    got = window_scores_metal(q, in_capacity(rng, k, extra=20), 0.125)  # at a prompt, the newest tier's view
    assert got.dtype == mx.float32 and got.shape == (2, 2, s)
    close(got, want, 1e-5)


def test_a_model_decodes_the_same_through_the_kernels(emulated, tiny_model_dir, monkeypatch):
    """SnapKV + OTT through every Metal kernel (window scores, quantize with OTT's substitution, fused
    quantized decode, full-precision decode) gives the reference logits."""
    from kvrt.backends.mlx.runtime import MLXRuntime

    spec = "snapkv:budget=48,window=8+ott:bits=2,group=32,residual=8,skip_layers=1"
    ids = [int(i) for i in np.random.default_rng(9).integers(3, 200, 90)]
    runtime = MLXRuntime(tiny_model_dir("qwen3"), dtype="float32")  # head_dim 32: the kernels' lanes fit
    monkeypatch.setattr(MLXOps, "kernels_on", lambda self, x=None: True)

    def run():
        cache = runtime.new_cache(spec)
        out = [runtime.forward(ids[:70], cache)] + [runtime.forward([i], cache) for i in ids[70:]]
        return np.concatenate([np.array(o.astype(mx.float32)).reshape(-1) for o in out]), cache

    fused, cache = run()
    assert cache.stats()["kernels"] == {"window scores": "metal", "quantize": "metal", "quantized decode": "metal",
                                        "decode": "metal"}
    monkeypatch.setenv("KVRT_KERNELS", "off")
    monkeypatch.setattr(MLXOps, "kernels_on", lambda self, x=None: False)
    reference, cache = run()
    assert set(cache.stats()["kernels"].values()) == {"reference"}
    np.testing.assert_allclose(fused, reference, atol=1e-4, rtol=1e-4)


# --- (c) dispatch ------------------------------------------------------------------------------

def quantized_tier(rng, b=1, hkv=2, s=128, d=64, bits=2, group=32, value_group=32, dtype=mx.float32):
    k, v = rand(rng, (b, hkv, s, d), dtype), rand(rng, (b, hkv, s, d), dtype)
    return quantize_keys(OPS, k, bits, group), quantize_values(OPS, v, bits, value_group)


def test_without_metal_the_reference_twins_run():
    assert not mx.metal.is_available()  # this machine: the CPU build of MLX
    ops, rng = MLXOps(), np.random.default_rng(0)
    assert not ops.kernels_on()
    q, k = rand(rng, (1, 4, 1, 64)), rand(rng, (1, 2, 40, 64))
    assert ops.quantizers(k) is None
    ops.window_scores(rand(rng, (1, 4, 8, 64)), k, 0.125)
    ops.partial_attention(q, k, k, 0.125)
    assert ops.quantized_kernel(q, 2, 32, 32) == ops._quantized_matmul_attention  # off Metal: mx.quantized_matmul
    assert ops.quantized_kernel(rand(rng, (1, 4, 9, 64)), 2, 32, 32) is None  # 18 rows: the blocked twin
    assert ops.paths == {"quantize": "reference", "window scores": "reference", "decode": "reference",
                         "quantized decode": "reference"}


def test_kvrt_kernels_off_forces_the_reference(monkeypatch):
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    ops, rng = MLXOps(), np.random.default_rng(0)
    assert ops.kernels_on()
    monkeypatch.setenv("KVRT_KERNELS", "off")
    assert not ops.kernels_on()
    q, k = rand(rng, (1, 4, 1, 64)), rand(rng, (1, 2, 40, 64))
    assert ops.quantized_kernel(q, 2, 32, 32) is None and ops.quantizers(k) is None
    ops.partial_attention(q, k, k, 0.125)
    assert set(ops.paths.values()) == {"reference"}


@pytest.mark.parametrize("bits,group,value_group,dtype", [(2, 32, 32, mx.float32), (4, 64, 128, mx.float32),
                                                          (2, 128, 64, mx.float16), (4, 32, 32, mx.bfloat16)])
def test_the_quantized_matmul_path_equals_the_twin(bits, group, value_group, dtype):
    """mx.quantized_matmul computes kvrt's format: values as stored, keys with their packed words
    transposed to [D, S/P]. float32 agrees to rounding; half types differ by the twin's rounding of the
    dequantized keys and values to the model dtype."""
    rng = np.random.default_rng(bits + group)
    keys, values = quantized_tier(rng, hkv=2, s=256, d=128, bits=bits, group=group, value_group=value_group,
                                  dtype=dtype)
    q, bias = rand(rng, (1, 6, 2, 128), dtype), hidden_bias(rng, 1, 2, 256, 11)
    ops = MLXOps()
    kernel = ops.quantized_kernel(q, 2, group, value_group)
    out, lse = kernel(q, keys, values, 0.09, key_bias=bias)
    assert ops.paths["quantized decode"] == "quantized_matmul"
    want_out, want_lse = OPS.partial_attention(q, dequantize_keys(OPS, keys), dequantize_values(OPS, values), 0.09,
                                               None, True, bias)
    tol = {mx.float32: 1e-5, mx.float16: 3e-3, mx.bfloat16: 3e-2}[dtype]
    close(out, want_out, tol)
    close(lse, want_lse, tol)


def test_groups_quantized_matmul_cannot_take_leave_the_tier_its_twin():
    ops, q = MLXOps(), rand(np.random.default_rng(5), (1, 4, 1, 64))
    assert ops.quantized_kernel(q, 2, 16, 16) is None and ops.quantized_kernel(q, 2, 32, 16) is None
    assert ops.paths["quantized decode"] == "reference"


def test_the_quantized_decode_call_matches_its_indexing(recorder):
    rng = np.random.default_rng(1)
    keys, values = quantized_tier(rng, b=2, hkv=2, s=1000 // 32 * 32, d=128, bits=4, group=32, value_group=64)
    keys = QuantizedKeys(*(in_capacity(rng, x) for x in (keys.codes, keys.scale, keys.zero)), keys.bits, keys.group,
                         keys.shape)
    values = QuantizedValues(*(in_capacity(rng, x) for x in (values.codes, values.scale, values.zero)), values.bits,
                             values.group, values.shape)
    s, q = keys.shape[2], rand(rng, (2, 6, 2, 128), mx.float16)
    bias = in_capacity(rng, mx.zeros((2, 2, s)), axis=-1)
    ops = MLXOps()
    kernel = ops.quantized_kernel(q, 2, 32, 64)
    assert ops.paths["quantized decode"] == "metal"
    out, lse = kernel(q, keys, values, 0.1, key_bias=bias)
    assert out.shape == q.shape and out.dtype == mx.float16 and lse.shape == (2, 6, 2) and lse.dtype == mx.float32
    (call,) = recorder.calls
    bh, rows, d, per = 4, 6, 128, 8
    s_len, span, n, hkv, t = call["inputs"]["meta"].tolist()
    assert s_len == s and span * n >= s > span * (n - 1)  # the splits cover every token, none empty
    assert (hkv, t) == (2, 2)
    assert call["grid"] == (32 * bh, n, 1) and call["threadgroup"] == (32, 1, 1)  # one simdgroup per (head, split)
    assert call["template"] == {"KT": mx.float32, "D": d, "ROWS": rows, "BITS": 4, "GROUP": 32, "VGROUP": 64,
                                "HAS_BIAS": True, "HAS_LENGTHS": False}
    shapes = {name: x.shape for name, x in call["inputs"].items()}
    assert shapes == {"q": (2, 6, 2, d), "kc": (2, 2, s // per, d), "ks": (2, 2, s // 32, d), "kz": (2, 2, s // 32, d),
                      "vc": (2, 2, s, d // per), "vs": (2, 2, s, d // 64), "vz": (2, 2, s, d // 64),
                      "bias": (2, 2, s), "lengths": (1,), "meta": (5,), "qscale": (1,)}
    assert call["outputs"] == [((bh, n, rows, d), mx.float32), ((bh, n, rows), mx.float32)]
    # the tier's views reach the kernel as they are, and MLX is told not to copy them either
    assert call["ensure_row_contiguous"] is False
    sent = dict(zip(("kc", "ks", "kz", "vc", "vs", "vz"), (keys.codes, keys.scale, keys.zero, values.codes,
                                                            values.scale, values.zero)), q=q, bias=bias)
    for name, view in sent.items():
        assert passed_as_is(call["inputs"][name], view), name
    lengths = mx.array([s, 64], dtype=mx.int32)  # a batch's rows with their lengths: the same launch, flagged
    kernel(q, keys, values, 0.1, key_bias=bias, lengths=lengths)
    call = recorder.calls[-1]
    assert call["template"]["HAS_LENGTHS"] is True and passed_as_is(call["inputs"]["lengths"], lengths)
    assert call["inputs"]["meta"].tolist()[:3] == [s, span, n] and call["grid"] == (32 * bh, n, 1)


def test_full_precision_decode_dispatch(recorder):
    rng = np.random.default_rng(2)
    ops = MLXOps()
    q, k = rand(rng, (1, 8, 2, 64)), in_capacity(rng, rand(rng, (1, 2, 50, 64)), extra=14)  # a SeqBuffer view
    out, lse = ops.partial_attention(q, k, k, 0.125, causal_offset=48)
    assert ops.paths["decode"] == "metal" and lse.shape == (1, 8, 2)
    (call,) = recorder.calls
    assert call["name"] == "kvrt_decode" and call["template"] == {"D": 64, "ROWS": 8, "TQ": 2, "HAS_BIAS": False,
                                                                  "HAS_LENGTHS": False}
    assert call["inputs"]["meta"].tolist()[3:] == [48, 2] and call["grid"][0] == 32 * 2
    assert call["ensure_row_contiguous"] is False  # MLX passes the views as they lie
    assert passed_as_is(call["inputs"]["keys"], k) and passed_as_is(call["inputs"]["values"], k)
    assert passed_as_is(call["inputs"]["q"], q)
    from kvrt.kernels_metal.decode import decode_attention

    lengths = mx.array([40], dtype=mx.int32)  # a batch's rows with their lengths: the same launch, flagged
    decode_attention(q, k, k, 0.125, 48, lengths=lengths)
    call = recorder.calls.pop()
    assert call["template"]["HAS_LENGTHS"] is True and passed_as_is(call["inputs"]["lengths"], lengths)
    assert call["grid"] == recorder.calls[0]["grid"]
    ops.partial_attention(q, k, k, 0.125, with_lse=False)  # no lse wanted: mlx's fused attention, no kernel
    ops.partial_attention(rand(rng, (1, 8, 5, 64)), k, k, 0.125)  # 20 rows per KV head: the reference
    ops.partial_attention(rand(rng, (1, 8, 1, 48)), rand(rng, (1, 2, 50, 48)), rand(rng, (1, 2, 50, 48)), 0.1)  # D % 32
    assert len(recorder.calls) == 1 and ops.paths["decode"] == "reference"


def test_a_decode_step_hands_the_kernels_the_caches_own_buffers(recorder):
    """Through the cache itself: the full-precision tier's SeqBuffer views and the quantized tier's stored
    views reach mx.fast.metal_kernel un-copied."""
    from kvrt.cache.methods.kivi import KIVI, QuantizedTier
    from kvrt.cache.tiers import FullPrecisionTier

    rng, ops = np.random.default_rng(6), MLXOps()
    full = FullPrecisionTier(ops)
    full.append(rand(rng, (1, 2, 70, 64)), rand(rng, (1, 2, 70, 64)))
    q = rand(rng, (1, 4, 1, 64))
    full.partial(q, 0.125, None, True)
    (call,) = recorder.calls
    assert full.keys.capacity > full.length  # the view skips the buffer's unused rows
    assert passed_as_is(call["inputs"]["keys"], full.keys.view()) and passed_as_is(call["inputs"]["values"],
                                                                                   full.values.view())
    tier = QuantizedTier(ops, KIVI(bits=2, group=32, residual=0))
    tier.add(rand(rng, (1, 2, 512, 64)), rand(rng, (1, 2, 512, 64)))  # (the recorder's quantizers give zeros)
    tier.add(rand(rng, (1, 2, 32, 64)), rand(rng, (1, 2, 32, 64)))  # grows each buffer by an eighth: slack
    tier.partial(q, 0.125, None, True)
    call = recorder.calls[-1]
    assert call["name"] == "kvrt_quantized_decode" and call["ensure_row_contiguous"] is False
    keys, values = tier.stored(0, 17)
    for name, view in zip(("kc", "ks", "kz", "vc", "vs", "vz"), (keys.codes, keys.scale, keys.zero, values.codes,
                                                                 values.scale, values.zero)):
        assert passed_as_is(call["inputs"][name], view), name
    assert any(not row_contiguous(*layout(view)) for view in (keys.codes, values.codes)), "nothing to skip"


def test_quantizer_and_window_calls_match_their_indexing(recorder):
    rng = np.random.default_rng(4)
    ops = MLXOps()
    k = rand(rng, (1, 3, 64, 128), mx.bfloat16)
    quantize_k, quantize_v = ops.quantizers(k)
    assert ops.paths["quantize"] == "metal"
    qk = quantize_k(k, 2, 32, mx.zeros((1, 3, 64), dtype=mx.bool_))
    qv = quantize_v(k, 4, 32)
    kcall, vcall = recorder.calls
    assert kcall["grid"] == (128, 2, 3) and kcall["threadgroup"] == (128, 1, 1)  # a thread per (channel, group, head)
    assert kcall["template"] == {"T": mx.bfloat16, "D": 128, "BITS": 2, "GROUP": 32, "HAS_TRACED": True}
    assert kcall["outputs"] == [((3, 4, 128), mx.int32), ((3, 2, 128), mx.bfloat16), ((3, 2, 128), mx.bfloat16)]
    assert vcall["grid"] == (32, 64, 3) and vcall["threadgroup"] == (32, 1, 1)  # a simdgroup per (token, head)
    assert vcall["outputs"] == [((3, 64, 16), mx.int32), ((3, 64, 4), mx.bfloat16), ((3, 64, 4), mx.bfloat16)]
    assert qk.codes.shape == (1, 3, 4, 128) and qv.scale.shape == (1, 3, 64, 4)
    assert kcall["ensure_row_contiguous"] and vcall["ensure_row_contiguous"]  # a chunk's k, v: MLX's own layout
    q, k = rand(rng, (1, 6, 12, 128))[:, :, -8:], in_capacity(rng, rand(rng, (1, 3, 300, 128)))
    scores = ops.window_scores(q, k, 0.1)
    assert ops.paths["window scores"] == "metal" and scores.shape == (1, 3, 300)
    lse_call, score_call = recorder.calls[2:]
    for call in (lse_call, score_call):  # the query slice and the newest tier's view, as they are
        assert call["ensure_row_contiguous"] is False and call["inputs"]["meta"].tolist() == [300, 3]
        assert passed_as_is(call["inputs"]["q"], q) and passed_as_is(call["inputs"]["k"], k)
    assert lse_call["grid"] == (32, 16, 3) and lse_call["outputs"] == [((3, 16), mx.float32)]
    assert score_call["grid"] == (300, 1, 3) and score_call["threadgroup"] == (256, 1, 1)
    assert score_call["template"] == {"D": 128, "W": 8, "ROWS": 16, "G": 2}


def test_every_metal_source_ships_in_the_package():
    """pyproject's package-data carries the .metal files next to the wrappers that read them."""
    import re
    from pathlib import Path

    config = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert re.search(r'\[tool\.setuptools\.package-data\]\s*"kvrt\.kernels_metal" = \["\*\.metal"\]', config)
    for name in [*sources.KERNELS, sources.HEADER]:
        assert sources.source(name).strip()
