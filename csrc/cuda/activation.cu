// ReLU and its two backward rules (plain and guided backpropagation), the
// per-element rules of fastcnn/kernel_math.h.
#include "fastcnn/cuda_launch.h"
#include "fastcnn/kernel_math.h"

namespace fastcnn {
namespace cuda {
namespace {

struct ReluForward {
  const float* x;
  float* y;
  FASTCNN_HD void operator()(index_t i) const { y[i] = relu_value(x[i]); }
};

struct ReluBackward {
  const float* dy;
  const float* x;
  bool guided;
  float* dx;
  FASTCNN_HD void operator()(index_t i) const { dx[i] = relu_grad(dy[i], x[i], guided); }
};

}  // namespace

void relu_forward(const Exec& ex, index_t count, const float* x, float* y) {
  for_each(ex, "relu_forward", count, ReluForward{x, y});
}

void relu_backward(const Exec& ex, index_t count, const float* dy, const float* x, bool guided,
                   float* dx) {
  for_each(ex, "relu_backward", count, ReluBackward{dy, x, guided, dx});
}

}  // namespace cuda
}  // namespace fastcnn
