// SnapKV's observation window (arXiv 2404.14469), first pass: the log-sum-exp of each window query's
// scores, so the second pass (window_scores.metal) can sum softmax probabilities without storing them.
// One simdgroup per (row, batch·KV head); row r = g·W + w is query w of the KV head's query head g and
// sees keys j <= S − W + w; lanes take every 32nd key and merge their running (max, sum) at the end.
// q [B, Hq, W, D] (the chunk's last W queries, a slice) and k [B, Hkv, S, D] (at a prompt, the newest
// tier's view of its capacity buffer) are read where they lie, through their element strides (built with
// ensure_row_contiguous=False, so neither is copied first).
// Template: D, W, ROWS (= G·W). meta = [S, Hkv].
constexpr int G = ROWS / W;
const int lane = int(thread_position_in_grid.x);
const int r = int(thread_position_in_grid.y);
const int bh = int(thread_position_in_grid.z);
const int S = meta[0];
const int64_t batch = bh / meta[1];
const int64_t head = bh % meta[1];
const float scale = qscale[0];
const int64_t qrow = batch * q_strides[0] + (head * G + r / W) * q_strides[1] + (r % W) * q_strides[2];
const int64_t k0 = batch * k_strides[0] + head * k_strides[1];  // 64 bits: a buffer may pass 2^31 elements
const int kt = int(k_strides[2]), kd = int(k_strides[3]);  // 32 within a head: no 64-bit multiply per key
threadgroup float qrow_scaled[D];
for (int c = lane; c < D; c += 32) {
  qrow_scaled[c] = static_cast<float>(q[qrow + c * q_strides[3]]) * scale;
}
threadgroup_barrier(mem_flags::mem_threadgroup);
const int last = S - W + r % W;
float m = kvrt_hidden;
float l = 0.0f;
for (int j = lane; j <= last; j += 32) {
  const int key = j * kt;
  float s = 0.0f;
  for (int c = 0; c < D; ++c) {
    s += qrow_scaled[c] * static_cast<float>(k[k0 + (key + c * kd)]);
  }
  const float m_new = metal::max(m, s);
  l = l * metal::exp(m - m_new) + metal::exp(s - m_new);
  m = m_new;
}
const float top = simd_max(m);
const float total = simd_sum(l * metal::exp(m - top));
if (lane == 0) {
  lse[bh * ROWS + r] = top + metal::log(total);  // key 0 is visible to every row: total > 0
}
