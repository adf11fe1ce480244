// Decode attention over full-precision keys and values (the kept, residual and outlier tiers), split over
// the sequence like quantized_decode.metal: one simdgroup per (batch·KV head, split), lane l owns channels
// c = e·32 + l, one read of the KV head's keys and values for all ROWS = G·TQ query rows (GQA; row
// r = g·TQ + t), online float32 softmax. Query t sees keys j <= offset + t (meta[3]; S when no causal
// mask); key_bias −inf hides a key. Each split writes its (out, lse); the wrapper merges the splits.
// Template: D, ROWS, TQ, HAS_BIAS. meta = [S, tokens per split, splits, causal offset].
constexpr int E = D / 32;
const uint bh = threadgroup_position_in_grid.x;
const uint split = threadgroup_position_in_grid.y;
const uint lane = thread_index_in_simdgroup;
const int S = meta[0];
const int offset = meta[3];
const int start = int(split) * meta[1];
// no row sees a key past offset + TQ - 1
const int stop = metal::min(metal::min(start + meta[1], S), offset + TQ);
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

for (int j = start; j < stop; ++j) {
  float b = 0.0f;
  if (HAS_BIAS) {
    b = bias[int(bh) * S + j];
    if (!(b > kvrt_hidden)) {
      continue;  // the same j in every lane: the simdgroup skips together
    }
  }
  const int row = (int(bh) * S + j) * D;
  float dot[ROWS];
  for (int r = 0; r < ROWS; ++r) {
    dot[r] = 0.0f;
  }
  float v[E];
  for (int e = 0; e < E; ++e) {
    const int c = e * 32 + int(lane);
    const float key = static_cast<float>(keys[row + c]);
    for (int r = 0; r < ROWS; ++r) {
      dot[r] += qr[r][e] * key;
    }
    v[e] = static_cast<float>(values[row + c]);
  }
  for (int r = 0; r < ROWS; ++r) {
    const float s = simd_sum(dot[r]) + b;  // every lane reduces, so the branch below stays uniform
    if (j > offset + r % TQ) {
      continue;
    }
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
