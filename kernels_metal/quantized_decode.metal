// Decode attention over a whole quantized tier (KIVI, arXiv 2402.02750; format in kvrt/cache/quant.py), split
// over the sequence: one simdgroup per (batch·KV head, split). Lane l owns channels c = e·32 + l, reads
// each packed key and value word once for all ROWS = G·T query rows of its KV head (GQA; row r = g·T + t),
// dequantizes in registers and runs an online float32 softmax. Each split writes its (out, lse); the
// wrapper merges the splits by log-sum-exp. key_bias −inf hides a key (OTT's traced slots, arXiv 2505.10938).
// With per-row lengths (a batch stored rectangularly, each row padded at the end of the token axis), batch
// row b reads no token t >= lengths[b]: a split wholly past it exits at once.
// The inputs are read where they lie, through their element strides (sources.py builds this kernel with
// ensure_row_contiguous=False): the tier's six arrays are views of their SeqBuffers along the token axis
// (QuantizedTier.stored), which MLX would otherwise copy whole at every step; q [B, Hq, T, D] and bias
// [B, Hkv, S] (float32) and lengths [B] (int32) are small and read the same way, so no input's layout is assumed.
// kc [B, Hkv, S/PER, D], ks/kz [B, Hkv, S/GROUP, D], vc [B, Hkv, S, D/PER], vs/vz [B, Hkv, S, D/VGROUP].
// Template: KT (scale/zero dtype, the model's), D, ROWS, BITS, GROUP (tokens per key scale),
// VGROUP (channels per value scale), HAS_BIAS, HAS_LENGTHS. meta = [S, tokens per split, splits, Hkv, T].
constexpr int E = D / 32;
constexpr int PER = 32 / BITS;
constexpr uint MASK = (1u << BITS) - 1u;
const uint bh = threadgroup_position_in_grid.x;
const uint split = threadgroup_position_in_grid.y;
const uint lane = thread_index_in_simdgroup;
const int S = meta[0];
const int T = meta[4];
const int64_t batch = int64_t(bh) / meta[3];
const int64_t head = int64_t(bh) % meta[3];
const int start = int(split) * meta[1];
const int stop = metal::min(metal::min(start + meta[1], S), HAS_LENGTHS ? lengths[batch * lengths_strides[0]] : S);
const float scale = qscale[0];
// element offsets of this (batch, KV head) in each array of the tier in 64 bits (a whole buffer may pass
// 2^31 elements); steps along its last two axes in 32, so the loop does no 64-bit multiply
const int64_t kc0 = batch * kc_strides[0] + head * kc_strides[1];
const int64_t ks0 = batch * ks_strides[0] + head * ks_strides[1];
const int64_t kz0 = batch * kz_strides[0] + head * kz_strides[1];
const int64_t vc0 = batch * vc_strides[0] + head * vc_strides[1];
const int64_t vs0 = batch * vs_strides[0] + head * vs_strides[1];
const int64_t vz0 = batch * vz_strides[0] + head * vz_strides[1];
const int kct = int(kc_strides[2]), kcd = int(kc_strides[3]);
const int kst = int(ks_strides[2]), ksd = int(ks_strides[3]);
const int kzt = int(kz_strides[2]), kzd = int(kz_strides[3]);
const int vct = int(vc_strides[2]), vcd = int(vc_strides[3]);
const int vst = int(vs_strides[2]), vsd = int(vs_strides[3]);
const int vzt = int(vz_strides[2]), vzd = int(vz_strides[3]);

float qr[ROWS][E];
float acc[ROWS][E];
float m[ROWS];
float l[ROWS];
for (int r = 0; r < ROWS; ++r) {
  // row r: query head head·G + r / T, query r % T
  const int64_t qrow = batch * q_strides[0] + (head * (ROWS / T) + r / T) * q_strides[1] + (r % T) * q_strides[2];
  for (int e = 0; e < E; ++e) {
    qr[r][e] = static_cast<float>(q[qrow + (e * 32 + int(lane)) * q_strides[3]]) * scale;
    acc[r][e] = 0.0f;
  }
  m[r] = kvrt_hidden;
  l[r] = 0.0f;
}
// the placeholder bias has one axis: its strides are read only when there is a bias
const int64_t b0 = HAS_BIAS ? batch * bias_strides[0] + head * bias_strides[1] : 0;
const int bt = HAS_BIAS ? int(bias_strides[2]) : 0;

for (int t = start; t < stop; ++t) {
  float b = 0.0f;
  if (HAS_BIAS) {
    b = bias[b0 + t * bt];
    if (!(b > kvrt_hidden)) {
      continue;  // the same t in every lane: the simdgroup skips together
    }
  }
  // keys: word t / PER of each channel holds token t's code; scale and zero per (group of tokens, channel)
  const int kw = (t / PER) * kct;
  const int kg = (t / GROUP) * kst;
  const int kh = (t / GROUP) * kzt;
  const uint kshift = uint(t % PER) * BITS;
  // values: token t's words along its channels; scale and zero per (token, group of channels)
  const int vw = t * vct;
  const int vg = t * vst;
  const int vh = t * vzt;
  float dot[ROWS];
  for (int r = 0; r < ROWS; ++r) {
    dot[r] = 0.0f;
  }
  float v[E];
  for (int e = 0; e < E; ++e) {
    const int c = e * 32 + int(lane);
    // dequantized in float32, then rounded to the model dtype as the reference twin stores it
    const float k = static_cast<float>(static_cast<KT>(
        static_cast<float>(kvrt_code(kc[kc0 + (kw + c * kcd)], kshift, MASK)) *
            static_cast<float>(ks[ks0 + (kg + c * ksd)]) +
        static_cast<float>(kz[kz0 + (kh + c * kzd)])));
    for (int r = 0; r < ROWS; ++r) {
      dot[r] += qr[r][e] * k;
    }
    v[e] = static_cast<float>(static_cast<KT>(
        static_cast<float>(kvrt_code(vc[vc0 + (vw + (c / PER) * vcd)], uint(c % PER) * BITS, MASK)) *
            static_cast<float>(vs[vs0 + (vg + (c / VGROUP) * vsd)]) +
        static_cast<float>(vz[vz0 + (vh + (c / VGROUP) * vzd)])));
  }
  for (int r = 0; r < ROWS; ++r) {
    const float s = simd_sum(dot[r]) + b;
    const float m_new = metal::max(m[r], s);
    const float correction = metal::exp(m[r] - m_new);
    const float p = metal::exp(s - m_new);
    l[r] = l[r] * correction + p;
    for (int e = 0; e < E; ++e) {
      acc[r][e] = acc[r][e] * correction + p * v[e];
    }
    m[r] = m_new;
  }
}

// a row that saw no key: out 0, lse −inf, which the merge weighs as nothing (outputs are MLX's own,
// row-contiguous [B·Hkv, splits, ROWS, D] and [B·Hkv, splits, ROWS])
const int row0 = (int(bh) * meta[2] + int(split)) * ROWS;
for (int r = 0; r < ROWS; ++r) {
  const bool empty = l[r] == 0.0f;
  const float inv = empty ? 0.0f : 1.0f / l[r];
  for (int e = 0; e < E; ++e) {
    out[(row0 + r) * D + e * 32 + int(lane)] = acc[r][e] * inv;
  }
  if (lane == 0) {
    lse[row0 + r] = empty ? kvrt_neg_inf() : m[r] + metal::log(l[r]);
  }
}
