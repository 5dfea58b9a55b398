// fastcnn._cpu: thin pybind11 bindings of the CPU kernels.
//
// The Python layer (fastcnn/_backend.py, fastcnn/functional.py) validates
// arguments, converts inputs and allocates outputs. These bindings only
// unpack buffers, re-check the facts that memory safety depends on (dtype,
// contiguity, element counts, consistent shapes), release the GIL and call
// the kernel: a wrong call raises ValueError here instead of corrupting
// memory.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "binding_checks.h"
#include "fastcnn/cpu_kernels.h"
#include "fastcnn/gemm.h"

namespace py = pybind11;
using fastcnn::index_t;

namespace {

std::string shape_of(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(a.shape(i));
  }
  return s + (a.ndim() == 1 ? ",)" : ")");
}

[[noreturn]] void fail(const std::string& msg) { throw py::value_error("fastcnn._cpu: " + msg); }

// A checked view of an argument: right dtype, C-contiguous, writable if it is an output.
template <typename T>
struct View {
  py::array arr;
  T* data = nullptr;

  View() = default;
  View(const py::object& obj, const char* name, bool writable) {
    if (!py::isinstance<py::array>(obj)) fail(std::string(name) + " must be a numpy array");
    arr = py::reinterpret_borrow<py::array>(obj);
    if (!py::dtype::of<T>().is(arr.dtype()))
      fail(std::string(name) + " has dtype " + std::string(py::str(arr.dtype())) + ", expected " +
           std::string(py::str(py::dtype::of<T>())));
    if (!(arr.flags() & py::array::c_style)) fail(std::string(name) + " must be C-contiguous");
    if (writable && !arr.writeable()) fail(std::string(name) + " must be writable");
    data = static_cast<T*>(writable ? arr.mutable_data() : const_cast<void*>(arr.data()));
  }
  index_t dim(int i) const { return static_cast<index_t>(arr.shape(i)); }
  index_t size() const { return static_cast<index_t>(arr.size()); }
  int ndim() const { return static_cast<int>(arr.ndim()); }
  std::string shape_string() const { return shape_of(arr); }
};

template <typename T>
View<T> in(const py::object& obj, const char* name) {
  return View<T>(obj, name, false);
}
template <typename T>
View<T> out(const py::object& obj, const char* name) {
  return View<T>(obj, name, true);
}
// An optional argument: null when None.
template <typename T>
T* opt(const py::object& obj, const char* name, bool writable, index_t expected) {
  if (obj.is_none()) return nullptr;
  View<T> v(obj, name, writable);
  if (v.size() != expected)
    fail(std::string(name) + " has shape " + shape_of(v.arr) + ", expected " +
         std::to_string(expected) + " elements");
  return v.data;
}

template <class T>
void expect_ndim(const View<T>& v, int ndim, const char* name) {
  fastcnn::bindings::expect_ndim(v, ndim, name, fail);
}

template <class T, class U>
void expect_same_shape(const View<T>& a, const View<U>& b, const char* na, const char* nb) {
  fastcnn::bindings::expect_same_shape(a, b, na, nb, fail);
}

// A batch norm's (n, c, l) view of x.
void expect_view(const View<float>& x, index_t n, index_t c, index_t l) {
  if (n < 0 || c < 1 || l < 0 || n * c * l != x.size())
    fail("batch_norm view does not match the input size");
}

template <class... Args>
fastcnn::ConvShape conv_shape(const Args&... args) {
  return fastcnn::bindings::conv_shape(args..., fail);
}

template <class... Args>
fastcnn::PoolShape pool_shape(const Args&... args) {
  return fastcnn::bindings::pool_shape(args..., fail);
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "fastcnn CPU kernels (C++17, OpenMP). Use fastcnn.functional, not this module.";

  m.def("set_num_threads", [](int n) {
    if (n < 1) throw py::value_error("set_num_threads: n must be >= 1, got " + std::to_string(n));
    fastcnn::set_num_threads(n);
  });
  m.def("get_num_threads", &fastcnn::num_threads);
  m.def("gemm_kernel", &fastcnn::sgemm_kernel_name);
  m.def("set_conv_winograd", &fastcnn::cpu::set_winograd_enabled, py::arg("enabled"));
  m.def("get_conv_winograd", &fastcnn::cpu::winograd_enabled);

  // c (m, n) = alpha op(a) op(b) + beta c for 2-D C-contiguous float32 arrays.
  m.def("sgemm", [](bool ta, bool tb, float alpha, py::object a_, py::object b_, float beta,
                    py::object c_) {
    auto a = in<float>(a_, "a"), b = in<float>(b_, "b");
    auto c = out<float>(c_, "c");
    expect_ndim(a, 2, "a");
    expect_ndim(b, 2, "b");
    expect_ndim(c, 2, "c");
    const index_t m = ta ? a.dim(1) : a.dim(0), k = ta ? a.dim(0) : a.dim(1);
    const index_t kb = tb ? b.dim(1) : b.dim(0), n = tb ? b.dim(0) : b.dim(1);
    if (k != kb || c.dim(0) != m || c.dim(1) != n)
      fail("sgemm shapes a " + shape_of(a.arr) + ", b " + shape_of(b.arr) + ", c " +
           shape_of(c.arr) + " do not agree");
    py::gil_scoped_release nogil;
    fastcnn::sgemm(static_cast<fastcnn::Trans>(ta), static_cast<fastcnn::Trans>(tb), m, n, k,
                   alpha, a.data, a.dim(1), b.data, b.dim(1), beta, c.data, n);
  });

  // relu: y = relu(conv), as fastcnn._cuda's (here a second pass)
  m.def("conv2d_forward", [](py::object x_, py::object w_, py::object b_, py::object y_,
                             index_t sh, index_t sw, index_t ph, index_t pw, index_t dh,
                             index_t dw, index_t groups, bool relu) {
    auto x = in<float>(x_, "input"), w = in<float>(w_, "weight");
    auto y = out<float>(y_, "output");
    const fastcnn::ConvShape cs = conv_shape(x, w, y, sh, sw, ph, pw, dh, dw, groups);
    const float* bias = opt<float>(b_, "bias", false, cs.k);
    py::gil_scoped_release nogil;
    fastcnn::cpu::conv2d_forward(cs, x.data, w.data, bias, y.data);
    if (relu) fastcnn::cpu::relu_forward(y.size(), y.data, y.data);
  }, py::arg("input"), py::arg("weight"), py::arg("bias"), py::arg("output"), py::arg("sh"),
     py::arg("sw"), py::arg("ph"), py::arg("pw"), py::arg("dh"), py::arg("dw"),
     py::arg("groups"), py::arg("relu") = false);

  m.def("conv2d_backward", [](py::object dy_, py::object x_, py::object w_, py::object dx_,
                              py::object dw_, py::object db_, index_t sh, index_t sw, index_t ph,
                              index_t pw, index_t dh, index_t dw, index_t groups) {
    auto dy = in<float>(dy_, "grad_output"), x = in<float>(x_, "input"),
         w = in<float>(w_, "weight");
    const fastcnn::ConvShape cs = conv_shape(x, w, dy, sh, sw, ph, pw, dh, dw, groups);
    float* dx = opt<float>(dx_, "grad_input", true, x.size());
    float* dwp = opt<float>(dw_, "grad_weight", true, w.size());
    float* db = opt<float>(db_, "grad_bias", true, cs.k);
    py::gil_scoped_release nogil;
    fastcnn::cpu::conv2d_backward(cs, dy.data, x.data, w.data, dx, dwp, db);
  });

  // The weight and bias gradients of a first-layer convolution followed by
  // ReLU and a 2x2 max-pool that kept window codes, from the pooled gradient
  // (fastcnn.nn.Sequential in training). False, computing nothing, where the
  // direct path does not take the layer.
  m.def("conv2d_grads_from_pool", [](py::object dp_, py::object codes_, py::object x_,
                                     py::object w_, py::object dw_, py::object db_, index_t sh,
                                     index_t sw, index_t ph, index_t pw, index_t dh, index_t dw,
                                     index_t groups) {
    auto dp = in<float>(dp_, "grad_output"), x = in<float>(x_, "input"),
         w = in<float>(w_, "weight");
    auto codes = in<std::uint8_t>(codes_, "codes");
    expect_same_shape(codes, dp, "codes", "grad_output");
    expect_ndim(x, 4, "input");
    expect_ndim(w, 4, "weight");
    expect_ndim(dp, 4, "grad_output");
    fastcnn::ConvShape cs{};
    cs.n = x.dim(0), cs.c = x.dim(1), cs.h = x.dim(2), cs.w = x.dim(3);
    cs.k = w.dim(0), cs.r = w.dim(2), cs.s = w.dim(3);
    cs.stride_h = sh, cs.stride_w = sw, cs.pad_h = ph, cs.pad_w = pw;
    cs.dil_h = dh, cs.dil_w = dw, cs.groups = groups;
    if (sh < 1 || sw < 1 || dh < 1 || dw < 1 || ph < 0 || pw < 0 || groups < 1 ||
        w.dim(1) * groups != cs.c || cs.k % groups != 0)
      fail("invalid convolution arguments");
    cs.oh = fastcnn::conv_out_size(cs.h, cs.r, sh, ph, dh);
    cs.ow = fastcnn::conv_out_size(cs.w, cs.s, sw, pw, dw);
    if (dp.dim(0) != cs.n || dp.dim(1) != cs.k || dp.dim(2) != cs.oh / 2 ||
        dp.dim(3) != cs.ow / 2)
      fail("grad_output " + dp.shape_string() + " is not the 2x2-pooled convolution output");
    float* dwp = opt<float>(dw_, "grad_weight", true, w.size());
    float* db = opt<float>(db_, "grad_bias", true, cs.k);
    if (!fastcnn::cpu::direct_conv_applies(cs) || cs.oh < 2 || cs.ow < 2) return false;
    py::gil_scoped_release nogil;
    fastcnn::cpu::direct_conv_grads_from_pool(cs, dp.data, codes.data, x.data, dwp, db);
    return true;
  });

  // relu: y = relu(x w^T + b), as fastcnn._cuda's (here a second pass)
  m.def("linear_forward", [](py::object x_, py::object w_, py::object b_, py::object y_,
                             bool relu) {
    auto x = in<float>(x_, "input"), w = in<float>(w_, "weight");
    auto y = out<float>(y_, "output");
    expect_ndim(x, 2, "input");
    expect_ndim(w, 2, "weight");
    expect_ndim(y, 2, "output");
    const index_t n = x.dim(0), fin = x.dim(1), fout = w.dim(0);
    if (w.dim(1) != fin || y.dim(0) != n || y.dim(1) != fout)
      fail("linear shapes input " + shape_of(x.arr) + ", weight " + shape_of(w.arr) +
           ", output " + shape_of(y.arr) + " do not agree");
    const float* bias = opt<float>(b_, "bias", false, fout);
    py::gil_scoped_release nogil;
    fastcnn::cpu::linear_forward(n, fin, fout, x.data, w.data, bias, y.data);
    if (relu) fastcnn::cpu::relu_forward(y.size(), y.data, y.data);
  }, py::arg("input"), py::arg("weight"), py::arg("bias"), py::arg("output"),
     py::arg("relu") = false);

  m.def("linear_backward", [](py::object dy_, py::object x_, py::object w_, py::object dx_,
                              py::object dw_, py::object db_) {
    auto dy = in<float>(dy_, "grad_output"), x = in<float>(x_, "input"),
         w = in<float>(w_, "weight");
    expect_ndim(x, 2, "input");
    expect_ndim(w, 2, "weight");
    expect_ndim(dy, 2, "grad_output");
    const index_t n = x.dim(0), fin = x.dim(1), fout = w.dim(0);
    if (w.dim(1) != fin || dy.dim(0) != n || dy.dim(1) != fout)
      fail("linear_backward shapes grad_output " + shape_of(dy.arr) + ", input " +
           shape_of(x.arr) + ", weight " + shape_of(w.arr) + " do not agree");
    float* dx = opt<float>(dx_, "grad_input", true, x.size());
    float* dw = opt<float>(dw_, "grad_weight", true, w.size());
    float* db = opt<float>(db_, "grad_bias", true, fout);
    py::gil_scoped_release nogil;
    fastcnn::cpu::linear_backward(n, fin, fout, dy.data, x.data, w.data, dx, dw, db);
  });

  m.def("relu_forward", [](py::object x_, py::object y_) {
    auto x = in<float>(x_, "input");
    auto y = out<float>(y_, "output");
    expect_same_shape(x, y, "input", "output");
    py::gil_scoped_release nogil;
    fastcnn::cpu::relu_forward(x.size(), x.data, y.data);
  });

  m.def("relu_backward", [](py::object dy_, py::object x_, bool guided, py::object dx_) {
    auto dy = in<float>(dy_, "grad_output"), x = in<float>(x_, "input");
    auto dx = out<float>(dx_, "grad_input");
    expect_same_shape(dy, x, "grad_output", "input");
    expect_same_shape(dx, x, "grad_input", "input");
    py::gil_scoped_release nogil;
    fastcnn::cpu::relu_backward(x.size(), dy.data, x.data, guided, dx.data);
  });

  // DeepLIFT's rules: every array (2 * count) values, the images' half first
  auto halves = [](const auto& a, const char* name) {
    if (a.size() % 2)
      throw py::value_error(std::string(name) + " must hold an even number of values (images, "
                            "then their references)");
    return a.size() / 2;
  };
  m.def("deeplift_relu", [halves](py::object in_, py::object out_, py::object g_, float eps,
                                  py::object r_) {
    auto x = in<float>(in_, "input"), y = in<float>(out_, "output"), g = in<float>(g_, "grad");
    auto r = out<float>(r_, "result");
    expect_same_shape(y, x, "output", "input");
    expect_same_shape(g, x, "grad", "input");
    expect_same_shape(r, x, "result", "input");
    const index_t count = halves(x, "input");
    py::gil_scoped_release nogil;
    fastcnn::cpu::deeplift_relu(count, x.data, y.data, g.data, eps, r.data);
  });
  m.def("deeplift_pool_split", [halves](py::object out_, py::object g_, py::object r_) {
    auto y = in<float>(out_, "output"), g = in<float>(g_, "grad");
    auto r = out<float>(r_, "result");
    expect_same_shape(g, y, "grad", "output");
    expect_same_shape(r, y, "result", "output");
    const index_t count = halves(y, "output");
    py::gil_scoped_release nogil;
    fastcnn::cpu::deeplift_pool_split(count, y.data, g.data, r.data);
  });
  m.def("deeplift_rescale", [halves](py::object in_, py::object routed_, py::object plain_,
                                     float eps, py::object r_) {
    auto x = in<float>(in_, "input"), routed = in<float>(routed_, "routed");
    auto plain = in<float>(plain_, "plain");
    auto r = out<float>(r_, "result");
    expect_same_shape(routed, x, "routed", "input");
    expect_same_shape(plain, x, "plain", "input");
    expect_same_shape(r, x, "result", "input");
    const index_t count = halves(x, "input");
    py::gil_scoped_release nogil;
    fastcnn::cpu::deeplift_rescale(count, x.data, routed.data, plain.data, eps, r.data);
  });

  // relu: max_pool2d(relu(x)), the indices those of x
  m.def("max_pool2d_forward", [](py::object x_, py::object y_, py::object idx_, index_t kh,
                                 index_t kw, index_t sh, index_t sw, index_t ph, index_t pw,
                                 index_t dh, index_t dw, bool relu) {
    auto x = in<float>(x_, "input");
    auto y = out<float>(y_, "output");
    const fastcnn::PoolShape ps = pool_shape(x, y, kh, kw, sh, sw, ph, pw, dh, dw);
    std::int64_t* idx = opt<std::int64_t>(idx_, "indices", true, y.size());
    py::gil_scoped_release nogil;
    fastcnn::cpu::max_pool2d_forward(ps, x.data, y.data, idx, relu);
  }, py::arg("input"), py::arg("output"), py::arg("indices"), py::arg("kh"), py::arg("kw"),
     py::arg("sh"), py::arg("sw"), py::arg("ph"), py::arg("pw"), py::arg("dh"), py::arg("dw"),
     py::arg("relu") = false);

  m.def("max_pool2d_backward", [](py::object dy_, py::object x_, py::object idx_,
                                  py::object dx_, index_t kh, index_t kw, index_t sh,
                                  index_t sw, index_t ph, index_t pw, index_t dh, index_t dw,
                                  bool relu, std::int64_t min_index) {
    // Returns the number of indices outside [min_index, h * w) (skipped).
    auto dy = in<float>(dy_, "grad_output"), x = in<float>(x_, "input");
    auto dx = out<float>(dx_, "grad_input");
    expect_same_shape(dx, x, "grad_input", "input");
    const fastcnn::PoolShape ps = pool_shape(x, dy, kh, kw, sh, sw, ph, pw, dh, dw);
    const std::int64_t* idx = opt<std::int64_t>(idx_, "indices", false, dy.size());
    if (min_index < -1) fail("min_index must be -1 or more");
    py::gil_scoped_release nogil;
    return fastcnn::cpu::max_pool2d_backward(ps, dy.data, x.data, idx, relu, min_index, dx.data);
  }, py::arg("grad_output"), py::arg("input"), py::arg("indices"), py::arg("grad_input"),
     py::arg("kh"), py::arg("kw"), py::arg("sh"), py::arg("sw"), py::arg("ph"), py::arg("pw"),
     py::arg("dh"), py::arg("dw"), py::arg("relu") = false, py::arg("min_index") = -1);

  // 2x2 / stride 2 windows with one code byte each (fastcnn.nn.MaxPool2d in training).
  m.def("max_pool2d_2x2_codes_forward", [](py::object x_, py::object y_, py::object codes_,
                                           bool relu, py::object scale_, py::object shift_) {
    auto x = in<float>(x_, "input");
    auto y = out<float>(y_, "output");
    auto codes = out<std::uint8_t>(codes_, "codes");
    expect_same_shape(codes, y, "codes", "output");
    const fastcnn::PoolShape ps = pool_shape(x, y, 2, 2, 2, 2, 0, 0, 1, 1);
    if (2 * ps.oh > ps.h || 2 * ps.ow > ps.w) fail("2x2 windows must lie inside the input");
    const float* scale = opt<float>(scale_, "scale", false, ps.c);
    const float* shift = opt<float>(shift_, "shift", false, ps.c);
    if ((scale == nullptr) != (shift == nullptr)) fail("scale and shift go together");
    py::gil_scoped_release nogil;
    fastcnn::cpu::max_pool2d_2x2_codes_forward(ps, x.data, relu, y.data, codes.data, scale,
                                               shift);
  }, py::arg("x"), py::arg("y"), py::arg("codes"), py::arg("relu"),
     py::arg("scale") = py::none(), py::arg("shift") = py::none());
  m.def("max_pool2d_2x2_codes_backward", [](py::object dy_, py::object codes_, py::object dx_) {
    auto dy = in<float>(dy_, "grad_output");
    auto codes = in<std::uint8_t>(codes_, "codes");
    auto dx = out<float>(dx_, "grad_input");
    expect_same_shape(codes, dy, "codes", "grad_output");
    const fastcnn::PoolShape ps = pool_shape(dx, dy, 2, 2, 2, 2, 0, 0, 1, 1);
    if (2 * ps.oh > ps.h || 2 * ps.ow > ps.w) fail("2x2 windows must lie inside the input");
    py::gil_scoped_release nogil;
    fastcnn::cpu::max_pool2d_2x2_codes_backward(ps, dy.data, codes.data, dx.data);
  });

  // x viewed as (outer, dim, inner)
  m.def("softmax_forward", [](py::object x_, py::object y_, index_t outer, index_t dim,
                              index_t inner, bool log) {
    auto x = in<float>(x_, "input");
    auto y = out<float>(y_, "output");
    expect_same_shape(x, y, "input", "output");
    if (outer < 0 || dim < 0 || inner < 0 || outer * dim * inner != x.size())
      fail("softmax view does not match the input size");
    py::gil_scoped_release nogil;
    fastcnn::cpu::softmax_forward(outer, dim, inner, x.data, log, y.data);
  });

  m.def("softmax_backward", [](py::object dy_, py::object y_, py::object dx_, index_t outer,
                               index_t dim, index_t inner, bool log) {
    auto dy = in<float>(dy_, "grad_output"), y = in<float>(y_, "output");
    auto dx = out<float>(dx_, "grad_input");
    expect_same_shape(dy, y, "grad_output", "output");
    expect_same_shape(dx, y, "grad_input", "output");
    if (outer < 0 || dim < 0 || inner < 0 || outer * dim * inner != y.size())
      fail("softmax view does not match the input size");
    py::gil_scoped_release nogil;
    fastcnn::cpu::softmax_backward(outer, dim, inner, dy.data, y.data, log, dx.data);
  });

  m.def("cross_entropy_forward", [](py::object x_, py::object t_, std::int64_t ignore_index,
                                    float label_smoothing, py::object loss_) {
    auto x = in<float>(x_, "input");
    auto t = in<std::int64_t>(t_, "target");
    auto loss = out<float>(loss_, "loss");
    expect_ndim(x, 2, "input");
    const index_t n = x.dim(0), classes = x.dim(1);
    if (t.size() != n || loss.size() != n) fail("target / loss size does not match input");
    for (index_t i = 0; i < n; ++i)
      if (t.data[i] != ignore_index && (t.data[i] < 0 || t.data[i] >= classes))
        fail("target value " + std::to_string(t.data[i]) + " out of range");
    py::gil_scoped_release nogil;
    fastcnn::cpu::cross_entropy_forward(n, classes, x.data, t.data, ignore_index,
                                        label_smoothing, loss.data);
  });

  m.def("cross_entropy_backward", [](py::object x_, py::object t_, std::int64_t ignore_index,
                                     float label_smoothing, py::object g_, py::object dx_) {
    auto x = in<float>(x_, "input"), g = in<float>(g_, "grad_scale");
    auto t = in<std::int64_t>(t_, "target");
    auto dx = out<float>(dx_, "grad_input");
    expect_ndim(x, 2, "input");
    expect_same_shape(dx, x, "grad_input", "input");
    const index_t n = x.dim(0), classes = x.dim(1);
    if (t.size() != n || g.size() != n) fail("target / grad size does not match input");
    for (index_t i = 0; i < n; ++i)
      if (t.data[i] != ignore_index && (t.data[i] < 0 || t.data[i] >= classes))
        fail("target value " + std::to_string(t.data[i]) + " out of range");
    py::gil_scoped_release nogil;
    fastcnn::cpu::cross_entropy_backward(n, classes, x.data, t.data, ignore_index,
                                         label_smoothing, g.data, dx.data);
  });

  // x viewed as (n, c, l)
  // y None: the statistics only; scale / shift (optional outputs, (c,)):
  // the normalisation y = x * scale + shift.
  m.def("batch_norm_forward_train",
        [](py::object x_, py::object w_, py::object b_, py::object rm_, py::object rv_,
           py::object y_, py::object mean_, py::object invstd_, index_t n, index_t c, index_t l,
           double eps, double momentum, py::object scale_, py::object shift_) {
          auto x = in<float>(x_, "input");
          float* y = opt<float>(y_, "output", true, x.size());
          expect_view(x, n, c, l);
          const float* w = opt<float>(w_, "weight", false, c);
          const float* b = opt<float>(b_, "bias", false, c);
          float* rm = opt<float>(rm_, "running_mean", true, c);
          float* rv = opt<float>(rv_, "running_var", true, c);
          float* mean = opt<float>(mean_, "save_mean", true, c);
          float* invstd = opt<float>(invstd_, "save_invstd", true, c);
          if (mean == nullptr || invstd == nullptr) fail("save_mean / save_invstd required");
          float* scale = opt<float>(scale_, "scale", true, c);
          float* shift = opt<float>(shift_, "shift", true, c);
          py::gil_scoped_release nogil;
          fastcnn::cpu::batch_norm_forward_train(n, c, l, x.data, w, b, eps, momentum, rm, rv, y,
                                                 mean, invstd, scale, shift);
        },
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("running_mean"),
        py::arg("running_var"), py::arg("y"), py::arg("save_mean"), py::arg("save_invstd"),
        py::arg("n"), py::arg("c"), py::arg("l"), py::arg("eps"), py::arg("momentum"),
        py::arg("scale") = py::none(), py::arg("shift") = py::none());
  m.def("batch_norm_normalize", [](py::object x_, py::object scale_, py::object shift_,
                                   py::object y_, index_t n, index_t c, index_t l) {
    auto x = in<float>(x_, "input");
    auto y = out<float>(y_, "output");
    expect_same_shape(x, y, "input", "output");
    expect_view(x, n, c, l);
    const float* scale = opt<float>(scale_, "scale", false, c);
    const float* shift = opt<float>(shift_, "shift", false, c);
    if (scale == nullptr || shift == nullptr) fail("scale / shift required");
    py::gil_scoped_release nogil;
    fastcnn::cpu::batch_norm_normalize(n, c, l, x.data, scale, shift, y.data);
  });

  m.def("batch_norm_forward_eval",
        [](py::object x_, py::object w_, py::object b_, py::object rm_, py::object rv_,
           py::object y_, index_t n, index_t c, index_t l, double eps) {
          auto x = in<float>(x_, "input");
          auto y = out<float>(y_, "output");
          expect_same_shape(x, y, "input", "output");
          expect_view(x, n, c, l);
          const float* w = opt<float>(w_, "weight", false, c);
          const float* b = opt<float>(b_, "bias", false, c);
          const float* rm = opt<float>(rm_, "running_mean", false, c);
          const float* rv = opt<float>(rv_, "running_var", false, c);
          if (rm == nullptr || rv == nullptr) fail("running_mean / running_var required");
          py::gil_scoped_release nogil;
          fastcnn::cpu::batch_norm_forward_eval(n, c, l, x.data, rm, rv, w, b, eps, y.data);
        });

  m.def("batch_norm_eval_affine",
        [](py::object w_, py::object b_, py::object rm_, py::object rv_, double eps,
           py::object scale_, py::object shift_) {
          auto scale = out<float>(scale_, "scale"), shift = out<float>(shift_, "shift");
          const index_t c = scale.size();
          expect_same_shape(scale, shift, "scale", "shift");
          const float* w = opt<float>(w_, "weight", false, c);
          const float* b = opt<float>(b_, "bias", false, c);
          const float* rm = opt<float>(rm_, "running_mean", false, c);
          const float* rv = opt<float>(rv_, "running_var", false, c);
          if (rm == nullptr || rv == nullptr) fail("running_mean / running_var required");
          fastcnn::cpu::batch_norm_eval_affine(c, rm, rv, w, b, eps, scale.data, shift.data);
        });

  m.def("batch_norm_backward",
        [](py::object dy_, py::object x_, py::object mean_, py::object invstd_, py::object w_,
           bool training, py::object dx_, py::object dw_, py::object db_, index_t n, index_t c,
           index_t l) {
          auto dy = in<float>(dy_, "grad_output"), x = in<float>(x_, "input");
          expect_same_shape(dy, x, "grad_output", "input");
          expect_view(x, n, c, l);
          const float* mean = opt<float>(mean_, "mean", false, c);
          const float* invstd = opt<float>(invstd_, "invstd", false, c);
          if (mean == nullptr || invstd == nullptr) fail("mean / invstd required");
          const float* w = opt<float>(w_, "weight", false, c);
          float* dx = opt<float>(dx_, "grad_input", true, x.size());
          float* dw = opt<float>(dw_, "grad_weight", true, c);
          float* db = opt<float>(db_, "grad_bias", true, c);
          py::gil_scoped_release nogil;
          fastcnn::cpu::batch_norm_backward(n, c, l, dy.data, x.data, mean, invstd, w, training,
                                            dx, dw, db);
        });

  // A training batch norm's backward behind ReLU + 2x2 max-pool codes
  // (fastcnn.nn.Sequential): dp and codes (n, c, h / 2, w / 2), x (n, c, h, w).
  m.def("batch_norm_backward_from_pool",
        [](py::object dp_, py::object codes_, py::object x_, py::object mean_,
           py::object invstd_, py::object w_, py::object dx_, py::object dw_, py::object db_) {
          auto dp = in<float>(dp_, "grad_output"), x = in<float>(x_, "input");
          auto codes = in<std::uint8_t>(codes_, "codes");
          expect_same_shape(codes, dp, "codes", "grad_output");
          expect_ndim(x, 4, "input");
          expect_ndim(dp, 4, "grad_output");
          const index_t n = x.dim(0), c = x.dim(1), h = x.dim(2), w = x.dim(3);
          if (c < 1 || dp.dim(0) != n || dp.dim(1) != c || dp.dim(2) != h / 2 ||
              dp.dim(3) != w / 2)
            fail("grad_output " + dp.shape_string() + " is not the 2x2-pooled input " +
                 x.shape_string());
          const float* mean = opt<float>(mean_, "mean", false, c);
          const float* invstd = opt<float>(invstd_, "invstd", false, c);
          if (mean == nullptr || invstd == nullptr) fail("mean / invstd required");
          const float* wp = opt<float>(w_, "weight", false, c);
          float* dx = opt<float>(dx_, "grad_input", true, x.size());
          float* dw = opt<float>(dw_, "grad_weight", true, c);
          float* db = opt<float>(db_, "grad_bias", true, c);
          py::gil_scoped_release nogil;
          fastcnn::cpu::batch_norm_backward_from_pool(n, c, h, w, dp.data, codes.data, x.data,
                                                      mean, invstd, wp, dx, dw, db);
        });

  m.def("dropout_apply", [](py::object x_, py::object y_, double p, std::uint64_t seed,
                            std::uint64_t offset) {
    auto y = out<float>(y_, "output");
    const float* x = opt<float>(x_, "input", false, y.size());
    if (!(p >= 0.0 && p <= 1.0)) fail("p must be in [0, 1]");
    py::gil_scoped_release nogil;
    fastcnn::cpu::dropout_apply(y.size(), x, p, seed, offset, y.data);
  });

  m.def("sgd_step", [](py::object p_, py::object g_, py::object buf_, float lr, float momentum,
                       float weight_decay, float undamped_share, bool damped, bool nesterov,
                       bool first_step) {
    auto p = out<float>(p_, "param"), g = in<float>(g_, "grad");
    expect_same_shape(g, p, "grad", "param");
    float* buf = opt<float>(buf_, "momentum_buffer", true, p.size());
    const fastcnn::cpu::SgdOptions o{lr,     momentum, weight_decay, undamped_share,
                                     damped, nesterov, first_step};
    py::gil_scoped_release nogil;
    fastcnn::cpu::sgd_step(p.size(), p.data, g.data, buf, o);
  });

  m.def("adam_step", [](py::object p_, py::object g_, py::object m_, py::object v_, float beta1,
                        float beta2, float one_minus_beta1, float one_minus_beta2, float eps,
                        float weight_decay, float decay_scale, float bias2_sqrt,
                        float step_size) {
    auto p = out<float>(p_, "param"), g = in<float>(g_, "grad");
    auto m1 = out<float>(m_, "exp_avg"), m2 = out<float>(v_, "exp_avg_sq");
    expect_same_shape(g, p, "grad", "param");
    expect_same_shape(m1, p, "exp_avg", "param");
    expect_same_shape(m2, p, "exp_avg_sq", "param");
    const fastcnn::cpu::AdamOptions o{beta1, beta2, one_minus_beta1, one_minus_beta2, eps,
                                      weight_decay, decay_scale, bias2_sqrt, step_size};
    py::gil_scoped_release nogil;
    fastcnn::cpu::adam_step(p.size(), p.data, g.data, m1.data, m2.data, o);
  });

  m.def("normalize_u8", [](py::object x_, py::object mean_, py::object std_, py::object y_,
                           index_t outer, index_t c, index_t inner) {
    auto x = in<std::uint8_t>(x_, "input");
    auto y = out<float>(y_, "output");
    if (x.size() != y.size() || outer < 0 || c < 1 || inner < 0 || outer * c * inner != x.size())
      fail("normalize view does not match the input size");
    const float* mean = opt<float>(mean_, "mean", false, c);
    const float* sd = opt<float>(std_, "std", false, c);
    py::gil_scoped_release nogil;
    fastcnn::cpu::normalize_u8(outer, c, inner, x.data, mean, sd, y.data);
  });
}
