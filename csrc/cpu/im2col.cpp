// im2col and col2im. Row (ci, ri, si) of the column matrix holds input
// channel ci shifted by kernel tap (ri, si): the convolution becomes
// weight (k, c r s) @ cols (c r s, oh ow). The column matrix is never
// written as such: it is gathered straight into the GEMM's packed panels
// (and so are the output gradients); col2im folds a column gradient back.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "fastcnn/cpu_kernels.h"
#include "fastcnn/gemm.h"
#include "fastcnn/parallel.h"
#include "fastcnn/scratch.h"

namespace fastcnn {
namespace cpu {

namespace {

// Packed-panel im2col. The chunk's input is first copied with its zero
// padding made explicit, so that every column entry is a plain load with no
// bounds test:
//   cols(tap row t = (ci, ri, si), column j) = padded[row_offset(t) + column_offset(j)].
// A panel's `width` offsets along its columns sit in index registers and
// each packed row is one or two gathers from a base offset along the depth,
// written out in sequence: the panel is filled front to back in one pass.
struct PaddedInput {
  const float* data;
  index_t image, plane, row_step;  // floats per image, channel plane, input row

  // Offsets of tap rows t0, t0 + 1, ... (t = (ci, ri, si)), stepping
  // rather than dividing per entry.
  void row_offsets(const ConvShape& cs, index_t t0, index_t n, index_t* out) const {
    index_t ci = t0 / (cs.r * cs.s), ri = t0 / cs.s % cs.r, si = t0 % cs.s;
    for (index_t i = 0; i < n; ++i) {
      out[i] = ci * plane + ri * cs.dil_h * row_step + si * cs.dil_w;
      if (++si == cs.s) {
        si = 0;
        if (++ri == cs.r) ri = 0, ++ci;
      }
    }
  }
  // Offsets of output columns j0, j0 + 1, ... (j = (image, oy, ox)).
  void column_offsets(const ConvShape& cs, index_t j0, index_t n, index_t* out) const {
    const index_t pixels = cs.out_pixels();
    index_t b = j0 / pixels, oy = j0 % pixels / cs.ow, ox = j0 % cs.ow;
    for (index_t i = 0; i < n; ++i) {
      out[i] = b * image + oy * cs.stride_h * row_step + ox * cs.stride_w;
      if (++ox == cs.ow) {
        ox = 0;
        if (++oy == cs.oh) oy = 0, ++b;
      }
    }
  }
};

// x: `count` images x_stride floats apart, one group's channels each.
PaddedInput pad_input(const ConvShape& cs, const float* x, index_t x_stride, index_t count) {
  if (cs.pad_h == 0 && cs.pad_w == 0) return {x, x_stride, cs.h * cs.w, cs.w};
  const index_t cg = cs.c_per_group(), hp = cs.h + 2 * cs.pad_h, wp = cs.w + 2 * cs.pad_w;
  float* padded = thread_scratch(ScratchSlot::Padded, count * cg * hp * wp);
  parallel_for(count * cg, std::max<index_t>(1, 16384 / (hp * wp)), [&](index_t bc) {
    const float* in = x + bc / cg * x_stride + bc % cg * cs.h * cs.w;
    float* out = padded + bc * hp * wp;
    std::fill(out, out + cs.pad_h * wp, 0.0f);
    for (index_t iy = 0; iy < cs.h; ++iy) {
      float* line = out + (cs.pad_h + iy) * wp;
      for (index_t i = 0; i < cs.pad_w; ++i) line[i] = 0.0f;
      for (index_t i = 0; i < cs.w; ++i) line[cs.pad_w + i] = in[iy * cs.w + i];
      for (index_t i = cs.pad_w + cs.w; i < wp; ++i) line[i] = 0.0f;
    }
    std::fill(out + (cs.pad_h + cs.h) * wp, out + hp * wp, 0.0f);
  });
  return {padded, cg * hp * wp, hp * wp, wp};
}

// out[t * width + j] = src[bases[t] + off[j]] for j < valid, 0 for j >= valid.
void gather_rows_generic(const float* src, const index_t* bases, index_t depth,
                         const index_t* off, int width, int valid, float* out) {
  for (index_t t = 0; t < depth; ++t, out += width) {
    const float* base = src + bases[t];
    for (int j = 0; j < width; ++j) out[j] = j < valid ? base[off[j]] : 0.0f;
  }
}

__attribute__((target("avx2"))) void gather_rows_avx2_16(const float* src, const index_t* bases,
                                                         index_t depth, const std::int32_t* off,
                                                         int, int valid, float* out) {
  const __m256i i0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(off));
  const __m256i i1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(off + 8));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 m0 = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(valid), lane));
  const __m256 m1 = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(valid - 8), lane));
  const __m256 zero = _mm256_setzero_ps();
  for (index_t t = 0; t < depth; ++t, out += 16) {
    const float* base = src + bases[t];
    _mm256_store_ps(out, _mm256_mask_i32gather_ps(zero, base, i0, m0, 4));
    _mm256_store_ps(out + 8, _mm256_mask_i32gather_ps(zero, base, i1, m1, 4));
  }
}

// Widths up to 32 (12-row A~ panels, 16- or 32-column B~ panels): one
// masked gather per 16 lanes of a row; lanes past `valid` read nothing.
__attribute__((target("avx512f"))) void gather_rows_avx512(const float* src,
                                                          const index_t* bases, index_t depth,
                                                          const std::int32_t* off, int width,
                                                          int valid, float* out) {
  const int halves = (width + 15) / 16;
  __m512i idx[2];
  __mmask16 take[2], store[2];
  for (int h = 0; h < halves; ++h) {
    idx[h] = _mm512_loadu_si512(off + 16 * h);
    const int v = std::max(0, std::min(16, valid - 16 * h)), w = std::min(16, width - 16 * h);
    take[h] = static_cast<__mmask16>((1u << v) - 1u);
    store[h] = static_cast<__mmask16>((1u << w) - 1u);
  }
  const __m512 zero = _mm512_setzero_ps();
  for (index_t t = 0; t < depth; ++t, out += width) {
    const float* base = src + bases[t];
    for (int h = 0; h < halves; ++h)
      _mm512_mask_storeu_ps(out + 16 * h, store[h],
                            _mm512_mask_i32gather_ps(zero, take[h], idx[h], base, 4));
  }
}

using GatherRows = void (*)(const float*, const index_t*, index_t, const std::int32_t*, int,
                            int, float*);

// Follows the GEMM's choice: FASTCNN_GEMM_KERNEL=generic selects the plain
// loops here too, so the tests can run them on any machine.
GatherRows simd_gather(int width) {
  static const bool generic = std::strcmp(sgemm_kernel_name(), "generic") == 0;
  static const bool avx512 = !generic && __builtin_cpu_supports("avx512f");
  static const bool avx2 = !generic && __builtin_cpu_supports("avx2");
  if (width <= 32 && avx512) return gather_rows_avx512;
  if (width == 16 && avx2) return gather_rows_avx2_16;
  return nullptr;
}

// Where a panel's columns have consecutive offsets (unit-stride convolution:
// runs along an output row; output gradients: runs along a whole image), a
// row is cheaper as a few expanding loads than as gathers: each run of
// columns within a 16-lane half is one _mm512_mask_expandloadu_ps of
// contiguous floats into the run's lanes.
struct Run {
  __mmask16 lanes;     // the run's lanes within its half
  std::int32_t start;  // offset of its first column
};
constexpr int kMaxRunsPerHalf = 4;  // more runs than this: gathers are as fast

// The runs of off[0, valid) in halves of 16 lanes; false when a half needs
// more than kMaxRunsPerHalf.
bool split_runs(const index_t* off, int valid, int width, Run runs[2][kMaxRunsPerHalf],
                int counts[2]) {
  for (int h = 0; h * 16 < width; ++h) {
    counts[h] = 0;
    for (int j = h * 16; j < std::min(valid, h * 16 + 16);) {
      int end = j + 1;
      while (end < std::min(valid, h * 16 + 16) && off[end] == off[end - 1] + 1) ++end;
      if (counts[h] == kMaxRunsPerHalf) return false;
      const unsigned bits = ((1u << (end - j)) - 1u) << (j - h * 16);
      runs[h][counts[h]++] = Run{static_cast<__mmask16>(bits), static_cast<std::int32_t>(off[j])};
      j = end;
    }
  }
  return true;
}

__attribute__((target("avx512f"))) void expand_rows_avx512(const float* src,
                                                          const index_t* bases, index_t depth,
                                                          const Run runs[2][kMaxRunsPerHalf],
                                                          const int counts[2], int width,
                                                          float* out) {
  const int halves = (width + 15) / 16;
  const __mmask16 last = width % 16 == 0 ? 0xFFFF : static_cast<__mmask16>((1u << (width % 16)) - 1);
  for (index_t t = 0; t < depth; ++t, out += width) {
    const float* base = src + bases[t];
    for (int h = 0; h < halves; ++h) {
      __m512 v = _mm512_setzero_ps();
      for (int r = 0; r < counts[h]; ++r)
        v = _mm512_mask_expandloadu_ps(v, runs[h][r].lanes, base + runs[h][r].start);
      _mm512_mask_storeu_ps(out + 16 * h, h == halves - 1 ? last : 0xFFFF, v);
    }
  }
}

// Panels of a matrix whose entry (t, j) is src[base t + offset j], t along
// the depth (packed rows), j along the panels' columns (`columns` of them);
// bases(t0, n, out) and offsets(j0, n, out) write n consecutive ones.
// Panels [q0, q1) only (q1 < 0: all) when the caller splits them over threads.
template <typename Bases, typename Offsets>
void pack_gathered(const float* src, index_t depth, index_t columns, int width, index_t span,
                   Bases&& fill_bases, Offsets&& fill_offsets, float* dst, index_t q0 = 0,
                   index_t q1 = -1) {
  index_t* bases = thread_scratch<index_t>(ScratchSlot::Bases, depth);
  fill_bases(0, depth, bases);
  // 32-bit gather offsets while every address of the chunk fits them.
  const GatherRows simd = span < (index_t(1) << 31) ? simd_gather(width) : nullptr;
  static const bool avx512 = std::strcmp(sgemm_kernel_name(), "generic") != 0 &&
                             __builtin_cpu_supports("avx512f");
  const bool expand = avx512 && width <= 32;
  if (q1 < 0) q1 = (columns + width - 1) / width;
  parallel_for(q1 - q0, std::max<index_t>(1, 16384 / (depth * width)), [&](index_t i) {
    const index_t q = q0 + i;
    const int valid = static_cast<int>(std::min<index_t>(width, columns - q * width));
    index_t off[32] = {};
    fill_offsets(q * width, valid, off);
    float* out = dst + q * depth * width;
    if (simd == nullptr) return gather_rows_generic(src, bases, depth, off, width, valid, out);
    Run runs[2][kMaxRunsPerHalf];
    int counts[2] = {0, 0};
    if (expand && split_runs(off, valid, width, runs, counts))
      return expand_rows_avx512(src, bases, depth, runs, counts, width, out);
    std::int32_t off32[32];
    for (int j = 0; j < 32; ++j) off32[j] = static_cast<std::int32_t>(off[j]);
    simd(src, bases, depth, off32, width, valid, out);
  });
}

}  // namespace

void im2col_packed(const ConvShape& cs, const float* x, index_t x_stride, index_t count,
                   int width, float* dst, index_t q0, index_t q1) {
  const PaddedInput in = pad_input(cs, x, x_stride, count);
  const index_t span = (count - 1) * in.image + cs.c_per_group() * in.plane;
  pack_gathered(in.data, cs.col_rows(), count * cs.out_pixels(), width, span,
                [&](index_t t0, index_t n, index_t* out) { in.row_offsets(cs, t0, n, out); },
                [&](index_t j0, index_t n, index_t* out) { in.column_offsets(cs, j0, n, out); },
                dst, q0, q1);
}

void im2col_packed_transposed(const ConvShape& cs, const float* x, index_t x_stride,
                              index_t count, int width, float* dst) {
  const PaddedInput in = pad_input(cs, x, x_stride, count);
  const index_t span = (count - 1) * in.image + cs.c_per_group() * in.plane;
  pack_gathered(in.data, count * cs.out_pixels(), cs.col_rows(), width, span,
                [&](index_t j0, index_t n, index_t* out) { in.column_offsets(cs, j0, n, out); },
                [&](index_t t0, index_t n, index_t* out) { in.row_offsets(cs, t0, n, out); },
                dst);
}

namespace {

// Output-gradient entry (ko, j = (image, pixel)) of a chunk: dy[b y_stride + ko pixels + p].
void pixel_offsets(index_t pixels, index_t y_stride, index_t j0, index_t n, index_t* out) {
  index_t b = j0 / pixels, p = j0 % pixels;
  for (index_t i = 0; i < n; ++i) {
    out[i] = b * y_stride + p;
    if (++p == pixels) p = 0, ++b;
  }
}

void channel_offsets(index_t pixels, index_t k0, index_t n, index_t* out) {
  for (index_t i = 0; i < n; ++i) out[i] = (k0 + i) * pixels;
}

}  // namespace

void grad_output_packed(const ConvShape& cs, const float* dy, index_t y_stride, index_t count,
                        int width, float* dst) {
  const index_t pixels = cs.out_pixels(), kg = cs.k_per_group();
  pack_gathered(dy, kg, count * pixels, width, (count - 1) * y_stride + kg * pixels,
                [&](index_t k0, index_t n, index_t* out) { channel_offsets(pixels, k0, n, out); },
                [&](index_t j0, index_t n, index_t* out) {
                  pixel_offsets(pixels, y_stride, j0, n, out);
                },
                dst);
}

void grad_output_packed_transposed(const ConvShape& cs, const float* dy, index_t y_stride,
                                   index_t count, int width, float* dst) {
  const index_t pixels = cs.out_pixels(), kg = cs.k_per_group();
  pack_gathered(dy, count * pixels, kg, width, (count - 1) * y_stride + kg * pixels,
                [&](index_t j0, index_t n, index_t* out) {
                  pixel_offsets(pixels, y_stride, j0, n, out);
                },
                [&](index_t k0, index_t n, index_t* out) { channel_offsets(pixels, k0, n, out); },
                dst);
}

namespace {

// Stride 1, one channel: each input pixel's gradient summed over the taps
// that read it, 16 pixels a step (one masked load and add per tap, one
// store): no zero-fill, no read-modify-write of dx. Taps are added in the
// same order, from the same +0, as the generic loop below: the same bits.
__attribute__((target("avx512f"))) void col2im_plane_unit_stride_avx512(const ConvShape& cs,
                                                                       const float* cols,
                                                                       index_t ld,
                                                                       float* plane) {
  // Four rows of 16 pixels at a time: four independent chains of adds (one
  // chain of dependent adds per vector would wait on the add latency).
  constexpr int kRows = 4;
  for (index_t iy0 = 0; iy0 < cs.h; iy0 += kRows) {
    const int rows = static_cast<int>(std::min<index_t>(kRows, cs.h - iy0));
    for (index_t x0 = 0; x0 < cs.w; x0 += 16) {
      const index_t n = std::min<index_t>(16, cs.w - x0);
      __m512 acc[kRows];
      for (int k = 0; k < kRows; ++k) acc[k] = _mm512_setzero_ps();
      for (index_t ri = 0; ri < cs.r; ++ri) {
        for (index_t si = 0; si < cs.s; ++si) {
          const index_t ox0 = x0 + cs.pad_w - si * cs.dil_w;  // lane l reads ox0 + l
          const index_t lo = std::max<index_t>(0, -ox0), hi = std::min(n, cs.ow - ox0);
          if (lo >= hi) continue;
          const __mmask16 lanes = static_cast<__mmask16>(((1u << (hi - lo)) - 1u) << lo);
          const float* tap = cols + (ri * cs.s + si) * ld + ox0;
          for (int k = 0; k < rows; ++k) {
            const index_t oy = iy0 + k + cs.pad_h - ri * cs.dil_h;
            if (oy < 0 || oy >= cs.oh) continue;
            // Masked-off lanes are never read, even where ox0 + l < 0.
            const __m512 v = _mm512_maskz_loadu_ps(lanes, tap + oy * cs.ow);
            acc[k] = _mm512_mask_add_ps(acc[k], lanes, acc[k], v);
          }
        }
      }
      const __mmask16 keep = static_cast<__mmask16>((1u << n) - 1u);
      for (int k = 0; k < rows; ++k)
        _mm512_mask_storeu_ps(plane + (iy0 + k) * cs.w + x0, keep, acc[k]);
    }
  }
}

}  // namespace

// The adjoint of im2col: every column entry is added back to the input pixel
// it was copied from; dx is overwritten. Channels are independent; within a
// channel the taps are added in a fixed order, so the result does not depend
// on threads.
void col2im(const ConvShape& cs, const float* cols, index_t ld, float* dx) {
  const index_t taps = cs.r * cs.s;
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  const bool unit_stride = avx512 && cs.stride_h == 1 && cs.stride_w == 1;
  parallel_for(cs.c_per_group(), 1, [&](index_t ci) {
    float* plane = dx + ci * cs.h * cs.w;
    if (unit_stride) return col2im_plane_unit_stride_avx512(cs, cols + ci * taps * ld, ld, plane);
    std::fill(plane, plane + cs.h * cs.w, 0.0f);
    for (index_t tap = 0; tap < taps; ++tap) {
      const index_t ri = tap / cs.s, si = tap % cs.s;
      const float* src = cols + (ci * taps + tap) * ld;
      index_t w_lo, w_hi;
      valid_output_range(cs.w, cs.ow, cs.stride_w, cs.pad_w, si * cs.dil_w, &w_lo, &w_hi);
      const index_t iw0 = w_lo * cs.stride_w - cs.pad_w + si * cs.dil_w;
      for (index_t oy = 0; oy < cs.oh; ++oy, src += cs.ow) {
        const index_t iy = oy * cs.stride_h - cs.pad_h + ri * cs.dil_h;
        if (iy < 0 || iy >= cs.h) continue;
        float* out = plane + iy * cs.w + iw0;
        if (cs.stride_w == 1) {
          for (index_t ox = w_lo; ox < w_hi; ++ox) out[ox - w_lo] += src[ox];
        } else {
          for (index_t ox = w_lo; ox < w_hi; ++ox) out[(ox - w_lo) * cs.stride_w] += src[ox];
        }
      }
    }
  });
}

}  // namespace cpu
}  // namespace fastcnn
