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
    for (index_t oy = 0; oy < cs.oh; ++oy, dst += cs.ow) {
      const index_t iy = oy * cs.stride_h - cs.pad_h + ri * cs.dil_h;
      if (iy < 0 || iy >= cs.h || w_lo == w_hi) {
        std::fill(dst, dst + cs.ow, 0.0f);
        continue;
      }
      const float* src = plane + iy * cs.w + iw0;
      std::fill(dst, dst + w_lo, 0.0f);
      if (cs.stride_w == 1) {
        std::memcpy(dst + w_lo, src, sizeof(float) * static_cast<size_t>(w_hi - w_lo));
      } else {
        for (index_t ox = w_lo; ox < w_hi; ++ox) dst[ox] = src[(ox - w_lo) * cs.stride_w];
      }
      std::fill(dst + w_hi, dst + cs.ow, 0.0f);
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
