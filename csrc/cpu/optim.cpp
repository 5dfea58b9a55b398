// Optimizer updates in one pass over each parameter, in place: loops around
// fastcnn/optim_math.h's per-element updates, which follow the NumPy
// expression of fastcnn.optim operation by operation in float32 (no fused
// multiply-add: this file is built for baseline x86-64), so the CPU and
// NumPy paths give the same bits.
#include <algorithm>
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
  with_flags([&](auto decay, auto momentum, auto first, auto nesterov, auto damped) {
    parallel_for((count + kGrain - 1) / kGrain, 1, [&](index_t block) {
      const index_t end = std::min(count, (block + 1) * kGrain);
      for (index_t i = block * kGrain; i < end; ++i)
        sgd_element(o, decay, momentum, first, nesterov, damped, p + i, g[i],
                    momentum ? buf + i : nullptr);
    });
  }, o.weight_decay != 0.0f, buf != nullptr, o.first_step, o.nesterov, o.damped);
}

void adam_step(index_t count, float* p_, const float* g_, float* exp_avg_, float* exp_avg_sq_,
               const AdamOptions& o) {
  float* __restrict p = p_;
  const float* __restrict g = g_;
  float* __restrict exp_avg = exp_avg_;
  float* __restrict exp_avg_sq = exp_avg_sq_;
  with_flags([&](auto decoupled, auto l2) {
    parallel_for((count + kGrain - 1) / kGrain, 1, [&](index_t block) {
      const index_t end = std::min(count, (block + 1) * kGrain);
      for (index_t i = block * kGrain; i < end; ++i)
        adam_element(o, decoupled, l2, p + i, g[i], exp_avg + i, exp_avg_sq + i);
    });
  }, o.decay_scale != 1.0f, o.weight_decay != 0.0f);
}

}  // namespace cpu
}  // namespace fastcnn
