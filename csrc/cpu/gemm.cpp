// Packed SGEMM in the BLIS / GotoBLAS style.
//
// C (M x N) is cut into NC-wide column slabs; each slab's op(B) is packed KC
// rows at a time into NR-wide micro-panels (B~, k-major), and op(A) into
// MR-tall micro-panels (A~, k-major) MC rows at a time. A register-blocked
// micro-kernel multiplies one A~ panel by one B~ panel into an MR x NR tile of
// C. Packing makes every micro-kernel load contiguous and aligned whatever
// the transposition of the operands, so the backward passes never build a
// transposed copy. Each A~ micro-panel (12 broadcasts per step, 48 bytes)
// stays in L1 while the B~ micro-panels of the slab (two vectors per step)
// stream past it from L2: the smaller per-step operand is the resident one,
// which allows a deep KC and so fewer read-modify-writes of C.
//
// The micro-kernel is picked at run time from the CPU's features: the build
// stays portable (no -march=native) and the SIMD kernels carry target
// attributes.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>

#include "fastcnn/gemm.h"
#include "fastcnn/parallel.h"
#include "fastcnn/scratch.h"

namespace fastcnn {
namespace {

// c(mr x nr, row stride ldc) = alpha * a~(kc x mr)^T b~(kc x nr) + beta * c.
using MicroKernel = void (*)(index_t kc, const float* a, const float* b, float* c,
                             index_t ldc, float alpha, float beta);

struct KernelInfo {
  int mr;
  int nr;
  MicroKernel fn;
  const char* name;
  // Optional kernels for the first 4 * (i + 1) rows of an A~ panel, used for
  // a last panel with that few rows; null where the kernel has none.
  MicroKernel rows4[2] = {nullptr, nullptr};
};

// ---------------------------------------------------------------- kernels --

template <int MR, int NR>
void micro_kernel_generic(index_t kc, const float* a, const float* b, float* c,
                          index_t ldc, float alpha, float beta) {
  float acc[MR][NR] = {};
  for (index_t p = 0; p < kc; ++p) {
    for (int i = 0; i < MR; ++i) {
      const float ai = a[p * MR + i];
      for (int j = 0; j < NR; ++j) acc[i][j] += ai * b[p * NR + j];
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) {
      float v = alpha * acc[i][j];
      c[i * ldc + j] = beta == 0.0f ? v : v + beta * c[i * ldc + j];
    }
  }
}

// 6 x 16 tile: 12 accumulators, 2 B vectors and 1 broadcast in 16 ymm registers.
__attribute__((target("avx2,fma"))) void micro_kernel_avx2_6x16(
    index_t kc, const float* a, const float* b, float* c, index_t ldc, float alpha,
    float beta) {
  __m256 acc[6][2];
  for (int i = 0; i < 6; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (index_t p = 0; p < kc; ++p) {
    const __m256 b0 = _mm256_load_ps(b);
    const __m256 b1 = _mm256_load_ps(b + 8);
    for (int i = 0; i < 6; ++i) {
      const __m256 ai = _mm256_broadcast_ss(a + i);
      acc[i][0] = _mm256_fmadd_ps(ai, b0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(ai, b1, acc[i][1]);
    }
    a += 6;
    b += 16;
  }
  const __m256 va = _mm256_set1_ps(alpha);
  if (beta == 0.0f) {
    for (int i = 0; i < 6; ++i) {
      _mm256_storeu_ps(c + i * ldc, _mm256_mul_ps(va, acc[i][0]));
      _mm256_storeu_ps(c + i * ldc + 8, _mm256_mul_ps(va, acc[i][1]));
    }
  } else {
    const __m256 vb = _mm256_set1_ps(beta);
    for (int i = 0; i < 6; ++i) {
      float* ci = c + i * ldc;
      _mm256_storeu_ps(ci, _mm256_fmadd_ps(vb, _mm256_loadu_ps(ci), _mm256_mul_ps(va, acc[i][0])));
      _mm256_storeu_ps(ci + 8,
                       _mm256_fmadd_ps(vb, _mm256_loadu_ps(ci + 8), _mm256_mul_ps(va, acc[i][1])));
    }
  }
}

// Asks for the lines of a ROWS x 32 tile of C: three a row, as a row of C
// need not start on a line.
template <int ROWS, int HINT>
__attribute__((target("avx512f"), always_inline)) inline void prefetch_tile(const float* c,
                                                                            index_t ldc) {
  for (int i = 0; i < ROWS; ++i) {
    const char* row = reinterpret_cast<const char*>(c + i * ldc);
    _mm_prefetch(row, static_cast<_mm_hint>(HINT));
    _mm_prefetch(row + 64, static_cast<_mm_hint>(HINT));
    _mm_prefetch(row + 124, static_cast<_mm_hint>(HINT));
  }
}

// ROWS x 32 tile from A~ panels 12 rows wide: 2 * ROWS accumulators, 2 B
// vectors and 1 broadcast in at most 32 zmm registers. ROWS = 12 is the main
// kernel; 4 and 8 do the last panel of an M that is not a multiple of 12
// (M = 64 is 5 x 12 + 4) without computing the zero rows of its padding.
template <int ROWS>
__attribute__((target("avx512f"))) void micro_kernel_avx512_rows(
    index_t kc, const float* a, const float* b, float* c, index_t ldc, float alpha,
    float beta) {
  __m512 acc[ROWS][2];
  for (int i = 0; i < ROWS; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  // The tile of C is touched only after the loop, and in a large product it
  // is far away (L3 or memory): a deep loop first asks for its lines into
  // L2 (the B~ panel streaming through L1 would evict them there), then,
  // 24 steps before the end, into L1, so that the update does not wait.
  constexpr index_t kTail = 24;
  const index_t prefetch_l1 = kc >= 4 * kTail ? kc - kTail : -1;
  if (prefetch_l1 >= 0) prefetch_tile<ROWS, _MM_HINT_T1>(c, ldc);
  for (index_t p = 0; p < kc; ++p) {
    if (p == prefetch_l1) prefetch_tile<ROWS, _MM_HINT_T0>(c, ldc);
    const __m512 b0 = _mm512_load_ps(b);
    const __m512 b1 = _mm512_load_ps(b + 16);
    for (int i = 0; i < ROWS; ++i) {
      const __m512 ai = _mm512_set1_ps(a[i]);
      acc[i][0] = _mm512_fmadd_ps(ai, b0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(ai, b1, acc[i][1]);
    }
    a += 12;
    b += 32;
  }
  const __m512 va = _mm512_set1_ps(alpha);
  if (beta == 0.0f) {
    for (int i = 0; i < ROWS; ++i) {
      _mm512_storeu_ps(c + i * ldc, _mm512_mul_ps(va, acc[i][0]));
      _mm512_storeu_ps(c + i * ldc + 16, _mm512_mul_ps(va, acc[i][1]));
    }
  } else {
    const __m512 vb = _mm512_set1_ps(beta);
    for (int i = 0; i < ROWS; ++i) {
      float* ci = c + i * ldc;
      _mm512_storeu_ps(ci, _mm512_fmadd_ps(vb, _mm512_loadu_ps(ci), _mm512_mul_ps(va, acc[i][0])));
      _mm512_storeu_ps(ci + 16, _mm512_fmadd_ps(vb, _mm512_loadu_ps(ci + 16),
                                                _mm512_mul_ps(va, acc[i][1])));
    }
  }
}

KernelInfo choose_kernel() {
  // FASTCNN_GEMM_KERNEL=generic|avx2|avx512 forces a kernel (tests, benchmarks);
  // an unsupported request falls back to the best the CPU has.
  const char* forced = std::getenv("FASTCNN_GEMM_KERNEL");
  const bool has_avx512 = __builtin_cpu_supports("avx512f");
  const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const KernelInfo generic{6, 16, micro_kernel_generic<6, 16>, "generic"};
  const KernelInfo avx2{6, 16, micro_kernel_avx2_6x16, "avx2+fma"};
  const KernelInfo avx512{12, 32, micro_kernel_avx512_rows<12>, "avx512",
                          {micro_kernel_avx512_rows<4>, micro_kernel_avx512_rows<8>}};
  if (forced != nullptr) {
    if (std::strcmp(forced, "generic") == 0) return generic;
    if (std::strcmp(forced, "avx2") == 0 && has_avx2) return avx2;
    if (std::strcmp(forced, "avx512") == 0 && has_avx512) return avx512;
  }
  if (has_avx512) return avx512;
  if (has_avx2) return avx2;
  return generic;
}

const KernelInfo& kernel() {
  static const KernelInfo k = choose_kernel();
  return k;
}

// ---------------------------------------------------------------- packing --

constexpr index_t kKC = 512;   // depth of a packed block: an A~ micro-panel (24 KiB) stays in L1
constexpr index_t kMC = 264;   // rows of A~ per block (multiple of every MR), streamed from L3
constexpr index_t kNC = 768;   // columns of B~ per slab (multiple of every NR): kc x 768 (1.5 MiB) in L2
// An A~ of at least this many floats (1 MiB: beyond what packing from L2
// makes cheap) is packed once for all threads rather than once per thread.
constexpr index_t kSharedAFloats = index_t(1) << 18;

// Copies `count` contiguous runs of `len` floats (run r at src + r * ld) into
// column r of dst (row stride `stride`): a transpose, done in 4 x 4 blocks in
// SSE registers (baseline x86-64) so that whole vectors are written rather
// than one float per cache line. Packs A~ from an untransposed A and B~ from
// a transposed B.
// out[d] = depth p + d of runs [0, rows) (rows <= 16, run i at src + i * ld),
// lane i for run i (absent runs read as zero): a 16 x 16 transpose in zmm
// registers.
__attribute__((target("avx512f"))) inline void transpose16_avx512(const float* src, index_t ld,
                                                                 int rows, index_t p,
                                                                 __m512 out[16]) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i)
    r[i] = i < rows ? _mm512_loadu_ps(src + i * ld + p) : _mm512_setzero_ps();
  // Pairs, then quads within each 128-bit lane ...
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int j = 0; j < 4; ++j) {
    r[4 * j + 0] = _mm512_shuffle_ps(t[4 * j], t[4 * j + 2], 0x44);
    r[4 * j + 1] = _mm512_shuffle_ps(t[4 * j], t[4 * j + 2], 0xEE);
    r[4 * j + 2] = _mm512_shuffle_ps(t[4 * j + 1], t[4 * j + 3], 0x44);
    r[4 * j + 3] = _mm512_shuffle_ps(t[4 * j + 1], t[4 * j + 3], 0xEE);
  }
  // ... now lane L of r[4 j + k] holds depth 4 L + k of runs 4 j .. 4 j + 3:
  // gather the four lanes L of r[k], r[4 + k], r[8 + k], r[12 + k].
  for (int k = 0; k < 4; ++k) {
    const __m512 v0 = _mm512_shuffle_f32x4(r[k], r[4 + k], 0x88);
    const __m512 w0 = _mm512_shuffle_f32x4(r[k], r[4 + k], 0xDD);
    const __m512 v1 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0x88);
    const __m512 w1 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0xDD);
    out[k] = _mm512_shuffle_f32x4(v0, v1, 0x88);
    out[4 + k] = _mm512_shuffle_f32x4(w0, w1, 0x88);
    out[8 + k] = _mm512_shuffle_f32x4(v0, v1, 0xDD);
    out[12 + k] = _mm512_shuffle_f32x4(w0, w1, 0xDD);
  }
}

// Transposes runs [0, rows) (rows <= 16) over depth [0, len - len % 16) into
// dst (row stride `stride`), lanes of absent runs not stored. Returns the
// depth done.
__attribute__((target("avx512f"))) index_t transpose_runs_avx512(const float* src, index_t ld,
                                                                 int rows, index_t len,
                                                                 float* dst, index_t stride) {
  const __mmask16 keep = rows >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << rows) - 1);
  index_t p = 0;
  for (; p + 16 <= len; p += 16) {
    __m512 out[16];
    transpose16_avx512(src, ld, rows, p, out);
    for (int d = 0; d < 16; ++d) _mm512_mask_storeu_ps(dst + (p + d) * stride, keep, out[d]);
  }
  return p;
}

// 12 runs into a 12-wide panel (A~ of the AVX-512 kernel), depth [0, len -
// len % 16): each 16-deep block is 192 contiguous floats, written as 12 full
// vectors compacted from the transpose's 16 twelve-lane ones (no masked or
// overlapping stores). Returns the depth done.
__attribute__((target("avx512f"))) index_t pack_12_runs_avx512(const float* src, index_t ld,
                                                              index_t len, float* dst) {
  // out q of each group of three takes lanes from two consecutive depths
  const __m512i take0 = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 16, 17, 18, 19);
  const __m512i take1 = _mm512_setr_epi32(4, 5, 6, 7, 8, 9, 10, 11, 16, 17, 18, 19, 20, 21, 22, 23);
  const __m512i take2 = _mm512_setr_epi32(8, 9, 10, 11, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27);
  index_t p = 0;
  for (; p + 16 <= len; p += 16) {
    __m512 t[16];
    transpose16_avx512(src, ld, 12, p, t);
    float* out = dst + p * 12;
    for (int g = 0; g < 4; ++g) {  // depths 4 g .. 4 g + 3: 48 floats
      _mm512_storeu_ps(out + 48 * g, _mm512_permutex2var_ps(t[4 * g], take0, t[4 * g + 1]));
      _mm512_storeu_ps(out + 48 * g + 16,
                       _mm512_permutex2var_ps(t[4 * g + 1], take1, t[4 * g + 2]));
      _mm512_storeu_ps(out + 48 * g + 32,
                       _mm512_permutex2var_ps(t[4 * g + 2], take2, t[4 * g + 3]));
    }
  }
  return p;
}

void pack_runs_as_columns(const float* src, index_t ld, index_t count, index_t len,
                          float* dst, index_t stride) {
  index_t r = 0;
  if (kernel().nr == 32) {  // the AVX-512 kernel: 16 x 16 blocks, then the depth's tail
    for (; count - r >= 16; r += 16) {
      const int rows = static_cast<int>(std::min<index_t>(16, count - r));
      index_t p = transpose_runs_avx512(src + r * ld, ld, rows, len, dst + r, stride);
      for (; p < len; ++p)
        for (int i = 0; i < rows; ++i) dst[p * stride + r + i] = src[(r + i) * ld + p];
    }
  }
  if (kernel().nr == 32 && count - r == 12 && stride == 12) {  // a whole 12-row A~ panel
    index_t p = pack_12_runs_avx512(src + r * ld, ld, len, dst + r);
    for (; p < len; ++p)
      for (int i = 0; i < 12; ++i) dst[p * stride + r + i] = src[(r + i) * ld + p];
    r += 12;
  }
  for (; r + 4 <= count; r += 4) {
    const float *s0 = src + r * ld, *s1 = s0 + ld, *s2 = s1 + ld, *s3 = s2 + ld;
    index_t p = 0;
    for (; p + 4 <= len; p += 4) {
      __m128 r0 = _mm_loadu_ps(s0 + p), r1 = _mm_loadu_ps(s1 + p);
      __m128 r2 = _mm_loadu_ps(s2 + p), r3 = _mm_loadu_ps(s3 + p);
      _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
      _mm_storeu_ps(dst + (p + 0) * stride + r, r0);
      _mm_storeu_ps(dst + (p + 1) * stride + r, r1);
      _mm_storeu_ps(dst + (p + 2) * stride + r, r2);
      _mm_storeu_ps(dst + (p + 3) * stride + r, r3);
    }
    for (; p < len; ++p) {
      dst[p * stride + r + 0] = s0[p];
      dst[p * stride + r + 1] = s1[p];
      dst[p * stride + r + 2] = s2[p];
      dst[p * stride + r + 3] = s3[p];
    }
  }
  for (; r < count; ++r)
    for (index_t p = 0; p < len; ++p) dst[p * stride + r] = src[r * ld + p];
}

// Packs rows [i0, i0+mc) x depth [p0, p0+kc) of op(A) into ceil(mc/mr) panels
// of kc x mr floats; rows past the edge are zero.
void pack_a(Trans ta, const float* a, index_t lda, index_t i0, index_t mc, index_t p0,
            index_t kc, int mr, float* dst) {
  for (index_t ir = 0; ir < mc; ir += mr) {
    const index_t rows = std::min<index_t>(mr, mc - ir);
    float* panel = dst + ir * kc;
    if (ta == Trans::No) {
      pack_runs_as_columns(a + (i0 + ir) * lda + p0, lda, rows, kc, panel, mr);
    } else {
      for (index_t p = 0; p < kc; ++p) {
        const float* src = a + (p0 + p) * lda + i0 + ir;
        for (index_t i = 0; i < rows; ++i) panel[p * mr + i] = src[i];
      }
    }
    if (rows < mr) {
      for (index_t p = 0; p < kc; ++p)
        for (index_t i = rows; i < mr; ++i) panel[p * mr + i] = 0.0f;
    }
  }
}

// kc rows of `cols` <= 32 floats (ld apart) into a 32-wide panel, zero-padded:
// two (masked) zmm loads and stores per row.
__attribute__((target("avx512f"))) void pack_rows_avx512_32(const float* src, index_t ld,
                                                            index_t kc, index_t cols, float* dst) {
  const __mmask16 m0 = cols >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << cols) - 1);
  const __mmask16 m1 = cols >= 32  ? 0xFFFF
                       : cols <= 16 ? 0
                                    : static_cast<__mmask16>((1u << (cols - 16)) - 1);
  for (index_t p = 0; p < kc; ++p, src += ld, dst += 32) {
    _mm512_store_ps(dst, _mm512_maskz_loadu_ps(m0, src));
    _mm512_store_ps(dst + 16, _mm512_maskz_loadu_ps(m1, src + 16));
  }
}

// Packs NR-wide panel number `jp` of depth [p0, p0+kc) x columns [j0, j0+nc)
// of op(B); columns past the edge are zero.
void pack_b_panel(Trans tb, const float* b, index_t ldb, index_t j0, index_t nc, index_t p0,
                  index_t kc, int nr, index_t jp, float* dst) {
  const index_t jr = jp * nr;
  const index_t cols = std::min<index_t>(nr, nc - jr);
  float* panel = dst + jr * kc;
  if (tb == Trans::No && nr == 32) {  // nr 32: the AVX-512 kernel, so the CPU has it
    pack_rows_avx512_32(b + p0 * ldb + j0 + jr, ldb, kc, cols, panel);
  } else if (tb == Trans::No) {
    for (index_t p = 0; p < kc; ++p) {
      const float* src = b + (p0 + p) * ldb + j0 + jr;
      float* out = panel + p * nr;
      index_t j = 0;
      for (; j < cols; ++j) out[j] = src[j];
      for (; j < nr; ++j) out[j] = 0.0f;
    }
  } else {
    // op(B) is stored transposed: column j of the panel is a contiguous run.
    pack_runs_as_columns(b + (j0 + jr) * ldb + p0, ldb, cols, kc, panel, nr);
    for (index_t p = 0; p < kc; ++p)
      for (index_t jj = cols; jj < nr; ++jj) panel[p * nr + jj] = 0.0f;
  }
}

void scale_c(index_t m, index_t n, float beta, float* c, index_t ldc) {
  for (index_t i = 0; i < m; ++i) {
    float* row = c + i * ldc;
    if (beta == 0.0f) {
      std::fill(row, row + n, 0.0f);
    } else {
      for (index_t j = 0; j < n; ++j) row[j] *= beta;
    }
  }
}

// Depth of the packed blocks: K split evenly into blocks of at most kKC, so
// K = 576 runs as 2 x 288 rather than 512 + 64. Depends on K alone, never on
// the thread partition, so every element of C sums in the same order.
index_t block_depth(index_t k) {
  const index_t blocks = (k + kKC - 1) / kKC;
  return (k + blocks - 1) / blocks;
}

// Where the B~ panels come from: packed here from op(B) ...
struct PackB {
  Trans tb;
  const float* b;
  index_t ldb;

  // Columns [j0, ...) of op(B).
  PackB from_column(index_t j0) const { return {tb, tb == Trans::No ? b + j0 : b + j0 * ldb, ldb}; }
  // The panels of depth [p0, p0 + kc) x columns [j0, j0 + nc), `*stride` apart.
  const float* panels(index_t j0, index_t nc, index_t p0, index_t kc, int nr, float* buf,
                      index_t* stride) const {
    for (index_t jp = 0; jp < (nc + nr - 1) / nr; ++jp)
      pack_b_panel(tb, b, ldb, j0, nc, p0, kc, nr, jp, buf);
    *stride = kc * nr;
    return buf;
  }
  index_t buffer_floats(index_t n, index_t kc, int nr) const {
    return std::min(kNC, (n + nr - 1) / nr * nr) * kc;
  }
};

// ... or already packed by the caller, whole depth per panel (see sgemm_packed_b).
struct PrepackedB {
  const float* b;
  index_t k;

  PrepackedB from_column(index_t j0) const { return {b + j0 * k, k}; }  // j0: multiple of nr
  const float* panels(index_t j0, index_t nc, index_t p0, index_t kc, int nr, float* buf,
                      index_t* stride) const {
    *stride = k * nr;
    return b + j0 * k + p0 * nr;
  }
  index_t buffer_floats(index_t, index_t, int) const { return 0; }
};

// Likewise the A~ panels: packed here from op(A) ...
struct PackA {
  Trans ta;
  const float* a;
  index_t lda;

  PackA from_row(index_t i0) const { return {ta, ta == Trans::No ? a + i0 * lda : a + i0, lda}; }
  const float* panels(index_t i0, index_t mc, index_t p0, index_t kc, int mr, float* buf,
                      index_t* stride) const {
    pack_a(ta, a, lda, i0, mc, p0, kc, mr, buf);
    *stride = kc * mr;
    return buf;
  }
  bool needs_buffer() const { return true; }
};

// ... or already packed by the caller, whole depth per panel (see sgemm_packed).
struct PrepackedA {
  const float* a;
  index_t k;

  PrepackedA from_row(index_t i0) const { return {a + i0 * k, k}; }  // i0: multiple of mr
  const float* panels(index_t i0, index_t, index_t p0, index_t, int mr, float*,
                      index_t* stride) const {
    *stride = k * mr;
    return a + i0 * k + p0 * mr;
  }
  bool needs_buffer() const { return false; }
};

// C block (mc x nc) = alpha * A~ B~ + beta C from packed panels of depth kc:
// each A~ micro-panel (`a_stride` apart) meets every B~ micro-panel
// (`b_stride` apart) while it stays in L1.
void multiply_panels(const KernelInfo& ker, index_t mc, index_t nc, index_t kc, float alpha,
                     const float* a_panels, index_t a_stride, const float* b_panels,
                     index_t b_stride, float beta, float* c, index_t ldc) {
  const int mr = ker.mr, nr = ker.nr;
  alignas(64) float edge[16 * 32];  // one micro-tile, for partial tiles at the edges
  for (index_t ir = 0; ir < mc; ir += mr) {
    const index_t rows = std::min<index_t>(mr, mc - ir);
    const float* ap = a_panels + ir / mr * a_stride;
    // A last panel of at most 4 or 8 rows runs a kernel of that many rows
    // where the CPU's kernel offers one (same per-element order, fewer
    // padding rows computed); a tile it does not fill exactly goes through
    // `edge`.
    MicroKernel fn = ker.fn;
    index_t fn_rows = mr;
    if (rows <= 8 && ker.rows4[(rows - 1) / 4] != nullptr) {
      fn = ker.rows4[(rows - 1) / 4];
      fn_rows = (rows + 3) / 4 * 4;
    }
    for (index_t jr = 0; jr < nc; jr += nr) {
      const index_t cols = std::min<index_t>(nr, nc - jr);
      const float* bp = b_panels + jr / nr * b_stride;
      float* cp = c + ir * ldc + jr;
      if (rows == fn_rows && cols == nr) {
        fn(kc, ap, bp, cp, ldc, alpha, beta);
      } else {
        fn(kc, ap, bp, edge, nr, 1.0f, 0.0f);
        for (index_t i = 0; i < rows; ++i)
          for (index_t j = 0; j < cols; ++j) {
            const float v = alpha * edge[i * nr + j];
            cp[i * ldc + j] = beta == 0.0f ? v : v + beta * cp[i * ldc + j];
          }
      }
    }
  }
}

// The whole product on the calling thread.
template <typename ASource, typename BSource>
void gemm_serial(const KernelInfo& ker, index_t m, index_t n, index_t k, float alpha,
                 const ASource& asrc, const BSource& bsrc, float beta, float* c, index_t ldc) {
  const int mr = ker.mr, nr = ker.nr;
  const index_t kc_max = block_depth(k);
  float* packed_a = asrc.needs_buffer() ? thread_scratch(ScratchSlot::GemmA, kMC * kc_max) : nullptr;
  const index_t b_floats = bsrc.buffer_floats(n, kc_max, nr);
  float* packed_b = b_floats > 0 ? thread_scratch(ScratchSlot::GemmB, b_floats) : nullptr;
  for (index_t j0 = 0; j0 < n; j0 += kNC) {
    const index_t nc = std::min(kNC, n - j0);
    for (index_t p0 = 0; p0 < k; p0 += kc_max) {
      const index_t kc = std::min(kc_max, k - p0);
      const float beta_block = p0 == 0 ? beta : 1.0f;
      index_t b_stride;
      const float* b_panels = bsrc.panels(j0, nc, p0, kc, nr, packed_b, &b_stride);
      for (index_t i0 = 0; i0 < m; i0 += kMC) {
        const index_t mc = std::min(kMC, m - i0);
        index_t a_stride;
        const float* a_panels = asrc.panels(i0, mc, p0, kc, mr, packed_a, &a_stride);
        multiply_panels(ker, mc, nc, kc, alpha, a_panels, a_stride, b_panels, b_stride,
                        beta_block, c + i0 * ldc + j0, ldc);
      }
    }
  }
}

// Waits until `ready()`: a few microseconds of spinning (a panel takes
// about that to pack), then yielding the core, which matters when there are
// more threads than cores (4 threads on 2 cores: 1024^3 in 12.6 ms with
// 4096 spins, 7.7 ms with 64).
template <typename Ready>
void spin_until(Ready ready) {
  for (int spins = 0; !ready(); ++spins) {
    if (spins < 64) {
      _mm_pause();
    } else {
      std::this_thread::yield();
    }
  }
}

// The product on `nt` threads, each owning a range of C's columns, with the
// A~ panels packed once for all of them (splitting N otherwise has every
// thread pack all of A: for an A far beyond L2, ~5% of a 2048^3 product).
// Every thread walks the same sequence of A~ blocks (slab, k-block, rows)
// and multiplies every panel of each block by its own B~ slab; a block's
// panels are dealt out among the threads, each packs its share into a
// shared buffer and publishes each panel as it is done. A thread starts a
// block on its own share (packing as it goes) and then takes the others'
// panels, waiting only for a panel not yet published: no barrier, so a
// thread delayed a little costs the others nothing.
// Two buffers alternate: a thread packs block b into the buffer of block
// b - 2 once every thread has finished block b - 2 (a per-buffer count), and
// a panel's flag holds the number of the block it was packed for. A thread
// finishes a block only after packing its share of it, so no wait is
// circular. Per element of C the arithmetic is that of gemm_serial (same
// k-blocks, same kernel), so the result does not depend on the path.
template <typename BSource>
void gemm_shared_a(const KernelInfo& ker, int nt, index_t m, index_t n, index_t k, float alpha,
                   const PackA& asrc, const BSource& bsrc, float beta, float* c, index_t ldc) {
  const int mr = ker.mr, nr = ker.nr;
  const index_t kc_max = block_depth(k);
  const index_t n_panels = (n + nr - 1) / nr;
  // The same number of slabs on every thread (they walk the same blocks),
  // as wide as kNC allows.
  const index_t thread_panels = (n_panels + nt - 1) / nt;
  const index_t slabs = (thread_panels * nr + kNC - 1) / kNC;
  const index_t slab_panels = (thread_panels + slabs - 1) / slabs;
  // Row blocks of about kMC rows, cut evenly: a block stays in L2.
  const index_t m_panels = (m + mr - 1) / mr;
  const index_t row_blocks = (m_panels * mr + kMC - 1) / kMC;
  const index_t block_panels = (m_panels + row_blocks - 1) / row_blocks;
  const index_t a_floats = block_panels * mr * kc_max;
  float* shared = thread_scratch(ScratchSlot::GemmSharedA, 2 * a_floats);
  std::unique_ptr<std::atomic<index_t>[]> packed_for(new std::atomic<index_t>[2 * block_panels]);
  for (index_t q = 0; q < 2 * block_panels; ++q) packed_for[q].store(-1, std::memory_order_relaxed);
  std::atomic<index_t> finished[2];
  finished[0].store(0, std::memory_order_relaxed);
  finished[1].store(0, std::memory_order_relaxed);
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num();
    const index_t j_begin = std::min(n, n_panels * t / nt * nr);
    const index_t j_end = std::min(n, n_panels * (t + 1) / nt * nr);
    const index_t b_floats = bsrc.buffer_floats(slab_panels * nr, kc_max, nr);
    float* packed_b = b_floats > 0 ? thread_scratch(ScratchSlot::GemmB, b_floats) : nullptr;
    index_t block = 0;
    for (index_t s = 0; s < slabs; ++s) {
      const index_t j0 = std::min(j_end, j_begin + s * slab_panels * nr);
      const index_t nc = std::min(j_end, j0 + slab_panels * nr) - j0;
      for (index_t p0 = 0; p0 < k; p0 += kc_max) {
        const index_t kc = std::min(kc_max, k - p0);
        const float beta_block = p0 == 0 ? beta : 1.0f;
        index_t b_stride = 0;
        const float* b_panels =
            nc > 0 ? bsrc.panels(j0, nc, p0, kc, nr, packed_b, &b_stride) : nullptr;
        for (index_t i0 = 0; i0 < m; i0 += block_panels * mr, ++block) {
          const int buf = static_cast<int>(block % 2);
          const index_t mc = std::min(block_panels * mr, m - i0);
          const index_t panels = (mc + mr - 1) / mr;
          const index_t q0 = panels * t / nt, q1 = panels * (t + 1) / nt;
          float* a_panels = shared + buf * a_floats;
          std::atomic<index_t>* flags = packed_for.get() + buf * block_panels;
          // Every thread is done with block - 2, the buffer's last block.
          const index_t uses = block / 2 * nt;
          spin_until([&] { return finished[buf].load(std::memory_order_acquire) >= uses; });
          for (index_t step = 0; step < panels; ++step) {
            const index_t q = (q0 + step) % panels;
            float* panel = a_panels + q * mr * kc;
            const index_t rows = std::min<index_t>(mr, mc - q * mr);
            if (q >= q0 && q < q1) {
              pack_a(asrc.ta, asrc.a, asrc.lda, i0 + q * mr, rows, p0, kc, mr, panel);
              flags[q].store(block, std::memory_order_release);
            } else {
              spin_until([&] { return flags[q].load(std::memory_order_acquire) == block; });
            }
            if (nc > 0)
              multiply_panels(ker, rows, nc, kc, alpha, panel, kc * mr, b_panels, b_stride,
                              beta_block, c + (i0 + q * mr) * ldc + j0, ldc);
          }
          finished[buf].fetch_add(1, std::memory_order_acq_rel);
        }
      }
    }
  }
}

// C (m <= 4 rows) = op(A) op(B) + beta C for alpha = 1, beta in {0, 1}, with
// no packing: op(B)'s 16-column vectors are loaded (B untransposed) or
// transposed in registers (B transposed: linear's weight) straight from B.
// Each element of C sees exactly the packed path's arithmetic: per k-block
// (the same block_depth split) a sequential FMA chain from zero, then C =
// acc (beta 0, first block) or C + acc; so a sample's result is the same
// whichever path its batch size takes. The chains of different k-blocks are
// independent, so the work is cut into (columns, k-block) units: both
// threads stay busy on a single wide layer at batch 1 (fc1: 4 column pairs
// x 7 blocks), and the FMA latency of a lone chain is hidden by running the
// chains of two column groups side by side.

// The chains of rows [0, M) x columns [j, j + 16 G) of a transposed B
// whose 16 G columns all exist, over depths [p, p + 16 steps): the hot loop
// of linear's forward at batch 1-4, nothing in it but the transposes and
// the FMAs.
template <int M, int G>
__attribute__((target("avx512f"))) void small_m_transposed_avx512(
    index_t steps, const float* a, index_t lda, const float* b, index_t ldb, __m512 (&acc)[G][M]) {
  for (index_t s = 0; s < steps; ++s, a += 16, b += 16) {
    for (int g = 0; g < G; ++g) {
      __m512 col[16];
      transpose16_avx512(b + 16 * g * ldb, ldb, 16, 0, col);
      for (int q = 0; q < 16; ++q)
        for (int r = 0; r < M; ++r)
          acc[g][r] = _mm512_fmadd_ps(_mm512_set1_ps(a[r * lda + q]), col[q], acc[g][r]);
    }
  }
}

// Rows [0, M) x columns [j0, j0 + 16 G) over depth [p0, p1): each lane's
// sequential chain, stored whole (columns past n as zeros) at out + r * ldo.
template <int M, int G>
__attribute__((target("avx512f"))) void small_m_block_avx512(
    Trans tb, index_t n, index_t p0, index_t p1, const float* a, index_t lda,
    const float* b, index_t ldb, index_t j0, float* out, index_t ldo) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i rows_apart = _mm512_mullo_epi32(lane, _mm512_set1_epi32(static_cast<int>(ldb)));
  int cols[G];
  __mmask16 mask[G];
  __m512 acc[G][M];  // M and G compile-time, so the chains stay in registers
  for (int g = 0; g < G; ++g) {
    cols[g] = static_cast<int>(std::min<index_t>(16, n - j0 - 16 * g));
    mask[g] = cols[g] >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << cols[g]) - 1);
    for (int r = 0; r < M; ++r) acc[g][r] = _mm512_setzero_ps();
  }
  index_t p = p0;
  if (tb == Trans::Yes && cols[G - 1] == 16) {
    const index_t steps = (p1 - p0) / 16;
    small_m_transposed_avx512<M, G>(steps, a + p0, lda, b + j0 * ldb + p0, ldb, acc);
    p += 16 * steps;
  } else if (tb == Trans::Yes) {
    // a last group of fewer than 16 columns (G = 1: pairs are whole)
    for (; p + 16 <= p1; p += 16) {
      __m512 col[16];
      transpose16_avx512(b + j0 * ldb, ldb, cols[0], p, col);
      for (int q = 0; q < 16; ++q)
        for (int r = 0; r < M; ++r)
          acc[0][r] = _mm512_fmadd_ps(_mm512_set1_ps(a[r * lda + p + q]), col[q], acc[0][r]);
    }
  }
  for (; p < p1; ++p)
    for (int g = 0; g < G; ++g) {
      const index_t j = j0 + 16 * g;
      const __m512 col = tb == Trans::Yes
                             ? _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask[g], rows_apart,
                                                        b + j * ldb + p, 4)
                             : _mm512_maskz_loadu_ps(mask[g], b + p * ldb + j);
      for (int r = 0; r < M; ++r)
        acc[g][r] = _mm512_fmadd_ps(_mm512_set1_ps(a[r * lda + p]), col, acc[g][r]);
    }
  for (int g = 0; g < G; ++g)
    for (int r = 0; r < M; ++r) _mm512_store_ps(out + r * ldo + 16 * g, acc[g][r]);
}

// Columns [j0, j0 + 16) of C from the k-blocks' partial products, in block order.
__attribute__((target("avx512f"))) void small_m_combine_avx512(
    index_t m, index_t n, index_t blocks, const float* part, index_t ldp, float beta, float* c,
    index_t ldc, index_t j0) {
  const index_t cols = std::min<index_t>(16, n - j0);
  const __mmask16 mask = cols >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << cols) - 1);
  for (index_t r = 0; r < m; ++r) {
    __m512 cv = beta == 0.0f ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(mask, c + r * ldc + j0);
    for (index_t blk = 0; blk < blocks; ++blk) {
      const __m512 acc = _mm512_load_ps(part + (blk * m + r) * ldp + j0);
      cv = blk == 0 && beta == 0.0f ? acc : _mm512_add_ps(cv, acc);
    }
    _mm512_mask_storeu_ps(c + r * ldc + j0, mask, cv);
  }
}

using SmallMBlock = void (*)(Trans, index_t, index_t, index_t, const float*, index_t,
                            const float*, index_t, index_t, float*, index_t);

SmallMBlock small_m_block(index_t m, int g) {
  static const SmallMBlock table[4][2] = {
      {small_m_block_avx512<1, 1>, small_m_block_avx512<1, 2>},
      {small_m_block_avx512<2, 1>, small_m_block_avx512<2, 2>},
      {small_m_block_avx512<3, 1>, small_m_block_avx512<3, 2>},
      {small_m_block_avx512<4, 1>, small_m_block_avx512<4, 2>}};
  return table[m - 1][g - 1];
}

void small_m_avx512(Trans tb, index_t m, index_t n, index_t k, const float* a, index_t lda,
                    const float* b, index_t ldb, float beta, float* c, index_t ldc) {
  const index_t kc_max = block_depth(k), blocks = (k + kc_max - 1) / kc_max;
  // Column blocks: whole pairs of 16-column groups, then single groups.
  const index_t groups = (n + 15) / 16, pairs = n / 32, col_blocks = groups - pairs;
  const index_t ldp = 16 * groups;
  float* part = thread_scratch(ScratchSlot::GemmPartial, blocks * m * ldp);
  const index_t units = col_blocks * blocks;
  // ~64k multiply-adds per thread before a second one joins.
  const int nt = std::min<int>(threads_for(m * n * k, index_t(1) << 16), static_cast<int>(units));
  // Units in column-major order, split statically: each thread reads the
  // same columns of B (rows of linear's weight) every call.
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
#pragma omp for schedule(static)
    for (index_t u = 0; u < units; ++u) {
      const index_t cb = u / blocks, blk = u % blocks;
      const int g = cb < pairs ? 2 : 1;
      const index_t j0 = cb < pairs ? 32 * cb : 16 * (cb + pairs);
      const index_t p0 = blk * kc_max, p1 = std::min(k, p0 + kc_max);
      small_m_block(m, g)(tb, n, p0, p1, a, lda, b, ldb, j0, part + blk * m * ldp + j0, ldp);
    }
#pragma omp for schedule(static)
    for (index_t g = 0; g < groups; ++g)
      small_m_combine_avx512(m, n, blocks, part, ldp, beta, c, ldc, 16 * g);
  }
}

// Splits C into one block per thread, aligned to micro-tiles, and runs the
// serial product on each with its own packing buffers: no barrier anywhere,
// so a thread that the OS preempts delays only its own block. Splitting N
// makes every thread pack all of A, splitting M all of B: split the larger
// of M and N, so that the operand packed repeatedly is the smaller one
// (never M when only B comes prepacked: each thread then reads only its
// panels and packs its own A).
template <typename ASource, typename BSource>
void gemm_threaded(index_t m, index_t n, index_t k, float alpha, const ASource& asrc,
                   const BSource& bsrc, float beta, float* c, index_t ldc, bool may_split_m) {
  const KernelInfo& ker = kernel();
  // ~2 MFLOP per thread before a second thread pays for itself.
  const int nt = threads_for(m * n * std::min(k, kKC), index_t(1) << 20);
  if (nt <= 1) {
    gemm_serial(ker, m, n, k, alpha, asrc, bsrc, beta, c, ldc);
    return;
  }
  const index_t m_panels = (m + ker.mr - 1) / ker.mr, n_panels = (n + ker.nr - 1) / ker.nr;
  const bool split_m =
      may_split_m && (m > n ? m_panels >= nt : n_panels < nt && m_panels > n_panels);
  index_t tm = 1, tn = 1;
  if (split_m) {
    tm = std::min<index_t>(nt, m_panels);
  } else {
    tn = std::min<index_t>(nt, n_panels);
    tm = std::max<index_t>(1, std::min<index_t>(nt / tn, m_panels));
  }
  if constexpr (std::is_same_v<ASource, PackA>) {
    // A large A that every thread would pack: pack it once, together.
    if (tm == 1 && tn > 1 && m * k >= kSharedAFloats) {
      gemm_shared_a(ker, static_cast<int>(tn), m, n, k, alpha, asrc, bsrc, beta, c, ldc);
      return;
    }
  }
  const index_t tiles = tm * tn;
#pragma omp parallel for num_threads(static_cast<int>(tiles)) schedule(static)
  for (index_t t = 0; t < tiles; ++t) {
    const index_t bi = t / tn, bj = t % tn;
    const index_t i0 = std::min(m, m_panels * bi / tm * ker.mr);
    const index_t i1 = std::min(m, m_panels * (bi + 1) / tm * ker.mr);
    const index_t j0 = std::min(n, n_panels * bj / tn * ker.nr);
    const index_t j1 = std::min(n, n_panels * (bj + 1) / tn * ker.nr);
    if (i0 >= i1 || j0 >= j1) continue;
    gemm_serial(ker, i1 - i0, j1 - j0, k, alpha, asrc.from_row(i0), bsrc.from_column(j0), beta,
                c + i0 * ldc + j0, ldc);
  }
}

}  // namespace

const char* sgemm_kernel_name() { return kernel().name; }

int sgemm_panel_width() { return kernel().nr; }

void sgemm(Trans ta, Trans tb, index_t m, index_t n, index_t k, float alpha, const float* a,
           index_t lda, const float* b, index_t ldb, float beta, float* c, index_t ldc) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0 || alpha == 0.0f) {
    scale_c(m, n, beta, c, ldc);
    return;
  }
  // A few rows (linear at batch 1-4): packing B would cost more than the
  // product. Gathers need the 16 rows' offsets in int32.
  if (m <= 4 && ta == Trans::No && alpha == 1.0f && (beta == 0.0f || beta == 1.0f) &&
      kernel().nr == 32 && (tb == Trans::No || 15 * ldb < (index_t(1) << 31))) {
    small_m_avx512(tb, m, n, k, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  gemm_threaded(m, n, k, alpha, PackA{ta, a, lda}, PackB{tb, b, ldb}, beta, c, ldc, true);
}

void sgemm_packed_b(Trans ta, index_t m, index_t n, index_t k, float alpha, const float* a,
                    index_t lda, const float* b_packed, float beta, float* c, index_t ldc) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0 || alpha == 0.0f) {
    scale_c(m, n, beta, c, ldc);
    return;
  }
  gemm_threaded(m, n, k, alpha, PackA{ta, a, lda}, PrepackedB{b_packed, k}, beta, c, ldc, false);
}

void sgemm_packed(index_t m, index_t n, index_t k, float alpha, const float* a_packed,
                  const float* b_packed, float beta, float* c, index_t ldc) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0 || alpha == 0.0f) {
    scale_c(m, n, beta, c, ldc);
    return;
  }
  gemm_threaded(m, n, k, alpha, PrepackedA{a_packed, k}, PrepackedB{b_packed, k}, beta, c, ldc,
                true);
}

void sgemm_prepacked_a(index_t m, index_t n, index_t k, float alpha, const float* a_packed,
                       Trans tb, const float* b, index_t ldb, float beta, float* c,
                       index_t ldc) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0 || alpha == 0.0f) {
    scale_c(m, n, beta, c, ldc);
    return;
  }
  // Splitting N costs nothing here: the A~ panels are read, never packed again.
  gemm_threaded(m, n, k, alpha, PrepackedA{a_packed, k}, PackB{tb, b, ldb}, beta, c, ldc, false);
}

int sgemm_panel_height() { return kernel().mr; }

bool sgemm_single_block(index_t k) { return k <= kKC; }

index_t sgemm_packed_a_floats(index_t m, index_t k) {
  const int mr = kernel().mr;
  return (m + mr - 1) / mr * mr * k;
}

void sgemm_pack_a(Trans ta, index_t m, index_t k, const float* a, index_t lda, float* a_packed) {
  if (m > 0 && k > 0) pack_a(ta, a, lda, 0, m, 0, k, kernel().mr, a_packed);
}

}  // namespace fastcnn
