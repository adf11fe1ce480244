"""Every GGUF tensor type the gguf package dequantizes converts, exactly as gguf dequantizes it.

The types come from the gguf package itself (not a list kept here): what `gguf.quants.quantize`
produces, what only `gguf.quants.dequantize` reads (K-quants, IQ*, ...), and what it cannot read.
Converted weights are stored as float32 when the GGUF tensor is F32 and as float16 otherwise.
"""

import json
import shutil

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize
from safetensors.numpy import load_file, save_file

from gguf_fixtures import (K_MIX, _permute, gguf_tensor_name, hf_folder_to_gguf, k_mix_type, random_blocks,
                           write_tiny_hf_model)
from kvrt.errors import KvrtError
from kvrt.models.gguf_convert import convert_gguf

COLS = 256  # one row: a whole block of every type (32, 64, 128 or 256 values)
ROWS = 6


def _can(fn, *args) -> bool:
    try:
        fn(*args)
    except NotImplementedError:
        return False
    return True


def _probe(qtype):
    """(can quantize, can dequantize) for one type, asked of the gguf package."""
    x = np.random.default_rng(0).standard_normal((1, COLS)).astype(np.float32)
    raw = np.zeros((1, COLS // gguf.GGML_QUANT_SIZES[qtype][0] * gguf.GGML_QUANT_SIZES[qtype][1]), np.uint8)
    return _can(quantize, x, qtype), _can(dequantize, raw, qtype)


PROBED = {t: _probe(t) for t in GGMLQuantizationType}
QUANTIZABLE = [t for t, (q, d) in PROBED.items() if q and d]
DEQUANTIZE_ONLY = [t for t, (q, d) in PROBED.items() if d and not q]
UNREADABLE = [t for t, (q, d) in PROBED.items() if not d]


def _store(qtype, w: np.ndarray) -> np.ndarray:
    return w.astype(np.float32 if qtype == GGMLQuantizationType.F32 else np.float16)


def _one_tensor_gguf(path, data: np.ndarray, qtype) -> None:
    """A llama GGUF whose only tensor is token_embd.weight [ROWS, COLS] of `qtype` (`data` raw or float)."""
    w = gguf.GGUFWriter(str(path), "llama")
    for add, v in [(w.add_context_length, 64), (w.add_embedding_length, COLS), (w.add_feed_forward_length, 16),
                   (w.add_block_count, 0), (w.add_head_count, 2), (w.add_head_count_kv, 2)]:
        add(v)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(ROWS)])
    w.add_token_types([1] * ROWS)
    raw = data.dtype == np.uint8 or qtype not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16)
    w.add_tensor("token_embd.weight", data, raw_dtype=qtype if raw else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _converted_embedding(tmp_path, data, qtype) -> np.ndarray:
    _one_tensor_gguf(tmp_path / "t.gguf", data, qtype)
    out = convert_gguf(tmp_path / "t.gguf", tmp_path / "out", log=lambda *a: None)
    return load_file(str(out / "model.safetensors"))["model.embed_tokens.weight"]


def test_the_package_offers_each_kind():
    """The three groups below are not empty, and hold the types a Q4_K_M file mixes."""
    names = {t.name for t in QUANTIZABLE + DEQUANTIZE_ONLY}
    assert {"Q4_K", "Q5_0", "Q5_1", "Q6_K", "Q8_0", "Q2_K", "Q3_K", "IQ4_XS"} <= names
    assert QUANTIZABLE and DEQUANTIZE_ONLY and UNREADABLE


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_quantizable_type_converts_to_gguf_dequantize(tmp_path, qtype):
    """(a) a tensor gguf quantized converts to exactly gguf's dequantize(quantize(x))."""
    x = np.random.default_rng(1).standard_normal((ROWS, COLS)).astype(np.float32)
    data = quantize(x, qtype)
    got = _converted_embedding(tmp_path, data, qtype)
    want = _store(qtype, dequantize(quantize(x, qtype), qtype).reshape(ROWS, COLS))
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("qtype", DEQUANTIZE_ONLY, ids=lambda t: t.name)
def test_dequantize_only_type_converts_to_gguf_dequantize(tmp_path, qtype):
    """(b) random raw blocks of a type gguf reads but cannot write convert to gguf's dequantize of them."""
    raw = random_blocks(qtype, (ROWS, COLS), np.random.default_rng(2))
    want = dequantize(raw, qtype).reshape(ROWS, COLS)
    assert np.isfinite(want).all() and np.abs(want).max() > 0
    got = _converted_embedding(tmp_path, raw, qtype)
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, want.astype(np.float16))


@pytest.mark.parametrize("qtype", UNREADABLE, ids=lambda t: t.name)
def test_type_gguf_cannot_dequantize_is_one_error_naming_it(tmp_path, qtype):
    """(c) one KvrtError line that names the type and the tensor; no folder left behind."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    _one_tensor_gguf(tmp_path / "t.gguf", np.zeros((ROWS, COLS // block * size), np.uint8), qtype)
    with pytest.raises(KvrtError) as e:
        convert_gguf(tmp_path / "t.gguf", tmp_path / "out", log=lambda *a: None)
    message = str(e.value)
    assert f"unsupported GGUF tensor type {qtype.name} for token_embd.weight" in message and "\n" not in message
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- (d) a whole K-quant mixed model


@pytest.fixture(scope="module")
def k_mix_model(tmp_path_factory):
    """(HF folder, K_MIX GGUF, converted folder) of a tiny llama whose rows allow K-quants
    (hidden 256) except ffn_down's (intermediate 320: llama.cpp's small-row fallbacks)."""
    tmp = tmp_path_factory.mktemp("kmix")
    src = write_tiny_hf_model(tmp / "hf", "llama", hidden_size=256, intermediate_size=320, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=2)
    g = hf_folder_to_gguf(src, tmp / "kmix.gguf", qtype="K_MIX")
    return src, g, convert_gguf(g, tmp / "out", log=lambda *a: None)


def _dequantized_folder(src, g, folder):
    """The HF folder `src` with its weights replaced by gguf's own dequantization of the GGUF's
    tensors (Q/K rows put back with the inverse of the converter's permutation), stored as kvrt stores them."""
    shutil.copytree(src, folder)
    cfg = json.loads((src / "config.json").read_text())
    names = {gguf_tensor_name(n): n for n in load_file(str(src / "model.safetensors"))}
    state = {}
    for t in gguf.GGUFReader(g).tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        w = dequantize(t.data, t.tensor_type).reshape(shape)
        heads = {"attn_q.weight": cfg["num_attention_heads"], "attn_k.weight": cfg["num_key_value_heads"]}
        for suffix, n_head in heads.items():
            if t.name.endswith(suffix):
                order = _permute(np.arange(shape[0])[:, None], n_head)[:, 0]  # gguf row i = HF row order[i]
                w = w[np.argsort(order)]
        state[names[t.name]] = np.ascontiguousarray(_store(t.tensor_type, w))
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_k_mix_holds_the_types_of_a_q4_k_m_file(k_mix_model):
    _, g, _ = k_mix_model
    types = {t.tensor_type.name for t in gguf.GGUFReader(g).tensors}
    assert {"Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q5_1", "Q8_0", "F32"} <= types
    assert k_mix_type("blk.1.ffn_down.weight", 320).name == "Q5_1" and "ffn_down.weight" in K_MIX


def test_k_mix_model_logits_equal_its_dequantized_weights(k_mix_model, tmp_path):
    """(d) the mixed GGUF converts, loads on torch, and computes what its dequantized weights compute."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from kvrt.backends.torch.runtime import TorchRuntime

    src, g, out = k_mix_model
    ref_folder = _dequantized_folder(src, g, tmp_path / "ref")
    ids = list(range(3, 60))
    logits = []
    for folder in (out, ref_folder):
        runtime = TorchRuntime(folder, dtype="float32", device="cpu")
        cache = runtime.new_cache()
        logits.append(torch.cat([runtime.forward(ids[:50], cache, all_logits=True)] +
                                [runtime.forward([t], cache) for t in ids[50:]]))
    got, ref = logits
    assert torch.isfinite(got).all() and got.abs().max() > 0
    assert torch.equal(got, ref)
    hf = AutoModelForCausalLM.from_pretrained(ref_folder, dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0]
    assert (got - want).abs().max().item() <= 1e-4
