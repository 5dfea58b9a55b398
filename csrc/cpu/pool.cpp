// 2-D max pooling. The window of output (oy, ox) covers input rows
// oy * stride - pad + i * dil (i < kh), likewise for columns; positions in
// the padding are never selected. The first maximum in row-major window
// order wins; a NaN wins over any number (PyTorch's rule). The updates are
// branch-free selects: on real activations a branch would mispredict often.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "fastcnn/cpu_kernels.h"
#include "fastcnn/gemm.h"
#include "fastcnn/kernel_math.h"
#include "fastcnn/parallel.h"

namespace fastcnn {
namespace cpu {
namespace {

// The AVX-512 loops, unless the CPU lacks them or FASTCNN_GEMM_KERNEL=generic
// asks for the plain ones (so that the tests run those on any machine).
bool use_avx512() {
  static const bool yes =
      __builtin_cpu_supports("avx512f") && std::strcmp(sgemm_kernel_name(), "generic") != 0;
  return yes;
}

// Outputs [ox_lo, ox_hi) of row oy when every window there lies wholly inside
// the input, with the window known at compile time: K x K taps, stride S, no
// dilation. The same scan order and rule as pool_argmax (kernel_math.h).
template <int K, int S>
void interior_row(const PoolShape& ps, const float* plane, index_t oy, index_t ox_lo,
                  index_t ox_hi, float* out, std::int64_t* idx) {
  const index_t start = (oy * S - ps.pad_h) * ps.w - ps.pad_w;
  // The winning tap as a 32-bit number i * K + j, so that the selects run in
  // the same lanes as the float compares and vectorise; indices are expanded
  // to int64 in a second, also vectorised, pass.
  constexpr index_t kBlock = 256;
  std::int32_t taps[kBlock];
  for (index_t b0 = ox_lo; b0 < ox_hi; b0 += kBlock) {
    const index_t b1 = std::min(ox_hi, b0 + kBlock);
    for (index_t ox = b0; ox < b1; ++ox) {
      const float* p = plane + start + ox * S;
      float best = p[0];
      std::int32_t tap = 0;
      for (int i = 0; i < K; ++i) {
        for (int j = (i == 0 ? 1 : 0); j < K; ++j) {
          const float v = p[i * ps.w + j];
          const bool take = (v > best) | (v != v);
          best = take ? v : best;
          tap = take ? i * K + j : tap;
        }
      }
      out[ox] = best;
      taps[ox - b0] = tap;
    }
    if (idx != nullptr)
      for (index_t ox = b0; ox < b1; ++ox) {
        const std::int32_t tap = taps[ox - b0];
        idx[ox] = start + ox * S + (tap / K) * ps.w + tap % K;
      }
  }
}

// The maxima of n <= 16 consecutive 2x2 windows whose rows start at p0, p1
// (2 n floats each) and their winning taps 0-3 (row-major): the first
// maximum wins, a NaN wins over any number (pool_argmax's rule).
// With `affine`, each tap is first mapped to tap * a[0] + a[1] (rounded after
// the multiply and after the add, as plain C++ on a CPU without FMA
// computes it: a batch norm's normalisation, not written out).
__attribute__((target("avx512f"))) inline void windows_2x2_avx512(const float* p0,
                                                                 const float* p1, index_t n,
                                                                 __m512* best, __m512i* tap,
                                                                 const float* affine = nullptr) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  const __mmask16 lo = n >= 8 ? 0xFFFF : static_cast<__mmask16>((1u << (2 * n)) - 1);
  const __mmask16 hi = n <= 8 ? 0 : static_cast<__mmask16>((1u << (2 * (n - 8))) - 1);
  const __m512 a0 = _mm512_maskz_loadu_ps(lo, p0), b0 = _mm512_maskz_loadu_ps(hi, p0 + 16);
  const __m512 a1 = _mm512_maskz_loadu_ps(lo, p1), b1 = _mm512_maskz_loadu_ps(hi, p1 + 16);
  __m512 v[4] = {_mm512_permutex2var_ps(a0, even, b0), _mm512_permutex2var_ps(a0, odd, b0),
                 _mm512_permutex2var_ps(a1, even, b1), _mm512_permutex2var_ps(a1, odd, b1)};
  if (affine != nullptr) {
    constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    const __m512 scale = _mm512_set1_ps(affine[0]), shift = _mm512_set1_ps(affine[1]);
    for (int t = 0; t < 4; ++t)  // the _round forms: never contracted into an FMA
      v[t] = _mm512_add_round_ps(_mm512_mul_round_ps(v[t], scale, kNearest), shift, kNearest);
  }
  *best = v[0];
  *tap = _mm512_setzero_si512();
  for (int t = 1; t < 4; ++t) {
    // take = v > best or v is NaN
    const __mmask16 take = _mm512_cmp_ps_mask(v[t], *best, _CMP_GT_OQ) |
                           _mm512_cmp_ps_mask(v[t], v[t], _CMP_UNORD_Q);
    *best = _mm512_mask_mov_ps(*best, take, v[t]);
    *tap = _mm512_mask_mov_epi32(*tap, take, _mm512_set1_epi32(t));
  }
}

// interior_row<2, 2> in AVX-512: 16 outputs per step, the even and odd
// columns of the two input rows split by permutes. Same taps in the same
// order with the same rule, so the same results to the bit.
__attribute__((target("avx512f"))) void interior_row_2x2_avx512(
    const PoolShape& ps, const float* plane, index_t oy, index_t ox_lo, index_t ox_hi,
    float* out, std::int64_t* idx) {
  const index_t start = (oy * 2 - ps.pad_h) * ps.w - ps.pad_w;
  const float* row0 = plane + start;
  const float* row1 = row0 + ps.w;
  for (index_t ox = ox_lo; ox < ox_hi; ox += 16) {
    const index_t n = std::min<index_t>(16, ox_hi - ox);
    __m512 best;
    __m512i tap;
    windows_2x2_avx512(row0 + 2 * ox, row1 + 2 * ox, n, &best, &tap);
    const __mmask16 keep = static_cast<__mmask16>((1u << n) - 1);
    _mm512_mask_storeu_ps(out + ox, keep, best);
    if (idx != nullptr) {
      // flat index start + 2 ox + (tap / 2) w + tap % 2
      alignas(64) std::int32_t taps[16];
      _mm512_store_si512(taps, tap);
      for (index_t i = 0; i < n; ++i)
        idx[ox + i] = start + 2 * (ox + i) + (taps[i] >> 1) * ps.w + (taps[i] & 1);
    }
  }
}

using InteriorRow = void (*)(const PoolShape&, const float*, index_t, index_t, index_t, float*,
                             std::int64_t*);

InteriorRow interior_kernel(const PoolShape& ps) {
  if (ps.dil_h != 1 || ps.dil_w != 1 || ps.kh != ps.kw || ps.stride_h != ps.stride_w)
    return nullptr;
  static const bool avx512 = use_avx512();
  if (ps.kh == 2 && ps.stride_h == 2) return avx512 ? interior_row_2x2_avx512 : interior_row<2, 2>;
  if (ps.kh == 3 && ps.stride_h == 2) return interior_row<3, 2>;
  if (ps.kh == 3 && ps.stride_h == 1) return interior_row<3, 1>;
  return nullptr;
}

// Outputs [lo, hi) of a row whose windows' columns all lie inside the input
// (the same for every row and plane).
struct InsideColumns {
  index_t lo = 0, hi = 0;
  explicit InsideColumns(const PoolShape& ps) {
    auto inside = [&](index_t ox) {
      index_t a, b;
      taps_inside(ox * ps.stride_w - ps.pad_w, ps.dil_w, ps.kw, ps.w, &a, &b);
      return a == 0 && b == ps.kw;
    };
    while (lo < ps.ow && !inside(lo)) ++lo;
    hi = ps.ow;
    while (hi > lo && !inside(hi - 1)) --hi;
  }
};

inline index_t plane_grain(const PoolShape& ps) {
  return std::max<index_t>(1, 1024 / std::max<index_t>(ps.oh * ps.ow, 1));
}

}  // namespace

namespace {

// Max and argmax of every output of one plane: out, idx (oh * ow); idx may
// be null. The fast kernel takes the rows and columns whose windows lie
// wholly inside the input; pool_argmax the rest.
void plane_max(const PoolShape& ps, const float* plane, const InsideColumns& cols,
               InteriorRow fast, bool relu, float* out, std::int64_t* idx) {
  for (index_t oy = 0; oy < ps.oh; ++oy, out += ps.ow) {
    std::int64_t* idx_row = idx != nullptr ? idx + oy * ps.ow : nullptr;
    index_t a = 0, b = 0;  // [a, b): outputs handled by the fast kernel
    if (fast != nullptr) {
      index_t i_lo, i_hi;
      taps_inside(oy * ps.stride_h - ps.pad_h, 1, ps.kh, ps.h, &i_lo, &i_hi);
      if (i_lo == 0 && i_hi == ps.kh && cols.lo < cols.hi) {
        a = cols.lo;
        b = cols.hi;
        fast(ps, plane, oy, a, b, out, idx_row);
        if (relu)
          for (index_t ox = a; ox < b; ++ox) out[ox] = relu_value(out[ox]);
      }
    }
    for (index_t ox = 0; ox < ps.ow; ++ox) {
      if (ox == a && a < b) ox = b;
      if (ox >= ps.ow) break;
      const index_t at = pool_argmax(ps, plane, oy, ox, &out[ox]);
      if (relu) out[ox] = relu_window_max(out[ox], at);
      if (idx_row != nullptr) idx_row[ox] = at;
    }
  }
}

}  // namespace

void max_pool2d_forward(const PoolShape& ps, const float* x, float* y, std::int64_t* indices,
                        bool relu) {
  // x: (n, c, h, w) -> y, indices: (n, c, oh, ow)
  const index_t in_plane = ps.h * ps.w, out_plane = ps.oh * ps.ow;
  const InsideColumns cols(ps);
  const InteriorRow fast = interior_kernel(ps);
  parallel_for(ps.n * ps.c, plane_grain(ps), [&](index_t pl) {
    plane_max(ps, x + pl * in_plane, cols, fast, relu, y + pl * out_plane,
              indices != nullptr ? indices + pl * out_plane : nullptr);
  });
}

namespace {

// One plane's gradient for 2x2 windows of stride 2 without padding or
// dilation, written window by window in AVX-512: every dx position gets its
// window's gradient or 0 in one store, with no zero-fill first; positions
// no window covers (an odd last row or column) are zeroed. Returns false,
// for the general loop to redo the plane, when an index is not one of its
// window's four taps (possible only for indices not made by the forward).
__attribute__((target("avx512f"))) bool backward_2x2_avx512(const PoolShape& ps,
                                                           const float* g,
                                                           const std::int64_t* idx,
                                                           const float* x, bool relu,
                                                           float* grad) {
  const index_t w = ps.w;
  const __m512i lane2 = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd_lanes = _mm512_add_epi32(lane2, _mm512_set1_epi32(1));
  const __m512i zip_lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i zip_hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const __m512i one = _mm512_set1_epi32(1), down = _mm512_set1_epi32(static_cast<int>(w));
  const __m512 zero = _mm512_setzero_ps();
  for (index_t oy = 0; oy < ps.oh; ++oy) {
    float* row[2] = {grad + 2 * oy * w, grad + (2 * oy + 1) * w};
    const float* in[2] = {x + 2 * oy * w, x + (2 * oy + 1) * w};
    for (index_t ox = 0; ox < ps.ow; ox += 16) {
      const int n = static_cast<int>(std::min<index_t>(16, ps.ow - ox));
      const __mmask16 m = static_cast<__mmask16>((1u << n) - 1u);
      const std::int64_t* at64 = idx + oy * ps.ow + ox;
      const __m256i a = _mm512_cvtepi64_epi32(_mm512_maskz_loadu_epi64(static_cast<__mmask8>(m), at64));
      const __m256i b = _mm512_cvtepi64_epi32(_mm512_maskz_loadu_epi64(static_cast<__mmask8>(m >> 8), at64 + 8));
      const __m512i at = _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
      // offset of each index from its window's top-left tap: 0, 1, w or w + 1
      const __m512i rel = _mm512_sub_epi32(
          at, _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(2 * oy * w + 2 * ox)), lane2));
      __mmask16 tap[4] = {_mm512_cmpeq_epi32_mask(rel, _mm512_setzero_si512()),
                          _mm512_cmpeq_epi32_mask(rel, one),
                          _mm512_cmpeq_epi32_mask(rel, down),
                          _mm512_cmpeq_epi32_mask(rel, _mm512_add_epi32(down, one))};
      if (((tap[0] | tap[1] | tap[2] | tap[3]) & m) != m) return false;
      const __mmask16 lo = n >= 8 ? 0xFFFF : static_cast<__mmask16>((1u << (2 * n)) - 1u);
      const __mmask16 hi = n <= 8 ? 0 : static_cast<__mmask16>((1u << (2 * (n - 8))) - 1u);
      if (relu) {
        // relu_grad's rule at the chosen tap: passes unless x <= 0 (NaN passes).
        for (int r = 0; r < 2; ++r) {
          const __m512 v0 = _mm512_maskz_loadu_ps(lo, in[r] + 2 * ox);
          const __m512 v1 = _mm512_maskz_loadu_ps(hi, in[r] + 2 * ox + 16);
          tap[2 * r] &= _mm512_cmp_ps_mask(_mm512_permutex2var_ps(v0, lane2, v1), zero, _CMP_NLE_UQ);
          tap[2 * r + 1] &= _mm512_cmp_ps_mask(_mm512_permutex2var_ps(v0, odd_lanes, v1), zero, _CMP_NLE_UQ);
        }
      }
      const __m512 gv = _mm512_maskz_loadu_ps(m, g + oy * ps.ow + ox);
      for (int r = 0; r < 2; ++r) {
        const __m512 even = _mm512_maskz_mov_ps(tap[2 * r], gv);
        const __m512 odd = _mm512_maskz_mov_ps(tap[2 * r + 1], gv);
        _mm512_mask_storeu_ps(row[r] + 2 * ox, lo, _mm512_permutex2var_ps(even, zip_lo, odd));
        _mm512_mask_storeu_ps(row[r] + 2 * ox + 16, hi, _mm512_permutex2var_ps(even, zip_hi, odd));
      }
    }
    for (index_t ix = 2 * ps.ow; ix < w; ++ix) row[0][ix] = row[1][ix] = 0.0f;
  }
  std::fill(grad + 2 * ps.oh * w, grad + ps.h * w, 0.0f);
  return true;
}

}  // namespace

index_t max_pool2d_backward(const PoolShape& ps, const float* dy, const float* x,
                            const std::int64_t* indices, bool relu, std::int64_t min_index,
                            float* dx) {
  // dy: (n, c, oh, ow) -> dx: (n, c, h, w); overlapping windows add up, in
  // output order within a plane. With `relu` this is the gradient of
  // relu(max_pool2d(x)) (= max_pool2d(relu(x))): a tap takes its gradient
  // only where x > 0 or x is NaN (relu_grad's rule). Without indices, each plane's argmaxes are
  // recomputed (as the forward does) into the thread's scratch first.
  const index_t in_plane = ps.h * ps.w, out_plane = ps.oh * ps.ow;
  const InsideColumns cols(ps);
  const InteriorRow fast = interior_kernel(ps);
  index_t bad_indices = 0;
  static const bool avx512 = use_avx512();
  const bool windows_2x2 = avx512 && ps.kh == 2 && ps.kw == 2 && ps.stride_h == 2 &&
                           ps.stride_w == 2 && ps.pad_h == 0 && ps.pad_w == 0 && ps.dil_h == 1 &&
                           ps.dil_w == 1 && 2 * ps.oh <= ps.h && 2 * ps.ow <= ps.w &&
                           in_plane < (index_t(1) << 31);
  parallel_for(ps.n * ps.c, plane_grain(ps), [&](index_t pl) {
    float* grad = dx + pl * in_plane;
    const float* g = dy + pl * out_plane;
    const std::int64_t* idx = indices != nullptr ? indices + pl * out_plane : nullptr;
    if (idx == nullptr) {
      thread_local std::vector<float> values;
      thread_local std::vector<std::int64_t> argmax;
      values.resize(static_cast<size_t>(out_plane));
      argmax.resize(static_cast<size_t>(out_plane));
      plane_max(ps, x + pl * in_plane, cols, fast, false, values.data(), argmax.data());
      idx = argmax.data();
    }
    const float* in = x + pl * in_plane;
    if (windows_2x2 && backward_2x2_avx512(ps, g, idx, in, relu, grad)) return;
    std::fill(grad, grad + in_plane, 0.0f);
    // Given indices are checked here, in the pass that uses them: one
    // outside [min_index, h w) is counted and skipped, never followed.
    index_t bad = 0;
    for (index_t o = 0; o < out_plane; ++o) {
      const std::int64_t at = idx[o];
      if (at < min_index || at >= in_plane) {
        ++bad;
      } else if (at >= 0 && (!relu || !(in[at] <= 0.0f))) {  // relu_grad's rule: NaN passes
        grad[at] += g[o];
      }
    }
    if (bad != 0) {
#pragma omp atomic
      bad_indices += bad;
    }
  });
  return bad_indices;
}

}  // namespace cpu
}  // namespace fastcnn

// ------------------------------------------------------- 2x2 window codes --
// A training step's max-pool keeps one byte per window instead of an int64
// index: 8x less to write in the forward pass and to read in the backward
// pass, and with the ReLU rule folded in, the backward pass never reads x.

namespace fastcnn {
namespace cpu {
namespace {

constexpr std::uint8_t kGradientPasses = 4;

// One output row: maxima (ReLU'd when `relu`) and codes of windows [0, ow).
template <bool Relu>
void codes_row_generic(const float* r0, const float* r1, index_t ow, float* out,
                       std::uint8_t* codes, const float* affine) {
  for (index_t ox = 0; ox < ow; ++ox) {
    float v[4] = {r0[2 * ox], r0[2 * ox + 1], r1[2 * ox], r1[2 * ox + 1]};
    if (affine != nullptr)
      for (float& t : v) t = t * affine[0] + affine[1];  // batchnorm.cpp's normalisation
    float best = v[0];
    int tap = 0;
    for (int t = 1; t < 4; ++t) {
      const bool take = (v[t] > best) | (v[t] != v[t]);
      best = take ? v[t] : best;
      tap = take ? t : tap;
    }
    const bool passes = !Relu || !(best <= 0.0f);  // relu_grad's rule: NaN passes
    out[ox] = Relu ? relu_value(best) : best;
    codes[ox] = static_cast<std::uint8_t>(tap | (passes ? kGradientPasses : 0));
  }
}

template <bool Relu>
__attribute__((target("avx512f"))) void codes_row_avx512(const float* r0, const float* r1,
                                                        index_t ow, float* out,
                                                        std::uint8_t* codes,
                                                        const float* affine) {
  const __m512 zero = _mm512_setzero_ps();
  for (index_t ox = 0; ox < ow; ox += 16) {
    const index_t n = std::min<index_t>(16, ow - ox);
    __m512 best;
    __m512i code;
    windows_2x2_avx512(r0 + 2 * ox, r1 + 2 * ox, n, &best, &code, affine);
    const __mmask16 keep = static_cast<__mmask16>((1u << n) - 1);
    if (Relu) {
      const __mmask16 passes = _mm512_cmp_ps_mask(best, zero, _CMP_NLE_UQ);
      code = _mm512_mask_or_epi32(code, passes, code, _mm512_set1_epi32(kGradientPasses));
      best = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(best, zero, _CMP_NLT_UQ), best);  // relu_value
    } else {
      code = _mm512_or_epi32(code, _mm512_set1_epi32(kGradientPasses));
    }
    _mm512_mask_storeu_ps(out + ox, keep, best);
    _mm512_mask_cvtepi32_storeu_epi8(codes + ox, keep, code);
  }
}

// One input row pair's gradient from a row of dy and codes; columns past
// 2 ow (an odd width) are zero.
void codes_backward_row_generic(const float* g, const std::uint8_t* codes, index_t ow,
                                index_t w, index_t, float* r0, float* r1) {
  for (index_t ox = 0; ox < ow; ++ox) {
    const int code = codes[ox];
    const float v = (code & kGradientPasses) != 0 ? g[ox] : 0.0f;
    const int tap = code & 3;
    r0[2 * ox] = tap == 0 ? v : 0.0f;
    r0[2 * ox + 1] = tap == 1 ? v : 0.0f;
    r1[2 * ox] = tap == 2 ? v : 0.0f;
    r1[2 * ox + 1] = tap == 3 ? v : 0.0f;
  }
  for (index_t ix = 2 * ow; ix < w; ++ix) r0[ix] = r1[ix] = 0.0f;
}

// `readable`: how many code bytes may be read from `codes` on (16-byte loads
// where that allows, else a copy of the row's last ones).
__attribute__((target("avx512f"))) void codes_backward_row_avx512(const float* g,
                                                                 const std::uint8_t* codes,
                                                                 index_t ow, index_t w,
                                                                 index_t readable, float* r0,
                                                                 float* r1) {
  const __m512i zip_lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i zip_hi =
      _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (index_t ox = 0; ox < ow; ox += 16) {
    const index_t n = std::min<index_t>(16, ow - ox);
    const __mmask16 m = static_cast<__mmask16>((1u << n) - 1u);
    __m128i bytes;
    if (ox + 16 <= readable) {
      bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + ox));
    } else {
      alignas(16) std::uint8_t tail[16] = {};
      std::memcpy(tail, codes + ox, static_cast<size_t>(n));
      bytes = _mm_load_si128(reinterpret_cast<const __m128i*>(tail));
    }
    const __m512i code = _mm512_cvtepu8_epi32(bytes);
    __mmask16 tap[4];
    for (int t = 0; t < 4; ++t)
      tap[t] = _mm512_cmpeq_epi32_mask(code, _mm512_set1_epi32(t | kGradientPasses)) & m;
    const __m512 gv = _mm512_maskz_loadu_ps(m, g + ox);
    const __mmask16 lo = n >= 8 ? 0xFFFF : static_cast<__mmask16>((1u << (2 * n)) - 1u);
    const __mmask16 hi = n <= 8 ? 0 : static_cast<__mmask16>((1u << (2 * (n - 8))) - 1u);
    float* row[2] = {r0, r1};
    for (int r = 0; r < 2; ++r) {
      const __m512 e = _mm512_maskz_mov_ps(tap[2 * r], gv);
      const __m512 o = _mm512_maskz_mov_ps(tap[2 * r + 1], gv);
      _mm512_mask_storeu_ps(row[r] + 2 * ox, lo, _mm512_permutex2var_ps(e, zip_lo, o));
      _mm512_mask_storeu_ps(row[r] + 2 * ox + 16, hi, _mm512_permutex2var_ps(e, zip_hi, o));
    }
  }
  for (index_t ix = 2 * ow; ix < w; ++ix) r0[ix] = r1[ix] = 0.0f;
}

}  // namespace

void max_pool2d_2x2_codes_forward(const PoolShape& ps, const float* x, bool relu, float* y,
                                  std::uint8_t* codes, const float* scale, const float* shift) {
  static const bool avx512 = use_avx512();
  using Row = void (*)(const float*, const float*, index_t, float*, std::uint8_t*, const float*);
  const Row row = avx512 ? (relu ? codes_row_avx512<true> : codes_row_avx512<false>)
                         : (relu ? codes_row_generic<true> : codes_row_generic<false>);
  const index_t in_plane = ps.h * ps.w, out_plane = ps.oh * ps.ow;
  parallel_for(ps.n * ps.c, plane_grain(ps), [&](index_t pl) {
    const float* in = x + pl * in_plane;
    const float affine[2] = {scale != nullptr ? scale[pl % ps.c] : 1.0f,
                             shift != nullptr ? shift[pl % ps.c] : 0.0f};
    for (index_t oy = 0; oy < ps.oh; ++oy)
      row(in + 2 * oy * ps.w, in + (2 * oy + 1) * ps.w, ps.ow, y + pl * out_plane + oy * ps.ow,
          codes + pl * out_plane + oy * ps.ow, scale != nullptr ? affine : nullptr);
  });
}

void max_pool2d_2x2_codes_backward_plane(const float* dy, const std::uint8_t* codes, index_t h,
                                         index_t w, index_t readable, float* dx) {
  static const bool avx512 = use_avx512();
  const auto row = avx512 ? codes_backward_row_avx512 : codes_backward_row_generic;
  const index_t oh = h / 2, ow = w / 2;
  for (index_t oy = 0; oy < oh; ++oy)
    row(dy + oy * ow, codes + oy * ow, ow, w, readable - oy * ow, dx + 2 * oy * w,
        dx + (2 * oy + 1) * w);
  std::fill(dx + 2 * oh * w, dx + h * w, 0.0f);  // an odd last row
}

void max_pool2d_2x2_codes_backward(const PoolShape& ps, const float* dy,
                                   const std::uint8_t* codes, float* dx) {
  const index_t in_plane = ps.h * ps.w, out_plane = ps.oh * ps.ow;
  const index_t total = ps.n * ps.c * out_plane;
  parallel_for(ps.n * ps.c, plane_grain(ps), [&](index_t pl) {
    max_pool2d_2x2_codes_backward_plane(dy + pl * out_plane, codes + pl * out_plane, ps.h, ps.w,
                                        total - pl * out_plane, dx + pl * in_plane);
  });
}

}  // namespace cpu
}  // namespace fastcnn
