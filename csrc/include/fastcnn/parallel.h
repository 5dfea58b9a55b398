// OpenMP helpers for the CPU kernels.
#pragma once

#include <omp.h>

#include "fastcnn/common.h"

namespace fastcnn {

// Threads worth using for `work` units of roughly `grain` cost each: small
// problems stay on one thread, where fork/join would cost more than it saves.
inline int threads_for(index_t work, index_t grain = 1) {
  if (omp_in_parallel()) return 1;
  index_t t = num_threads();
  index_t useful = grain > 0 ? (work + grain - 1) / grain : work;
  if (useful < t) t = useful;
  return t < 1 ? 1 : static_cast<int>(t);
}

// Calls f(i) for i in [0, n). Iterations must be independent: each one owns
// the outputs it writes, so the result does not depend on the partition.
template <typename F>
inline void parallel_for(index_t n, index_t grain, F&& f) {
  int t = threads_for(n, grain);
  if (t <= 1) {
    for (index_t i = 0; i < n; ++i) f(i);
    return;
  }
#pragma omp parallel for num_threads(t) schedule(static)
  for (index_t i = 0; i < n; ++i) f(i);
}

}  // namespace fastcnn
