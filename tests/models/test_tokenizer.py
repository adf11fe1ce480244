"""kvrt.models.tokenizer: encode/decode, EOS/BOS ids, chat templates (vs transformers), streaming."""

import json
import shutil

import pytest

from kvrt.errors import KvrtError
from kvrt.models.tokenizer import StreamingDetokenizer, Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = ["The capital of France is", "digits 0123456789 and 3.14", "naïve café 日本語 🙂🚀👍🏽!", "  a\n\nb\t", ""]
CHATS = [
    [{"role": "user", "content": "Hi there 🙂"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}],
]
MULTIBYTE = "Grüße, 世界! 🙂🚀👍🏽 naïve — ∑ x² ≤ ∞ ありがとう 😀😀"


def _hf_ids(enc):
    """apply_chat_template(tokenize=True) returns a list or a dict, depending on version."""
    return list(enc["input_ids"]) if hasattr(enc, "keys") else list(enc)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_encode_matches_transformers(tiny_model_dir, arch):
    folder = tiny_model_dir(arch)
    tok, ref = Tokenizer.from_folder(folder), transformers.AutoTokenizer.from_pretrained(folder)
    for text in TEXTS:
        assert tok.encode(text) == ref(text).input_ids, text
        assert tok.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False).input_ids
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_bos_added_once(tiny_model_dir):
    tok = Tokenizer.from_folder(tiny_model_dir("mistral"))
    ids = tok.encode("hello")
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
    assert tok.encode("hello", add_special_tokens=False)[0] != tok.bos_token_id


def test_special_ids(tiny_model_dir, tmp_path):
    folder = shutil.copytree(tiny_model_dir("llama"), tmp_path / "m")
    tok = Tokenizer.from_folder(folder)
    im_end, eot = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
    assert tok.eos_token_ids == {im_end}
    assert tok.bos_token_id == tok.token_to_id("<|im_start|>")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [im_end, eot]}))
    assert Tokenizer.from_folder(folder).eos_token_ids == {im_end, eot}


@pytest.mark.parametrize("arch", ["llama", "mistral"])
@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_transformers(tiny_model_dir, arch, gen):
    folder = tiny_model_dir(arch)
    tok, ref = Tokenizer.from_folder(folder), transformers.AutoTokenizer.from_pretrained(folder)
    for chat in CHATS:
        if arch == "mistral":
            chat = [m for m in chat if m["role"] != "system"]
        want = ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
        assert tok.apply_chat_template(chat, add_generation_prompt=gen) == want
        assert tok.encode_chat(chat, add_generation_prompt=gen) == \
            _hf_ids(ref.apply_chat_template(chat, tokenize=True, add_generation_prompt=gen))


FANCY_TEMPLATE = """{%- set ns = namespace(n=0) -%}
{% for m in messages %}
    {% if m.role == 'system' %}{% continue %}{% endif %}
    {% set ns.n = ns.n + 1 %}
  {{ m.role }}: {{ m.content | tojson }}{% if m.role == 'assistant' %}{% generation %}{{ eos_token }}{% endgeneration %}{% endif %}

{% endfor %}
{{ ns.n }} {{ tools is none }} {{ strftime_now('%Y') | length }}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def test_template_features_match_transformers(tiny_model_dir, tmp_path):
    """trim/lstrip blocks, loop controls, namespace, tojson without HTML escaping, generation tag."""
    folder = shutil.copytree(tiny_model_dir("llama"), tmp_path / "m")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = FANCY_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok, ref = Tokenizer.from_folder(folder), transformers.AutoTokenizer.from_pretrained(folder)
    chat = CHATS[1] + [{"role": "assistant", "content": "<b>\"6\" & ü</b>"}]
    assert tok.apply_chat_template(chat) == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


def test_template_errors(tiny_model_dir, tmp_path):
    tok = Tokenizer.from_folder(tiny_model_dir("mistral"))
    with pytest.raises(KvrtError, match="alternate"):
        tok.apply_chat_template([{"role": "assistant", "content": "x"}])
    folder = shutil.copytree(tiny_model_dir("llama"), tmp_path / "m")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    plain = Tokenizer.from_folder(folder)
    assert not plain.has_chat_template and tok.has_chat_template
    with pytest.raises(KvrtError, match="no chat template"):
        plain.encode_chat(CHATS[0])
    with pytest.raises(KvrtError, match="tokenizer.json"):
        Tokenizer.from_folder(tmp_path)


def _stream(tok, ids):
    det = StreamingDetokenizer(tok, skip_special_tokens=False)
    pieces = [det.add_token(i) for i in ids]
    return pieces, det.finalize()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_streaming_detokenizer(tiny_model_dir, arch):
    tok = Tokenizer.from_folder(tiny_model_dir(arch))
    text = (MULTIBYTE + " ") * 60  # long enough to exercise the window trimming
    ids = tok.encode(text, add_special_tokens=False)
    pieces, tail = _stream(tok, ids)
    assert "".join(pieces) + tail == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)
    assert sum(1 for p in pieces if p) > len(ids) // 4  # it really streams, not all at the end


def test_streaming_skips_specials(tiny_model_dir):
    tok = Tokenizer.from_folder(tiny_model_dir("llama"))
    ids = tok.encode_chat(CHATS[0])
    det = tok.streaming_detokenizer()
    out = "".join(det.add_token(i) for i in ids) + det.finalize()
    assert out == tok.decode(ids, skip_special_tokens=True)
    assert "<|im_start|>" not in out


def test_streaming_holds_partial_character(tiny_model_dir):
    tok = Tokenizer.from_folder(tiny_model_dir("llama"))
    ids = tok.encode("🚀", add_special_tokens=False)
    assert len(ids) > 1  # a byte-level token per UTF-8 byte (or a few)
    pieces, tail = _stream(tok, ids)
    assert pieces[:-1] == [""] * (len(ids) - 1) and pieces[-1] == "🚀" and tail == ""
    det = StreamingDetokenizer(tok)
    det.add_token(ids[0])
    assert det.finalize() == "\ufffd"  # an unfinished character is only flushed at the end
    det = StreamingDetokenizer(tok)
    pieces = [det.add_token(ids[0]) for _ in range(10)]  # invalid bytes are not held forever
    assert "".join(pieces) + det.finalize() == tok.decode([ids[0]] * 10) and any(pieces)


@pytest.mark.model
def test_default_model_tokenizer(default_model_dir):
    tok = Tokenizer.from_folder(default_model_dir)
    ref = transformers.AutoTokenizer.from_pretrained(default_model_dir)
    assert tok.encode("The capital of France is") == [504, 3575, 282, 4649, 314]
    assert tok.eos_token_ids == {tok.token_to_id("<|im_end|>")}
    for chat in CHATS:
        assert tok.apply_chat_template(chat) == \
            ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert tok.encode_chat(chat) == _hf_ids(ref.apply_chat_template(chat, add_generation_prompt=True))
    ids = tok.encode(MULTIBYTE * 3)
    pieces, tail = _stream(tok, ids)
    assert "".join(pieces) + tail == MULTIBYTE * 3 and all("\ufffd" not in p for p in pieces)
