// 2-D max pooling. The window of output (oy, ox) covers input rows
// oy * stride - pad + i * dil (i < kh), likewise for columns; positions in
// the padding are never selected. The first maximum in row-major window
// order wins; a NaN wins over any number (PyTorch's rule).
#include <algorithm>
#include <cmath>
#include <limits>

#include "fastcnn/cpu_kernels.h"
#include "fastcnn/parallel.h"

namespace fastcnn {
namespace cpu {
namespace {

// Flat index (iy * w + ix) of the maximum of window (oy, ox) of one plane.
inline std::int64_t window_argmax(const PoolShape& ps, const float* plane, index_t oy,
                                  index_t ox, float* best_value) {
  const index_t y0 = oy * ps.stride_h - ps.pad_h, x0 = ox * ps.stride_w - ps.pad_w;
  float best = -std::numeric_limits<float>::infinity();
  std::int64_t best_idx = -1;
  for (index_t i = 0; i < ps.kh; ++i) {
    const index_t iy = y0 + i * ps.dil_h;
    if (iy < 0 || iy >= ps.h) continue;
    for (index_t j = 0; j < ps.kw; ++j) {
      const index_t ix = x0 + j * ps.dil_w;
      if (ix < 0 || ix >= ps.w) continue;
      const float v = plane[iy * ps.w + ix];
      // The first valid position starts the search even if it is -inf.
      if (best_idx < 0 || v > best || std::isnan(v)) {
        best = v;
        best_idx = iy * ps.w + ix;
      }
    }
  }
  *best_value = best;
  return best_idx;
}

}  // namespace

void max_pool2d_forward(const PoolShape& ps, const float* x, float* y, std::int64_t* indices) {
  // x: (n, c, h, w) -> y, indices: (n, c, oh, ow)
  const index_t in_plane = ps.h * ps.w, out_plane = ps.oh * ps.ow;
  parallel_for(ps.n * ps.c, std::max<index_t>(1, 4096 / std::max<index_t>(out_plane, 1)),
               [&](index_t pl) {
    const float* plane = x + pl * in_plane;
    float* out = y + pl * out_plane;
    std::int64_t* idx = indices != nullptr ? indices + pl * out_plane : nullptr;
    for (index_t oy = 0; oy < ps.oh; ++oy) {
      for (index_t ox = 0; ox < ps.ow; ++ox) {
        float v;
        const std::int64_t a = window_argmax(ps, plane, oy, ox, &v);
        out[oy * ps.ow + ox] = v;
        if (idx != nullptr) idx[oy * ps.ow + ox] = a;
      }
    }
  });
}

void max_pool2d_backward(const PoolShape& ps, const float* dy, const float* x,
                         const std::int64_t* indices, float* dx) {
  // dy: (n, c, oh, ow) -> dx: (n, c, h, w); overlapping windows add up, in
  // output order within a plane.
  const index_t in_plane = ps.h * ps.w, out_plane = ps.oh * ps.ow;
  parallel_for(ps.n * ps.c, std::max<index_t>(1, 4096 / std::max<index_t>(out_plane, 1)),
               [&](index_t pl) {
    float* grad = dx + pl * in_plane;
    std::fill(grad, grad + in_plane, 0.0f);
    const float* g = dy + pl * out_plane;
    if (indices != nullptr) {
      const std::int64_t* idx = indices + pl * out_plane;
      for (index_t o = 0; o < out_plane; ++o)
        if (idx[o] >= 0 && idx[o] < in_plane) grad[idx[o]] += g[o];
      return;
    }
    const float* plane = x + pl * in_plane;
    for (index_t oy = 0; oy < ps.oh; ++oy) {
      for (index_t ox = 0; ox < ps.ow; ++ox) {
        float v;
        const std::int64_t a = window_argmax(ps, plane, oy, ox, &v);
        if (a >= 0) grad[a] += g[oy * ps.ow + ox];
      }
    }
  });
}

}  // namespace cpu
}  // namespace fastcnn
