"""KIVI's quantized tier: flush boundaries, blockwise attention equal to its dequantized reference,
and a cache that stays close to full precision at 8 bits (fp32)."""

import numpy as np
import pytest
import torch

from cache_runs import run_spec, token_ids
from kvrt.cache.attention import merge_partials
from kvrt.backends.torch.ops import TorchOps
from kvrt.backends.torch.runtime import TorchRuntime
from kvrt.cache.kvcache import LayerCache
from kvrt.errors import KvrtError
from kvrt.cache.methods.kivi import KIVI
from kvrt.cache.quant import dequantize_keys, dequantize_values, quantize_keys, quantize_values
from kvrt.cache.spec import CacheSpec

OPS = TorchOps()


def layer_with(bits=2, group=32, residual=16):
    return LayerCache(OPS, 0, quantization=KIVI(bits=bits, group=group, residual=residual, value_group=16))


def feed(layer, n, start=0, seed=0):
    g = torch.Generator().manual_seed(seed + start)
    q, k, v = (torch.randn(1, h, n, 32, generator=g) for h in (4, 2, 2))
    return layer.attend(q, k, v, 0.2)


@pytest.mark.parametrize("prompt,quantized,residual", [
    (40, 0, 40),      # < group + residual: nothing flushed
    (48, 32, 16),     # = group + residual: one group
    (49, 32, 17),     # one more token stays in the residual
    (101, 64, 37),    # not a multiple of the group: whole groups only, residual >= 16
])
def test_prefill_flushes_whole_groups_and_keeps_the_residual(prompt, quantized, residual):
    layer = layer_with()
    feed(layer, prompt)
    assert (layer.quantized.length, layer.newest.length, layer.offset) == (quantized, residual, prompt)


def test_decode_flushes_one_group_every_group_tokens():
    layer = layer_with()
    feed(layer, 40)
    lengths = []
    for step in range(40):
        feed(layer, 1, start=40 + step)
        lengths.append(layer.quantized.length)
    assert lengths[7] == 32 and lengths[6] == 0  # token 48 completes group + residual
    assert lengths[-1] == 64 and layer.newest.length == 16


def test_quantized_partial_equals_attention_over_the_dequantized_tier():
    layer = layer_with(bits=4)
    layer.quantized.BLOCK_GROUPS = 2  # 5 groups -> blocks of 2, 2, 1 merged by lse
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(1, 2, 160, 32, generator=g), torch.randn(1, 2, 160, 32, generator=g)
    layer.quantized.add(k, v)
    q = torch.randn(1, 4, 3, 32, generator=g)
    out, lse = layer.quantized.partial(q, 0.2, None, True)
    k_hat = dequantize_keys(OPS, quantize_keys(OPS, k, 4, 32))
    v_hat = dequantize_values(OPS, quantize_values(OPS, v, 4, 16))
    ref_out, ref_lse = OPS.partial_attention(q, k_hat, v_hat, 0.2)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_layer_output_is_the_merge_of_quantized_and_residual_tiers():
    layer = layer_with(bits=8)
    feed(layer, 100)  # 64 quantized, 36 in the residual
    q = torch.randn(1, 4, 1, 32)
    got = layer.attend(q, torch.zeros(1, 2, 1, 32), torch.zeros(1, 2, 1, 32), 0.2)
    assert layer.newest.length == 37  # the new token joined the residual; no flush yet
    parts = [layer.quantized.partial(q, 0.2, None, True), layer.newest.partial(q, 0.2, None, True)]
    torch.testing.assert_close(got, merge_partials(OPS, parts)[0], atol=1e-6, rtol=1e-6)


def test_stored_bytes_are_the_arrays_and_near_the_bound():
    layer = layer_with(bits=2, group=32, residual=0)
    feed(layer, 256)
    stored = sum(a.numel() * a.element_size() for a in layer.quantized.arrays())
    assert layer.quantized.length == 256 and layer.nbytes() == stored
    # fp32 scale + zero: keys 2 + 64/32 bits, values 2 + 64/16 bits per element, nothing more
    elements = 2 * 256 * 32
    assert stored == elements * ((2 + 64 / 32) + (2 + 64 / 16)) / 8


@pytest.fixture(scope="module")
def runtime(tiny_model_dir):
    return TorchRuntime(tiny_model_dir("llama"))


def test_eight_bit_kivi_stays_close_to_full_and_two_bit_does_not(runtime):
    ids = token_ids(120, seed=2)
    full, _ = run_spec(runtime, "full", ids, 100)
    eight, cache = run_spec(runtime, "kivi:bits=8,group=32,residual=16,value_group=16", ids, 100)
    two, _ = run_spec(runtime, "kivi:bits=2,group=32,residual=16,value_group=16", ids, 100)
    assert cache.layers[0].quantized.length == 96
    assert torch.equal(eight[:100], full[:100])  # the prompt attends before anything is quantized
    err8, err2 = (eight - full).abs().max().item(), (two - full).abs().max().item()
    assert err8 < 0.02 < err2


def test_torch_and_mlx_agree_on_kivi(runtime, tiny_model_dir):
    pytest.importorskip("mlx.core")
    from kvrt.backends.mlx.runtime import MLXRuntime

    ids = token_ids(110, seed=3)
    spec = "kivi:bits=2,group=32,residual=16,value_group=16"
    t, _ = run_spec(runtime, spec, ids, 90)
    mlx_rt = MLXRuntime(tiny_model_dir("llama"))
    cache = mlx_rt.new_cache(spec)
    m = [np.asarray(mlx_rt.ops.to_numpy(mlx_rt.forward(ids[:90], cache, all_logits=True)))]
    m += [np.asarray(mlx_rt.ops.to_numpy(mlx_rt.forward([x], cache))) for x in ids[90:]]
    np.testing.assert_allclose(np.concatenate(m), t.numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("spec,needle", [
    ("kivi:bits=3", "2, 4 or 8"),
    ("kivi:bits=2,group=24", "multiple of 16"),
    ("kivi:residual=-1", "residual"),
    ("full+kivi", "follows an eviction method"),
    ("kivi+ott", "names 2 quantizers"),
    ("snapkv:budget=64+kivi+ott", "names 2 quantizers"),
    ("ott:outliers=128", "below the group size"),
    ("ott:overflow=-1", "must be >= 0"),
    ("ott:value_group=-2", "value_group"),
])
def test_bad_kivi_specs_are_clear_errors(spec, needle):
    with pytest.raises(KvrtError, match=needle):
        CacheSpec.parse(spec)
