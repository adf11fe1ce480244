"""The prompt cache across requests (kvrt/serving/prompt_cache.py), on the engine behind `kvrt serve`.

A conversation's turns through the engine must give the tokens the same turns give through a chat
session's cache (each turn continues the last one's cache), for every spec; for `full` also the
tokens of a run without the prompt cache. The tiny random model runs every spec on both backends;
the default model runs real chat turns."""

from __future__ import annotations

import pytest

import kvrt
from kvrt.cache.spec import CacheSpec
from kvrt.generation.request import Request
from kvrt.generation.sampling import SamplingParams
from kvrt.generation.stream import stream_alone
from kvrt.serving.engine import Engine
from kvrt.serving.prompt_cache import PromptCache

from generation.test_batch import TINY_SPECS

GREEDY = SamplingParams(temp=0)


@pytest.fixture
def tiny(tiny_qwen2):
    return tiny_qwen2


def conversations(model, count: int = 3) -> list[list[list[int]]]:
    """Per conversation, the new tokens of each of its three turns (of different lengths)."""
    encode = model.tokenizer.encode
    return [[encode(f"{c}{t} " + "one two three four " * (1 + t) + "five " * c) for t in range(3)] for c in range(count)]


def chat_turns(model, spec: str, turns: list[list[int]], max_tokens: int) -> tuple[list[list[int]], list[list[int]]]:
    """(each turn's prompt, each turn's tokens) with one cache carried from turn to turn, as a
    ChatSession carries it: a turn's prompt is everything so far plus its new tokens."""
    cache, held, prompts, outputs = None, [], [], []
    for new in turns:
        prompt = (prompts[-1] + outputs[-1] if prompts else []) + new
        request = Request(model, prompt[len(held):], CacheSpec.parse(spec), GREEDY, max_tokens, cache=cache)
        cache = request.cache
        list(stream_alone(model, request))
        held = (prompt + request.tokens)[: cache.offset]
        prompts.append(prompt)
        outputs.append(request.tokens)
    return prompts, outputs


def engine_turns(model, spec: str, prompts_per_talk: list[list[list[int]]], max_tokens: int, first_alone=False,
                 **engine):
    """Each turn of every conversation submitted together (so they share batches), but the very
    first request alone if `first_alone`; (tokens, cached tokens, metrics)."""
    server = Engine(model, cache=spec, max_batch=4, prefill_chunk=16, **engine).start()
    try:
        tokens, cached = [], []
        for turn in range(len(prompts_per_talk[0])):
            handles = []
            for i, prompts in enumerate(prompts_per_talk):
                handles.append(server.submit(prompts[turn], max_tokens=max_tokens, params=GREEDY))
                if first_alone and turn == i == 0:
                    handles[0].text()
            tokens.append([tokens_of(h) for h in handles])
            cached.append([h.cached_tokens for h in handles])
        return tokens, cached, server.metrics()
    finally:
        server.stop()


def tokens_of(handle) -> list[int]:
    handle.text()  # waits for the end
    return handle.tokens


@pytest.mark.parametrize("spec", TINY_SPECS)
def test_turns_through_the_engine_continue_as_a_chat_session_does(tiny, spec):
    talks = [chat_turns(tiny, spec, turns, 5) for turns in conversations(tiny)]
    tokens, cached, metrics = engine_turns(tiny, spec, [prompts for prompts, _ in talks], 5)
    for turn in range(3):
        assert tokens[turn] == [outputs[turn] for _, outputs in talks], turn
    # every later turn continued its conversation: all it held (its prompt and reply but the last token)
    assert cached[0] == [0, 0, 0]
    for turn in (1, 2):
        assert cached[turn] == [len(p[turn - 1]) + len(o[turn - 1]) - 1 for p, o in talks]
    assert metrics["prompt_cache_hits_total"] == 6 and metrics["prompt_cache_misses_total"] == 3
    assert metrics["prompt_cache_tokens_reused_total"] == sum(map(sum, cached))
    assert metrics["prompt_cache_entries"] == 3 and metrics["prompt_cache_bytes"] > 0


def test_full_reuses_any_shared_prefix_and_gives_the_tokens_of_no_prompt_cache(tiny):
    """`full` keeps every token as it came, so a prefix shared with another conversation (a system
    prompt) is reused too, copied: the conversation it came from goes on unharmed."""
    system = tiny.tokenizer.encode("you are a counting assistant " * 2)
    talks = [[system + turns[0], *turns[1:]] for turns in conversations(tiny)]
    prompts = [chat_turns(tiny, "full", turns, 5)[0] for turns in talks]
    with_cache = engine_turns(tiny, "full", prompts, 5, first_alone=True)
    without = engine_turns(tiny, "full", prompts, 5, first_alone=True, prompt_cache=0)
    assert with_cache[0] == without[0]
    assert with_cache[1][0] == [0, len(system), len(system)]  # the first turns after the first share its system prompt
    assert without[1] == [[0, 0, 0]] * 3 and without[2]["prompt_cache_entries"] == 0


def test_a_compressed_cache_serves_only_the_requests_that_extend_it(tiny):
    """A compressing spec's entry is not cut back for a request that only shares a prefix (the same
    prompt again): that request starts afresh and gets the same tokens."""
    spec = "kivi:bits=2,group=16,residual=8"
    prompt = conversations(tiny)[0][0]
    server = Engine(tiny, cache=spec, prefill_chunk=16).start()
    try:
        first = server.submit(prompt, max_tokens=5, params=GREEDY)
        first_text = first.text()
        again = server.submit(prompt, max_tokens=5, params=GREEDY)
        assert again.text() == first_text and again.cached_tokens == 0
    finally:
        server.stop()


def test_a_request_that_opts_out_neither_reads_nor_leaves_an_entry(tiny):
    prompt = conversations(tiny)[0][0]
    server = Engine(tiny, cache="full", prefill_chunk=16).start()
    try:
        server.submit(prompt, max_tokens=4, params=GREEDY, prompt_cache=False).text()
        assert server.metrics()["prompt_cache_entries"] == 0
        server.submit(prompt, max_tokens=4, params=GREEDY).text()
        opted_out = server.submit(prompt, max_tokens=4, params=GREEDY, prompt_cache=False)
        opted_out.text()
        assert opted_out.cached_tokens == 0 and server.metrics()["prompt_cache_entries"] == 1
    finally:
        server.stop()


def entry_bytes(model, prompt: list[int]) -> int:
    """What the prompt cache holds after one request of this prompt and 4 new tokens."""
    probe = Engine(model, cache="full", prefill_chunk=16).start()
    try:
        probe.submit(prompt, max_tokens=4, params=GREEDY).text()
        return probe.metrics()["prompt_cache_bytes"]
    finally:
        probe.stop()


def test_entries_are_bounded_in_bytes_least_recently_used_out_first(tiny):
    prompts = [p[0] for p in conversations(tiny, 4)]
    cache = PromptCache(int(2.5 * entry_bytes(tiny, prompts[0])) + 1)  # room for two entries of about that size
    server = Engine(tiny, cache="full", prefill_chunk=16, prompt_cache=cache.capacity).start()
    try:
        for prompt in prompts[:3]:
            server.submit(prompt, max_tokens=4, params=GREEDY).text()
        held = [entry.ids[: len(prompts[0])] for entry in server.prompts.entries.values()]
        assert server.prompts.nbytes <= cache.capacity and len(held) == 2
        assert prompts[0][: len(held[0])] not in held  # the oldest went first
        again = server.submit(prompts[2], max_tokens=4, params=GREEDY)
        again.text()
        assert again.cached_tokens == len(prompts[2]) - 1
    finally:
        server.stop()


def test_entries_go_before_a_request_waits_for_kv_memory(tiny):
    """The prompt cache's bytes count against --kv-memory: a request that would not fit beside them
    is admitted once they are dropped (least recently used first), instead of waiting for ever."""
    from kvrt.cache.admission import kv_bytes_needed

    prompts = [p[0] for p in conversations(tiny, 3)]
    entry = entry_bytes(tiny, prompts[0])
    budget = kv_bytes_needed(tiny.runtime, CacheSpec.parse("full"), len(prompts[2]), 4, 16) + entry * 3 // 2
    server = Engine(tiny, cache="full", prefill_chunk=16, kv_memory=budget).start()
    try:
        for prompt in prompts[:2]:
            server.submit(prompt, max_tokens=4, params=GREEDY).text()
        assert len(server.prompts) == 2
        last = server.submit(prompts[2], max_tokens=4, params=GREEDY)
        pieces = [last.next(timeout=60)]  # raises queue.Empty if it waits
        while pieces[-1] is not None:
            pieces.append(last.next(timeout=60))
        assert last.finish_reason == "length"
        held = [e.ids[: len(p)] for e, p in zip(server.prompts.entries.values(), prompts[1:])]
        assert held == prompts[1:]  # the oldest entry went, the newer stayed
    finally:
        server.stop()


# --- the default model, real chat turns -------------------------------------------------------------
SYSTEM = "You are a helpful assistant who answers in one or two sentences. " * 12
QUESTIONS = ["Tell me a short fact about the moon.", "Now one about Mars.", "Which of the two is larger?"]
OTHER = ["What is the capital of France?", "And of Italy?", "Which one is older?"]


def served_chat(model, engine: Engine, questions: list[str], max_tokens: int = 20) -> tuple[list[str], list[int]]:
    """A conversation through the engine as a chat client sends it: the whole conversation each turn."""
    messages, replies, cached = [{"role": "system", "content": SYSTEM}], [], []
    for question in questions:
        messages.append({"role": "user", "content": question})
        ids = model.tokenizer.encode_chat(messages, add_generation_prompt=True)
        handle = engine.submit(ids, max_tokens=max_tokens, params=GREEDY)
        replies.append(handle.text())
        cached.append(handle.cached_tokens)
        messages.append({"role": "assistant", "content": replies[-1]})
    return replies, cached


@pytest.fixture(scope="module")
def default_model(default_model_dir):
    return kvrt.load(str(default_model_dir), backend="torch")


@pytest.mark.model
@pytest.mark.slow
def test_default_model_full_chat_turns_equal_a_server_without_the_prompt_cache(default_model):
    """Two conversations with one system prompt: the second starts from the first's (a copy), and each
    later turn from its own conversation; every reply is the one a server without the cache gives."""
    def run(prompt_cache: int):
        engine = Engine(default_model, cache="full", prompt_cache=prompt_cache).start()
        try:
            return served_chat(default_model, engine, QUESTIONS), served_chat(default_model, engine, OTHER)
        finally:
            engine.stop()

    (first, first_cached), (second, second_cached) = run(2**30)
    assert (first, second) == tuple(replies for replies, _ in run(0))
    system = len(default_model.tokenizer.encode_chat([{"role": "system", "content": SYSTEM}], False))
    assert first_cached[0] == 0 and min(first_cached[1:]) > system
    assert second_cached[0] >= system - 1 and min(second_cached[1:]) > second_cached[0]


@pytest.mark.model
@pytest.mark.slow
@pytest.mark.parametrize("spec", ["snapkv:budget=128+calidrop", "ott:bits=2", "h2o:budget=128+kivi:bits=4"])
def test_default_model_compressed_chat_turns_equal_a_chat_session(default_model, spec):
    engine = Engine(default_model, cache=spec).start()
    try:
        replies, cached = served_chat(default_model, engine, QUESTIONS)
    finally:
        engine.stop()
    session = default_model.chat_session(SYSTEM, cache=spec)
    assert replies == ["".join(session.send(q, max_tokens=20, temp=0)) for q in QUESTIONS]
    assert cached[0] == 0 and min(cached[1:]) > 0
