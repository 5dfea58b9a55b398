// Deterministic, vectorisable sums for the CPU kernels. A plain running sum
// cannot be vectorised without reassociating it (which the compiler won't
// do without -ffast-math); these keep kLanes independent partial sums that
// map onto SIMD registers, then add the lanes in a fixed order. The result
// depends only on the data, never on threads or on the instruction set.
#pragma once

#include "fastcnn/common.h"

namespace fastcnn {

constexpr int kLanes = 16;

// sum_i f(i) for i in [0, n), f returning float.
template <typename F>
inline float lane_sum(index_t n, F&& f) {
  float acc[kLanes] = {};
  index_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += f(i + j);
  for (int j = 0; i < n; ++i, ++j) acc[j] += f(i);
  float total = 0.0f;
  for (int j = 0; j < kLanes; ++j) total += acc[j];
  return total;
}

}  // namespace fastcnn
