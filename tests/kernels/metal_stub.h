// Stand-ins for the parts of the Metal Shading Language kvrt's kernels use, so that g++ can compile a
// kernel exactly as mx.fast.metal_kernel assembles it (header + generated signature + body) and, with
// tests/kernels/metal_runtime.cpp, run it on the CPU. Address spaces vanish (threadgroup becomes static storage,
// shared by the one threadgroup the runtime runs at a time); simdgroup operations and threadgroup_barrier
// call the runtime, which runs every GPU thread of a group as a fiber. Nothing here models GPU speed.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

typedef unsigned int uint;
typedef unsigned short ushort;
// int64_t, the type of the `<name>_strides` arrays MLX passes (element strides), is <cstdint>'s, as in Metal
typedef _Float16 half;  // IEEE binary16; g++ >= 12 on x86_64 converts with round-to-nearest-even
typedef half float16_t;

// MLX's bfloat16_t: the top half of a float32, converted with round-to-nearest-even (as MLX does)
struct bfloat16_t {
  uint16_t bits_;
  bfloat16_t() = default;
  template <typename T>
  bfloat16_t(T x) : bits_(from_float(static_cast<float>(x))) {}
  operator float() const {
    uint32_t u = uint32_t(bits_) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  static uint16_t from_float(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      return 0x7fc0;
    }
    return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
};

struct uint3 {
  uint x, y, z;
};

template <typename To, typename From>
inline To as_type(From from) {
  static_assert(sizeof(To) == sizeof(From), "as_type reinterprets values of equal size only");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

namespace metal {
inline float exp(float x) { return std::exp(x); }
inline float log(float x) { return std::log(x); }
inline float rint(float x) { return std::rint(x); }  // the default rounding mode: to nearest, ties to even
inline float floor(float x) { return std::floor(x); }
inline float sqrt(float x) { return std::sqrt(x); }
inline float fabs(float x) { return std::fabs(x); }
template <typename T>
inline T min(T a, T b) { return b < a ? b : a; }
template <typename T>
inline T max(T a, T b) { return a < b ? b : a; }
template <typename T>
inline T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
}  // namespace metal
using namespace metal;  // MLX's prelude says the same

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };

extern "C" void kvrt_threadgroup_barrier(void);
// every active lane of the caller's simdgroup deposits `size` bytes; all get every lane's, in lane order
extern "C" int kvrt_simd_gather(const void* mine, unsigned size, void* all);

inline void threadgroup_barrier(mem_flags) { kvrt_threadgroup_barrier(); }

template <typename T>
inline T simd_sum(T x) {
  T all[32];
  const int n = kvrt_simd_gather(&x, sizeof(T), all);
  for (int i = n; i < 32; ++i) {
    all[i] = T(0);
  }
  for (int width = 16; width > 0; width /= 2) {  // a butterfly, as shuffle-xor reductions add
    for (int i = 0; i < width; ++i) {
      all[i] = all[i] + all[i + width];
    }
  }
  return all[0];
}

// the lanes' values folded in lane order by `pick` (which of two to keep)
template <typename T, typename Pick>
inline T kvrt_simd_fold(T x, Pick pick) {
  T all[32];
  const int n = kvrt_simd_gather(&x, sizeof(T), all);
  T kept = all[0];
  for (int i = 1; i < n; ++i) {
    kept = pick(kept, all[i]);
  }
  return kept;
}

template <typename T>
inline T simd_max(T x) { return kvrt_simd_fold(x, [](T a, T b) { return metal::max(a, b); }); }

template <typename T>
inline T simd_min(T x) { return kvrt_simd_fold(x, [](T a, T b) { return metal::min(a, b); }); }

template <typename T>
inline T simd_shuffle(T x, ushort lane) {
  T all[32];
  kvrt_simd_gather(&x, sizeof(T), all);
  return all[lane];
}

template <typename T>
inline T simd_broadcast(T x, ushort lane) { return simd_shuffle(x, lane); }

// address spaces: one flat memory on the CPU; threadgroup memory is static, shared by the running group
#define device
#define constant
#define thread
#define threadgroup static
