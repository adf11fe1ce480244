"""torch and MLX select the same tokens and give the same logits under every eviction method
(fp32, logits within 1e-4; a tie in scores could legitimately pick different tokens, and the
random checkpoint makes ties vanishingly unlikely)."""

import numpy as np
import pytest
import torch

mx = pytest.importorskip("mlx.core")

from kvrt.backends.mlx.runtime import MLXRuntime  # noqa: E402
from kvrt.backends.torch.runtime import TorchRuntime  # noqa: E402

SPECS = ["streaming:budget=24", "h2o:budget=24+calidrop", "snapkv:budget=24,window=8+calidrop",
         "pyramidkv:budget=24,window=8,pool=max+calidrop:theta1=0.9,theta2=0.95", "snapkv:budget=24,window=8"]


@pytest.fixture(scope="module")
def runtimes(tiny_model_dir):
    folder = tiny_model_dir("llama")
    return TorchRuntime(folder), MLXRuntime(folder)


def run(runtime, spec, ids, prefill):
    cache = runtime.new_cache(spec)
    out = [np.asarray(runtime.ops.to_numpy(runtime.forward(ids[:prefill], cache)))]
    out += [np.asarray(runtime.ops.to_numpy(runtime.forward([t], cache))) for t in ids[prefill:]]
    return np.concatenate(out), cache


def without_paths(stats: dict) -> dict:
    """A cache's stats but the kernel paths, which each backend names its own way."""
    return {k: v for k, v in stats.items() if k != "kernels"}


@pytest.mark.parametrize("spec", SPECS)
def test_torch_and_mlx_agree_under_eviction(runtimes, spec):
    ids = torch.randint(3, 200, (100,), generator=torch.Generator().manual_seed(4)).tolist()
    (t_logits, t_cache), (m_logits, m_cache) = (run(rt, spec, ids, 80) for rt in runtimes)
    np.testing.assert_allclose(m_logits, t_logits, atol=1e-4, rtol=0)
    for t_layer, m_layer in zip(t_cache.layers, m_cache.layers):
        assert np.array_equal(np.asarray(m_layer.kept.positions), t_layer.kept.positions.numpy())
    assert without_paths(m_cache.stats()) == without_paths(t_cache.stats())
    assert m_cache.nbytes() == t_cache.nbytes()
