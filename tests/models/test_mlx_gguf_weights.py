"""A GGUF's quantized weights load on MLX as MLX-quantized layers (backends/mlx/gguf_weights.py).

Tiny GGUFs of chosen tensor types are written from tiny HF folders, converted as any GGUF is
(which records gguf_types.json) and loaded on MLX quantized and in full precision
(`quantize_gguf=False`). The fitted layers hold the GGUF's own values up to the float16 storage
of the converted weights (asymmetric and symmetric 32-value blocks, Q4_K/Q5_K sub-blocks, MXFP4)
or within half a step (the K-quants' 16-value sub-blocks, the IQ grids), so the logits stay within
3e-3 of the full-precision load's (measured: 1.1e-3 and 8e-4 on the two models below, whose
logits reach 1.6 and 2.0; on the default model, SmolLM2-135M Q4_1, 0.11 at most and 0.005 on
average over a 512-token passage, logits of std 7.8, the same top-1 token everywhere;
mx.quantize's own grid gives 23 and 1.9 there).
"""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

mx = pytest.importorskip("mlx.core")
nn = pytest.importorskip("mlx.nn")
pytest.importorskip("mlx_lm")

from click.testing import CliRunner  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from gguf_fixtures import hf_folder_to_gguf, random_blocks, write_tiny_hf_model  # noqa: E402
from kvrt.backends.mlx.gguf_weights import (GGUF_TO_MLX, SIDECAR, describe, fit, pack,  # noqa: E402
                                            quantize_gguf_weights)
from kvrt.backends.mlx.runtime import MLXRuntime  # noqa: E402
from kvrt.cli import cli  # noqa: E402
from kvrt.models.gguf_convert import convert_gguf  # noqa: E402
from kvrt.models.loading import load_runtime  # noqa: E402

LOGIT_TOL = 3e-3
IDS = [int(i) for i in np.random.default_rng(3).integers(3, 200, 40)]
QUANTIZABLE = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "TQ1_0", "TQ2_0", "MXFP4"}  # what gguf.quants writes
EXACT = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "TQ1_0", "TQ2_0", "MXFP4"}  # one grid per 32 values


def _quiet(*a):
    pass


def retyped_gguf(src, dst, type_of):
    """A copy of the GGUF `src` whose tensor `name` is stored as ggml type `type_of(name, ndim)`
    (quantized with gguf.quants from the source's float32 values)."""
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(dst), arch)
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        vtype = f.types[0]
        sub_type = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(f.name, f.contents(), vtype, sub_type=sub_type)
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        x = np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape(shape)
        q = T[type_of(t.name, x.ndim)]
        if q == T.F32:
            w.add_tensor(t.name, x)
        elif q == T.F16:
            w.add_tensor(t.name, x.astype(np.float16))
        else:
            w.add_tensor(t.name, quantize(x, q), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


# llama (separate lm_head): every matrix Q4_1, as the default model's layers
ALL_Q4_1 = {"output": "Q4_1", "token_embd": "Q4_1", "attn_q": "Q4_1", "attn_k": "Q4_1", "attn_v": "Q4_1",
            "attn_output": "Q4_1", "ffn_gate": "Q4_1", "ffn_up": "Q4_1", "ffn_down": "Q4_1"}
# qwen2 (tied head, q/k/v biases): a mix, one matrix left F16
MIXED = {"token_embd": "Q8_0", "attn_q": "Q5_1", "attn_k": "Q5_0", "attn_v": "F16", "attn_output": "Q4_0",
         "ffn_gate": "Q4_1", "ffn_up": "MXFP4", "ffn_down": "Q8_0"}
FORMAT = {"Q4_0": (4, "affine"), "Q4_1": (4, "affine"), "Q5_0": (5, "affine"), "Q5_1": (5, "affine"),
          "Q8_0": (8, "affine"), "MXFP4": (4, "mxfp4")}
HF_OF = {"token_embd": "model.embed_tokens", "output": "lm_head", "attn_q": "self_attn.q_proj",
         "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
         "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def _kind(name: str) -> str:
    return name.split(".")[-2] if name.startswith("blk.") else name.split(".")[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (converted folder, MLX quantized runtime, MLX full-precision runtime), built lazily."""
    specs = {"llama-q4_1": ("llama", ALL_Q4_1), "qwen2-mixed": ("qwen2", MIXED), "llama-f32": ("llama", {}),
             "qwen2-f16": ("qwen2", {k: "F16" for k in MIXED})}
    made = {}

    def get(name):
        if name not in made:
            arch, types = specs[name]
            tmp = tmp_path_factory.mktemp(name)
            src = hf_folder_to_gguf(write_tiny_hf_model(tmp / "hf", arch), tmp / "f32.gguf")
            g = retyped_gguf(src, tmp / "m.gguf", lambda n, ndim: types.get(_kind(n), "F32") if ndim == 2 else "F32")
            folder = convert_gguf(g, tmp / "out", log=_quiet)
            made[name] = folder, MLXRuntime(folder, dtype="float32"), MLXRuntime(folder, dtype="float32",
                                                                                   quantize_gguf=False)
        return made[name]

    return get


def logits(rt) -> np.ndarray:
    return np.array(rt.forward(IDS, rt.new_cache(), all_logits=True))


def layers(rt) -> dict:
    return dict(tree_flatten(rt.model.leaf_modules(), is_leaf=nn.Module.is_module))


def nbytes(rt) -> int:
    return sum(v.nbytes for _, v in tree_flatten(rt.model.parameters()))


# ---------------------------------------------------------------- the packing and the fit


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_is_mlx_layout(bits):
    """Codes packed by `pack` are the words mx.quantize writes for the same codes."""
    w = mx.random.normal((8, 256), key=mx.random.key(bits))
    words, scales, biases = mx.quantize(w, group_size=32, bits=bits)
    deq = mx.dequantize(words, scales, biases, group_size=32, bits=bits).reshape(8, 8, 32)
    codes = mx.round((deq - biases[..., None]) / scales[..., None]).reshape(8, 256).astype(mx.uint32)
    assert mx.array_equal(pack(codes, bits), words).item()


def _gguf_values(ggml_type: str, rows=16, cols=512) -> np.ndarray:
    """A dequantized `ggml_type` tensor as the converter stores it (float16)."""
    q, rng = T[ggml_type], np.random.default_rng(5)
    if ggml_type in QUANTIZABLE:
        x = rng.standard_normal((rows, cols)).astype(np.float32)
        data = quantize(x, q)
    else:
        data = random_blocks(q, (rows, cols), rng, byte_cap=0x14)
    return np.asarray(dequantize(data, q), np.float32).reshape(rows, cols).astype(np.float16)


def _readable(ggml_type: str) -> bool:
    try:
        dequantize(np.zeros((1, gguf.GGML_QUANT_SIZES[T[ggml_type]][1]), np.uint8), T[ggml_type])
    except NotImplementedError:
        return False  # kvrt cannot convert it either (Q8_1, Q8_K)
    return True


@pytest.mark.parametrize("ggml_type", [t for t in sorted(GGUF_TO_MLX) if _readable(t)])
def test_a_layer_holds_the_gguf_values(ggml_type):
    """A Linear of each quantized type becomes an MLX-quantized layer of the mapped bits and group 32 that
    holds the GGUF's values: exactly up to float16 for one-grid-per-32-values types, within half a step else."""
    w = _gguf_values(ggml_type)
    model = nn.Sequential(nn.Linear(512, 16, bias=False))
    model.layers[0].weight = mx.array(w)
    formats = quantize_gguf_weights(model, {"layers.0.weight": ggml_type})
    layer = model.layers[0]
    bits, kind = GGUF_TO_MLX[ggml_type]
    assert isinstance(layer, nn.QuantizedLinear) and layer.group_size == 32 and layer.bits == bits
    assert layer.mode == ("mxfp4" if kind == "mxfp4" else "affine") and sum(formats.values()) == 1
    got = np.array(mx.dequantize(layer.weight, layer.scales, layer.get("biases"), group_size=32, bits=bits,
                                 mode=layer.mode).astype(mx.float32))
    want = w.astype(np.float32)
    # the float16 rounding of the stored values moves the fitted grid by ~2^-11 of the group's largest magnitude
    rounding = np.repeat(np.abs(want).reshape(16, -1, 32).max(-1), 32, axis=-1) * 1e-3
    if ggml_type in EXACT:
        assert (np.abs(got - want) <= rounding).all()
    else:
        step = np.repeat(np.array(layer.scales.astype(mx.float32)), 32, axis=-1)
        assert (np.abs(got - want) <= np.abs(step) / 2 + rounding).all()


def test_symmetric_fit_puts_the_extreme_on_an_end_code():
    """Q4_0 blocks whose largest magnitude is positive or negative both come back exactly."""
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    x[0, 3], x[1, 40], x[2, 5] = 9.0, -9.0, 0.0
    x[3] = 0.0  # an all-zero row: scale 0
    w = dequantize(quantize(x, T.Q4_0), T.Q4_0).reshape(x.shape).astype(np.float32)
    words, scales, biases = fit(mx.array(w), "Q4_0")
    got = np.array(mx.dequantize(words, scales, biases, group_size=32, bits=4))
    np.testing.assert_allclose(got, w, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- whole models


def test_conversion_records_each_weights_gguf_type(models):
    folder, _, _ = models("qwen2-mixed")
    types = json.loads((folder / SIDECAR).read_text())
    assert types["model.embed_tokens.weight"] == "Q8_0" and types["model.norm.weight"] == "F32"
    assert types["model.layers.1.self_attn.v_proj.weight"] == "F16"
    assert types["model.layers.0.self_attn.q_proj.bias"] == "F32" and "lm_head.weight" not in types
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "np") as f:
        assert set(types) == set(f.keys())


@pytest.mark.parametrize("name, tied", [("llama-q4_1", False), ("qwen2-mixed", True)])
def test_quantized_gguf_loads_as_quantized_layers(models, name, tied):
    folder, rt, full = models(name)
    types = ALL_Q4_1 if name == "llama-q4_1" else MIXED
    got = layers(rt)
    for kind, ggml_type in types.items():
        paths = [p for p in got if p.endswith(HF_OF[kind])]
        assert paths, kind
        for path in paths:
            layer = got[path]
            if ggml_type == "F16":
                assert type(layer) is nn.Linear
                continue
            assert isinstance(layer, nn.QuantizedEmbedding if kind == "token_embd" else nn.QuantizedLinear), path
            assert (layer.bits, layer.mode, layer.group_size) == (*FORMAT[ggml_type], 32), path
    assert not any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for m in layers(full).values())
    assert ("lm_head" in got) != tied  # a tied head runs as embed_tokens.as_linear: quantized too
    assert sum(rt.weight_formats.values()) == sum(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
                                                  for m in got.values())
    assert nbytes(rt) < 0.5 * nbytes(full)
    q, f = logits(rt), logits(full)
    assert np.abs(f).max() > 0.1 and np.abs(q - f).max() <= LOGIT_TOL


def test_k_quant_mix_loads_quantized(tmp_path):
    """A Q4_K_M-like mix (K-quant blocks drawn at random, llama.cpp's fallbacks where rows are short):
    Q4_K/Q5_K come back exactly, Q6_K within half a step of an 8-bit grid (its 16-value sub-blocks
    have two scales per group of 32). Bound 0.3 on logits reaching 27 (std 3.4)."""
    src = write_tiny_hf_model(tmp_path / "hf", "llama", hidden_size=256, intermediate_size=320,
                              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
    folder = convert_gguf(hf_folder_to_gguf(src, tmp_path / "kmix.gguf", qtype="K_MIX"), tmp_path / "out", log=_quiet)
    rt, full = MLXRuntime(folder, dtype="float32"), MLXRuntime(folder, dtype="float32", quantize_gguf=False)
    assert rt.weight_formats == {"4-bit affine g32": 14, "5-bit affine g32": 6, "8-bit affine g32": 3}
    q, f = logits(rt), logits(full)
    assert np.abs(f).max() > 10 and np.abs(q - f).max() <= 0.3
    assert nbytes(rt) < 0.5 * nbytes(full)


@pytest.mark.parametrize("name", ["llama-f32", "qwen2-f16"])
def test_float_gguf_stays_float(models, name):
    folder, rt, full = models(name)
    assert rt.weight_formats == {}
    assert not any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for m in layers(rt).values())
    assert np.array_equal(logits(rt), logits(full))


def test_without_the_sidecar_a_folder_loads_as_floats(models, tmp_path):
    """A folder converted before kvrt wrote gguf_types.json loads as it always did."""
    folder, _, full = models("llama-q4_1")
    old = shutil.copytree(folder, tmp_path / "old")
    (old / SIDECAR).unlink()
    rt = MLXRuntime(old, dtype="float32")
    assert rt.weight_formats == {}
    assert not any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for m in layers(rt).values())
    assert np.array_equal(logits(rt), logits(full))


def test_load_runtime_passes_the_choice(models):
    folder, rt, _ = models("llama-q4_1")
    assert load_runtime(folder, "mlx", "float32").weight_formats == rt.weight_formats
    assert load_runtime(folder, "mlx", "float32", quantize_gguf=False).weight_formats == {}


def test_models_lists_what_each_backend_runs(models, tmp_path):
    folder, _, _ = models("llama-q4_1")
    home = tmp_path / "home"
    shutil.copytree(folder, home / "models" / "new")
    shutil.copytree(folder, home / "models" / "old")
    (home / "models" / "old" / SIDECAR).unlink()
    result = CliRunner().invoke(cli, ["models"], env={"KVRT_HOME": str(home)})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("new") and "MiB" in lines[0]
    assert lines[1].strip() == "GGUF weights: 16 Q4_1, 5 F32"
    assert lines[2].strip() == ("torch: float32 (bfloat16 on CUDA), dequantized; "
                                "mlx: 16 × 4-bit affine g32, 5 float")
    assert lines[3].startswith("old") and "mlx: floats (converted before kvrt recorded GGUF types" in lines[4]


def test_describe_counts_types_and_formats():
    d = describe({"a": "Q4_1", "b": "Q4_1", "c": "Q8_0", "d": "F32", "e": "Q6_K", "f": "MXFP4"})
    assert d["gguf"] == "2 Q4_1, 1 Q8_0, 1 F32, 1 Q6_K, 1 MXFP4"
    assert d["mlx"] == "2 × 4-bit affine g32, 2 × 8-bit affine g32, 1 × mxfp4 g32, 1 float"
