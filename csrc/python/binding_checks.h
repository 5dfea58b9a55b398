// Argument checks shared by the bindings of both devices (cpu_module.cpp,
// cuda_module.cpp): the facts memory safety depends on, re-checked after the
// Python layer's validation. A view type provides ndim(), dim(i) and
// shape_string(); `fail` throws the module's ValueError and does not return.
#pragma once

#include <string>

#include "fastcnn/conv_geometry.h"

namespace fastcnn {
namespace bindings {

template <class View, class Fail>
void expect_ndim(const View& v, int ndim, const char* name, Fail fail) {
  if (v.ndim() != ndim)
    fail(std::string(name) + " must be " + std::to_string(ndim) + "-D, got shape " +
         v.shape_string());
}

template <class ViewA, class ViewB, class Fail>
void expect_same_shape(const ViewA& a, const ViewB& b, const char* na, const char* nb,
                       Fail fail) {
  bool same = a.ndim() == b.ndim();
  for (int i = 0; same && i < a.ndim(); ++i) same = a.dim(i) == b.dim(i);
  if (!same)
    fail(std::string(na) + " has shape " + a.shape_string() + " but " + nb + " has shape " +
         b.shape_string());
}

// x: (n, c, h, w), w: (k, c/groups, r, s), y: (n, k, oh, ow)
template <class View, class Fail>
ConvShape conv_shape(const View& x, const View& w, const View& y, index_t sh, index_t sw,
                     index_t ph, index_t pw, index_t dh, index_t dw, index_t groups, Fail fail) {
  expect_ndim(x, 4, "input", fail);
  expect_ndim(w, 4, "weight", fail);
  expect_ndim(y, 4, "output", fail);
  ConvShape cs{};
  cs.n = x.dim(0), cs.c = x.dim(1), cs.h = x.dim(2), cs.w = x.dim(3);
  cs.k = w.dim(0), cs.r = w.dim(2), cs.s = w.dim(3);
  cs.stride_h = sh, cs.stride_w = sw, cs.pad_h = ph, cs.pad_w = pw;
  cs.dil_h = dh, cs.dil_w = dw, cs.groups = groups;
  if (sh < 1 || sw < 1 || dh < 1 || dw < 1 || ph < 0 || pw < 0 || groups < 1)
    fail("stride and dilation must be >= 1, padding >= 0, groups >= 1");
  if (cs.c % groups != 0 || cs.k % groups != 0 || w.dim(1) * groups != cs.c)
    fail("weight " + w.shape_string() + " does not match input " + x.shape_string() +
         " with groups=" + std::to_string(groups));
  cs.oh = conv_out_size(cs.h, cs.r, sh, ph, dh);
  cs.ow = conv_out_size(cs.w, cs.s, sw, pw, dw);
  if (cs.oh < 1 || cs.ow < 1) fail("kernel larger than the padded input");
  if (y.dim(0) != cs.n || y.dim(1) != cs.k || y.dim(2) != cs.oh || y.dim(3) != cs.ow)
    fail("output has shape " + y.shape_string() + ", expected (" + std::to_string(cs.n) + ", " +
         std::to_string(cs.k) + ", " + std::to_string(cs.oh) + ", " + std::to_string(cs.ow) + ")");
  return cs;
}

// x: (n, c, h, w) -> y: (n, c, oh, ow)
template <class View, class Fail>
PoolShape pool_shape(const View& x, const View& y, index_t kh, index_t kw, index_t sh,
                     index_t sw, index_t ph, index_t pw, index_t dh, index_t dw, Fail fail) {
  expect_ndim(x, 4, "input", fail);
  expect_ndim(y, 4, "output", fail);
  if (kh < 1 || kw < 1 || sh < 1 || sw < 1 || dh < 1 || dw < 1 || ph < 0 || pw < 0 ||
      2 * ph > kh || 2 * pw > kw)
    fail("invalid pooling parameters");
  PoolShape ps{x.dim(0), x.dim(1), x.dim(2), x.dim(3), kh, kw, sh, sw,
               ph,       pw,       dh,       dw,       y.dim(2), y.dim(3)};
  if (y.dim(0) != ps.n || y.dim(1) != ps.c) fail("output does not match input");
  // Every window must overlap the input (guaranteed by the output-size rule).
  if ((ps.oh - 1) * sh - ph >= ps.h || (ps.ow - 1) * sw - pw >= ps.w)
    fail("output " + y.shape_string() + " too large for input " + x.shape_string());
  return ps;
}

}  // namespace bindings
}  // namespace fastcnn
