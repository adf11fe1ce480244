"""Batched decode over compressed caches: a sequence's greedy tokens are the same alone or in a batch.

Rows of different prompt lengths join a batch at different steps and leave it as they finish;
every cache spec (each eviction method, +calidrop, kivi, ott and their compositions) must give
each row exactly the tokens it gets alone, on torch and on MLX.
"""

import numpy as np
import pytest

import kvrt
from kvrt.cache.admission import kv_bytes_needed
from kvrt.generation.request import Request
from kvrt.generation.scheduler import Batch, run_requests
from kvrt.cache.kvcache import stack_caches
from kvrt.generation.sampling import SamplingParams
from kvrt.cache.spec import CacheSpec

# small budgets and groups, so that the tiny model's prompts are evicted, flushed and traced
TINY_SPECS = [
    "full", "snapkv:budget=24,window=8", "pyramidkv:budget=24,window=8", "streaming:budget=20,sinks=2",
    "h2o:budget=24", "snapkv:budget=24,window=8+calidrop", "pyramidkv:budget=24,window=8+calidrop",
    "streaming:budget=20,sinks=2+calidrop", "h2o:budget=24+calidrop", "snapkv:budget=24,window=8+calidrop:offload=int2",
    "h2o:budget=24+calidrop:rule=paper",
    "kivi:bits=2,group=16,residual=8", "kivi:bits=4,group=16,residual=0", "ott:bits=4,group=32,residual=8", "ott:bits=2,group=16,residual=8,skip_layers=0",
    "snapkv:budget=24,window=8+ott:bits=2,group=16,residual=8,skip_layers=0", "h2o:budget=24+kivi:bits=4,group=16,residual=8",
    "streaming:budget=20,sinks=2+calidrop+kivi:bits=2,group=16,residual=8",
]


def lone_tokens(model, prompts, spec, max_tokens):
    out = []
    for ids in prompts:
        row = Request(model, ids, CacheSpec.parse(spec), SamplingParams(), max_tokens)
        run_requests(model, [row], max_batch=1)
        out.append(row.tokens)
    return out


def staggered_tokens(model, prompts, spec, max_tokens):
    """Two rows start together, a third joins after two steps, a fourth after three; rows leave as they end."""
    rows = [Request(model, ids, CacheSpec.parse(spec), SamplingParams(), max_tokens - i) for i, ids in enumerate(prompts)]
    for row in rows:
        while not row.prefill(16):  # chunked prefill, as the server runs it
            pass
        assert not row.start()
    batch = Batch(model, rows[:2])
    for join_after, row in ((2, rows[2]), (1, rows[3])):
        for _ in range(join_after):
            batch.step()
        batch.join(row)
    while batch.rows:
        batch.step()
    return [row.tokens for row in rows]


@pytest.fixture(scope="module", params=["torch", "mlx"])
def tiny(request, tiny_model_dir):
    if request.param == "mlx":
        pytest.importorskip("mlx.core")
    model = kvrt.load(str(tiny_model_dir("qwen2")), backend=request.param)
    prompts = [model.tokenizer.encode("one two three four " * k) for k in (9, 3, 14, 6)]
    return model, prompts


@pytest.mark.parametrize("spec", TINY_SPECS)
def test_batched_greedy_tokens_equal_lone_ones(tiny, spec):
    model, prompts = tiny
    max_tokens = 14
    alone = lone_tokens(model, prompts, spec, max_tokens)
    alone = [tokens[: max_tokens - i] for i, tokens in enumerate(alone)]  # the staggered rows ask for fewer
    assert staggered_tokens(model, prompts, spec, max_tokens) == alone


@pytest.mark.parametrize("spec", ["full", "h2o:budget=24+calidrop", "ott:bits=2,group=16,residual=8,skip_layers=0",
                                  "snapkv:budget=24,window=8+ott:bits=2,group=16,residual=8,skip_layers=0",
                                  "kivi:bits=4,group=16,residual=0"])
def test_batch_decode_logits_match_lone_decode(tiny, spec, monkeypatch):
    """The numbers behind the tokens: each row's logits in the batch equal its lone logits. Rows of
    different lengths flush their groups at different steps, each in its own place: a quantizer's
    flush never regroups the layer (stacks its rows anew)."""
    model, prompts = tiny
    runtime, ops = model.runtime, model.runtime.ops
    caches, tokens = [], [7, 11, 13, 17]
    for ids in prompts:
        cache = runtime.new_cache(spec)
        runtime.forward(ids, cache)
        caches.append(cache)
    batched = stack_caches(caches)
    if "kivi" in spec or "ott" in spec:
        monkeypatch.setattr("kvrt.cache.kvcache.stack_layers", lambda parts: pytest.fail("a flush regrouped the layer"))
    lone = [runtime.new_cache(spec) for _ in prompts]
    for cache, ids in zip(lone, prompts):
        runtime.forward(ids, cache)
    for step in range(20):
        got = ops.to_numpy(runtime.decode(tokens, batched))
        want = np.stack([ops.to_numpy(runtime.forward([t], c))[-1] for t, c in zip(tokens, lone)])
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5, err_msg=f"step {step}")
        tokens = [(t * 31 + step) % 50 + 3 for t in tokens]


@pytest.mark.parametrize("spec", TINY_SPECS)
def test_a_prompt_in_chunks_compresses_as_a_whole_one(tiny, spec):
    """The server prefills long prompts in chunks; held until the last chunk, the cache compresses
    exactly as after the whole prompt (SnapKV's window, PyramidKV's budgets, H2O's sums ...)."""
    model, prompts = tiny
    runtime, ops, ids = model.runtime, model.runtime.ops, prompts[2]
    whole = runtime.new_cache(spec)
    runtime.forward(ids, whole)
    chunked = runtime.new_cache(spec)
    for start in range(0, len(ids), 20):
        chunked.hold(start + 20 < len(ids))
        runtime.forward(ids[start : start + 20], chunked)
    assert chunked.nbytes() == whole.nbytes()
    for token in (5, 9, 11):
        a, b = ops.to_numpy(runtime.forward([token], whole)), ops.to_numpy(runtime.forward([token], chunked))
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)


def test_rows_leave_with_their_own_cache_and_the_batch_shrinks(tiny):
    model, prompts = tiny
    spec = CacheSpec.parse("snapkv:budget=24,window=8+kivi:bits=2,group=16,residual=8")
    rows = [Request(model, ids, spec, SamplingParams(), 3 + 4 * i) for i, ids in enumerate(prompts)]
    run_requests(model, rows, max_batch=4)
    for row in rows:
        assert row.cache is None  # freed on leaving
        assert row.stats.generation_tokens == len(row.tokens) and row.stats.kv_bytes > 0
        assert row.stats.cache["quantized"]["tokens"] > 0
    lone = [Request(model, ids, spec, SamplingParams(), 3 + 4 * i) for i, ids in enumerate(prompts)]
    for row in lone:
        run_requests(model, [row], max_batch=1)
    assert [r.stats.kv_bytes for r in rows] == [r.stats.kv_bytes for r in lone]


def test_batch_memory_is_what_its_rows_hold(tiny):
    """A batch is rectangular: its bytes are its rows' own, padded to the longest row."""
    model, prompts = tiny
    runtime = model.runtime
    caches = []
    for ids in prompts:
        cache = runtime.new_cache("full")
        runtime.forward(ids, cache)
        caches.append(cache)
    batched = stack_caches(caches)
    longest = max(caches, key=lambda c: c.offset)
    assert batched.nbytes() == len(caches) * sum(
        model.runtime.ops.nbytes(a) // a.shape[-2] * longest.offset for layer in longest for a in layer.arrays())
    alone = batched.take([1])
    assert alone.offsets().tolist() == [len(prompts[1])]
    assert alone.nbytes() < batched.nbytes() // 3


def test_caches_of_different_specs_do_not_stack(tiny):
    model, prompts = tiny
    a, b = model.runtime.new_cache("full"), model.runtime.new_cache("kivi:bits=2")
    for cache in (a, b):
        model.runtime.forward(prompts[0], cache)
    with pytest.raises(ValueError, match="different specs"):
        stack_caches([a, b])


@pytest.mark.model
@pytest.mark.slow
def test_default_model_batched_greedy_equals_alone_for_every_spec(default_model_dir):
    """The real model on torch, prompts of 98 to 389 tokens, budgets that evict them."""
    model = kvrt.load(str(default_model_dir), backend="torch")
    text = (REPO_README).read_text()
    prompts = [model.tokenizer.encode(text[i * 300 : i * 300 + n]) for i, n in enumerate([900, 250, 1300, 650])]
    for spec in ["full", "snapkv:budget=128", "pyramidkv:budget=128+calidrop", "streaming:budget=128+calidrop",
                 "h2o:budget=128", "kivi:bits=2,group=32,residual=16", "ott:bits=2,group=32,residual=8",
                 "snapkv:budget=128+ott:bits=2,group=32,residual=8", "snapkv:budget=128+calidrop:offload=int2"]:
        alone = [t[: 12 - i] for i, t in enumerate(lone_tokens(model, prompts, spec, 12))]
        assert staggered_tokens(model, prompts, spec, 12) == alone, spec


REPO_README = __import__("pathlib").Path(__file__).resolve().parents[2] / "README.md"


def test_the_engine_thread_serves_both_backends(tiny):
    """kvrt serve's engine runs the model on its own thread (MLX once failed there: lazy weights)."""
    from kvrt.serving.engine import Engine

    model, prompts = tiny
    spec = "h2o:budget=24+calidrop"
    engine = Engine(model, cache=spec, max_batch=3, max_queue=8, prefill_chunk=32).start()
    try:
        handles = [engine.submit(ids, max_tokens=6, params=SamplingParams()) for ids in prompts]
        texts = [h.text() for h in handles]
    finally:
        engine.stop()
    assert texts == [model.generate_ids(ids, max_tokens=6, cache=spec).text for ids in prompts]
    assert all(h.finish_reason in ("stop", "length") and h.completion_tokens <= 6 for h in handles)


@pytest.mark.parametrize("spec", TINY_SPECS)
def test_admission_reserves_what_a_cache_comes_to_hold_and_little_more(tiny, spec):
    """The engine admits by kv_bytes_needed: it must bound what the cache holds at its longest, and
    stay within 10% of it so that the memory a spec saves becomes rows (prompts long enough to
    evict, flush and trace; a 2-layer model's buffers round to whole steps, hence the longer ones)."""
    model, prompts = tiny
    parsed = CacheSpec.parse(spec)
    for ids in prompts + [prompts[0] * 6]:
        cache = model.runtime.new_cache(parsed)
        token = int(model.runtime.ops.argmax_last(model.runtime.forward(ids, cache)[-1]))
        most = cache.nbytes()
        for _ in range(40):
            token = int(model.runtime.ops.argmax_last(model.runtime.forward([token], cache)[-1]))
            most = max(most, cache.nbytes())
        need = kv_bytes_needed(model.runtime, parsed, len(ids), 41)
        assert most <= need, (spec, len(ids))
        if len(ids) >= 200:
            assert need <= 1.1 * most, (spec, len(ids), need / most)
