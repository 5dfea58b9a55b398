// Single-precision GEMM: the one interface every matrix product in fastcnn
// goes through (conv2d, linear, and their backward passes).
#pragma once

#include "fastcnn/common.h"

namespace fastcnn {

enum class Trans : bool { No = false, Yes = true };

// C[M, N] = alpha * op(A)[M, K] @ op(B)[K, N] + beta * C, row-major.
//   op(A)(i, k) = A[i * lda + k], or A[k * lda + i] when ta == Trans::Yes
//   op(B)(k, j) = B[k * ldb + j], or B[j * ldb + k] when tb == Trans::Yes
// beta == 0 never reads C (it may hold garbage). Uses the fastcnn thread
// count unless called from inside a parallel region, where it runs serially.
// Each element of C is accumulated in the same order whatever the number of
// threads, so results are bitwise reproducible.
void sgemm(Trans ta, Trans tb, index_t m, index_t n, index_t k, float alpha,
           const float* a, index_t lda, const float* b, index_t ldb, float beta,
           float* c, index_t ldc);

// Name of the micro-kernel chosen for this CPU ("avx512", "avx2+fma" or
// "generic"), for benchmarks and bug reports.
const char* sgemm_kernel_name();

}  // namespace fastcnn
