// ReLU and its two backward rules (plain and guided backpropagation).
#include <algorithm>

#include "fastcnn/cpu_kernels.h"
#include "fastcnn/parallel.h"

namespace fastcnn {
namespace cpu {
namespace {
constexpr index_t kGrain = 1 << 15;  // elements per thread before splitting pays
}

void relu_forward(index_t count, const float* x, float* y) {
  // NaN stays NaN, as in PyTorch.
  const index_t blocks = (count + kGrain - 1) / kGrain;
  parallel_for(blocks, 1, [&](index_t b) {
    const index_t end = std::min(count, (b + 1) * kGrain);
#pragma omp simd
    for (index_t i = b * kGrain; i < end; ++i) y[i] = x[i] < 0.0f ? 0.0f : x[i];
  });
}

void relu_backward(index_t count, const float* dy, const float* x, bool guided, float* dx) {
  const index_t blocks = (count + kGrain - 1) / kGrain;
  parallel_for(blocks, 1, [&](index_t b) {
    const index_t end = std::min(count, (b + 1) * kGrain);
    if (guided) {
#pragma omp simd
      for (index_t i = b * kGrain; i < end; ++i)
        dx[i] = (x[i] > 0.0f && dy[i] > 0.0f) ? dy[i] : 0.0f;
    } else {
#pragma omp simd
      for (index_t i = b * kGrain; i < end; ++i) dx[i] = x[i] <= 0.0f ? 0.0f : dy[i];
    }
  });
}

}  // namespace cpu
}  // namespace fastcnn
