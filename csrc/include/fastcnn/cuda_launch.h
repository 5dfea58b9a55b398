// How the CUDA kernels are written, launched and emulated (nvcc only).
//
// A kernel is a body: a small struct holding its arguments, with
//   static constexpr int kThreads;          // block size (1-D blocks)
//   static constexpr bool kCooperative;     // uses ctx.sync() or warp-level MMA
//   static constexpr int kMinBlocks;        // optional: blocks per SM (launch bounds)
//   template <class Ctx> FASTCNN_HD void operator()(Ctx& ctx) const;
// The body reads its thread and block indices, shared memory and barriers
// from `ctx` only. launch() runs it on the GPU through DeviceCtx (the CUDA
// built-ins), or, for an emulated Exec, on the host through HostCtx: the
// blocks one after another, the threads of a block as fibers switched at
// every barrier, so that shared-memory tiling, barriers and MMA fragment
// layouts run for real in the CPU tests. The emulator fills shared memory
// and workspaces with NaN, alternates the thread order between barriers, and
// reports barrier divergence, so races and reads of unwritten shared memory
// show up as wrong results or errors.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <type_traits>

#include "fastcnn/common.h"
#include "fastcnn/cuda_check.h"
#include "fastcnn/cuda_kernels.h"

// Full unrolling of a constant-trip loop on the GPU, so that the arrays it
// indexes stay in registers (nothing on the host compiler).
#ifdef __CUDA_ARCH__
#define FASTCNN_UNROLL _Pragma("unroll")
#else
#define FASTCNN_UNROLL
#endif

namespace fastcnn {
namespace cuda {

struct Grid {
  index_t x = 1, y = 1, z = 1;
};

// ------------------------------------------------------------ GPU context --

struct DeviceCtx {
#ifdef __CUDA_ARCH__
  FASTCNN_HD int tid() const { return static_cast<int>(threadIdx.x); }
  FASTCNN_HD index_t bx() const { return blockIdx.x; }
  FASTCNN_HD index_t by() const { return blockIdx.y; }
  FASTCNN_HD index_t bz() const { return blockIdx.z; }
  FASTCNN_HD index_t gx() const { return gridDim.x; }
  FASTCNN_HD void sync() const { __syncthreads(); }
  FASTCNN_HD unsigned char* smem() const {
    extern __shared__ __align__(16) unsigned char fastcnn_dynamic_smem[];
    return fastcnn_dynamic_smem;
  }
  // d += A (16x8, row) * B (8x8, col) in TF32 for the warp; fragments as
  // PTX lays out mma.m16n8k8 .tf32 (see gemm.cu).
  FASTCNN_HD void mma_tf32(float (&d)[4], const std::uint32_t (&a)[4],
                           const std::uint32_t (&b)[2]) const {
#if __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    __trap();
#endif
  }
#else
  // Host pass of nvcc: never called (bodies run on the host through HostCtx).
  FASTCNN_HD int tid() const { return 0; }
  FASTCNN_HD index_t bx() const { return 0; }
  FASTCNN_HD index_t by() const { return 0; }
  FASTCNN_HD index_t bz() const { return 0; }
  FASTCNN_HD index_t gx() const { return 1; }
  FASTCNN_HD void sync() const {}
  FASTCNN_HD unsigned char* smem() const { return nullptr; }
  FASTCNN_HD void mma_tf32(float (&)[4], const std::uint32_t (&)[4],
                           const std::uint32_t (&)[2]) const {}
#endif
};

// ------------------------------------------------------- emulated context --

class Fibers;
struct HostCtx;
void emulated_sync(HostCtx& ctx);
void emulated_mma_tf32(HostCtx& ctx, float* d, const std::uint32_t* a, const std::uint32_t* b);

struct HostCtx {
  int thread = 0;
  index_t block_x = 0, block_y = 0, block_z = 0, grid_x = 1;
  unsigned char* shared = nullptr;
  Fibers* fibers = nullptr;  // null for non-cooperative kernels

  FASTCNN_HD int tid() const { return thread; }
  FASTCNN_HD index_t bx() const { return block_x; }
  FASTCNN_HD index_t by() const { return block_y; }
  FASTCNN_HD index_t bz() const { return block_z; }
  FASTCNN_HD index_t gx() const { return grid_x; }
  FASTCNN_HD unsigned char* smem() const { return shared; }
  FASTCNN_HD void sync() {
#ifndef __CUDA_ARCH__
    emulated_sync(*this);
#endif
  }
  FASTCNN_HD void mma_tf32(float (&d)[4], const std::uint32_t (&a)[4],
                           const std::uint32_t (&b)[2]) {
#ifndef __CUDA_ARCH__
    emulated_mma_tf32(*this, d, a, b);
#endif
  }
};

// Whether emulated launches are being recorded into a graph (graph_begin on an
// emulated Exec), and the recorder: the launch, its body copied.
bool emulated_recording();
void record_emulated(const char* kernel, Grid grid, int threads, std::size_t smem_bytes,
                     bool cooperative, std::function<void(HostCtx&)> body);

// Runs body(ctx) for every thread of every block of `grid` on the host.
void emulate(const char* kernel, Grid grid, int threads, std::size_t smem_bytes,
             bool cooperative, const std::function<void(HostCtx&)>& body);

// ----------------------------------------------------------------- launch --

// Blocks per SM a body asks the register allocator to leave room for
// (static constexpr int kMinBlocks; 1 when absent).
template <class Body, class = void>
struct MinBlocks {
  static constexpr int value = 1;
};
template <class Body>
struct MinBlocks<Body, std::void_t<decltype(Body::kMinBlocks)>> {
  static constexpr int value = Body::kMinBlocks;
};

template <class Body>
__global__ void __launch_bounds__(Body::kThreads, MinBlocks<Body>::value)
    kernel_entry(const Body body) {
  DeviceCtx ctx;
  body(ctx);
}

void check_grid(const char* kernel, Grid grid, std::size_t smem_bytes);

// Runs `body` over `grid` on ex's stream (or emulated). An empty grid is a no-op.
template <class Body>
void launch(const Exec& ex, const char* kernel, Grid grid, std::size_t smem_bytes,
            const Body& body) {
  static_assert(sizeof(Body) <= 4096, "a kernel's arguments (the body) must fit CUDA's 4 KiB");
  if (grid.x <= 0 || grid.y <= 0 || grid.z <= 0) return;
  if (ex.emulated) {
    if (emulated_recording()) {
      record_emulated(kernel, grid, Body::kThreads, smem_bytes, Body::kCooperative,
                      [body](HostCtx& ctx) { body(ctx); });
      return;
    }
    emulate(kernel, grid, Body::kThreads, smem_bytes, Body::kCooperative,
            [&body](HostCtx& ctx) { body(ctx); });
    return;
  }
  check_grid(kernel, grid, smem_bytes);
  kernel_entry<Body><<<dim3(static_cast<unsigned>(grid.x), static_cast<unsigned>(grid.y),
                           static_cast<unsigned>(grid.z)),
                       Body::kThreads, smem_bytes, ex.stream>>>(body);
  check_launch(kernel, ex.stream);
}

// --------------------------------------------------------- common bodies --

// f(i) for i in [0, count): a grid-stride loop. F is a functor with a
// FASTCNN_HD operator()(index_t) const.
template <class F>
struct ForEach {
  static constexpr int kThreads = 256;
  static constexpr bool kCooperative = false;
  F f;
  index_t count;

  template <class Ctx>
  FASTCNN_HD void operator()(Ctx& ctx) const {
    const index_t step = ctx.gx() * kThreads;
    for (index_t i = ctx.bx() * kThreads + ctx.tid(); i < count; i += step) f(i);
  }
};

// Blocks of a grid-stride loop: at most this many (the emulator uses a few,
// so that the stride is exercised).
inline index_t stride_blocks(const Exec& ex, index_t work, int threads) {
  const index_t blocks = (work + threads - 1) / threads;
  const index_t cap = ex.emulated ? 3 : (index_t{1} << 20);
  return blocks < cap ? blocks : cap;
}

template <class F>
void for_each(const Exec& ex, const char* kernel, index_t count, const F& f) {
  launch(ex, kernel, Grid{stride_blocks(ex, count, ForEach<F>::kThreads)}, 0,
         ForEach<F>{f, count});
}

// A row-structured loop: for each row < rows (a block per row, grid-stride),
// the row's invariants are decoded once, r = f.row(row), then f(r, j) runs for
// j in [0, len) across the block's threads.
template <class F>
struct ForEachInRows {
  static constexpr int kThreads = 128;
  static constexpr bool kCooperative = false;
  F f;
  index_t rows, len;

  template <class Ctx>
  FASTCNN_HD void operator()(Ctx& ctx) const {
    for (index_t row = ctx.bx(); row < rows; row += ctx.gx()) {
      const auto r = f.row(row);
      for (index_t j = ctx.tid(); j < len; j += kThreads) f(r, j);
    }
  }
};

template <class F>
void for_each_in_rows(const Exec& ex, const char* kernel, index_t rows, index_t len, const F& f) {
  if (len <= 0) return;
  const index_t cap = ex.emulated ? 3 : (index_t{1} << 20);
  launch(ex, kernel, Grid{rows < cap ? rows : cap}, 0, ForEachInRows<F>{f, rows, len});
}

// Sum of v over the block's threads in a fixed tree order (deterministic).
// `scratch` holds one double per thread; every thread gets the sum.
template <int kThreads, class Ctx>
FASTCNN_HD double block_sum(Ctx& ctx, double* scratch, double v) {
  static_assert((kThreads & (kThreads - 1)) == 0, "block_sum needs a power-of-two block");
  const int t = ctx.tid();
  scratch[t] = v;
  ctx.sync();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (t < half) scratch[t] += scratch[t + half];
    ctx.sync();
  }
  const double total = scratch[0];
  ctx.sync();  // scratch may be reused right away
  return total;
}

// ------------------------------------------------------------- workspace --

// Scratch memory for one call: on the GPU, allocated stream-ordered from
// fastcnn's memory pool on the current device (it keeps what it has, so a
// training loop allocates nothing after its first step) and released,
// stream-ordered, when the Workspace goes out of scope; emulated, host
// memory filled with NaN.
class Workspace {
 public:
  Workspace(const Exec& ex, std::size_t bytes);
  ~Workspace();
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;

  template <class T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }

 private:
  Exec ex_;
  void* ptr_ = nullptr;
  bool pooled_ = false;
  bool kept_ = false;  // taken while recording a graph, which keeps it
};

// Bytes of workspace a convolution may use before it is cut into chunks of
// images (small when emulated, so that tests exercise the chunking).
std::size_t workspace_budget(const Exec& ex);

}  // namespace cuda
}  // namespace fastcnn
