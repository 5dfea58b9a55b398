// Winograd F(2x2, 3x3) convolution: 3x3 kernels, stride 1, dilation 1.
//
// Each 2x2 block of outputs (a "tile") comes from the 4x4 block of the
// padded input that covers it (tiles step by 2, so neighbours overlap by 2):
//
//   Y[k] = A^T ( sum_c U[k, c] .* V[c] ) A,   U = G g G^T,   V = B^T d B
//
// with g the 3x3 filter, d the 4x4 input block and the constant matrices of
// Lavin & Gray (2015). Per tile and channel pair that is 16 multiplies
// instead of 36, and the sum over c at each of the 16 positions xi is a
// GEMM over every tile of a chunk of the batch:
//
//   M_xi (K x T) = U_xi (K x C) @ V_xi (C x T)
//
// The backward pass is the exact gradient of that computation:
//   dM = A dY A^T                          (per output-gradient tile)
//   dU_xi (K x C) = sum over tiles dM_xi @ V_xi^T,   dg = G^T dU G
//   dV_xi (C x T) = U_xi^T @ dM_xi,        dd = B dV B^T, added into dx
// so the input and weight gradients also take 16/36 of the multiplies.
//
// The transforms run on 16 tiles of a tile row at a time in AVX-512
// registers (the input read as even / odd columns by permutes; zero padding
// by load masks, so the input is never copied); the path is taken only when
// the AVX-512 GEMM kernel is, on channel counts where the GEMMs fill the
// micro-kernel. Results are deterministic and independent of the thread
// count, and a sample's output and input gradient do not depend on the rest
// of the batch (each GEMM column is one tile of one sample).
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

#include "fastcnn/cpu_kernels.h"
#include "fastcnn/gemm.h"
#include "fastcnn/parallel.h"
#include "fastcnn/scratch.h"

namespace fastcnn {
namespace cpu {
namespace {

constexpr int kPositions = 16;  // the 4 x 4 transformed positions xi
// GEMM columns (tiles) a chunk aims at, and a cap on its buffers (V and M:
// 16 (C + K) floats per tile) for layers with many channels.
constexpr index_t kTargetTiles = 256;
constexpr index_t kMaxChunkFloats = index_t(1) << 18;
// ... but never fewer tiles than this: each chunk re-reads all 16 transformed
// weight matrices, which for many channels outweighs V and M spilling from L2.
constexpr index_t kMinTiles = 64;
// As conv2d's im2col path: the weight gradient sums fixed slices of the
// batch, each in order, then the slices in order.
constexpr index_t kWeightGradSlices = 8;
constexpr index_t kMaxWeightGradFloats = index_t(1) << 23;  // all slices' dU: 32 MiB
// Fewer channels than this on either side: the GEMMs are too thin to pay
// for the transforms (measured on the benchmark machine).
constexpr index_t kMinChannels = 16;

std::atomic<bool>& enabled_flag() {
  static std::atomic<bool> flag{[] {
    const char* env = std::getenv("FASTCNN_CONV_WINOGRAD");
    return env == nullptr || std::strcmp(env, "0") != 0;
  }()};
  return flag;
}

// How the tiles of a plane fill the 16 lanes of a vector. A row of more than
// 8 tiles is cut into groups of 16 tiles (R = 1); shorter rows are packed R
// to a vector (R = 2 up to 8 tiles, R = 4 up to 4), so a 14x14 or 8x8 map
// does not leave half or three quarters of every vector idle. Lane l holds
// tile l % L of packed row l / L (L = 16 for R = 1, else tw).
//
// Input rows reach the lanes through two source registers P, Q (32 floats):
// with R = 1 the 32 floats of one row from the group's first column; with
// R = 2 16 floats of each row; with R = 4 8 floats of each of four rows. So
// the segment of packed row r starts at float S r of (P, Q), S = 16 / 16 / 8,
// and column c of packed row r is float S r + c.
struct RowPacking {
  int rows;       // R
  int seg;        // S
  index_t lanes;  // L
  // float S r + 2 j + parity of (P, Q) for lane l = r L + j
  alignas(64) std::int32_t gather[2][16];
  // output row r, half h: lane c takes (c odd ? b : a)[r L + (16 h + c) / 2]
  alignas(64) std::int32_t scatter[4][2][16];
};

RowPacking row_packing(index_t tw) {
  RowPacking rp{};
  rp.rows = tw <= 4 ? 4 : tw <= 8 ? 2 : 1;
  rp.seg = rp.rows == 4 ? 8 : 16;
  rp.lanes = rp.rows == 1 ? 16 : tw;
  for (int parity = 0; parity < 2; ++parity)
    for (int l = 0; l < 16; ++l) {
      const index_t r = l / rp.lanes, j = l % rp.lanes;
      rp.gather[parity][l] =
          r < rp.rows ? static_cast<std::int32_t>(rp.seg * r + 2 * j + parity) : 0;
    }
  for (int r = 0; r < 4; ++r)
    for (int h = 0; h < 2; ++h)
      for (int c = 0; c < 16; ++c)
        rp.scatter[r][h][c] =
            static_cast<std::int32_t>(((c & 1) << 4) + ((r * rp.lanes + (16 * h + c) / 2) & 15));
  return rp;
}

// How a batch is cut into chunks: whole images, or for large images a run
// of tile rows of one image. A "unit" (an image group) is always processed
// by one thread in order, so the input gradient's overlapping tiles are
// added into dx in the same order whatever the thread count.
struct Plan {
  index_t th, tw;             // tile rows and columns of an image
  index_t images_per_chunk;   // 1 when a chunk is part of an image
  index_t rows_per_chunk;     // tile rows per chunk (th for whole images)
  index_t chunks_per_unit;
  index_t units;
  RowPacking packing;  // how the tiles of a row fill a vector
};

struct Chunk {
  index_t b0, nb, ti0, ti1;
  index_t rows() const { return ti1 - ti0; }
};

Plan make_plan(const ConvShape& cs) {
  Plan p{};
  p.th = (cs.oh + 1) / 2;
  p.tw = (cs.ow + 1) / 2;
  const index_t per_image = p.th * p.tw;
  const index_t target = std::max(
      kMinTiles, std::min(kTargetTiles, kMaxChunkFloats / (kPositions * (cs.c + cs.k))));
  if (per_image >= target) {
    p.images_per_chunk = 1;
    p.rows_per_chunk = std::min(p.th, std::max<index_t>(1, target / p.tw));
    p.chunks_per_unit = (p.th + p.rows_per_chunk - 1) / p.rows_per_chunk;
    p.units = cs.n;
  } else {
    p.images_per_chunk = std::max<index_t>(1, std::min(cs.n, target / per_image));
    p.rows_per_chunk = p.th;
    p.chunks_per_unit = 1;
    p.units = (cs.n + p.images_per_chunk - 1) / p.images_per_chunk;
  }
  p.packing = row_packing(p.tw);
  return p;
}

Chunk chunk_of(const ConvShape& cs, const Plan& p, index_t unit, index_t j) {
  if (p.chunks_per_unit > 1) {
    const index_t ti0 = j * p.rows_per_chunk;
    return {unit, 1, ti0, std::min(p.th, ti0 + p.rows_per_chunk)};
  }
  const index_t b0 = unit * p.images_per_chunk;
  return {b0, std::min(p.images_per_chunk, cs.n - b0), 0, p.th};
}

// Tiles of a chunk, and the index of tile (image b, row ti, column 0) in it.
index_t chunk_tiles(const Plan& p, const Chunk& ch) { return ch.nb * ch.rows() * p.tw; }
index_t tile_index(const Plan& p, const Chunk& ch, index_t b, index_t ti) {
  return ((b - ch.b0) * ch.rows() + (ti - ch.ti0)) * p.tw;
}

// Floats between the 16 matrices of a chunk: at least `floats`, and 256
// bytes past a multiple of 4 KiB, so that the transforms' 16 load or store
// streams fall in different L1 sets rather than evicting each other.
index_t spread(index_t floats) { return (floats + 1023) / 1024 * 1024 + 64; }

// ------------------------------------------------------ weight transforms --

// U = G g G^T for one 3x3 filter g (row-major), G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1].
inline void filter_transform(const float* g, float u[16]) {
  float t[4][3];
  for (int j = 0; j < 3; ++j) {
    t[0][j] = g[j];
    t[1][j] = 0.5f * (g[j] + g[3 + j] + g[6 + j]);
    t[2][j] = 0.5f * (g[j] - g[3 + j] + g[6 + j]);
    t[3][j] = g[6 + j];
  }
  for (int i = 0; i < 4; ++i) {
    u[4 * i + 0] = t[i][0];
    u[4 * i + 1] = 0.5f * (t[i][0] + t[i][1] + t[i][2]);
    u[4 * i + 2] = 0.5f * (t[i][0] - t[i][1] + t[i][2]);
    u[4 * i + 3] = t[i][2];
  }
}

// dg = G^T dU G: the gradient of filter_transform.
inline void filter_transform_grad(const float z[16], float* dg) {
  float s[3][4];
  for (int j = 0; j < 4; ++j) {
    s[0][j] = z[j] + 0.5f * (z[4 + j] + z[8 + j]);
    s[1][j] = 0.5f * (z[4 + j] - z[8 + j]);
    s[2][j] = 0.5f * (z[4 + j] + z[8 + j]) + z[12 + j];
  }
  for (int i = 0; i < 3; ++i) {
    dg[3 * i + 0] = s[i][0] + 0.5f * (s[i][1] + s[i][2]);
    dg[3 * i + 1] = 0.5f * (s[i][1] - s[i][2]);
    dg[3 * i + 2] = 0.5f * (s[i][1] + s[i][2]) + s[i][3];
  }
}

// The 16 matrices U_xi (K x C), or their transposes (C x K), written
// straight as the GEMM's packed A~ panels, `stride` floats apart.
void pack_transformed_weights(index_t k, index_t c, const float* w, bool transposed, float* dst,
                              index_t stride) {
  const index_t h = sgemm_panel_height();
  const index_t rows = transposed ? c : k, depth = transposed ? k : c;
  const index_t panels = (rows + h - 1) / h;
  if (rows % h != 0)  // the last panel's padding rows
    for (int xi = 0; xi < kPositions; ++xi)
      std::fill(dst + xi * stride + (panels - 1) * depth * h,
                dst + xi * stride + panels * depth * h, 0.0f);
  parallel_for(k, 16, [&](index_t ko) {
    float u[16];
    for (index_t ci = 0; ci < c; ++ci) {
      filter_transform(w + (ko * c + ci) * 9, u);
      const index_t row = transposed ? ci : ko, p = transposed ? ko : ci;
      float* at = dst + row / h * depth * h + p * h + row % h;
      for (int xi = 0; xi < kPositions; ++xi) at[xi * stride] = u[xi];
    }
  });
}

// The transformed weights of the last few (weights, layout) this thread
// asked for, found by content: inference runs the same weights call after
// call, and comparing them with the copy kept here (one pass over K C 9
// floats, stopping at the first difference, which after an optimizer step
// is the first float) costs a fraction of the transform (16 scattered
// stores per filter). The result is the same bits either way.
const float* cached_transformed_weights(index_t k, index_t c, const float* w, bool transposed,
                                        index_t stride) {
  struct Free {
    void operator()(void* p) const { std::free(p); }
  };
  struct Entry {
    std::vector<float> weights;
    std::unique_ptr<float, Free> packed;
    index_t k = -1, c = -1, stride = -1, panel_height = -1;
    bool transposed = false;
    unsigned long long used = 0;
  };
  constexpr int kEntries = 4;
  thread_local Entry entries[kEntries];
  thread_local unsigned long long clock = 0;
  const index_t h = sgemm_panel_height();
  const size_t n = static_cast<size_t>(k * c * 9);
  auto same_layout = [&](const Entry& e) {
    return e.k == k && e.c == c && e.stride == stride && e.panel_height == h &&
           e.transposed == transposed;
  };
  Entry* slot = nullptr;
  for (Entry& e : entries) {
    if (!same_layout(e)) continue;
    if (std::memcmp(e.weights.data(), w, n * sizeof(float)) == 0) {
      e.used = ++clock;
      return e.packed.get();
    }
    if (slot == nullptr) slot = &e;  // this layout's entry, with old weights: replace it
  }
  if (slot == nullptr)  // else the least recently used entry
    slot = std::min_element(entries, entries + kEntries, [](const Entry& a, const Entry& b) {
      return a.used < b.used;
    });
  const size_t bytes = (static_cast<size_t>(kPositions * stride) * sizeof(float) + 63) / 64 * 64;
  if (!same_layout(*slot)) {
    float* p = static_cast<float*>(std::aligned_alloc(64, bytes));
    if (p == nullptr) throw std::bad_alloc();
    slot->packed.reset(p);
    slot->k = k, slot->c = c, slot->stride = stride, slot->panel_height = h;
    slot->transposed = transposed;
  }
  pack_transformed_weights(k, c, w, transposed, slot->packed.get(), stride);
  slot->weights.assign(w, w + n);
  slot->used = ++clock;
  return slot->packed.get();
}

// ------------------------------------------------------- tile transforms --
// Each works on tile rows [ti0, ti1) of one channel plane, 16 tiles of a row
// per step (load and store masks computed once per plane, not per vector);
// the 16 transformed values of the row's tile tj go to
// dst[xi * xi_stride + tj], the next row's tw floats further on.

__attribute__((target("avx512f"))) inline __mmask16 lane_mask(index_t lo, index_t hi) {
  // lanes [lo, hi) of 16, clamped
  lo = std::max<index_t>(lo, 0);
  hi = std::min<index_t>(hi, 16);
  if (hi <= lo) return 0;
  return static_cast<__mmask16>(((1u << hi) - 1) & ~((1u << lo) - 1));
}
// Lanes l with 0 <= start + l < min(w, start + limit).
inline __mmask16 row_mask(index_t w, index_t start, index_t limit = 16) {
  return lane_mask(-start, std::min(w - start, limit));
}

__attribute__((target("avx512f"))) inline __m512 negate(__m512 v) {
  return _mm512_castsi512_ps(
      _mm512_xor_si512(_mm512_castps_si512(v), _mm512_set1_epi32(static_cast<int>(0x80000000u))));
}

__attribute__((target("avx512f"))) inline __m512i index_vector(const std::int32_t* idx) {
  return _mm512_load_si512(idx);
}

// Load masks of the sources for the segment starting at column x of rows w wide.
struct SourceMasks {
  __mmask16 p, q;
};
template <int R>
inline SourceMasks source_masks(index_t w, index_t x) {
  if (R == 1) return {row_mask(w, x), row_mask(w, x + 16)};
  if (R == 2) return {row_mask(w, x), row_mask(w, x)};
  const __mmask16 m8 = row_mask(w, x, 8);
  return {m8, static_cast<__mmask16>(m8 << 8)};
}

// P, Q for packed rows rows[0..R) (null: all zero) from column x.
template <int R>
__attribute__((target("avx512f"))) inline void load_sources(const float* const rows[4], index_t x,
                                                           SourceMasks m, __m512* p, __m512* q) {
  const __m512 zero = _mm512_setzero_ps();
  if (R == 1) {
    *p = rows[0] != nullptr ? _mm512_maskz_loadu_ps(m.p, rows[0] + x) : zero;
    *q = rows[0] != nullptr ? _mm512_maskz_loadu_ps(m.q, rows[0] + x + 16) : zero;
  } else if (R == 2) {
    *p = rows[0] != nullptr ? _mm512_maskz_loadu_ps(m.p, rows[0] + x) : zero;
    *q = rows[1] != nullptr ? _mm512_maskz_loadu_ps(m.q, rows[1] + x) : zero;
  } else {
    __m512 a = rows[0] != nullptr ? _mm512_maskz_loadu_ps(m.p, rows[0] + x) : zero;
    if (rows[1] != nullptr) a = _mm512_mask_loadu_ps(a, m.q, rows[1] + x - 8);
    __m512 b = rows[2] != nullptr ? _mm512_maskz_loadu_ps(m.p, rows[2] + x) : zero;
    if (rows[3] != nullptr) b = _mm512_mask_loadu_ps(b, m.q, rows[3] + x - 8);
    *p = a;
    *q = b;
  }
}

// Column groups of a tile row: (first tile, tiles) pairs; one group of the
// whole row when rows are packed.
template <int R>
inline index_t group_count(index_t tw) {
  return R == 1 ? (tw + 15) / 16 : 1;
}

// V = B^T d B, d the 4 x 4 blocks of one input plane (h x w, zero padded by
// ph / pw), B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1].
template <int R>
__attribute__((target("avx512f"))) void input_transform_rows(const RowPacking& rp,
                                                            const float* plane,
                                                       index_t h, index_t w, index_t ph,
                                                       index_t pw, index_t ti0, index_t ti1,
                                                       index_t tw, float* dst,
                                                       index_t xi_stride) {
  const __m512i g0 = index_vector(rp.gather[0]), g1 = index_vector(rp.gather[1]);
  for (index_t g = 0; g < group_count<R>( tw); ++g) {
    const index_t tj0 = 16 * g, x = 2 * tj0 - pw;  // input column of the group's first tap
    const SourceMasks m0 = source_masks<R>( w, x), m2 = source_masks<R>( w, x + 2);
    for (index_t ti = ti0; ti < ti1; ti += R) {
      const index_t packed = std::min<index_t>(R, ti1 - ti);
      const __mmask16 keep =
          lane_mask(0, R == 1 ? tw - tj0 : packed * tw);
      __m512 d[4][4];
      for (int u = 0; u < 4; ++u) {
        const float* rows[4] = {nullptr, nullptr, nullptr, nullptr};
        for (index_t r = 0; r < packed; ++r) {
          const index_t iy = 2 * (ti + r) + u - ph;
          if (iy >= 0 && iy < h) rows[r] = plane + iy * w;
        }
        __m512 p, q, p2, q2;
        load_sources<R>( rows, x, m0, &p, &q);
        load_sources<R>( rows, x + 2, m2, &p2, &q2);
        d[u][0] = _mm512_permutex2var_ps(p, g0, q);
        d[u][1] = _mm512_permutex2var_ps(p, g1, q);
        d[u][2] = _mm512_permutex2var_ps(p2, g0, q2);
        d[u][3] = _mm512_permutex2var_ps(p2, g1, q2);
      }
      float* out = dst + (ti - ti0) * tw + tj0;
      for (int i = 0; i < 4; ++i) {
        // row i of B^T d, then times B
        __m512 t[4];
        for (int v = 0; v < 4; ++v) {
          switch (i) {
            case 0: t[v] = _mm512_sub_ps(d[0][v], d[2][v]); break;
            case 1: t[v] = _mm512_add_ps(d[1][v], d[2][v]); break;
            case 2: t[v] = _mm512_sub_ps(d[2][v], d[1][v]); break;
            default: t[v] = _mm512_sub_ps(d[1][v], d[3][v]); break;
          }
        }
        float* o = out + 4 * i * xi_stride;
        _mm512_mask_storeu_ps(o, keep, _mm512_sub_ps(t[0], t[2]));
        _mm512_mask_storeu_ps(o + xi_stride, keep, _mm512_add_ps(t[1], t[2]));
        _mm512_mask_storeu_ps(o + 2 * xi_stride, keep, _mm512_sub_ps(t[2], t[1]));
        _mm512_mask_storeu_ps(o + 3 * xi_stride, keep, _mm512_sub_ps(t[1], t[3]));
      }
    }
  }
}

// Y = A^T M A + bias into one output plane (oh x ow), A^T = [1 1 1 0; 0 1 -1 -1].
template <int R>
__attribute__((target("avx512f"))) void output_transform_rows(const RowPacking& rp,
                                                             const float* src,
                                                        index_t xi_stride, float bias,
                                                        float* plane, index_t oh, index_t ow,
                                                        index_t ti0, index_t ti1, index_t tw) {
  const __m512i hi_scatter = index_vector(rp.scatter[0][1]);
  const __m512 vb = _mm512_set1_ps(bias);
  for (index_t g = 0; g < group_count<R>( tw); ++g) {
    const index_t tj0 = 16 * g, x = 2 * tj0;
    // R = 1: output columns [x, x + 32) in two halves; packed: 2 tw columns per row
    const __mmask16 s0 = row_mask(ow, x, R == 1 ? 16 : 2 * tw);
    const __mmask16 s1 = row_mask(ow, x + 16);
    for (index_t ti = ti0; ti < ti1; ti += R) {
      const index_t packed = std::min<index_t>(R, ti1 - ti);
      const __mmask16 keep = lane_mask(0, R == 1 ? tw - tj0 : packed * tw);
      const float* in = src + (ti - ti0) * tw + tj0;
      __m512 a[4][2];
      for (int i = 0; i < 4; ++i) {
        const float* s = in + 4 * i * xi_stride;
        const __m512 v0 = _mm512_maskz_loadu_ps(keep, s);
        const __m512 v1 = _mm512_maskz_loadu_ps(keep, s + xi_stride);
        const __m512 v2 = _mm512_maskz_loadu_ps(keep, s + 2 * xi_stride);
        const __m512 v3 = _mm512_maskz_loadu_ps(keep, s + 3 * xi_stride);
        a[i][0] = _mm512_add_ps(_mm512_add_ps(v0, v1), v2);
        a[i][1] = _mm512_sub_ps(_mm512_sub_ps(v1, v2), v3);
      }
      __m512 y[2][2];  // [output row parity][column parity]
      for (int j = 0; j < 2; ++j) {
        y[0][j] = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a[0][j], a[1][j]), a[2][j]), vb);
        y[1][j] = _mm512_add_ps(_mm512_sub_ps(_mm512_sub_ps(a[1][j], a[2][j]), a[3][j]), vb);
      }
      for (index_t r = 0; r < packed; ++r)
        for (int par = 0; par < 2; ++par) {
          const index_t oy = 2 * (ti + r) + par;
          if (oy >= oh) continue;
          float* row = plane + oy * ow + x;
          _mm512_mask_storeu_ps(row, s0,
                                _mm512_permutex2var_ps(y[par][0], index_vector(rp.scatter[r][0]),
                                                       y[par][1]));
          if (R == 1)
            _mm512_mask_storeu_ps(
                row + 16, s1, _mm512_permutex2var_ps(y[par][0], hi_scatter, y[par][1]));
        }
    }
  }
}

// dM = A dY A^T for one output-gradient plane (oh x ow; outputs past its
// edge are zero), A = [1 0; 1 1; 1 -1; 0 -1].
template <int R>
__attribute__((target("avx512f"))) void output_grad_transform_rows(const RowPacking& rp,
                                                             const float* plane, index_t oh,
                                                             index_t ow, index_t ti0,
                                                             index_t ti1, index_t tw, float* dst,
                                                             index_t xi_stride) {
  const __m512i g0 = index_vector(rp.gather[0]), g1 = index_vector(rp.gather[1]);
  for (index_t g = 0; g < group_count<R>( tw); ++g) {
    const index_t tj0 = 16 * g, x = 2 * tj0;
    const SourceMasks m = source_masks<R>( ow, x);
    for (index_t ti = ti0; ti < ti1; ti += R) {
      const index_t packed = std::min<index_t>(R, ti1 - ti);
      const __mmask16 keep = lane_mask(0, R == 1 ? tw - tj0 : packed * tw);
      __m512 gv[2][2];  // [row parity][column parity]
      for (int par = 0; par < 2; ++par) {
        const float* rows[4] = {nullptr, nullptr, nullptr, nullptr};
        for (index_t r = 0; r < packed; ++r) {
          const index_t oy = 2 * (ti + r) + par;
          if (oy < oh) rows[r] = plane + oy * ow;
        }
        __m512 p, q;
        load_sources<R>( rows, x, m, &p, &q);
        gv[par][0] = _mm512_permutex2var_ps(p, g0, q);
        gv[par][1] = _mm512_permutex2var_ps(p, g1, q);
      }
      __m512 s[4][2];
      for (int j = 0; j < 2; ++j) {
        s[0][j] = gv[0][j];
        s[1][j] = _mm512_add_ps(gv[0][j], gv[1][j]);
        s[2][j] = _mm512_sub_ps(gv[0][j], gv[1][j]);
        s[3][j] = negate(gv[1][j]);
      }
      float* out = dst + (ti - ti0) * tw + tj0;
      for (int i = 0; i < 4; ++i) {
        float* o = out + 4 * i * xi_stride;
        _mm512_mask_storeu_ps(o, keep, s[i][0]);
        _mm512_mask_storeu_ps(o + xi_stride, keep, _mm512_add_ps(s[i][0], s[i][1]));
        _mm512_mask_storeu_ps(o + 2 * xi_stride, keep, _mm512_sub_ps(s[i][0], s[i][1]));
        _mm512_mask_storeu_ps(o + 3 * xi_stride, keep, negate(s[i][1]));
      }
    }
  }
}

// Lanes [b[14], b[15], a[0] .. a[13]]: `a` moved up two lanes, the gap
// filled from the top of `b` (the vector below it in a row).
__attribute__((target("avx512f"))) inline __m512 shift_in_two(__m512 a, __m512 b) {
  return _mm512_castsi512_ps(
      _mm512_alignr_epi32(_mm512_castps_si512(a), _mm512_castps_si512(b), 14));
}

// dd = B dV B^T added into one input-gradient plane (h x w, zeroed by the
// caller; the padding's share dropped), B = [1 0 0 0; 0 1 -1 1; -1 1 1 0;
// 0 0 0 -1]. Tiles overlap by two rows and columns. The contributions of a
// step's R tile rows to their 2 R + 2 input rows are summed in registers
// (32 columns a group: tile j's columns 2 j, 2 j + 1 from d0, d1 and
// 2 j + 2, 2 j + 3 from d2, d3, the latter shifted in by two lanes), so
// that each input row is read and written once per step: adding the two
// halves to memory one after the other would make every load wait for the
// masked store before it, which the CPU cannot forward.
template <int R>
__attribute__((target("avx512f"))) void input_grad_transform_rows(const RowPacking& rp,
                                                            const float* src, index_t xi_stride,
                                                            float* plane, index_t h, index_t w,
                                                            index_t ph, index_t pw, index_t ti0,
                                                            index_t ti1, index_t tw) {
  const __m512i hi_scatter = index_vector(rp.scatter[0][1]);
  const __m512 zero = _mm512_setzero_ps();
  const index_t groups = group_count<R>( tw);
  const int band_rows = 2 * R + 2;
  for (index_t ti = ti0; ti < ti1; ti += R) {
    const index_t packed = std::min<index_t>(R, ti1 - ti);
    // spill[j]: row j's two columns past the previous group's 32 (R = 1 only)
    __m512 spill[4] = {zero, zero, zero, zero};
    for (index_t g = 0; g < groups; ++g) {
      const index_t tj0 = 16 * g, x = 2 * tj0 - pw;
      const index_t n = R == 1 ? std::min<index_t>(16, tw - tj0) : tw;  // tiles per row
      const __mmask16 keep = lane_mask(0, R == 1 ? n : packed * tw);
      const __mmask16 e0 = lane_mask(0, 2 * n), e1 = lane_mask(0, 2 * n - 16);
      const float* in = src + (ti - ti0) * tw + tj0;
      __m512 s[4][4];  // B z
      for (int j = 0; j < 4; ++j) {
        const __m512 z0 = _mm512_maskz_loadu_ps(keep, in + j * xi_stride);
        const __m512 z1 = _mm512_maskz_loadu_ps(keep, in + (4 + j) * xi_stride);
        const __m512 z2 = _mm512_maskz_loadu_ps(keep, in + (8 + j) * xi_stride);
        const __m512 z3 = _mm512_maskz_loadu_ps(keep, in + (12 + j) * xi_stride);
        s[0][j] = z0;
        s[1][j] = _mm512_add_ps(_mm512_sub_ps(z1, z2), z3);
        s[2][j] = _mm512_sub_ps(_mm512_add_ps(z1, z2), z0);
        s[3][j] = negate(z3);
      }
      __m512 band[10][2];  // input rows 2 ti + j - ph, columns [x, x + 32)
      __m512 next_spill[4] = {zero, zero, zero, zero};
      for (int j = 0; j < band_rows; ++j) band[j][0] = band[j][1] = zero;
      for (int u = 0; u < 4; ++u) {
        const __m512 d0 = s[u][0];
        const __m512 d1 = _mm512_add_ps(_mm512_sub_ps(s[u][1], s[u][2]), s[u][3]);
        const __m512 d2 = _mm512_sub_ps(_mm512_add_ps(s[u][1], s[u][2]), s[u][0]);
        const __m512 d3 = negate(s[u][3]);
        for (index_t r = 0; r < packed; ++r) {
          const __m512i lo = index_vector(rp.scatter[r][0]);
          const __m512 a0 = _mm512_maskz_permutex2var_ps(e0, d0, lo, d1);
          const __m512 b0 = _mm512_maskz_permutex2var_ps(e0, d2, lo, d3);
          __m512* row = band[2 * r + u];
          row[0] = _mm512_add_ps(row[0], _mm512_add_ps(a0, shift_in_two(b0, zero)));
          if (R == 1) {
            const __m512 a1 = _mm512_maskz_permutex2var_ps(e1, d0, hi_scatter, d1);
            const __m512 b1 = _mm512_maskz_permutex2var_ps(e1, d2, hi_scatter, d3);
            row[1] = _mm512_add_ps(row[1], _mm512_add_ps(a1, shift_in_two(b1, b0)));
            next_spill[u] = shift_in_two(zero, b1);  // b1's last two lanes
          } else if (2 * tw + 2 > 16) {  // R = 2, 8 tiles: columns 16, 17
            row[1] = _mm512_add_ps(row[1], shift_in_two(zero, b0));
          }
        }
      }
      const index_t span = R == 1 ? std::min<index_t>(32, 2 * n + 2) : 2 * tw + 2;
      const __mmask16 m0 = row_mask(w, x, std::min<index_t>(16, span));
      const __mmask16 m1 = row_mask(w, x + 16, span - 16);
      for (int j = 0; j < band_rows; ++j) {
        const index_t iy = 2 * ti + j - ph;
        if (iy < 0 || iy >= h) continue;
        float* row = plane + iy * w + x;
        const __m512 v0 = j < 4 ? _mm512_add_ps(band[j][0], spill[j]) : band[j][0];
        _mm512_mask_storeu_ps(row, m0, _mm512_add_ps(_mm512_maskz_loadu_ps(m0, row), v0));
        if (m1 != 0)
          _mm512_mask_storeu_ps(row + 16, m1,
                                _mm512_add_ps(_mm512_maskz_loadu_ps(m1, row + 16), band[j][1]));
      }
      for (int j = 0; j < 4; ++j) spill[j] = next_spill[j];
    }
    if (R == 1 && tw % 16 == 0) {
      // The last group was full: its spill lands on the two columns past it.
      const index_t x = 2 * tw - pw;
      const __mmask16 m = row_mask(w, x, 2);
      for (int j = 0; j < 4 && m != 0; ++j) {
        const index_t iy = 2 * ti + j - ph;
        if (iy < 0 || iy >= h) continue;
        float* row = plane + iy * w + x;
        _mm512_mask_storeu_ps(row, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, row), spill[j]));
      }
    }
  }
}

// The transforms for the packing at hand (R as a constant: unrolled, no mode branches).
#define FASTCNN_WINOGRAD_DISPATCH(name)                                        \
  template <typename... Args>                                                  \
  void name(const RowPacking& rp, Args... args) {                              \
    switch (rp.rows) {                                                         \
      case 4: return name##_rows<4>(rp, args...);                              \
      case 2: return name##_rows<2>(rp, args...);                              \
      default: return name##_rows<1>(rp, args...);                             \
    }                                                                          \
  }
FASTCNN_WINOGRAD_DISPATCH(input_transform)
FASTCNN_WINOGRAD_DISPATCH(output_transform)
FASTCNN_WINOGRAD_DISPATCH(output_grad_transform)
FASTCNN_WINOGRAD_DISPATCH(input_grad_transform)
#undef FASTCNN_WINOGRAD_DISPATCH

// ------------------------------------------------------------------ chunks --

struct Buffers {
  float* tiles;     // V (or dV): 16 matrices (C x T), v_stride apart
  float* products;  // M (or dM): 16 matrices (K x T), m_stride apart
  index_t v_stride, m_stride;
};

Buffers chunk_buffers(const ConvShape& cs, const Plan& p) {
  const index_t t = p.images_per_chunk * p.rows_per_chunk * p.tw;
  Buffers buf{nullptr, nullptr, spread(cs.c * t), spread(cs.k * t)};
  buf.tiles = thread_scratch(ScratchSlot::WinogradTiles, kPositions * buf.v_stride);
  buf.products = thread_scratch(ScratchSlot::WinogradProducts, kPositions * buf.m_stride);
  return buf;
}

// V_xi (C x T) of a chunk.
void transform_inputs(const ConvShape& cs, const Plan& p, const Chunk& ch, const float* x,
                      const Buffers& buf) {
  const index_t t = chunk_tiles(p, ch), plane = cs.h * cs.w;
  parallel_for(ch.nb * cs.c, 1, [&](index_t bc) {
    const index_t b = ch.b0 + bc / cs.c, c = bc % cs.c;
    input_transform(p.packing, x + (b * cs.c + c) * plane, cs.h, cs.w, cs.pad_h, cs.pad_w, ch.ti0,
                    ch.ti1,
                    p.tw, buf.tiles + c * t + tile_index(p, ch, b, ch.ti0), buf.v_stride);
  });
}

void forward_chunk(const ConvShape& cs, const Plan& p, const Chunk& ch, const float* x,
                   const float* u_packed, index_t u_stride, const float* bias, float* y,
                   const Buffers& buf) {
  const index_t t = chunk_tiles(p, ch), pixels = cs.out_pixels();
  transform_inputs(cs, p, ch, x, buf);
  parallel_for(kPositions, 1, [&](index_t xi) {
    sgemm_prepacked_a(cs.k, t, cs.c, 1.0f, u_packed + xi * u_stride, Trans::No,
                      buf.tiles + xi * buf.v_stride, t, 0.0f, buf.products + xi * buf.m_stride,
                      t);
  });
  parallel_for(ch.nb * cs.k, 1, [&](index_t bk) {
    const index_t b = ch.b0 + bk / cs.k, k = bk % cs.k;
    output_transform(p.packing, buf.products + k * t + tile_index(p, ch, b, ch.ti0), buf.m_stride,
                     bias != nullptr ? bias[k] : 0.0f, y + (b * cs.k + k) * pixels, cs.oh, cs.ow,
                     ch.ti0, ch.ti1, p.tw);
  });
}

// One chunk's share of the gradients: dU (16 x (K x C)) = beta dU + dM V^T
// when du is given, and its tiles' contributions added into dx.
void backward_chunk(const ConvShape& cs, const Plan& p, const Chunk& ch, const float* dy,
                    const float* x, const float* ut_packed, index_t ut_stride, float* dx,
                    float* du, float beta, const Buffers& buf) {
  const index_t t = chunk_tiles(p, ch), pixels = cs.out_pixels(), plane = cs.h * cs.w;
  float* dm = buf.products;
  parallel_for(ch.nb * cs.k, 1, [&](index_t bk) {
    const index_t b = ch.b0 + bk / cs.k, k = bk % cs.k;
    output_grad_transform(p.packing, dy + (b * cs.k + k) * pixels, cs.oh, cs.ow, ch.ti0, ch.ti1,
                          p.tw,
                          dm + k * t + tile_index(p, ch, b, ch.ti0), buf.m_stride);
  });
  if (du != nullptr) {
    transform_inputs(cs, p, ch, x, buf);
    parallel_for(kPositions, 1, [&](index_t xi) {
      sgemm(Trans::No, Trans::Yes, cs.k, cs.c, t, 1.0f, dm + xi * buf.m_stride, t,
            buf.tiles + xi * buf.v_stride, t, beta, du + xi * cs.k * cs.c, cs.c);
    });
  }
  if (dx == nullptr) return;
  float* dv = buf.tiles;  // V is no longer needed
  parallel_for(kPositions, 1, [&](index_t xi) {
    sgemm_prepacked_a(cs.c, t, cs.k, 1.0f, ut_packed + xi * ut_stride, Trans::No,
                      dm + xi * buf.m_stride, t, 0.0f, dv + xi * buf.v_stride, t);
  });
  parallel_for(ch.nb * cs.c, 1, [&](index_t bc) {
    const index_t b = ch.b0 + bc / cs.c, c = bc % cs.c;
    float* out = dx + (b * cs.c + c) * plane;
    if (ch.ti0 == 0) std::fill(out, out + plane, 0.0f);
    input_grad_transform(p.packing, dv + c * t + tile_index(p, ch, b, ch.ti0), buf.v_stride, out,
                         cs.h,
                         cs.w, cs.pad_h, cs.pad_w, ch.ti0, ch.ti1, p.tw);
  });
}

}  // namespace

bool winograd_enabled() { return enabled_flag().load(); }
void set_winograd_enabled(bool on) { enabled_flag().store(on); }

bool winograd_applies(const ConvShape& cs, bool backward) {
  if (!winograd_enabled() || cs.r != 3 || cs.s != 3 || cs.stride_h != 1 || cs.stride_w != 1 ||
      cs.dil_h != 1 || cs.dil_w != 1 || cs.groups != 1 || cs.oh <= 0 || cs.ow <= 0 ||
      sgemm_panel_width() != 32 || !__builtin_cpu_supports("avx512f"))
    return false;
  if (!backward) return cs.c >= kMinChannels && cs.k >= kMinChannels;
  // The backward pass has three transforms and a transposed GEMM operand to
  // pack: it pays from 32 input channels, and not when the tiles overhang
  // the output by more than a quarter (7x7 maps: 8x8 of tiles).
  const index_t covered = 4 * ((cs.oh + 1) / 2) * ((cs.ow + 1) / 2);
  return cs.c >= 2 * kMinChannels && cs.k >= kMinChannels && 4 * covered <= 5 * cs.oh * cs.ow;
}

void winograd_forward(const ConvShape& cs, const float* x, const float* w, const float* bias,
                      float* y) {
  if (cs.n == 0) return;
  const Plan p = make_plan(cs);
  const index_t u_stride = spread(sgemm_packed_a_floats(cs.k, cs.c));
  const float* u_packed = cached_transformed_weights(cs.k, cs.c, w, false, u_stride);
  auto run_unit = [&](index_t unit, const Buffers& buf) {
    for (index_t j = 0; j < p.chunks_per_unit; ++j)
      forward_chunk(cs, p, chunk_of(cs, p, unit, j), x, u_packed, u_stride, bias, y, buf);
  };
  if (p.units >= threads_for(index_t(1) << 30)) {
    // Whole units per thread, each with its own buffers.
    // Units are independent (and slices write their own dU): handing them out
    // dynamically evens out units of unequal size without changing a bit.
    const int nt = threads_for(p.units);
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (index_t unit = 0; unit < p.units; ++unit) run_unit(unit, chunk_buffers(cs, p));
  } else {
    // A small batch: every step of a chunk split over the threads.
    const Buffers buf = chunk_buffers(cs, p);
    for (index_t unit = 0; unit < p.units; ++unit) run_unit(unit, buf);
  }
}

void winograd_backward(const ConvShape& cs, const float* dy, const float* x, const float* w,
                       float* dx, float* dw) {
  if (cs.n == 0 || (dx == nullptr && dw == nullptr)) return;
  const Plan p = make_plan(cs);
  const index_t ut_stride = spread(sgemm_packed_a_floats(cs.c, cs.k));
  const float* ut_packed =
      dx != nullptr ? cached_transformed_weights(cs.k, cs.c, w, true, ut_stride) : nullptr;
  const index_t du_size = kPositions * cs.k * cs.c;
  // Fewer slices for wide layers: each holds 16 K C floats (512 x 512: 16 MiB).
  const index_t slices = std::max<index_t>(
      1, std::min({p.units, kWeightGradSlices, kMaxWeightGradFloats / du_size}));
  std::vector<float> du(dw != nullptr ? static_cast<size_t>(slices * du_size) : 0);
  auto run_slice = [&](index_t s, const Buffers& buf) {
    const index_t first = p.units * s / slices, last = p.units * (s + 1) / slices;
    for (index_t unit = first; unit < last; ++unit)
      for (index_t j = 0; j < p.chunks_per_unit; ++j) {
        const float beta = unit == first && j == 0 ? 0.0f : 1.0f;
        backward_chunk(cs, p, chunk_of(cs, p, unit, j), dy, x, ut_packed, ut_stride, dx,
                       dw != nullptr ? du.data() + s * du_size : nullptr, beta, buf);
      }
  };
  if (p.units >= threads_for(index_t(1) << 30)) {
    const int nt = threads_for(slices);
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (index_t s = 0; s < slices; ++s) run_slice(s, chunk_buffers(cs, p));
  } else {
    const Buffers buf = chunk_buffers(cs, p);
    for (index_t s = 0; s < slices; ++s) run_slice(s, buf);
  }
  if (dw == nullptr) return;
  // The slices in order (into slice 0), then dg = G^T dU G per filter.
  constexpr index_t kBlock = 4096;
  if (slices > 1)
    parallel_for((du_size + kBlock - 1) / kBlock, 1, [&](index_t blk) {
      float* sum = du.data();
      const index_t i1 = std::min(du_size, (blk + 1) * kBlock);
      for (index_t s = 1; s < slices; ++s) {
        const float* part = du.data() + s * du_size;
        for (index_t i = blk * kBlock; i < i1; ++i) sum[i] += part[i];
      }
    });
  parallel_for(cs.k, 1, [&](index_t ko) {
    float z[16];
    for (index_t ci = 0; ci < cs.c; ++ci) {
      for (int xi = 0; xi < kPositions; ++xi) z[xi] = du[xi * cs.k * cs.c + ko * cs.c + ci];
      filter_transform_grad(z, dw + (ko * cs.c + ci) * 9);
    }
  });
}

}  // namespace cpu
}  // namespace fastcnn
