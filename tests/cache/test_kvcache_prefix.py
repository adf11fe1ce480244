"""KVCache.prefix: a copy of a cache's first tokens that the prompt cache hands out while the cache
itself stays an entry (kvrt/serving/prompt_cache.py): feeding the copy must leave the original as
it was, and give the logits a fresh cache of the same tokens gives."""

from __future__ import annotations

import numpy as np
import pytest



@pytest.fixture
def tiny(tiny_qwen2):
    return tiny_qwen2


def as_numpy(x) -> np.ndarray:
    return x.float().numpy() if hasattr(x, "numpy") else np.asarray(x, dtype=np.float32)


def snapshot(cache) -> list[np.ndarray]:
    return [as_numpy(a) for layer in cache for a in layer.arrays()]


@pytest.mark.parametrize("spec", ["full", "kivi:bits=2,group=16,residual=32"])
def test_a_prefix_copy_fed_more_tokens_leaves_the_original_whole(tiny, spec):
    runtime = tiny.runtime
    prompt, more = list(range(10, 50)), list(range(60, 70))
    original = runtime.new_cache(spec)
    runtime.forward(prompt, original)
    before = snapshot(original)
    copy = original.prefix(30)
    assert copy is not None and copy.offset == 30 and original.offset == 40
    logits = runtime.forward(more, copy, all_logits=True)
    assert all(np.array_equal(a, b) for a, b in zip(before, snapshot(original)))
    fresh = runtime.new_cache(spec)
    runtime.forward(prompt[:30], fresh)
    expected = runtime.forward(more, fresh, all_logits=True)
    np.testing.assert_allclose(as_numpy(logits), as_numpy(expected), atol=1e-5)


def test_no_prefix_cuts_into_compressed_tokens(tiny):
    cache = tiny.runtime.new_cache("snapkv:budget=16,window=4")
    tiny.runtime.forward(list(range(10, 50)), cache)
    assert not cache.can_rewind_to(30) and cache.prefix(30) is None
    assert cache.can_rewind_to(cache.offset) and cache.offset == 40
