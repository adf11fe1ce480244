"""A decode step reads nothing back to the host inside the model: on a GPU each such read stalls the
device, and a step may afford one (sampling its token). Counted through the ops protocol (the calls
that return a host value) and, on torch, through aten's scalar reads (`.item()`, `bool()`, `int()`)."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from cache_runs import token_ids
from kvrt.backends.torch.runtime import TorchRuntime

HOST_READS = ("any", "count", "to_numpy", "argmax_last")
SPECS = ["full", "streaming:budget=20,sinks=2", "h2o:budget=24", "snapkv:budget=24,window=8",
         "pyramidkv:budget=24,window=8", "snapkv:budget=24,window=8+calidrop",
         "streaming:budget=20,sinks=2+calidrop", "h2o:budget=24+calidrop:granularity=kv_head",
         "pyramidkv:budget=24,window=8+calidrop:rule=paper", "snapkv:budget=24,window=8+calidrop:offload=int2",
         "kivi:bits=2,group=16,residual=8", "ott:bits=2,group=16,residual=8,skip_layers=1",
         "ott:bits=4,group=16,residual=8,overflow=4,skip_layers=0",
         "snapkv:budget=24,window=8+ott:bits=2,group=16,residual=8",
         "streaming:budget=20,sinks=2+calidrop+kivi:bits=2,group=16,residual=8"]


def count_host_reads(monkeypatch, ops) -> list:
    """Wrap the ops protocol's host reads; returns the list each call appends its name to."""
    calls = []
    for name in HOST_READS:
        original = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    return calls


@pytest.mark.parametrize("kernels", ["auto", "off"])
@pytest.mark.parametrize("spec", SPECS)
def test_a_decode_step_reads_nothing_back_to_the_host(tiny_model_dir, monkeypatch, spec, kernels):
    """40 decode steps (flushes, evictions, recomputes and OTT's overflow among them) past a prompt."""
    monkeypatch.setenv("KVRT_KERNELS", kernels)
    runtime = TorchRuntime(tiny_model_dir("llama"))
    ids = token_ids(100, seed=6)
    cache = runtime.new_cache(spec)
    runtime.forward(ids[:60], cache)
    calls = count_host_reads(monkeypatch, runtime.ops)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for token in ids[60:]:
            runtime.forward([token], cache)
    scalar_reads = sum(1 for e in prof.events() if e.name == "aten::_local_scalar_dense")
    assert calls == [] and scalar_reads == 0, (calls[:5], scalar_reads)
    if "calidrop" in spec:  # the branches were taken and counted on the device, read once here
        assert sum(cache.stats()["calidrop"].values()) > 0


@pytest.mark.parametrize("spec", ["snapkv:budget=24,window=8+calidrop", "ott:bits=2,group=16,residual=8,skip_layers=1",
                                  "streaming:budget=20,sinks=2+calidrop+kivi:bits=2,group=16,residual=8"])
def test_mlx_decode_reads_nothing_back_to_the_host(tiny_model_dir, monkeypatch, spec):
    pytest.importorskip("mlx.core")
    from kvrt.backends.mlx.runtime import MLXRuntime

    runtime = MLXRuntime(tiny_model_dir("llama"))
    ids = token_ids(100, seed=6)
    cache = runtime.new_cache(spec)
    runtime.forward(ids[:60], cache)
    calls = count_host_reads(monkeypatch, runtime.ops)
    for token in ids[60:]:
        runtime.forward([token], cache)
    assert calls == []
