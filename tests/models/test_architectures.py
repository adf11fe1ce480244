"""Gemma 2, Gemma 3 and Phi-3 (LongRoPE, partial rotary) on torch equal HF transformers; MLX equals torch.

Tiny random checkpoints written by transformers' own config classes (float32, hidden 64, 16-dim
heads, vocab 256) with small sliding windows, so prompts run both inside and past the window.
Tolerances: max |Δlogit| <= 1e-4 against transformers (as tests/models/test_torch_model.py), <= 1e-3
between MLX and torch.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from cache_runs import hf_stepwise_logits
from kvrt.backends.torch.runtime import TorchRuntime
from kvrt.cache.kvcache import stack_caches
from kvrt.errors import KvrtError
from kvrt.models.config import ModelArgs, context_length, layer_windows, read_config

VOCAB, WINDOW = 256, 12
TOL, MLX_TOL = 1e-4, 1e-3
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
LONGROPE = dict(original_max_position_embeddings=32, max_position_embeddings=128)

# name: (config class, its arguments); rope bases and scales are nobody's default, so a dropped one shows
SPECS = {
    "gemma3": ("Gemma3TextConfig", dict(
        num_hidden_layers=6, sliding_window=WINDOW, layer_types=None, sliding_window_pattern=3,
        query_pre_attn_scalar=24, rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 20000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 5000.0}})),
    "gemma2": ("Gemma2Config", dict(
        num_hidden_layers=4, sliding_window=WINDOW, query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
        final_logit_softcapping=5.0, rope_parameters={"rope_type": "default", "rope_theta": 20000.0})),
    "phi3": ("Phi3Config", dict(
        num_hidden_layers=2, sliding_window=WINDOW, partial_rotary_factor=0.75, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 20000.0, "partial_rotary_factor": 0.75})),
    "phi3-longrope": ("Phi3Config", dict(
        num_hidden_layers=2, sliding_window=None, partial_rotary_factor=0.75, tie_word_embeddings=True,
        **LONGROPE, rope_parameters={
            "rope_type": "longrope", "rope_theta": 20000.0, "partial_rotary_factor": 0.75,
            "short_factor": [1.0, 1.1, 1.3, 1.7, 2.2, 3.0], "long_factor": [1.5, 2.5, 4.0, 6.0, 9.0, 14.0]})),
}


def write_checkpoint(folder, name: str):
    import transformers

    config_class, own = SPECS[name]
    own = dict(own)
    pattern = own.pop("sliding_window_pattern", None)
    config = getattr(transformers, config_class)(**{**COMMON, **own},
                                                 **({"sliding_window_pattern": pattern} if pattern else {}))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gemma = name.startswith("gemma")
    with torch.no_grad():  # weights large enough that logits differ per token; norms random too
        for key, p in model.named_parameters():
            norm = "norm" in key
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if norm and not gemma else 0.0))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    made = {}

    def get(name):
        if name not in made:
            made[name] = write_checkpoint(tmp_path_factory.mktemp(name), name)
        return made[name]

    return get


@pytest.fixture(scope="module")
def runtimes(folders):
    made = {}

    def get(name):
        if name not in made:
            made[name] = TorchRuntime(folders(name), dtype="float32", device="cpu")
        return made[name]

    return get


def hf_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def hf_logits(folder, ids) -> torch.Tensor:
    """transformers over the whole sequence in one forward: [T, V]."""
    with torch.no_grad():
        return hf_model(folder)(torch.tensor([ids])).logits[0]


def ids_of(n: int, seed: int = 0) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def kvrt_greedy(runtime, prompt, steps) -> tuple[list[int], torch.Tensor]:
    """Prefill `prompt`, then greedy-decode `steps` tokens one at a time: (tokens, logits [len+steps-1, V])."""
    cache = runtime.new_cache()
    logits = [runtime.forward(prompt, cache, all_logits=True)]
    tokens = []
    for _ in range(steps):
        tokens.append(int(logits[-1][-1].argmax()))
        if len(tokens) < steps:
            logits.append(runtime.forward([tokens[-1]], cache))
    return tokens, torch.cat(logits)


# ---------------------------------------------------------------- config reading


def test_layer_windows_follow_transformers(folders):
    import transformers

    assert layer_windows(read_config(folders("gemma3"))) == [WINDOW, WINDOW, None] * 2
    assert layer_windows(read_config(folders("gemma2"))) == [WINDOW, None] * 2
    assert layer_windows(read_config(folders("phi3"))) == [WINDOW] * 2
    assert layer_windows(read_config(folders("phi3-longrope"))) == [None] * 2
    old_gemma3 = {"model_type": "gemma3_text", "num_hidden_layers": 7, "sliding_window": 512}  # pattern 6
    assert layer_windows(old_gemma3) == [512] * 5 + [None] + [512]
    qwen = transformers.Qwen2Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=16,
                                    max_window_layers=2).to_dict()
    assert layer_windows(qwen) == [None, None, 16, 16]
    assert context_length(read_config(folders("gemma3"))) == 256  # the window does not cap the context


def test_gemma3_flat_rope_config_reads_like_the_nested_one(folders):
    """Pre-transformers-5 Gemma 3 configs: rope_theta, rope_scaling (global layers only),
    rope_local_base_freq and sliding_window_pattern instead of rope_parameters and layer_types."""
    nested = read_config(folders("gemma3"))
    flat = {k: v for k, v in nested.items() if k not in ("rope_parameters", "layer_types", "_sliding_window_pattern")}
    flat.update(rope_theta=20000.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
                rope_local_base_freq=5000.0, sliding_window_pattern=3)
    args, old = ModelArgs.from_config(nested), ModelArgs.from_config(flat)
    assert replace(old, rope_scaling=None) == replace(args, rope_scaling=None)
    assert {k: old.rope_scaling[k] for k in ("rope_type", "factor")} == {"rope_type": "linear", "factor": 8.0}
    assert (args.rope_theta, args.local_rope_theta, args.local_rope_scaling) == (20000.0, 5000.0, None)
    assert args.rope_scaling["factor"] == 8.0 and args.attention_scale == 24**-0.5


def test_gemma3_multimodal_config_reads_its_text_config():
    text = {"model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34,
            "sliding_window": 1024, "rope_scaling": {"rope_type": "linear", "factor": 8.0}}  # sparse, as on the hub
    args = ModelArgs.from_config({"model_type": "gemma3", "text_config": text})
    assert (args.model_type, args.vocab_size, args.head_dim, args.num_heads, args.rope_theta) == (
        "gemma3_text", 262208, 256, 8, 1_000_000.0)
    assert layer_windows({"model_type": "gemma3", "text_config": text}).count(None) == 5
    assert context_length({"model_type": "gemma3", "text_config": text}) == 131072


def test_gemma3_multimodal_checkpoint_runs_its_text_decoder(tmp_path):
    """A `gemma3` (image-text) checkpoint: kvrt loads the language model's weights, leaves the vision
    tower out, and equals transformers on text alone."""
    import transformers

    text = {**COMMON, **SPECS["gemma3"][1], "num_hidden_layers": 3}
    text.pop("sliding_window_pattern")
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=255, boi_token_index=254, eoi_token_index=253)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    model.save_pretrained(tmp_path)
    ids = ids_of(30, seed=9)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    runtime = TorchRuntime(tmp_path, dtype="float32", device="cpu")
    assert max_diff(runtime.forward(ids, runtime.new_cache(), all_logits=True), ref) <= TOL


def test_longrope_frequencies_and_attention_factor_equal_transformers(folders):
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from kvrt.models.rope import rope_attention_factor, rope_inv_freq

    folder = folders("phi3-longrope")
    config, args = AutoConfig.from_pretrained(folder), ModelArgs.from_folder(folder)
    for seq_len in (None, 32, 33, 100):
        want, factor = ROPE_INIT_FUNCTIONS["longrope"](config, None, seq_len=seq_len)
        assert torch.allclose(torch.from_numpy(rope_inv_freq(args, seq_len)), want, rtol=1e-6, atol=0)
        assert rope_attention_factor(args) == pytest.approx(factor, rel=1e-12)
    assert args.rotary_dim == 12 and rope_attention_factor(args) > 1.0


# ---------------------------------------------------------------- torch logits equal transformers'

ARCHS = ["gemma3", "gemma2", "phi3", "phi3-longrope"]


@pytest.mark.parametrize("length", [WINDOW - 2, 40], ids=["inside-window", "past-window"])
@pytest.mark.parametrize("name", ARCHS)
def test_prompt_logits_equal_transformers(folders, runtimes, name, length):
    """Every position of one prompt forward; 40 tokens also crosses LongRoPE's original 32."""
    ids = ids_of(length, seed=length)
    got = runtimes(name).forward(ids, runtimes(name).new_cache(), all_logits=True)
    diff = max_diff(got, hf_logits(folders(name), ids))
    print(f"{name} prompt {length}: max |dlogit| {diff:.2e}")
    assert diff <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("name", ARCHS)
def test_greedy_decode_equals_transformers(folders, runtimes, name):
    """A 30-token prompt, then 10 greedy tokens one at a time through kvrt's cache: each step's
    logits equal transformers' over the whole sequence, and so do the tokens. (LongRoPE's decode
    crosses its original 32 positions, where a forward's rotation depends on how the sequence was
    fed: there the reference is transformers fed the same way, with its cache.)"""
    prompt = ids_of(30, seed=7)
    tokens, got = kvrt_greedy(runtimes(name), prompt, steps=10)
    if name == "phi3-longrope":
        ref = hf_stepwise_logits(hf_model(folders(name)), prompt + tokens[:-1], len(prompt))[len(prompt) - 1:]
    else:
        ref = hf_logits(folders(name), prompt + tokens[:-1])[len(prompt) - 1:]
    diff = max_diff(got[len(prompt) - 1:], ref)
    print(f"{name} decode 30+10: max |dlogit| {diff:.2e}")
    assert diff <= TOL
    assert tokens == ref.argmax(-1).tolist()


@pytest.mark.slow
@pytest.mark.parametrize("prefill", [20, 40])
def test_longrope_switches_per_forward_like_transformers(folders, runtimes, prefill):
    """original_max_position_embeddings 32: a 20-token prompt decoded past 32 (the prompt's keys keep
    their short-factor rotation, later forwards use the long factors), or a 40-token prompt."""
    ids = ids_of(50, seed=3)
    runtime, folder = runtimes("phi3-longrope"), folders("phi3-longrope")
    cache = runtime.new_cache()
    got = torch.cat([runtime.forward(ids[:prefill], cache, all_logits=True)]
                    + [runtime.forward([t], cache) for t in ids[prefill:]])
    diff = max_diff(got, hf_stepwise_logits(hf_model(folder), ids, prefill))
    print(f"phi3-longrope prefill {prefill} + decode to 50: max |dlogit| {diff:.2e}")
    assert diff <= TOL


def test_longrope_rows_of_a_batch_choose_their_own_factors(runtimes):
    """Per-row positions: one row past the original 32, one not; each gets what it gets alone."""
    runtime = runtimes("phi3-longrope")
    short, long = ids_of(10, seed=4), ids_of(40, seed=5)
    alone, caches = [], []
    for ids in (short, long):
        cache = runtime.new_cache()
        runtime.forward(ids, cache)
        alone.append(runtime.forward([7], cache)[-1])
        caches.append(runtime.new_cache())
        runtime.forward(ids, caches[-1])
    batch = stack_caches(caches)
    got = runtime.decode([7, 7], batch)
    assert max_diff(got, torch.stack(alone)) <= TOL


@pytest.mark.parametrize("name", ["gemma3", "gemma2", "phi3"])
def test_the_window_and_softcap_change_the_logits(folders, runtimes, name):
    """The parity above is not vacuous: attending past the window, or without Gemma 2's soft-cap,
    moves the logits far beyond the tolerance."""
    from kvrt.cache.kvcache import KVCache

    runtime, ids = runtimes(name), ids_of(40, seed=40)
    ref = hf_logits(folders(name), ids)
    unwindowed = runtime.forward(ids, KVCache(runtime.ops, runtime.args.num_layers), all_logits=True)
    assert max_diff(unwindowed, ref) > 1e-2
    if name == "gemma2":
        runtime.ops.softcap = None
        try:
            uncapped = runtime.forward(ids_of(10), runtime.new_cache(), all_logits=True)
        finally:
            runtime.ops.softcap = 2.0
        assert max_diff(uncapped, hf_logits(folders(name), ids_of(10))) > 1e-2


def test_gemma2_sets_the_attention_softcap_on_the_ops(runtimes):
    assert runtimes("gemma2").ops.softcap == 2.0
    assert getattr(runtimes("gemma3").ops, "softcap", None) is None


# ---------------------------------------------------------------- MLX equals torch


@pytest.mark.parametrize("name,length", [("gemma3", WINDOW - 2), ("gemma3", 40), ("phi3", WINDOW - 2), ("phi3", 40),
                                         ("phi3-longrope", 40)])
def test_mlx_logits_equal_torch(folders, runtimes, name, length):
    """Past the window, kvrt's cache keeps it on MLX too. mlx-lm's SuScaledRoPE takes LongRoPE's long
    factors at every length, as transformers does for a forward past original_max_position_embeddings."""
    pytest.importorskip("mlx_lm")
    from kvrt.backends.mlx.runtime import MLXRuntime

    ids = ids_of(length, seed=11)
    mlx_runtime = MLXRuntime(folders(name), dtype="float32", device="cpu")
    got = torch.tensor(mlx_runtime.forward(ids, mlx_runtime.new_cache(), all_logits=True).tolist())
    diff = max_diff(got, runtimes(name).forward(ids, runtimes(name).new_cache(), all_logits=True))
    print(f"{name} MLX vs torch prompt {len(ids)}: max |dlogit| {diff:.2e}")
    assert diff <= MLX_TOL


def test_gemma2_on_mlx_is_one_clear_error(folders):
    """mlx-lm's gemma2 computes attention itself (soft-capped), so kvrt's cache cannot take it over."""
    pytest.importorskip("mlx_lm")
    from kvrt.backends.mlx.runtime import MLXRuntime

    with pytest.raises(KvrtError) as err:
        runtime = MLXRuntime(folders("gemma2"), dtype="float32", device="cpu")
        runtime.forward(ids_of(5), runtime.new_cache())
    assert "\n" not in str(err.value)
