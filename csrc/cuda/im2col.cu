// im2col / col2im over whole batches, and the (n, c, p) -> (c, n p)
// permutation the weight gradient needs. Row (c, ri, si) of the column
// matrix holds channel c shifted by tap (ri, si); column (image, oy, ox).
// col2im gathers (each input pixel adds up the entries copied from it, taps
// in order) instead of scattering with atomics: deterministic, and the same
// summation order as the CPU's col2im.
#include "fastcnn/cuda_launch.h"
#include "fastcnn/kernel_math.h"

namespace fastcnn {
namespace cuda {
namespace {

struct Im2colRow {
  const float* plane;  // input channel c of the image
  float* dst;          // cols row (c, ri, si), the image's columns
  index_t ri, si;
};

// Block row = (c * r * s + tap) * n + image; j = output pixel.
struct Im2colRows {
  ConvShape cs;
  const float* x;
  float* cols;

  FASTCNN_HD Im2colRow row(index_t block_row) const {
    index_t img, tap, si;
    const index_t row = div_rem(block_row, cs.n, &img);
    const index_t c = div_rem(row, cs.r * cs.s, &tap);
    const index_t ri = div_rem(tap, cs.s, &si);
    const index_t pixels = cs.out_pixels();
    return Im2colRow{x + (img * cs.c + c) * cs.h * cs.w, cols + row * cs.n * pixels + img * pixels,
                     ri, si};
  }
  FASTCNN_HD void operator()(const Im2colRow& r, index_t pix) const {
    index_t ox;
    const index_t oy = div_rem(pix, cs.ow, &ox);
    const index_t iy = conv_input_coord(oy, r.ri, cs.stride_h, cs.pad_h, cs.dil_h);
    const index_t ix = conv_input_coord(ox, r.si, cs.stride_w, cs.pad_w, cs.dil_w);
    r.dst[pix] = iy >= 0 && iy < cs.h && ix >= 0 && ix < cs.w ? r.plane[iy * cs.w + ix] : 0.0f;
  }
};

struct Col2imRow {
  const float* src;  // cols row (c, 0, 0), the image's columns
  float* dst;        // dx plane (image, c)
};

// Block row = image * c + c; j = input pixel.
struct Col2imRows {
  ConvShape cs;
  const float* cols;
  float* dx;

  FASTCNN_HD Col2imRow row(index_t plane) const {
    index_t c;
    const index_t img = div_rem(plane, cs.c, &c);
    const index_t pixels = cs.out_pixels();
    return Col2imRow{cols + c * cs.r * cs.s * cs.n * pixels + img * pixels,
                     dx + plane * cs.h * cs.w};
  }
  FASTCNN_HD void operator()(const Col2imRow& r, index_t pix) const {
    index_t ix;
    const index_t iy = div_rem(pix, cs.w, &ix);
    const index_t row_stride = cs.n * cs.out_pixels();  // between taps
    float sum = 0.0f;
    for (index_t ri = 0; ri < cs.r; ++ri) {
      index_t oy;
      if (!conv_output_coord(iy, ri, cs.stride_h, cs.pad_h, cs.dil_h, cs.oh, &oy)) continue;
      for (index_t si = 0; si < cs.s; ++si) {
        index_t ox;
        if (!conv_output_coord(ix, si, cs.stride_w, cs.pad_w, cs.dil_w, cs.ow, &ox)) continue;
        sum += r.src[(ri * cs.s + si) * row_stride + oy * cs.ow + ox];
      }
    }
    r.dst[pix] = sum;
  }
};

struct PermuteRow {
  const float* src;
  float* dst;
};

// Block row = channel * n + image; j = position in the p values.
struct NchwToCnhwRows {
  index_t n, c, p;
  const float* x;
  float* y;

  FASTCNN_HD PermuteRow row(index_t block_row) const {
    index_t img;
    const index_t ch = div_rem(block_row, n, &img);
    return PermuteRow{x + (img * c + ch) * p, y + block_row * p};
  }
  FASTCNN_HD void operator()(const PermuteRow& r, index_t j) const { r.dst[j] = r.src[j]; }
};

}  // namespace

void im2col(const Exec& ex, const ConvShape& cs, const float* x, float* cols) {
  // x: (n, c, h, w) -> cols: (c r s, n oh ow)
  for_each_in_rows(ex, "im2col", cs.c * cs.r * cs.s * cs.n, cs.out_pixels(),
                   Im2colRows{cs, x, cols});
}

void col2im(const Exec& ex, const ConvShape& cs, const float* cols, float* dx) {
  // cols: (c r s, n oh ow) -> dx: (n, c, h, w)
  for_each_in_rows(ex, "col2im", cs.n * cs.c, cs.h * cs.w, Col2imRows{cs, cols, dx});
}

void nchw_to_cnhw(const Exec& ex, index_t n, index_t c, index_t p, const float* x, float* y) {
  // x: (n, c, p) -> y: (c, n p)
  for_each_in_rows(ex, "nchw_to_cnhw", c * n, p, NchwToCnhwRows{n, c, p, x, y});
}

}  // namespace cuda
}  // namespace fastcnn
