// Optimizer updates in one pass over each parameter, in place. Each follows
// the NumPy expression of fastcnn.optim operation by operation in float32
// (no fused multiply-add: this file is built for baseline x86-64), so the
// CPU and NumPy paths give the same bits.
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "fastcnn/cpu_kernels.h"
#include "fastcnn/parallel.h"

namespace fastcnn {
namespace cpu {

namespace {
constexpr index_t kGrain = 16384;
}

namespace {

// Calls f(std::bool_constant<b0>{}, ...) with the flags as compile-time
// constants, so that each variant's loop has no branch and vectorises.
template <typename F>
void with_flags(F&& f) {
  f();
}
template <typename F, typename... Rest>
void with_flags(F&& f, bool first, Rest... rest) {
  if (first)
    with_flags([&](auto... flags) { f(std::true_type{}, flags...); }, rest...);
  else
    with_flags([&](auto... flags) { f(std::false_type{}, flags...); }, rest...);
}

}  // namespace

void sgd_step(index_t count, float* p_, const float* g_, float* buf_, const SgdOptions& o) {
  float* __restrict p = p_;
  const float* __restrict g = g_;
  float* __restrict buf = buf_;
  const float lr = o.lr, wd = o.weight_decay, m = o.momentum, share = o.undamped_share;
  with_flags([&](auto decay, auto momentum, auto first, auto nesterov, auto damped) {
    parallel_for((count + kGrain - 1) / kGrain, 1, [&](index_t block) {
      const index_t end = std::min(count, (block + 1) * kGrain);
      for (index_t i = block * kGrain; i < end; ++i) {
        float gi = g[i];
        if (decay) gi = gi + wd * p[i];
        if (momentum) {
          float b = gi;
          if (!first) {
            b = buf[i] * m;
            b = b + (damped ? share * gi : gi);
          }
          buf[i] = b;
          gi = nesterov ? gi + m * b : b;
        }
        p[i] = p[i] - lr * gi;
      }
    });
  }, o.weight_decay != 0.0f, buf != nullptr, o.first_step, o.nesterov, o.damped);
}

void adam_step(index_t count, float* p_, const float* g_, float* exp_avg_, float* exp_avg_sq_,
               const AdamOptions& o) {
  float* __restrict p = p_;
  const float* __restrict g = g_;
  float* __restrict exp_avg = exp_avg_;
  float* __restrict exp_avg_sq = exp_avg_sq_;
  const float b1 = o.beta1, b2 = o.beta2, one_b1 = o.one_minus_beta1, one_b2 = o.one_minus_beta2;
  const float wd = o.weight_decay, scale = o.decay_scale, bias2 = o.bias2_sqrt, eps = o.eps;
  const float step = o.step_size;
  with_flags([&](auto decoupled, auto l2) {
    parallel_for((count + kGrain - 1) / kGrain, 1, [&](index_t block) {
      const index_t end = std::min(count, (block + 1) * kGrain);
      for (index_t i = block * kGrain; i < end; ++i) {
        float gi = g[i];
        float pi = p[i];
        if (decoupled) pi = pi * scale;  // AdamW
        if (l2) gi = gi + wd * pi;
        const float m = exp_avg[i] * b1 + one_b1 * gi;
        const float v = exp_avg_sq[i] * b2 + one_b2 * (gi * gi);
        exp_avg[i] = m;
        exp_avg_sq[i] = v;
        const float denom = std::sqrt(v) / bias2 + eps;
        p[i] = pi - m / denom * step;
      }
    });
  }, o.decay_scale != 1.0f, o.weight_decay != 0.0f);
}

}  // namespace cpu
}  // namespace fastcnn
