// Decode attention over a whole quantized tier (KIVI, arXiv 2402.02750; format in kvrt/quant.py), split
// over the sequence: one simdgroup per (batch·KV head, split). Lane l owns channels c = e·32 + l, reads
// each packed key and value word once for all ROWS = G·T query rows of its KV head (GQA), dequantizes in
// registers and runs an online float32 softmax. Each split writes its (out, lse); the wrapper merges the
// splits by log-sum-exp. key_bias −inf hides a key (OTT's traced slots, arXiv 2505.10938).
// Template: KT (scale/zero dtype, the model's), D, ROWS, BITS, GROUP (tokens per key scale),
// VGROUP (channels per value scale), HAS_BIAS. meta = [S, tokens per split, splits].
constexpr int E = D / 32;
constexpr int PER = 32 / BITS;
constexpr uint MASK = (1u << BITS) - 1u;
const uint bh = threadgroup_position_in_grid.x;
const uint split = threadgroup_position_in_grid.y;
const uint lane = thread_index_in_simdgroup;
const int S = meta[0];
const int start = int(split) * meta[1];
const int stop = metal::min(start + meta[1], S);
const float scale = qscale[0];

float qr[ROWS][E];
float acc[ROWS][E];
float m[ROWS];
float l[ROWS];
for (int r = 0; r < ROWS; ++r) {
  for (int e = 0; e < E; ++e) {
    qr[r][e] = static_cast<float>(q[(int(bh) * ROWS + r) * D + e * 32 + int(lane)]) * scale;
    acc[r][e] = 0.0f;
  }
  m[r] = kvrt_hidden;
  l[r] = 0.0f;
}

for (int t = start; t < stop; ++t) {
  float b = 0.0f;
  if (HAS_BIAS) {
    b = bias[int(bh) * S + t];
    if (!(b > kvrt_hidden)) {
      continue;  // the same t in every lane: the simdgroup skips together
    }
  }
  // keys: word t / PER of each channel holds token t's code; scale and zero per (group of tokens, channel)
  const int kw = (int(bh) * (S / PER) + t / PER) * D;
  const int kg = (int(bh) * (S / GROUP) + t / GROUP) * D;
  const uint kshift = uint(t % PER) * BITS;
  // values: token t's words along its channels; scale and zero per (token, group of channels)
  const int vw = (int(bh) * S + t) * (D / PER);
  const int vg = (int(bh) * S + t) * (D / VGROUP);
  float dot[ROWS];
  for (int r = 0; r < ROWS; ++r) {
    dot[r] = 0.0f;
  }
  float v[E];
  for (int e = 0; e < E; ++e) {
    const int c = e * 32 + int(lane);
    // dequantized in float32, then rounded to the model dtype as the reference twin stores it
    const float k = static_cast<float>(static_cast<KT>(
        static_cast<float>(kvrt_code(kc[kw + c], kshift, MASK)) * static_cast<float>(ks[kg + c]) +
        static_cast<float>(kz[kg + c])));
    for (int r = 0; r < ROWS; ++r) {
      dot[r] += qr[r][e] * k;
    }
    v[e] = static_cast<float>(static_cast<KT>(
        static_cast<float>(kvrt_code(vc[vw + c / PER], uint(c % PER) * BITS, MASK)) *
            static_cast<float>(vs[vg + c / VGROUP]) +
        static_cast<float>(vz[vg + c / VGROUP])));
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

// a row that saw no key: out 0, lse −inf, which the merge weighs as nothing
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
