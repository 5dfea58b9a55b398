// Our SGEMM: C[b] = act(alpha A[b] B[b]^T + beta C[b] + bias), on CUDA cores
// (FFMA, register-blocked) or, when allowed, on tensor cores in TF32
// (mma.sync m16n8k8).
//
// A block computes a BM x BN tile of C, stepping BK along k. Per k-step each
// thread loads its share of the next A and B tiles from global memory into
// registers (float4 loads where the layout allows), the block multiplies the
// current tiles from shared memory, then the registers go into the other half
// of a double buffer: one barrier per k-step, and the global loads overlap the
// arithmetic. Tiles sit in shared memory k-major ([BK][BM + 8]) whatever the
// operand's layout, so the transposed variants differ only in how they load.
// Small problems split k across blocks; the partial products are added in a
// fixed order by a second kernel (deterministic, no atomics).
#include <atomic>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <type_traits>

#include "fastcnn/cuda_launch.h"
#include "fastcnn/kernel_math.h"

namespace fastcnn {
namespace cuda {
namespace {

// ----------------------------------------------------------------- helpers --

// 4 consecutive floats, 16-byte aligned: one vector access on the GPU. A
// misaligned one faults there ("misaligned address"); the emulator raises.
FASTCNN_HD void check_vec4(const float* p) {
#ifndef __CUDA_ARCH__
  if ((reinterpret_cast<std::uintptr_t>(p) & 15u) != 0)
    throw std::logic_error("misaligned address: a float4 access at an address not a "
                           "multiple of 16");
#else
  (void)p;
#endif
}

FASTCNN_HD void load_vec4(const float* p, float* v) {
  check_vec4(p);
#ifdef __CUDA_ARCH__
  const float4 q = *reinterpret_cast<const float4*>(p);
  v[0] = q.x;
  v[1] = q.y;
  v[2] = q.z;
  v[3] = q.w;
#else
  std::memcpy(v, p, 4 * sizeof(float));
#endif
}

FASTCNN_HD void store_vec4(float* p, const float* v) {
  check_vec4(p);
#ifdef __CUDA_ARCH__
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
#else
  std::memcpy(p, v, 4 * sizeof(float));
#endif
}

// x rounded to TF32 (10-bit mantissa), to nearest, ties away from zero, as
// cvt.rna.tf32.f32: what the tensor cores multiply.
FASTCNN_HD float round_tf32(float x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  std::uint32_t u;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(u) : "f"(x));
  return __uint_as_float(u);
#else
  const std::uint32_t u = float_bits(x);
  if ((u & 0x7F800000u) == 0x7F800000u) return x;  // inf and NaN stay
  return bits_float((u + 0x1000u) & 0xFFFFE000u);
#endif
}


FASTCNN_HD index_t ceil_div(index_t a, index_t b) { return (a + b - 1) / b; }

// ------------------------------------------------------------------ tiling --

template <int BM_, int BN_, int BK_, int TM_, int TN_, bool kTensor_, int MIN_BLOCKS>
struct Tiling {
  static constexpr int BM = BM_, BN = BN_, BK = BK_;
  static constexpr int TM = TM_, TN = TN_;  // thread tile (CUDA cores only)
  static constexpr bool kTensor = kTensor_;
  static constexpr int kThreads = 256;
  static constexpr int kMinBlocks = MIN_BLOCKS;
  // Rows of BM + 8 floats: the TF32 fragment reads (lanes 4 g + t read row
  // t, column g) hit 32 distinct banks, and float4 alignment is kept.
  static constexpr int LDA = BM + 8, LDB = BN + 8;
  static constexpr std::size_t kSmemBytes = 2u * BK * (LDA + LDB) * sizeof(float);
  static_assert(kTensor || (BM / TM) * (BN / TN) == kThreads, "one thread per thread tile");
  static_assert(kTensor || (TM % 4 == 0 && TN % 4 == 0), "thread tiles in float4 columns");
  static_assert(!kTensor || (BM == 128 && BN == 128 && BK % 8 == 0),
                "8 warps of 64 x 32, k in steps of 8");
};

using SimtLarge = Tiling<128, 128, 8, 8, 8, false, 2>;
using SimtSmall = Tiling<64, 64, 16, 4, 4, false, 2>;
using TensorLarge = Tiling<128, 128, 16, 4, 4, true, 1>;

// Which elements of a BK x EXTENT tile (k x outer) thread `tid` loads: 4
// consecutive floats per pass, along k when the operand is k-contiguous,
// along the outer index otherwise.
template <int EXTENT, int BK, int THREADS>
struct TileMap {
  static constexpr int kPasses = EXTENT * BK / (4 * THREADS);
  static constexpr int kRegs = 4 * kPasses;
  // k-contiguous: k in [kc_k, kc_k + 4) of outer index kc_outer(pass)
  static constexpr int kKGroup = BK / 4;             // threads sharing an outer index
  static constexpr int kKStride = THREADS / kKGroup;  // outer distance between passes
  FASTCNN_HD static int kc_outer(int tid, int pass) { return tid / kKGroup + pass * kKStride; }
  FASTCNN_HD static int kc_k(int tid) { return (tid % kKGroup) * 4; }
  // outer-contiguous: outer in [oc_outer, oc_outer + 4) at k = oc_k(pass)
  static constexpr int kOGroup = EXTENT / 4;          // threads sharing a k
  static constexpr int kOStride = THREADS / kOGroup;  // k distance between passes
  FASTCNN_HD static int oc_outer(int tid) { return (tid % kOGroup) * 4; }
  FASTCNN_HD static int oc_k(int tid, int pass) { return tid / kOGroup + pass * kOStride; }

  static_assert(kPasses >= 1 && kPasses <= 4, "1 to 4 float4 per thread");
  static_assert(kKStride * kPasses == EXTENT, "k-contiguous passes cover the tile");
  static_assert(kOStride * kPasses == BK, "outer-contiguous passes cover the tile");
};

// Writes the loaded registers into a [BK][ld] k-major tile, rounded to TF32
// for the tensor-core kernels (once per element, not per fragment load).
template <class Map, bool kTf32>
FASTCNN_HD void stash_tile(bool k_contig, const float* r, float* tile, int ld, int tid) {
  float v[Map::kRegs];
  FASTCNN_UNROLL
  for (int i = 0; i < Map::kRegs; ++i) v[i] = kTf32 ? round_tf32(r[i]) : r[i];
  if (k_contig) {
    const int k = Map::kc_k(tid);
    FASTCNN_UNROLL
    for (int p = 0; p < Map::kPasses; ++p)
      FASTCNN_UNROLL
      for (int q = 0; q < 4; ++q) tile[(k + q) * ld + Map::kc_outer(tid, p)] = v[4 * p + q];
  } else {
    FASTCNN_UNROLL
    for (int p = 0; p < Map::kPasses; ++p)
      store_vec4(tile + Map::oc_k(tid, p) * ld + Map::oc_outer(tid), v + 4 * p);
  }
}

FASTCNN_HD index_t outer_offset(const GemmOperand& op, index_t o) {
  if (op.seg == 0) return o * op.o_stride;
  index_t r;
  const index_t s = div_rem(o, op.seg, &r);
  return s * op.seg_stride + r * op.o_stride;
}

// Kernel-side geometry of an implicit im2col operand.
struct ImplicitConv {
  const float* x = nullptr;
  index_t image_stride = 0, group_stride = 0, plane = 0, pixels = 0;
  int h = 0, w = 0, oh = 0, ow = 0, taps = 0, s = 0;
  int stride_h = 1, stride_w = 1, pad_h = 0, pad_w = 0, dil_h = 1, dil_w = 1;
};

struct Epilogue {
  GemmOutput c;
  index_t m = 0, n = 0;
  float alpha = 1.0f, beta = 0.0f;
  const float* bias = nullptr;
  index_t bias_batch_stride = 0;
  bool bias_per_row = true, relu = false;
  bool quad = false;  // columns 4j..4j+3 are contiguous in memory
  bool vec = false;   // ... and 16-byte aligned

  FASTCNN_HD float* at(index_t z, index_t i, index_t j) const {
    index_t col = j;
    if (c.seg != 0) {
      index_t r;
      col = div_rem(j, c.seg, &r) * c.seg_stride + r;
    }
    return c.ptr + z * c.batch_stride + i * c.row_stride + col;
  }
  FASTCNN_HD float finish(float acc, const float* dst, index_t z, index_t i, index_t j) const {
    float v = alpha * acc;
    if (beta != 0.0f) v += beta * *dst;  // beta == 0 never reads C
    if (bias != nullptr) v += bias[z * bias_batch_stride + (bias_per_row ? i : j)];
    return relu ? relu_value(v) : v;
  }
  FASTCNN_HD void store(index_t z, index_t i, index_t j, float acc) const {
    if (i >= m || j >= n) return;
    float* dst = at(z, i, j);
    *dst = finish(acc, dst, z, i, j);
  }
  // acc[0..3] into columns j0 .. j0 + 3, j0 a multiple of 4.
  FASTCNN_HD void store4(index_t z, index_t i, index_t j0, const float* acc) const {
    if (i >= m) return;
    if (quad && j0 + 4 <= n) {
      float* dst = at(z, i, j0);
      float v[4];
      FASTCNN_UNROLL
      for (int q = 0; q < 4; ++q) v[q] = finish(acc[q], dst + q, z, i, j0 + q);
      if (vec) {
        store_vec4(dst, v);
      } else {
        FASTCNN_UNROLL
        for (int q = 0; q < 4; ++q) dst[q] = v[q];
      }
      return;
    }
    FASTCNN_UNROLL
    for (int q = 0; q < 4; ++q) store(z, i, j0 + q, acc[q]);
  }
};

struct GemmArgs {
  index_t m = 0, n = 0, k = 0;
  index_t tiles_n = 1, splits = 1, k_chunk = 0;
  GemmOperand a, b;
  bool a_vec = false, b_vec = false;
  ImplicitConv conv;
  Epilogue epi;
};

// ----------------------------------------------------------------- loaders --

// An operand read through a GemmOperand view.
template <class Map>
struct StridedTile {
  const float* base;
  index_t off[4];  // k-contiguous: per pass; outer-contiguous: per outer index
  bool ok[4];
  index_t k_stride, k_seg, k_seg_stride;
  bool k_contig, vec;

  FASTCNN_HD StridedTile(const GemmOperand& op, bool vec_, index_t extent, index_t batch,
                         index_t o0, int tid)
      : base(op.ptr + batch * op.batch_stride), k_stride(op.k_stride), k_seg(op.k_seg),
        k_seg_stride(op.k_seg_stride), k_contig(op.k_stride == 1), vec(vec_) {
    FASTCNN_UNROLL
    for (int q = 0; q < 4; ++q) {
      const index_t o = o0 + (k_contig ? (q < Map::kPasses ? Map::kc_outer(tid, q) : 0)
                                       : Map::oc_outer(tid) + q);
      ok[q] = o < extent;
      off[q] = ok[q] ? outer_offset(op, o) : 0;
    }
  }

  // Where column k starts (relative to base and the outer offset).
  FASTCNN_HD index_t k_offset(index_t k) const {
    if (k_seg == 0) return k * k_stride;
    index_t within;
    const index_t segment = div_rem(k, k_seg, &within);
    return segment * k_seg_stride + within * k_stride;
  }

  // Registers for the tile starting at k0; zeros outside [.., k_end) and the extent.
  FASTCNN_HD void fetch(index_t k0, index_t k_end, int tid, float* r) const {
    if (k_contig) {
      // vec: 4 consecutive k from a multiple of 4 stay in one k segment (k_seg % 4 == 0)
      const index_t k = k0 + Map::kc_k(tid);
      const index_t at = k < k_end ? k_offset(k) : 0;
      FASTCNN_UNROLL
      for (int p = 0; p < Map::kPasses; ++p) {
        if (ok[p] && vec && k + 4 <= k_end) {
          load_vec4(base + off[p] + at, r + 4 * p);
        } else if (k_seg == 0) {
          const float* src = base + off[p] + at;
          FASTCNN_UNROLL
          for (int q = 0; q < 4; ++q) r[4 * p + q] = ok[p] && k + q < k_end ? src[q] : 0.0f;
        } else {
          FASTCNN_UNROLL
          for (int q = 0; q < 4; ++q)
            r[4 * p + q] = ok[p] && k + q < k_end ? base[off[p] + k_offset(k + q)] : 0.0f;
        }
      }
    } else {
      FASTCNN_UNROLL
      for (int p = 0; p < Map::kPasses; ++p) {
        const index_t k = k0 + Map::oc_k(tid, p);
        const float* src = base + (k < k_end ? k_offset(k) : 0);
        if (k >= k_end) {
          FASTCNN_UNROLL
          for (int q = 0; q < 4; ++q) r[4 * p + q] = 0.0f;
        } else if (vec && ok[3]) {  // ok[3]: all four inside
          load_vec4(src + off[0], r + 4 * p);
        } else {
          FASTCNN_UNROLL
          for (int q = 0; q < 4; ++q) r[4 * p + q] = ok[q] ? src[off[q]] : 0.0f;
        }
      }
    }
  }

  template <bool kTf32>
  FASTCNN_HD void stash(const float* r, float* tile, int ld, int tid) const {
    stash_tile<Map, kTf32>(k_contig, r, tile, ld, tid);
  }
};

// B read through its GemmOperand view.
template <class Map>
struct StridedB : StridedTile<Map> {
  FASTCNN_HD StridedB(const GemmArgs& args, index_t batch, index_t n0, int tid)
      : StridedTile<Map>(args.b, args.b_vec, args.n, batch, n0, tid) {}
};

// B = im2col(x) computed while loading: outer l = (image, oy, ox), k = (ci, ri, si).
template <class Map>
struct Im2colTile {
  const float* src[4];  // image and group base of each of the thread's 4 columns
  int iy0[4], ix0[4];
  bool ok[4];
  ImplicitConv cv;

  FASTCNN_HD Im2colTile(const GemmArgs& args, index_t batch, index_t n0, int tid) : cv(args.conv) {
    FASTCNN_UNROLL
    for (int q = 0; q < 4; ++q) {
      const index_t l = n0 + Map::oc_outer(tid) + q;
      ok[q] = l < args.n;
      index_t pix = 0, ox = 0;
      const index_t img = ok[q] ? div_rem(l, cv.pixels, &pix) : 0;
      const index_t oy = div_rem(pix, cv.ow, &ox);
      src[q] = cv.x + img * cv.image_stride + batch * cv.group_stride;
      iy0[q] = static_cast<int>(oy) * cv.stride_h - cv.pad_h;
      ix0[q] = static_cast<int>(ox) * cv.stride_w - cv.pad_w;
    }
  }

  FASTCNN_HD void fetch(index_t k0, index_t k_end, int tid, float* r) const {
    FASTCNN_UNROLL
    for (int p = 0; p < Map::kPasses; ++p) {
      const index_t k = k0 + Map::oc_k(tid, p);
      if (k >= k_end) {
        FASTCNN_UNROLL
        for (int q = 0; q < 4; ++q) r[4 * p + q] = 0.0f;
        continue;
      }
      const int kk = static_cast<int>(k);
      const int ci = kk / cv.taps, tap = kk % cv.taps;
      const int dy = (tap / cv.s) * cv.dil_h, dx = (tap % cv.s) * cv.dil_w;
      const index_t channel = ci * cv.plane;
      FASTCNN_UNROLL
      for (int q = 0; q < 4; ++q) {
        const int iy = iy0[q] + dy, ix = ix0[q] + dx;
        const bool inside = ok[q] && iy >= 0 && iy < cv.h && ix >= 0 && ix < cv.w;
        r[4 * p + q] = inside ? src[q][channel + iy * cv.w + ix] : 0.0f;
      }
    }
  }

  template <bool kTf32>
  FASTCNN_HD void stash(const float* r, float* tile, int ld, int tid) const {
    stash_tile<Map, kTf32>(false, r, tile, ld, tid);
  }
};

// B = im2col(x)^T computed while loading (the weight gradient's): outer o =
// (ci, ri, si), k = (image, oy, ox). Each thread loads 4 consecutive k of its
// rows; the k position is decoded once per fetch and stepped along.
template <class Map>
struct Im2colRowsTile {
  const float* src[4];  // the group's channel ci plane of image 0, per pass
  int ry[4], rx[4];     // the tap's offset: iy = oy * stride_h + ry
  bool ok[4];
  ImplicitConv cv;

  FASTCNN_HD Im2colRowsTile(const GemmArgs& args, index_t batch, index_t n0, int tid)
      : cv(args.conv) {
    FASTCNN_UNROLL
    for (int p = 0; p < 4; ++p) {
      const index_t o = n0 + (p < Map::kPasses ? Map::kc_outer(tid, p) : 0);
      ok[p] = p < Map::kPasses && o < args.n;
      const int row = ok[p] ? static_cast<int>(o) : 0;
      const int ci = row / cv.taps, tap = row % cv.taps;
      src[p] = cv.x + batch * cv.group_stride + ci * cv.plane;
      ry[p] = (tap / cv.s) * cv.dil_h - cv.pad_h;
      rx[p] = (tap % cv.s) * cv.dil_w - cv.pad_w;
    }
  }

  FASTCNN_HD void fetch(index_t k0, index_t k_end, int tid, float* r) const {
    const index_t k = k0 + Map::kc_k(tid);
    index_t pix = 0, ox = 0;
    index_t img = k < k_end ? div_rem(k, cv.pixels, &pix) : 0;
    index_t oy = div_rem(pix, cv.ow, &ox);
    FASTCNN_UNROLL
    for (int q = 0; q < 4; ++q) {
      const bool live = k + q < k_end;
      FASTCNN_UNROLL
      for (int p = 0; p < Map::kPasses; ++p) {
        const int iy = static_cast<int>(oy) * cv.stride_h + ry[p];
        const int ix = static_cast<int>(ox) * cv.stride_w + rx[p];
        const bool inside = live && ok[p] && iy >= 0 && iy < cv.h && ix >= 0 && ix < cv.w;
        r[4 * p + q] = inside ? src[p][img * cv.image_stride + iy * cv.w + ix] : 0.0f;
      }
      if (++ox == cv.ow) {  // the next column: (image, oy, ox) + 1
        ox = 0;
        if (++oy == cv.oh) {
          oy = 0;
          ++img;
        }
      }
    }
  }

  template <bool kTf32>
  FASTCNN_HD void stash(const float* r, float* tile, int ld, int tid) const {
    stash_tile<Map, kTf32>(true, r, tile, ld, tid);
  }
};

// ------------------------------------------------------------ multipliers --

// CUDA cores: thread (ty, tx) of a 16 x 16 grid owns TM x TN outputs, in
// float4 groups spread BM / (TM / 4) rows apart so that a warp's shared
// loads are broadcasts (A) or one contiguous 256-byte run (B).
template <class T>
struct SimtAccumulators {
  static constexpr int kRowGroups = T::TM / 4, kColGroups = T::TN / 4;
  static constexpr int kRowSpan = T::BM / kRowGroups, kColSpan = T::BN / kColGroups;
  static constexpr int kThreadsN = T::BN / T::TN;
  float v[T::TM][T::TN];

  FASTCNN_HD SimtAccumulators() {
    FASTCNN_UNROLL
    for (int i = 0; i < T::TM; ++i)
      FASTCNN_UNROLL
      for (int j = 0; j < T::TN; ++j) v[i][j] = 0.0f;
  }

  template <class Ctx>
  FASTCNN_HD void multiply(Ctx&, const float* as, const float* bs, int tid) {
    const int tx = tid % kThreadsN, ty = tid / kThreadsN;
    FASTCNN_UNROLL
    for (int kk = 0; kk < T::BK; ++kk) {
      float a[T::TM], b[T::TN];
      FASTCNN_UNROLL
      for (int h = 0; h < kRowGroups; ++h) load_vec4(as + kk * T::LDA + h * kRowSpan + ty * 4, a + 4 * h);
      FASTCNN_UNROLL
      for (int h = 0; h < kColGroups; ++h) load_vec4(bs + kk * T::LDB + h * kColSpan + tx * 4, b + 4 * h);
      FASTCNN_UNROLL
      for (int i = 0; i < T::TM; ++i)
        FASTCNN_UNROLL
        for (int j = 0; j < T::TN; ++j) v[i][j] += a[i] * b[j];
    }
  }

  FASTCNN_HD void store(const Epilogue& epi, index_t z, index_t m0, index_t n0, int tid) const {
    const int tx = tid % kThreadsN, ty = tid / kThreadsN;
    FASTCNN_UNROLL
    for (int i = 0; i < T::TM; ++i) {
      const index_t row = m0 + (i / 4) * kRowSpan + ty * 4 + i % 4;
      FASTCNN_UNROLL
      for (int h = 0; h < kColGroups; ++h)
        epi.store4(z, row, n0 + h * kColSpan + tx * 4, &v[i][4 * h]);
    }
  }
};

// Tensor cores: 8 warps as 2 (m) x 4 (n), a warp owning 64 x 32 outputs as
// 4 x 4 tiles of mma.m16n8k8. Fragments (PTX ISA, lane = 4 g + t):
//   A (16 x 8, row): a0 (g, t), a1 (g + 8, t), a2 (g, t + 4), a3 (g + 8, t + 4)
//   B (8 x 8, col):  b0 (k = t, n = g), b1 (k = t + 4, n = g)
//   C (16 x 8):      c0 (g, 2t), c1 (g, 2t + 1), c2 (g + 8, 2t), c3 (g + 8, 2t + 1)
template <class T>
struct TensorAccumulators {
  static constexpr int kWarpM = 64, kWarpN = 32;
  float v[4][4][4];

  FASTCNN_HD TensorAccumulators() {
    FASTCNN_UNROLL
    for (int i = 0; i < 4; ++i)
      FASTCNN_UNROLL
      for (int j = 0; j < 4; ++j)
        FASTCNN_UNROLL
        for (int q = 0; q < 4; ++q) v[i][j][q] = 0.0f;
  }

  template <class Ctx>
  FASTCNN_HD void multiply(Ctx& ctx, const float* as, const float* bs, int tid) {
    const int warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    const int wm = (warp / 4) * kWarpM, wn = (warp % 4) * kWarpN;
    FASTCNN_UNROLL
    for (int ks = 0; ks < T::BK; ks += 8) {
      std::uint32_t af[4][4], bf[4][2];
      const float* a_lo = as + (ks + t) * T::LDA + wm + g;      // k = t
      const float* a_hi = as + (ks + t + 4) * T::LDA + wm + g;  // k = t + 4
      FASTCNN_UNROLL
      for (int mi = 0; mi < 4; ++mi) {
        af[mi][0] = float_bits(a_lo[mi * 16]);
        af[mi][1] = float_bits(a_lo[mi * 16 + 8]);
        af[mi][2] = float_bits(a_hi[mi * 16]);
        af[mi][3] = float_bits(a_hi[mi * 16 + 8]);
      }
      const float* b_lo = bs + (ks + t) * T::LDB + wn + g;
      const float* b_hi = bs + (ks + t + 4) * T::LDB + wn + g;
      FASTCNN_UNROLL
      for (int ni = 0; ni < 4; ++ni) {
        bf[ni][0] = float_bits(b_lo[ni * 8]);
        bf[ni][1] = float_bits(b_hi[ni * 8]);
      }
      FASTCNN_UNROLL
      for (int mi = 0; mi < 4; ++mi)
        FASTCNN_UNROLL
        for (int ni = 0; ni < 4; ++ni) ctx.mma_tf32(v[mi][ni], af[mi], bf[ni]);
    }
  }

  FASTCNN_HD void store(const Epilogue& epi, index_t z, index_t m0, index_t n0, int tid) const {
    const int warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    const index_t r0 = m0 + (warp / 4) * kWarpM + g, c0 = n0 + (warp % 4) * kWarpN + 2 * t;
    FASTCNN_UNROLL
    for (int mi = 0; mi < 4; ++mi)
      FASTCNN_UNROLL
      for (int ni = 0; ni < 4; ++ni)
        FASTCNN_UNROLL
        for (int q = 0; q < 4; ++q)
          epi.store(z, r0 + mi * 16 + (q / 2) * 8, c0 + ni * 8 + q % 2, v[mi][ni][q]);
  }
};

// -------------------------------------------------------------------- body --

template <class T, template <class> class BTile>
struct GemmBody {
  using MapA = TileMap<T::BM, T::BK, T::kThreads>;
  using MapB = TileMap<T::BN, T::BK, T::kThreads>;
  static constexpr int kThreads = T::kThreads;
  // The im2col loader keeps 4 column bases per thread: it gets the registers
  // of two blocks per SM rather than spill.
  static constexpr int kMinBlocks =
      std::is_same<BTile<MapB>, StridedB<MapB>>::value ? T::kMinBlocks : 1;
  static constexpr bool kCooperative = true;
  using Accumulators =
      typename std::conditional<T::kTensor, TensorAccumulators<T>, SimtAccumulators<T>>::type;
  GemmArgs args;

  // Block (tile, z): tile = tm * tiles_n + tn, z = batch * splits + split.
  template <class Ctx>
  FASTCNN_HD void operator()(Ctx& ctx) const {
    float* as = reinterpret_cast<float*>(ctx.smem());  // [2][BK][LDA]
    float* bs = as + 2 * T::BK * T::LDA;               // [2][BK][LDB]
    const int tid = ctx.tid();
    index_t tn, split;
    const index_t tm = div_rem(ctx.bx(), args.tiles_n, &tn);
    const index_t z = ctx.by();
    const index_t batch = div_rem(z, args.splits, &split);
    const index_t m0 = tm * T::BM, n0 = tn * T::BN;
    const index_t k_begin = split * args.k_chunk;
    const index_t k_end = index_min(args.k, k_begin + args.k_chunk);

    const StridedTile<MapA> a(args.a, args.a_vec, args.m, batch, m0, tid);
    const BTile<MapB> b(args, batch, n0, tid);
    float ra[MapA::kRegs], rb[MapB::kRegs];
    if (k_begin < k_end) {
      a.fetch(k_begin, k_end, tid, ra);
      b.fetch(k_begin, k_end, tid, rb);
      a.template stash<T::kTensor>(ra, as, T::LDA, tid);
      b.template stash<T::kTensor>(rb, bs, T::LDB, tid);
    }
    ctx.sync();
    Accumulators acc;
    int stage = 0;
    for (index_t k0 = k_begin; k0 < k_end; k0 += T::BK) {
      const bool more = k0 + T::BK < k_end;
      if (more) {
        a.fetch(k0 + T::BK, k_end, tid, ra);
        b.fetch(k0 + T::BK, k_end, tid, rb);
      }
      acc.multiply(ctx, as + stage * T::BK * T::LDA, bs + stage * T::BK * T::LDB, tid);
      if (more) {
        a.template stash<T::kTensor>(ra, as + (stage ^ 1) * T::BK * T::LDA, T::LDA, tid);
        b.template stash<T::kTensor>(rb, bs + (stage ^ 1) * T::BK * T::LDB, T::LDB, tid);
      }
      ctx.sync();
      stage ^= 1;
    }
    acc.store(args.epi, z, m0, n0, tid);
  }

};

// Adds the split-k partial products in split order, then applies the epilogue.
struct SplitReduce {
  const float* partial;
  index_t splits, m, n;
  Epilogue epi;

  FASTCNN_HD void operator()(index_t e) const {
    index_t j, i;
    const index_t row = div_rem(e, n, &j);
    const index_t b = div_rem(row, m, &i);
    float sum = 0.0f;
    for (index_t s = 0; s < splits; ++s) sum += partial[((b * splits + s) * m + i) * n + j];
    epi.store(b, i, j, sum);
  }
};

// ------------------------------------------------------------------- host --

bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

// float4 loads are safe: every 4-group a thread loads is contiguous and aligned.
bool operand_vec(const GemmOperand& op) {
  if (!aligned16(op.ptr) || op.seg_stride % 4 != 0 || op.batch_stride % 4 != 0 ||
      op.k_seg_stride % 4 != 0)
    return false;
  if (op.k_stride == 1) return op.o_stride % 4 == 0 && op.k_seg % 4 == 0;
  return op.o_stride == 1 && op.k_stride % 4 == 0 && op.seg % 4 == 0;
}

Epilogue make_epilogue(const GemmProblem& p) {
  Epilogue e;
  e.c = p.c;
  e.m = p.m;
  e.n = p.n;
  e.alpha = p.alpha;
  e.beta = p.beta;
  e.bias = p.bias;
  e.bias_batch_stride = p.bias_batch_stride;
  e.bias_per_row = p.bias_per_row;
  e.relu = p.relu;
  e.quad = p.c.seg % 4 == 0;
  e.vec = e.quad && aligned16(p.c.ptr) && p.c.row_stride % 4 == 0 && p.c.seg_stride % 4 == 0 &&
          p.c.batch_stride % 4 == 0;
  return e;
}

ImplicitConv make_implicit(const ConvShape& cs, const float* x) {
  ImplicitConv cv;
  cv.x = x;
  cv.plane = cs.h * cs.w;
  cv.image_stride = cs.c * cv.plane;
  cv.group_stride = cs.c_per_group() * cv.plane;
  cv.pixels = cs.out_pixels();
  cv.h = static_cast<int>(cs.h);
  cv.w = static_cast<int>(cs.w);
  cv.oh = static_cast<int>(cs.oh);
  cv.ow = static_cast<int>(cs.ow);
  cv.taps = static_cast<int>(cs.r * cs.s);
  cv.s = static_cast<int>(cs.s);
  cv.stride_h = static_cast<int>(cs.stride_h);
  cv.stride_w = static_cast<int>(cs.stride_w);
  cv.pad_h = static_cast<int>(cs.pad_h);
  cv.pad_w = static_cast<int>(cs.pad_w);
  cv.dil_h = static_cast<int>(cs.dil_h);
  cv.dil_w = static_cast<int>(cs.dil_w);
  return cv;
}

// Blocks that keep a large GPU busy. The split count depends on the shape
// only, never on the device, so results are the same on every GPU.
constexpr index_t kTargetBlocks = 256;

index_t split_count(index_t tiles, index_t k_tiles, index_t batch) {
  if (tiles >= kTargetBlocks / 2 || k_tiles < 16) return 1;
  index_t s = ceil_div(kTargetBlocks, tiles);
  s = index_min(s, k_tiles / 8);  // at least 8 k-steps per split
  s = index_min(s, 65535 / batch);
  return s < 1 ? 1 : s;
}

template <class T, template <class> class BTile>
void run(const Exec& ex, const char* kernel, const GemmProblem& p, const ImplicitConv& cv) {
  const index_t tiles_m = ceil_div(p.m, T::BM), tiles_n = ceil_div(p.n, T::BN);
  const index_t k_tiles = ceil_div(p.k, T::BK);
  index_t splits = split_count(tiles_m * tiles_n * p.batch, k_tiles, p.batch);
  const index_t per_split = splits > 1 ? ceil_div(k_tiles, splits) : (k_tiles > 0 ? k_tiles : 1);
  splits = k_tiles > 0 ? ceil_div(k_tiles, per_split) : 1;

  GemmArgs args;
  args.m = p.m;
  args.n = p.n;
  args.k = p.k;
  args.tiles_n = tiles_n;
  args.splits = splits;
  args.k_chunk = per_split * T::BK;
  args.a = p.a;
  args.b = p.b;
  args.a_vec = operand_vec(p.a);
  args.b_vec = p.implicit_conv == nullptr && operand_vec(p.b);
  args.conv = cv;
  const Epilogue final_epi = make_epilogue(p);
  const Grid grid{tiles_m * tiles_n, p.batch * splits};
  if (splits == 1) {
    args.epi = final_epi;
    launch(ex, kernel, grid, T::kSmemBytes, GemmBody<T, BTile>{args});
    return;
  }
  // Each split writes its partial product to its own slice, the reduction
  // adds them in order and applies alpha, beta, bias and ReLU.
  const index_t slice = p.m * p.n;
  Workspace partial(ex, static_cast<std::size_t>(p.batch * splits * slice) * sizeof(float));
  GemmProblem part;
  part.m = p.m;
  part.n = p.n;
  part.c = make_output(partial.as<float>(), p.n, slice);
  args.epi = make_epilogue(part);
  launch(ex, kernel, grid, T::kSmemBytes, GemmBody<T, BTile>{args});
  for_each(ex, "gemm_split_reduce", p.batch * slice,
           SplitReduce{partial.as<float>(), splits, p.m, p.n, final_epi});
}

template <class T>
void dispatch(const Exec& ex, const GemmProblem& p, const char* strided_name,
              const char* im2col_name, const char* im2col_t_name) {
  if (p.implicit_conv == nullptr)
    run<T, StridedB>(ex, strided_name, p, ImplicitConv{});
  else if (p.implicit_transposed)
    run<T, Im2colRowsTile>(ex, im2col_t_name, p, make_implicit(*p.implicit_conv, p.conv_input));
  else
    run<T, Im2colTile>(ex, im2col_name, p, make_implicit(*p.implicit_conv, p.conv_input));
}

// TF32 mma.sync needs compute capability 8.0 (Ampere) or newer; older GPUs
// stay on the CUDA-core kernels whatever allow_tf32 says.
bool has_tf32_tensor_cores(const Exec& ex) {
  if (ex.emulated) return true;
  int device = 0;
  FASTCNN_CUDA_CHECK(cudaGetDevice(&device));
  static std::atomic<int> major[64];  // 0: not asked yet
  int m = device < 64 ? major[device].load(std::memory_order_relaxed) : 0;
  if (m == 0) {
    FASTCNN_CUDA_CHECK(cudaDeviceGetAttribute(&m, cudaDevAttrComputeCapabilityMajor, device));
    if (device < 64) major[device].store(m, std::memory_order_relaxed);
  }
  return m >= 8;
}

}  // namespace

void gemm(const Exec& ex, const GemmProblem& p) {
  if (p.m <= 0 || p.n <= 0 || p.batch <= 0) return;
  if (p.k < 0) throw std::invalid_argument("gemm: k must be >= 0");
  if (allow_tf32() && has_tf32_tensor_cores(ex)) {
    dispatch<TensorLarge>(ex, p, "gemm_tf32_128x128x16", "gemm_tf32_128x128x16_im2col",
                          "gemm_tf32_128x128x16_im2col_t");
  } else if (p.m > 64 && p.n > 64 &&
             ceil_div(p.m, SimtLarge::BM) * ceil_div(p.n, SimtLarge::BN) * p.batch >= 64) {
    dispatch<SimtLarge>(ex, p, "gemm_simt_128x128x8", "gemm_simt_128x128x8_im2col",
                        "gemm_simt_128x128x8_im2col_t");
  } else {
    dispatch<SimtSmall>(ex, p, "gemm_simt_64x64x16", "gemm_simt_64x64x16_im2col",
                        "gemm_simt_64x64x16_im2col_t");
  }
}

void sgemm(const Exec& ex, Trans ta, Trans tb, index_t m, index_t n, index_t k, float alpha,
           const float* a, index_t lda, const float* b, index_t ldb, float beta, float* c,
           index_t ldc) {
  // op(A)(i, k) = a[i lda + k] or a[k lda + i];  op(B)(k, j) = b[k ldb + j] or b[j ldb + k]
  GemmProblem p;
  p.m = m;
  p.n = n;
  p.k = k;
  p.a = ta == Trans::No ? make_operand(a, lda, 1) : make_operand(a, 1, lda);
  p.b = tb == Trans::No ? make_operand(b, 1, ldb) : make_operand(b, ldb, 1);
  p.c = make_output(c, ldc);
  p.alpha = alpha;
  p.beta = beta;
  gemm(ex, p);
}

const char* gemm_kernel_name() {
  return allow_tf32() ? "cuda tf32 mma.sync m16n8k8, 128x128x16 tiles"
                      : "cuda simt ffma, 128x128x8 / 64x64x16 tiles";
}

}  // namespace cuda
}  // namespace fastcnn
