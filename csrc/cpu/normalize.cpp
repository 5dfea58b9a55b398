// uint8 images to float32 in one pass: y = (x / 255 - mean[c]) / std[c].
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "fastcnn/cpu_kernels.h"
#include "fastcnn/parallel.h"

namespace fastcnn {
namespace cpu {
namespace {

// dst[i] = table[src[i]] for one row, 16 bytes a step: widen to 32-bit
// indices and gather from the (L1-resident) table.
__attribute__((target("avx512f"))) void lookup_row_avx512(const float* table,
                                                         const std::uint8_t* src, index_t n,
                                                         float* dst) {
  index_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
    _mm512_storeu_ps(dst + i, _mm512_i32gather_ps(idx, table, 4));
  }
  for (; i < n; ++i) dst[i] = table[src[i]];
}

}  // namespace

void normalize_u8(index_t outer, index_t c, index_t inner, const std::uint8_t* x,
                  const float* mean, const float* stdev, float* y) {
  // x, y: (outer, c, inner); mean, stdev: (c,) or null (plain / 255).
  // A 256-entry table per channel, computed in double: every byte value maps
  // to the correctly rounded result, and the pass is one load per element.
  std::vector<float> table(static_cast<size_t>(c * 256));
  for (index_t ch = 0; ch < c; ++ch) {
    const double m = mean != nullptr ? mean[ch] : 0.0;
    const double s = stdev != nullptr ? stdev[ch] : 1.0;
    for (int v = 0; v < 256; ++v) table[ch * 256 + v] = static_cast<float>((v / 255.0 - m) / s);
  }
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  parallel_for(outer * c, std::max<index_t>(1, 32768 / std::max<index_t>(inner, 1)),
               [&](index_t row) {
    const float* t = table.data() + (row % c) * 256;
    const std::uint8_t* src = x + row * inner;
    float* dst = y + row * inner;
    if (avx512) return lookup_row_avx512(t, src, inner, dst);
    for (index_t i = 0; i < inner; ++i) dst[i] = t[src[i]];
  });
}

}  // namespace cpu
}  // namespace fastcnn
