"""OTT (arXiv 2505.10938): outlier selection equal to a plain per-head reference, the overflow
pool and frozen tracing, traced slots hidden in attention, and outliers=0 equal to KIVI."""

import numpy as np
import pytest
import torch

from cache_runs import run_spec, token_ids
from kvrt.backends.torch.ops import TorchOps
from kvrt.backends.torch.runtime import TorchRuntime
from kvrt.cache.kvcache import LayerCache
from kvrt.cache.methods.kivi import QuantizedTier
from kvrt.cache.methods.ott import OTT, TracedTier
from kvrt.cache.quant import dequantize_keys, quantize_keys

OPS = TorchOps()
G, D = 32, 32


def keys_with_small_tokens(groups, heads=2, seed=0):
    """Keys whose per-token magnitudes spread over orders of magnitude, so outliers change hands."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, heads, groups * G, D, generator=g)
    return k * torch.exp(2 * torch.randn(1, heads, groups * G, 1, generator=g))


def reference_trace(k, outliers, overflow):
    """Plain per-head OTT over whole groups of k [S, D] (numpy): pool, overflow, slots per group and
    the keys as quantized (traced slots replaced by the mean of the group's other keys)."""
    pool, over, slots, substituted = [], [], [], []
    for start in range(0, len(k), G):
        group = k[start : start + G]
        norms = np.abs(group.astype(np.float64)).sum(-1)
        tracing = len(pool) <= overflow - len(over)
        candidates = pool + ([(norms[j], start + j) for j in range(G)] if tracing else [])
        order = sorted(range(len(candidates)), key=lambda i: (candidates[i][0], i))[:outliers]
        new_pool = [candidates[i] for i in order]
        chosen = {tid for _, tid in new_pool}
        over += [tid for _, tid in pool if tid not in chosen]
        slots.append([tid - start if tid >= start else -1 for _, tid in new_pool])
        traced = [s for s in slots[-1] if s >= 0]
        rest = [j for j in range(G) if j not in traced]
        group = group.copy()
        group[traced] = group[rest].mean(axis=0)
        substituted.append(group)
        pool = new_pool
    return [tid for _, tid in pool], over, slots, np.concatenate(substituted)


def traced_tier(outliers=3, overflow=32, bits=4):
    return TracedTier(OPS, OTT(bits=bits, group=G, residual=0, outliers=outliers, overflow=overflow))


@pytest.mark.parametrize("outliers,overflow", [(3, 32), (1, 32), (3, 7), (2, 0)])
@pytest.mark.parametrize("one_call", [True, False])
def test_tracing_equals_the_plain_reference(outliers, overflow, one_call):
    k = keys_with_small_tokens(8)
    v = torch.randn_like(k)
    tier = traced_tier(outliers, overflow)
    if one_call:  # a prompt flushes all its groups at once
        tier.add(k, v)
    else:  # decode flushes one group at a time
        for s in range(0, k.shape[2], G):
            tier.add(k[..., s : s + G, :], v[..., s : s + G, :])
    for h in range(k.shape[1]):
        pool, over, slots, substituted = reference_trace(k[0, h].numpy(), outliers, overflow)
        torch.testing.assert_close(tier.pool_k[0, h], k[0, h, pool], rtol=0, atol=0)
        torch.testing.assert_close(tier.pool_v[0, h], v[0, h, pool], rtol=0, atol=0)
        valid = tier.over_valid[0, h].bool() if tier.over_valid is not None else torch.zeros(0, dtype=torch.bool)
        assert int(valid.sum()) == len(over) <= overflow
        if over:
            torch.testing.assert_close(tier.over_k[0, h][valid], k[0, h, over], rtol=0, atol=0)
            torch.testing.assert_close(tier.over_v[0, h][valid], v[0, h, over], rtol=0, atol=0)
        assert tier.slots.view()[0, h].tolist() == slots
        want = quantize_keys(OPS, torch.from_numpy(substituted)[None, None], 4, G)
        assert torch.equal(tier.buffers["k_codes"].view()[0, h], want.codes[0, 0])
        torch.testing.assert_close(tier.buffers["k_scale"].view()[0, h], want.scale[0, 0], rtol=1e-6, atol=1e-6)


def test_a_full_overflow_pool_freezes_tracing():
    """Each group's tokens are 10x smaller than the last's: every flush would take a new pool."""
    k = torch.randn(1, 1, 4 * G, D) * torch.repeat_interleave(10.0 ** -torch.arange(4.0), G)[None, None, :, None]
    tier = traced_tier(outliers=3, overflow=4)
    tier.add(k, torch.randn_like(k))
    slots = tier.slots.view()[0, 0].tolist()
    assert all(s >= 0 for s in slots[0] + slots[1])  # groups 0, 1 traced; 3 members pushed out
    assert slots[2] == slots[3] == [-1, -1, -1]  # 1 free slot < 3 members: frozen
    assert int(tier.over_valid.sum()) == 3
    assert torch.equal(tier.pool_k[0, 0], k[0, 0, G : 2 * G][torch.tensor(slots[1])])
    plain = quantize_keys(OPS, k[..., 2 * G :, :], 4, G)  # frozen groups quantize as plain KIVI
    assert torch.equal(tier.buffers["k_codes"].view()[..., 2 * G // 8 :, :], plain.codes)


def test_traced_slots_are_read_once_from_the_pools():
    """partial() equals softmax attention over the dequantized groups without their traced slots,
    plus the outlier pool, plus the valid overflow entries, per head."""
    k = keys_with_small_tokens(6, seed=3)
    v = torch.randn_like(k)
    tier = traced_tier(outliers=3, overflow=5)
    tier.BLOCK_GROUPS = 4  # two blocks, merged by lse
    tier.add(k, v)
    q = torch.randn(1, 4, 2, D)
    out, lse = tier.partial(q, 0.3, None, True)
    for h in range(2):
        pool, over, slots, substituted = reference_trace(k[0, h].numpy(), 3, 5)
        keys_hat = dequantize_keys(OPS, quantize_keys(OPS, torch.from_numpy(substituted)[None, None], 4, G))[0, 0]
        values_hat = tier.block(0, 6)[1][0, h]
        hidden = {g * G + s for g, row in enumerate(slots) for s in row if s >= 0}
        seen = [i for i in range(6 * G) if i not in hidden]
        keys = torch.cat([keys_hat[seen], k[0, h, pool], k[0, h, over]])
        values = torch.cat([values_hat[seen], v[0, h, pool], v[0, h, over]])
        for qh in (2 * h, 2 * h + 1):
            scores = q[0, qh] @ keys.T * 0.3
            torch.testing.assert_close(lse[0, qh], torch.logsumexp(scores, -1), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out[0, qh], torch.softmax(scores, -1) @ values, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prompt,quantized,residual", [
    (20, 0, 20), (32, 0, 32), (33, 0, 33),  # < G + R: nothing flushed, whatever the length
    (48, 32, 16), (49, 32, 17),             # = G + R and one more
    (101, 64, 37),                          # not a multiple of G
])
def test_prefill_flush_boundaries(prompt, quantized, residual):
    layer = LayerCache(OPS, 0, quantization=OTT(group=G, residual=16, skip_layers=0))
    g = torch.Generator().manual_seed(prompt)
    q, k, v = (torch.randn(1, h, prompt, D, generator=g) for h in (4, 2, 2))
    layer.attend(q, k, v, 0.2)
    assert (layer.quantized.length, layer.newest.length) == (quantized, residual)
    assert layer.quantized.slots.length == quantized // G
    for step in range(G):  # decode: one more group flushes exactly when the residual reaches G + R
        layer.attend(*(torch.randn(1, h, 1, D, generator=g) for h in (4, 2, 2)), 0.2)
        assert layer.quantized.length == quantized + G * (residual + step + 1 >= G + 16)


def test_first_layers_trace_nothing_by_default():
    config = OTT()
    assert [type(config.new_tier(OPS, i)) for i in range(3)] == [QuantizedTier, QuantizedTier, TracedTier]
    assert (config.bits, config.group, config.residual, config.outliers, config.overflow) == (2, 32, 64, 3, 32)  # kvrt's measured defaults (issue 14)


def test_stored_bytes_count_the_pools_and_slots():
    tier = traced_tier(outliers=3, overflow=32, bits=2)
    tier.add(keys_with_small_tokens(4), torch.randn(1, 2, 4 * G, D))
    arrays = [tier.pool_k, tier.pool_v, tier.pool_norm, tier.over_k, tier.over_v, tier.over_valid, tier.slots.data]
    assert all(a is not None for a in arrays)
    expected = sum(a.numel() * a.element_size() for a in list(tier.buffers[n].data for n in tier.buffers) + arrays)
    assert sum(OPS.nbytes(a) for a in tier.arrays()) == expected


@pytest.fixture(scope="module")
def runtime(tiny_model_dir):
    return TorchRuntime(tiny_model_dir("llama"))


def test_ott_without_outliers_is_kivi_exactly(runtime):
    ids = token_ids(130, seed=4)
    kivi, _ = run_spec(runtime, "kivi:bits=2,group=32,residual=16", ids, 70)
    none, cache = run_spec(runtime, "ott:bits=2,group=32,residual=16,outliers=0,skip_layers=0", ids, 70)
    assert all(isinstance(layer.quantized, TracedTier) for layer in cache.layers)
    assert torch.equal(none, kivi)
    traced, _ = run_spec(runtime, "ott:bits=2,group=32,residual=16,skip_layers=0", ids, 70)
    assert not torch.equal(traced, kivi)  # with outliers it really is different
