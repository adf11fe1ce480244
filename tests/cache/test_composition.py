"""Eviction, CaliDrop and quantization composed: eviction picks among full-precision tokens, its
survivors are quantized, and decode tokens flow through the residual into the quantized tier.
Tolerances: fp32 tiny model; 8-bit quantization moves logits by well under 0.02."""

import numpy as np
import pytest
import torch

from cache_runs import run_spec as run, token_ids
from kvrt.backends.torch.runtime import TorchRuntime

METHODS = ["streaming:budget={b}", "h2o:budget={b}", "snapkv:budget={b},window=8", "pyramidkv:budget={b},window=8"]
QUANT = "kivi:bits={bits},group=16,residual=8"


@pytest.fixture(scope="module")
def runtime(tiny_model_dir):
    return TorchRuntime(tiny_model_dir("llama"))


@pytest.mark.parametrize("method", METHODS)
def test_a_budget_above_the_sequence_leaves_plain_quantization(runtime, method):
    ids = token_ids(100)
    plain, _ = run(runtime, QUANT.format(bits=2), ids, 80)
    got, cache = run(runtime, method.format(b=500) + "+" + QUANT.format(bits=2), ids, 80)
    assert torch.equal(got, plain)
    assert all(layer.kept.length == 0 for layer in cache.layers)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("calidrop", ["", "+calidrop"])
def test_eviction_survivors_are_quantized(runtime, method, calidrop):
    """The prompt is cut to the budget, the survivors quantized in whole groups; decode tokens are
    not evicted but quantized. At 8 bits the first decode step matches eviction alone."""
    ids = token_ids(110, seed=1)
    spec = method.format(b=40) + calidrop
    alone, _ = run(runtime, spec, ids, 80)
    got, cache = run(runtime, spec + "+" + QUANT.format(bits=8), ids, 80)
    for layer in cache.layers:
        budget = layer.budget
        assert layer.quantized.length == (budget + 30 - 8) // 16 * 16  # whole groups, >= 8 in full precision
        assert layer.quantized.length + layer.kept.length + layer.newest.length == budget + 30
    assert (got[:81] - alone[:81]).abs().max().item() < 0.02
    if method.startswith(("snapkv", "pyramidkv")):  # they never evict decode tokens: the whole run matches
        assert (got - alone).abs().max().item() < 0.02


def test_calidrop_offload_stores_the_evicted_tier_quantized(runtime):
    ids = token_ids(100, seed=2)
    spec = "snapkv:budget=24,window=8+calidrop:theta1=1.0,theta2=1.0"
    exact, plain_cache = run(runtime, spec, ids, 80)
    int8, cache = run(runtime, spec + ",offload=int8", ids, 80)
    int2, _ = run(runtime, spec + ",offload=int2", ids, 80)
    store = cache.layers[0].calibration.store
    assert store.length == plain_cache.layers[0].calibration.store.length == 80 - 24
    assert store.groups.length == 32 and store.rest.length == 24  # groups of 32, the rest in full precision
    err8, err2 = (int8 - exact).abs().max().item(), (int2 - exact).abs().max().item()
    assert err8 < 0.02 < err2
    assert cache.nbytes() < plain_cache.nbytes()


def test_calibration_size_with_offload_keeps_the_cap(runtime):
    _, cache = run(runtime, "snapkv:budget=24,window=8+calidrop:calibration_size=40,offload=int4", token_ids(90), 80)
    assert all(layer.calibration.store.length == 40 for layer in cache.layers)


def test_all_three_compose_and_count_every_array(runtime):
    ids = token_ids(120, seed=3)
    _, cache = run(runtime, "snapkv:budget=48,window=8+calidrop:offload=int2+ott:group=16,residual=8,skip_layers=0",
                   ids, 100)
    layer = cache.layers[1]
    assert layer.quantized.pool_k is not None and layer.calibration.store.groups.length == 32
    assert cache.nbytes() == sum(a.numel() * a.element_size() for layer in cache.layers for a in layer.arrays())


@pytest.mark.parametrize("spec", [
    "ott:bits=2,group=16,residual=8,skip_layers=1",
    "snapkv:budget=40,window=8+calidrop:offload=int2+ott:bits=2,group=16,residual=8,skip_layers=0",
    "h2o:budget=40+kivi:bits=4,group=16,residual=8",
])
def test_torch_and_mlx_agree(runtime, tiny_model_dir, spec):
    pytest.importorskip("mlx.core")
    from kvrt.backends.mlx.runtime import MLXRuntime

    ids = token_ids(110, seed=5)
    t, _ = run(runtime, spec, ids, 90)
    mlx_rt = MLXRuntime(tiny_model_dir("llama"))
    cache = mlx_rt.new_cache(spec)
    m = [mlx_rt.ops.to_numpy(mlx_rt.forward(ids[:90], cache, all_logits=True))]
    m += [mlx_rt.ops.to_numpy(mlx_rt.forward([x], cache)) for x in ids[90:]]
    np.testing.assert_allclose(np.concatenate(m), t.numpy(), atol=1e-4, rtol=0)
