// 2-D max pooling. Forward: a thread per output, the window scan of
// fastcnn/kernel_math.h (first maximum wins, NaN wins). Backward: a thread per
// input pixel gathers the gradients of the windows whose argmax it is, in
// output order: no atomics, and bitwise the CPU's sums (the CPU scatters in
// the same order). With `relu` both are those of max_pool2d(relu(x)) in the
// same launch (the ReLU of the maximum; the gradient only where x passes
// relu_grad's rule), as the CPU kernels.
#include <cstdint>

#include "fastcnn/cuda_launch.h"
#include "fastcnn/kernel_math.h"

namespace fastcnn {
namespace cuda {
namespace {

struct PoolForwardRow {
  const float* plane;
  float* y;
  std::int64_t* idx;
};

// Block row = plane (image, channel); j = output position.
struct PoolForwardRows {
  PoolShape ps;
  const float* x;
  float* y;               // null: indices only
  std::int64_t* indices;  // null: values only
  bool relu;              // y = max of relu(x) (relu_window_max); the indices stay those of x

  FASTCNN_HD PoolForwardRow row(index_t plane) const {
    const index_t out = plane * ps.oh * ps.ow;
    return PoolForwardRow{x + plane * ps.h * ps.w, y != nullptr ? y + out : nullptr,
                          indices != nullptr ? indices + out : nullptr};
  }
  FASTCNN_HD void operator()(const PoolForwardRow& r, index_t o) const {
    index_t ox;
    const index_t oy = div_rem(o, ps.ow, &ox);
    float value;
    const index_t at = pool_argmax(ps, r.plane, oy, ox, &value);
    if (r.y != nullptr) r.y[o] = relu ? relu_window_max(value, at) : value;
    if (r.idx != nullptr) r.idx[o] = at;
  }
};

struct PoolBackwardRow {
  const float* dy;
  const std::int64_t* idx;
  const float* x;
  float* dx;
};

// Block row = plane; j = input pixel iy * w + ix.
struct PoolBackwardRows {
  PoolShape ps;
  const float* dy;
  const std::int64_t* indices;
  const float* x;  // read only with `relu`
  bool relu;       // the gradient of max_pool2d(relu(x)) w.r.t. x
  float* dx;

  FASTCNN_HD PoolBackwardRow row(index_t plane) const {
    const index_t out = plane * ps.oh * ps.ow, in = plane * ps.h * ps.w;
    return PoolBackwardRow{dy + out, indices + out, x + in, dx + in};
  }
  FASTCNN_HD void operator()(const PoolBackwardRow& r, index_t pix) const {
    index_t ix;
    const index_t iy = div_rem(pix, ps.w, &ix);
    index_t y_lo, y_hi, x_lo, x_hi;
    windows_containing(iy, ps.kh, ps.stride_h, ps.pad_h, ps.dil_h, ps.oh, &y_lo, &y_hi);
    windows_containing(ix, ps.kw, ps.stride_w, ps.pad_w, ps.dil_w, ps.ow, &x_lo, &x_hi);
    // A window's argmax is one of its taps, so only these windows can name
    // this pixel (with dilation some of them skip it; their index differs).
    float sum = 0.0f;
    for (index_t oy = y_lo; oy < y_hi; ++oy)
      for (index_t ox = x_lo; ox < x_hi; ++ox) {
        const index_t o = oy * ps.ow + ox;
        if (r.idx[o] == pix) sum += r.dy[o];
      }
    r.dx[pix] = relu ? relu_grad(sum, r.x[pix], false) : sum;
  }
};

}  // namespace

void max_pool2d_forward(const Exec& ex, const PoolShape& ps, const float* x, float* y,
                        std::int64_t* indices, bool relu) {
  // x: (n, c, h, w) -> y, indices: (n, c, oh, ow)
  for_each_in_rows(ex, "max_pool2d_forward", ps.n * ps.c, ps.oh * ps.ow,
                   PoolForwardRows{ps, x, y, indices, relu});
}

void max_pool2d_backward(const Exec& ex, const PoolShape& ps, const float* dy, const float* x,
                         const std::int64_t* indices, bool relu, float* dx) {
  // dy: (n, c, oh, ow) -> dx: (n, c, h, w); argmaxes from `indices`, else recomputed from x
  Workspace argmax(ex, indices == nullptr
                           ? static_cast<size_t>(ps.n * ps.c * ps.oh * ps.ow) * sizeof(std::int64_t)
                           : 0);
  if (indices == nullptr) {
    max_pool2d_forward(ex, ps, x, nullptr, argmax.as<std::int64_t>(), false);
    indices = argmax.as<std::int64_t>();
  }
  for_each_in_rows(ex, "max_pool2d_backward", ps.n * ps.c, ps.h * ps.w,
                   PoolBackwardRows{ps, dy, indices, x, relu, dx});
}

}  // namespace cuda
}  // namespace fastcnn
