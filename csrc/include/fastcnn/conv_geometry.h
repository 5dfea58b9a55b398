// Output-size and window arithmetic shared by convolution and pooling, on
// the CPU and the GPU. Every index computation of im2col / col2im / pooling
// goes through these helpers, so the CPU tests exercise the GPU's maths too.
#pragma once

#include "fastcnn/common.h"

namespace fastcnn {

// Convolution output extent: floor((in + 2 pad - dil (k - 1) - 1) / stride) + 1.
// Callers validate first; a result <= 0 means the kernel does not fit.
FASTCNN_HD index_t conv_out_size(index_t in, index_t k, index_t stride, index_t pad,
                                 index_t dil) {
  const index_t span = dil * (k - 1) + 1;
  const index_t room = in + 2 * pad - span;
  return room < 0 ? 0 : room / stride + 1;
}

// The half-open range [lo, hi) of output positions o whose input coordinate
// o * stride - pad + offset lies inside [0, in): im2col copies that range and
// zero-fills the rest, with no per-element bounds test.
FASTCNN_HD void valid_output_range(index_t in, index_t out, index_t stride, index_t pad,
                                   index_t offset, index_t* lo, index_t* hi) {
  // o * stride >= pad - offset  and  o * stride < in + pad - offset
  const index_t a = pad - offset;
  const index_t b = in + pad - offset;
  index_t l = a <= 0 ? 0 : (a + stride - 1) / stride;
  index_t h = b <= 0 ? 0 : (b + stride - 1) / stride;
  if (l > out) l = out;
  if (h > out) h = out;
  if (h < l) h = l;
  *lo = l;
  *hi = h;
}

// One convolution's geometry: input (n, c, h, w), weight (k, c / groups, r, s),
// output (n, k, oh, ow).
struct ConvShape {
  index_t n, c, h, w;
  index_t k, r, s;
  index_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups;
  index_t oh, ow;

  FASTCNN_HD index_t c_per_group() const { return c / groups; }
  FASTCNN_HD index_t k_per_group() const { return k / groups; }
  // Rows of one group's column matrix: (c / groups) * r * s.
  FASTCNN_HD index_t col_rows() const { return c_per_group() * r * s; }
  FASTCNN_HD index_t out_pixels() const { return oh * ow; }
  FASTCNN_HD bool is_pointwise() const {
    return r == 1 && s == 1 && stride_h == 1 && stride_w == 1 && pad_h == 0 && pad_w == 0;
  }
};

// Pooling geometry: input (n, c, h, w) -> output (n, c, oh, ow).
struct PoolShape {
  index_t n, c, h, w;
  index_t kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  index_t oh, ow;
};

}  // namespace fastcnn
