// Branch-free float maths that the compiler vectorises: libm's expf is a
// call per element, which keeps every loop around it scalar. The selects
// become blends only under -fno-trapping-math (set for the CPU kernels):
// otherwise a result feeding further arithmetic keeps its branches.
#pragma once

#include <cstdint>
#include <cstring>

// A function built three times, for AVX-512 (x86-64-v4), AVX2 + FMA
// (x86-64-v3) and baseline x86-64, the best picked when the module loads:
// plain loops vectorised for the CPU at hand, in a portable build.
#define FASTCNN_SIMD_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))

namespace fastcnn {

// exp(x) within a few ulp on [-87.3, 88.37] (Cephes' expf polynomial after
// reducing x = n ln2 + r, |r| <= ln2 / 2); 0 below (the denormal range, and
// -inf), +inf above (early: exp is finite up to 88.72, but 2^128 has no
// float bits; softmax and cross-entropy only ever pass x <= 0), NaN for NaN.
inline float exp_poly(float x) {
  const float hi = 88.37626f, lo = -87.33654f;
  const bool underflow = x < lo;
  const bool overflow = x > hi;
  float xc = x < lo ? lo : x;  // NaN passes both clamps
  xc = xc > hi ? hi : xc;
  // n = round(x / ln2) by the 1.5 * 2^23 trick: no float-to-int conversion of NaN.
  const float shifter = 12582912.0f;
  const float t = xc * 1.44269504088896341f + shifter;
  const float n = t - shifter;
  std::int32_t ti;
  std::memcpy(&ti, &t, sizeof ti);
  const std::int32_t e = (ti - 0x4B400000 + 127) << 23;  // 2^n as float bits
  float scale;
  std::memcpy(&scale, &e, sizeof scale);
  const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = (p * r * r + r + 1.0f) * scale;
  const float inf = __builtin_inff();
  return underflow ? 0.0f : overflow ? inf : y;
}

}  // namespace fastcnn
