// Fully connected layer on the shared GEMM: y = x w^T + b.
#include <algorithm>

#include "fastcnn/cpu_kernels.h"
#include "fastcnn/gemm.h"
#include "fastcnn/parallel.h"

namespace fastcnn {
namespace cpu {

void linear_forward(index_t n, index_t in, index_t out, const float* x, const float* w,
                    const float* bias, float* y) {
  // x: (n, in), w: (out, in), bias: (out,) or null -> y: (n, out)
  if (bias != nullptr) {
    parallel_for(n, std::max<index_t>(1, 16384 / std::max<index_t>(out, 1)), [&](index_t i) {
      std::copy(bias, bias + out, y + i * out);
    });
  }
  sgemm(Trans::No, Trans::Yes, n, out, in, 1.0f, x, in, w, in, bias != nullptr ? 1.0f : 0.0f, y,
        out);
}

void linear_backward(index_t n, index_t in, index_t out, const float* dy, const float* x,
                     const float* w, float* dx, float* dw, float* db) {
  // dy: (n, out) -> dx (n, in) = dy @ w;  dw (out, in) = dy^T @ x;  db (out,) = sum_n dy
  if (dx != nullptr) sgemm(Trans::No, Trans::No, n, in, out, 1.0f, dy, out, w, in, 0.0f, dx, in);
  if (dw != nullptr) sgemm(Trans::Yes, Trans::No, out, in, n, 1.0f, dy, out, x, in, 0.0f, dw, in);
  if (db != nullptr) {
    // Column sums in blocks of columns: rows in order, so thread-independent.
    constexpr index_t kBlock = 64;
    parallel_for((out + kBlock - 1) / kBlock, 1, [&](index_t blk) {
      const index_t j0 = blk * kBlock, j1 = std::min(out, j0 + kBlock);
      double acc[kBlock] = {};
      for (index_t i = 0; i < n; ++i)
        for (index_t j = j0; j < j1; ++j) acc[j - j0] += dy[i * out + j];
      for (index_t j = j0; j < j1; ++j) db[j] = static_cast<float>(acc[j - j0]);
    });
  }
}

}  // namespace cpu
}  // namespace fastcnn
