// conv2d forward and backward. Two special paths are taken first where they
// apply (each decides on the layer's shape and the CPU, never on the batch):
// Winograd F(2x2, 3x3) for 3x3 stride-1 layers with many channels
// (winograd.cpp) and a direct kernel for first layers with few taps
// (conv_direct.cpp). Everything else is im2col + GEMM, as below.
//
// Images are processed in chunks of `nb`: the column matrices of a chunk sit
// side by side, cols (c/g r s, nb oh ow), so one GEMM per group covers the
// chunk:  y[chunk, g] (k/g, nb oh ow) = w[g] (k/g, c/g r s) @ cols.
// Small feature maps (14x14, 8x8) would otherwise give GEMMs a few hundred
// columns wide, dominated by packing and partial edge tiles. The columns
// (and the output gradients) are never written as matrices: they are
// gathered straight into the GEMM's packed panels (im2col.cpp).
#include <algorithm>
#include <vector>

#include "fastcnn/cpu_kernels.h"
#include "fastcnn/gemm.h"
#include "fastcnn/parallel.h"
#include "fastcnn/scratch.h"

namespace fastcnn {
namespace cpu {
namespace {

// The weight gradient is a sum over the batch. The chunks are grouped into a
// fixed number of slices (independent of the thread count), each summed into
// its own buffer in chunk order, and the slices are added in order: bitwise
// the same result on 1 thread or 64.
constexpr index_t kWeightGradSlices = 8;
// A chunk aims at this many GEMM columns, within this many floats of columns.
constexpr index_t kChunkColumns = 1024;
constexpr index_t kChunkFloats = index_t(1) << 20;

// Images per chunk: a function of the shape only, never of the thread count.
index_t chunk_images(const ConvShape& cs) {
  const index_t pixels = cs.out_pixels();
  index_t nb = (kChunkColumns + pixels - 1) / pixels;
  nb = std::min(nb, std::max<index_t>(1, kChunkFloats / std::max<index_t>(1, cs.col_rows() * pixels)));
  return std::max<index_t>(1, std::min(nb, cs.n));
}

struct Chunk {
  index_t first, count;
};

Chunk chunk_at(const ConvShape& cs, index_t nb, index_t i) {
  const index_t first = i * nb;
  return {first, std::min(nb, cs.n - first)};
}

}  // namespace

void conv2d_forward(const ConvShape& cs, const float* x, const float* w, const float* bias,
                    float* y) {
  // x: (n, c, h, w), w: (k, c/g, r, s), bias: (k,) or null, y: (n, k, oh, ow)
  if (winograd_applies(cs, false)) {
    winograd_forward(cs, x, w, bias, y);
    return;
  }
  if (direct_conv_applies(cs)) {
    direct_conv_forward(cs, x, w, bias, y);
    return;
  }
  const index_t kg = cs.k_per_group(), cg = cs.c_per_group(), rows = cs.col_rows();
  const index_t pixels = cs.out_pixels(), x_image = cs.c * cs.h * cs.w, y_image = cs.k * pixels;
  const index_t nb = chunk_images(cs), chunks = (cs.n + nb - 1) / nb;
  const int width = sgemm_panel_width();
  // The weights as A~ panels once, for every chunk and thread.
  const index_t w_panels = sgemm_packed_a_floats(kg, rows);
  float* w_packed = thread_scratch(ScratchSlot::Weights, cs.groups * w_panels);
  for (index_t g = 0; g < cs.groups; ++g)
    sgemm_pack_a(Trans::No, kg, rows, w + g * kg * rows, rows, w_packed + g * w_panels);
  // Panels [q0, q1) of chunk i's columns, with the GEMM's packed B~ at
  // `packed` and, for several images, their (k/g, columns) product at `out`.
  auto run = [&](index_t i, index_t part, index_t parts, float* packed, float* out) {
    const Chunk ch = chunk_at(cs, nb, i);
    const index_t columns = ch.count * pixels, panels = (columns + width - 1) / width;
    const index_t q0 = panels * part / parts, q1 = panels * (part + 1) / parts;
    if (q0 >= q1) return;
    const index_t j0 = q0 * width, j1 = std::min(columns, q1 * width);
    for (index_t g = 0; g < cs.groups; ++g) {
      // im2col writes the GEMM's packed B~ directly: one pass over the columns.
      im2col_packed(cs, x + ch.first * x_image + g * cg * cs.h * cs.w, x_image, ch.count, width,
                    packed, q0, q1);
      const float* w_g = w_packed + g * w_panels;
      const float* b_panels = packed + q0 * rows * width;
      float* y_g = y + ch.first * y_image + g * kg * pixels;
      if (ch.count == 1) {
        // Straight into y. The bias is the GEMM's initial C where the product
        // sums in one block (acc + b, as the scatter below adds it); deeper, it
        // is added after the GEMM, as below, or a sample's output would depend
        // on its batch ((b + acc1) + acc2 here, (acc1 + acc2) + b there).
        const bool bias_first = bias != nullptr && sgemm_single_block(rows);
        if (bias_first)
          for (index_t ko = 0; ko < kg; ++ko)
            std::fill(y_g + ko * pixels + j0, y_g + ko * pixels + j1, bias[g * kg + ko]);
        sgemm_packed(kg, j1 - j0, rows, 1.0f, w_g, b_panels, bias_first ? 1.0f : 0.0f,
                     y_g + j0, pixels);
        if (bias != nullptr && !bias_first)
          for (index_t ko = 0; ko < kg; ++ko) {
            const float add = bias[g * kg + ko];
            for (float* p = y_g + ko * pixels + j0; p != y_g + ko * pixels + j1; ++p) *p += add;
          }
        continue;
      }
      // Into the (k/g, nb pixels) buffer, then scattered to the images with the bias.
      sgemm_packed(kg, j1 - j0, rows, 1.0f, w_g, b_panels, 0.0f, out + j0, columns);
      for (index_t j = j0; j < j1;) {
        const index_t b = j / pixels, p0 = j % pixels, p1 = std::min(pixels, p0 + (j1 - j));
        for (index_t ko = 0; ko < kg; ++ko) {
          const float* src = out + ko * columns + b * pixels;
          float* dst = y_g + b * y_image + ko * pixels;
          const float add = bias != nullptr ? bias[g * kg + ko] : 0.0f;
          for (index_t p = p0; p < p1; ++p) dst[p] = src[p] + add;
        }
        j += p1 - p0;
      }
    }
  };
  auto buffers = [&](index_t i, float** packed, float** out) {
    const index_t columns = chunk_at(cs, nb, i).count * pixels;
    *packed = thread_scratch(ScratchSlot::Packed, (columns + width - 1) / width * width * rows);
    *out = thread_scratch(ScratchSlot::GradOut, kg * columns);
  };
  const int nt = threads_for(index_t(1) << 30);
  if (chunks >= nt) {
    // Whole chunks per thread.
    parallel_for(chunks, 1, [&](index_t i) {
      float *packed, *out;
      buffers(i, &packed, &out);
      run(i, 0, 1, packed, out);
    });
    return;
  }
  // Fewer chunks than threads (a small batch): each chunk's column panels
  // split over the threads, every thread gathering and multiplying its own
  // panels in one parallel region (no barrier between the two).
  for (index_t i = 0; i < chunks; ++i) {
    float *packed, *out;
    buffers(i, &packed, &out);
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int part = 0; part < nt; ++part) run(i, part, nt, packed, out);
  }
}

void conv2d_backward(const ConvShape& cs, const float* dy, const float* x, const float* w,
                     float* dx, float* dw, float* db) {
  // dy: (n, k, oh, ow), x: (n, c, h, w), w: (k, c/g, r, s)
  const index_t kg = cs.k_per_group(), cg = cs.c_per_group(), rows = cs.col_rows();
  const index_t pixels = cs.out_pixels(), plane = cs.h * cs.w;
  const index_t x_image = cs.c * plane, y_image = cs.k * pixels, w_size = cs.k * rows;

  if (db != nullptr) {
    parallel_for(cs.k, 1, [&](index_t ko) {
      double sum = 0.0;
      for (index_t img = 0; img < cs.n; ++img) {
        const float* g = dy + img * y_image + ko * pixels;
        sum += row_block_sum(g, cs.oh, cs.ow);
      }
      db[ko] = static_cast<float>(sum);
    });
  }
  if (cs.n == 0 && dw != nullptr) std::fill(dw, dw + w_size, 0.0f);
  if ((dx == nullptr && dw == nullptr) || cs.n == 0) return;
  if (winograd_applies(cs, true)) {
    winograd_backward(cs, dy, x, w, dx, dw);
    return;
  }
  if (dw != nullptr && direct_conv_applies(cs)) {
    direct_conv_weight_grad(cs, dy, x, dw);
    if (dx == nullptr) return;
    dw = nullptr;  // the input gradient stays im2col + GEMM
  }

  const index_t nb = chunk_images(cs), chunks = (cs.n + nb - 1) / nb;
  const index_t slices = std::min(chunks, kWeightGradSlices);
  const int width = sgemm_panel_width(), height = sgemm_panel_height();
  // dw (k/g, c/g r s) as the GEMM's C, or its transpose when that fills the
  // micro-tiles better (a first layer: 9 or 27 columns but 32-64 rows). The
  // two give the same bits: each element sums the same products in the
  // same k-blocks.
  const bool transposed_dw = rows < kg;
  // dcols = w[g]^T @ dy: the transposed weights as A~ panels once, for every chunk.
  const index_t wt_panels = sgemm_packed_a_floats(rows, kg);
  float* wt_packed = nullptr;
  if (dx != nullptr) {
    wt_packed = thread_scratch(ScratchSlot::Weights, cs.groups * wt_panels);
    for (index_t g = 0; g < cs.groups; ++g)
      sgemm_pack_a(Trans::Yes, rows, kg, w + g * kg * rows, rows, wt_packed + g * wt_panels);
  }
  std::vector<float> partial(dw != nullptr ? static_cast<size_t>((slices - 1) * w_size) : 0);
  parallel_for(slices, 1, [&](index_t slice) {
    // Slice 0 accumulates straight into dw; the others into their own buffer.
    float* dw_slice = dw == nullptr ? nullptr
                      : slice == 0  ? dw
                                    : partial.data() + (slice - 1) * w_size;
    float* dw_t = dw_slice != nullptr && transposed_dw
                      ? thread_scratch(ScratchSlot::WeightGradT, w_size)  // (g, c/g r s, k/g)
                      : nullptr;
    const index_t first = chunks * slice / slices, last = chunks * (slice + 1) / slices;
    for (index_t i = first; i < last; ++i) {
      const Chunk ch = chunk_at(cs, nb, i);
      const index_t columns = ch.count * pixels;
      for (index_t g = 0; g < cs.groups; ++g) {
        const float* w_g = w + g * kg * rows;
        const float* x_g = x + ch.first * x_image + g * cg * plane;
        const float* dy_g = dy + ch.first * y_image + g * kg * pixels;
        if (dw_slice != nullptr) {
          // dw[g] (+)= dy (k/g, nb pixels) @ cols^T (nb pixels, c/g r s), both
          // operands gathered straight into the GEMM's packed layouts.
          const float beta = i == first ? 0.0f : 1.0f;
          const index_t m = transposed_dw ? rows : kg, n = transposed_dw ? kg : rows;
          float* a = thread_scratch(ScratchSlot::PackedA, (m + height - 1) / height * height * columns);
          float* b = thread_scratch(ScratchSlot::Packed, (n + width - 1) / width * width * columns);
          if (transposed_dw) {
            im2col_packed_transposed(cs, x_g, x_image, ch.count, height, a);
            grad_output_packed_transposed(cs, dy_g, y_image, ch.count, width, b);
            sgemm_packed(rows, kg, columns, 1.0f, a, b, beta, dw_t + g * rows * kg, kg);
          } else {
            grad_output_packed_transposed(cs, dy_g, y_image, ch.count, height, a);
            im2col_packed_transposed(cs, x_g, x_image, ch.count, width, b);
            sgemm_packed(kg, rows, columns, 1.0f, a, b, beta, dw_slice + g * kg * rows, rows);
          }
        }
        if (dx == nullptr) continue;
        float* dx_g = dx + ch.first * x_image + g * cg * plane;
        if (cs.is_pointwise() && ch.count == 1) {
          // dx[n, g] (c/g, pixels) = w[g]^T (c/g, k/g) @ dy (k/g, pixels)
          sgemm(Trans::Yes, Trans::No, rows, pixels, kg, 1.0f, w_g, rows, dy_g, pixels, 0.0f,
                dx_g, pixels);
          continue;
        }
        // dcols (c/g r s, nb pixels) = w[g]^T @ dy, dy gathered into packed
        // panels, then folded back per image
        float* b = thread_scratch(ScratchSlot::Packed, (columns + width - 1) / width * width * kg);
        grad_output_packed(cs, dy_g, y_image, ch.count, width, b);
        float* dcols = thread_scratch(ScratchSlot::ColsGrad, rows * columns);
        sgemm_packed(rows, columns, kg, 1.0f, wt_packed + g * wt_panels, b, 0.0f, dcols, columns);
        for (index_t bi = 0; bi < ch.count; ++bi)
          col2im(cs, dcols + bi * pixels, columns, dx_g + bi * x_image);
      }
    }
    if (dw_t != nullptr && first < last)
      for (index_t g = 0; g < cs.groups; ++g)
        for (index_t ko = 0; ko < kg; ++ko)
          for (index_t t = 0; t < rows; ++t)
            dw_slice[(g * kg + ko) * rows + t] = dw_t[(g * rows + t) * kg + ko];
  });
  if (dw != nullptr && slices > 1) {
    parallel_for(w_size, 4096, [&](index_t i) {
      float sum = dw[i];
      for (index_t s = 1; s < slices; ++s) sum += partial[(s - 1) * w_size + i];
      dw[i] = sum;
    });
  }
}

}  // namespace cpu
}  // namespace fastcnn
