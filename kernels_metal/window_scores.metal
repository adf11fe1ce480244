// SnapKV's observation-window scores (arXiv 2404.14469), second pass: for each key j, the softmax
// probability every window query gives it (scores recomputed exactly as window_lse.metal does, minus
// that row's lse), summed over the W queries and averaged over the KV head's G query heads.
// One thread per (key, batch·KV head). Template: D, W, ROWS (= G·W), G. meta = [S].
const int j = int(thread_position_in_grid.x);
const int bh = int(thread_position_in_grid.z);
const int S = meta[0];
const float scale = qscale[0];
if (j < S) {
  float total = 0.0f;
  for (int r = 0; r < ROWS; ++r) {
    if (j > S - W + r % W) {
      continue;  // query w sees keys up to S − W + w
    }
    float s = 0.0f;
    for (int c = 0; c < D; ++c) {
      s += (static_cast<float>(q[(bh * ROWS + r) * D + c]) * scale) * static_cast<float>(k[(bh * S + j) * D + c]);
    }
    total += metal::exp(s - lse[bh * ROWS + r]);
  }
  out[bh * S + j] = total / float(G);
}
