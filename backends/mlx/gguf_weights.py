"""A GGUF's quantized weights stay quantized on MLX.

kvrt converts a GGUF into an HF folder of dequantized weights (float16, float32 for F32
tensors) and records each weight's GGUF tensor type beside them in ``gguf_types.json``
(HF tensor name -> ggml type name). On MLX, every Linear or Embedding whose weight came from
a quantized GGUF type becomes an MLX-quantized layer (``nn.QuantizedLinear`` /
``nn.QuantizedEmbedding``, so a tied head's ``embed_tokens.as_linear`` runs quantized too):

- affine mode at the MLX bit width nearest the GGUF type (Q4_x→4, Q5_x→5, Q8_x→8, Q2_K→2,
  Q3_K→3, IQ4_*→4, IQ3_*→3, IQ2_*/IQ1_*/TQ*→2) — except Q6_K→8: its two scales per 32 values
  do not fit 6-bit affine groups (at 6 bits Gemma-3-270M's Q4_K_M kept the same top token at
  97.7% of positions, at 8 bits at 100%; Q6_K costs 6.56 bits a weight, MLX 8-bit g32 9) — group size 32 (GGUF blocks are 32
  values or 256-value super-blocks of 16/32-value sub-blocks); MXFP4 becomes MLX's own
  ``mxfp4`` mode, which holds exactly the same values;
- F32/F16/BF16 weights stay float, as does any weight whose rows are not whole groups.

The scales and biases are fitted to the grid the GGUF block already lies on, not by
``mx.quantize`` (which moves the grid so zero is exact, and so re-rounds every value: about as
much error again as the GGUF's own quantization; on the default model its logits then differ by
up to 23, against 0.11 here). Blocks with one uniform grid per 32 values come back exactly, up to
the float16 storage of the dequantized values: Q4_1/Q5_1 (codes from the block minimum to its
maximum), Q4_0/Q5_0/Q8_0/TQ* (symmetric codes, the largest magnitude on an end code), Q4_K/Q5_K
(the step that puts the 32-value sub-block on a grid, searched). The K-quants with 16-value
sub-blocks (Q2_K, Q3_K, Q6_K: two scales in a group of 32) and the non-uniform IQ grids are
re-rounded, within half a step (Q6_K at 8 bits: a step of 1/127 of the group's largest magnitude). The codes are packed
in MLX's layout (a little-endian bit stream, ``bits`` words per 32 values), checked against
``mx.quantize`` in tests/models/test_mlx_gguf_weights.py.

Everything here is lazy: each weight is read from the safetensors file, fitted and packed when
its layer is evaluated, one layer at a time, so a load never holds more than one float weight.
This module's tables import no MLX, so ``kvrt models`` can describe a folder without it.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

SIDECAR = "gguf_types.json"
GROUP = 32
CHUNK = 1 << 22  # values fitted at once (see fit_rows)

# ggml type -> (MLX bits, fit) where fit is how a group's scale and bias are found (see `fit`):
# "minmax": codes 0..2^b−1 from the group's minimum to its maximum (Q4_1/Q5_1 blocks use both ends);
# "lattice": the step (max − min) / k, for the k ≤ 2^b−1 on whose grid the values lie best (the K-quants'
#   sub-block scales and minimums are fitted, so a block's codes often span 0..14 instead of 0..15);
# an int z: symmetric codes −z..(2^b−1−z), the largest magnitude on the z end (Q4_0, Q5_0, Q8_0, Q3_K, Q6_K, TQ*);
# "mxfp4": MLX's mxfp4 mode (the same E8M0 scales and E2M1 values as GGUF's MXFP4).
GGUF_TO_MLX: dict[str, tuple[int, object]] = {
    "Q4_0": (4, 8), "Q4_1": (4, "minmax"), "Q5_0": (5, 16), "Q5_1": (5, "minmax"),
    "Q8_0": (8, 127), "Q8_1": (8, 127), "Q8_K": (8, 127),
    "Q2_K": (2, "lattice"), "Q3_K": (3, 4), "Q4_K": (4, "lattice"), "Q5_K": (5, "lattice"), "Q6_K": (8, 127),
    "IQ1_S": (2, "lattice"), "IQ1_M": (2, "lattice"),
    "IQ2_XXS": (2, "lattice"), "IQ2_XS": (2, "lattice"), "IQ2_S": (2, "lattice"),
    "IQ3_XXS": (3, "lattice"), "IQ3_S": (3, "lattice"),
    "IQ4_NL": (4, "lattice"), "IQ4_XS": (4, "lattice"),
    "TQ1_0": (2, 1), "TQ2_0": (2, 1),
    "MXFP4": (4, "mxfp4"),
}


def read_types(folder: Path) -> dict[str, str] | None:
    """The folder's gguf_types.json (HF name -> ggml type name), or None when there is none (a folder
    converted before kvrt wrote it, or one not converted from a GGUF) or it cannot be read."""
    try:
        data = json.loads((Path(folder) / SIDECAR).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        return None
    return data


def mlx_format(ggml_type: str) -> dict | None:
    """The to_quantized() parameters for a weight of `ggml_type`, or None where it stays float."""
    if ggml_type not in GGUF_TO_MLX:
        return None
    bits, fit = GGUF_TO_MLX[ggml_type]
    if fit == "mxfp4":
        return {"group_size": GROUP, "bits": 4, "mode": "mxfp4"}
    return {"group_size": GROUP, "bits": bits, "mode": "affine"}


def format_name(fmt: dict | None) -> str:
    if fmt is None:
        return "float"
    return "mxfp4 g32" if fmt["mode"] == "mxfp4" else f"{fmt['bits']}-bit affine g{fmt['group_size']}"


def describe(types: dict[str, str]) -> dict[str, str]:
    """What a folder with these GGUF types holds and runs as, without loading it:
    {"gguf": "210 Q4_1, 1 Q8_0, 61 F32", "mlx": "210 × 4-bit affine g32, 1 × 8-bit affine g32, 61 float"}."""
    by_type = Counter(types.values())
    by_format = Counter(format_name(mlx_format(t)) for t in types.values())
    order = sorted(by_format, key=lambda f: (f == "float", f))
    return {"gguf": ", ".join(f"{n} {t}" for t, n in by_type.most_common()),
            "mlx": ", ".join(f"{by_format[f]} × {f}" if f != "float" else f"{by_format[f]} float" for f in order)}


# ---------------------------------------------------------------- MLX


def pack(codes, bits: int):
    """Codes [..., n] (uint32 below 2**bits, n a multiple of 32) -> MLX's packed words [..., n·bits/32]:
    a little-endian bit stream per row, value i at bits [i·bits, (i+1)·bits)."""
    import mlx.core as mx

    *lead, n = codes.shape
    c = codes.reshape(*lead, n // 32, 32)
    words = []
    for j in range(bits):  # word j of each 32-value chunk
        a, b = -(-32 * j // bits), -(-32 * (j + 1) // bits)  # the values whose first bit lies in word j
        shifts = mx.array([i * bits - 32 * j for i in range(a, b)], dtype=mx.uint32)
        word = mx.sum(mx.left_shift(c[..., a:b], shifts), axis=-1)  # disjoint bits: the sum is an OR
        if j > 0 and (a - 1) * bits + bits > 32 * j:  # the value before spills into this word
            word = word + mx.right_shift(c[..., a - 1], mx.array(32 * j - (a - 1) * bits, dtype=mx.uint32))
        words.append(word)
    return mx.stack(words, axis=-1).reshape(*lead, n * bits // 32)


def fit(weight, ggml_type: str, group: int = GROUP):
    """(packed weight, scales, biases) in MLX's affine layout for a float weight [rows, cols] that holds a
    dequantized `ggml_type` tensor, on the grid its GGUF blocks lie on (see the module docstring); float32."""
    import mlx.core as mx

    bits, kind = GGUF_TO_MLX[ggml_type]
    levels = 2 ** bits - 1
    rows, cols = weight.shape
    w = weight.astype(mx.float32).reshape(rows, cols // group, group)
    hi, lo = mx.max(w, axis=-1), mx.min(w, axis=-1)
    if kind == "minmax":
        scales, biases = (hi - lo) / levels, lo
    elif kind == "lattice":  # try k = levels down to levels/2 steps over the span; keep the best (first on a tie)
        biases, scales, best = lo, (hi - lo) / levels, None
        for k in range(levels, levels // 2, -1):
            s = (hi - lo) / k
            step = mx.where(s > 0, s, 1.0)[..., None]
            r = (w - lo[..., None]) / step
            err = mx.mean(mx.square((r - mx.round(r)) * step), axis=-1)
            if best is None:
                best = err
            else:
                scales, best = mx.where(err < best, s, scales), mx.minimum(err, best)
    else:  # symmetric: |extreme| = z steps, the other side up to levels − z steps (more where 16-value
        z = kind  # sub-blocks of two scales share a group: then no value is clipped)
        negative = -lo >= hi
        scales = mx.where(negative, mx.maximum(-lo / z, hi / (levels - z)), mx.maximum(hi / z, -lo / (levels - z)))
        biases = mx.where(negative, -z * scales, -(levels - z) * scales)
    step = mx.where(scales > 0, scales, 1.0)[..., None]
    codes = mx.clip(mx.round((w - biases[..., None]) / step), 0, levels).astype(mx.uint32)
    return pack(codes.reshape(rows, cols), bits), scales, biases


def fit_rows(weight, ggml_type: str, group: int = GROUP, chunk: int = CHUNK):
    """`fit` over blocks of rows of about `chunk` values each, so that evaluating a big weight (an
    embedding) holds the float temporaries of one block at a time, not of the whole weight."""
    import mlx.core as mx

    rows, cols = weight.shape
    step = max(1, chunk // cols)
    if rows <= step:
        return fit(weight, ggml_type, group)
    parts = [fit(weight[r:r + step], ggml_type, group) for r in range(0, rows, step)]
    return tuple(mx.concatenate(p, axis=0) for p in zip(*parts))


def quantize_gguf_weights(model, types: dict[str, str]) -> Counter:
    """Turn each float Linear/Embedding of `model` whose `<path>.weight` came from a quantized GGUF type
    into its MLX-quantized layer (in place, lazily: nothing is evaluated here). Returns the count of
    layers per format name ("4-bit affine g32": 210, ...)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    plan, sources = {}, {}
    for path, module in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        fmt = mlx_format(types.get(f"{path}.weight", "F32"))
        if fmt is None or not hasattr(module, "to_quantized") or "weight" not in module:
            continue
        weight = module["weight"]
        if weight.ndim != 2 or weight.shape[-1] % fmt["group_size"]:
            continue
        plan[path], sources[path] = fmt, (weight, types[f"{path}.weight"])
    if not plan:
        return Counter()
    # mlx's own swap to QuantizedLinear/QuantizedEmbedding; their mx.quantize graphs are replaced unevaluated
    nn.quantize(model, class_predicate=lambda path, _: dict(plan[path]) if path in plan else False)
    quantized = dict(tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module))
    for path, fmt in plan.items():
        layer, (weight, ggml_type) = quantized[path], sources[path]
        if fmt["mode"] == "mxfp4":  # mx.quantize's power-of-two scales reproduce MXFP4 blocks exactly
            layer.weight, layer.scales = mx.quantize(weight.astype(mx.float32), fmt["group_size"], 4, mode="mxfp4")
        else:
            layer.weight, layer.scales, layer.biases = fit_rows(weight, ggml_type, fmt["group_size"])
    return Counter(format_name(fmt) for fmt in plan.values())
