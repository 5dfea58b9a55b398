// Inverted dropout with the CPU's counter-based mask (fastcnn/philox.h):
// element i is kept when lane i % 4 of Philox(seed; i / 4, offset) clears the
// threshold, so the GPU's mask is bit-identical to the CPU's.
#include <cstdint>

#include "fastcnn/cuda_launch.h"
#include "fastcnn/philox.h"

namespace fastcnn {
namespace cuda {
namespace {

// One Philox call covers 4 consecutive elements.
struct DropoutQuad {
  const float* x;  // null: write the mask itself
  float* y;
  index_t count;
  std::uint64_t seed, offset;
  const std::int64_t* offset_on_device;  // null: `offset`
  std::uint32_t threshold;
  float scale;

  FASTCNN_HD void operator()(index_t quad) const {
    const std::uint64_t at = offset_on_device != nullptr
                                 ? static_cast<std::uint64_t>(*offset_on_device)
                                 : offset;
    const Philox4 r = philox4x32_10(static_cast<std::uint64_t>(quad), at, seed);
    const index_t first = quad * 4;
    const index_t lanes = count - first < 4 ? count - first : 4;
    for (index_t j = 0; j < lanes; ++j) {
      const float m = (r.v[j] >> 8) >= threshold ? scale : 0.0f;
      y[first + j] = x != nullptr ? x[first + j] * m : m;
    }
  }
};

}  // namespace

void dropout_apply(const Exec& ex, index_t count, const float* x, double p, std::uint64_t seed,
                   std::uint64_t offset, float* y, const std::int64_t* offset_on_device) {
  const DropoutQuad quad{x,      y, count, seed, offset, offset_on_device, dropout_threshold(p),
                         dropout_scale(p)};
  for_each(ex, "dropout", (count + 3) / 4, quad);
}

}  // namespace cuda
}  // namespace fastcnn
