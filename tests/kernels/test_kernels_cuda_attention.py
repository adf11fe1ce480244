"""The attention kernels (decode over a full-precision tier, SnapKV window scores) against their
reference twins, on CPU: under TRITON_INTERPRET=1 for values, and compiled ahead of time for
sm_80 and sm_90 (no GPU needed) for what the interpreter lets through."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton builds the kernels below

import pytest
import torch
from triton_aot import compile_ahead_of_time

from kvrt.backends.torch.ops import TorchOps

pytestmark = pytest.mark.kernels
triton = pytest.importorskip("triton")
OPS = TorchOps()


@pytest.fixture(autouse=True)
def reference_twins(monkeypatch):
    """The twins are the ops path: on the CPU kvrt's C kernels would take their decode calls instead."""
    monkeypatch.setattr(TorchOps, "cpu_kernels_on", lambda self, q, kv_heads: False)
INF = float("-inf")
# out against the twin in the inputs' dtype: about two ulps of that dtype
OUT_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def cache_views(gen, b, hkv, s, d, dtype):
    """k, v [B, Hkv, S, D] as a decode cache hands them over: k a [:, :, :S] slice of a larger
    buffer, v a slice of a token-major buffer seen head-major; neither contiguous."""
    k = torch.randn(b, hkv, s + 23, d, generator=gen).to(dtype)[:, :, :s]
    v = torch.randn(b, s + 23, hkv, d, generator=gen).to(dtype).transpose(1, 2)[:, :, :s]
    assert not k.is_contiguous() and not v.is_contiguous()
    return k, v


def ragged_lengths(s, block):
    """int32 [4]: rows of a batch stored rectangularly: full, empty, ending on a block (and maybe
    split) boundary, ending inside a block."""
    return torch.tensor([s, 0, block, s // 2 + 3], dtype=torch.int32)


def length_bias(lengths, hkv, s, bias=None):
    """The key bias equivalent to `lengths` (0 below a row's length, -inf at and above), plus `bias`."""
    hidden = torch.arange(s)[None, None, :] >= lengths[:, None, None].long()
    out = torch.where(hidden, INF, 0.0).expand(len(lengths), hkv, s)
    return out + bias if bias is not None else out.contiguous()


def poison_padding(lengths, *arrays, fill=float("nan")):
    """Fill each row's padding (token axis 2, from lengths[b] on) with `fill` in place, views included.
    NaN keys and values: a kernel that lets a row's padding into its arithmetic returns NaN; a bias of
    0 there shows those keys (-inf would hide them)."""
    for x in arrays:
        for row, n in enumerate(lengths.tolist()):
            x[row, :, n:] = fill


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("biased", [False, True])
@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("d,g,hkv,t,causal_offset,s,splits", [
    (64, 1, 2, 1, None, 100, 1),
    (128, 4, 2, 2, 255, 257, 3),  # causal_offset = S - T: the newest two queries of a step
    (64, 7, 1, 2, 255, 257, 5),  # 14 rows, padded to 16
    (128, 3, 1, 1, None, 257, 4),
    (96, 4, 1, 2, 40, 100, 2),  # head dim not a power of 2; the second split past every horizon
])
def test_decode_attention_equals_its_reference(dtype, biased, ragged, d, g, hkv, t, causal_offset, s, splits):
    """ragged: a batch of 4 rows with per-row lengths (full, 0, ending on a 64-key block, inside one)
    against the twin given the equivalent key bias; each row's padding is NaN (its bias 0), so it must
    go unread."""
    from kvrt.kernels_cuda.decode import decode_attention

    gen = torch.Generator().manual_seed(d + 10 * g + s + t)
    b = 4 if ragged else 2
    k, v = cache_views(gen, b, hkv, s, d, dtype)
    q = torch.randn(b, hkv * g, t, d, generator=gen).to(dtype)
    bias = ref_bias = lengths = None
    if biased:  # a float bias with some keys hidden, as OTT's traced slots are
        bias = ref_bias = torch.randn(b, hkv, s, generator=gen)
        bias[torch.rand(b, hkv, s, generator=gen) < 0.1] = INF
    if ragged:
        lengths = ragged_lengths(s, 64)
        ref_bias = length_bias(lengths, hkv, s, bias)
    ref_out, _ = OPS.partial_attention(q, k, v, 0.125, causal_offset, True, ref_bias)
    # the kernel's products are exact and accumulate in float32: its lse is float32's, whatever the dtype
    _, ref_lse = OPS.partial_attention(q.float(), k.float(), v.float(), 0.125, causal_offset, True, ref_bias)
    if ragged:
        poison_padding(lengths, k, v)
        if biased:
            poison_padding(lengths, bias, fill=0.0)
    out, lse = decode_attention(q, k, v, 0.125, causal_offset, bias, splits=splits, lengths=lengths)
    assert out.dtype == dtype and out.shape == ref_out.shape and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref_out.float(), atol=OUT_TOL[dtype], rtol=OUT_TOL[dtype])
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


def test_a_row_that_sees_no_key_gives_zero_and_minus_infinity():
    from kvrt.kernels_cuda.decode import decode_attention

    gen = torch.Generator().manual_seed(5)
    k, v = cache_views(gen, 1, 2, 70, 64, torch.float32)
    q = torch.randn(1, 4, 2, 64, generator=gen)
    bias = torch.zeros(1, 2, 70)
    bias[:, 1] = INF  # KV head 1 hides every key from its rows
    out, lse = decode_attention(q, k, v, 0.125, causal_offset=-1, key_bias=bias, splits=2)  # query 0 sees nothing
    assert torch.equal(out[:, 2:], torch.zeros_like(out[:, 2:])) and torch.equal(out[:, :2, 0], torch.zeros(1, 2, 64))
    assert torch.isneginf(lse[:, 2:]).all() and torch.isneginf(lse[:, :2, 0]).all()
    ref_out, ref_lse = OPS.partial_attention(q[:, :2, 1:], k[:, :1, :1], v[:, :1, :1], 0.125)  # query 1 sees key 0
    torch.testing.assert_close(out[:, :2, 1:], ref_out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse[:, :2, 1:], ref_lse, atol=1e-6, rtol=1e-6)


def test_a_split_with_every_key_hidden_weighs_nothing():
    from kvrt.kernels_cuda.decode import decode_attention

    gen = torch.Generator().manual_seed(6)
    k, v = cache_views(gen, 1, 2, 192, 64, torch.float32)
    q = torch.randn(1, 4, 1, 64, generator=gen)
    bias = torch.zeros(1, 2, 192)
    bias[..., 64:128] = INF  # the whole middle split of three
    out, lse = decode_attention(q, k, v, 0.125, key_bias=bias, splits=3)
    seen = torch.cat([torch.arange(64), torch.arange(128, 192)])
    ref_out, ref_lse = OPS.partial_attention(q, k[:, :, seen], v[:, :, seen], 0.125)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("w,g,d,s,splits", [
    (1, 1, 64, 100, None),
    (1, 4, 128, 257, 3),
    (8, 1, 128, 100, 2),
    (8, 7, 64, 257, None),
    (32, 4, 64, 100, 2),
    (32, 7, 128, 257, 3),  # 224 rows: four row tiles, the last one half empty
    (32, 1, 64, 32, None),  # the window is the whole prompt
])
def test_window_scores_equal_their_reference(dtype, w, g, d, s, splits):
    from kvrt.kernels_cuda.window_scores import window_scores

    gen = torch.Generator().manual_seed(w + 10 * g + d + s)
    k = torch.randn(2, 2, s + 23, d, generator=gen).to(dtype)[:, :, :s]
    q = torch.randn(2, 2 * g, w, d, generator=gen).to(dtype)
    got = window_scores(q, k, 0.125, splits=splits)
    assert got.dtype == torch.float32 and got.shape == (2, 2, s)
    want = OPS.window_scores(q, k, 0.125)
    torch.testing.assert_close(got, want, atol=OUT_TOL[dtype], rtol=OUT_TOL[dtype])
    # exact products, float32 softmax: float32's answer whatever the dtype
    torch.testing.assert_close(got, OPS.window_scores(q.float(), k.float(), 0.125), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.sum(-1), torch.full((2, 2), float(w)), atol=1e-4, rtol=1e-5)  # W softmaxes


DECODE_POINTERS = dict(q_ptr="*T", k_ptr="*T", v_ptr="*T", bias_ptr="*fp32", len_ptr="*i32", out_ptr="*fp32",
                       lse_ptr="*fp32")
QUANTIZED_POINTERS = dict(q_ptr="*T", kc_ptr="*i32", ks_ptr="*T", kz_ptr="*T", vc_ptr="*i32", vs_ptr="*T", vz_ptr="*T",
                          bias_ptr="*fp32", len_ptr="*i32", out_ptr="*fp32", lse_ptr="*fp32")
KERNELS = [  # module, kernel, pointers (*T: the model dtype), constants
    ("decode", "_decode_split", DECODE_POINTERS,
     "dict(D=128, BLOCK_D=128, BLOCK_R=16, BLOCK_N=64, HAS_BIAS=True, CAUSAL=True, HAS_LENGTHS=False)"),
    ("decode", "_decode_split", DECODE_POINTERS,  # a batch of rows with their lengths
     "dict(D=128, BLOCK_D=128, BLOCK_R=16, BLOCK_N=64, HAS_BIAS=True, CAUSAL=True, HAS_LENGTHS=True)"),
    ("window_scores", "_window_row_lse", dict(q_ptr="*T", k_ptr="*T", lse_ptr="*fp32"),
     "dict(D=128, BLOCK_D=128, BLOCK_R=64, BLOCK_N=64)"),
    ("window_scores", "_window_key_scores", dict(q_ptr="*T", k_ptr="*T", lse_ptr="*fp32", out_ptr="*fp32"),
     "dict(D=128, BLOCK_D=128, BLOCK_R=64, BLOCK_N=64)"),
    ("quantized_decode", "_quantized_decode_split", QUANTIZED_POINTERS,
     "dict(BITS=2, GROUP=128, VGROUP=128, D=128, BLOCK_R=16, BLOCK_N=32, HAS_BIAS=True, HAS_LENGTHS=False)"),
    ("quantized_decode", "_quantized_decode_split", QUANTIZED_POINTERS,
     "dict(BITS=2, GROUP=128, VGROUP=128, D=128, BLOCK_R=16, BLOCK_N=32, HAS_BIAS=True, HAS_LENGTHS=True)"),
]


@pytest.mark.parametrize("cc", [80, 90])
@pytest.mark.parametrize("dtype,module,kernel,pointers,constants", [
    pytest.param(dtype, *spec, id=f"{spec[1]}-{dtype}" + ("-lengths" if "HAS_LENGTHS=True" in spec[3] else ""))
    for spec in KERNELS for dtype in ["fp16", "bf16"]
    if not (spec[0] == "quantized_decode" and dtype == "fp16")  # compiled for fp16 in test_kernels_cuda.py
])
def test_attention_kernels_compile_ahead_of_time(cc, dtype, module, kernel, pointers, constants):
    pointers = {name: "*" + dtype if kind == "*T" else kind for name, kind in pointers.items()}
    compile_ahead_of_time(f"kvrt.kernels_cuda.{module}", kernel, cc, pointers, constants)
