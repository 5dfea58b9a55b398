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

// The same product with op(B) handed over already packed, for callers that
// can write it in that layout straight from their own data (conv2d packs
// im2col's output this way, saving a pass over it). b_packed holds
// ceil(n / w) panels, w = sgemm_panel_width(): panel q is k rows of w floats,
// row p holding op(B)(p, q w .. q w + w - 1), zeros past column n; panel q
// starts at b_packed + q * k * w, 64-byte aligned.
void sgemm_packed_b(Trans ta, index_t m, index_t n, index_t k, float alpha, const float* a,
                    index_t lda, const float* b_packed, float beta, float* c, index_t ldc);
int sgemm_panel_width();

// Both operands packed by the caller: a_packed holds ceil(m / h) panels,
// h = sgemm_panel_height(): panel r is k rows of h floats, row p holding
// op(A)(r h .. r h + h - 1, p), zeros past row m; panel r starts at
// a_packed + r * k * h. b_packed as for sgemm_packed_b.
void sgemm_packed(index_t m, index_t n, index_t k, float alpha, const float* a_packed,
                  const float* b_packed, float beta, float* c, index_t ldc);
int sgemm_panel_height();
// Whether a product of depth k sums in one block: C = beta C + acc, once per
// element (deeper, each further block adds to C).
bool sgemm_single_block(index_t k);
// op(A) (m x k) packed in that layout, for a product repeated with the same A
// (a convolution's weights over its image chunks): sgemm_packed_a_floats(m, k)
// floats at a_packed.
index_t sgemm_packed_a_floats(index_t m, index_t k);
void sgemm_pack_a(Trans ta, index_t m, index_t k, const float* a, index_t lda, float* a_packed);
// op(A) packed by sgemm_pack_a (or written in its layout), op(B) as in sgemm:
// a product repeated with the same A over many B (Winograd's transformed
// weights over the tiles of a batch).
void sgemm_prepacked_a(index_t m, index_t n, index_t k, float alpha, const float* a_packed,
                       Trans tb, const float* b, index_t ldb, float beta, float* c,
                       index_t ldc);

// Name of the micro-kernel chosen for this CPU ("avx512", "avx2+fma" or
// "generic"), for benchmarks and bug reports.
const char* sgemm_kernel_name();

}  // namespace fastcnn
