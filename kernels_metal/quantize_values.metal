// Quantize and pack values per token over groups of GV channels (KIVI, arXiv 2402.02750; format in
// kvrt/cache/quant.py). One simdgroup per (token, batch·KV head): its lanes first take each group's min/max and
// store scale (rounded up into T) and zero, then, after a barrier, pack the codes along the channels into
// int32 words (a word may span two groups when GV is not a multiple of 32 / BITS).
// Template: T (model dtype), D, BITS, GV. meta = [S].
constexpr int PER = 32 / BITS;
constexpr int NG = D / GV;
constexpr int NW = D / PER;
constexpr float TOP = float((1 << BITS) - 1);
const int lane = int(thread_position_in_grid.x);
const int row = int(thread_position_in_grid.z) * meta[0] + int(thread_position_in_grid.y);
threadgroup float lo_of[NG];
threadgroup float scale_of[NG];
for (int g = lane; g < NG; g += 32) {
  float lo = static_cast<float>(v[row * D + g * GV]);
  float hi = lo;
  for (int i = 1; i < GV; ++i) {
    const float x = static_cast<float>(v[row * D + g * GV + i]);
    lo = metal::min(lo, x);
    hi = metal::max(hi, x);
  }
  const float range = hi - lo;
  const T scale = kvrt_scale_up((range < kvrt_range_cap ? range : kvrt_range_cap) / TOP, T(0));
  lo_of[g] = lo;
  scale_of[g] = static_cast<float>(scale);
  scales[row * NG + g] = scale;
  zeros[row * NG + g] = static_cast<T>(lo);
}
threadgroup_barrier(mem_flags::mem_threadgroup);
for (int w = lane; w < NW; w += 32) {
  uint word = 0u;
  for (int i = 0; i < PER; ++i) {
    const int c = w * PER + i;
    word |= kvrt_quantize(static_cast<float>(v[row * D + c]), lo_of[c / GV], scale_of[c / GV], TOP) << uint(i * BITS);
  }
  codes[row * NW + w] = as_type<int>(word);
}
