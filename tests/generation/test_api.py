"""The library API: load, generate, stream, chat, and a chat session that reuses its cache."""

import pytest

import kvrt
from kvrt.errors import KvrtError


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return kvrt.load(str(tiny_model_dir("qwen2")), backend="torch")


def test_generate_returns_text_and_stats(model):
    out = model.generate("hello", max_tokens=6)
    assert isinstance(out.text, str)
    assert out.stats.prompt_tokens > 0 and out.stats.kv_bytes > 0
    assert out.stats.finish_reason in ("length", "eos")


def test_stream_equals_generate_and_seeds_reproduce(model):
    streamed = "".join(model.stream("hello", max_tokens=8, temp=0.9, seed=5))
    again = model.generate("hello", max_tokens=8, temp=0.9, seed=5).text
    assert streamed == again


def test_stop_strings_cut_the_text(model):
    full = model.generate("tell me", max_tokens=12, chat_template=False).text
    assert len(full) > 3
    stop = full[2:4]
    cut = model.generate("tell me", max_tokens=12, chat_template=False, stop=[stop])
    assert cut.text == full[: full.index(stop)] and cut.stats.finish_reason == "stop"


def test_chat_session_reuses_its_cache_and_matches_a_fresh_prefill(model):
    """Turn 2 feeds only its new tokens, yet replies exactly as a fresh run over the whole chat."""
    session = model.chat_session(system_prompt="be brief")
    first = session.send("hi there", max_tokens=6).text()
    full_prompt = len(model.tokenizer.encode_chat(session.messages + [{"role": "user", "content": "and then"}]))
    reply = session.send("and then", max_tokens=6)
    second = reply.text()
    assert reply.stats.prompt_tokens < full_prompt / 2 + 10  # only the new turn was prefilled
    fresh = model.chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"},
                        {"role": "assistant", "content": first}, {"role": "user", "content": "and then"}],
                       max_tokens=6)
    assert fresh.text == second
    assert session.cache.offset == len(session.cached_ids)


def test_chat_needs_a_final_user_message(model):
    with pytest.raises(KvrtError):
        model.chat([{"role": "assistant", "content": "x"}])
