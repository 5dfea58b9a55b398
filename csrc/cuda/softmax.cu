// softmax / log_softmax along one axis of a tensor viewed as (outer, dim,
// inner), a thread per (outer, inner) lane (consecutive threads read
// consecutive addresses when inner > 1), and cross-entropy fused with
// log-softmax, a thread per row. The per-lane maths is fastcnn/kernel_math.h.
#include <cstdint>

#include "fastcnn/cuda_launch.h"
#include "fastcnn/kernel_math.h"

namespace fastcnn {
namespace cuda {
namespace {

struct SoftmaxLanes {
  index_t dim, inner;
  const float* x;
  bool log;
  float* y;
  FASTCNN_HD void operator()(index_t lane) const {
    index_t i;
    const index_t o = div_rem(lane, inner, &i);
    const index_t base = o * dim * inner + i;
    softmax_lane(dim, inner, x + base, log, y + base);
  }
};

struct SoftmaxBackwardLanes {
  index_t dim, inner;
  const float* dy;
  const float* y;
  bool log;
  float* dx;
  FASTCNN_HD void operator()(index_t lane) const {
    index_t i;
    const index_t o = div_rem(lane, inner, &i);
    const index_t base = o * dim * inner + i;
    softmax_backward_lane(dim, inner, dy + base, y + base, log, dx + base);
  }
};

struct CrossEntropyRows {
  index_t classes;
  const float* logits;
  const std::int64_t* target;
  std::int64_t ignore_index;
  float label_smoothing;
  float* loss;
  FASTCNN_HD void operator()(index_t i) const {
    loss[i] = cross_entropy_row(classes, logits + i * classes, target[i], ignore_index,
                                label_smoothing);
  }
};

struct CrossEntropyGradRows {
  index_t classes;
  const float* logits;
  const std::int64_t* target;
  std::int64_t ignore_index;
  float label_smoothing;
  const float* grad_scale;
  float* dx;
  FASTCNN_HD void operator()(index_t i) const {
    cross_entropy_row_grad(classes, logits + i * classes, target[i], ignore_index,
                           label_smoothing, grad_scale[i], dx + i * classes);
  }
};

}  // namespace

void softmax_forward(const Exec& ex, index_t outer, index_t dim, index_t inner, const float* x,
                     bool log, float* y) {
  if (dim == 0) return;
  for_each(ex, log ? "log_softmax_forward" : "softmax_forward", outer * inner,
           SoftmaxLanes{dim, inner, x, log, y});
}

void softmax_backward(const Exec& ex, index_t outer, index_t dim, index_t inner, const float* dy,
                      const float* y, bool log, float* dx) {
  if (dim == 0) return;
  for_each(ex, log ? "log_softmax_backward" : "softmax_backward", outer * inner,
           SoftmaxBackwardLanes{dim, inner, dy, y, log, dx});
}

void cross_entropy_forward(const Exec& ex, index_t n, index_t classes, const float* logits,
                           const std::int64_t* target, std::int64_t ignore_index,
                           float label_smoothing, float* loss) {
  // logits: (n, classes), target: (n,) -> loss: (n,)
  for_each(ex, "cross_entropy_forward", n,
           CrossEntropyRows{classes, logits, target, ignore_index, label_smoothing, loss});
}

void cross_entropy_backward(const Exec& ex, index_t n, index_t classes, const float* logits,
                            const std::int64_t* target, std::int64_t ignore_index,
                            float label_smoothing, const float* grad_scale, float* dx) {
  // grad_scale: (n,) -> dx: (n, classes)
  for_each(ex, "cross_entropy_backward", n,
           CrossEntropyGradRows{classes, logits, target, ignore_index, label_smoothing,
                                grad_scale, dx});
}

}  // namespace cuda
}  // namespace fastcnn
