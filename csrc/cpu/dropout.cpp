// Inverted dropout with a counter-based mask (fastcnn/philox.h): element i
// is kept or dropped by Philox(seed; i / 4, offset), lane i % 4.
#include <algorithm>

#include "fastcnn/cpu_kernels.h"
#include "fastcnn/parallel.h"
#include "fastcnn/philox.h"

namespace fastcnn {
namespace cpu {

void dropout_apply(index_t count, const float* x, double p, std::uint64_t seed,
                   std::uint64_t offset, float* y) {
  const std::uint32_t threshold = dropout_threshold(p);
  const float scale = static_cast<float>(1.0 / (1.0 - p));
  constexpr index_t kBlock = 1 << 14;  // a multiple of 4: blocks start on a Philox boundary
  parallel_for((count + kBlock - 1) / kBlock, 1, [&](index_t blk) {
    const index_t end = std::min(count, (blk + 1) * kBlock);
    for (index_t i = blk * kBlock; i < end; i += 4) {
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
