// Batch normalisation over a tensor viewed as (n, c, l). Training and the
// backward pass: a block per channel, every thread summing a fixed subset of
// the channel's n l values in double, then a fixed tree across the block
// (deterministic); the statistics are two-pass, as on the CPU. Eval: the
// per-channel affine map, a block per (image, channel) row.
#include "fastcnn/cuda_launch.h"
#include "fastcnn/kernel_math.h"

namespace fastcnn {
namespace cuda {
namespace {

constexpr int kChannelThreads = 256;

struct TrainForwardBody {
  static constexpr int kThreads = kChannelThreads;
  static constexpr bool kCooperative = true;
  index_t n, c, l;
  const float* x;
  const float* weight;
  const float* bias;
  double eps, momentum;
  float* running_mean;
  float* running_var;
  float* y;
  float* save_mean;
  float* save_invstd;

  template <class Ctx>
  FASTCNN_HD void operator()(Ctx& ctx) const {
    const index_t ch = ctx.bx(), count = n * l;
    const int tid = ctx.tid();
    double* scratch = reinterpret_cast<double*>(ctx.smem());
    double sum = 0.0;
    if (l > 0)
      for (ChannelCursor at(tid, kThreads, l); at.i < n; at.next()) sum += x[at.offset(c, ch)];
    const double mean = block_sum<kThreads>(ctx, scratch, sum) / static_cast<double>(count);
    const float mean_f = static_cast<float>(mean);
    double sq = 0.0;  // two passes: no cancellation when |mean| >> std
    if (l > 0)
      for (ChannelCursor at(tid, kThreads, l); at.i < n; at.next()) {
        const float d = x[at.offset(c, ch)] - mean_f;
        sq += d * d;
      }
    sq = block_sum<kThreads>(ctx, scratch, sq);
    const double var = sq / static_cast<double>(count);
    const double invstd = batch_norm_invstd(var, eps);
    if (tid == 0) {
      save_mean[ch] = static_cast<float>(mean);
      save_invstd[ch] = static_cast<float>(invstd);
      if (running_mean != nullptr) running_mean[ch] = running_update(running_mean[ch], mean, momentum);
      if (running_var != nullptr) {
        const double unbiased = count > 1 ? sq / static_cast<double>(count - 1) : var;
        running_var[ch] = running_update(running_var[ch], unbiased, momentum);
      }
    }
    const ChannelAffine a = batch_norm_affine(mean, invstd, weight, bias, ch);
    if (l > 0)
      for (ChannelCursor at(tid, kThreads, l); at.i < n; at.next()) {
        const index_t o = at.offset(c, ch);
        y[o] = x[o] * a.scale + a.shift;
      }
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
struct BackwardBody {
  static constexpr int kThreads = kChannelThreads;
  static constexpr bool kCooperative = true;
  index_t n, c, l;
  const float* dy;
  const float* x;
  const float* mean;
  const float* invstd;
  const float* weight;
  bool training;
  float* dx;
  float* dweight;
  float* dbias;

  template <class Ctx>
  FASTCNN_HD void operator()(Ctx& ctx) const {
    const index_t ch = ctx.bx(), count = n * l;
    const int tid = ctx.tid();
    double* scratch = reinterpret_cast<double*>(ctx.smem());
    const double mu = mean[ch], is = invstd[ch];
    const float muf = static_cast<float>(mu);
    double sum_dy = 0.0, sum_dy_xc = 0.0;  // sum dy, sum dy (x - mean)
    if (l > 0)
      for (ChannelCursor at(tid, kThreads, l); at.i < n; at.next()) {
        const index_t o = at.offset(c, ch);
        sum_dy += dy[o];
        sum_dy_xc += dy[o] * (x[o] - muf);
      }
    sum_dy = block_sum<kThreads>(ctx, scratch, sum_dy);
    sum_dy_xc = block_sum<kThreads>(ctx, scratch, sum_dy_xc);
    const double sum_dy_xhat = sum_dy_xc * is;
    if (tid == 0) {
      if (dbias != nullptr) dbias[ch] = static_cast<float>(sum_dy);
      if (dweight != nullptr) dweight[ch] = static_cast<float>(sum_dy_xhat);
    }
    if (dx == nullptr || l == 0) return;
    const double w = weight != nullptr ? weight[ch] : 1.0;
    const float k = static_cast<float>(w * is);
    const float a = training ? static_cast<float>(sum_dy / count) : 0.0f;
    const float b = training ? static_cast<float>(is * sum_dy_xhat / count) : 0.0f;
    for (ChannelCursor at(tid, kThreads, l); at.i < n; at.next()) {
      const index_t o = at.offset(c, ch);
      dx[o] = training ? k * (dy[o] - a - (x[o] - muf) * b) : k * dy[o];
    }
  }
};

constexpr size_t kScratchBytes = kChannelThreads * sizeof(double);

}  // namespace

void batch_norm_forward_train(const Exec& ex, index_t n, index_t c, index_t l, const float* x,
                              const float* weight, const float* bias, double eps,
                              double momentum, float* running_mean, float* running_var,
                              float* y, float* save_mean, float* save_invstd) {
  launch(ex, "batch_norm_forward_train", Grid{c}, kScratchBytes,
         TrainForwardBody{n, c, l, x, weight, bias, eps, momentum, running_mean, running_var, y,
                          save_mean, save_invstd});
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
  launch(ex, "batch_norm_backward", Grid{c}, kScratchBytes,
         BackwardBody{n, c, l, dy, x, mean, invstd, weight, training, dx, dweight, dbias});
}

}  // namespace cuda
}  // namespace fastcnn
