// fastcnn._cuda: thin pybind11 bindings of the CUDA kernels, with the same
// functions and argument lists as fastcnn._cpu, so that the Python layer
// calls either module the same way.
//
// Arrays are objects exposing __cuda_array_interface__ (CuPy arrays). Each
// binding checks what memory safety depends on (dtype, C-contiguity, element
// counts, consistent shapes, device memory on the current device) and raises
// ValueError otherwise, then launches on CuPy's current device and stream
// (the legacy default stream when CuPy is not importable), GIL released. Nothing
// synchronises: results are ready in stream order, as with any CuPy kernel.
//
// fastcnn._cuda.emulator has the same functions on NumPy arrays: the CUDA
// kernel bodies run on the host (fastcnn/cuda_launch.h). It is how the CUDA
// code is tested without a GPU; slow, for small problems.
//
// Importing makes no CUDA call, so it works on machines without a driver.
#include <cuda_runtime_api.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "binding_checks.h"
#include "fastcnn/cuda_check.h"
#include "fastcnn/cuda_kernels.h"

namespace py = pybind11;
namespace cuda = fastcnn::cuda;
using fastcnn::index_t;

namespace {

[[noreturn]] void fail(const std::string& msg) { throw py::value_error("fastcnn._cuda: " + msg); }

std::string shape_str(const std::vector<index_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + (shape.size() == 1 ? ",)" : ")");
}

std::string type_name(const py::handle& obj) {
  return py::str(py::type::handle_of(obj).attr("__module__")).cast<std::string>() + "." +
         py::str(py::type::handle_of(obj).attr("__name__")).cast<std::string>();
}

// A checked argument: its data pointer and shape.
template <class T>
struct Array {
  T* data = nullptr;
  std::vector<index_t> shape;

  int ndim() const { return static_cast<int>(shape.size()); }
  index_t dim(int i) const { return shape[static_cast<size_t>(i)]; }
  index_t size() const {
    index_t n = 1;
    for (index_t d : shape) n *= d;
    return n;
  }
  std::string shape_string() const { return shape_str(shape); }
};

template <class T>
struct Dtype;
template <>
struct Dtype<float> {
  static constexpr const char* kCode = "f4";
  static constexpr const char* kName = "float32";
};
template <>
struct Dtype<std::int64_t> {
  static constexpr const char* kCode = "i8";
  static constexpr const char* kName = "int64";
};
template <>
struct Dtype<std::uint8_t> {
  static constexpr const char* kCode = "u1";
  static constexpr const char* kName = "uint8";
};

// ---------------------------------------------------------------- GPU arrays --

// CuPy's current device and stream (cupy.cuda.runtime.getDevice(),
// cupy.cuda.get_current_stream().ptr), and its array type. Without CuPy: the
// runtime's current device (-1 here), the legacy default stream, no type.
struct CupyCurrent {
  int device = -1;
  cudaStream_t stream = nullptr;
  PyObject* ndarray = nullptr;  // cupy.ndarray (a borrowed, immortal type object)
};

CupyCurrent cupy_current() {
  static py::object* get_device = nullptr;
  static py::object* get_stream = nullptr;
  static PyObject* ndarray = nullptr;
  static bool looked = false;
  if (!looked) {
    looked = true;
    try {
      const py::module_ cuda_mod = py::module_::import("cupy.cuda");
      get_device = new py::object(cuda_mod.attr("runtime").attr("getDevice"));
      get_stream = new py::object(cuda_mod.attr("get_current_stream"));
      const py::object type = py::module_::import("cupy").attr("ndarray");
      if (PyType_Check(type.ptr())) ndarray = type.inc_ref().ptr();
    } catch (py::error_already_set&) {
      get_device = get_stream = nullptr;  // no CuPy
    }
  }
  CupyCurrent now;
  if (get_stream != nullptr) {
    now.device = (*get_device)().cast<int>();
    now.stream = reinterpret_cast<cudaStream_t>((*get_stream)().attr("ptr").cast<std::uintptr_t>());
    now.ndarray = ndarray;
  }
  return now;
}

// A C-contiguous CuPy array of T read through its own attributes: its data
// pointer, shape and device. The __cuda_array_interface__ dict says the same
// but CuPy builds it anew on every access (dtype.descr included), several
// microseconds per argument of every call; a training step passes ~70. False
// when the array is anything else (another dtype, not C-contiguous, an
// attribute missing): the interface path then decides, and words the error.
template <class T>
bool cupy_attributes(const py::handle& obj, PyObject* ndarray_type, std::uintptr_t* ptr,
                     std::vector<index_t>* shape, int* device) {
  if (ndarray_type == nullptr ||
      !PyObject_TypeCheck(obj.ptr(), reinterpret_cast<PyTypeObject*>(ndarray_type)))
    return false;
  try {
    const py::object dtype = obj.attr("dtype");
    if (dtype.ptr() != py::dtype::of<T>().ptr()) return false;  // builtin dtypes are singletons
    if (!obj.attr("_c_contiguous").cast<bool>()) return false;
    std::vector<index_t> dims;
    for (const py::handle d : obj.attr("shape").cast<py::tuple>()) dims.push_back(d.cast<index_t>());
    const py::object mem = obj.attr("data");
    *ptr = mem.attr("ptr").cast<std::uintptr_t>();
    *device = mem.attr("device_id").cast<int>();
    *shape = std::move(dims);
    return true;
  } catch (py::error_already_set&) {
    return false;
  } catch (py::cast_error&) {
    return false;
  }
}

// __cuda_array_interface__'s encoding of a stream: 1 is the legacy default stream.
std::uintptr_t interface_stream_id(cudaStream_t s) {
  const auto id = reinterpret_cast<std::uintptr_t>(s);
  return id == 0 ? 1 : id;
}

class DeviceArrays {
 public:
  static constexpr bool kHostData = false;

  // Launches follow CuPy: its current device (`with cupy.cuda.Device(i)`) and
  // stream. The first CUDA call comes after the arguments' own checks.
  DeviceArrays() : cupy_(cupy_current()) {}

  cuda::Exec exec() {
    use_device();
    cuda::Exec ex;
    ex.stream = cupy_.stream;
    return ex;
  }

  template <class T>
  Array<T> get(const py::handle& obj, const char* name, bool writable) {
    Array<T> a;
    std::uintptr_t ptr = 0;
    int device = -1;
    if (cupy_attributes<T>(obj, cupy_.ndarray, &ptr, &a.shape, &device)) {
      // CuPy memory is device (or managed) memory, and writable; its arrays
      // name no producer stream (CuPy orders work by its current stream, ours).
      a.data = reinterpret_cast<T*>(ptr);
      if (a.size() > 0) check_device(device, name);
      return a;
    }
    if (!py::hasattr(obj, "__cuda_array_interface__"))
      fail(std::string(name) + " must be a GPU array exposing __cuda_array_interface__ (a CuPy "
                               "array), got " + type_name(obj));
    const py::dict iface = obj.attr("__cuda_array_interface__").cast<py::dict>();
    const std::string typestr = iface["typestr"].cast<std::string>();
    if (typestr.size() != 3 || (typestr[0] != '<' && typestr[0] != '|' && typestr[0] != '=') ||
        typestr.substr(1) != Dtype<T>::kCode)
      fail(std::string(name) + " has typestr '" + typestr + "', expected " + Dtype<T>::kName);
    for (const py::handle d : iface["shape"].cast<py::tuple>()) a.shape.push_back(d.cast<index_t>());
    if (iface.contains("mask") && !iface["mask"].is_none())
      fail(std::string(name) + " is a masked array");
    if (iface.contains("strides") && !iface["strides"].is_none()) {
      const py::tuple strides = iface["strides"].cast<py::tuple>();
      index_t expected = static_cast<index_t>(sizeof(T));
      bool contiguous = static_cast<int>(strides.size()) == a.ndim();
      for (int i = a.ndim() - 1; contiguous && i >= 0; --i) {
        if (a.dim(i) != 1 && strides[static_cast<size_t>(i)].cast<index_t>() != expected)
          contiguous = false;
        expected *= a.dim(i);
      }
      if (!contiguous && a.size() > 0) fail(std::string(name) + " must be C-contiguous");
    }
    const py::tuple data = iface["data"].cast<py::tuple>();
    ptr = data[0].cast<std::uintptr_t>();
    if (writable && data[1].cast<bool>()) fail(std::string(name) + " must be writable");
    a.data = reinterpret_cast<T*>(ptr);
    if (a.size() > 0) {
      check_device_memory(a.data, name);
      if (iface.contains("stream") && !iface["stream"].is_none())
        wait_for(iface["stream"].cast<std::uintptr_t>());
    }
    return a;
  }

 private:
  void use_device() {
    if (device_ >= 0) return;
    FASTCNN_CUDA_CHECK(cudaGetDevice(&device_));
    if (cupy_.device >= 0 && cupy_.device != device_) {
      FASTCNN_CUDA_CHECK(cudaSetDevice(cupy_.device));
      device_ = cupy_.device;
    }
  }

  void check_device_memory(const void* ptr, const char* name) {
    use_device();
    cudaPointerAttributes attr{};
    if (cudaPointerGetAttributes(&attr, ptr) != cudaSuccess) {
      (void)cudaGetLastError();
      fail(std::string(name) + " does not point to CUDA memory");
    }
    if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
      fail(std::string(name) + " is not device memory (host memory cannot be passed to the "
                               "CUDA kernels)");
    check_device(attr.device, name);
  }

  void check_device(int device, const char* name) {
    use_device();
    if (device != device_)
      fail(std::string(name) + " is on GPU " + std::to_string(device) +
           " but the current device is GPU " + std::to_string(device_) +
           "; use `with cupy.cuda.Device(" + std::to_string(device) + "):`");
  }

  // The array's producer stream (CUDA array interface v3): our stream waits for it.
  // Not while our stream is captured into a graph: waiting there on an event
  // recorded outside the capture would invalidate it, and the inputs of a
  // capture were made before it began (fastcnn.capture synchronises first).
  void wait_for(std::uintptr_t producer) const {
    if (producer == interface_stream_id(cupy_.stream)) return;
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    FASTCNN_CUDA_CHECK(cudaStreamIsCapturing(cupy_.stream, &capture));
    if (capture != cudaStreamCaptureStatusNone) return;
    const cudaStream_t other =
        producer == 1 ? cudaStreamLegacy : reinterpret_cast<cudaStream_t>(producer);
    cudaEvent_t done;
    FASTCNN_CUDA_CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
    FASTCNN_CUDA_CHECK(cudaEventRecord(done, other));
    FASTCNN_CUDA_CHECK(cudaStreamWaitEvent(cupy_.stream, done, 0));
    FASTCNN_CUDA_CHECK(cudaEventDestroy(done));
  }

  CupyCurrent cupy_;
  int device_ = -1;  // -1: not asked yet
};

// ------------------------------------------------------------- host arrays --

class HostArrays {
 public:
  static constexpr bool kHostData = true;

  cuda::Exec exec() const {
    cuda::Exec ex;
    ex.emulated = true;
    return ex;
  }

  template <class T>
  Array<T> get(const py::handle& obj, const char* name, bool writable) {
    if (!py::isinstance<py::array>(obj))
      fail(std::string(name) + " must be a numpy array (emulator), got " + type_name(obj));
    py::array arr = py::reinterpret_borrow<py::array>(obj);
    if (!py::dtype::of<T>().is(arr.dtype()))
      fail(std::string(name) + " has dtype " + std::string(py::str(arr.dtype())) + ", expected " +
           Dtype<T>::kName);
    if (!(arr.flags() & py::array::c_style)) fail(std::string(name) + " must be C-contiguous");
    if (writable && !arr.writeable()) fail(std::string(name) + " must be writable");
    Array<T> a;
    for (py::ssize_t i = 0; i < arr.ndim(); ++i) a.shape.push_back(arr.shape(i));
    a.data = static_cast<T*>(writable ? arr.mutable_data() : const_cast<void*>(arr.data()));
    return a;
  }
};

// ------------------------------------------------------------------ checks --

template <class M, class T>
Array<T> in(M& m, const py::object& obj, const char* name) {
  return m.template get<T>(obj, name, false);
}

template <class M, class T>
Array<T> out(M& m, const py::object& obj, const char* name) {
  return m.template get<T>(obj, name, true);
}

// An optional argument: null when None.
template <class M, class T>
T* opt(M& m, const py::object& obj, const char* name, bool writable, index_t expected) {
  if (obj.is_none()) return nullptr;
  const Array<T> a = m.template get<T>(obj, name, writable);
  if (a.size() != expected)
    fail(std::string(name) + " has shape " + a.shape_string() + ", expected " +
         std::to_string(expected) + " elements");
  return a.data;
}

template <class T>
void expect_ndim(const Array<T>& v, int ndim, const char* name) {
  fastcnn::bindings::expect_ndim(v, ndim, name, fail);
}

template <class T, class U>
void expect_same_shape(const Array<T>& a, const Array<U>& b, const char* na, const char* nb) {
  fastcnn::bindings::expect_same_shape(a, b, na, nb, fail);
}

template <class... Args>
fastcnn::ConvShape conv_shape(const Args&... args) {
  return fastcnn::bindings::conv_shape(args..., fail);
}

template <class... Args>
fastcnn::PoolShape pool_shape(const Args&... args) {
  return fastcnn::bindings::pool_shape(args..., fail);
}

void check_view(index_t outer, index_t dim, index_t inner, index_t size, const char* what) {
  if (outer < 0 || dim < 0 || inner < 0 || outer * dim * inner != size)
    fail(std::string(what) + " view does not match the input size");
}

// Targets are checked on the host only where they live there (the
// emulator); on the GPU the kernels give NaN for a bad target and the
// Python layer validates before calling.
template <class M>
void check_targets(const Array<std::int64_t>& t, std::int64_t ignore_index, index_t classes) {
  if (!M::kHostData) return;
  for (index_t i = 0; i < t.size(); ++i)
    if (t.data[i] != ignore_index && (t.data[i] < 0 || t.data[i] >= classes))
      fail("target value " + std::to_string(t.data[i]) + " out of range");
}

// Cross-entropy's logits (n, classes) and targets (n,), checked.
struct LogitRows {
  Array<float> x;
  Array<std::int64_t> t;
  index_t n = 0, classes = 0;
};

template <class M>
LogitRows logit_rows(M& mem, const py::object& x_, const py::object& t_) {
  LogitRows r;
  r.x = in<M, float>(mem, x_, "input");
  r.t = in<M, std::int64_t>(mem, t_, "target");
  expect_ndim(r.x, 2, "input");
  r.n = r.x.dim(0);
  r.classes = r.x.dim(1);
  if (r.t.size() != r.n) fail("target size does not match input");
  return r;
}

// The (param, grad) pairs of a multi-tensor optimizer update, checked.
template <class M>
std::vector<cuda::OptimTensor> optim_tensors(M& mem, const py::list& params,
                                             const py::list& grads) {
  std::vector<cuda::OptimTensor> tensors(params.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    auto p = out<M, float>(mem, params[i], "param");
    auto g = in<M, float>(mem, grads[i], "grad");
    expect_same_shape(g, p, "grad", "param");
    tensors[i].p = p.data;
    tensors[i].g = g.data;
    tensors[i].size = p.size();
  }
  return tensors;
}

// ---------------------------------------------------------------- bindings --

template <class M>
void bind_ops(py::module_& m) {
  using f32 = float;
  using i64 = std::int64_t;

  // c (m, n) = alpha op(a) op(b) + beta c for 2-D C-contiguous float32 arrays.
  m.def("sgemm", [](bool ta, bool tb, float alpha, py::object a_, py::object b_, float beta,
                    py::object c_) {
    M mem;
    auto a = in<M, f32>(mem, a_, "a");
    auto b = in<M, f32>(mem, b_, "b");
    auto c = out<M, f32>(mem, c_, "c");
    expect_ndim(a, 2, "a");
    expect_ndim(b, 2, "b");
    expect_ndim(c, 2, "c");
    const index_t m_ = ta ? a.dim(1) : a.dim(0), k = ta ? a.dim(0) : a.dim(1);
    const index_t kb = tb ? b.dim(1) : b.dim(0), n = tb ? b.dim(0) : b.dim(1);
    if (k != kb || c.dim(0) != m_ || c.dim(1) != n)
      fail("sgemm shapes a " + a.shape_string() + ", b " + b.shape_string() + ", c " +
           c.shape_string() + " do not agree");
    const cuda::Exec ex = mem.exec();
    py::gil_scoped_release nogil;
    cuda::sgemm(ex, static_cast<fastcnn::Trans>(ta), static_cast<fastcnn::Trans>(tb), m_, n, k,
                alpha, a.data, a.dim(1), b.data, b.dim(1), beta, c.data, n);
  });

  // relu: y = relu(conv), the ReLU in the GEMM's epilogue
  m.def("conv2d_forward", [](py::object x_, py::object w_, py::object b_, py::object y_,
                             index_t sh, index_t sw, index_t ph, index_t pw, index_t dh,
                             index_t dw, index_t groups, bool relu) {
    M mem;
    auto x = in<M, f32>(mem, x_, "input");
    auto w = in<M, f32>(mem, w_, "weight");
    auto y = out<M, f32>(mem, y_, "output");
    const fastcnn::ConvShape cs = conv_shape(x, w, y, sh, sw, ph, pw, dh, dw, groups);
    const float* bias = opt<M, f32>(mem, b_, "bias", false, cs.k);
    const cuda::Exec ex = mem.exec();
    py::gil_scoped_release nogil;
    cuda::conv2d_forward(ex, cs, x.data, w.data, bias, y.data, relu);
  }, py::arg("input"), py::arg("weight"), py::arg("bias"), py::arg("output"), py::arg("sh"),
     py::arg("sw"), py::arg("ph"), py::arg("pw"), py::arg("dh"), py::arg("dw"),
     py::arg("groups"), py::arg("relu") = false);

  m.def("conv2d_backward", [](py::object dy_, py::object x_, py::object w_, py::object dx_,
                              py::object dw_, py::object db_, index_t sh, index_t sw, index_t ph,
                              index_t pw, index_t dh, index_t dw, index_t groups) {
    M mem;
    auto dy = in<M, f32>(mem, dy_, "grad_output");
    auto x = in<M, f32>(mem, x_, "input");
    auto w = in<M, f32>(mem, w_, "weight");
    const fastcnn::ConvShape cs = conv_shape(x, w, dy, sh, sw, ph, pw, dh, dw, groups);
    float* dx = opt<M, f32>(mem, dx_, "grad_input", true, x.size());
    float* dwp = opt<M, f32>(mem, dw_, "grad_weight", true, w.size());
    float* db = opt<M, f32>(mem, db_, "grad_bias", true, cs.k);
    const cuda::Exec ex = mem.exec();
    py::gil_scoped_release nogil;
    cuda::conv2d_backward(ex, cs, dy.data, x.data, w.data, dx, dwp, db);
  });

  // relu: y = relu(x w^T + b), the ReLU in the GEMM's epilogue
  m.def("linear_forward", [](py::object x_, py::object w_, py::object b_, py::object y_,
                             bool relu) {
    M mem;
    auto x = in<M, f32>(mem, x_, "input");
    auto w = in<M, f32>(mem, w_, "weight");
    auto y = out<M, f32>(mem, y_, "output");
    expect_ndim(x, 2, "input");
    expect_ndim(w, 2, "weight");
    expect_ndim(y, 2, "output");
    const index_t n = x.dim(0), fin = x.dim(1), fout = w.dim(0);
    if (w.dim(1) != fin || y.dim(0) != n || y.dim(1) != fout)
      fail("linear shapes input " + x.shape_string() + ", weight " + w.shape_string() +
           ", output " + y.shape_string() + " do not agree");
    const float* bias = opt<M, f32>(mem, b_, "bias", false, fout);
    const cuda::Exec ex = mem.exec();
    py::gil_scoped_release nogil;
    cuda::linear_forward(ex, n, fin, fout, x.data, w.data, bias, y.data, relu);
  }, py::arg("input"), py::arg("weight"), py::arg("bias"), py::arg("output"),
     py::arg("relu") = false);

  m.def("linear_backward", [](py::object dy_, py::object x_, py::object w_, py::object dx_,
                              py::object dw_, py::object db_) {
    M mem;
    auto dy = in<M, f32>(mem, dy_, "grad_output");
    auto x = in<M, f32>(mem, x_, "input");
    auto w = in<M, f32>(mem, w_, "weight");
    expect_ndim(x, 2, "input");
    expect_ndim(w, 2, "weight");
    expect_ndim(dy, 2, "grad_output");
    const index_t n = x.dim(0), fin = x.dim(1), fout = w.dim(0);
    if (w.dim(1) != fin || dy.dim(0) != n || dy.dim(1) != fout)
      fail("linear_backward shapes grad_output " + dy.shape_string() + ", input " +
           x.shape_string() + ", weight " + w.shape_string() + " do not agree");
    float* dx = opt<M, f32>(mem, dx_, "grad_input", true, x.size());
    float* dw = opt<M, f32>(mem, dw_, "grad_weight", true, w.size());
    float* db = opt<M, f32>(mem, db_, "grad_bias", true, fout);
    const cuda::Exec ex = mem.exec();
    py::gil_scoped_release nogil;
    cuda::linear_backward(ex, n, fin, fout, dy.data, x.data, w.data, dx, dw, db);
  });

  m.def("relu_forward", [](py::object x_, py::object y_) {
    M mem;
    auto x = in<M, f32>(mem, x_, "input");
    auto y = out<M, f32>(mem, y_, "output");
    expect_same_shape(x, y, "input", "output");
    const cuda::Exec ex = mem.exec();
    py::gil_scoped_release nogil;
    cuda::relu_forward(ex, x.size(), x.data, y.data);
  });

  m.def("relu_backward", [](py::object dy_, py::object x_, bool guided, py::object dx_) {
    M mem;
    auto dy = in<M, f32>(mem, dy_, "grad_output");
    auto x = in<M, f32>(mem, x_, "input");
    auto dx = out<M, f32>(mem, dx_, "grad_input");
    expect_same_shape(dy, x, "grad_output", "input");
    expect_same_shape(dx, x, "grad_input", "input");
    const cuda::Exec ex = mem.exec();
    py::gil_scoped_release nogil;
    cuda::relu_backward(ex, x.size(), dy.data, x.data, guided, dx.data);
  });

  // relu: max_pool2d(relu(x)), the indices those of x (one launch)
  m.def("max_pool2d_forward", [](py::object x_, py::object y_, py::object idx_, index_t kh,
                                 index_t kw, index_t sh, index_t sw, index_t ph, index_t pw,
                                 index_t dh, index_t dw, bool relu) {
    M mem;
    auto x = in<M, f32>(mem, x_, "input");
    auto y = out<M, f32>(mem, y_, "output");
    const fastcnn::PoolShape ps = pool_shape(x, y, kh, kw, sh, sw, ph, pw, dh, dw);
    i64* idx = opt<M, i64>(mem, idx_, "indices", true, y.size());
    const cuda::Exec ex = mem.exec();
    py::gil_scoped_release nogil;
    cuda::max_pool2d_forward(ex, ps, x.data, y.data, idx, relu);
  }, py::arg("input"), py::arg("output"), py::arg("indices"), py::arg("kh"), py::arg("kw"),
     py::arg("sh"), py::arg("sw"), py::arg("ph"), py::arg("pw"), py::arg("dh"), py::arg("dw"),
     py::arg("relu") = false);

  // relu: the gradient of max_pool2d(relu(x)) w.r.t. x (one launch). Indices
  // outside the plane match no pixel (the Python layer range-checks them).
  m.def("max_pool2d_backward", [](py::object dy_, py::object x_, py::object idx_,
                                  py::object dx_, index_t kh, index_t kw, index_t sh,
                                  index_t sw, index_t ph, index_t pw, index_t dh, index_t dw,
                                  bool relu) {
    M mem;
    auto dy = in<M, f32>(mem, dy_, "grad_output");
    auto x = in<M, f32>(mem, x_, "input");
    auto dx = out<M, f32>(mem, dx_, "grad_input");
    expect_same_shape(dx, x, "grad_input", "input");
    const fastcnn::PoolShape ps = pool_shape(x, dy, kh, kw, sh, sw, ph, pw, dh, dw);
    const i64* idx = opt<M, i64>(mem, idx_, "indices", false, dy.size());
    const cuda::Exec ex = mem.exec();
    py::gil_scoped_release nogil;
    cuda::max_pool2d_backward(ex, ps, dy.data, x.data, idx, relu, dx.data);
  }, py::arg("grad_output"), py::arg("input"), py::arg("indices"), py::arg("grad_input"),
     py::arg("kh"), py::arg("kw"), py::arg("sh"), py::arg("sw"), py::arg("ph"), py::arg("pw"),
     py::arg("dh"), py::arg("dw"), py::arg("relu") = false);

  // x viewed as (outer, dim, inner)
  m.def("softmax_forward", [](py::object x_, py::object y_, index_t outer, index_t dim,
                              index_t inner, bool log) {
    M mem;
    auto x = in<M, f32>(mem, x_, "input");
    auto y = out<M, f32>(mem, y_, "output");
    expect_same_shape(x, y, "input", "output");
    check_view(outer, dim, inner, x.size(), "softmax");
    const cuda::Exec ex = mem.exec();
    py::gil_scoped_release nogil;
    cuda::softmax_forward(ex, outer, dim, inner, x.data, log, y.data);
  });

  m.def("softmax_backward", [](py::object dy_, py::object y_, py::object dx_, index_t outer,
                               index_t dim, index_t inner, bool log) {
    M mem;
    auto dy = in<M, f32>(mem, dy_, "grad_output");
    auto y = in<M, f32>(mem, y_, "output");
    auto dx = out<M, f32>(mem, dx_, "grad_input");
    expect_same_shape(dy, y, "grad_output", "output");
    expect_same_shape(dx, y, "grad_input", "output");
    check_view(outer, dim, inner, y.size(), "softmax");
    const cuda::Exec ex = mem.exec();
    py::gil_scoped_release nogil;
    cuda::softmax_backward(ex, outer, dim, inner, dy.data, y.data, log, dx.data);
  });

  m.def("cross_entropy_forward", [](py::object x_, py::object t_, std::int64_t ignore_index,
                                    float label_smoothing, py::object loss_) {
    M mem;
    auto x = in<M, f32>(mem, x_, "input");
    auto t = in<M, i64>(mem, t_, "target");
    auto loss = out<M, f32>(mem, loss_, "loss");
    expect_ndim(x, 2, "input");
    const index_t n = x.dim(0), classes = x.dim(1);
    if (t.size() != n || loss.size() != n) fail("target / loss size does not match input");
    check_targets<M>(t, ignore_index, classes);
    const cuda::Exec ex = mem.exec();
    py::gil_scoped_release nogil;
    cuda::cross_entropy_forward(ex, n, classes, x.data, t.data, ignore_index, label_smoothing,
                                loss.data);
  });

  m.def("cross_entropy_backward", [](py::object x_, py::object t_, std::int64_t ignore_index,
                                     float label_smoothing, py::object g_, py::object dx_) {
    M mem;
    auto x = in<M, f32>(mem, x_, "input");
    auto g = in<M, f32>(mem, g_, "grad_scale");
    auto t = in<M, i64>(mem, t_, "target");
    auto dx = out<M, f32>(mem, dx_, "grad_input");
    expect_ndim(x, 2, "input");
    expect_same_shape(dx, x, "grad_input", "input");
    const index_t n = x.dim(0), classes = x.dim(1);
    if (t.size() != n || g.size() != n) fail("target / grad size does not match input");
    check_targets<M>(t, ignore_index, classes);
    const cuda::Exec ex = mem.exec();
    py::gil_scoped_release nogil;
    cuda::cross_entropy_backward(ex, n, classes, x.data, t.data, ignore_index, label_smoothing,
                                 g.data, dx.data);
  });

  // status (3 int64): targets counted, targets out of range, rows predicted
  // right; total (a float32 scalar, or None for the status only): the 'sum' or
  // 'mean' loss.
  m.def("cross_entropy_total", [](py::object x_, py::object t_, std::int64_t ignore_index,
                                  float label_smoothing, bool mean, py::object total_,
                                  py::object status_) {
    M mem;
    const LogitRows r = logit_rows(mem, x_, t_);
    auto status = out<M, i64>(mem, status_, "status");
    if (status.size() != 3) fail("status must have 3 elements");
    float* total = opt<M, f32>(mem, total_, "total", true, 1);
    const cuda::Exec ex = mem.exec();
    py::gil_scoped_release nogil;
    cuda::cross_entropy_total(ex, r.n, r.classes, r.x.data, r.t.data, ignore_index,
                              label_smoothing, mean, total, status.data);
  });

  // The gradient for a scalar upstream gradient: grad (a float32 scalar on the
  // device) or, when None, grad_value; status from cross_entropy_total.
  m.def("cross_entropy_backward_scalar",
        [](py::object x_, py::object t_, std::int64_t ignore_index, float label_smoothing,
           bool mean, py::object g_, float grad_value, py::object status_, py::object dx_) {
          M mem;
          const LogitRows r = logit_rows(mem, x_, t_);
          auto status = in<M, i64>(mem, status_, "status");
          auto dx = out<M, f32>(mem, dx_, "grad_input");
          expect_same_shape(dx, r.x, "grad_input", "input");
          if (status.size() != 3) fail("status must have 3 elements");
          const float* g = opt<M, f32>(mem, g_, "grad_output", false, 1);
          const cuda::Exec ex = mem.exec();
          py::gil_scoped_release nogil;
          cuda::cross_entropy_backward_scalar(ex, r.n, r.classes, r.x.data, r.t.data,
                                              ignore_index, label_smoothing, g, grad_value,
                                              status.data, mean, dx.data);
        });

  // x viewed as (n, c, l)
  m.def("batch_norm_forward_train",
        [](py::object x_, py::object w_, py::object b_, py::object rm_, py::object rv_,
           py::object y_, py::object mean_, py::object invstd_, index_t n, index_t c, index_t l,
           double eps, double momentum) {
          M mem;
          auto x = in<M, f32>(mem, x_, "input");
          auto y = out<M, f32>(mem, y_, "output");
          expect_same_shape(x, y, "input", "output");
          if (n < 0 || c < 1 || l < 0 || n * c * l != x.size())
            fail("batch_norm view does not match the input size");
          const float* w = opt<M, f32>(mem, w_, "weight", false, c);
          const float* b = opt<M, f32>(mem, b_, "bias", false, c);
          float* rm = opt<M, f32>(mem, rm_, "running_mean", true, c);
          float* rv = opt<M, f32>(mem, rv_, "running_var", true, c);
          float* mean = opt<M, f32>(mem, mean_, "save_mean", true, c);
          float* invstd = opt<M, f32>(mem, invstd_, "save_invstd", true, c);
          if (mean == nullptr || invstd == nullptr) fail("save_mean / save_invstd required");
          const cuda::Exec ex = mem.exec();
          py::gil_scoped_release nogil;
          cuda::batch_norm_forward_train(ex, n, c, l, x.data, w, b, eps, momentum, rm, rv,
                                         y.data, mean, invstd);
        });

  m.def("batch_norm_forward_eval",
        [](py::object x_, py::object w_, py::object b_, py::object rm_, py::object rv_,
           py::object y_, index_t n, index_t c, index_t l, double eps) {
          M mem;
          auto x = in<M, f32>(mem, x_, "input");
          auto y = out<M, f32>(mem, y_, "output");
          expect_same_shape(x, y, "input", "output");
          if (n < 0 || c < 1 || l < 0 || n * c * l != x.size())
            fail("batch_norm view does not match the input size");
          const float* w = opt<M, f32>(mem, w_, "weight", false, c);
          const float* b = opt<M, f32>(mem, b_, "bias", false, c);
          const float* rm = opt<M, f32>(mem, rm_, "running_mean", false, c);
          const float* rv = opt<M, f32>(mem, rv_, "running_var", false, c);
          if (rm == nullptr || rv == nullptr) fail("running_mean / running_var required");
          const cuda::Exec ex = mem.exec();
          py::gil_scoped_release nogil;
          cuda::batch_norm_forward_eval(ex, n, c, l, x.data, rm, rv, w, b, eps, y.data);
        });

  m.def("batch_norm_backward",
        [](py::object dy_, py::object x_, py::object mean_, py::object invstd_, py::object w_,
           bool training, py::object dx_, py::object dw_, py::object db_, index_t n, index_t c,
           index_t l) {
          M mem;
          auto dy = in<M, f32>(mem, dy_, "grad_output");
          auto x = in<M, f32>(mem, x_, "input");
          expect_same_shape(dy, x, "grad_output", "input");
          if (n < 0 || c < 1 || l < 0 || n * c * l != x.size())
            fail("batch_norm view does not match the input size");
          const float* mean = opt<M, f32>(mem, mean_, "mean", false, c);
          const float* invstd = opt<M, f32>(mem, invstd_, "invstd", false, c);
          if (mean == nullptr || invstd == nullptr) fail("mean / invstd required");
          const float* w = opt<M, f32>(mem, w_, "weight", false, c);
          float* dx = opt<M, f32>(mem, dx_, "grad_input", true, x.size());
          float* dw = opt<M, f32>(mem, dw_, "grad_weight", true, c);
          float* db = opt<M, f32>(mem, db_, "grad_bias", true, c);
          const cuda::Exec ex = mem.exec();
          py::gil_scoped_release nogil;
          cuda::batch_norm_backward(ex, n, c, l, dy.data, x.data, mean, invstd, w, training, dx,
                                    dw, db);
        });

  // offset_on_device: a 1-element int64 array whose value replaces `offset`
  // when the kernel runs (a captured graph's per-replay offset)
  m.def("dropout_apply", [](py::object x_, py::object y_, double p, std::uint64_t seed,
                            std::uint64_t offset, py::object offset_on_device_) {
    M mem;
    auto y = out<M, f32>(mem, y_, "output");
    const float* x = opt<M, f32>(mem, x_, "input", false, y.size());
    if (!(p >= 0.0 && p <= 1.0)) fail("p must be in [0, 1]");
    const i64* offset_on_device = opt<M, i64>(mem, offset_on_device_, "offset_on_device", false, 1);
    const cuda::Exec ex = mem.exec();
    py::gil_scoped_release nogil;
    cuda::dropout_apply(ex, y.size(), x, p, seed, offset, y.data, offset_on_device);
  }, py::arg("input"), py::arg("output"), py::arg("p"), py::arg("seed"), py::arg("offset"),
     py::arg("offset_on_device") = py::none());

  m.def("normalize_u8", [](py::object x_, py::object mean_, py::object std_, py::object y_,
                           index_t outer, index_t c, index_t inner) {
    M mem;
    auto x = in<M, std::uint8_t>(mem, x_, "input");
    auto y = out<M, f32>(mem, y_, "output");
    if (x.size() != y.size() || outer < 0 || c < 1 || inner < 0 || outer * c * inner != x.size())
      fail("normalize view does not match the input size");
    const float* mean = opt<M, f32>(mem, mean_, "mean", false, c);
    const float* sd = opt<M, f32>(mem, std_, "std", false, c);
    const cuda::Exec ex = mem.exec();
    py::gil_scoped_release nogil;
    cuda::normalize_u8(ex, outer, c, inner, x.data, mean, sd, y.data);
  });

  // Optimizer updates of a list of parameters, in place, in one launch per
  // cuda::kMaxTensors of them; the per-element maths of _cpu.sgd_step /
  // _cpu.adam_step (same bits). optim_tensors checks each (param, grad) pair.
  // scalars: None, or a 2-element float32 array holding lr and momentum (read
  // when the kernel runs: a graph's replays follow a schedule's changes)
  m.def("sgd_step_multi", [](py::list params, py::list grads, py::object bufs_,
                             py::list first_steps, float lr, float momentum, float weight_decay,
                             float undamped_share, bool damped, bool nesterov,
                             py::object scalars_) {
    M mem;
    const bool with_momentum = !bufs_.is_none();
    const size_t n = params.size();
    if (grads.size() != n || first_steps.size() != n ||
        (with_momentum && py::len(bufs_) != n))
      fail("sgd_step_multi: params, grads, momentum buffers and first_steps must have the same "
           "length");
    std::vector<cuda::OptimTensor> tensors = optim_tensors(mem, params, grads);
    for (size_t i = 0; i < n; ++i) {
      tensors[i].first_step = first_steps[i].cast<bool>();
      if (with_momentum) {
        const py::object buf = py::reinterpret_borrow<py::list>(bufs_)[i];
        if (buf.is_none()) fail("sgd_step_multi: a momentum buffer is None");
        tensors[i].state0 = opt<M, f32>(mem, buf, "momentum_buffer", true, tensors[i].size);
      }
    }
    const fastcnn::SgdOptions o{lr, momentum, weight_decay, undamped_share, damped, nesterov,
                                false};
    const float* scalars = opt<M, f32>(mem, scalars_, "scalars", false, 2);
    const cuda::Exec ex = mem.exec();
    py::gil_scoped_release nogil;
    cuda::sgd_step_multi(ex, tensors.data(), static_cast<int>(n), with_momentum, o, scalars);
  }, py::arg("params"), py::arg("grads"), py::arg("momentum_buffers"), py::arg("first_steps"),
     py::arg("lr"), py::arg("momentum"), py::arg("weight_decay"), py::arg("undamped_share"),
     py::arg("damped"), py::arg("nesterov"), py::arg("scalars") = py::none());

  // scalars: None, or a float32 array of 5 + 2 len(params): decay_scale, beta1,
  // 1 - beta1, beta2, 1 - beta2, then each parameter's bias2_sqrt and step_size
  // (read when the kernel runs)
  m.def("adam_step_multi", [](py::list params, py::list grads, py::list exp_avgs,
                              py::list exp_avg_sqs, float beta1, float beta2,
                              float one_minus_beta1, float one_minus_beta2, float eps,
                              float weight_decay, float decay_scale, py::list bias2_sqrts,
                              py::list step_sizes, py::object scalars_) {
    M mem;
    const size_t n = params.size();
    if (grads.size() != n || exp_avgs.size() != n || exp_avg_sqs.size() != n ||
        bias2_sqrts.size() != n || step_sizes.size() != n)
      fail("adam_step_multi: params, grads, exp_avgs, exp_avg_sqs, bias2_sqrts and step_sizes "
           "must have the same length");
    std::vector<cuda::OptimTensor> tensors = optim_tensors(mem, params, grads);
    for (size_t i = 0; i < n; ++i) {
      const index_t size = tensors[i].size;
      tensors[i].state0 = opt<M, f32>(mem, exp_avgs[i], "exp_avg", true, size);
      tensors[i].state1 = opt<M, f32>(mem, exp_avg_sqs[i], "exp_avg_sq", true, size);
      if (tensors[i].state0 == nullptr || tensors[i].state1 == nullptr)
        fail("adam_step_multi: exp_avg and exp_avg_sq are required");
      tensors[i].bias2_sqrt = bias2_sqrts[i].cast<float>();
      tensors[i].step_size = step_sizes[i].cast<float>();
    }
    const fastcnn::AdamOptions o{beta1, beta2,        one_minus_beta1, one_minus_beta2, eps,
                                 weight_decay, decay_scale, 1.0f, 0.0f};
    const float* scalars =
        opt<M, f32>(mem, scalars_, "scalars", false, 5 + 2 * static_cast<index_t>(n));
    const cuda::Exec ex = mem.exec();
    py::gil_scoped_release nogil;
    cuda::adam_step_multi(ex, tensors.data(), static_cast<int>(n), o, scalars);
  }, py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"),
     py::arg("beta1"), py::arg("beta2"), py::arg("one_minus_beta1"), py::arg("one_minus_beta2"),
     py::arg("eps"), py::arg("weight_decay"), py::arg("decay_scale"), py::arg("bias2_sqrts"),
     py::arg("step_sizes"), py::arg("scalars") = py::none());

  // Graphs: launches on the current stream between graph_begin() and
  // graph_end() are captured (not run); the Graph's launch() replays them.
  m.def("graph_begin", [] {
    M mem;
    cuda::graph_begin(mem.exec());
  });
  m.def("graph_end", [] {
    M mem;
    return cuda::graph_end(mem.exec());
  });

  m.def("gemm_kernel", &cuda::gemm_kernel_name);
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() =
      "fastcnn CUDA kernels: the functions of fastcnn._cpu on CuPy arrays (CuPy's current "
      "stream). Use fastcnn.functional, not this module. fastcnn._cuda.emulator runs the same "
      "kernel code on the host, on NumPy arrays, for testing without a GPU.";

  py::register_exception<cuda::CudaError>(m, "CudaError", PyExc_RuntimeError);

  m.def("is_available", &cuda::is_available,
        "True when a CUDA device and driver are usable, with code for the device's "
        "architecture in this build (never raises).");
  m.def("unavailable_reason", &cuda::unavailable_reason,
        "Why is_available() is False ('' when it is True).");
  m.def("device_count", &cuda::device_count, "Number of CUDA devices (0 without a driver).");
  m.def(
      "device_name",
      [](int device) {
        const int count = cuda::device_count();
        if (device < 0 || device >= count)
          fail("device " + std::to_string(device) + " out of range: " + std::to_string(count) +
               " CUDA device(s)");
        cudaDeviceProp prop{};
        FASTCNN_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
        return std::string(prop.name);
      },
      py::arg("device") = 0);
  m.def("synchronize", [] {
    py::gil_scoped_release nogil;
    FASTCNN_CUDA_CHECK(cudaDeviceSynchronize());
  });
  m.def("set_allow_tf32", &cuda::set_allow_tf32, py::arg("allow"),
        "Let every GEMM (matmul, linear, conv2d) use TF32 tensor cores (off by default).");
  m.def("get_allow_tf32", &cuda::allow_tf32);
  py::class_<cuda::Graph>(m, "Graph",
                          "A captured sequence of kernel launches (graph_begin / graph_end).")
      .def("launch", [](cuda::Graph& g) {
        cuda::Exec ex;
        if (g.emulated()) {
          ex.emulated = true;
        } else {
          DeviceArrays mem;
          ex = mem.exec();
        }
        py::gil_scoped_release nogil;
        g.launch(ex);
      }, "Replay the launches on the current stream (CuPy's), in capture order.")
      .def_property_readonly("kernels", &cuda::Graph::kernels,
                             "Launches recorded (emulated graphs; -1 on a GPU).");
  bind_ops<DeviceArrays>(m);

  py::module_ emulator = m.def_submodule(
      "emulator",
      "The CUDA kernels run on the host (slow; for testing without a GPU): the functions of "
      "fastcnn._cpu on NumPy arrays.");
  bind_ops<HostArrays>(emulator);
  emulator.def("launches", &cuda::emulated_launches,
               "Kernels emulated so far, by name: {kernel: count} (each one a launch on a GPU).");
  emulator.def("use_gpu_workspace_budget", &cuda::set_emulated_workspace_budget, py::arg("on"),
               "Chunk convolutions by the GPU's workspace budget (True) rather than the "
               "emulator's small one (False, the default), so as to launch what a GPU would.");
}
