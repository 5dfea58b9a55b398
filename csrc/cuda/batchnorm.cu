// Batch normalisation over a tensor viewed as (n, c, l). Training and the
// backward pass: per-channel sums spread over the GPU (channel_sums.h: each
// channel's values in fixed ranges summed in double, the ranges in order, so
// deterministic), the statistics two-pass as on the CPU, then an elementwise
// pass with the channel's coefficients. Eval: the per-channel affine map, a
// block per (image, channel) row.
#include "channel_sums.h"
#include "fastcnn/cuda_launch.h"
#include "fastcnn/kernel_math.h"

namespace fastcnn {
namespace cuda {
namespace {

// Pass 1: mean[ch] = sum x / count (double, scratch).
struct MeanFinish {
  double* mean;
  double count;
  FASTCNN_HD void operator()(index_t ch, const double* t) const { mean[ch] = t[0] / count; }
};

// Pass 2: sum (x - float(mean))^2, no cancellation when |mean| >> std.
struct SquaredDeviation {
  const float* x;
  const double* mean;
  index_t c, l;
  FASTCNN_HD void operator()(index_t ch, index_t o, double* acc) const {
    const float d = x[o] - static_cast<float>(mean[ch]);
    acc[0] += d * d;
  }
};

// The statistics, the running statistics and the normalisation's coefficients.
struct VarianceFinish {
  const double* mean;
  index_t count;
  double eps, momentum;
  const float* weight;
  const float* bias;
  float* running_mean;
  float* running_var;
  float* save_mean;
  float* save_invstd;
  ChannelAffine* affine;
  FASTCNN_HD void operator()(index_t ch, const double* t) const {
    const double sq = t[0], mu = mean[ch];
    const double var = sq / static_cast<double>(count);
    const double invstd = batch_norm_invstd(var, eps);
    save_mean[ch] = static_cast<float>(mu);
    save_invstd[ch] = static_cast<float>(invstd);
    if (running_mean != nullptr) running_mean[ch] = running_update(running_mean[ch], mu, momentum);
    if (running_var != nullptr) {
      const double unbiased = count > 1 ? sq / static_cast<double>(count - 1) : var;
      running_var[ch] = running_update(running_var[ch], unbiased, momentum);
    }
    affine[ch] = batch_norm_affine(mu, invstd, weight, bias, ch);
  }
};

// y = x * scale[ch] + shift[ch], a thread per value.
struct Normalize {
  index_t c, l;
  const float* x;
  const ChannelAffine* affine;
  float* y;
  FASTCNN_HD void operator()(index_t o) const {
    const index_t ch = channel_of(o, c, l);
    y[o] = x[o] * affine[ch].scale + affine[ch].shift;
  }
};

struct EvalRow {
  const float* x;
  float* y;
  ChannelAffine a;
};

// Block row = image * c + channel; j < l.
struct EvalRows {
  index_t c, l;
  const float* x;
  const float* running_mean;
  const float* running_var;
  const float* weight;
  const float* bias;
  double eps;
  float* y;

  FASTCNN_HD EvalRow row(index_t r) const {
    index_t ch;
    div_rem(r, c, &ch);
    const double invstd = batch_norm_invstd(running_var[ch], eps);
    return EvalRow{x + r * l, y + r * l,
                   batch_norm_affine(running_mean[ch], invstd, weight, bias, ch)};
  }
  FASTCNN_HD void operator()(const EvalRow& r, index_t j) const {
    r.y[j] = r.x[j] * r.a.scale + r.a.shift;
  }
};

// xhat = (x - mean) invstd;  dbias = sum dy;  dweight = sum dy xhat;
// training: dx = w invstd (dy - dbias / m - (x - mean) invstd dweight / m);
// eval:     dx = w invstd dy.
struct BackwardSums {  // sum dy, sum dy (x - mean)
  const float* dy;
  const float* x;
  const float* mean;
  FASTCNN_HD void operator()(index_t ch, index_t o, double* acc) const {
    acc[0] += dy[o];
    acc[1] += dy[o] * (x[o] - mean[ch]);
  }
};

struct BackwardCoefficients {
  float k, a, b;
};

struct BackwardFinish {
  const float* invstd;
  const float* weight;
  index_t count;
  bool training;
  float* dweight;
  float* dbias;
  BackwardCoefficients* coef;
  FASTCNN_HD void operator()(index_t ch, const double* t) const {
    const double sum_dy = t[0], is = invstd[ch];
    const double sum_dy_xhat = t[1] * is;
    if (dbias != nullptr) dbias[ch] = static_cast<float>(sum_dy);
    if (dweight != nullptr) dweight[ch] = static_cast<float>(sum_dy_xhat);
    if (coef == nullptr) return;
    const double w = weight != nullptr ? weight[ch] : 1.0;
    coef[ch] = BackwardCoefficients{
        static_cast<float>(w * is), training ? static_cast<float>(sum_dy / count) : 0.0f,
        training ? static_cast<float>(is * sum_dy_xhat / count) : 0.0f};
  }
};

struct BackwardDx {
  index_t c, l;
  const float* dy;
  const float* x;
  const float* mean;
  const BackwardCoefficients* coef;
  bool training;
  float* dx;
  FASTCNN_HD void operator()(index_t o) const {
    const index_t ch = channel_of(o, c, l);
    const BackwardCoefficients q = coef[ch];
    const float muf = mean[ch];
    dx[o] = training ? q.k * (dy[o] - q.a - (x[o] - muf) * q.b) : q.k * dy[o];
  }
};

}  // namespace

void batch_norm_forward_train(const Exec& ex, index_t n, index_t c, index_t l, const float* x,
                              const float* weight, const float* bias, double eps,
                              double momentum, float* running_mean, float* running_var,
                              float* y, float* save_mean, float* save_invstd) {
  Workspace mean(ex, static_cast<std::size_t>(c) * sizeof(double));
  Workspace affine(ex, static_cast<std::size_t>(c) * sizeof(ChannelAffine));
  const index_t count = n * l;
  channel_sums<1>(ex, "batch_norm_mean", n, c, l, AddValue{x},
                  MeanFinish{mean.as<double>(), static_cast<double>(count)});
  channel_sums<1>(ex, "batch_norm_variance", n, c, l,
                  SquaredDeviation{x, mean.as<double>(), c, l},
                  VarianceFinish{mean.as<double>(), count, eps, momentum, weight, bias,
                                 running_mean, running_var, save_mean, save_invstd,
                                 affine.as<ChannelAffine>()});
  for_each(ex, "batch_norm_normalize", count * c,
           Normalize{c, l, x, affine.as<ChannelAffine>(), y});
}

void batch_norm_forward_eval(const Exec& ex, index_t n, index_t c, index_t l, const float* x,
                             const float* running_mean, const float* running_var,
                             const float* weight, const float* bias, double eps, float* y) {
  for_each_in_rows(ex, "batch_norm_forward_eval", n * c, l,
                   EvalRows{c, l, x, running_mean, running_var, weight, bias, eps, y});
}

void batch_norm_backward(const Exec& ex, index_t n, index_t c, index_t l, const float* dy,
                         const float* x, const float* mean, const float* invstd,
                         const float* weight, bool training, float* dx, float* dweight,
                         float* dbias) {
  const index_t count = n * l;
  Workspace coef(ex, dx != nullptr ? static_cast<std::size_t>(c) * sizeof(BackwardCoefficients)
                                   : 0);
  channel_sums<2>(ex, "batch_norm_backward_sums", n, c, l, BackwardSums{dy, x, mean},
                  BackwardFinish{invstd, weight, count, training, dweight, dbias,
                                 coef.as<BackwardCoefficients>()});
  if (dx != nullptr && count > 0)
    for_each(ex, "batch_norm_backward", count * c,
             BackwardDx{c, l, dy, x, mean, coef.as<BackwardCoefficients>(), training, dx});
}

}  // namespace cuda
}  // namespace fastcnn
