// CUDA error checking: every runtime call and every kernel launch is
// checked, and a failure becomes a CudaError (a std::runtime_error, so a
// Python RuntimeError through pybind11) that names the call or the kernel.
#pragma once

#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

namespace fastcnn {
namespace cuda {

class CudaError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// "<what>: cudaErrorX (description)"
[[noreturn]] void throw_cuda_error(cudaError_t err, const std::string& what);

inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw_cuda_error(err, what);
}

// After a kernel launch: a launch error (bad configuration, no device, an
// earlier asynchronous fault) is reported against `kernel`. With the
// environment variable FASTCNN_CUDA_SYNC=1 the stream is also synchronised,
// so a fault inside the kernel is reported against the kernel that caused it
// (as CUDA_LAUNCH_BLOCKING does); streams being captured into a graph are
// never synchronised.
void check_launch(const char* kernel, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastcnn

#define FASTCNN_CUDA_CHECK(expr) ::fastcnn::cuda::check((expr), #expr)
