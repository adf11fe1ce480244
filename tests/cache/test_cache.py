"""The layer cache and the (out, lse) merge, on the torch ops (fp32, atol 1e-5 unless stated)."""

import math

import numpy as np
import pytest
import torch

from kvrt.cache.attention import merge_partials
from kvrt.backends.torch.ops import TorchOps
from kvrt.cache.buffer import SeqBuffer
from kvrt.cache.kvcache import KVCache, LayerCache

OPS = TorchOps()
BLOCKED = TorchOps()
BLOCKED.fused_prefill = False  # exercise the query-block path that the flash shortcut skips


def reference_attention(q, k, v, scale, causal_offset=None):
    """Plain softmax attention with repeat_kv: the obviously-correct twin."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    if causal_offset is not None:
        t, s = q.shape[2], k.shape[2]
        allowed = torch.arange(s)[None, :] <= torch.arange(t)[:, None] + causal_offset
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, -1) @ v, torch.logsumexp(scores, -1)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2), (7, 1)])
@pytest.mark.parametrize("causal_offset", [None, 0, 5])
def test_partial_attention_equals_reference(hq, hkv, causal_offset):
    torch.manual_seed(0)
    q = torch.randn(2, hq, 9, 16)
    s = 9 + (causal_offset or 3)
    k, v = torch.randn(2, hkv, s, 16), torch.randn(2, hkv, s, 16)
    out, lse = OPS.partial_attention(q, k, v, 0.25, causal_offset)
    ref_out, ref_lse = reference_attention(q, k, v, 0.25, causal_offset)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    fast, none = OPS.partial_attention(q, k, v, 0.25, causal_offset, with_lse=False)
    assert none is None
    torch.testing.assert_close(fast, ref_out, atol=1e-5, rtol=1e-5)


def test_merge_of_disjoint_key_sets_equals_attention_over_their_union():
    torch.manual_seed(1)
    q = torch.randn(1, 6, 3, 32)
    k, v = torch.randn(1, 2, 50, 32), torch.randn(1, 2, 50, 32)
    cuts = [0, 7, 31, 50]
    parts = [OPS.partial_attention(q, k[:, :, a:b], v[:, :, a:b], 0.2) for a, b in zip(cuts, cuts[1:])]
    out, lse = merge_partials(OPS, parts)
    ref_out, ref_lse = reference_attention(q, k, v, 0.2)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ops", [BLOCKED, OPS], ids=["query-blocks", "flash"])
def test_layer_cache_prefill_equals_causal_attention(ops):
    torch.manual_seed(2)
    layer = LayerCache(ops, 0, query_block=16)  # 50 tokens -> 4 blocks, the last one partial
    q, k, v = torch.randn(1, 4, 50, 8), torch.randn(1, 2, 50, 8), torch.randn(1, 2, 50, 8)
    out = layer.attend(q, k, v, 0.3)
    ref, _ = reference_attention(q, k, v, 0.3, causal_offset=0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert layer.offset == 50


@pytest.mark.parametrize("ops", [BLOCKED, OPS], ids=["query-blocks", "flash"])
def test_continuing_a_prompt_equals_feeding_it_at_once(ops):
    """Prefill, then a second chunk, then single tokens: identical to one causal pass."""
    torch.manual_seed(3)
    q, k, v = torch.randn(1, 4, 40, 8), torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8)
    layer = LayerCache(ops, 0, query_block=8)
    pieces = [(0, 20), (20, 37), (37, 38), (38, 39), (39, 40)]
    outs = [layer.attend(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], 0.3) for a, b in pieces]
    ref, _ = reference_attention(q, k, v, 0.3, causal_offset=0)
    torch.testing.assert_close(torch.cat(outs, dim=2), ref, atol=1e-5, rtol=1e-5)


def test_trim_then_refeed_gives_the_same_output():
    torch.manual_seed(4)
    q, k, v = torch.randn(1, 2, 30, 8), torch.randn(1, 2, 30, 8), torch.randn(1, 2, 30, 8)
    layer = LayerCache(OPS, 0)
    first = layer.attend(q, k, v, 0.5)
    assert layer.trim(10) == 10 and layer.offset == 20
    again = layer.attend(q[:, :, 20:], k[:, :, 20:], v[:, :, 20:], 0.5)
    torch.testing.assert_close(again, first[:, :, 20:], atol=1e-6, rtol=1e-6)


def test_buffer_grows_in_steps_and_keeps_rows():
    buf = SeqBuffer(OPS, step=4)
    rows = [torch.full((1, 2, 1, 3), float(i)) for i in range(9)]
    capacities = []
    for r in rows:
        buf.append(r)
        capacities.append(buf.capacity)
    assert capacities == [4, 4, 4, 4, 8, 8, 8, 8, 12] and buf.length == 9
    torch.testing.assert_close(buf.view(), torch.cat(rows, dim=2))


def test_nbytes_is_measured_from_the_stored_arrays():
    cache = KVCache(OPS, num_layers=3)
    for layer in cache.layers:
        layer.attend(torch.randn(1, 4, 300, 16), torch.randn(1, 2, 300, 16), torch.randn(1, 2, 300, 16), 0.25)
    stored = sum(t.numel() * t.element_size() for layer in cache.layers
                 for t in (layer.newest.keys.data, layer.newest.values.data))
    assert cache.nbytes() == stored
    # 300 tokens round up to the 64-row growth step: 320 rows x 2 heads x 16 x fp32 x (K, V) x 3 layers
    assert stored == 3 * 2 * 320 * 2 * 16 * 4


def test_rewind_repairs_layers_left_uneven_by_an_interrupted_forward():
    cache = KVCache(OPS, num_layers=2)
    for layer in cache.layers:
        layer.attend(torch.randn(1, 2, 10, 4), torch.randn(1, 2, 10, 4), torch.randn(1, 2, 10, 4), 0.5)
    cache.layers[0].attend(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4), 0.5)
    assert cache.offset == 10
    cache.rewind_to(cache.offset)
    assert [layer.offset for layer in cache.layers] == [10, 10]
    assert math.isclose(cache.layers[0].newest.length, 10)


def test_soft_capped_attention_equals_the_twin():
    """Gemma 2's attention-logit soft-capping: softcap·tanh(scores/softcap) before the softmax,
    on every path (prompt, decode, no-lse), equal on both backends."""
    torch.manual_seed(4)
    capped = TorchOps()
    capped.softcap = 2.0
    q, k, v = torch.randn(1, 4, 6, 16) * 3, torch.randn(1, 2, 10, 16) * 3, torch.randn(1, 2, 10, 16)
    g = 2
    scores = (q @ k.repeat_interleave(g, 1).transpose(-1, -2)) * 0.25
    scores = torch.tanh(scores / 2.0) * 2.0
    mask = torch.arange(10)[None, :] <= torch.arange(6)[:, None] + 4
    scores = scores.masked_fill(~mask, float("-inf"))
    ref = torch.softmax(scores, -1) @ v.repeat_interleave(g, 1)
    out, lse = capped.partial_attention(q, k, v, 0.25, 4)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), atol=1e-5, rtol=1e-5)
    fast, _ = capped.partial_attention(q, k, v, 0.25, 4, with_lse=False)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    uncapped, _ = OPS.partial_attention(q, k, v, 0.25, 4)
    assert (uncapped - ref).abs().max() > 1e-2  # the cap matters at these magnitudes
    mx = pytest.importorskip("mlx.core")
    from kvrt.backends.mlx.ops import MLXOps

    mlx_ops = MLXOps()
    mlx_ops.softcap = 2.0
    got, _ = mlx_ops.partial_attention(*(mx.array(x.numpy()) for x in (q, k, v)), 0.25, 4)
    torch.testing.assert_close(torch.from_numpy(np.array(got)), ref, atol=1e-5, rtol=1e-5)
