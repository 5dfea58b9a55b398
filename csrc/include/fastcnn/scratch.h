// Per-thread scratch buffers that only grow: a kernel in steady state (the
// same shapes every training step) allocates nothing.
#pragma once

#include <cstdlib>
#include <memory>
#include <new>

#include "fastcnn/common.h"

namespace fastcnn {

enum class ScratchSlot : int {
  ColsGrad = 0,  // conv2d: gradient of the columns
  GradOut,       // conv2d: a chunk's output, before the bias and the scatter to images
  Packed,        // conv2d: a GEMM B~ operand gathered into packed panels
  PackedA,       // conv2d: a GEMM A~ operand gathered into packed panels
  WeightGradT,   // conv2d: a transposed weight gradient
  Weights,       // conv2d: the weights (or their transpose) packed as A~ panels
  Padded,        // conv2d: a chunk's input with its zero padding
  Bases,         // conv2d: gather offsets along a packed panel's depth
  WinogradTiles,     // winograd: a chunk's transformed input tiles (or their gradient)
  WinogradProducts,  // winograd: a chunk's products before the output transform (or dM)
  DirectInput,       // direct conv: the batch's input with its zero padding
  DirectGrad,        // direct conv: one output-gradient plane routed from a pool
  BatchNormGrad,     // batch norm: one channel's output gradient routed from a pool
  GemmA,         // sgemm: packed A~
  GemmB,         // sgemm: packed B~
  GemmPartial,   // sgemm, a few rows: each k-block's partial products
  GemmSharedA,   // sgemm: A~ blocks packed by all threads together (two)
  Count
};

// A 64-byte aligned buffer of at least `count` T (float unless asked)
// owned by the calling thread; valid until the same thread asks for the
// same slot again.
template <typename T = float>
inline T* thread_scratch(ScratchSlot slot, index_t count) {
  struct Free {
    void operator()(void* p) const { std::free(p); }
  };
  struct Buffer {
    std::unique_ptr<void, Free> data;
    size_t capacity = 0;  // bytes
  };
  thread_local Buffer buffers[static_cast<int>(ScratchSlot::Count)];
  Buffer& buf = buffers[static_cast<int>(slot)];
  const size_t bytes = (static_cast<size_t>(count) * sizeof(T) + 63) / 64 * 64;
  if (bytes > buf.capacity) {
    void* p = std::aligned_alloc(64, bytes);
    if (p == nullptr) throw std::bad_alloc();
    buf.data.reset(p);
    buf.capacity = bytes;
  }
  return static_cast<T*>(buf.data.get());
}

}  // namespace fastcnn
