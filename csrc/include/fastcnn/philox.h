// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2,
// 3", SC'11): a counter-based generator. The random bits of element i depend
// only on (seed, offset, i), so a dropout mask is the same for any thread
// count and on the CPU and the GPU.
#pragma once

#include <cstdint>

#include "fastcnn/common.h"

namespace fastcnn {

struct Philox4 {
  std::uint32_t v[4];
};

FASTCNN_HD std::uint32_t mulhilo32(std::uint32_t a, std::uint32_t b, std::uint32_t* hi) {
  const std::uint64_t p = static_cast<std::uint64_t>(a) * b;
  *hi = static_cast<std::uint32_t>(p >> 32);
  return static_cast<std::uint32_t>(p);
}

// counter = (block lo, block hi, offset lo, offset hi), key = (seed lo, seed hi).
FASTCNN_HD Philox4 philox4x32_10(std::uint64_t block, std::uint64_t offset, std::uint64_t seed) {
  std::uint32_t c0 = static_cast<std::uint32_t>(block), c1 = static_cast<std::uint32_t>(block >> 32);
  std::uint32_t c2 = static_cast<std::uint32_t>(offset), c3 = static_cast<std::uint32_t>(offset >> 32);
  std::uint32_t k0 = static_cast<std::uint32_t>(seed), k1 = static_cast<std::uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    std::uint32_t hi0, hi1;
    const std::uint32_t lo0 = mulhilo32(0xD2511F53u, c0, &hi0);
    const std::uint32_t lo1 = mulhilo32(0xCD9E8D57u, c2, &hi1);
    const std::uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// Dropout keeps element `index` when its 24-bit uniform draw u >> 8 is at least
// `threshold` = ceil(p * 2^24) (see dropout_threshold): an integer comparison,
// so the mask is exact and identical on every device. Returns the multiplier:
// 0 (dropped, probability p) or `scale` = 1 / (1 - p) (kept).
FASTCNN_HD float dropout_multiplier(std::uint64_t seed, std::uint64_t offset, std::uint64_t index,
                                    std::uint32_t threshold, float scale) {
  const Philox4 r = philox4x32_10(index >> 2, offset, seed);
  return (r.v[index & 3] >> 8) >= threshold ? scale : 0.0f;
}

// ceil(p * 2^24) for p in [0, 1]: 2^24 (every element dropped) for p = 1.
inline std::uint32_t dropout_threshold(double p) {
  const double t = p * 16777216.0;
  std::uint32_t i = static_cast<std::uint32_t>(t);
  return static_cast<double>(i) < t ? i + 1 : i;
}

// The kept elements' multiplier 1 / (1 - p); 0 for p = 1, which keeps none
// (the output is x * 0, as PyTorch's: NaN where x is NaN or infinite).
inline float dropout_scale(double p) {
  return p < 1.0 ? static_cast<float>(1.0 / (1.0 - p)) : 0.0f;
}

}  // namespace fastcnn
