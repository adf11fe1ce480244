"""The low-bit KV format: asymmetric min/max quantization, keys per channel, values per token.

One definition, shared by every quantized tier (KIVI, and OTT on top of it), both backends
and the kernels' reference twins. It follows KIVI (Liu et al., "KIVI: A Tuning-Free
Asymmetric 2bit Quantization for KV Cache", arXiv 2402.02750), which OTT (arXiv 2505.10938)
keeps unchanged apart from which tokens enter a group.

Per group of elements (its min and max taken in the input's dtype, so `zero` is exact):

    scale = (max − min) / (2^b − 1)        zero = min
    q     = clamp(round((x − zero) / scale), 0, 2^b − 1)      (round half to even)
    x̂     = q · scale + zero

- **Keys per channel over groups of G tokens**: k [B, Hkv, n·G, D] → scale, zero
  [B, Hkv, n, D] (one pair per channel per group of G consecutive tokens).
- **Values per token over groups of gv channels** (gv divides D): v [B, Hkv, S, D] →
  scale, zero [B, Hkv, S, D/gv].
- **bits** 2, 4 or 8; codes are packed into int32 words of P = 32/b codes along the axis
  that is grouped: keys along the token axis (G a multiple of P, so a word never spans two
  groups) → codes [B, Hkv, n·G/P, D]; values along the channel axis (D a multiple of P) →
  codes [B, Hkv, S, D/P]. Code i of a run of P consecutive codes sits at bits [i·b, (i+1)·b)
  of its word; with two's-complement int32 the last code of a word holds the sign bit.
  Every stored array keeps the token axis at -2, so a tier appends groups with SeqBuffer.
- scale and zero are stored in the model dtype (the input's). Arithmetic is float32:
  the range max − min is formed in float32 and divided by 2^b − 1, and the scale is
  converted to the model dtype *rounding up* (Ops.cast_like_ceil), so the stored scale s
  always covers the range and every element obeys |x − x̂| ≤ s/2 up to float rounding
  (for float32 inputs the scale itself is rounded to nearest: the top code may clip by a
  few ulps). Codes are computed from the stored scale and zero, so dequantization is
  consistent with exactly what is stored. x̂ is computed in float32, then cast to the
  model dtype.
- A constant group (max == min) has scale 0 → every code 0 → x̂ = zero exactly (the
  division uses a safe scale there; no 0/0).
- Overflow: a range beyond 2^127 (only float32 inputs near ±1.7e38 can make max − min
  overflow) is clamped to 2^127, so scale, codes and x̂ stay finite (never inf or nan), but
  such a group saturates and the bound no longer holds. KV activations are nowhere near.

Memory: b bits per element for codes plus one scale and one zero per group, i.e.
`bits_per_element(b, G, dtype_bytes)` = b + 2·8·dtype_bytes/G; for fp16 the REFERENCE's
`b + 32/G` (2-bit, G = 128: 2.25 bits, 7.1× smaller than fp16).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvrt.errors import KvrtError
from kvrt.cache.ops import Array, Ops

BITS = (2, 4, 8)
RANGE_CAP = 2.0**127  # max − min is clamped here so the scale and q·scale stay finite in float32


def bits_per_element(bits: int, group: int, dtype_bytes: int) -> float:
    """Stored bits per quantized element: the code plus a scale and a zero shared by `group` elements."""
    return bits + 2 * 8 * dtype_bytes / group


def codes_per_word(bits: int) -> int:
    """How many b-bit codes one int32 word holds (validating bits)."""
    if bits not in BITS:
        raise KvrtError(f"kv bits must be 2, 4 or 8 (codes pack evenly into int32 words), got {bits}")
    return 32 // bits


@dataclass
class Quantized:
    """Packed codes (int32) with their scale and zero (model dtype) and how to read them back."""

    codes: Array
    scale: Array
    zero: Array
    bits: int
    group: int
    shape: tuple  # the original [B, Hkv, S, D]

    def nbytes(self, ops: Ops) -> int:
        """Bytes of everything stored: codes + scale + zero."""
        return ops.nbytes(self.codes) + ops.nbytes(self.scale) + ops.nbytes(self.zero)


@dataclass
class QuantizedKeys(Quantized):
    """Keys per channel over groups of `group` tokens: codes [B, Hkv, S/P, D] packed along
    tokens (P = 32/bits), scale and zero [B, Hkv, S/group, D]."""


@dataclass
class QuantizedValues(Quantized):
    """Values per token over groups of `group` channels: codes [B, Hkv, S, D/P] packed along
    channels (P = 32/bits), scale and zero [B, Hkv, S, D/group]."""


def _check_4d(x: Array, what: str) -> tuple:
    if x.ndim != 4:
        raise KvrtError(f"{what} to quantize must be [B, Hkv, S, D], got shape {tuple(x.shape)}")
    return tuple(x.shape)


def _scale_zero(ops: Ops, x: Array, axis: int, bits: int) -> tuple[Array, Array]:
    """Per-group (scale, zero) in x's dtype, min/max taken over `axis` (kept as size 1)."""
    lo = ops.amin(x, axis, keepdims=True)
    hi = ops.amax(x, axis, keepdims=True)
    span = ops.to_float32(hi) - ops.to_float32(lo)
    span = ops.where(span < RANGE_CAP, span, RANGE_CAP)  # also catches an overflow to inf
    return ops.cast_like_ceil(span / ((1 << bits) - 1), x), lo


def _dequantize(ops: Ops, codes: Array, scale: Array, zero: Array) -> Array:
    x = ops.to_float32(codes) * ops.to_float32(scale) + ops.to_float32(zero)
    return ops.cast_like(x, scale)


def quantize_keys(ops: Ops, k: Array, bits: int, group: int) -> QuantizedKeys:
    """k [B, Hkv, n·G, D] (whole groups of G = `group` tokens) → per-channel QuantizedKeys."""
    per = codes_per_word(bits)
    b, h, s, d = _check_4d(k, "keys")
    if group <= 0 or group % per:
        raise KvrtError(f"key group must be a positive multiple of {per} tokens for {bits}-bit codes, got {group}")
    if s % group:
        raise KvrtError(f"keys to quantize must be whole groups: {s} tokens is not a multiple of group {group}")
    grouped = k.reshape(b, h, s // group, group, d)
    scale, zero = _scale_zero(ops, grouped, 3, bits)  # [B, Hkv, n, 1, D]
    codes = ops.quantize_codes(grouped, scale, zero, bits).reshape(b, h, s, d)
    return QuantizedKeys(
        codes=ops.pack_codes(codes, bits, axis=2),
        scale=scale.reshape(b, h, s // group, d),
        zero=zero.reshape(b, h, s // group, d),
        bits=bits, group=group, shape=(b, h, s, d),
    )


def dequantize_keys(ops: Ops, qk: QuantizedKeys) -> Array:
    """QuantizedKeys → keys [B, Hkv, S, D] in the model dtype."""
    b, h, s, d = qk.shape
    n = s // qk.group
    codes = ops.unpack_codes(qk.codes, qk.bits, axis=2, length=s).reshape(b, h, n, qk.group, d)
    x = _dequantize(ops, codes, qk.scale.reshape(b, h, n, 1, d), qk.zero.reshape(b, h, n, 1, d))
    return x.reshape(b, h, s, d)


def quantize_values(ops: Ops, v: Array, bits: int, group: int) -> QuantizedValues:
    """v [B, Hkv, S, D] → per-token QuantizedValues over groups of `group` channels (dividing D)."""
    per = codes_per_word(bits)
    b, h, s, d = _check_4d(v, "values")
    if group <= 0 or d % group:
        raise KvrtError(f"value group must divide the head dim {d}, got {group}")
    if d % per:
        raise KvrtError(f"head dim {d} must be a multiple of {per} to pack {bits}-bit value codes per token")
    grouped = v.reshape(b, h, s, d // group, group)
    scale, zero = _scale_zero(ops, grouped, 4, bits)  # [B, Hkv, S, D/gv, 1]
    codes = ops.quantize_codes(grouped, scale, zero, bits).reshape(b, h, s, d)
    return QuantizedValues(
        codes=ops.pack_codes(codes, bits, axis=3),
        scale=scale.reshape(b, h, s, d // group),
        zero=zero.reshape(b, h, s, d // group),
        bits=bits, group=group, shape=(b, h, s, d),
    )


def dequantize_values(ops: Ops, qv: QuantizedValues) -> Array:
    """QuantizedValues → values [B, Hkv, S, D] in the model dtype."""
    b, h, s, d = qv.shape
    codes = ops.unpack_codes(qv.codes, qv.bits, axis=3, length=d).reshape(b, h, s, d // qv.group, qv.group)
    scale = qv.scale.reshape(b, h, s, d // qv.group, 1)
    zero = qv.zero.reshape(b, h, s, d // qv.group, 1)
    return _dequantize(ops, codes, scale, zero).reshape(b, h, s, d)


def mean_substituted(ops: Ops, k: Array, traced: Array, group: int) -> Array:
    """OTT (arXiv 2505.10938): keys [B, Hkv, n·G, D] whose traced slots (bool [B, Hkv, n·G]) take
    the float32 mean of their group's untraced keys, cast to the model dtype, so a traced outlier
    widens no group's range. The reference twin of the fused quantize kernels' substitution."""
    b, h, s, d = k.shape
    grouped = ops.to_float32(k).reshape(b, h, s // group, group, d)
    hit = traced.reshape(b, h, s // group, group, 1)
    kept = ops.where(hit, 0.0, grouped)
    rest = group - ops.sum(ops.where(hit, 1.0, 0.0), axis=3)  # [B, Hkv, n, 1]: OTT traces fewer than G
    mean = ops.sum(kept, axis=3)[:, :, :, None, :] / rest[..., None]
    return ops.cast_like(ops.where(hit, mean, grouped), k).reshape(b, h, s, d)
