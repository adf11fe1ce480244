// Helpers shared by kvrt's Metal kernels, passed as `header` to mx.fast.metal_kernel (format: kvrt/cache/quant.py).

// A key whose bias is at or below this is hidden (OTT's traced slots carry −inf); also the running max
// before any key is seen: finite, so no step of the online softmax computes with an infinity.
static constant constexpr const float kvrt_hidden = -1e30f;

// kvrt/cache/quant.py's RANGE_CAP (2^127): max − min is clamped here so scale and codes stay finite.
static constant constexpr const float kvrt_range_cap = 1.7014118346046923e38f;

// −inf by bit pattern: an empty row's lse, written without relying on INFINITY under any math mode.
inline float kvrt_neg_inf() { return as_type<float>(0xff800000u); }

// Code i of a packed word sits at bits [i·b, (i+1)·b) (kvrt/cache/quant.py); shifted as uint so the sign bit is data.
inline uint kvrt_code(int word, uint shift, uint mask) { return (as_type<uint>(word) >> shift) & mask; }

// A float32 scale in the model dtype, rounded up where conversion rounded down: a stored scale never
// shrinks (Ops.cast_like_ceil). For a positive value the next representable one is the bit pattern + 1.
inline float kvrt_scale_up(float wanted, float) { return wanted; }
inline half kvrt_scale_up(float wanted, half) {
  half c = static_cast<half>(wanted);
  return static_cast<float>(c) < wanted ? as_type<half>(static_cast<ushort>(as_type<ushort>(c) + 1)) : c;
}
inline bfloat16_t kvrt_scale_up(float wanted, bfloat16_t) {
  // bfloat16 is float32's top half: its next value up adds one at bit 16 of the float pattern (no as_type
  // on bfloat16_t, which MLX defines as a struct before Metal 3.1)
  const float c = static_cast<float>(static_cast<bfloat16_t>(wanted));
  return static_cast<bfloat16_t>(c < wanted ? as_type<float>(as_type<uint>(c) + 0x10000u) : c);
}

// q = clamp(round_half_even((x − zero) / scale), 0, top), 0 where the scale is 0 (a constant group).
inline uint kvrt_quantize(float x, float zero, float scale, float top) {
  if (scale == 0.0f) {
    return 0u;
  }
  return static_cast<uint>(metal::clamp(metal::rint((x - zero) / scale), 0.0f, top));
}
