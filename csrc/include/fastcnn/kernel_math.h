// Per-element maths and index arithmetic of the kernels, written once for
// the host and the device (FASTCNN_HD). The CUDA kernels are thin loops
// around these; the CPU kernels compute the same expressions, and the
// emulated CUDA kernels (fastcnn/cuda_launch.h) run exactly these functions
// on the host, so the CPU tests check them without a GPU.
//
// The expressions mirror csrc/cpu term for term (same association, same
// double accumulation) so that the two devices agree to rounding, and
// bitwise where no transcendental function or reduction order is involved.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "fastcnn/common.h"
#include "fastcnn/conv_geometry.h"

namespace fastcnn {

// ------------------------------------------------------------ float bits --

FASTCNN_HD std::uint32_t float_bits(float v) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(v);
#else
  std::uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  return u;
#endif
}

FASTCNN_HD float bits_float(std::uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float v;
  std::memcpy(&v, &u, sizeof v);
  return v;
#endif
}

FASTCNN_HD float neg_inf() { return bits_float(0xFF800000u); }
FASTCNN_HD float quiet_nan() { return bits_float(0x7FC00000u); }

// v if keep, else +0.0f: a bitwise select, so a NaN in a zeroed position
// never leaks through (0 * NaN would).
FASTCNN_HD float select_or_zero(bool keep, float v) {
  return bits_float(float_bits(v) & (0u - static_cast<std::uint32_t>(keep)));
}

// ------------------------------------------------------------- integers --

// a / b and a % b for a >= 0, b > 0, in 32-bit arithmetic when both fit (a
// GPU divides 32-bit integers several times faster than 64-bit ones).
FASTCNN_HD index_t div_rem(index_t a, index_t b, index_t* rem) {
  if (((a | b) >> 32) == 0) {
    const std::uint32_t ua = static_cast<std::uint32_t>(a), ub = static_cast<std::uint32_t>(b);
    const std::uint32_t q = ua / ub;
    *rem = static_cast<index_t>(ua - q * ub);
    return static_cast<index_t>(q);
  }
  const index_t q = a / b;
  *rem = a - q * b;
  return q;
}

// min for device code too (std::min is a host function there).
FASTCNN_HD index_t index_min(index_t a, index_t b) { return a < b ? a : b; }

// ------------------------------------------------------------------ relu --

// max(x, 0) with NaN kept and -0.0 kept (PyTorch's rule): zero where x < 0.
FASTCNN_HD float relu_value(float x) { return select_or_zero(!(x < 0.0f), x); }

// normal: dy where x > 0 (a NaN input passes the gradient, as PyTorch's
// threshold_backward); guided: dy where x > 0 and dy > 0.
FASTCNN_HD float relu_grad(float dy, float x, bool guided) {
  // & rather than &&: no branch, so the CPU loops vectorise.
  return guided ? select_or_zero((x > 0.0f) & (dy > 0.0f), dy) : select_or_zero(!(x <= 0.0f), dy);
}

// ------------------------------------------------------------ DeepLIFT --
// An image (0) and its reference (1) side by side; delta_in = in0 - in1.

// NaN-propagating max, as numpy.maximum.
FASTCNN_HD float max_nan(float a, float b) { return (a != a || a > b) ? a : b; }

// The rescale rule's multiplier for both halves of a ReLU: delta_out /
// delta_in, or each half's plain gradient rule where |delta_in| < eps.
FASTCNN_HD void deeplift_relu(float in0, float in1, float out0, float out1, float g0, float g1,
                              float eps, float* r0, float* r1) {
  const float delta_in = in0 - in1;
  if (fabsf(delta_in) < eps) {
    *r0 = relu_grad(g0, in0, false);
    *r1 = relu_grad(g1, in1, false);
  } else {
    const float ratio = (out0 - out1) / delta_in;
    *r0 = g0 * ratio;
    *r1 = g1 * ratio;
  }
}

// A max-pool output's change from the reference's, split at top = max(out0,
// out1): top - out1 goes through the image's argmax, out0 - top through the
// reference's; each times its half's gradient.
FASTCNN_HD void deeplift_pool_split(float out0, float out1, float g0, float g1, float* r0,
                                    float* r1) {
  const float top = max_nan(out0, out1);
  *r0 = g0 * (top - out1);
  *r1 = g1 * (out0 - top);
}

// An input's routed shares (summed over both halves) over its own change, or
// each half's plain pool gradient where |delta_in| < eps.
FASTCNN_HD void deeplift_rescale(float in0, float in1, float routed0, float routed1,
                                 float plain0, float plain1, float eps, float* r0, float* r1) {
  const float delta_in = in0 - in1;
  if (fabsf(delta_in) < eps) {
    *r0 = plain0;
    *r1 = plain1;
  } else {
    *r0 = *r1 = (routed0 + routed1) / delta_in;
  }
}

// ------------------------------------------------------------ convolution --

// The input coordinate output position o reads at tap t.
FASTCNN_HD index_t conv_input_coord(index_t o, index_t t, index_t stride, index_t pad,
                                    index_t dil) {
  return o * stride - pad + t * dil;
}

// The output position o that reads input coordinate `in` at tap t (the
// inverse of conv_input_coord), if there is one in [0, out).
FASTCNN_HD bool conv_output_coord(index_t in, index_t t, index_t stride, index_t pad, index_t dil,
                                  index_t out, index_t* o) {
  const index_t num = in + pad - t * dil;  // = o * stride
  if (num < 0) return false;
  index_t rem;
  const index_t q = div_rem(num, stride, &rem);
  *o = q;
  return rem == 0 && q < out;
}

// ------------------------------------------------------------ max pooling --

// Window taps [lo, hi) that land inside an input of extent `in`, for the
// window starting at `start` with dilation `dil` and `k` taps.
FASTCNN_HD void taps_inside(index_t start, index_t dil, index_t k, index_t in, index_t* lo,
                            index_t* hi) {
  const index_t l = start >= 0 ? 0 : (-start + dil - 1) / dil;
  const index_t h = in - start <= 0 ? 0 : (in - start + dil - 1) / dil;
  *lo = l < k ? l : k;
  const index_t hk = h < k ? h : k;
  *hi = hk > *lo ? hk : *lo;
}

// Max and argmax (flat iy * w + ix) of the window of output (oy, ox) of one
// plane: the first maximum in row-major window order wins, a NaN wins over
// any number, padding is never selected. A window with no tap inside the
// input (possible with dilation and padding) gives -inf and index -1: it
// takes no gradient (as the CPU kernel and PyTorch).
FASTCNN_HD index_t pool_argmax(const PoolShape& ps, const float* plane, index_t oy, index_t ox,
                               float* value) {
  const index_t y0 = oy * ps.stride_h - ps.pad_h, x0 = ox * ps.stride_w - ps.pad_w;
  index_t i_lo, i_hi, j_lo, j_hi;
  taps_inside(y0, ps.dil_h, ps.kh, ps.h, &i_lo, &i_hi);
  taps_inside(x0, ps.dil_w, ps.kw, ps.w, &j_lo, &j_hi);
  if (i_lo == i_hi || j_lo == j_hi) {
    *value = neg_inf();
    return -1;
  }
  index_t best_idx = (y0 + i_lo * ps.dil_h) * ps.w + x0 + j_lo * ps.dil_w;
  float best = plane[best_idx];
  for (index_t i = i_lo; i < i_hi; ++i) {
    const index_t row = (y0 + i * ps.dil_h) * ps.w + x0;
    for (index_t j = j_lo; j < j_hi; ++j) {
      const index_t at = row + j * ps.dil_w;
      const float v = plane[at];
      const bool take = (v > best) | (v != v);
      best = take ? v : best;
      best_idx = take ? at : best_idx;
    }
  }
  *value = best;
  return best_idx;
}

// max_pool2d(relu(x)) of a window from its max and argmax in x: the ReLU'd
// maximum, but -inf (the maximum of nothing) for a window with no tap inside
// the input (index -1), as max_pool2d of the ReLU'd input gives.
FASTCNN_HD float relu_window_max(float value, index_t at) {
  return at < 0 ? value : relu_value(value);
}

// Output positions [lo, hi) along one axis whose window spans input
// coordinate `in` (o * stride - pad <= in <= o * stride - pad + (k - 1) dil);
// with dilation a window may span `in` without a tap on it.
FASTCNN_HD void windows_containing(index_t in, index_t k, index_t stride, index_t pad, index_t dil,
                                   index_t out, index_t* lo, index_t* hi) {
  const index_t first = in + pad - (k - 1) * dil;  // o * stride >= first
  const index_t last = in + pad;                   // o * stride <= last
  index_t l = first <= 0 ? 0 : (first + stride - 1) / stride;
  index_t h = last < 0 ? 0 : last / stride + 1;
  if (h > out) h = out;
  if (l > h) l = h;
  *lo = l;
  *hi = h;
}

// ---------------------------------------------------------------- softmax --

// softmax (or log_softmax) of the dim values x[0], x[stride], ... into y
// (same layout), with the row maximum shifted out so that huge logits stay
// finite; the exponentials are summed in double. An all -inf row shifts by
// 0 and gives NaN, as PyTorch.
FASTCNN_HD void softmax_lane(index_t dim, index_t stride, const float* x, bool log, float* y) {
  float m = neg_inf();
  for (index_t d = 0; d < dim; ++d) {
    const float v = x[d * stride];
    m = m < v ? v : m;
  }
  if (m == neg_inf()) m = 0.0f;
  double sum = 0.0;
  if (log) {
    for (index_t d = 0; d < dim; ++d) sum += ::expf(x[d * stride] - m);
    const float lse = m + static_cast<float>(::log(sum));
    for (index_t d = 0; d < dim; ++d) y[d * stride] = x[d * stride] - lse;
  } else {
    for (index_t d = 0; d < dim; ++d) {
      const float e = ::expf(x[d * stride] - m);
      y[d * stride] = e;
      sum += e;
    }
    const float inv = static_cast<float>(1.0 / sum);
    for (index_t d = 0; d < dim; ++d) y[d * stride] *= inv;
  }
}

// From the forward output y: softmax: dx = y (dy - sum(dy y));
// log_softmax: dx = dy - exp(y) sum(dy).
FASTCNN_HD void softmax_backward_lane(index_t dim, index_t stride, const float* dy, const float* y,
                                      bool log, float* dx) {
  double dot = 0.0;
  for (index_t d = 0; d < dim; ++d) {
    const index_t at = d * stride;
    dot += log ? dy[at] : dy[at] * y[at];
  }
  const float s = static_cast<float>(dot);
  for (index_t d = 0; d < dim; ++d) {
    const index_t at = d * stride;
    dx[at] = log ? dy[at] - ::expf(y[at]) * s : y[at] * (dy[at] - s);
  }
}

// log(sum(exp(row))) of a contiguous row, maximum shifted out.
FASTCNN_HD float log_sum_exp(index_t classes, const float* row) {
  float m = neg_inf();
  for (index_t c = 0; c < classes; ++c) m = m < row[c] ? row[c] : m;
  if (m == neg_inf()) m = 0.0f;
  double sum = 0.0;
  for (index_t c = 0; c < classes; ++c) sum += ::expf(row[c] - m);
  return m + static_cast<float>(::log(sum));
}

// Cross-entropy of one row of logits against class `target`:
//   (1 - eps) (lse - x[target]) + eps (lse - mean_c x[c]),
// 0 when target == ignore_index, NaN when target is out of range.
FASTCNN_HD float cross_entropy_row(index_t classes, const float* row, std::int64_t target,
                                   std::int64_t ignore_index, float label_smoothing) {
  if (target == ignore_index) return 0.0f;
  if (target < 0 || target >= classes) return quiet_nan();
  const double lse = log_sum_exp(classes, row);
  double value = (1.0 - label_smoothing) * (lse - row[target]);
  if (label_smoothing != 0.0f) {
    double mean = 0.0;
    for (index_t c = 0; c < classes; ++c) mean += row[c];
    mean /= static_cast<double>(classes);
    value += label_smoothing * (lse - mean);
  }
  return static_cast<float>(value);
}

// d loss_i / d logits = g (softmax(x) - (1 - eps) onehot(target) - eps / classes),
// zeros when ignored, NaN when the target is out of range.
FASTCNN_HD void cross_entropy_row_grad(index_t classes, const float* row, std::int64_t target,
                                       std::int64_t ignore_index, float label_smoothing, float g,
                                       float* out) {
  if (target == ignore_index || target < 0 || target >= classes) {
    const float fill = target == ignore_index ? 0.0f : quiet_nan();
    for (index_t c = 0; c < classes; ++c) out[c] = fill;
    return;
  }
  const float lse = log_sum_exp(classes, row);
  const float smooth = label_smoothing / static_cast<float>(classes);
  for (index_t c = 0; c < classes; ++c) out[c] = g * (::expf(row[c] - lse) - smooth);
  out[target] -= g * (1.0f - label_smoothing);
}

// ------------------------------------------------------------- batch norm --

// Visits the n * l values of one channel of an (n, c, l) tensor, one
// worker of `workers` taking every workers-th value in (i, j) order.
struct ChannelCursor {
  index_t i, j, step_i, step_j, l;

  FASTCNN_HD ChannelCursor(index_t worker, index_t workers, index_t l_) : l(l_) {
    i = div_rem(worker, l, &j);
    step_i = div_rem(workers, l, &step_j);
  }
  FASTCNN_HD void next() {
    i += step_i;
    j += step_j;
    if (j >= l) {
      j -= l;
      ++i;
    }
  }
  FASTCNN_HD index_t offset(index_t c, index_t ch) const { return (i * c + ch) * l + j; }
};

struct ChannelAffine {
  float scale, shift;
};

// y = (x - mean) * invstd * w + b  ==  x * scale + shift (w = 1, b = 0 when absent),
// the coefficients computed in double.
FASTCNN_HD ChannelAffine batch_norm_affine(double mean, double invstd, const float* weight,
                                           const float* bias, index_t ch) {
  const double w = weight != nullptr ? weight[ch] : 1.0;
  const double b = bias != nullptr ? bias[ch] : 0.0;
  return ChannelAffine{static_cast<float>(invstd * w), static_cast<float>(b - mean * invstd * w)};
}

FASTCNN_HD double batch_norm_invstd(double var, double eps) { return 1.0 / ::sqrt(var + eps); }

// r = (1 - momentum) r + momentum stat
FASTCNN_HD float running_update(float r, double stat, double momentum) {
  return static_cast<float>((1.0 - momentum) * r + momentum * stat);
}

// -------------------------------------------------------------- normalize --

// (v / 255 - mean) / std in double, rounded once.
FASTCNN_HD float normalize_value(std::uint8_t v, double mean, double stdev) {
  return static_cast<float>((v / 255.0 - mean) / stdev);
}

}  // namespace fastcnn
