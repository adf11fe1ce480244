"""GGUF -> HF folder conversion: tensors, config, tokenizer, bad input."""

import json

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from gguf_fixtures import hf_folder_to_gguf
from kvrt.errors import KvrtError
from kvrt.models.gguf_convert import convert_gguf

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
TEXTS = [
    "The capital of France is Paris.",
    "Numbers 1234567890 and 3.14, dates 2024-06-01!",
    "Ünïcödé café 日本語 中文 emoji 🙂🚀👍🏽 mixed\n\n  spaces\ttabs",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "I'm sure they'll say we'd done it, isn't it? <tool_call> x",
    "",
]


def _quiet(*a):
    pass


@pytest.fixture(scope="module")
def converted(tiny_model_dir, tmp_path_factory):
    """(arch, qtype) -> (original folder, converted folder), built lazily."""
    cache = {}

    def get(arch, qtype):
        if (arch, qtype) not in cache:
            src = tiny_model_dir(arch)
            tmp = tmp_path_factory.mktemp(f"conv-{arch}-{qtype}")
            g = hf_folder_to_gguf(src, tmp / f"{arch}.gguf", qtype)
            cache[arch, qtype] = (src, convert_gguf(g, tmp / "out", log=_quiet))
        return cache[arch, qtype]

    return get


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_tensors_round_trip(converted, arch, qtype):
    src, out = converted(arch, qtype)
    a = load_file(str(src / "model.safetensors"))
    b = load_file(str(out / "model.safetensors"))
    assert set(a) == set(b)
    for name, ref in a.items():
        got = b[name].astype(np.float32)
        assert got.shape == ref.shape, name
        if qtype == "F32" or ref.ndim == 1:
            np.testing.assert_array_equal(got, ref, err_msg=name)
        else:
            # Q8_0: per-32-block scale amax/127, rounding error <= half a step; plus fp16 storage.
            step = np.abs(ref).max() / 127
            np.testing.assert_allclose(got, ref, atol=0.5 * step + 1e-6, rtol=2e-3, err_msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_config_fields(converted, arch):
    src, out = converted(arch, "F32")
    a = json.loads((src / "config.json").read_text())
    b = json.loads((out / "config.json").read_text())
    assert b["model_type"] == ("llama" if arch == "mistral" else arch)
    assert b["architectures"] == [{"llama": "LlamaForCausalLM", "mistral": "LlamaForCausalLM",
                                   "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "vocab_size", "tie_word_embeddings",
                "bos_token_id", "eos_token_id"):
        assert b[key] == a[key], key
    assert b["head_dim"] == (a.get("head_dim") or a["hidden_size"] // a["num_attention_heads"])
    assert b["rms_norm_eps"] == pytest.approx(a["rms_norm_eps"], rel=1e-6)
    assert b["rope_theta"] == a["rope_parameters"]["rope_theta"]
    assert b["torch_dtype"] == "float32" and "rope_scaling" not in b


def test_q8_config_dtype(converted):
    _, out = converted("llama", "Q8_0")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"


def test_rope_scaling_carried_over(tmp_path):
    path = tmp_path / "rope.gguf"
    w = gguf.GGUFWriter(str(path), "qwen2")
    for add, v in [(w.add_context_length, 131072), (w.add_embedding_length, 8), (w.add_feed_forward_length, 16),
                   (w.add_block_count, 0), (w.add_head_count, 2), (w.add_head_count_kv, 1)]:
        add(v)
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(4.0)
    w.add_rope_scaling_orig_ctx_len(32768)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "ab"])
    w.add_token_types([1, 1, 1])
    w.add_token_merges(["a b"])
    w.add_tensor("token_embd.weight", np.ones((3, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    cfg = json.loads((convert_gguf(path, tmp_path / "out", log=_quiet) / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["num_key_value_heads"] == 1
    assert cfg["rope_scaling"] == {"rope_type": "yarn", "type": "yarn", "factor": 4.0,
                                   "original_max_position_embeddings": 32768}


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_transformers_logits_match(converted, arch):
    """Same logits from the original and the converted folder: the Q/K un-permutation is right."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    src, out = converted(arch, "F32")
    ids = torch.tensor([[5, 17, 42, 99, 7, 250, 3, 11]])
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenizer_round_trip(converted, arch):
    src, out = converted(arch, "F32")
    ref = Tokenizer.from_file(str(src / "tokenizer.json"))
    got = Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in TEXTS:
        for special in (True, False):
            assert got.encode(text, add_special_tokens=special).ids == \
                ref.encode(text, add_special_tokens=special).ids, (text, special)
        ids = ref.encode(text, add_special_tokens=False).ids
        assert got.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)
    assert got.token_to_id("<|im_end|>") == ref.token_to_id("<|im_end|>")


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_transformers_tokenizer_matches(converted, arch):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    src, out = converted(arch, "F32")
    ref, got = AutoTokenizer.from_pretrained(src), AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert got(text).input_ids == ref(text).input_ids, text
    msgs = [{"role": "user", "content": "Hi 🙂"}]
    assert got.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def test_tokenizer_config(converted):
    _, out = converted("mistral", "F32")
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["bos_token"] == "<s>" and cfg["eos_token"] == "</s>" and cfg["add_bos_token"] is True
    assert "[INST]" in cfg["chat_template"]


def test_truncated_gguf(tiny_model_dir, tmp_path):
    g = hf_folder_to_gguf(tiny_model_dir("llama"), tmp_path / "full.gguf")
    data = g.read_bytes()
    for cut in (len(data) // 2, len(data) - 16, 100, 3):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(KvrtError) as e:
            convert_gguf(bad, tmp_path / f"out{cut}", log=_quiet)
        assert "\n" not in str(e.value)
        assert not (tmp_path / f"out{cut}").exists()
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(KvrtError):
        convert_gguf(junk, tmp_path / "outjunk", log=_quiet)
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())  # no temp leftovers


def test_unsupported_architecture(tiny_model_dir, tmp_path):
    g = hf_folder_to_gguf(tiny_model_dir("llama"), tmp_path / "g.gguf", arch="gemma")
    with pytest.raises(KvrtError, match="gemma") as e:
        convert_gguf(g, tmp_path / "out", log=_quiet)
    assert "llama" in str(e.value) and "qwen3" in str(e.value)
    assert not (tmp_path / "out").exists()


def _minimal_gguf(path, tokenizer_model="gpt2", pre="smollm", tokens=("a", "b", "ab"), types=None,
                  scores=None, merges=("a b",), special_ids=None):
    """A one-tensor llama GGUF with a tiny vocab, for tokenizer/metadata edge cases."""
    w = gguf.GGUFWriter(str(path), "llama")
    for add, v in [(w.add_context_length, 64), (w.add_embedding_length, 8), (w.add_feed_forward_length, 16),
                   (w.add_block_count, 0), (w.add_head_count, 2), (w.add_head_count_kv, 2)]:
        add(v)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(list(tokens))
    w.add_token_types(list(types or [1] * len(tokens)))
    if scores is not None:
        w.add_token_scores(list(scores))
    if merges:
        w.add_token_merges(list(merges))
    for add, i in zip((w.add_unk_token_id, w.add_bos_token_id, w.add_eos_token_id), special_ids or ()):
        add(i)
    w.add_tensor("token_embd.weight", np.ones((len(tokens), 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unsupported_tokenizer_rejected(tmp_path):
    g = _minimal_gguf(tmp_path / "wpm.gguf", tokenizer_model="bert")
    with pytest.raises(KvrtError, match="unsupported GGUF tokenizer 'bert'"):
        convert_gguf(g, tmp_path / "out", log=_quiet)


def _spm_vocab():
    """A hand-made SentencePiece-BPE vocab: specials, 256 byte pieces, then scored pieces."""
    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "ll", "▁he", "llo", "▁hello", "▁w", "or", "▁wor"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    return tokens, types, scores


def test_sentencepiece_tokenizer(tmp_path):
    tokens, types, scores = _spm_vocab()
    g = _minimal_gguf(tmp_path / "spm.gguf", "llama", tokens=tokens, types=types, scores=scores, merges=(),
                      special_ids=(0, 1, 2))
    out = convert_gguf(g, tmp_path / "out", log=_quiet)
    tk = Tokenizer.from_file(str(out / "tokenizer.json"))
    enc = tk.encode("hello world")
    assert enc.tokens == ["<s>", "▁hello", "▁wor", "l", "d"]  # BOS added by default for SPM
    assert tk.encode("é", add_special_tokens=False).tokens == ["▁", "<0xC3>", "<0xA9>"]  # byte fallback
    for text in ("hello world", "  two  spaces", "é🙂 hello", "</s>hello"):
        assert tk.decode(tk.encode(text).ids, skip_special_tokens=True) == text.replace("</s>", "")
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["bos_token"] == "<s>" and cfg["eos_token"] == "</s>" and cfg["add_bos_token"] is True


def test_sentencepiece_matches_sentencepiece(tmp_path):
    """Against the real SentencePiece library (in the test extra)."""
    import io

    import sentencepiece as spm

    text = [ln for ln in TEXTS * 20 + ["hello world  two  spaces", "   lead", "don't 3.14"] * 5]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=buf, vocab_size=400,
                                   model_type="bpe", byte_fallback=True, remove_extra_whitespaces=False,
                                   normalization_rule_name="identity", minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    n = sp.get_piece_size()
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    g = _minimal_gguf(tmp_path / "spm.gguf", "llama", tokens=[sp.id_to_piece(i) for i in range(n)], types=types,
                      scores=[sp.get_score(i) for i in range(n)], merges=(), special_ids=(0, 1, 2))
    tk = Tokenizer.from_file(str(convert_gguf(g, tmp_path / "out", log=_quiet) / "tokenizer.json"))
    for s in text[:40] + ["  x  y ", "tab\tnew\nline", "🚀 ∑ ありがとう"]:
        assert tk.encode(s, add_special_tokens=False).ids == sp.encode(s), s
        assert tk.decode(sp.encode(s)) == sp.decode(sp.encode(s))


def test_unknown_pre_tokenizer_warns(tmp_path):
    logs = []
    out = convert_gguf(_minimal_gguf(tmp_path / "m.gguf", pre="mystery"), tmp_path / "out", log=logs.append)
    assert any("mystery" in m for m in logs)
    assert Tokenizer.from_file(str(out / "tokenizer.json")).encode("ab").ids == [2]


def test_reconvert_replaces_folder(tmp_path):
    g = _minimal_gguf(tmp_path / "m.gguf")
    out = convert_gguf(g, tmp_path / "out", log=_quiet)
    (out / "stale.txt").write_text("old")
    convert_gguf(g, out, log=_quiet)
    assert not (out / "stale.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "out"]
