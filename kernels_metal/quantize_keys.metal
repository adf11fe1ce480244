// Quantize and pack keys per channel over groups of GROUP tokens (KIVI, arXiv 2402.02750; format in
// kvrt/cache/quant.py), with OTT's substitution (arXiv 2505.10938): a traced slot first takes the float32 mean
// of its group's untraced keys, cast to the model dtype, so it widens no range. One thread per
// (channel, group, batch·KV head); it stores the group's scale (rounded up into T) and zero, and packs
// its channel's codes along the tokens into int32 words.
// Template: T (model dtype), D, BITS, GROUP, HAS_TRACED. meta = [S].
constexpr int PER = 32 / BITS;
constexpr float TOP = float((1 << BITS) - 1);
const int c = int(thread_position_in_grid.x);
const int group = int(thread_position_in_grid.y);
const int bh = int(thread_position_in_grid.z);
const int S = meta[0];
if (c < D) {
  const int first = bh * S + group * GROUP;  // the group's first token in [B·Hkv, S]
  T mean = T(0);
  if (HAS_TRACED) {
    float sum = 0.0f;
    float rest = float(GROUP);
    for (int t = 0; t < GROUP; ++t) {
      if (traced[first + t]) {
        rest -= 1.0f;
      } else {
        sum += static_cast<float>(k[(first + t) * D + c]);
      }
    }
    mean = static_cast<T>(sum / rest);  // OTT traces fewer than GROUP tokens: rest >= 1
  }
  float lo = 0.0f;
  float hi = 0.0f;
  for (int t = 0; t < GROUP; ++t) {
    const T key = (HAS_TRACED && traced[first + t]) ? mean : static_cast<T>(k[(first + t) * D + c]);
    const float x = static_cast<float>(key);
    lo = t == 0 ? x : metal::min(lo, x);
    hi = t == 0 ? x : metal::max(hi, x);
  }
  const float range = hi - lo;
  const T scale = kvrt_scale_up((range < kvrt_range_cap ? range : kvrt_range_cap) / TOP, T(0));
  const float s32 = static_cast<float>(scale);
  const int word0 = bh * (S / PER) + group * (GROUP / PER);
  for (int w = 0; w < GROUP / PER; ++w) {
    uint word = 0u;
    for (int i = 0; i < PER; ++i) {
      const int t = first + w * PER + i;
      const float x = static_cast<float>((HAS_TRACED && traced[t]) ? mean : static_cast<T>(k[t * D + c]));
      word |= kvrt_quantize(x, lo, s32, TOP) << uint(i * BITS);
    }
    codes[(word0 + w) * D + c] = as_type<int>(word);
  }
  const int at = (bh * (S / GROUP) + group) * D + c;
  scales[at] = scale;
  zeros[at] = static_cast<T>(lo);
}
