// Inverted dropout with a counter-based mask (fastcnn/philox.h): element i
// is kept or dropped by Philox(seed; i / 4, offset), lane i % 4.
#include <immintrin.h>

#include <algorithm>

#include "fastcnn/cpu_kernels.h"
#include "fastcnn/parallel.h"
#include "fastcnn/philox.h"

namespace fastcnn {
namespace cpu {

namespace {

// mulhilo32 on 16 lanes: lo = a * m, hi = (a * m) >> 32.
__attribute__((target("avx512f"))) inline __m512i mulhi32(__m512i a, __m512i m) {
  const __m512i even = _mm512_srli_epi64(_mm512_mul_epu32(a, m), 32);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  return _mm512_mask_blend_epi32(0xAAAA, even, odd);
}

// Elements [i, i + 64) (i a multiple of 4): 16 Philox counters at once, the
// four words of counter t transposed to elements i + 4 t .. i + 4 t + 3, as
// philox4x32_10 and the scalar loop below compute them.
__attribute__((target("avx512f"))) void dropout_64_avx512(index_t i, const float* x,
                                                         std::uint64_t seed,
                                                         std::uint64_t offset,
                                                         std::uint32_t threshold, float scale,
                                                         float* y) {
  const std::uint64_t block = static_cast<std::uint64_t>(i) >> 2;
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i base_lo = _mm512_set1_epi32(static_cast<int>(static_cast<std::uint32_t>(block)));
  __m512i c0 = _mm512_add_epi32(base_lo, lane);
  const __mmask16 carry = _mm512_cmplt_epu32_mask(c0, base_lo);  // block + t crossed 2^32
  __m512i c1 = _mm512_mask_add_epi32(
      _mm512_set1_epi32(static_cast<int>(static_cast<std::uint32_t>(block >> 32))), carry,
      _mm512_set1_epi32(static_cast<int>(static_cast<std::uint32_t>(block >> 32))),
      _mm512_set1_epi32(1));
  __m512i c2 = _mm512_set1_epi32(static_cast<int>(static_cast<std::uint32_t>(offset)));
  __m512i c3 = _mm512_set1_epi32(static_cast<int>(static_cast<std::uint32_t>(offset >> 32)));
  std::uint32_t k0 = static_cast<std::uint32_t>(seed), k1 = static_cast<std::uint32_t>(seed >> 32);
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(0xCD9E8D57u));
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const __m512i hi0 = mulhi32(c0, m0), lo0 = _mm512_mullo_epi32(c0, m0);
    const __m512i hi1 = mulhi32(c2, m1), lo1 = _mm512_mullo_epi32(c2, m1);
    const __m512i n0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1), _mm512_set1_epi32(static_cast<int>(k0)));
    const __m512i n2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), _mm512_set1_epi32(static_cast<int>(k1)));
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  // Transpose 4 x 16 words: out[q] = counters 4q .. 4q + 3, four words each.
  const __m512i a = _mm512_unpacklo_epi32(c0, c1), b = _mm512_unpackhi_epi32(c0, c1);
  const __m512i c = _mm512_unpacklo_epi32(c2, c3), d = _mm512_unpackhi_epi32(c2, c3);
  const __m512i e0 = _mm512_unpacklo_epi64(a, c), e1 = _mm512_unpackhi_epi64(a, c);
  const __m512i e2 = _mm512_unpacklo_epi64(b, d), e3 = _mm512_unpackhi_epi64(b, d);
  const __m512i v0 = _mm512_shuffle_i32x4(e0, e1, 0x88), w0 = _mm512_shuffle_i32x4(e0, e1, 0xDD);
  const __m512i v1 = _mm512_shuffle_i32x4(e2, e3, 0x88), w1 = _mm512_shuffle_i32x4(e2, e3, 0xDD);
  const __m512i out[4] = {_mm512_shuffle_i32x4(v0, v1, 0x88), _mm512_shuffle_i32x4(w0, w1, 0x88),
                          _mm512_shuffle_i32x4(v0, v1, 0xDD), _mm512_shuffle_i32x4(w0, w1, 0xDD)};
  const __m512i thr = _mm512_set1_epi32(static_cast<int>(threshold));
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int q = 0; q < 4; ++q) {
    const __mmask16 keep = _mm512_cmpge_epu32_mask(_mm512_srli_epi32(out[q], 8), thr);
    const __m512 mult = _mm512_maskz_mov_ps(keep, vscale);
    _mm512_storeu_ps(y + i + 16 * q,
                     x != nullptr ? _mm512_mul_ps(_mm512_loadu_ps(x + i + 16 * q), mult) : mult);
  }
}

}  // namespace

void dropout_apply(index_t count, const float* x, double p, std::uint64_t seed,
                   std::uint64_t offset, float* y) {
  const std::uint32_t threshold = dropout_threshold(p);
  const float scale = dropout_scale(p);
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  constexpr index_t kBlock = 1 << 14;  // a multiple of 4: blocks start on a Philox boundary
  parallel_for((count + kBlock - 1) / kBlock, 1, [&](index_t blk) {
    const index_t end = std::min(count, (blk + 1) * kBlock);
    index_t i = blk * kBlock;
    if (avx512)
      for (; i + 64 <= end; i += 64) dropout_64_avx512(i, x, seed, offset, threshold, scale, y);
    for (; i < end; i += 4) {
      const Philox4 r = philox4x32_10(static_cast<std::uint64_t>(i) >> 2, offset, seed);
      const index_t lanes = std::min<index_t>(4, end - i);
      for (index_t j = 0; j < lanes; ++j) {
        const float m = (r.v[j] >> 8) >= threshold ? scale : 0.0f;
        y[i + j] = x != nullptr ? x[i + j] * m : m;
      }
    }
  });
}

}  // namespace cpu
}  // namespace fastcnn
