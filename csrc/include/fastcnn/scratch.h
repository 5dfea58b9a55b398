// Per-thread scratch buffers that only grow: a kernel in steady state (the
// same shapes every training step) allocates nothing.
#pragma once

#include <vector>

#include "fastcnn/common.h"

namespace fastcnn {

enum class ScratchSlot : int { Cols = 0, ColsGrad = 1, GradOut = 2, Count = 3 };

// A buffer of at least `count` floats owned by the calling thread; valid until
// the same thread asks for the same slot again.
inline float* thread_scratch(ScratchSlot slot, index_t count) {
  thread_local std::vector<float> buffers[static_cast<int>(ScratchSlot::Count)];
  std::vector<float>& buf = buffers[static_cast<int>(slot)];
  if (static_cast<index_t>(buf.size()) < count) buf.resize(static_cast<size_t>(count));
  return buf.data();
}

}  // namespace fastcnn
