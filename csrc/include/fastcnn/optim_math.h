// One element of each optimizer update (fastcnn.optim's rules), written once
// for the CPU loop (csrc/cpu/optim.cpp) and the CUDA multi-tensor kernel
// (csrc/cuda/optim.cu). Each follows the NumPy expression of fastcnn.optim
// operation by operation in float32 with no fused multiply-add: on the host
// the file is built for baseline x86-64 (no FMA to contract into), on the
// GPU every product and sum is an explicitly rounded intrinsic, which nvcc
// never contracts. So the NumPy, CPU and CUDA updates give the same bits.
//
// The flags are plain bools: the CPU passes compile-time constants (so each
// variant's loop has no branch and vectorises), the GPU run-time ones (the
// same for every thread of a launch).
#pragma once

#include <cmath>

#include "fastcnn/common.h"

namespace fastcnn {

struct SgdOptions {
  float lr, momentum, weight_decay;
  float undamped_share;  // float32(1 - dampening), used when `damped`
  bool damped, nesterov, first_step;  // first_step: the buffer starts as the gradient
};

struct AdamOptions {
  // The float32 constants of the NumPy expression, computed in Python:
  // decay_scale = 1 - lr wd (AdamW, else 1), weight_decay (Adam's L2, else 0),
  // bias2_sqrt = sqrt(1 - beta2^t), step_size = lr / (1 - beta1^t).
  float beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay, decay_scale,
      bias2_sqrt, step_size;
};

// a * b, a + b, a - b, a / b and sqrt(a), each rounded to nearest on its own.
FASTCNN_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
FASTCNN_HD float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
FASTCNN_HD float sub_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
FASTCNN_HD float div_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
FASTCNN_HD float sqrt_rn(float a) {
#ifdef __CUDA_ARCH__
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}

// SGD: g = grad + wd p; buf = momentum buf + (1 - dampening) g (buf = g on
// the first step); g = g + momentum buf (nesterov) or buf; p -= lr g.
// `momentum` false: buf is not touched (may be null).
FASTCNN_HD void sgd_element(const SgdOptions& o, bool decay, bool momentum, bool first,
                            bool nesterov, bool damped, float* p, float g, float* buf) {
  float gi = g;
  if (decay) gi = add_rn(gi, mul_rn(o.weight_decay, *p));
  if (momentum) {
    float b = gi;
    if (!first) b = add_rn(mul_rn(*buf, o.momentum), damped ? mul_rn(o.undamped_share, gi) : gi);
    *buf = b;
    gi = nesterov ? add_rn(gi, mul_rn(o.momentum, b)) : b;
  }
  *p = sub_rn(*p, mul_rn(o.lr, gi));
}

// Adam / AdamW: p *= decay_scale (AdamW); g = grad + wd p (Adam's L2);
// m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
// p -= m / (sqrt(v) / bias2_sqrt + eps) * step_size.
FASTCNN_HD void adam_element(const AdamOptions& o, bool decoupled, bool l2, float* p, float g,
                             float* exp_avg, float* exp_avg_sq) {
  float gi = g;
  float pi = *p;
  if (decoupled) pi = mul_rn(pi, o.decay_scale);
  if (l2) gi = add_rn(gi, mul_rn(o.weight_decay, pi));
  const float m = add_rn(mul_rn(*exp_avg, o.beta1), mul_rn(o.one_minus_beta1, gi));
  const float v = add_rn(mul_rn(*exp_avg_sq, o.beta2), mul_rn(o.one_minus_beta2, mul_rn(gi, gi)));
  *exp_avg = m;
  *exp_avg_sq = v;
  const float denom = add_rn(div_rn(sqrt_rn(v), o.bias2_sqrt), o.eps);
  *p = sub_rn(pi, mul_rn(div_rn(m, denom), o.step_size));
}

}  // namespace fastcnn
