// softmax / log_softmax along one axis of a tensor viewed as (outer, dim,
// inner), a thread per (outer, inner) lane (consecutive threads read
// consecutive addresses when inner > 1), and cross-entropy fused with
// log-softmax, a thread per row. The per-lane maths is fastcnn/kernel_math.h.
#include <cstdint>

#include "channel_sums.h"
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


// Over all rows (channel_sums.h with the rows as one channel's values: a
// fixed order, spread over the GPU when there are many): status[0] = targets
// that are not ignore_index (the mean's divisor), status[1] = those outside
// [0, classes), status[2] = rows whose argmax (the first maximum, a NaN first
// of all, as NumPy's) is their target (a training loop's hit count, with no
// launch of its own); with a total, *total = the rows' float32 losses
// (row_loss) summed in double, over status[0] for the mean (NaN when 0).
// Counting in double is exact (below 2^53 rows).
struct RowCounts {  // acc: valid, bad, hits, loss
  index_t classes;
  const float* logits;
  const std::int64_t* target;
  std::int64_t ignore_index;
  const float* row_loss;  // null: no loss to add
  FASTCNN_HD void operator()(index_t, index_t i, double* acc) const {
    const std::int64_t t = target[i];
    if (t != ignore_index) {
      acc[0] += 1.0;
      if (t < 0 || t >= classes) acc[1] += 1.0;
    }
    const float* row = logits + i * classes;
    index_t best = 0;
    float best_value = row[0];
    for (index_t c = 1; c < classes; ++c) {
      const float v = row[c];
      const bool take = (v > best_value) | ((v != v) & (best_value == best_value));
      best_value = take ? v : best_value;
      best = take ? c : best;
    }
    if (best == t) acc[2] += 1.0;
    if (row_loss != nullptr) acc[3] += row_loss[i];
  }
};

struct RowTotals {
  bool mean;
  float* total;  // null: the status only
  std::int64_t* status;
  FASTCNN_HD void operator()(index_t, const double* t) const {
    const double valid = t[0];
    status[0] = static_cast<std::int64_t>(valid);
    status[1] = static_cast<std::int64_t>(t[1]);
    status[2] = static_cast<std::int64_t>(t[2]);
    if (total != nullptr)
      *total = !mean ? static_cast<float>(t[3])
                     : (valid > 0.0 ? static_cast<float>(t[3] / valid) : quiet_nan());
  }
};

// d loss / d logits, a thread per row, each row's scale either given
// (grad_scale, 'none') or from a scalar upstream gradient g (read from *grad,
// or grad_value): float32(g / status[0]) for the mean (NaN when no target
// counts), float32(g) for the sum, computed in double as the CPU path does.
struct CrossEntropyGradRows {
  index_t classes;
  const float* logits;
  const std::int64_t* target;
  std::int64_t ignore_index;
  float label_smoothing;
  const float* grad_scale;  // per row, or null: the scalar below
  const float* grad;
  float grad_value;
  const std::int64_t* status;
  bool mean;
  float* dx;

  FASTCNN_HD float scale(index_t i) const {
    if (grad_scale != nullptr) return grad_scale[i];
    const double g = grad != nullptr ? *grad : grad_value;
    const double valid = static_cast<double>(status[0]);
    return !mean ? static_cast<float>(g)
                 : (valid > 0.0 ? static_cast<float>(g / valid) : quiet_nan());
  }
  FASTCNN_HD void operator()(index_t i) const {
    cross_entropy_row_grad(classes, logits + i * classes, target[i], ignore_index,
                           label_smoothing, scale(i), dx + i * classes);
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
                                grad_scale, nullptr, 0.0f, nullptr, false, dx});
}

void cross_entropy_total(const Exec& ex, index_t n, index_t classes, const float* logits,
                         const std::int64_t* target, std::int64_t ignore_index,
                         float label_smoothing, bool mean, float* total, std::int64_t* status) {
  Workspace rows(ex, total != nullptr ? static_cast<std::size_t>(n) * sizeof(float) : 0);
  if (total != nullptr) {
    cross_entropy_forward(ex, n, classes, logits, target, ignore_index, label_smoothing,
                          rows.as<float>());
  }
  channel_sums<4>(ex, "cross_entropy_total", n, 1, 1,
                  RowCounts{classes, logits, target, ignore_index,
                            total != nullptr ? rows.as<float>() : nullptr},
                  RowTotals{mean, total, status});
}

void cross_entropy_backward_scalar(const Exec& ex, index_t n, index_t classes,
                                   const float* logits, const std::int64_t* target,
                                   std::int64_t ignore_index, float label_smoothing,
                                   const float* grad, float grad_value,
                                   const std::int64_t* status, bool mean, float* dx) {
  for_each(ex, "cross_entropy_backward", n,
           CrossEntropyGradRows{classes, logits, target, ignore_index, label_smoothing, nullptr,
                                grad, grad_value, status, mean, dx});
}

}  // namespace cuda
}  // namespace fastcnn
