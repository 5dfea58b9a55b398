// ReLU and its two backward rules (plain and guided backpropagation). The
// masks are bitwise selects, not branches: activations' signs are random, so
// a branch would mispredict half the time, and a select also keeps a NaN
// gradient out of the zeroed positions, as PyTorch does.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "fastcnn/cpu_kernels.h"
#include "fastcnn/parallel.h"

namespace fastcnn {
namespace cpu {
namespace {

constexpr index_t kGrain = 1 << 15;  // elements per task: large enough to amortise a fork

inline std::uint32_t bits(float v) {
  std::uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  return u;
}
inline float from_bits(std::uint32_t u) {
  float v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}
// v if keep, else +0.0f
inline float select(bool keep, float v) { return from_bits(bits(v) & (0u - std::uint32_t(keep))); }

template <typename F>
void blocked(index_t count, F&& body) {
  parallel_for((count + kGrain - 1) / kGrain, 1, [&](index_t b) {
    body(b * kGrain, std::min(count, (b + 1) * kGrain));
  });
}

}  // namespace

void relu_forward(index_t count, const float* x, float* y) {
  // y = x where !(x < 0): NaN stays NaN, as in PyTorch.
  blocked(count, [&](index_t begin, index_t end) {
    for (index_t i = begin; i < end; ++i) y[i] = select(!(x[i] < 0.0f), x[i]);
  });
}

void relu_backward(index_t count, const float* dy, const float* x, bool guided, float* dx) {
  blocked(count, [&](index_t begin, index_t end) {
    if (guided) {
      for (index_t i = begin; i < end; ++i) dx[i] = select((x[i] > 0.0f) & (dy[i] > 0.0f), dy[i]);
    } else {
      // PyTorch's threshold_backward: zero where x <= 0 (a NaN input passes the gradient).
      for (index_t i = begin; i < end; ++i) dx[i] = select(!(x[i] <= 0.0f), dy[i]);
    }
  });
}

}  // namespace cpu
}  // namespace fastcnn
