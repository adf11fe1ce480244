"""Triton kernels against their reference twins, on CPU: under TRITON_INTERPRET=1 for values,
and compiled ahead of time for sm_80 and sm_90 (no GPU needed) for what the interpreter lets
through (layouts, register shapes, types)."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton builds the kernels below

import pytest
import torch
from triton_aot import compile_ahead_of_time

from kvrt.backends.torch.ops import TorchOps
from kvrt.cache.quant import dequantize_keys, dequantize_values, mean_substituted, quantize_keys, quantize_values

pytestmark = pytest.mark.kernels
triton = pytest.importorskip("triton")
OPS = TorchOps()


@pytest.fixture(autouse=True)
def reference_twins(monkeypatch):
    """The twins are the ops path: on the CPU kvrt's C kernels would take their decode calls instead."""
    monkeypatch.setattr(TorchOps, "cpu_kernels_on", lambda self, q, kv_heads: False)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("d,g,hkv", [(64, 1, 2), (64, 3, 1), (128, 4, 2), (64, 7, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("biased", [False, True])
@pytest.mark.parametrize("ragged", [False, True])
def test_quantized_decode_attention_equals_its_reference(bits, d, g, hkv, dtype, biased, ragged):
    """ragged: a batch of 4 rows with per-row lengths in whole groups (0, full, ending inside the first
    and inside the second split) against the twin given the equivalent key bias; each row's padding
    has NaN scales and zeros, so it must go unread."""
    from kvrt.kernels_cuda.quantized_decode import quantized_decode_attention

    gen = torch.Generator().manual_seed(bits * 1000 + d + g)
    s, b = 112, 4 if ragged else 1  # 7 groups of 16; not a multiple of the 32-token block
    k, v = (torch.randn(b, hkv, s, d, generator=gen).to(dtype) for _ in range(2))
    q = torch.randn(b, hkv * g, 1, d, generator=gen).to(dtype)
    keys, values = quantize_keys(OPS, k, bits, 16), quantize_values(OPS, v, bits, 32)
    bias = ref_bias = lengths = None
    if biased:  # OTT hides traced slots: -inf on a few tokens
        bias = ref_bias = torch.zeros(b, hkv, s)
        bias[:, :, torch.randperm(s, generator=gen)[:9]] = float("-inf")
    if ragged:
        lengths = torch.tensor([0, s, 48, 80], dtype=torch.int32)  # 2 splits of 64 tokens
        hidden = torch.arange(s) >= lengths[:, None, None].long()
        ref_bias = torch.where(hidden, float("-inf"), 0.0) + (bias if biased else 0.0)
    ref_out, ref_lse = OPS.partial_attention(q, dequantize_keys(OPS, keys), dequantize_values(OPS, values), 0.125,
                                             key_bias=ref_bias)
    if ragged:
        for row, n in enumerate(lengths.tolist()):
            for x in (keys.scale, keys.zero):  # per group of 16 tokens
                x[row, :, n // 16:] = float("nan")
            for x in (values.scale, values.zero):
                x[row, :, n:] = float("nan")
            if biased:
                bias[row, :, n:] = 0.0  # shown: a kernel reading the padding meets its NaN scales
    out, lse = quantized_decode_attention(q, keys, values, 0.125, key_bias=bias, splits=3, lengths=lengths)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert out.dtype == dtype and out.shape == ref_out.shape
    torch.testing.assert_close(out.float(), ref_out.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


def test_a_split_with_every_key_hidden_weighs_nothing():
    from kvrt.kernels_cuda.quantized_decode import quantized_decode_attention

    k, v, q = torch.randn(1, 1, 64, 64), torch.randn(1, 1, 64, 64), torch.randn(1, 2, 1, 64)
    keys, values = quantize_keys(OPS, k, 2, 16), quantize_values(OPS, v, 2, 64)
    bias = torch.zeros(1, 1, 64)
    bias[..., :32] = float("-inf")  # the whole first split
    out, lse = quantized_decode_attention(q, keys, values, 0.125, key_bias=bias, splits=2)
    ref_out, ref_lse = OPS.partial_attention(q, dequantize_keys(OPS, keys)[..., 32:, :],
                                             dequantize_values(OPS, values)[..., 32:, :], 0.125)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cc", [80, 90])
@pytest.mark.parametrize("has_lengths", [False, True])
def test_quantized_decode_compiles_ahead_of_time(cc, has_lengths):
    pointers = {"q_ptr": "*fp16", "kc_ptr": "*i32", "ks_ptr": "*fp16", "kz_ptr": "*fp16", "vc_ptr": "*i32",
                "vs_ptr": "*fp16", "vz_ptr": "*fp16", "bias_ptr": "*fp32", "len_ptr": "*i32", "out_ptr": "*fp32",
                "lse_ptr": "*fp32"}
    compile_ahead_of_time("kvrt.kernels_cuda.quantized_decode", "_quantized_decode_split", cc, pointers,
                          "dict(BITS=2, GROUP=128, VGROUP=128, D=128, BLOCK_R=4, BLOCK_N=32, HAS_BIAS=True, "
                          f"HAS_LENGTHS={has_lengths})")


def test_kernels_dispatch_on_cuda_unless_turned_off(monkeypatch):
    from types import SimpleNamespace

    cuda, cpu = SimpleNamespace(is_cuda=True), SimpleNamespace(is_cuda=False)
    assert OPS.kernels_on(cuda) and not OPS.kernels_on(cpu)
    monkeypatch.setenv("KVRT_KERNELS", "off")
    assert not OPS.kernels_on(cuda)


def test_a_model_decodes_the_same_through_the_kernel(tiny_model_dir, monkeypatch):
    """The whole decode path with the Triton kernels (interpreted on CPU: quantize with OTT's
    substitution, fused decode attention over the packed tier and over the full-precision
    residual and pools) gives the reference logits."""
    from cache_runs import run_spec, token_ids
    from kvrt.backends.torch.ops import TorchOps
    from kvrt.backends.torch.runtime import TorchRuntime

    runtime = TorchRuntime(tiny_model_dir("llama"))
    spec, ids = "ott:bits=2,group=16,residual=8,skip_layers=1", token_ids(70, seed=9)
    reference, cache = run_spec(runtime, spec, ids, 50)
    assert cache.stats()["kernels"] == {"quantized decode": "reference", "quantize": "reference", "decode": "reference"}
    monkeypatch.setattr(TorchOps, "kernels_on", lambda self, x: True)
    fused, cache = run_spec(runtime, spec, ids, 50)
    assert cache.stats()["kernels"] == {"quantized decode": "triton", "quantize": "triton", "decode": "triton"}
    torch.testing.assert_close(fused, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_traced", [False, True])
def test_quantize_keys_kernel_is_bit_exact(bits, dtype, with_traced):
    from kvrt.kernels_cuda.quantize_keys import quantize_keys_fused

    gen = torch.Generator().manual_seed(bits + 10 * with_traced)
    k = (torch.randn(2, 3, 96, 64, generator=gen) * torch.rand(2, 3, 96, 1, generator=gen) * 5).to(dtype)
    k[0, 1, 40:70, 7] = 0.5  # constant runs: scale 0, codes 0
    traced = torch.rand(2, 3, 96, generator=gen) < 0.05 if with_traced else None
    want = quantize_keys(OPS, mean_substituted(OPS, k, traced, 32) if with_traced else k, bits, 32)
    got = quantize_keys_fused(k, bits, 32, traced)
    assert torch.equal(got.scale, want.scale) and torch.equal(got.zero, want.zero)
    if dtype == torch.bfloat16 and with_traced:
        # the interpreter truncates float32 -> bf16 (GPUs round to nearest even), so a traced slot's
        # substituted mean, and with it that slot's code, may differ; attention never reads those slots
        shown = ~traced[..., None]
        assert torch.equal(dequantize_keys(OPS, got) * shown, dequantize_keys(OPS, want) * shown)
    else:
        assert torch.equal(got.codes, want.codes)


@pytest.mark.parametrize("cc", [80, 90])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])  # bf16: the model dtype on GPUs
def test_quantize_keys_compiles_ahead_of_time(cc, dtype):
    pointers = {"k_ptr": f"*{dtype}", "traced_ptr": "*i8", "codes_ptr": "*i32", "scale_ptr": f"*{dtype}",
                "zero_ptr": f"*{dtype}"}
    compile_ahead_of_time("kvrt.kernels_cuda.quantize_keys", "_quantize_key_group", cc, pointers,
                          "dict(BITS=2, G=128, D=128, HAS_TRACED=True, INT=tl.int16, CAP=2.0**127)")


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d,group", [(64, 32), (128, 128)])
def test_quantize_values_kernel_is_bit_exact(bits, dtype, d, group):
    from kvrt.kernels_cuda.quantize_values import quantize_values_fused

    gen = torch.Generator().manual_seed(bits + d)
    v = (torch.randn(1, 2, 37, d, generator=gen) * 4).to(dtype)  # 37 tokens: not a block multiple
    v[0, 0, 5, :] = -2.0  # a constant token: scale 0
    want, got = quantize_values(OPS, v, bits, group), quantize_values_fused(v, bits, group)
    assert torch.equal(got.codes, want.codes) and torch.equal(got.scale, want.scale)
    assert torch.equal(got.zero, want.zero)


@pytest.mark.parametrize("cc", [80, 90])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_quantize_values_compiles_ahead_of_time(cc, dtype):
    pointers = {"v_ptr": f"*{dtype}", "codes_ptr": "*i32", "scale_ptr": f"*{dtype}", "zero_ptr": f"*{dtype}"}
    compile_ahead_of_time("kvrt.kernels_cuda.quantize_values", "_quantize_value_block", cc, pointers,
                          "dict(BITS=2, GV=128, D=128, BLOCK_T=16, INT=tl.int16, CAP=2.0**127)")
