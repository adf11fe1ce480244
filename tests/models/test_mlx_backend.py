"""MLX backend: MLXOps against numpy, MLXRuntime against the torch backend and mlx-lm itself.

Tiny random HF checkpoints (hidden 64, 2 layers, 4 heads, 2 KV heads, vocab 300) keep every
test on the CPU in well under a second. Tolerances: float32 logits agree with torch to
atol 1e-4 (observed ~3e-7); kvrt attention inside mlx-lm agrees with mlx-lm's own cache to
atol 1e-5; ops agree with the numpy reference to atol 1e-5.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from kvrt.cache.attention import merge_partials  # noqa: E402
from kvrt.backends.mlx.cache_adapter import install_attention  # noqa: E402
from kvrt.backends.mlx.ops import MLXOps  # noqa: E402
from kvrt.backends.mlx.runtime import MLXRuntime  # noqa: E402
from kvrt.backends.torch.runtime import TorchRuntime  # noqa: E402
from kvrt.errors import KvrtError  # noqa: E402

VOCAB = 300
FAMILIES = {  # name: (config class, model class, tied embeddings)
    "llama": ("LlamaConfig", "LlamaForCausalLM", False),
    "mistral": ("MistralConfig", "MistralForCausalLM", True),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", True),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", False),
}


def make_checkpoint(folder, family: str):
    """A random HF checkpoint; rope_theta is not any library's default, so a dropped value shows."""
    config_cls, model_cls, tied = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, rope_theta=50000.0, tie_word_embeddings=tied,
        head_dim=16, max_position_embeddings=2048,
    )
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():  # HF's init is tiny; bigger weights make logits differ per token and position
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    folder = make_checkpoint(tmp_path_factory.mktemp(request.param), request.param)
    return MLXRuntime(folder, dtype="float32"), TorchRuntime(folder, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return MLXRuntime(make_checkpoint(tmp_path_factory.mktemp("llama"), "llama"), dtype="float32")


def prompt(n: int, seed: int = 0) -> list[int]:
    return [int(i) for i in np.random.default_rng(seed).integers(0, VOCAB, n)]


def np_of(x) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.array(x.astype(mx.float32))


# --- (a) MLX equals torch --------------------------------------------------------------------


def test_prefill_and_decode_match_torch(family):
    mlx_rt, torch_rt = family
    ids = prompt(300)
    mc, tc = mlx_rt.new_cache(), torch_rt.new_cache()
    np.testing.assert_allclose(np_of(mlx_rt.forward(ids, mc, all_logits=True)),
                               np_of(torch_rt.forward(ids, tc, all_logits=True)), atol=1e-4, rtol=0)
    token = ids[-1]
    for _ in range(10):
        want = np_of(torch_rt.forward([token], tc))
        got = np_of(mlx_rt.forward([token], mc))
        assert got.shape == (1, VOCAB)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        token = int(want.argmax())
    assert mc.offset == tc.offset == 310


def test_query_blocks_match_one_block(family):
    """Prompt attention in 64-query blocks (two prefill chunks, so the causal offset is not 0) equals torch's."""
    mlx_rt, torch_rt = family
    ids = prompt(300, seed=1)
    mc, tc = mlx_rt.new_cache(), torch_rt.new_cache()
    for layer in mc:
        layer.query_block = 64
    got = [np_of(mlx_rt.forward(ids[:170], mc, all_logits=True)), np_of(mlx_rt.forward(ids[170:], mc, all_logits=True))]
    want = np_of(torch_rt.forward(ids, tc, all_logits=True))
    np.testing.assert_allclose(np.concatenate(got), want, atol=1e-4, rtol=0)


def test_last_row_path_equals_all_logits(family):
    mlx_rt, _ = family
    ids = prompt(50, seed=2)
    full = np_of(mlx_rt.forward(ids, mlx_rt.new_cache(), all_logits=True))
    last = np_of(mlx_rt.forward(ids, mlx_rt.new_cache()))
    np.testing.assert_allclose(last, full[-1:], atol=1e-5, rtol=0)


# --- (b) the patch is invisible to mlx-lm's own caches -----------------------------------------


def test_matches_mlx_lm_with_its_own_cache(family):
    from mlx_lm.models.cache import make_prompt_cache

    mlx_rt, _ = family
    ids = prompt(120, seed=3)
    own = make_prompt_cache(mlx_rt.model)
    kv = mlx_rt.new_cache()
    np.testing.assert_allclose(np_of(mlx_rt.forward(ids, kv, all_logits=True)),
                               np_of(mlx_rt.model(mx.array([ids]), cache=own)[0]), atol=1e-5, rtol=0)
    for token in prompt(5, seed=4):
        np.testing.assert_allclose(np_of(mlx_rt.forward([token], kv)),
                                   np_of(mlx_rt.model(mx.array([[token]]), cache=own)[0]), atol=1e-5, rtol=0)
    assert own[0].offset == kv.offset == 125


def test_mlx_lm_generate_step_runs_on_kvrt_layers(llama):
    """mlx-lm's own generator (chunked prefill, `c.state` evaluation) accepts the adapters."""
    from mlx_lm.generate import generate_step

    ids = mx.array(prompt(99, seed=8))
    cache = llama.new_cache()
    ours = [int(t) for t, _ in generate_step(ids, llama.model, max_tokens=6, prompt_cache=llama.adapters(cache),
                                             prefill_step_size=32)]
    theirs = [int(t) for t, _ in generate_step(ids, llama.model, max_tokens=6, prefill_step_size=32)]
    assert ours == theirs and cache.offset >= 99 + 5


def test_install_is_idempotent(llama):
    import mlx_lm.models.base as base
    import mlx_lm.models.llama as llama_module

    before = llama_module.scaled_dot_product_attention
    install_attention(["mlx_lm.models.llama"])
    assert llama_module.scaled_dot_product_attention is before
    assert before.kvrt_original.__module__ == "mlx_lm.models.base"
    assert not hasattr(before.kvrt_original, "kvrt_original")
    assert base.scaled_dot_product_attention is before


# --- (c) trim, (d) bytes -----------------------------------------------------------------------


def test_trim_then_refeed_gives_same_logits(llama):
    ids, more = prompt(200, seed=5), prompt(6, seed=6)
    cache = llama.new_cache()
    first = np_of(llama.forward(ids, cache, all_logits=True))
    steps = [np_of(llama.forward([t], cache)) for t in more]
    assert cache.trim(len(more)) == len(more) and cache.offset == 200
    np.testing.assert_allclose(np.concatenate([np_of(llama.forward([t], cache)) for t in more]),
                               np.concatenate(steps), atol=1e-6, rtol=0)
    cache.trim(len(more) + 40)  # back into the prompt: re-feeding its tail reproduces its rows
    np.testing.assert_allclose(np_of(llama.forward(ids[-40:], cache, all_logits=True)), first[-40:], atol=1e-5, rtol=0)
    assert [a.offset for a in cache.mlx_layers] == [200, 200]


def test_nbytes_are_the_stored_arrays(llama):
    cache = llama.new_cache()
    assert cache.nbytes() == 0
    llama.forward(prompt(300), cache)
    stored = [buf for layer in cache for buf in (layer.newest.keys.data, layer.newest.values.data)]
    assert cache.nbytes() == sum(a.nbytes for a in stored)
    # 300 tokens round up to the 64-row growth step: 2 layers × (K, V) × [1, 2 heads, 320, 16] × 4 bytes
    assert cache.nbytes() == 2 * 2 * 2 * 320 * 16 * 4
    assert sum(a.nbytes for a in cache.mlx_layers) == cache.nbytes()


def test_bfloat16_cache_halves_the_bytes(tmp_path):
    rt = MLXRuntime(make_checkpoint(tmp_path, "qwen3"), dtype="bfloat16")
    cache = rt.new_cache()
    logits = rt.forward(prompt(30), cache)
    assert logits.dtype == mx.float32 and np.isfinite(np_of(logits)).all()
    assert cache[0].newest.keys.data.dtype == mx.bfloat16
    assert cache.nbytes() == 2 * 2 * 2 * 64 * 16 * 2  # 30 tokens in one 64-row step, 2 bytes each


def test_quantized_checkpoint_loads(tmp_path, llama):
    """A 4-bit MLX-community-style folder (quantized weights + `quantization` in config.json)."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    ref = MLXRuntime(llama.folder, dtype="float32").model  # a private copy: the fixture stays float
    nn.quantize(ref, group_size=32, bits=4)
    mx.save_safetensors(str(tmp_path / "model.safetensors"), dict(tree_flatten(ref.parameters())))
    cfg = json.loads((llama.folder / "config.json").read_text())
    cfg["quantization"] = {"group_size": 32, "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    rt = MLXRuntime(tmp_path, dtype="float32")
    assert isinstance(rt.model.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    ids = prompt(40, seed=7)
    np.testing.assert_allclose(np_of(rt.forward(ids, rt.new_cache(), all_logits=True)),
                               np_of(ref(mx.array([ids]))[0]), atol=1e-5, rtol=0)


# --- (e) partial attention against numpy, (f) the merge ------------------------------------------


def reference_attention(q, k, v, scale, causal_offset):
    """Plain numpy: repeat KV heads, explicit mask, float64 softmax → (out, lse)."""
    g = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, g, axis=1).astype(np.float64), np.repeat(v, g, axis=1).astype(np.float64)
    scores = q.astype(np.float64) @ k.swapaxes(-1, -2) * scale
    if causal_offset is not None:
        t, s = scores.shape[-2:]
        scores = np.where(np.arange(s)[None] <= np.arange(t)[:, None] + causal_offset, scores, -np.inf)
    top = scores.max(-1, keepdims=True)
    lse = top + np.log(np.exp(scores - top).sum(-1, keepdims=True))
    return np.exp(scores - lse) @ v, lse[..., 0]


def random_qkv(g: int, t: int, s: int, seed: int = 0, hkv: int = 2, d: int = 16):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for shape in
            ((2, hkv * g, t, d), (2, hkv, s, d), (2, hkv, s, d))]


@pytest.mark.parametrize("g", [1, 2, 3])
@pytest.mark.parametrize("causal_offset", [None, 0, 5])
@pytest.mark.parametrize("with_lse", [True, False])
def test_partial_attention_matches_numpy(g, causal_offset, with_lse):
    q, k, v = random_qkv(g, t=7, s=12, seed=g)
    out, lse = MLXOps().partial_attention(mx.array(q), mx.array(k), mx.array(v), 0.3, causal_offset, with_lse)
    want_out, want_lse = reference_attention(q, k, v, 0.3, causal_offset)
    assert out.shape == q.shape and out.dtype == mx.float32
    np.testing.assert_allclose(np.array(out), want_out, atol=1e-5, rtol=0)
    if with_lse:
        assert lse.shape == q.shape[:3] and lse.dtype == mx.float32
        np.testing.assert_allclose(np.array(lse), want_lse, atol=1e-5, rtol=0)
    else:
        assert lse is None


def test_partial_attention_keeps_half_precision_out():
    q, k, v = (mx.array(a).astype(mx.bfloat16) for a in random_qkv(2, t=4, s=9))
    out, lse = MLXOps().partial_attention(q, k, v, 0.25, causal_offset=5)
    assert out.dtype == mx.bfloat16 and lse.dtype == mx.float32


@pytest.mark.parametrize("g", [1, 3])
def test_merge_of_two_tiers_equals_attention_over_all_keys(g):
    """Older keys as one tier (all visible), the newest T as another (causal from 0) == causal over all."""
    ops = MLXOps()
    t, s = 6, 20
    q, k, v = (mx.array(a) for a in random_qkv(g, t=t, s=s, seed=10 + g))
    cut = s - t
    parts = [ops.partial_attention(q, k[:, :, :cut], v[:, :, :cut], 0.3, None),
             ops.partial_attention(q, k[:, :, cut:], v[:, :, cut:], 0.3, 0)]
    out, lse = merge_partials(ops, parts)
    want_out, want_lse = ops.partial_attention(q, k, v, 0.3, causal_offset=cut)
    np.testing.assert_allclose(np.array(out), np.array(want_out), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.array(lse), np.array(want_lse), atol=1e-5, rtol=0)


def test_small_ops():
    ops = MLXOps()
    buf = ops.alloc_seq(mx.ones((1, 2, 3, 4), dtype=mx.float16), 8)
    assert buf.shape == (1, 2, 8, 4) and buf.dtype == mx.float16 and ops.nbytes(buf) == 128
    buf = ops.write_seq(buf, 5, mx.ones((1, 2, 3, 4), dtype=mx.float16))
    assert ops.to_numpy(buf).dtype == np.float32 and ops.to_numpy(buf)[0, 0, :, 0].tolist() == [0] * 5 + [1] * 3
    assert ops.argmax_last(mx.array([0.1, 3.0, -1.0])) == 1
    with pytest.raises(KvrtError):
        ops.write_seq(buf, 6, mx.ones((1, 2, 3, 4), dtype=mx.float16))


# --- bad input -----------------------------------------------------------------------------------


def test_bad_input_is_one_line_kvrt_error(tmp_path, llama):
    with pytest.raises(KvrtError, match="no config.json"):
        MLXRuntime(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no_such_arch"}))
    mx.save_safetensors(str(tmp_path / "model.safetensors"), {"w": mx.zeros((1,))})
    with pytest.raises(KvrtError, match="no_such_arch") as info:
        MLXRuntime(tmp_path)
    assert "\n" not in str(info.value)
    with pytest.raises(KvrtError, match="dtype"):
        MLXRuntime(llama.folder, dtype="float8")
    with pytest.raises(KvrtError, match="token ids"):
        llama.forward([VOCAB], llama.new_cache())
    with pytest.raises(KvrtError, match="KVCache"):
        llama.forward([1], [])
    q, k, v = random_qkv(1, t=2, s=3)
    with pytest.raises(KvrtError):
        MLXOps().partial_attention(mx.array(q), mx.array(k[:, :1].repeat(3, axis=1)), mx.array(v[:, :1].repeat(3, axis=1)), 1.0)
