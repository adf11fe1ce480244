"""Sliding-window (local) layers in the cache: exact band attention, bounded storage, every spec
composes (kvrt/cache/window.py). Random q/k/v on both backends' ops; model-level parity with
transformers lives in tests/models/test_architectures.py."""

import numpy as np
import pytest
import torch

from kvrt.backends.torch.ops import TorchOps
from kvrt.cache.kvcache import KVCache, stack_caches

OPS = TorchOps()
W = 12
SPECS = ["full", "streaming:budget=6,sinks=2", "h2o:budget=8", "snapkv:budget=8,window=4", "pyramidkv:budget=8,window=4",
         "snapkv:budget=8,window=4+calidrop", "kivi:bits=2", "ott:bits=2", "snapkv:budget=8,window=4+ott:bits=4"]


def band_attention(q, k, v, scale, first, window):
    """Softmax attention of queries at positions first.. over keys at positions 0.. that lie in
    each query's window (p − window < j ≤ p), with repeat_kv: the obviously-correct twin."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    qpos = torch.arange(q.shape[2])[:, None] + first
    kpos = torch.arange(k.shape[2])[None, :]
    scores = scores.masked_fill(~((kpos <= qpos) & (kpos > qpos - window)), float("-inf"))
    return torch.softmax(scores, -1) @ v


def feed(cache, q, k, v, scale=0.3, chunks=(30,)):
    """Prompt in `chunks` tokens at a time, then the rest one token at a time; every output."""
    outs, at = [], 0
    for size in chunks:
        sl = slice(at, at + size)
        outs.append(cache.layers[0].attend(q[:, :, sl], k[:, :, sl], v[:, :, sl], scale))
        at += size
    for t in range(at, q.shape[2]):
        outs.append(cache.layers[0].attend(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], scale))
    return torch.cat(outs, dim=2)


def qkv(n=60, hq=4, hkv=2, d=16, seed=0):
    torch.manual_seed(seed)
    return torch.randn(1, hq, n, d), torch.randn(1, hkv, n, d), torch.randn(1, hkv, n, d)


@pytest.mark.parametrize("chunks", [(30,), (5, 9, 16), (1,)], ids=["prompt", "chunks", "decode-only"])
def test_full_local_layer_equals_band_attention(chunks):
    q, k, v = qkv()
    cache = KVCache(OPS, 1, "full", query_block=8, windows=[W])
    out = feed(cache, q, k, v, chunks=chunks)
    torch.testing.assert_close(out, band_attention(q, k, v, 0.3, 0, W), atol=1e-5, rtol=1e-5)


def test_band_mask_in_the_ops_equals_the_twin():
    q, k, v = qkv(n=20)
    for offset in (0, 7):
        kk, vv = torch.cat([torch.randn(1, 2, offset, 16), k], 2), torch.cat([torch.randn(1, 2, offset, 16), v], 2)
        out, _ = OPS.partial_attention(q, kk, vv, 0.3, offset, window=5)
        fast, _ = OPS.partial_attention(q, kk, vv, 0.3, offset, with_lse=False, window=5)
        ref = band_attention(q, kk, vv, 0.3, offset, 5)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


def test_a_local_layer_holds_at_most_its_window():
    q, k, v = qkv(n=200)
    cache = KVCache(OPS, 1, "full", windows=[W])
    layer = cache.layers[0]
    feed(cache, q[:, :, :40], k[:, :, :40], v[:, :, :40])
    assert layer.newest.length == W - 1 and layer.offset == 40
    for t in range(40, 200):
        layer.attend(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], 0.3)
        assert layer.newest.length == W - 1
    # the allocation is counted, slack included, and stays bounded as the window moves
    per_token = 2 * 2 * 16 * 4
    assert W * per_token <= layer.nbytes() <= (W + 2 * layer.newest.keys.step) * per_token


@pytest.mark.parametrize("spec", SPECS)
def test_every_spec_attends_only_inside_the_window(spec):
    """Whatever a spec keeps, a local layer's output is attention over the kept tokens that lie in
    the window, and it never holds more than W − 1 tokens per KV head between steps."""
    q, k, v = qkv(n=70, seed=3)
    cache = KVCache(OPS, 1, spec, query_block=8, windows=[W])
    layer = cache.layers[0]
    assert layer.quantized is None and layer.calibration is None  # a window holds its tokens as they came
    layer.attend(q[:, :, :30], k[:, :, :30], v[:, :, :30], 0.3)
    for t in range(30, 70):
        held = {int(p) for p in _positions(layer)[0, 0]}
        out = layer.attend(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], 0.3)
        visible = sorted(p for p in held if p > t - W) + [t]
        ref = band_attention(q[:, :1, t:t + 1], k[:, :1, visible], v[:, :1, visible], 0.3, len(visible) - 1, W)
        torch.testing.assert_close(out[:, :1], ref, atol=1e-5, rtol=1e-5)
        assert _alive(layer, t + 1).max() <= W - 1
        assert layer.kept.length + layer.newest.length <= W - 1


def test_a_global_layer_beside_a_local_one_takes_the_spec_as_is():
    cache = KVCache(OPS, 2, "snapkv:budget=8,window=4+ott:bits=2", windows=[W, None])
    assert cache.layers[0].quantized is None and cache.layers[1].quantized is not None


@pytest.mark.parametrize("window", [W, None], ids=["local", "global"])
@pytest.mark.parametrize("spec", ["full", "h2o:budget=8", "snapkv:budget=8,window=4", "streaming:budget=6,sinks=2"])
def test_batched_layers_equal_each_row_alone(spec, window):
    """Rows at different positions (and, in a local layer, sliding by different amounts) each
    equal their lone run; streaming and H2O evict every step, so each row's positions must stay its own."""
    lengths = [9, 25, 40]
    lone, caches = [], []
    for i, n in enumerate(lengths):
        q, k, v = qkv(n=n + 12, seed=10 + i)
        alone = KVCache(OPS, 1, spec, query_block=8, windows=[window])
        lone.append(feed(alone, q, k, v, chunks=(n,))[:, :, n:])
        cache = KVCache(OPS, 1, spec, query_block=8, windows=[window])
        feed(cache, q[:, :, :n], k[:, :, :n], v[:, :, :n], chunks=(n,))
        caches.append((cache, q, k, v, n))
    batch = stack_caches([c for c, *_ in caches])
    for step in range(12):
        q = torch.cat([c[1][:, :, c[4] + step:c[4] + step + 1] for c in caches])
        k = torch.cat([c[2][:, :, c[4] + step:c[4] + step + 1] for c in caches])
        v = torch.cat([c[3][:, :, c[4] + step:c[4] + step + 1] for c in caches])
        out = batch.layers[0].attend(q, k, v, 0.3)
        for b in range(len(lengths)):
            torch.testing.assert_close(out[b:b + 1], lone[b][:, :, step:step + 1], atol=1e-5, rtol=1e-5)


def test_chat_rewind_stops_where_the_window_was_let_go():
    q, k, v = qkv(n=40)
    cache = KVCache(OPS, 1, "full", windows=[W])
    feed(cache, q[:, :, :8], k[:, :, :8], v[:, :, :8], chunks=(8,))
    assert cache.rewind_to(5)  # nothing has left the window yet
    cache = KVCache(OPS, 1, "full", windows=[W])
    feed(cache, q, k, v)
    # position 39's window starts at 28, which the layer let go of: the caller must rebuild
    assert not cache.rewind_to(39)


def test_mlx_local_layer_equals_torch():
    mx = pytest.importorskip("mlx.core")
    from kvrt.backends.mlx.ops import MLXOps

    q, k, v = qkv(n=40, seed=5)
    expected = feed(KVCache(OPS, 1, "snapkv:budget=8,window=4", query_block=8, windows=[W]), q, k, v)
    arrays = [mx.array(x.numpy()) for x in (q, k, v)]
    cache = KVCache(MLXOps(), 1, "snapkv:budget=8,window=4", query_block=8, windows=[W])
    outs, layer = [], cache.layers[0]
    outs.append(layer.attend(arrays[0][:, :, :30], arrays[1][:, :, :30], arrays[2][:, :, :30], 0.3))
    for t in range(30, 40):
        outs.append(layer.attend(*(a[:, :, t:t + 1] for a in arrays), 0.3))
    got = np.concatenate([np.array(o) for o in outs], axis=2)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-4)


def _positions(layer):
    """Absolute positions of every token the layer holds, per KV head: int [B, Hkv, S]."""
    newest = torch.arange(layer.newest.length)[None, None] + layer.newest_start
    newest = newest.expand(1, 2, -1)  # qkv()'s two KV heads
    if not layer.kept.length:
        return newest
    return torch.cat([layer.kept.positions.long(), newest], dim=2)


def _alive(layer, next_position):
    """Tokens per KV head the next query can still see."""
    return (_positions(layer) > next_position - W).sum(dim=2)
