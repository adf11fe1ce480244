"""The low-bit KV format (kvrt/cache/quant.py): packing, the error bound, shapes and bytes, torch = MLX.

Bound checked per element: |x − x̂| ≤ s/2 + float rounding, s the *stored* scale (model dtype),
where float rounding is a few float32 ulps of the operands plus, for fp16, the final cast of
x̂ (half an fp16 ulp, or half the smallest subnormal).
"""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from kvrt.cache import quant
from kvrt.backends.torch.ops import TorchOps
from kvrt.errors import KvrtError


def mlx_backend():
    mx = pytest.importorskip("mlx.core")
    from kvrt.backends.mlx.ops import MLXOps

    return MLXOps(), mx.array, np.array


BACKENDS = {"torch": lambda: (TorchOps(), torch.from_numpy, lambda t: t.numpy()), "mlx": mlx_backend}


@pytest.fixture(params=["torch", "mlx"])
def backend(request):
    """(ops, numpy → backend array, backend array → numpy with its own dtype)."""
    return BACKENDS[request.param]()


SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def ref_pack(codes: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """numpy reference of the documented layout: code i of each run at bits [i·b, (i+1)·b)."""
    per = 32 // bits
    c = np.moveaxis(codes.astype(np.uint64), axis, -1)
    c = c.reshape(*c.shape[:-1], c.shape[-1] // per, per)
    words = sum(c[..., i] << np.uint64(i * bits) for i in range(per)).astype(np.uint32).view(np.int32)
    return np.moveaxis(words, -1, axis)


# --- packing ------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis", [2, 3])
def test_pack_unpack_roundtrip_and_layout(backend, bits, axis):
    ops, to_b, to_np = backend
    per = 32 // bits
    shape = [2, 3, 4 * per, 2 * per]
    codes = np.random.default_rng(bits + axis).integers(0, 1 << bits, size=shape).astype(np.int32)
    top = [slice(None)] * 4
    top[axis] = slice(per - 1, None, per)  # the last code of every word: holds the sign bit
    codes[tuple(top)] = (1 << bits) - 1
    codes[0, 0] = 0  # and some all-zero words
    words = ops.pack_codes(to_b(codes), bits, axis)
    expect = ref_pack(codes, bits, axis)
    w = to_np(words)
    assert w.dtype == np.int32 and w.shape == expect.shape
    np.testing.assert_array_equal(w, expect)
    assert (w < 0).any()  # the top code really reached the sign bit
    back = to_np(ops.unpack_codes(words, bits, axis, codes.shape[axis]))
    np.testing.assert_array_equal(back, codes)
    # `length` trims: the first codes along the axis only
    short = to_np(ops.unpack_codes(words, bits, axis, per + 1))
    np.testing.assert_array_equal(short, np.take(codes, range(per + 1), axis=axis))


# --- the error bound (hypothesis) ----------------------------------------------------------

F32, F16 = np.float32, np.float16
MAGNITUDES = {F32: [1e-6, 1.0, 1e4, 1e30], F16: [1e-6, 1.0, 1e4, 6e4]}  # fp16 1e-6 is subnormal
EPS = {F32: 2.0**-23, F16: 2.0**-10}
HALF_TINY = {F32: 2.0**-150, F16: 2.0**-25}  # half the smallest subnormal
SUB32 = 2.0**-149  # float32 subnormals: a float32 scale is exact only to this, absolutely


def check_bound(x, xh, scale, zero, bits, dtype, const):
    """x, xh in the model dtype; scale, zero broadcast to x's shape (stored dtype); const marks
    the elements of constant groups (max == min)."""
    x, xh, s, z = (np.asarray(a, dtype=np.float64) for a in (x, xh, scale, zero))
    assert np.isfinite(xh).all() and np.isfinite(s).all()
    levels = (1 << bits) - 1
    rounding = 4 * 2.0**-23 * (np.abs(x) + np.abs(z) + levels * s) + (levels + 1) * SUB32 + HALF_TINY[dtype]
    if dtype == F16:
        rounding += 2.0**-11 * np.abs(xh)  # the final cast of x̂ to fp16
    err = np.abs(x - xh)
    bad = err > s / 2 + rounding
    assert not bad.any(), f"error {err[bad][:4]} > s/2 {s[bad][:4] / 2} (x {x[bad][:4]})"
    np.testing.assert_array_equal(s[const], 0)
    np.testing.assert_array_equal(xh[const], x[const])  # constant groups come back exactly


def check_scale(x, scale, bits, dtype, axis):
    """The stored scale covers the group's range (fp16: rounded up from the float32 scale) and is
    not much larger."""
    x = np.asarray(x, dtype=np.float64)
    span = (x.max(axis=axis) - x.min(axis=axis)) / ((1 << bits) - 1)
    s = np.asarray(scale, dtype=np.float64)
    slack = 2.0**-22 * span + SUB32  # the span itself is formed in float32
    assert (s >= span - slack).all()
    assert (s <= span * (1 + 2 * EPS[dtype]) + 2.0**-24).all()


@st.composite
def key_case(draw, dtype):
    bits = draw(st.sampled_from([2, 4, 8]))
    group = draw(st.sampled_from([32 // bits, 32]))
    m = float(dtype(draw(st.sampled_from(MAGNITUDES[dtype]))))
    width = 32 if dtype == F32 else 16
    x = draw(arrays(dtype, (1, 2, 2 * group, 3), elements=st.floats(-m, m, width=width)))
    if draw(st.booleans()):
        x[:, :, :group, 0] = x[:, :, :1, 0]  # a constant group
    return x, bits, group


@st.composite
def value_case(draw, dtype):
    bits = draw(st.sampled_from([2, 4, 8]))
    group = draw(st.sampled_from([4, 8, 32]))
    m = float(dtype(draw(st.sampled_from(MAGNITUDES[dtype]))))
    width = 32 if dtype == F32 else 16
    x = draw(arrays(dtype, (1, 2, 3, 32), elements=st.floats(-m, m, width=width)))
    if draw(st.booleans()):
        x[:, :, 0, :group] = x[:, :, 0, :1]  # a constant group
    return x, bits, group


def run_keys(backend, case, dtype):
    ops, to_b, to_np = backend
    x, bits, group = case
    qk = quant.quantize_keys(ops, to_b(x), bits, group)
    xh, scale, zero = to_np(quant.dequantize_keys(ops, qk)), to_np(qk.scale), to_np(qk.zero)
    assert xh.dtype == scale.dtype == zero.dtype == dtype
    grouped = x.reshape(1, 2, 2, group, 3)
    check_scale(grouped, scale, bits, dtype, axis=3)
    np.testing.assert_array_equal(zero, grouped.min(axis=3))
    const = np.repeat(grouped.max(axis=3) == grouped.min(axis=3), group, axis=2)
    check_bound(x, xh, np.repeat(scale, group, axis=2), np.repeat(zero, group, axis=2), bits, dtype, const)


def run_values(backend, case, dtype):
    ops, to_b, to_np = backend
    x, bits, group = case
    qv = quant.quantize_values(ops, to_b(x), bits, group)
    xh, scale, zero = to_np(quant.dequantize_values(ops, qv)), to_np(qv.scale), to_np(qv.zero)
    assert xh.dtype == scale.dtype == zero.dtype == dtype
    grouped = x.reshape(1, 2, 3, 32 // group, group)
    check_scale(grouped, scale, bits, dtype, axis=4)
    np.testing.assert_array_equal(zero, grouped.min(axis=4))
    const = np.repeat(grouped.max(axis=4) == grouped.min(axis=4), group, axis=3)
    check_bound(x, xh, np.repeat(scale, group, axis=3), np.repeat(zero, group, axis=3), bits, dtype, const)


@SETTINGS
@given(case=key_case(F32))
def test_keys_error_bound_fp32(backend, case):
    run_keys(backend, case, F32)


@SETTINGS
@given(case=key_case(F16))
def test_keys_error_bound_fp16(backend, case):
    run_keys(backend, case, F16)


@SETTINGS
@given(case=value_case(F32))
def test_values_error_bound_fp32(backend, case):
    run_values(backend, case, F32)


@SETTINGS
@given(case=value_case(F16))
def test_values_error_bound_fp16(backend, case):
    run_values(backend, case, F16)


def test_range_overflow_stays_finite(backend):
    """max − min beyond float32 max: clamped, so nothing turns inf or nan (the group saturates)."""
    ops, to_b, to_np = backend
    x = np.zeros((1, 1, 32, 16), np.float32)
    x[0, 0, ::2] = 3.0e38
    x[0, 0, 1::2] = -3.0e38
    for bits in (2, 4, 8):
        qk = quant.quantize_keys(ops, to_b(x), bits, 32)
        qv = quant.quantize_values(ops, to_b(x), bits, 4)
        for out in (quant.dequantize_keys(ops, qk), quant.dequantize_values(ops, qv), qk.scale, qv.scale):
            assert np.isfinite(to_np(out)).all()


# --- shapes and bytes -----------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_shapes_and_nbytes(backend, bits):
    ops, to_b, to_np = backend
    b, h, s, d, g, gv = 1, 2, 256, 64, 128, 32
    x = np.random.default_rng(bits).standard_normal((b, h, s, d)).astype(np.float16)
    per = 32 // bits
    qk = quant.quantize_keys(ops, to_b(x), bits, g)
    assert tuple(qk.codes.shape) == (b, h, s // per, d) and tuple(qk.scale.shape) == (b, h, s // g, d)
    assert tuple(qk.zero.shape) == tuple(qk.scale.shape) and qk.shape == (b, h, s, d)
    qv = quant.quantize_values(ops, to_b(x), bits, gv)
    assert tuple(qv.codes.shape) == (b, h, s, d // per) and tuple(qv.scale.shape) == (b, h, s, d // gv)
    assert tuple(qv.zero.shape) == tuple(qv.scale.shape)
    for q, group in ((qk, g), (qv, gv)):
        assert to_np(q.codes).dtype == np.int32 and to_np(q.scale).dtype == np.float16
        stored = sum(to_np(a).nbytes for a in (q.codes, q.scale, q.zero))
        assert q.nbytes(ops) == stored
        assert stored * 8 / x.size == quant.bits_per_element(bits, group, 2) == bits + 32 / group
    assert quant.bits_per_element(2, 128, 2) == 2.25  # REFERENCE: 16 / 2.25 = 7.1x smaller than fp16


# --- torch = MLX ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_torch_and_mlx_identical(bits, dtype):
    mops, mto, mnp = mlx_backend()
    tops = TorchOps()
    rng = np.random.default_rng(bits)
    x = (rng.standard_normal((2, 2, 64, 32)) * rng.choice([1e-3, 1.0, 30.0], size=(2, 2, 1, 32)) + 0.5)
    x = x.astype(dtype)
    x[0, 0, :32, 0] = 1.25  # a constant key group
    for quantize, dequantize, group in ((quant.quantize_keys, quant.dequantize_keys, 32),
                                        (quant.quantize_values, quant.dequantize_values, 8)):
        qt, qm = quantize(tops, torch.from_numpy(x), bits, group), quantize(mops, mto(x), bits, group)
        for name in ("codes", "scale", "zero"):
            np.testing.assert_array_equal(mnp(getattr(qm, name)), getattr(qt, name).numpy(), err_msg=name)
        np.testing.assert_array_equal(mnp(dequantize(mops, qm)), dequantize(tops, qt).numpy())


# --- bad parameters ---------------------------------------------------------------------------


@pytest.mark.parametrize("call, match", [
    (lambda ops, x: quant.quantize_keys(ops, x, 3, 32), "2, 4 or 8"),
    (lambda ops, x: quant.quantize_values(ops, x, 3, 8), "2, 4 or 8"),
    (lambda ops, x: quant.quantize_keys(ops, x, 2, 24), "multiple of 16"),
    (lambda ops, x: quant.quantize_keys(ops, x, 4, 0), "multiple of 8"),
    (lambda ops, x: quant.quantize_keys(ops, x, 8, 12), "whole groups"),  # 32 tokens, G = 12
    (lambda ops, x: quant.quantize_values(ops, x, 4, 12), "divide the head dim"),
    (lambda ops, x: quant.quantize_values(ops, x[..., :8], 2, 4), "multiple of 16"),
    (lambda ops, x: quant.quantize_keys(ops, x[0], 4, 8), r"\[B, Hkv, S, D\]"),
])
def test_bad_parameters_raise_one_line(backend, call, match):
    ops, to_b, _ = backend
    x = to_b(np.zeros((1, 1, 32, 16), np.float32))
    with pytest.raises(KvrtError, match=match) as err:
        call(ops, x)
    assert "\n" not in str(err.value)
