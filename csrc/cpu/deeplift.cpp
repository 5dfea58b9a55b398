// DeepLIFT's rescale rules (fastcnn.viz.deep_lift) over an image batch and its
// references side by side: one pass each, on kernel_math.h's per-element rules.
#include <algorithm>

#include "fastcnn/cpu_kernels.h"
#include "fastcnn/kernel_math.h"
#include "fastcnn/parallel.h"

namespace fastcnn {
namespace cpu {
namespace {

constexpr index_t kGrain = 1 << 14;

template <typename F>
void pairs(index_t count, F&& body) {
  parallel_for((count + kGrain - 1) / kGrain, 1, [&](index_t b) {
    const index_t end = std::min(count, (b + 1) * kGrain);
    for (index_t i = b * kGrain; i < end; ++i) body(i, i + count);
  });
}

}  // namespace

void deeplift_relu(index_t count, const float* in, const float* out, const float* g, float eps,
                   float* result) {
  pairs(count, [&](index_t i, index_t j) {
    fastcnn::deeplift_relu(in[i], in[j], out[i], out[j], g[i], g[j], eps, &result[i],
                           &result[j]);
  });
}

void deeplift_pool_split(index_t count, const float* out, const float* g, float* result) {
  pairs(count, [&](index_t i, index_t j) {
    fastcnn::deeplift_pool_split(out[i], out[j], g[i], g[j], &result[i], &result[j]);
  });
}

void deeplift_rescale(index_t count, const float* in, const float* routed, const float* plain,
                      float eps, float* result) {
  pairs(count, [&](index_t i, index_t j) {
    fastcnn::deeplift_rescale(in[i], in[j], routed[i], routed[j], plain[i], plain[j], eps,
                              &result[i], &result[j]);
  });
}

}  // namespace cpu
}  // namespace fastcnn
