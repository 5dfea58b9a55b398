// Shared definitions for the CPU and CUDA kernels: index type, host/device
// annotations, and the thread-count knob of the CPU backend.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FASTCNN_HD __host__ __device__ __forceinline__
#else
#define FASTCNN_HD inline
#endif

namespace fastcnn {

// All sizes and offsets are 64-bit: a 4096x4096 feature map times a batch
// overflows 32 bits long before it exhausts memory.
using index_t = std::int64_t;

// Threads used by every CPU kernel (OpenMP). Reductions never depend on it:
// every kernel partitions its work so that results are bitwise identical for
// any thread count.
int num_threads();
void set_num_threads(int n);

}  // namespace fastcnn
