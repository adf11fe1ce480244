"""Chat turns stay within the model's context: the oldest turns are dropped (and counted), or the
turn is refused and the conversation kept; ChatSession.send takes generate's keyword arguments."""

import pytest
from click.testing import CliRunner

import kvrt
from kvrt.cli import cli
from kvrt.errors import KvrtError

LONG = "Paris is the capital of France. " * 2  # about 20 tokens on the tiny model, whose context is 256


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return kvrt.load(str(tiny_model_dir("llama")), backend="torch")


@pytest.mark.parametrize("cache", ["full", "streaming:budget=40"])
def test_drop_keeps_every_turn_within_the_context(model, cache):
    session = model.chat_session(system_prompt="be brief", cache=cache, overflow="drop")
    dropped = 0
    for turn in range(8):
        reply = session.send(f"{turn} {LONG}", max_tokens=20, temp=0.0)
        reply.text()
        dropped += reply.stats.dropped_turns
        fed = len(model.tokenizer.encode_chat(session.messages[:-1], add_generation_prompt=True))
        assert fed + 20 <= model.context_length
        assert session.cache.offset <= model.context_length
    assert dropped > 0
    assert session.messages[0] == {"role": "system", "content": "be brief"}  # the system prompt stays
    assert session.messages[-2]["content"].startswith("7 ")


def test_stop_refuses_the_turn_and_keeps_the_conversation(model):
    session = model.chat_session(overflow="stop")
    turns = 0
    with pytest.raises(KvrtError, match="no longer fits"):
        for turn in range(8):
            before = [dict(m) for m in session.messages]
            session.send(f"{turn} {LONG}", max_tokens=20).text()
            turns += 1
    assert 0 < turns < 8
    assert session.messages == before  # the refused turn left nothing behind


def test_a_message_too_long_even_alone_is_refused(model):
    session = model.chat_session(overflow="drop")
    with pytest.raises(KvrtError, match="does not fit even alone"):
        session.send("word " * 400, max_tokens=10)
    assert session.messages == []


def test_model_chat_refuses_a_conversation_over_the_context(model):
    with pytest.raises(KvrtError, match="no longer fits"):
        model.chat([{"role": "user", "content": "word " * 400}], max_tokens=10)


def test_send_takes_generate_keyword_arguments(model):
    session = model.chat_session()
    reply = session.send("Hi", max_tokens=10, temp=0.7, top_p=0.9, seed=3)
    text = reply.text()
    assert isinstance(text, str) and reply.stats.generation_tokens <= 10
    again = model.chat_session().send("Hi", max_tokens=10, params=kvrt.SamplingParams(temp=0.7, top_p=0.9, seed=3))
    assert again.text() == text


def test_the_readme_names_are_exported():
    for name in ("load", "Model", "Generation", "GenerationStats", "SamplingParams", "CacheSpec", "ChatSession",
                 "TextStream", "KvrtError"):
        assert hasattr(kvrt, name), name
        assert name in kvrt.__all__


@pytest.mark.parametrize("overflow,code,needle", [("drop", 0, "kvrt: dropped the"), ("stop", 1, "error: the conversation")])
def test_cli_chat_over_a_pipe_drops_or_stops(tiny_model_dir, overflow, code, needle):
    lines = "".join(f"{i} {LONG}\n" for i in range(6))
    result = CliRunner().invoke(cli, ["chat", "--model", str(tiny_model_dir("llama")), "--max-tokens", "20",
                                      "--overflow", overflow], input=lines)
    assert result.exit_code == code, result.output
    assert needle in result.stderr
    assert "Traceback" not in result.output


def test_a_message_that_is_not_text_is_refused_and_leaves_the_conversation(model):
    session = model.chat_session()
    session.send("Hi", max_tokens=3).text()
    before = [dict(m) for m in session.messages]
    with pytest.raises(KvrtError, match="chat messages must hold text"):
        session.send(b"bytes", max_tokens=3)
    assert session.messages == before
