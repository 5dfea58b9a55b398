// softmax / log_softmax along one axis of a tensor viewed as (outer, dim,
// inner), and cross-entropy fused with log-softmax. Every row subtracts its
// maximum first, so logits of 1e4 stay finite.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "fastcnn/cpu_kernels.h"
#include "fastcnn/parallel.h"
#include "fastcnn/reduce.h"
#include "fastcnn/vec_math.h"

namespace fastcnn {
namespace cpu {
namespace {

// The loops below are plain loops that the compiler vectorises (in each of
// FASTCNN_SIMD_CLONES' builds) once exp is exp_poly.

// One contiguous row (inner == 1).
FASTCNN_SIMD_CLONES void softmax_row(index_t dim, const float* x, bool log, float* y) {
  float m = -std::numeric_limits<float>::infinity();
  for (index_t d = 0; d < dim; ++d) m = x[d] > m ? x[d] : m;
  // An all -inf row has no finite maximum; shifting by 0 gives NaN like PyTorch.
  if (std::isinf(m) && m < 0) m = 0.0f;
  for (index_t d = 0; d < dim; ++d) y[d] = exp_poly(x[d] - m);
  // 16 double partial sums added in a fixed order: vectorised and deterministic.
  double lanes[kLanes] = {};
  index_t d = 0;
  for (; d + kLanes <= dim; d += kLanes)
    for (int j = 0; j < kLanes; ++j) lanes[j] += y[d + j];
  for (int j = 0; d < dim; ++d, ++j) lanes[j] += y[d];
  double sum = 0.0;
  for (int j = 0; j < kLanes; ++j) sum += lanes[j];
  if (log) {
    // (x - m) - log(sum), not x - (m + log(sum)): m + log(sum) would round
    // away log(sum) next to a logit of 1e4.
    const float log_sum = static_cast<float>(std::log(sum));
    for (index_t i = 0; i < dim; ++i) y[i] = (x[i] - m) - log_sum;
  } else {
    const float inv = static_cast<float>(1.0 / sum);
    for (index_t i = 0; i < dim; ++i) y[i] *= inv;
  }
}

// dim values strided by `inner` for each of `inner` lanes: vectorises across lanes.
FASTCNN_SIMD_CLONES void softmax_strided(index_t dim, index_t inner, const float* x, bool log,
                                         float* y, float* m, double* sum) {
  for (index_t i = 0; i < inner; ++i) m[i] = -std::numeric_limits<float>::infinity();
  for (index_t i = 0; i < inner; ++i) sum[i] = 0.0;
  for (index_t d = 0; d < dim; ++d)
    for (index_t i = 0; i < inner; ++i) m[i] = x[d * inner + i] > m[i] ? x[d * inner + i] : m[i];
  for (index_t i = 0; i < inner; ++i)
    if (std::isinf(m[i]) && m[i] < 0) m[i] = 0.0f;
  for (index_t d = 0; d < dim; ++d)
    for (index_t i = 0; i < inner; ++i) {
      const float e = exp_poly(x[d * inner + i] - m[i]);
      y[d * inner + i] = e;
      sum[i] += e;
    }
  if (log) {
    for (index_t i = 0; i < inner; ++i) sum[i] = std::log(sum[i]);
    for (index_t d = 0; d < dim; ++d)
      for (index_t i = 0; i < inner; ++i)
        y[d * inner + i] = (x[d * inner + i] - m[i]) - static_cast<float>(sum[i]);
  } else {
    for (index_t i = 0; i < inner; ++i) m[i] = static_cast<float>(1.0 / sum[i]);
    for (index_t d = 0; d < dim; ++d)
      for (index_t i = 0; i < inner; ++i) y[d * inner + i] *= m[i];
  }
}

}  // namespace

void softmax_forward(index_t outer, index_t dim, index_t inner, const float* x, bool log,
                     float* y) {
  if (inner == 1) {
    parallel_for(outer, std::max<index_t>(1, 8192 / std::max<index_t>(dim, 1)), [&](index_t o) {
      softmax_row(dim, x + o * dim, log, y + o * dim);
    });
    return;
  }
  parallel_for(outer, std::max<index_t>(1, 8192 / std::max<index_t>(dim * inner, 1)),
               [&](index_t o) {
    std::vector<float> m(static_cast<size_t>(inner));
    std::vector<double> sum(static_cast<size_t>(inner));
    softmax_strided(dim, inner, x + o * dim * inner, log, y + o * dim * inner, m.data(),
                    sum.data());
  });
}

void softmax_backward(index_t outer, index_t dim, index_t inner, const float* dy,
                      const float* y, bool log, float* dx) {
  parallel_for(outer, std::max<index_t>(1, 8192 / std::max<index_t>(dim * inner, 1)),
               [&](index_t o) {
    const index_t base = o * dim * inner;
    for (index_t i = 0; i < inner; ++i) {
      // softmax: dot = sum(dy * y); log_softmax: dot = sum(dy)
      double dot = 0.0;
      for (index_t d = 0; d < dim; ++d) {
        const index_t at = base + d * inner + i;
        dot += log ? dy[at] : dy[at] * y[at];
      }
      const float s = static_cast<float>(dot);
      for (index_t d = 0; d < dim; ++d) {
        const index_t at = base + d * inner + i;
        dx[at] = log ? dy[at] - std::exp(y[at]) * s : y[at] * (dy[at] - s);
      }
    }
  });
}

namespace {
// log(sum(exp(row))) as max + log(sum(exp(row - max))), the two kept apart so
// that a caller can subtract the max from a logit exactly first.
struct LogSumExp {
  float max;
  double log_sum;
};
inline LogSumExp log_sum_exp(index_t classes, const float* row) {
  float m = -std::numeric_limits<float>::infinity();
  for (index_t c = 0; c < classes; ++c) m = std::max(m, row[c]);
  if (std::isinf(m) && m < 0) m = 0.0f;
  double sum = 0.0;
  for (index_t c = 0; c < classes; ++c) sum += std::exp(row[c] - m);
  return {m, std::log(sum)};
}
}  // namespace

void cross_entropy_forward(index_t n, index_t classes, const float* logits,
                           const std::int64_t* target, std::int64_t ignore_index,
                           float label_smoothing, float* loss) {
  // logits: (n, classes), target: (n,) -> loss: (n,)
  // loss_i = (1 - eps) * (lse - x[y]) + eps * (lse - mean_c x[c])
  parallel_for(n, std::max<index_t>(1, 8192 / std::max<index_t>(classes, 1)), [&](index_t i) {
    if (target[i] == ignore_index) {
      loss[i] = 0.0f;
      return;
    }
    const float* row = logits + i * classes;
    const LogSumExp lse = log_sum_exp(classes, row);
    // -log p[c] = (max - x[c]) + log_sum
    double value = (1.0 - label_smoothing) * (lse.log_sum + (lse.max - row[target[i]]));
    if (label_smoothing != 0.0f) {
      double mean_gap = 0.0;  // mean over c of (max - x[c])
      for (index_t c = 0; c < classes; ++c) mean_gap += lse.max - row[c];
      mean_gap /= static_cast<double>(classes);
      value += label_smoothing * (lse.log_sum + mean_gap);
    }
    loss[i] = static_cast<float>(value);
  });
}

void cross_entropy_backward(index_t n, index_t classes, const float* logits,
                            const std::int64_t* target, std::int64_t ignore_index,
                            float label_smoothing, const float* grad_scale, float* dx) {
  // dx[i, c] = g_i * (softmax(x_i)[c] - (1 - eps) [c == y_i] - eps / classes)
  parallel_for(n, std::max<index_t>(1, 8192 / std::max<index_t>(classes, 1)), [&](index_t i) {
    float* out = dx + i * classes;
    if (target[i] == ignore_index) {
      std::fill(out, out + classes, 0.0f);
      return;
    }
    const float* row = logits + i * classes;
    const LogSumExp lse = log_sum_exp(classes, row);
    const float log_sum = static_cast<float>(lse.log_sum);
    const float g = grad_scale[i];
    const float smooth = label_smoothing / static_cast<float>(classes);
    for (index_t c = 0; c < classes; ++c)
      out[c] = g * (std::exp((row[c] - lse.max) - log_sum) - smooth);
    out[target[i]] -= g * (1.0f - label_smoothing);
  });
}

}  // namespace cpu
}  // namespace fastcnn
