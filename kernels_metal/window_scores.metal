// SnapKV's observation-window scores (arXiv 2404.14469), second pass: for each key j, the softmax
// probability every window query gives it (scores recomputed exactly as window_lse.metal does, minus
// that row's lse), summed over the W queries and averaged over the KV head's G query heads.
// One thread per (key, batch·KV head). q and k are read through their element strides as in
// window_lse.metal; lse is the first pass's own output, row-contiguous [B·Hkv, ROWS].
// Template: D, W, ROWS (= G·W), G. meta = [S, Hkv].
const int j = int(thread_position_in_grid.x);
const int bh = int(thread_position_in_grid.z);
const int S = meta[0];
const int64_t batch = bh / meta[1];
const int64_t head = bh % meta[1];
const float scale = qscale[0];
if (j < S) {
  // this key's first element in 64 bits (a buffer may pass 2^31 elements); the channel steps in 32
  const int64_t key = batch * k_strides[0] + head * k_strides[1] + j * k_strides[2];
  const int kd = int(k_strides[3]), qd = int(q_strides[3]);
  float total = 0.0f;
  for (int r = 0; r < ROWS; ++r) {
    if (j > S - W + r % W) {
      continue;  // query w sees keys up to S − W + w
    }
    const int64_t qrow = batch * q_strides[0] + (head * G + r / W) * q_strides[1] + (r % W) * q_strides[2];
    float s = 0.0f;
    for (int c = 0; c < D; ++c) {
      s += (static_cast<float>(q[qrow + c * qd]) * scale) * static_cast<float>(k[key + c * kd]);
    }
    total += metal::exp(s - lse[bh * ROWS + r]);
  }
  out[bh * S + j] = total / float(G);
}
