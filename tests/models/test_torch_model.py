"""kvrt's torch decoder equals HF transformers on the same checkpoint.

Tolerance: fp32, max |Δlogit| <= 1e-4 on the tiny models and 2e-3 on the 30-layer
default model (accumulated float32 rounding over a different op order).
"""

import pytest
import torch

from kvrt.backends.torch.runtime import TorchRuntime
from kvrt.errors import KvrtError

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]


def hf_logits(folder, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def kvrt_logits(runtime, ids, prefill, query_block=None):
    """Prefill `prefill` tokens in one call, then decode the rest one token at a time."""
    cache = runtime.new_cache()
    if query_block:  # force the query-block path the flash shortcut would skip
        runtime.ops.fused_prefill = False
        for layer in cache.layers:
            layer.query_block = query_block
    out = [runtime.forward(ids[:prefill], cache, all_logits=True)]
    out += [runtime.forward([t], cache) for t in ids[prefill:]]
    return torch.cat(out)


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_equal_transformers_on_tiny_checkpoints(tiny_model_dir, arch):
    folder = tiny_model_dir(arch)
    runtime = TorchRuntime(folder)
    ids = torch.randint(0, runtime.args.vocab_size, (160,), generator=torch.Generator().manual_seed(0)).tolist()
    ref = hf_logits(folder, ids)
    fused = kvrt_logits(runtime, ids, prefill=150)  # one flash call over the prompt, then decode
    assert (fused - ref).abs().max().item() <= 1e-4
    blocked = kvrt_logits(runtime, ids, prefill=150, query_block=32)  # several query blocks, then decode
    assert (blocked - ref).abs().max().item() <= 1e-4


def test_half_precision_dtypes_stay_close_to_float32(tiny_model_dir):
    folder = tiny_model_dir("llama")
    ids = list(range(3, 40))
    ref = kvrt_logits(TorchRuntime(folder), ids, prefill=30)
    for dtype in ("bfloat16", "float16"):
        runtime = TorchRuntime(folder, dtype=dtype)
        assert runtime.model.lm_head.weight.dtype == getattr(torch, dtype)
        got = kvrt_logits(runtime, ids, prefill=30).float()
        assert (got - ref).abs().max().item() < 0.1


def test_gguf_path_equals_hf_folder_path(tiny_model_dir, tmp_path, monkeypatch):
    from gguf_fixtures import hf_folder_to_gguf

    from kvrt.models.store import resolve_model

    folder = tiny_model_dir("llama")
    gguf = hf_folder_to_gguf(folder, tmp_path / "tiny.gguf", qtype="F32")
    monkeypatch.setenv("KVRT_HOME", str(tmp_path / "home"))
    converted = resolve_model(str(gguf), log=lambda *_: None)
    ids = list(range(5, 70))
    a = kvrt_logits(TorchRuntime(folder), ids, prefill=60)
    b = kvrt_logits(TorchRuntime(converted), ids, prefill=60)
    assert torch.equal(a, b)


def test_truncated_weights_are_a_clear_error(tiny_model_dir, tmp_path):
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(tiny_model_dir("llama"), folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(KvrtError, match="truncated or corrupt"):
        TorchRuntime(folder)


def test_unsupported_architecture_is_named(tiny_model_dir, tmp_path):
    import json
    import shutil

    folder = tmp_path / "gpt"
    shutil.copytree(tiny_model_dir("llama"), folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))
    with pytest.raises(KvrtError, match="gpt_neox.*llama, mistral, qwen2, qwen3"):
        TorchRuntime(folder)


@pytest.mark.model
def test_default_model_logits_equal_transformers(default_model_dir):
    runtime = TorchRuntime(default_model_dir)
    from kvrt.models.tokenizer import Tokenizer

    text = "The quick brown fox jumps over the lazy dog. " * 20 + "Paris is the capital of"
    ids = Tokenizer.from_folder(default_model_dir).encode(text)
    got = kvrt_logits(runtime, ids, prefill=len(ids) - 4)
    ref = hf_logits(default_model_dir, ids)
    assert (got - ref).abs().max().item() <= 2e-3
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_sliding_window_keeps_the_whole_context():
    """A sliding window limits what local layers attend (per layer, in the cache), not the context."""
    from kvrt.models.config import context_length, layer_windows

    mistral = {"model_type": "mistral", "max_position_embeddings": 32768, "sliding_window": 4096,
               "num_hidden_layers": 2}
    assert context_length(mistral) == 32768 and layer_windows(mistral) == [4096, 4096]
    assert layer_windows({**mistral, "sliding_window": None}) == [None, None]
    qwen = {"model_type": "qwen2", "max_position_embeddings": 32768, "sliding_window": 4096, "num_hidden_layers": 2,
            "max_window_layers": 1}
    assert context_length({**qwen, "use_sliding_window": True}) == 32768
    assert layer_windows(qwen) == [None, None] and layer_windows({**qwen, "use_sliding_window": True}) == [None, 4096]
