"""Rope scaling: computed as transformers does (linear, llama3, yarn, dynamic NTK) and carried
from GGUF files into config.json (llama.cpp's rope_freqs tensor and its linear/yarn keys).

Tolerances: frequencies to 1e-6 relative (kvrt computes them in float64, transformers in
float32); logits in float32 to 1e-4 against transformers, as tests/models/test_torch_model.py.
"""

import copy
import json
import math

import gguf
import numpy as np
import pytest
import torch

from cache_runs import hf_stepwise_logits
from gguf_fixtures import hf_folder_to_gguf, llama3_rope_freqs, write_tiny_hf_model
from kvrt.backends.torch.runtime import TorchRuntime
from kvrt.errors import KvrtError
from kvrt.models.gguf_convert import convert_gguf, llama3_from_rope_freqs
from kvrt.models.config import ModelArgs, context_length, read_config
from kvrt.models.rope import rope_attention_factor, rope_inv_freq

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}


def _quiet(*a):
    pass


def ids_of(n: int, seed: int = 0, vocab: int = 400) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def kvrt_logits(folder, ids, prefill) -> torch.Tensor:
    """Prefill `prefill` tokens in one forward, then decode the rest one token at a time: [T, V]."""
    runtime = TorchRuntime(folder, dtype="float32", device="cpu")
    cache = runtime.new_cache()
    out = [runtime.forward(ids[:prefill], cache, all_logits=True)]
    out += [runtime.forward([t], cache) for t in ids[prefill:]]
    return torch.cat(out)


def hf_logits(folder, ids, prefill) -> torch.Tensor:
    """transformers, the same way: one forward over the prompt, then step by step with its DynamicCache."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return hf_stepwise_logits(model, ids, prefill)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------- frequencies equal transformers'


def _hf_rope(cfg: dict, seq_len=None):
    """transformers' (inv_freq, attention factor) for a config dict."""
    import transformers as tf
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = tf.LlamaConfig(**copy.deepcopy(cfg))  # transformers fills in defaults in place
    kind = config.rope_parameters["rope_type"]
    if kind == "default":
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
        return LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    return ROPE_INIT_FUNCTIONS[kind](config, None, seq_len=seq_len)


BASE = dict(hidden_size=512, num_attention_heads=4, max_position_embeddings=4096)  # head_dim 128
ROPES = {
    "default": {"rope_type": "default", "rope_theta": 500000.0},
    "linear": {"rope_type": "linear", "factor": 2.5, "rope_theta": 10000.0},
    "llama3.1": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192, "rope_theta": 500000.0},
    "llama3-no-original": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "rope_theta": 500000.0},
    "yarn-qwen2.5": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                     "rope_theta": 1000000.0},
    "yarn-betas-attention": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 512,
                             "beta_fast": 16.0, "beta_slow": 2.0, "attention_factor": 0.9, "rope_theta": 10000.0},
    "yarn-mscale": {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 512, "mscale": 0.707,
                    "mscale_all_dim": 0.707, "rope_theta": 10000.0},
    "yarn-mscale-all-dim": {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 256,
                            "mscale": 1.0, "mscale_all_dim": 0.5, "rope_theta": 10000.0},
    "yarn-untruncated": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                         "truncate": False, "rope_theta": 10000.0},
    "yarn-no-factor": {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 1024,
                       "rope_theta": 10000.0},
}


@pytest.mark.parametrize("name", sorted(ROPES))
def test_frequencies_and_attention_factor_equal_transformers(name):
    cfg = {**BASE, "rope_parameters": dict(ROPES[name])}
    want_freq, want_scale = _hf_rope(cfg)
    args = ModelArgs.from_config({**cfg, "model_type": "llama", "vocab_size": 8, "intermediate_size": 8,
                                  "num_hidden_layers": 1})
    np.testing.assert_allclose(rope_inv_freq(args), want_freq.numpy(), rtol=1e-6, atol=0)
    assert rope_attention_factor(args) == pytest.approx(want_scale, rel=1e-12)


@pytest.mark.parametrize("seq_len", [100, 4096, 4097, 10000])
def test_dynamic_ntk_frequencies_follow_the_sequence_length(seq_len):
    cfg = {**BASE, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}
    want, scale = _hf_rope(cfg, seq_len=torch.tensor(seq_len))
    args = ModelArgs.from_config({**cfg, "model_type": "llama", "vocab_size": 8, "intermediate_size": 8,
                                  "num_hidden_layers": 1})
    np.testing.assert_allclose(rope_inv_freq(args, seq_len), want.numpy(), rtol=1e-6, atol=0)
    assert scale == rope_attention_factor(args) == 1.0
    if seq_len <= 4096:  # within the model's positions: the unscaled frequencies
        np.testing.assert_array_equal(rope_inv_freq(args, seq_len), rope_inv_freq(args))


def test_unsupported_rope_type_is_one_clear_error(tiny_model_dir, tmp_path):
    import shutil

    folder = tmp_path / "proportional"
    shutil.copytree(tiny_model_dir("llama"), folder)
    cfg = read_config(folder)
    cfg["rope_parameters"] = {"rope_type": "proportional", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(KvrtError, match="unsupported rope scaling 'proportional'; supported: default, linear"):
        TorchRuntime(folder)


# ---------------------------------------------------------------- context length


def test_context_length_extends_for_yarn_and_dynamic_only():
    qwen25 = {"model_type": "qwen2", "max_position_embeddings": 32768,
              "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}
    assert context_length(qwen25) == 131072
    deepseek_like = {"max_position_embeddings": 163840,
                     "rope_scaling": {"rope_type": "yarn", "factor": 40, "original_max_position_embeddings": 4096}}
    assert context_length(deepseek_like) == 163840  # already the extended length
    dynamic = {"max_position_embeddings": 4096, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}
    assert context_length(dynamic) == 8192
    llama31 = {"max_position_embeddings": 131072, "rope_scaling": {**ROPES["llama3.1"]}}
    assert context_length(llama31) == 131072
    linear = {"max_position_embeddings": 4096, "rope_scaling": {"type": "linear", "factor": 4.0}}
    assert context_length(linear) == 4096
    assert context_length({**qwen25, "sliding_window": 4096, "use_sliding_window": True}) == 131072  # windows are per layer


# ---------------------------------------------------------------- torch logits equal transformers'


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """name -> tiny HF folder with that rope scaling (built lazily)."""
    made = {}
    specs = {
        "qwen2-yarn": ("qwen2", dict(rope_parameters={**YARN, "rope_theta": 10000.0})),
        "llama-yarn": ("llama", dict(rope_parameters={**YARN, "beta_fast": 16.0, "beta_slow": 2.0,
                                                       "attention_factor": 1.2, "rope_theta": 10000.0})),
        "llama-dynamic": ("llama", dict(max_position_embeddings=64, rope_parameters={
            "rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})),
        "llama-linear": ("llama", dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})),
        "llama-llama3": ("llama", dict(rope_parameters={**LLAMA3, "rope_theta": 10000.0})),
        "llama-llama3-8192": ("llama", dict(rope_parameters={**LLAMA3, "original_max_position_embeddings": 8192,
                                                             "rope_theta": 10000.0})),
    }

    def get(name):
        if name not in made:
            arch, config = specs[name]
            made[name] = write_tiny_hf_model(tmp_path_factory.mktemp(name), arch, **config)
        return made[name]

    return get


@pytest.mark.parametrize("name", ["qwen2-yarn", "llama-yarn"])
def test_yarn_logits_equal_transformers(folders, name):
    """Past the original 64 positions, with YaRN's attention factor scaling cos and sin."""
    ids = ids_of(200)
    got, want = kvrt_logits(folders(name), ids, prefill=190), hf_logits(folders(name), ids, prefill=190)
    assert max_diff(got, want) <= 1e-4


@pytest.mark.parametrize("prefill", [100, 40])
def test_dynamic_ntk_logits_equal_transformers_past_max_positions(folders, prefill):
    """max_position_embeddings 64: a 100-token prompt, or a 40-token one decoded past 64; every step
    recomputes the frequencies from its own length while cached keys keep their rotation."""
    ids = ids_of(120, seed=1)
    got, want = kvrt_logits(folders("llama-dynamic"), ids, prefill), hf_logits(folders("llama-dynamic"), ids, prefill)
    assert max_diff(got, want) <= 1e-4
    # one forward over all 120 tokens rotates every key with the 120-token frequencies: different
    assert max_diff(got[-1:], kvrt_logits(folders("llama-dynamic"), ids, prefill=120)[-1:]) > 1e-3


def test_dynamic_ntk_leaves_the_model_unchanged(folders):
    """The frequencies of a long forward are the forward's own: the model's table stays the unscaled one,
    so a short sequence afterwards computes what it computes on a fresh model."""
    runtime = TorchRuntime(folders("llama-dynamic"), dtype="float32", device="cpu")
    table = runtime.model.inv_freq.clone()
    short = runtime.forward(ids_of(30, seed=2), runtime.new_cache(), all_logits=True)
    runtime.forward(ids_of(150, seed=3), runtime.new_cache())
    assert torch.equal(runtime.model.inv_freq, table)
    assert torch.equal(runtime.forward(ids_of(30, seed=2), runtime.new_cache(), all_logits=True), short)


# ---------------------------------------------------------------- GGUF -> config.json


def _converted(folder, tmp_path):
    g = hf_folder_to_gguf(folder, tmp_path / "m.gguf")
    return g, convert_gguf(g, tmp_path / "out", log=_quiet)


def _args(folder) -> ModelArgs:
    return ModelArgs.from_folder(folder)


@pytest.mark.parametrize("name", ["llama-llama3", "llama-llama3-8192"])
def test_llama3_rope_freqs_round_trip(folders, tmp_path, name):
    """llama.cpp writes Llama 3 scaling as the rope_freqs tensor only; the converted config computes the
    same frequencies, and the same logits as the HF folder (kvrt and transformers)."""
    src = folders(name)
    g, out = _converted(src, tmp_path)
    reader = gguf.GGUFReader(g)
    assert "rope_freqs.weight" in {t.name for t in reader.tensors}
    assert not any(".rope.scaling." in k for k in reader.fields)
    scaling = read_config(out)["rope_scaling"]
    assert scaling["rope_type"] == "llama3"
    if name == "llama-llama3-8192":  # the original length the converter assumes: every value comes back
        assert scaling == {**LLAMA3, "original_max_position_embeddings": 8192}
    np.testing.assert_allclose(rope_inv_freq(_args(out)), rope_inv_freq(_args(src)), rtol=1e-6, atol=0)
    ids = ids_of(200, seed=4)
    got = kvrt_logits(out, ids, prefill=190)
    assert max_diff(got, kvrt_logits(src, ids, prefill=190)) <= 1e-5
    assert max_diff(got, hf_logits(src, ids, prefill=190)) <= 1e-4
    assert max_diff(hf_logits(out, ids, prefill=190), hf_logits(src, ids, prefill=190)) <= 1e-5


@pytest.mark.parametrize("name", ["llama-linear", "llama-yarn", "qwen2-yarn"])
def test_linear_and_yarn_keys_round_trip(folders, tmp_path, name):
    src = folders(name)
    _, out = _converted(src, tmp_path)
    want = {k: v for k, v in read_config(src)["rope_parameters"].items() if k != "rope_theta"}
    got = read_config(out)["rope_scaling"]
    assert got.pop("type") == got.pop("rope_type") == want.pop("rope_type")
    assert got == pytest.approx(want, rel=1e-7)  # GGUF keeps floats as float32
    np.testing.assert_allclose(rope_inv_freq(_args(out)), rope_inv_freq(_args(src)), rtol=1e-6, atol=0)
    ids = ids_of(200, seed=5)
    got_logits = kvrt_logits(out, ids, prefill=190)
    assert max_diff(got_logits, kvrt_logits(src, ids, prefill=190)) <= 1e-5
    assert max_diff(got_logits, hf_logits(src, ids, prefill=190)) <= 1e-4


LLAMA31_FREQS = dict(head_dim=128, rope_theta=500000.0, original=8192)


@pytest.mark.parametrize("rope", [
    {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},  # Llama 3.1
    {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},  # Llama 3.2
    {"factor": 4.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0},  # not Llama 3's own ramp
])
def test_llama3_reconstruction_gives_back_the_config(rope):
    rope = {"rope_type": "llama3", **rope, "original_max_position_embeddings": 8192}
    factors = llama3_rope_freqs({**rope, "rope_theta": 500000.0}, 128).astype(np.float64)
    assert llama3_from_rope_freqs(factors, 128, 500000.0, 8192) == rope


def test_llama3_reconstruction_with_another_original_length_keeps_the_ratios():
    """A GGUF that does not say the original length gets 8192: low/high scale with it, frequencies stay."""
    factors = llama3_rope_freqs({**LLAMA3, "rope_theta": 500000.0}, 128).astype(np.float64)
    got = llama3_from_rope_freqs(factors, 128, 500000.0, 8192)
    scale = 8192 / 64
    assert got["factor"] == 8.0
    assert got["low_freq_factor"] == pytest.approx(scale, rel=1e-4)
    assert got["high_freq_factor"] == pytest.approx(4 * scale, rel=1e-4)


@pytest.mark.parametrize("factors", [
    np.linspace(1.0, 8.0, 64)[::-1],  # rising frequency divisors: no llama3 config does that
    np.concatenate([np.ones(32), np.full(32, 0.5)]),  # speeds pairs up
    np.full(63, 2.0),  # wrong length for head_dim 128
])
def test_rope_freqs_no_llama3_config_reproduces_is_one_error(factors):
    with pytest.raises(KvrtError, match="rope_freqs") as e:
        llama3_from_rope_freqs(factors, 128, 500000.0, 8192)
    assert "\n" not in str(e.value)


def _rope_gguf(path, scaling: dict, rope_freqs=None):
    """A one-tensor llama GGUF with `{arch}.rope.scaling.*` keys (and optionally a rope_freqs tensor)."""
    w = gguf.GGUFWriter(str(path), "llama")
    for add, v in [(w.add_context_length, 4096), (w.add_embedding_length, 16), (w.add_feed_forward_length, 16),
                   (w.add_block_count, 0), (w.add_head_count, 2), (w.add_head_count_kv, 2)]:
        add(v)
    for key, value in scaling.items():
        getattr(w, f"add_{'string' if isinstance(value, str) else 'float32'}")(f"llama.rope.scaling.{key}", value)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "ab"])
    w.add_token_types([1, 1, 1])
    w.add_tensor("token_embd.weight", np.ones((3, 16), dtype=np.float32))
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("scaling, want", [
    ({"factor": 2.0}, {"rope_type": "linear", "type": "linear", "factor": 2.0}),  # llama.cpp: untyped is linear
    ({"type": "linear", "factor": 1.0}, None),
    ({"type": "none", "factor": 4.0}, None),
    ({"type": "yarn", "factor": 4.0, "yarn_log_multiplier": 0.1},
     {"rope_type": "yarn", "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096,
      "mscale": 1.0, "mscale_all_dim": 0.1}),
    ({"type": "yarn", "factor": 4.0, "original_context_length": 1024, "attn_factor": 0.5},
     {"rope_type": "yarn", "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
      "attention_factor": 0.5 * (0.1 * math.log(4.0) + 1)}),
])
def test_gguf_rope_keys_become_hf_rope_scaling(tmp_path, scaling, want):
    out = convert_gguf(_rope_gguf(tmp_path / "m.gguf", scaling), tmp_path / "out", log=_quiet)
    got = read_config(out).get("rope_scaling")
    if want is None:
        assert got is None
    else:
        assert got.pop("type") == got.pop("rope_type") == want.pop("type") == want.pop("rope_type")
        assert got == pytest.approx(want, rel=1e-6)  # GGUF keeps floats as float32


@pytest.mark.parametrize("scaling, rope_freqs, message", [
    ({"type": "longrope", "factor": 4.0}, None, "unsupported GGUF rope scaling 'longrope'"),
    ({"type": "yarn", "factor": 4.0, "yarn_ext_factor": 0.5}, None, "yarn_ext_factor 0.5"),
    ({"type": "linear", "factor": 2.0, "attn_factor": 0.5}, None, "attn_factor 0.5"),
    ({"type": "linear", "factor": 2.0}, [1.0, 2.0, 4.0, 8.0], "both a rope_freqs tensor and linear"),
    ({}, [8.0, 1.0, 1.0, 1.0], "not a Llama 3 rope scaling"),
])
def test_gguf_rope_scaling_kvrt_cannot_carry_is_one_error(tmp_path, scaling, rope_freqs, message):
    g = _rope_gguf(tmp_path / "m.gguf", scaling, rope_freqs)
    with pytest.raises(KvrtError, match=message) as e:
        convert_gguf(g, tmp_path / "out", log=_quiet)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_mlx_lm_loads_the_reconstructed_llama3_folder(folders, tmp_path):
    """mlx-lm computes the same logits from the reconstructed config as kvrt's torch backend."""
    pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_lm")
    from kvrt.backends.mlx.runtime import MLXRuntime

    _, out = _converted(folders("llama-llama3"), tmp_path)
    ids = ids_of(200, seed=6)
    mlx_rt = MLXRuntime(out, dtype="float32")
    got = np.array(mlx_rt.forward(ids, mlx_rt.new_cache(), all_logits=True))
    want = kvrt_logits(out, ids, prefill=200).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
