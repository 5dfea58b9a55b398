// uint8 images to float32: y = (x / 255 - mean[c]) / std[c], computed in
// double and rounded once, exactly the values of the CPU kernel's table.
#include <cstdint>

#include "fastcnn/cuda_launch.h"
#include "fastcnn/kernel_math.h"

namespace fastcnn {
namespace cuda {
namespace {

struct NormalizeRow {
  const std::uint8_t* src;
  float* dst;
  double mean, stdev;
};

// Block row = outer index * c + channel; j = position in the inner extent.
struct NormalizeRows {
  const std::uint8_t* x;
  const float* mean;   // (c,) or null
  const float* stdev;  // (c,) or null
  float* y;
  index_t c, inner;

  FASTCNN_HD NormalizeRow row(index_t r) const {
    index_t ch;
    div_rem(r, c, &ch);
    return NormalizeRow{x + r * inner, y + r * inner, mean != nullptr ? mean[ch] : 0.0,
                        stdev != nullptr ? stdev[ch] : 1.0};
  }
  FASTCNN_HD void operator()(const NormalizeRow& r, index_t j) const {
    r.dst[j] = normalize_value(r.src[j], r.mean, r.stdev);
  }
};

}  // namespace

void normalize_u8(const Exec& ex, index_t outer, index_t c, index_t inner, const std::uint8_t* x,
                  const float* mean, const float* stdev, float* y) {
  // x, y: (outer, c, inner); mean, stdev: (c,) or null
  for_each_in_rows(ex, "normalize_u8", outer * c, inner, NormalizeRows{x, mean, stdev, y, c, inner});
}

}  // namespace cuda
}  // namespace fastcnn
