"""Method state behind the method/tier interface: a method's per-token state (H2O's sums) follows
exactly the full-precision tokens through every cache operation, the eviction method says how long
a prompt's last chunk must be, and each quantized tier reports its own traced outliers."""

import pytest
import torch

from kvrt.backends.torch.ops import TorchOps
from kvrt.cache.kvcache import KVCache, stack_caches

OPS = TorchOps()


def qkv(n, seed, hq=4, hkv=2, d=16):
    torch.manual_seed(seed)
    return torch.randn(1, hq, n, d), torch.randn(1, hkv, n, d), torch.randn(1, hkv, n, d)


def feed(cache, q, k, v, prompt):
    """The first `prompt` tokens as one chunk, then one token at a time."""
    layer = cache.layers[0]
    layer.attend(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], 0.3)
    for t in range(prompt, q.shape[2]):
        layer.attend(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], 0.3)
        yield layer


def covers_full_precision(layer) -> bool:
    return layer.token_state.values.shape[2] == layer.kept.length + layer.newest.length


@pytest.mark.parametrize("window", [None, 12], ids=["global", "local"])
def test_h2o_sums_cover_exactly_the_full_precision_tokens_alone_and_in_a_batch(window):
    alone = KVCache(OPS, 1, "h2o:budget=8", windows=[window])
    assert all(covers_full_precision(layer) for layer in feed(alone, *qkv(30, 0), prompt=17))
    parts = []
    for seed, n in ((1, 21), (2, 13)):
        cache = KVCache(OPS, 1, "h2o:budget=8", windows=[window])
        q, k, v = qkv(n, seed)
        list(feed(cache, q, k, v, prompt=n))
        parts.append(cache)
    batch = stack_caches(parts)
    q, k, v = (torch.cat(x, dim=0) for x in zip(qkv(9, 3), qkv(9, 4)))
    for t in range(9):
        batch.layers[0].attend(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], 0.3)
        assert covers_full_precision(batch.layers[0])
    assert covers_full_precision(batch.take([1]).layers[0])


@pytest.mark.parametrize("spec", ["full", "snapkv:budget=8,window=4", "streaming:budget=8", "kivi:bits=2"])
def test_methods_that_score_without_a_token_state_keep_none(spec):
    assert KVCache(OPS, 2, spec).layers[0].token_state is None


@pytest.mark.parametrize("spec, least", [("full", 0), ("kivi:bits=2", 0), ("h2o:budget=8", 0),
                                         ("streaming:budget=8", 0), ("snapkv:budget=16,window=8", 8),
                                         ("pyramidkv:budget=16,window=4+ott", 4)])
def test_the_last_prompt_chunk_must_hold_the_observation_window(spec, least):
    assert KVCache(OPS, 2, spec).last_chunk_min == least


@pytest.mark.parametrize("spec, traced", [("kivi:bits=2,group=16,residual=0", False),
                                          ("ott:bits=2,group=16,residual=0,skip_layers=1", True)])
def test_each_quantized_tier_reports_its_own_traced_outliers(spec, traced):
    cache = KVCache(OPS, 2, spec)
    q, k, v = qkv(48, 5)
    for layer in cache.layers:
        layer.attend(q, k, v, 0.3)
    stats = cache.stats()["quantized"]
    assert set(stats) == {"tokens", "of", "traced"} and (stats["tokens"], stats["of"]) == (48, 48)
    assert (stats["traced"] > 0) == traced  # averaged over the tracing layer only, not the skipped one
    assert [layer.quantized.traced_per_head() is not None for layer in cache.layers] == [False, traced]


@pytest.mark.parametrize("spec", ["h2o:budget=24+kivi:bits=4,group=16,residual=8",
                                  "h2o:budget=24+ott:bits=2,group=16,residual=8,skip_layers=0"])
def test_h2o_beside_a_quantizer_scores_decode_tokens_so_a_later_chunk_can_evict(spec):
    """A quantizer defers H2O's eviction to multi-token chunks (a chat turn); the sums must still
    cover the decode tokens then (a later chunk once failed on sums shorter than its candidates)."""
    cache = KVCache(OPS, 1, spec)
    q, k, v = qkv(90, 6)
    for layer in feed(cache, q[:, :, :80], k[:, :, :80], v[:, :, :80], prompt=40):
        assert covers_full_precision(layer)
    layer = cache.layers[0]
    out = layer.attend(q[:, :, 80:], k[:, :, 80:], v[:, :, 80:], 0.3)  # the next turn's chunk
    assert torch.isfinite(out).all() and covers_full_precision(layer)
    assert layer.quantized.length > 0 and layer.kept.length + layer.newest.length <= 24 + 16 + 8
