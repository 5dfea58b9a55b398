// im2col / col2im for one image and one group. Row (ci, ri, si) of the column
// matrix holds input channel ci shifted by kernel tap (ri, si): the
// convolution becomes weight (k, c r s) @ cols (c r s, oh ow).
#include <algorithm>
#include <cstring>

#include "fastcnn/cpu_kernels.h"
#include "fastcnn/parallel.h"

namespace fastcnn {
namespace cpu {

// x: (c/groups, h, w) -> cols: (c/groups * r * s, oh * ow), rows ld apart
void im2col(const ConvShape& cs, const float* x, float* cols, index_t ld) {
  const index_t rows = cs.col_rows(), pixels = cs.out_pixels();
  parallel_for(rows, std::max<index_t>(1, 16384 / std::max<index_t>(pixels, 1)), [&](index_t row) {
    const index_t ci = row / (cs.r * cs.s), ri = (row / cs.s) % cs.r, si = row % cs.s;
    const float* plane = x + ci * cs.h * cs.w;
    float* dst = cols + row * ld;
    index_t w_lo, w_hi;
    valid_output_range(cs.w, cs.ow, cs.stride_w, cs.pad_w, si * cs.dil_w, &w_lo, &w_hi);
    const index_t iw0 = w_lo * cs.stride_w - cs.pad_w + si * cs.dil_w;
    if (cs.stride_h == 1 && cs.stride_w == 1 && cs.ow == cs.w && w_lo < w_hi) {
      // Unit stride, width preserved ('same' padding): the valid output rows
      // are the input plane shifted by (ri dil - pad) rows and (si dil - pad)
      // columns, so one long copy does them all; only the columns the shift
      // wrapped around the row ends are then zeroed.
      index_t y_lo, y_hi;
      valid_output_range(cs.h, cs.oh, 1, cs.pad_h, ri * cs.dil_h, &y_lo, &y_hi);
      const index_t begin = y_lo * cs.ow + w_lo;
      const index_t end = y_hi > y_lo ? (y_hi - 1) * cs.ow + w_hi : begin;
      const float* src = plane + (y_lo - cs.pad_h + ri * cs.dil_h) * cs.w + iw0;
      for (index_t i = 0; i < begin; ++i) dst[i] = 0.0f;
      for (index_t i = begin; i < end; ++i) dst[i] = src[i - begin];
      for (index_t i = end; i < pixels; ++i) dst[i] = 0.0f;
      for (index_t oy = y_lo; oy < y_hi; ++oy) {
        float* out = dst + oy * cs.ow;
        for (index_t ox = 0; ox < w_lo; ++ox) out[ox] = 0.0f;
        for (index_t ox = w_hi; ox < cs.ow; ++ox) out[ox] = 0.0f;
      }
      return;
    }
    for (index_t oy = 0; oy < cs.oh; ++oy, dst += cs.ow) {
      const index_t iy = oy * cs.stride_h - cs.pad_h + ri * cs.dil_h;
      if (iy < 0 || iy >= cs.h || w_lo == w_hi) {
        for (index_t ox = 0; ox < cs.ow; ++ox) dst[ox] = 0.0f;
        continue;
      }
      const float* src = plane + iy * cs.w + iw0;
      // Inline loops rather than memcpy / fill: rows are often 7-28 floats,
      // where a library call costs more than the copy.
      for (index_t ox = 0; ox < w_lo; ++ox) dst[ox] = 0.0f;
      if (cs.stride_w == 1) {
        for (index_t ox = w_lo; ox < w_hi; ++ox) dst[ox] = src[ox - w_lo];
      } else {
        for (index_t ox = w_lo; ox < w_hi; ++ox) dst[ox] = src[(ox - w_lo) * cs.stride_w];
      }
      for (index_t ox = w_hi; ox < cs.ow; ++ox) dst[ox] = 0.0f;
    }
  });
}

// The adjoint of im2col: every column entry is added back to the input pixel
// it was copied from. Channels are independent; within a channel the taps are
// added in a fixed order, so the result does not depend on threads.
void col2im(const ConvShape& cs, const float* cols, index_t ld, float* dx) {
  const index_t taps = cs.r * cs.s;
  parallel_for(cs.c_per_group(), 1, [&](index_t ci) {
    float* plane = dx + ci * cs.h * cs.w;
    for (index_t tap = 0; tap < taps; ++tap) {
      const index_t ri = tap / cs.s, si = tap % cs.s;
      const float* src = cols + (ci * taps + tap) * ld;
      index_t w_lo, w_hi;
      valid_output_range(cs.w, cs.ow, cs.stride_w, cs.pad_w, si * cs.dil_w, &w_lo, &w_hi);
      const index_t iw0 = w_lo * cs.stride_w - cs.pad_w + si * cs.dil_w;
      for (index_t oy = 0; oy < cs.oh; ++oy, src += cs.ow) {
        const index_t iy = oy * cs.stride_h - cs.pad_h + ri * cs.dil_h;
        if (iy < 0 || iy >= cs.h) continue;
        float* out = plane + iy * cs.w + iw0;
        if (cs.stride_w == 1) {
          for (index_t ox = w_lo; ox < w_hi; ++ox) out[ox - w_lo] += src[ox];
        } else {
          for (index_t ox = w_lo; ox < w_hi; ++ox) out[(ox - w_lo) * cs.stride_w] += src[ox];
        }
      }
    }
  });
}

}  // namespace cpu
}  // namespace fastcnn
