// ReLU and its two backward rules (plain and guided backpropagation), on the
// shared per-element rules of fastcnn/kernel_math.h. They are bitwise
// selects, not branches: activations' signs are random, so a branch would
// mispredict half the time, and a select also keeps a NaN gradient out of
// the zeroed positions, as PyTorch does.
#include <algorithm>

#include "fastcnn/cpu_kernels.h"
#include "fastcnn/kernel_math.h"
#include "fastcnn/parallel.h"

namespace fastcnn {
namespace cpu {
namespace {

constexpr index_t kGrain = 1 << 15;  // elements per task: large enough to amortise a fork

template <typename F>
void blocked(index_t count, F&& body) {
  parallel_for((count + kGrain - 1) / kGrain, 1, [&](index_t b) {
    body(b * kGrain, std::min(count, (b + 1) * kGrain));
  });
}

}  // namespace

void relu_forward(index_t count, const float* x, float* y) {
  blocked(count, [&](index_t begin, index_t end) {
    for (index_t i = begin; i < end; ++i) y[i] = relu_value(x[i]);
  });
}

void relu_backward(index_t count, const float* dy, const float* x, bool guided, float* dx) {
  blocked(count, [&](index_t begin, index_t end) {
    if (guided) {
      for (index_t i = begin; i < end; ++i) dx[i] = relu_grad(dy[i], x[i], true);
    } else {
      for (index_t i = begin; i < end; ++i) dx[i] = relu_grad(dy[i], x[i], false);
    }
  });
}

}  // namespace cpu
}  // namespace fastcnn
