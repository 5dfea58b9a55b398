// Batch normalisation over a tensor viewed as (n, c, l): per-channel
// statistics over the n * l values of a channel. One channel per task; each
// row of l values is summed in float lanes (fastcnn/reduce.h) and the rows in
// double: vectorised, accurate, and independent of the thread count.
#include <algorithm>
#include <cmath>

#include "fastcnn/cpu_kernels.h"
#include "fastcnn/kernel_math.h"
#include "fastcnn/parallel.h"
#include "fastcnn/reduce.h"
#include "fastcnn/scratch.h"

namespace fastcnn {
namespace cpu {
namespace {

// Calls f(row) for each of the n rows of channel ch: a pointer to its l values.
template <typename F>
inline void for_channel_rows(index_t n, index_t c, index_t l, index_t ch, F&& f) {
  for (index_t i = 0; i < n; ++i) f((i * c + ch) * l);
}

inline index_t channel_grain(index_t n, index_t l) {
  return std::max<index_t>(1, 32768 / std::max<index_t>(n * l, 1));
}

}  // namespace

namespace {

void normalize_channel(index_t n, index_t c, index_t l, index_t ch, const float* x, float scale,
                       float shift, float* y) {
  for_channel_rows(n, c, l, ch, [&](index_t at) {
    for (index_t j = 0; j < l; ++j) y[at + j] = x[at + j] * scale + shift;
  });
}

}  // namespace

void batch_norm_normalize(index_t n, index_t c, index_t l, const float* x, const float* scale,
                          const float* shift, float* y) {
  parallel_for(c, channel_grain(n, l), [&](index_t ch) {
    normalize_channel(n, c, l, ch, x, scale[ch], shift[ch], y);
  });
}

void batch_norm_forward_train(index_t n, index_t c, index_t l, const float* x,
                              const float* weight, const float* bias, double eps,
                              double momentum, float* running_mean, float* running_var,
                              float* y, float* save_mean, float* save_invstd, float* scale_out,
                              float* shift_out) {
  const index_t count = n * l;
  parallel_for(c, channel_grain(n, l), [&](index_t ch) {
    double sum = 0.0;
    for_channel_rows(n, c, l, ch, [&](index_t at) {
      const float* row = x + at;
      sum += lane_sum(l, [&](index_t j) { return row[j]; });
    });
    const double mean = sum / static_cast<double>(count);
    double sq = 0.0;  // two passes: no cancellation when |mean| >> std
    const float mean_f = static_cast<float>(mean);
    for_channel_rows(n, c, l, ch, [&](index_t at) {
      const float* row = x + at;
      sq += lane_sum(l, [&](index_t j) {
        const float d = row[j] - mean_f;
        return d * d;
      });
    });
    const double var = sq / static_cast<double>(count);
    const double invstd = batch_norm_invstd(var, eps);
    save_mean[ch] = static_cast<float>(mean);
    save_invstd[ch] = static_cast<float>(invstd);
    if (running_mean != nullptr)
      running_mean[ch] = static_cast<float>((1.0 - momentum) * running_mean[ch] + momentum * mean);
    if (running_var != nullptr) {
      const double unbiased = count > 1 ? sq / static_cast<double>(count - 1) : var;
      running_var[ch] =
          static_cast<float>((1.0 - momentum) * running_var[ch] + momentum * unbiased);
    }
    const ChannelAffine a = batch_norm_affine(mean, invstd, weight, bias, ch);
    if (scale_out != nullptr) scale_out[ch] = a.scale;
    if (shift_out != nullptr) shift_out[ch] = a.shift;
    if (y != nullptr) normalize_channel(n, c, l, ch, x, a.scale, a.shift, y);
  });
}

void batch_norm_eval_affine(index_t c, const float* running_mean, const float* running_var,
                            const float* weight, const float* bias, double eps, float* scale,
                            float* shift) {
  for (index_t ch = 0; ch < c; ++ch) {
    const ChannelAffine a = batch_norm_affine(
        running_mean[ch], batch_norm_invstd(running_var[ch], eps), weight, bias, ch);
    scale[ch] = a.scale;
    shift[ch] = a.shift;
  }
}

void batch_norm_forward_eval(index_t n, index_t c, index_t l, const float* x,
                             const float* running_mean, const float* running_var,
                             const float* weight, const float* bias, double eps, float* y) {
  parallel_for(c, channel_grain(n, l), [&](index_t ch) {
    const ChannelAffine a = batch_norm_affine(
        running_mean[ch], batch_norm_invstd(running_var[ch], eps), weight, bias, ch);
    normalize_channel(n, c, l, ch, x, a.scale, a.shift, y);
  });
}

namespace {

// One channel's gradients; dy_row(i) gives image i's l values of this
// channel's output gradient.
template <typename DyRow>
void backward_channel(index_t n, index_t c, index_t l, index_t ch, DyRow&& dy_row,
                      const float* x, const float* mean, const float* invstd,
                      const float* weight, bool training, float* dx, float* dweight,
                      float* dbias) {
  // xhat = (x - mean) * invstd
  // dbias = sum dy, dweight = sum dy xhat
  // training: dx = w invstd (dy - dbias / m - xhat dweight / m);  eval: dx = w invstd dy
  const index_t count = n * l;
  const double mu = mean[ch], is = invstd[ch];
  const float muf = static_cast<float>(mu);
  double sum_dy = 0.0, sum_dy_xc = 0.0;  // sum dy, sum dy (x - mean)
  for (index_t i = 0; i < n; ++i) {
    const float *g = dy_row(i), *row = x + (i * c + ch) * l;
    sum_dy += lane_sum(l, [&](index_t j) { return g[j]; });
    sum_dy_xc += lane_sum(l, [&](index_t j) { return g[j] * (row[j] - muf); });
  }
  const double sum_dy_xhat = sum_dy_xc * is;
  if (dbias != nullptr) dbias[ch] = static_cast<float>(sum_dy);
  if (dweight != nullptr) dweight[ch] = static_cast<float>(sum_dy_xhat);
  if (dx == nullptr) return;
  const double w = weight != nullptr ? weight[ch] : 1.0;
  const float k = static_cast<float>(w * is);
  if (!training) {
    for (index_t i = 0; i < n; ++i) {
      const float* g = dy_row(i);
      float* out = dx + (i * c + ch) * l;
      for (index_t j = 0; j < l; ++j) out[j] = k * g[j];
    }
    return;
  }
  // dx = k * (dy - a - (x - mu) * b): a = mean(dy), b = invstd * mean(dy xhat)
  const float a = static_cast<float>(sum_dy / count);
  const float b = static_cast<float>(is * sum_dy_xhat / count);
  for (index_t i = 0; i < n; ++i) {
    const float* g = dy_row(i);
    const float* row = x + (i * c + ch) * l;
    float* out = dx + (i * c + ch) * l;
    for (index_t j = 0; j < l; ++j) out[j] = k * (g[j] - a - (row[j] - muf) * b);
  }
}

}  // namespace

void batch_norm_backward(index_t n, index_t c, index_t l, const float* dy, const float* x,
                         const float* mean, const float* invstd, const float* weight,
                         bool training, float* dx, float* dweight, float* dbias) {
  parallel_for(c, channel_grain(n, l), [&](index_t ch) {
    backward_channel(
        n, c, l, ch, [&](index_t i) { return dy + (i * c + ch) * l; }, x, mean, invstd, weight,
        training, dx, dweight, dbias);
  });
}

void batch_norm_backward_from_pool(index_t n, index_t c, index_t h, index_t w, const float* dp,
                                   const std::uint8_t* codes, const float* x, const float* mean,
                                   const float* invstd, const float* weight, float* dx,
                                   float* dweight, float* dbias) {
  const index_t l = h * w, pooled = (h / 2) * (w / 2), total = n * c * pooled;
  parallel_for(c, channel_grain(n, l), [&](index_t ch) {
    // The channel's output gradient, routed by the pool's codes into this
    // thread's buffer (L2-sized), never into a tensor.
    float* routed = thread_scratch(ScratchSlot::BatchNormGrad, n * l);
    for (index_t i = 0; i < n; ++i) {
      const index_t at = (i * c + ch) * pooled;
      max_pool2d_2x2_codes_backward_plane(dp + at, codes + at, h, w, total - at, routed + i * l);
    }
    backward_channel(
        n, c, l, ch, [&](index_t i) { return routed + i * l; }, x, mean, invstd, weight, true,
        dx, dweight, dbias);
  });
}

}  // namespace cpu
}  // namespace fastcnn
