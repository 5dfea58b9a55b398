// col2im over whole batches (im2col itself is computed in the GEMM's tile
// loads). Row (c, ri, si) of the column matrix holds channel c shifted by tap
// (ri, si); column (image, oy, ox). col2im gathers (each input pixel adds up
// the entries copied from it, taps in order) instead of scattering with
// atomics: deterministic, and the same summation order as the CPU's col2im.
#include "fastcnn/cuda_launch.h"
#include "fastcnn/kernel_math.h"

namespace fastcnn {
namespace cuda {
namespace {

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

}  // namespace

void col2im(const Exec& ex, const ConvShape& cs, const float* cols, float* dx) {
  // cols: (c r s, n oh ow) -> dx: (n, c, h, w)
  for_each_in_rows(ex, "col2im", cs.n * cs.c, cs.h * cs.w, Col2imRows{cs, cols, dx});
}

}  // namespace cuda
}  // namespace fastcnn
