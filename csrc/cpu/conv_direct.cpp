// Direct convolution for layers with few taps per output (c r s <= 27: the
// first layers, 1 or 3 input channels), stride 1, dilation 1, one group.
//
// im2col + GEMM is a poor fit there: a GEMM of depth 9 or 27 spends more on
// packing and on loading and storing its C tiles than on multiplying. Here
// the taps of 16 neighbouring outputs sit in registers (one unaligned load
// each from a zero-padded copy of the input) and every output channel is an
// FMA chain over them, its weights broadcast from memory: the loads are
// amortised over all output channels. The weight gradient is the same
// pattern turned around: per output channel, one accumulator per tap over
// every pixel of a fixed slice of the batch.
//
// Behind a ReLU and a 2x2 max-pool in training (fastcnn.nn.Sequential), the
// first layer's weight and bias gradients come straight from the pooled
// gradient and the pool's window codes: each output-gradient plane is routed
// into an L1 buffer and consumed there, never written to memory (8% of a
// batch-256 training step of the MNIST CNN).
//
// Each output is bias + its taps in (c, i, j) order; each weight gradient
// sums per 16-lane accumulator in pixel order, then across lanes and over
// the slices in order: bitwise the same for any thread count, and a
// sample's output does not depend on its batch.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "fastcnn/cpu_kernels.h"
#include "fastcnn/gemm.h"
#include "fastcnn/parallel.h"
#include "fastcnn/scratch.h"

namespace fastcnn {
namespace cpu {
namespace {

constexpr index_t kMaxTaps = 27;  // registers: 27 tap vectors + accumulator + spare
constexpr index_t kMinTaps = 4;
constexpr index_t kWeightGradSlices = 8;

// The input of every image with its zero padding, each padded row stored s
// times, shifted left by 0 .. s - 1 columns and `stride` (a multiple of 16)
// floats apart: tap (c, i, j) of output (oy, ox) is at
// c plane + (oy + i) row + j stride + ox, so every 16-wide load of a tap is
// aligned (no load splits a cache line) and stays inside its row.
struct Padded {
  const float* data;
  index_t stride, row, plane, image;
};

Padded pad_images(const ConvShape& cs, const float* x) {
  const index_t hp = cs.h + 2 * cs.pad_h, wp = cs.w + 2 * cs.pad_w;
  const index_t stride = (cs.ow + 15) / 16 * 16, row = cs.s * stride;
  const index_t plane = hp * row, image = cs.c * plane;
  float* out = thread_scratch(ScratchSlot::DirectInput, cs.n * image);
  parallel_for(cs.n * cs.c, std::max<index_t>(1, 16384 / plane), [&](index_t bc) {
    float* p = out + bc * plane;
    const float* in = x + bc * cs.h * cs.w;
    for (index_t py = 0; py < hp; ++py) {
      const index_t iy = py - cs.pad_h;
      for (index_t j = 0; j < cs.s; ++j) {
        float* dst = p + py * row + j * stride;
        // padded column ox + j holds input column ox + j - pad_w
        const index_t lo = std::max<index_t>(0, cs.pad_w - j);
        const index_t hi = std::min(stride, std::min(cs.pad_w - j + cs.w, wp - j));
        if (iy < 0 || iy >= cs.h || hi <= lo) {
          std::fill(dst, dst + stride, 0.0f);
          continue;
        }
        std::fill(dst, dst + lo, 0.0f);
        std::memcpy(dst + lo, in + iy * cs.w + lo + j - cs.pad_w,
                    static_cast<size_t>(hi - lo) * sizeof(float));
        std::fill(dst + hi, dst + stride, 0.0f);
      }
    }
  });
  return {out, stride, row, plane, image};
}

// Offsets of the taps (c, i, j) from an output's top-left input, padded to
// T with repeats of tap 0 (whose weights are zero).
template <int T>
void tap_offsets(const ConvShape& cs, const Padded& in, index_t* off) {
  const index_t taps = cs.c * cs.r * cs.s;
  for (index_t t = 0; t < T; ++t) {
    const index_t tt = t < taps ? t : 0;
    const index_t c = tt / (cs.r * cs.s), i = tt / cs.s % cs.r, j = tt % cs.s;
    off[t] = c * in.plane + i * in.row + j * in.stride;
  }
}

// Output row oy of one image, every output channel. w: (k, T) zero-padded.
template <int T>
__attribute__((target("avx512f"))) void forward_row(const ConvShape& cs, const float* in,
                                                   const index_t* off, const float* w,
                                                   const float* bias, float* y, index_t oy,
                                                   index_t in_stride, index_t taps) {
  const index_t pixels = cs.oh * cs.ow;
  for (index_t ox = 0; ox < cs.ow; ox += 16) {
    const index_t n = std::min<index_t>(16, cs.ow - ox);
    const __mmask16 keep = static_cast<__mmask16>((1u << n) - 1u);
    const float* base = in + oy * in_stride + ox;
    __m512 x[T];
    // taps past `taps` are zero (and so are their weights): no 0 * inf
#pragma GCC unroll 32
    for (int t = 0; t < T; ++t)
      x[t] = t < taps ? _mm512_load_ps(base + off[t]) : _mm512_setzero_ps();
    float* out = y + oy * cs.ow + ox;
    for (index_t k = 0; k < cs.k; ++k) {
      const float* wk = w + k * T;
      __m512 acc = _mm512_set1_ps(bias != nullptr ? bias[k] : 0.0f);
#pragma GCC unroll 32
      for (int t = 0; t < T; ++t) acc = _mm512_fmadd_ps(_mm512_set1_ps(wk[t]), x[t], acc);
      _mm512_mask_storeu_ps(out + k * pixels, keep, acc);
    }
  }
}

// Where the weight gradient's dy comes from: the output gradient itself ...
struct PlainGrad {
  const float* dy;
  index_t k, oh, ow;

  // dy[b, ch] (oh x ow); `buffer` unused
  const float* plane(index_t b, index_t ch, float*) const { return dy + (b * k + ch) * oh * ow; }
};

// ... or, for a convolution followed by ReLU and a 2x2 / stride-2 max-pool,
// the pooled gradient routed by the pool's window codes
// (max_pool2d_2x2_codes_forward), one plane at a time into an L1-sized
// buffer: exactly the values the pool's backward pass would have written to
// memory, never leaving the cache.
struct PooledGrad {
  const float* dp;
  const std::uint8_t* codes;
  index_t k, oh, ow;  // the convolution's output plane
  index_t total;      // codes in all

  const float* plane(index_t b, index_t ch, float* buffer) const {
    const index_t at = (b * k + ch) * (oh / 2) * (ow / 2);
    max_pool2d_2x2_codes_backward_plane(dp + at, codes + at, oh, ow, total - at, buffer);
    return buffer;
  }
};

// sums[q * S + j] = sum over the pixels of images [b0, b1) of dy[b, k] times
// tap (row q0 + q, column j), for ROWS rows of S taps: ROWS x S accumulators
// stay in registers (at most 25), each tap row one base offset.
template <int S, int ROWS, class Source>
__attribute__((target("avx512f"))) void weight_grad_rows(const ConvShape& cs, const Padded& in,
                                                        const Source& dy, index_t k,
                                                        index_t b0, index_t b1,
                                                        const index_t* row_off, int rows,
                                                        float* sums, float* plane_sums) {
  __m512 acc[ROWS][S];
#pragma GCC unroll 16
  for (int q = 0; q < ROWS; ++q)
#pragma GCC unroll 8
    for (int j = 0; j < S; ++j) acc[q][j] = _mm512_setzero_ps();
  index_t off[ROWS];
  for (int q = 0; q < ROWS; ++q) off[q] = row_off[q < rows ? q : 0];
  float* buffer = thread_scratch(ScratchSlot::DirectGrad, cs.oh * cs.ow);
  for (index_t b = b0; b < b1; ++b) {
    const float* g = dy.plane(b, k, buffer);
    if (plane_sums != nullptr) plane_sums[b * cs.k + k] = row_block_sum(g, cs.oh, cs.ow);
    const float* img = in.data + b * in.image;
    for (index_t oy = 0; oy < cs.oh; ++oy) {
      const float* grow = g + oy * cs.ow;
      const float* xrow = img + oy * in.row;
      index_t ox = 0;
      for (; ox + 16 <= cs.ow; ox += 16) {  // whole blocks: loads fold into the FMAs
        const __m512 gv = _mm512_loadu_ps(grow + ox);
#pragma GCC unroll 16
        for (int q = 0; q < ROWS; ++q)
#pragma GCC unroll 8
          for (int j = 0; j < S; ++j)
            acc[q][j] =
                _mm512_fmadd_ps(gv, _mm512_load_ps(xrow + off[q] + j * in.stride + ox), acc[q][j]);
      }
      if (ox < cs.ow) {
        // masked FMAs: an input past the row's outputs (a NaN, say) must not
        // reach the sum (the loads stay inside the padded row)
        const __mmask16 keep = static_cast<__mmask16>((1u << (cs.ow - ox)) - 1u);
        const __m512 gv = _mm512_maskz_loadu_ps(keep, grow + ox);
#pragma GCC unroll 16
        for (int q = 0; q < ROWS; ++q)
#pragma GCC unroll 8
          for (int j = 0; j < S; ++j)
            acc[q][j] = _mm512_mask3_fmadd_ps(
                gv, _mm512_load_ps(xrow + off[q] + j * in.stride + ox), acc[q][j], keep);
      }
    }
  }
  // (a runtime bound on acc's index would keep the accumulators in memory)
  float total[ROWS * S];
#pragma GCC unroll 16
  for (int q = 0; q < ROWS; ++q)
#pragma GCC unroll 8
    for (int j = 0; j < S; ++j) total[q * S + j] = _mm512_reduce_add_ps(acc[q][j]);
  std::copy(total, total + rows * S, sums);
}

template <class Source>
using WeightGradRows = void (*)(const ConvShape&, const Padded&, const Source&, index_t, index_t,
                                index_t, const index_t*, int, float*, float*);

// The kernel for rows of s taps, and how many rows it takes at a time.
template <class Source>
WeightGradRows<Source> weight_grad_kernel(index_t s, int* rows) {
  switch (s) {
    case 1: *rows = 15; return weight_grad_rows<1, 15, Source>;
    case 2: *rows = 7; return weight_grad_rows<2, 7, Source>;
    case 3: *rows = 3; return weight_grad_rows<3, 3, Source>;
    case 4: *rows = 4; return weight_grad_rows<4, 4, Source>;
    case 5: *rows = 5; return weight_grad_rows<5, 5, Source>;
    case 6: *rows = 4; return weight_grad_rows<6, 4, Source>;
    default: *rows = 3; return weight_grad_rows<7, 3, Source>;
  }
}

template <int T>
void forward_impl(const ConvShape& cs, const float* x, const float* w, const float* bias,
                  float* y) {
  const Padded in = pad_images(cs, x);
  index_t off[T];
  tap_offsets<T>(cs, in, off);
  const index_t taps = cs.c * cs.r * cs.s;
  std::vector<float> wt(static_cast<size_t>(cs.k * T), 0.0f);
  for (index_t k = 0; k < cs.k; ++k)
    std::copy(w + k * taps, w + (k + 1) * taps, wt.begin() + k * T);
  const index_t y_image = cs.k * cs.oh * cs.ow;
  // one task per output row: batches of one image split too
  parallel_for(cs.n * cs.oh, std::max<index_t>(1, 2048 / (cs.k * cs.ow)), [&](index_t row) {
    const index_t b = row / cs.oh, oy = row % cs.oh;
    forward_row<T>(cs, in.data + b * in.image, off, wt.data(), bias, y + b * y_image, oy,
                   in.row, taps);
  });
}

// dw, and with plane_sums (n x k) each dy plane's row_block_sum.
template <class Source>
void weight_grad_impl(const ConvShape& cs, const Source& dy, const float* x, float* dw,
                      float* plane_sums = nullptr) {
  const Padded in = pad_images(cs, x);
  const index_t taps = cs.c * cs.r * cs.s, tap_rows = cs.c * cs.r;
  std::vector<index_t> row_off(static_cast<size_t>(tap_rows));
  for (index_t q = 0; q < tap_rows; ++q) row_off[q] = q / cs.r * in.plane + q % cs.r * in.row;
  int per_pass;
  const WeightGradRows<Source> kernel = weight_grad_kernel<Source>(cs.s, &per_pass);
  const index_t passes = (tap_rows + per_pass - 1) / per_pass;
  if (dw == nullptr) {  // only the planes' sums
    parallel_for(cs.n * cs.k, 16, [&](index_t bk) {
      float* buffer = thread_scratch(ScratchSlot::DirectGrad, cs.oh * cs.ow);
      plane_sums[bk] = row_block_sum(dy.plane(bk / cs.k, bk % cs.k, buffer), cs.oh, cs.ow);
    });
    return;
  }
  const index_t slices = std::min(cs.n, kWeightGradSlices);
  // one task per (slice, output channel, pass over tap rows)
  std::vector<float> sums(static_cast<size_t>(slices * cs.k * taps));
  parallel_for(slices * cs.k * passes, 1, [&](index_t task) {
    const index_t pass = task % passes, sk = task / passes, s = sk / cs.k, k = sk % cs.k;
    const index_t q0 = pass * per_pass;
    const int rows = static_cast<int>(std::min<index_t>(per_pass, tap_rows - q0));
    kernel(cs, in, dy, k, cs.n * s / slices, cs.n * (s + 1) / slices, row_off.data() + q0, rows,
           sums.data() + sk * taps + q0 * cs.s, pass == 0 ? plane_sums : nullptr);
  });
  if (dw == nullptr) return;
  for (index_t k = 0; k < cs.k; ++k)
    for (index_t t = 0; t < taps; ++t) {
      float total = sums[k * taps + t];
      for (index_t s = 1; s < slices; ++s) total += sums[(s * cs.k + k) * taps + t];
      dw[k * taps + t] = total;
    }
}

bool use_avx512() {
  static const bool yes =
      __builtin_cpu_supports("avx512f") && std::strcmp(sgemm_kernel_name(), "generic") != 0;
  return yes;
}

}  // namespace

bool direct_conv_applies(const ConvShape& cs) {
  const index_t taps = cs.c * cs.r * cs.s;
  // The padded copy holds s shifted copies of each row: at most 256 KiB an
  // image (MNIST and CIFAR sizes; a 224x224 first layer stays im2col). A
  // bound on the image, never on the batch: the path must not depend on it.
  const index_t padded = cs.c * (cs.h + 2 * cs.pad_h) * cs.s * ((cs.ow + 15) / 16 * 16);
  if (padded > (index_t(1) << 16)) return false;
  return cs.stride_h == 1 && cs.stride_w == 1 && cs.dil_h == 1 && cs.dil_w == 1 &&
         cs.groups == 1 && cs.s <= 7 && taps >= kMinTaps && taps <= kMaxTaps && cs.oh > 0 &&
         cs.ow > 0 &&
         use_avx512();
}

void direct_conv_forward(const ConvShape& cs, const float* x, const float* w, const float* bias,
                         float* y) {
  if (cs.n == 0) return;
  const index_t taps = cs.c * cs.r * cs.s;
  if (taps <= 9) return forward_impl<9>(cs, x, w, bias, y);
  if (taps <= 18) return forward_impl<18>(cs, x, w, bias, y);
  return forward_impl<27>(cs, x, w, bias, y);
}

void direct_conv_weight_grad(const ConvShape& cs, const float* dy, const float* x, float* dw) {
  const index_t taps = cs.c * cs.r * cs.s;
  if (cs.n == 0) {
    std::fill(dw, dw + cs.k * taps, 0.0f);
    return;
  }
  weight_grad_impl(cs, PlainGrad{dy, cs.k, cs.oh, cs.ow}, x, dw);
}

void direct_conv_grads_from_pool(const ConvShape& cs, const float* dpool,
                                 const std::uint8_t* codes, const float* x, float* dw,
                                 float* db) {
  const index_t taps = cs.c * cs.r * cs.s;
  if (cs.n == 0) {
    if (dw != nullptr) std::fill(dw, dw + cs.k * taps, 0.0f);
    if (db != nullptr) std::fill(db, db + cs.k, 0.0f);
    return;
  }
  std::vector<float> plane_sums(db != nullptr ? static_cast<size_t>(cs.n * cs.k) : 0);
  const PooledGrad source{dpool, codes, cs.k, cs.oh, cs.ow, cs.n * cs.k * (cs.oh / 2) * (cs.ow / 2)};
  weight_grad_impl(cs, source, x, dw,
                   db != nullptr ? plane_sums.data() : nullptr);
  if (db != nullptr)
    for (index_t ko = 0; ko < cs.k; ++ko) {
      double sum = 0.0;  // images in order, as conv2d_backward's bias gradient
      for (index_t b = 0; b < cs.n; ++b) sum += plane_sums[b * cs.k + ko];
      db[ko] = static_cast<float>(sum);
    }
}

namespace {

__attribute__((target("avx512f"))) float row_block_sum_avx512(const float* plane, index_t oh,
                                                             index_t ow) {
  __m512 acc = _mm512_setzero_ps();
  const __mmask16 tail = static_cast<__mmask16>((1u << (ow % 16)) - 1u);
  for (index_t oy = 0; oy < oh; ++oy) {
    const float* row = plane + oy * ow;
    index_t ox = 0;
    for (; ox + 16 <= ow; ox += 16) acc = _mm512_add_ps(acc, _mm512_loadu_ps(row + ox));
    if (ox < ow) acc = _mm512_mask_add_ps(acc, tail, acc, _mm512_maskz_loadu_ps(tail, row + ox));
  }
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, acc);
  float total = 0.0f;
  for (int j = 0; j < 16; ++j) total += lanes[j];
  return total;
}

}  // namespace

float row_block_sum(const float* plane, index_t oh, index_t ow) {
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  if (avx512) return row_block_sum_avx512(plane, oh, ow);
  float acc[16] = {};  // the same per-lane additions, in plain C++
  for (index_t oy = 0; oy < oh; ++oy) {
    const float* row = plane + oy * ow;
    index_t ox = 0;
    for (; ox + 16 <= ow; ox += 16)
      for (int j = 0; j < 16; ++j) acc[j] += row[ox + j];
    for (int j = 0; ox + j < ow; ++j) acc[j] += row[ox + j];
  }
  float total = 0.0f;
  for (int j = 0; j < 16; ++j) total += acc[j];
  return total;
}

}  // namespace cpu
}  // namespace fastcnn
