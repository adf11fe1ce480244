"""One Model, several threads: each call owns its cache and its stats."""

import threading

import pytest

import kvrt

SPECS = ["full", "snapkv:budget=24,window=8", "ott:bits=2,group=16,residual=8", "streaming:budget=20+calidrop",
         "h2o:budget=24+kivi:bits=4,group=16,residual=8", "full", "pyramidkv:budget=24,window=8", "kivi:bits=2,group=16"]
PROMPTS = ["one two three " * (2 + i) for i in range(len(SPECS))]


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_concurrent_calls_with_different_specs_equal_lone_calls(tiny_model_dir, backend):
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    model = kvrt.load(str(tiny_model_dir("qwen2")), backend=backend)
    calls = [dict(prompt=p, cache=s, max_tokens=6 + i, chat_template=False) for i, (p, s) in enumerate(zip(PROMPTS, SPECS))]
    alone = [model.generate(**c) for c in calls]
    results: list = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def work(i):
        start.wait()  # all threads generate at once
        results[i] = model.generate(**calls[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for lone, got, call in zip(alone, results, calls):
        assert got is not None, "a thread died"
        assert got.text == lone.text, call
        assert (got.stats.prompt_tokens, got.stats.generation_tokens, got.stats.kv_bytes) == \
               (lone.stats.prompt_tokens, lone.stats.generation_tokens, lone.stats.kv_bytes), call
        assert got.stats.cache.get("kernels") == lone.stats.cache.get("kernels"), call
    assert len({id(r.stats) for r in results}) == len(results)  # no stats object is shared


def test_streams_interleaved_on_one_thread_keep_their_own_stats(tiny_model_dir):
    model = kvrt.load(str(tiny_model_dir("llama")), backend="torch")
    a = model.stream("alpha beta", max_tokens=5, chat_template=False)
    b = model.stream("gamma delta epsilon zeta", max_tokens=7, chat_template=False, cache="kivi:bits=2,group=16")
    pieces = [next(a, None), next(b, None)]
    rest_a, rest_b = a.text(), b.text()
    assert a.stats.prompt_tokens != b.stats.prompt_tokens
    assert a.stats.generation_tokens <= 5 and b.stats.generation_tokens <= 7
    assert (pieces[0] or "") + rest_a == model.generate("alpha beta", max_tokens=5, chat_template=False).text
    assert "quantized" in b.stats.cache and "quantized" not in a.stats.cache
