"""Token logprobs through the engine (kvrt/generation/logprobs.py): the values must be the model's own
log-softmax for the same ids, from the logits sampling reads."""

from __future__ import annotations

import numpy as np
import pytest

from kvrt.generation.logprobs import log_softmax, score
from kvrt.generation.sampling import SamplingParams
from kvrt.serving.engine import Engine

GREEDY = SamplingParams(temp=0)


@pytest.fixture
def tiny(tiny_qwen2):
    return tiny_qwen2


def model_logprobs(model, ids: list[int]) -> np.ndarray:
    """Log-softmax of the model's logits at every position of `ids`, one forward over a full cache."""
    runtime = model.runtime
    logits = runtime.forward(ids, runtime.new_cache("full"), all_logits=True)
    return np.stack([log_softmax(row) for row in runtime.ops.to_numpy(logits)])


def served(model, ids, spec="full", **kwargs):
    engine = Engine(model, cache=spec, prefill_chunk=16).start()
    try:
        handle = engine.submit(ids, params=GREEDY, **kwargs)
        handle.text()
        return handle
    finally:
        engine.stop()


def test_logprobs_are_the_models_log_softmax_for_the_prompt_and_each_token(tiny):
    ids = tiny.tokenizer.encode("one two three four " * 3)
    handle = served(tiny, ids, max_tokens=5, logprobs=3, prompt_logprobs=True)
    expected = model_logprobs(tiny, ids + handle.tokens)
    assert [s.token for s in handle.prompt_scores] == ids[1:]
    assert np.allclose([s.logprob for s in handle.prompt_scores], [expected[i, t] for i, t in enumerate(ids[1:])],
                       atol=1e-4)
    assert [s.token for s in handle.scores] == handle.tokens
    at = len(ids) - 1  # the prompt's last position scores the first sampled token
    assert np.allclose([s.logprob for s in handle.scores],
                       [expected[at + j, t] for j, t in enumerate(handle.tokens)], atol=1e-4)
    for j, s in enumerate(handle.scores):
        best = np.argsort(-expected[at + j], kind="stable")[:3]
        assert [t for t, _ in s.top] == list(best) and s.top[0][0] == s.token  # greedy picks the likeliest


def test_max_tokens_zero_scores_the_prompt_alone_under_any_spec(tiny):
    """A prompt is scored in its prefill, before compression: the same under every spec."""
    ids = tiny.tokenizer.encode("one two three four " * 6)
    full = served(tiny, ids, max_tokens=0, logprobs=1, prompt_logprobs=True)
    evicting = served(tiny, ids, "snapkv:budget=24,window=8+kivi:bits=2,group=16,residual=8", max_tokens=0,
                      logprobs=1, prompt_logprobs=True)
    assert full.tokens == [] and full.finish_reason == "length" and full.completion_tokens == 0
    assert len(full.prompt_scores) == len(ids) - 1
    assert np.allclose([s.logprob for s in full.prompt_scores], [s.logprob for s in evicting.prompt_scores],
                       atol=1e-5)


def test_top_alternatives_are_ordered_and_the_token_may_be_outside_them():
    row = np.array([0.0, 3.0, 1.0, 2.0])
    scored = score(row, 0, 2)
    assert [t for t, _ in scored.top] == [1, 3]
    assert scored.logprob == pytest.approx(float(log_softmax(row)[0]))
    assert score(row, 2, 0).top == [] and len(score(row, 2, 9).top) == 4
