// SnapKV's observation window (arXiv 2404.14469), first pass: the log-sum-exp of each window query's
// scores, so the second pass (window_scores.metal) can sum softmax probabilities without storing them.
// One simdgroup per (row, batch·KV head); row r = g·W + w is query w of the KV head's query head g and
// sees keys j <= S − W + w; lanes take every 32nd key and merge their running (max, sum) at the end.
// Template: D, W, ROWS (= G·W). meta = [S].
const int lane = int(thread_position_in_grid.x);
const int r = int(thread_position_in_grid.y);
const int bh = int(thread_position_in_grid.z);
const int S = meta[0];
const float scale = qscale[0];
threadgroup float qrow[D];
for (int c = lane; c < D; c += 32) {
  qrow[c] = static_cast<float>(q[(bh * ROWS + r) * D + c]) * scale;
}
threadgroup_barrier(mem_flags::mem_threadgroup);
const int last = S - W + r % W;
float m = kvrt_hidden;
float l = 0.0f;
for (int j = lane; j <= last; j += 32) {
  float s = 0.0f;
  for (int c = 0; c < D; ++c) {
    s += qrow[c] * static_cast<float>(k[(bh * S + j) * D + c]);
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
