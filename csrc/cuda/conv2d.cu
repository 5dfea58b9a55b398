// conv2d forward and backward on our GEMM, batched over groups, with the
// images of a chunk side by side along the GEMM's n:
//   forward  y[:, g] (k/g, images oh ow) = w[g] (k/g, c/g r s) @ im2col(x)[g]
//            im2col is implicit (computed in the GEMM's tile loads), the
//            bias (and a following ReLU) applied in its epilogue, the output
//            written straight to NCHW.
//   dx       stride 1: dx is the convolution of dy with the flipped, transposed
//            weights (padding dil (r - 1) - pad): the forward's implicit GEMM,
//            its A operand w read backwards in place. Other strides:
//            dcols[g] (c/g r s, images oh ow) = w[g]^T @ dy[:, g], then col2im
//            (a gather per input pixel, no atomics). A pointwise convolution
//            writes dx directly.
//   dw       dw[g] (k/g, c/g r s) = dy[:, g] (k/g, images oh ow) @ im2col(x)[g]^T,
//            dy read in place (k running over images and pixels: a k-segmented
//            operand), im2col(x)^T implicit in the tile loads (x itself for a
//            pointwise convolution); summed over chunks in order
//            (deterministic), split-k inside.
//   db       per-channel sums in double, fixed order (channel_sums.h).
#include <algorithm>

#include "channel_sums.h"
#include "fastcnn/cuda_launch.h"
#include "fastcnn/kernel_math.h"

namespace fastcnn {
namespace cuda {
namespace {

struct Fill {
  float* p;
  float value;
  FASTCNN_HD void operator()(index_t i) const { p[i] = value; }
};

// Images per chunk when each image needs `bytes_per_image` of scratch.
index_t images_per_chunk(const Exec& ex, index_t n, index_t pixels, index_t bytes_per_image) {
  index_t chunk = static_cast<index_t>(workspace_budget(ex)) / std::max<index_t>(bytes_per_image, 1);
  chunk = std::min(chunk, (index_t{1} << 31) / std::max<index_t>(pixels, 1) - 1);  // GEMM n in int range
  return std::max<index_t>(1, std::min(chunk, n));
}

}  // namespace

void conv2d_forward(const Exec& ex, const ConvShape& cs, const float* x, const float* w,
                    const float* bias, float* y, bool relu) {
  // x: (n, c, h, w), w: (k, c/g, r, s), bias: (k,) or null -> y: (n, k, oh, ow)
  const index_t kg = cs.k_per_group(), cg = cs.c_per_group(), rows = cs.col_rows();
  const index_t pixels = cs.out_pixels(), x_image = cs.c * cs.h * cs.w;
  // No scratch (im2col is implicit); chunks only bound the GEMM's n.
  const index_t chunk = images_per_chunk(ex, cs.n, pixels, cs.c * cs.r * cs.s * pixels * 4);
  for (index_t i0 = 0; i0 < cs.n; i0 += chunk) {
    ConvShape part = cs;
    part.n = std::min(chunk, cs.n - i0);
    const float* xs = x + i0 * x_image;
    GemmProblem p;
    p.m = kg;
    p.n = part.n * pixels;
    p.k = rows;
    p.batch = cs.groups;
    p.a = make_operand(w, rows, 1, kg * rows);
    p.c = make_output(y + i0 * cs.k * pixels, pixels, kg * pixels, pixels, cs.k * pixels);
    p.bias = bias;
    p.bias_batch_stride = kg;
    p.bias_per_row = true;
    p.relu = relu;
    if (cs.is_pointwise()) {
      // B (channel, image pixel) = x itself: no im2col at all.
      p.b = make_operand(xs, 1, pixels, cg * pixels, pixels, cs.c * pixels);
    } else {
      p.implicit_conv = &part;
      p.conv_input = xs;
    }
    gemm(ex, p);
  }
}

void conv2d_backward(const Exec& ex, const ConvShape& cs, const float* dy, const float* x,
                     const float* w, float* dx, float* dw, float* db) {
  // dy: (n, k, oh, ow), x: (n, c, h, w), w: (k, c/g, r, s); dx, dw, db may be null
  const index_t kg = cs.k_per_group(), cg = cs.c_per_group(), rows = cs.col_rows();
  const index_t pixels = cs.out_pixels(), x_image = cs.c * cs.h * cs.w;
  const index_t all_rows = cs.c * cs.r * cs.s;  // groups * rows
  if (db != nullptr)
    channel_sum(ex, "conv2d_bias_grad", cs.n, cs.k, pixels, dy, db);
  if (dx == nullptr && dw == nullptr) return;
  if (cs.n == 0) {
    if (dw != nullptr) for_each(ex, "fill", cs.k * rows, Fill{dw, 0.0f});
    return;
  }
  const bool pointwise = cs.is_pointwise();
  const bool transposed_conv = !pointwise && cs.stride_h == 1 && cs.stride_w == 1;
  const bool need_cols = dx != nullptr && !pointwise && !transposed_conv;  // for col2im
  const index_t chunk =
      images_per_chunk(ex, cs.n, pixels, (need_cols ? all_rows : 0) * pixels * 4);
  Workspace cols_ws(ex, need_cols ? static_cast<size_t>(all_rows * chunk * pixels) * 4 : 0);
  float* cols = cols_ws.as<float>();

  for (index_t i0 = 0; i0 < cs.n; i0 += chunk) {
    ConvShape part = cs;
    part.n = std::min(chunk, cs.n - i0);
    const index_t span = part.n * pixels;  // GEMM columns: the chunk's images side by side
    const float* xs = x + i0 * x_image;
    const float* dys = dy + i0 * cs.k * pixels;
    if (dx != nullptr && transposed_conv) {
      // dx[i, g cg + c, y, x] = sum over (kch, tap) of dy[i, g kg + kch] at the
      // flipped tap times w[g kg + kch, c, flipped tap]: a stride-1 convolution
      // of dy, whose input channels are the layer's outputs.
      ConvShape t = part;
      t.c = cs.k;
      t.h = cs.oh;
      t.w = cs.ow;
      t.k = cs.c;
      t.pad_h = cs.dil_h * (cs.r - 1) - cs.pad_h;
      t.pad_w = cs.dil_w * (cs.s - 1) - cs.pad_w;
      t.oh = cs.h;
      t.ow = cs.w;
      const index_t taps = cs.r * cs.s, plane = cs.h * cs.w;
      GemmProblem p;
      p.m = cg;
      p.n = part.n * plane;
      p.k = kg * taps;  // (kch, flipped tap)
      p.batch = cs.groups;
      // A(c, (kch, t)) = w[g kg + kch, c, taps - 1 - t]: taps read backwards
      p.a = make_operand(w + (taps - 1), taps, -1, kg * cg * taps);
      p.a.k_seg = taps;
      p.a.k_seg_stride = cg * taps;
      p.implicit_conv = &t;
      p.conv_input = dys;
      p.c = make_output(dx + i0 * x_image, plane, cg * plane, plane, cs.c * plane);
      gemm(ex, p);
    } else if (dx != nullptr) {
      float* dxs = dx + i0 * x_image;
      GemmProblem p;
      p.m = rows;
      p.n = span;
      p.k = kg;
      p.batch = cs.groups;
      p.a = make_operand(w, 1, rows, kg * rows);                                  // w[g]^T
      p.b = make_operand(dys, 1, pixels, kg * pixels, pixels, cs.k * pixels);     // dy[:, g]
      if (pointwise) {
        p.c = make_output(dxs, pixels, cg * pixels, pixels, cs.c * pixels);
        gemm(ex, p);
      } else {
        p.c = make_output(cols, span, rows * span);
        gemm(ex, p);
        col2im(ex, part, cols, dxs);
      }
    }
    if (dw != nullptr) {
      GemmProblem p;
      p.m = kg;
      p.n = rows;
      p.k = span;  // (image, pixel): image segments of `pixels` columns
      p.batch = cs.groups;
      p.a = make_operand(dys, pixels, 1, kg * pixels);  // dy[image, g kg + o, pixel]
      p.a.k_seg = pixels;
      p.a.k_seg_stride = cs.k * pixels;
      if (pointwise) {
        p.b = make_operand(xs, pixels, 1, cg * pixels);  // x[image, g cg + ci, pixel]
        p.b.k_seg = pixels;
        p.b.k_seg_stride = cs.c * pixels;
      } else {
        p.implicit_conv = &part;
        p.implicit_transposed = true;
        p.conv_input = xs;
      }
      p.c = make_output(dw, rows, kg * rows);
      p.beta = i0 == 0 ? 0.0f : 1.0f;  // chunks add up in order
      gemm(ex, p);
    }
  }
}

}  // namespace cuda
}  // namespace fastcnn
