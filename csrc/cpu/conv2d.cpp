// conv2d forward and backward as im2col + GEMM, one image and one group at a
// time:  y[n, g] (k/g, oh ow) = w[g] (k/g, c/g r s) @ cols[n, g] (c/g r s, oh ow).
#include <algorithm>
#include <vector>

#include "fastcnn/cpu_kernels.h"
#include "fastcnn/gemm.h"
#include "fastcnn/parallel.h"
#include "fastcnn/reduce.h"
#include "fastcnn/scratch.h"

namespace fastcnn {
namespace cpu {
namespace {

// The weight gradient is a sum over the batch. The batch is cut into a fixed
// number of slices (independent of the thread count), each summed into its
// own buffer in image order, and the slices are added in order: bitwise the
// same result on 1 thread or 64.
constexpr index_t kWeightGradSlices = 8;

// Column matrix of image n, group g: x itself for a pointwise convolution,
// else im2col into the calling thread's scratch.
const float* columns(const ConvShape& cs, const float* x_group) {
  if (cs.is_pointwise()) return x_group;
  float* cols = thread_scratch(ScratchSlot::Cols, cs.col_rows() * cs.out_pixels());
  im2col(cs, x_group, cols);
  return cols;
}

}  // namespace

void conv2d_forward(const ConvShape& cs, const float* x, const float* w, const float* bias,
                    float* y) {
  // x: (n, c, h, w), w: (k, c/g, r, s), bias: (k,) or null, y: (n, k, oh, ow)
  const index_t kg = cs.k_per_group(), rows = cs.col_rows(), pixels = cs.out_pixels();
  const index_t x_image = cs.c * cs.h * cs.w, y_image = cs.k * pixels;
  // Whole images per thread when the batch fills the threads; otherwise one
  // image at a time with the threads inside im2col and the GEMM.
  parallel_for(cs.n, 1, [&](index_t img) {
    for (index_t g = 0; g < cs.groups; ++g) {
      const float* cols = columns(cs, x + img * x_image + g * cs.c_per_group() * cs.h * cs.w);
      float* out = y + img * y_image + g * kg * pixels;
      if (bias != nullptr) {
        for (index_t ko = 0; ko < kg; ++ko)
          std::fill(out + ko * pixels, out + (ko + 1) * pixels, bias[g * kg + ko]);
      }
      sgemm(Trans::No, Trans::No, kg, pixels, rows, 1.0f, w + g * kg * rows, rows, cols,
            pixels, bias != nullptr ? 1.0f : 0.0f, out, pixels);
    }
  });
}

void conv2d_backward(const ConvShape& cs, const float* dy, const float* x, const float* w,
                     float* dx, float* dw, float* db) {
  // dy: (n, k, oh, ow), x: (n, c, h, w), w: (k, c/g, r, s)
  const index_t kg = cs.k_per_group(), cg = cs.c_per_group(), rows = cs.col_rows();
  const index_t pixels = cs.out_pixels(), plane = cs.h * cs.w;
  const index_t x_image = cs.c * plane, y_image = cs.k * pixels, w_size = cs.k * rows;

  if (db != nullptr) {
    parallel_for(cs.k, 1, [&](index_t ko) {
      double sum = 0.0;
      for (index_t img = 0; img < cs.n; ++img) {
        const float* g = dy + img * y_image + ko * pixels;
        sum += lane_sum(pixels, [&](index_t p) { return g[p]; });
      }
      db[ko] = static_cast<float>(sum);
    });
  }
  if (cs.n == 0 && dw != nullptr) std::fill(dw, dw + w_size, 0.0f);
  if ((dx == nullptr && dw == nullptr) || cs.n == 0) return;

  const index_t slices = std::min(cs.n, kWeightGradSlices);
  std::vector<float> partial(dw != nullptr ? static_cast<size_t>((slices - 1) * w_size) : 0);
  parallel_for(slices, 1, [&](index_t slice) {
    // Slice 0 accumulates straight into dw; the others into their own buffer.
    float* dw_slice = dw == nullptr ? nullptr
                      : slice == 0  ? dw
                                    : partial.data() + (slice - 1) * w_size;
    const index_t first = cs.n * slice / slices, last = cs.n * (slice + 1) / slices;
    for (index_t img = first; img < last; ++img) {
      for (index_t g = 0; g < cs.groups; ++g) {
        const float* dy_g = dy + img * y_image + g * kg * pixels;
        if (dw_slice != nullptr) {
          const float* cols = columns(cs, x + img * x_image + g * cg * plane);
          // dw[g] (+)= dy[n, g] (k/g, oh ow) @ cols^T (oh ow, c/g r s)
          sgemm(Trans::No, Trans::Yes, kg, rows, pixels, 1.0f, dy_g, pixels, cols, pixels,
                img == first ? 0.0f : 1.0f, dw_slice + g * kg * rows, rows);
        }
        if (dx != nullptr) {
          float* dx_g = dx + img * x_image + g * cg * plane;
          // dcols (c/g r s, oh ow) = w[g]^T (c/g r s, k/g) @ dy[n, g] (k/g, oh ow)
          if (cs.is_pointwise()) {
            sgemm(Trans::Yes, Trans::No, rows, pixels, kg, 1.0f, w + g * kg * rows, rows, dy_g,
                  pixels, 0.0f, dx_g, pixels);
          } else {
            float* dcols = thread_scratch(ScratchSlot::ColsGrad, rows * pixels);
            sgemm(Trans::Yes, Trans::No, rows, pixels, kg, 1.0f, w + g * kg * rows, rows, dy_g,
                  pixels, 0.0f, dcols, pixels);
            std::fill(dx_g, dx_g + cg * plane, 0.0f);
            col2im(cs, dcols, dx_g);
          }
        }
      }
    }
  });
  if (dw != nullptr && slices > 1) {
    parallel_for(w_size, 4096, [&](index_t i) {
      float sum = dw[i];
      for (index_t s = 1; s < slices; ++s) sum += partial[(s - 1) * w_size + i];
      dw[i] = sum;
    });
  }
}

}  // namespace cpu
}  // namespace fastcnn
