// Decode attention over full-precision keys and values (the kept, residual and outlier tiers), split over
// the sequence like quantized_decode.metal: one simdgroup per (batch·KV head, split), lane l owns channels
// c = e·32 + l, one read of the KV head's keys and values for all ROWS = G·TQ query rows (GQA; row
// r = g·TQ + t), online float32 softmax. Query t sees keys j <= offset + t (meta[3]; S when no causal
// mask); key_bias −inf hides a key. With per-row lengths (a batch stored rectangularly, each row padded at
// the end of the token axis), batch row b reads no key j >= lengths[b]: a split wholly past it exits at once.
// Each split writes its (out, lse); the wrapper merges the splits.
// The inputs are read where they lie, through their element strides (sources.py builds this kernel with
// ensure_row_contiguous=False): keys and values [B, Hkv, S, D] are usually a SeqBuffer's view of a larger
// capacity buffer, which MLX would otherwise copy whole at every step; q [B, Hq, TQ, D] and bias
// [B, Hkv, S] (float32) and lengths [B] (int32) are small and read the same way, so no input's layout is assumed.
// Template: D, ROWS, TQ, HAS_BIAS, HAS_LENGTHS. meta = [S, tokens per split, splits, causal offset, Hkv].
constexpr int E = D / 32;
constexpr int G = ROWS / TQ;
const uint bh = threadgroup_position_in_grid.x;
const uint split = threadgroup_position_in_grid.y;
const uint lane = thread_index_in_simdgroup;
const int S = meta[0];
const int offset = meta[3];
const int64_t batch = int64_t(bh) / meta[4];
const int64_t head = int64_t(bh) % meta[4];
const int start = int(split) * meta[1];
// no row sees a key past offset + TQ - 1, nor one past its batch row's length
const int stop = metal::min(metal::min(metal::min(start + meta[1], S), offset + TQ),
                            HAS_LENGTHS ? lengths[batch * lengths_strides[0]] : S);
const float scale = qscale[0];
// element offsets of this (batch, KV head) in 64 bits (a whole buffer may pass 2^31 elements); steps along
// the token and channel axes in 32, so the loop does no 64-bit multiply (one head's rows stay far below 2^31)
const int64_t k0 = batch * keys_strides[0] + head * keys_strides[1];
const int64_t v0 = batch * values_strides[0] + head * values_strides[1];
const int kt = int(keys_strides[2]), kd = int(keys_strides[3]);
const int vt = int(values_strides[2]), vd = int(values_strides[3]);

float qr[ROWS][E];
float acc[ROWS][E];
float m[ROWS];
float l[ROWS];
for (int r = 0; r < ROWS; ++r) {
  // row r: query head head·G + r / TQ, query r % TQ
  const int64_t qrow = batch * q_strides[0] + (head * G + r / TQ) * q_strides[1] + (r % TQ) * q_strides[2];
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

for (int j = start; j < stop; ++j) {
  float b = 0.0f;
  if (HAS_BIAS) {
    b = bias[b0 + j * bt];
    if (!(b > kvrt_hidden)) {
      continue;  // the same j in every lane: the simdgroup skips together
    }
  }
  const int krow = j * kt;
  const int vrow = j * vt;
  float dot[ROWS];
  for (int r = 0; r < ROWS; ++r) {
    dot[r] = 0.0f;
  }
  float v[E];
  for (int e = 0; e < E; ++e) {
    const int c = e * 32 + int(lane);
    const float key = static_cast<float>(keys[k0 + (krow + c * kd)]);
    for (int r = 0; r < ROWS; ++r) {
      dot[r] += qr[r][e] * key;
    }
    v[e] = static_cast<float>(values[v0 + (vrow + c * vd)]);
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
