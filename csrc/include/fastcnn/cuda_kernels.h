// The CUDA kernels: the twins of fastcnn/cpu_kernels.h, same arguments and
// semantics, with an Exec in front that says where they run. Pointers are
// device memory, C-contiguous, NCHW; outputs are allocated by the caller;
// nothing synchronises the host. Every launch is checked (fastcnn/cuda_check.h).
//
// An Exec either names a CUDA stream, or asks for emulation: the same kernel
// bodies run on the host, thread by thread, with host pointers (see
// fastcnn/cuda_launch.h). Emulation is how the CUDA code is tested on
// machines without a GPU; it is slow and meant for small problems only.
//
// Results are deterministic: no floating-point atomics, every sum in a fixed
// order that depends only on the shapes.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>

#include "fastcnn/common.h"
#include "fastcnn/conv_geometry.h"
#include "fastcnn/gemm.h"
#include "fastcnn/optim_math.h"

namespace fastcnn {
namespace cuda {

struct Exec {
  cudaStream_t stream = nullptr;
  bool emulated = false;
};

// ---- launch.cu: the runtime
// A CUDA device is present and usable. Never throws; makes no CUDA call
// until first asked (importing the module needs no driver).
// A CUDA device whose architecture this build has code for is present.
bool is_available() noexcept;
int device_count() noexcept;
// Why the current device cannot run this build's kernels ("" when it can):
// no device, or an architecture the build has no code for (cudaErrorNoKernelImageForDevice).
std::string unavailable_reason();
// TF32 tensor cores for every GEMM (matmul, linear, conv2d), off by default,
// like torch.backends.cuda.matmul.allow_tf32.
void set_allow_tf32(bool allow);
bool allow_tf32();
// Kernels emulated so far, by name (each one a launch on a GPU): tests count
// a training step's launches with it.
std::map<std::string, std::int64_t> emulated_launches();
// ---- launch.cu: graphs. Between graph_begin and graph_end, the launches on
// ex's stream are captured (relaxed mode: CuPy may still allocate), not run;
// the Graph replays them, with the same arguments and memory, on any stream.
// Scratch memory taken while capturing belongs to the graph. Emulated, the
// kernels are recorded on the host and replayed the same way.
class Graph {
 public:
  virtual ~Graph() = default;
  virtual void launch(const Exec& ex) = 0;
  virtual bool emulated() const = 0;
  virtual std::int64_t kernels() const = 0;  // launches recorded (emulated; -1 on a GPU)
};
void graph_begin(const Exec& ex);
std::unique_ptr<Graph> graph_end(const Exec& ex);

// The emulator cuts convolutions into chunks of images by a small workspace
// budget (so that tests exercise the chunking); `gpu` gives it the GPU's, so
// that it launches what a GPU would.
void set_emulated_workspace_budget(bool gpu);

// ---- gemm.cu
// One operand of a GEMM seen as an (outer x k) matrix, outer being m for A
// and n for B: element (o, k) of batch b lives at
//   ptr + b * batch_stride + segment(o) + k_segment(k),
//   segment(o) = o * o_stride                                      (seg == 0)
//              = (o / seg) * seg_stride + (o % seg) * o_stride     (seg > 0)
//   k_segment(k) = k * k_stride                                    (k_seg == 0)
//                = (k / k_seg) * k_seg_stride + (k % k_seg) * k_stride
// Segments let the columns of a convolution run over several images of an
// NCHW tensor without a copy (along outer for the forward, along k for the
// weight gradient, whose k runs over images and pixels).
struct GemmOperand {
  const float* ptr = nullptr;
  index_t o_stride = 0, k_stride = 0;
  index_t seg = 0, seg_stride = 0;
  index_t batch_stride = 0;
  index_t k_seg = 0, k_seg_stride = 0;
};

inline GemmOperand make_operand(const float* ptr, index_t o_stride, index_t k_stride,
                                index_t batch_stride = 0, index_t seg = 0,
                                index_t seg_stride = 0) {
  GemmOperand op;
  op.ptr = ptr;
  op.o_stride = o_stride;
  op.k_stride = k_stride;
  op.seg = seg;
  op.seg_stride = seg_stride;
  op.batch_stride = batch_stride;
  return op;
}

// Element (i, j) of batch b of C: ptr + b * batch_stride + i * row_stride +
// (j / seg) * seg_stride + j % seg  (or + j when seg == 0).
struct GemmOutput {
  float* ptr = nullptr;
  index_t row_stride = 0;
  index_t seg = 0, seg_stride = 0;
  index_t batch_stride = 0;
};

inline GemmOutput make_output(float* ptr, index_t row_stride, index_t batch_stride = 0,
                              index_t seg = 0, index_t seg_stride = 0) {
  GemmOutput out;
  out.ptr = ptr;
  out.row_stride = row_stride;
  out.seg = seg;
  out.seg_stride = seg_stride;
  out.batch_stride = batch_stride;
  return out;
}

// For each batch b < batch:
//   C[b] = act(alpha * A[b] @ B[b]^T + beta * C[b] + bias[b])
// A: (m x k), B: (n x k) operand views; beta == 0 never reads C; bias (null,
// or per row i / per column j with bias_batch_stride between batches); act
// is ReLU when relu is set. When implicit_conv is set, B is not read from
// memory: it is im2col of conv_input under that geometry (outer = image *
// oh * ow + pixel, k = (channel in group, tap), batch = group), computed
// while loading tiles; with implicit_transposed, its transpose (outer =
// (channel in group, tap), k = image * oh * ow + pixel: the weight gradient's).
struct GemmProblem {
  index_t m = 0, n = 0, k = 0, batch = 1;
  GemmOperand a, b;
  GemmOutput c;
  float alpha = 1.0f, beta = 0.0f;
  const float* bias = nullptr;
  index_t bias_batch_stride = 0;
  bool bias_per_row = true;
  bool relu = false;
  const ConvShape* implicit_conv = nullptr;
  bool implicit_transposed = false;
  const float* conv_input = nullptr;
};
void gemm(const Exec& ex, const GemmProblem& p);

// The row-major BLAS-style entry (fastcnn/gemm.h semantics, beta == 0 never reads C).
void sgemm(const Exec& ex, Trans ta, Trans tb, index_t m, index_t n, index_t k, float alpha,
           const float* a, index_t lda, const float* b, index_t ldb, float beta, float* c,
           index_t ldc);

// Which GEMM kernel a large product uses now (it depends on allow_tf32).
const char* gemm_kernel_name();

// ---- im2col.cu: whole batches, all groups at once. The column matrix
// cols: (c * r * s, n * oh * ow); row (ci, ri, si), column (image, pixel);
// with groups, rows [g * c/groups * r * s, ...) belong to group g.
// cols -> dx: (n, c, h, w), overwritten: every input pixel gathers the
// column entries copied from it, taps in (ri, si) order (no atomics).
void col2im(const Exec& ex, const ConvShape& cs, const float* cols, float* dx);

// ---- conv2d.cu
// relu: y = relu(conv + bias), the ReLU applied in the GEMM's epilogue.
void conv2d_forward(const Exec& ex, const ConvShape& cs, const float* x, const float* w,
                    const float* bias, float* y, bool relu = false);
void conv2d_backward(const Exec& ex, const ConvShape& cs, const float* dy, const float* x,
                     const float* w, float* dx, float* dw, float* db);

// ---- linear.cu
// relu: y = relu(x w^T + bias), the ReLU applied in the GEMM's epilogue.
void linear_forward(const Exec& ex, index_t n, index_t in, index_t out, const float* x,
                    const float* w, const float* bias, float* y, bool relu = false);
void linear_backward(const Exec& ex, index_t n, index_t in, index_t out, const float* dy,
                     const float* x, const float* w, float* dx, float* dw, float* db);

// ---- activation.cu
void relu_forward(const Exec& ex, index_t count, const float* x, float* y);
void relu_backward(const Exec& ex, index_t count, const float* dy, const float* x, bool guided,
                   float* dx);

// ---- pool.cu (indices are read only where they match a window: the
// gradient is gathered per input pixel, as PyTorch's CUDA kernel does)
// With `relu`: max_pool2d(relu(x)) (indices stay those of x) and its gradient
// w.r.t. x, each in one launch.
void max_pool2d_forward(const Exec& ex, const PoolShape& ps, const float* x, float* y,
                        std::int64_t* indices, bool relu = false);
void max_pool2d_backward(const Exec& ex, const PoolShape& ps, const float* dy, const float* x,
                         const std::int64_t* indices, bool relu, float* dx);

// ---- softmax.cu (a target outside [0, classes) that is not ignore_index
// gives NaN: the caller validates, the kernel only stays in bounds)
void softmax_forward(const Exec& ex, index_t outer, index_t dim, index_t inner, const float* x,
                     bool log, float* y);
void softmax_backward(const Exec& ex, index_t outer, index_t dim, index_t inner, const float* dy,
                      const float* y, bool log, float* dx);
void cross_entropy_forward(const Exec& ex, index_t n, index_t classes, const float* logits,
                           const std::int64_t* target, std::int64_t ignore_index,
                           float label_smoothing, float* loss);
void cross_entropy_backward(const Exec& ex, index_t n, index_t classes, const float* logits,
                            const std::int64_t* target, std::int64_t ignore_index,
                            float label_smoothing, const float* grad_scale, float* dx);

// The reductions without a host round trip (one block; status and total in
// device memory): status[0] = targets != ignore_index, status[1] = those
// outside [0, classes), status[2] = rows whose argmax is their target; when
// total is not null, also *total = the sum of the
// rows' losses (double, fixed order), over status[0] when `mean` (NaN when 0).
void cross_entropy_total(const Exec& ex, index_t n, index_t classes, const float* logits,
                         const std::int64_t* target, std::int64_t ignore_index,
                         float label_smoothing, bool mean, float* total, std::int64_t* status);
// The gradient for a scalar upstream gradient (*grad on the device, or
// grad_value when grad is null), the mean's divisor read from `status`.
void cross_entropy_backward_scalar(const Exec& ex, index_t n, index_t classes,
                                   const float* logits, const std::int64_t* target,
                                   std::int64_t ignore_index, float label_smoothing,
                                   const float* grad, float grad_value,
                                   const std::int64_t* status, bool mean, float* dx);

// ---- batchnorm.cu
void batch_norm_forward_train(const Exec& ex, index_t n, index_t c, index_t l, const float* x,
                              const float* weight, const float* bias, double eps,
                              double momentum, float* running_mean, float* running_var,
                              float* y, float* save_mean, float* save_invstd);
void batch_norm_forward_eval(const Exec& ex, index_t n, index_t c, index_t l, const float* x,
                             const float* running_mean, const float* running_var,
                             const float* weight, const float* bias, double eps, float* y);
void batch_norm_backward(const Exec& ex, index_t n, index_t c, index_t l, const float* dy,
                         const float* x, const float* mean, const float* invstd,
                         const float* weight, bool training, float* dx, float* dweight,
                         float* dbias);

// ---- dropout.cu (bit-identical masks to the CPU kernel)
// offset_on_device: read the offset there instead (a graph replayed with a new
// offset each time, see fastcnn.capture).
void dropout_apply(const Exec& ex, index_t count, const float* x, double p, std::uint64_t seed,
                   std::uint64_t offset, float* y, const std::int64_t* offset_on_device = nullptr);

// ---- normalize.cu (bit-identical to the CPU kernel)
void normalize_u8(const Exec& ex, index_t outer, index_t c, index_t inner, const std::uint8_t* x,
                  const float* mean, const float* stdev, float* y);

// ---- optim.cu: optimizer updates of many parameters, in place, one launch
// per kMaxTensors of them (fastcnn/optim_math.h's maths: the CPU's bits).
constexpr int kMaxTensors = 32;
struct OptimTensor {
  float* p = nullptr;
  const float* g = nullptr;
  float* state0 = nullptr;  // SGD: the momentum buffer (null: no momentum); Adam: exp_avg
  float* state1 = nullptr;  // Adam: exp_avg_sq
  index_t size = 0;
  bool first_step = false;  // SGD: the buffer starts as the gradient
  float bias2_sqrt = 1.0f, step_size = 0.0f;  // Adam: this tensor's (its step count's)
};
// The scalars an update reads from device memory instead of its arguments, so
// that a captured graph replays with new ones (see fastcnn.capture); null: none.
//   SGD: lr at scalars[0].  Adam: decay_scale at scalars[0], tensor i's
//   bias2_sqrt and step_size at scalars[1 + 2 i] and scalars[2 + 2 i].
// SGD with momentum when `momentum` (every tensor has a buffer), else plain.
// The options' first_step is ignored: each tensor says its own.
void sgd_step_multi(const Exec& ex, const OptimTensor* tensors, int n, bool momentum,
                    const SgdOptions& o, const float* scalars = nullptr);
// The options' bias2_sqrt and step_size are ignored: each tensor has its own.
void adam_step_multi(const Exec& ex, const OptimTensor* tensors, int n, const AdamOptions& o,
                     const float* scalars = nullptr);

}  // namespace cuda
}  // namespace fastcnn
