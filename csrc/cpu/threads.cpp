#include <omp.h>

#include <atomic>

#include "fastcnn/common.h"

namespace fastcnn {
namespace {
std::atomic<int> g_threads{0};  // 0: not set yet, use OpenMP's default
}

int num_threads() {
  int n = g_threads.load(std::memory_order_relaxed);
  return n > 0 ? n : omp_get_max_threads();
}

void set_num_threads(int n) { g_threads.store(n < 1 ? 1 : n, std::memory_order_relaxed); }

}  // namespace fastcnn
