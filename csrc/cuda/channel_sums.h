// Per-channel sums over a tensor viewed as (n, c, l), spread over the whole
// GPU and deterministic: each channel's n l values are cut into `splits`
// contiguous ranges (a count that depends on the shape only), a block sums
// each range (its threads' strided partial sums in double, then block_sum's
// fixed tree), and the ranges' sums are added in order. One block per channel
// (the first version) left most of a large GPU idle and each block waiting on
// memory latency for hundreds of iterations.
//
//   channel_sums<K>(ex, name, n, c, l, value, finish)
//     value(ch, offset, acc): adds element `offset`'s terms into acc[0..K)
//     finish(ch, totals):     consumes the channel's K sums
// One launch when a channel fits one range, else two (partials, then totals).
#pragma once

#include <algorithm>

#include "fastcnn/cuda_launch.h"
#include "fastcnn/kernel_math.h"

namespace fastcnn {
namespace cuda {

constexpr int kSumThreads = 256;
constexpr index_t kSumRange = 16384;  // values per block: 64 a thread

// The channel of flat index o of an (n, c, l) tensor.
FASTCNN_HD index_t channel_of(index_t o, index_t c, index_t l) {
  index_t ch, within;
  div_rem(div_rem(o, l, &within), c, &ch);
  return ch;
}

inline index_t channel_splits(index_t count) {
  return std::min<index_t>(std::max<index_t>((count + kSumRange - 1) / kSumRange, 1), 1024);
}

template <int K, class Value, class Finish>
struct ChannelPartials {
  static constexpr int kThreads = kSumThreads;
  static constexpr bool kCooperative = true;
  Value value;
  Finish finish;
  index_t n, c, l, splits, per;
  double* partial;  // [c][splits][K]; unused when splits == 1 (finish is called here)

  template <class Ctx>
  FASTCNN_HD void operator()(Ctx& ctx) const {
    index_t s;
    const index_t ch = div_rem(ctx.bx(), splits, &s);
    const index_t count = n * l, e0 = s * per, e1 = index_min(count, e0 + per);
    const int tid = ctx.tid();
    double acc[K];
    FASTCNN_UNROLL
    for (int q = 0; q < K; ++q) acc[q] = 0.0;
    if (l > 0 && e0 + tid < e1) {
      index_t e = e0 + tid;
      for (ChannelCursor at(e, kThreads, l); e < e1; e += kThreads, at.next())
        value(ch, at.offset(c, ch), acc);
    }
    double* scratch = reinterpret_cast<double*>(ctx.smem());
    FASTCNN_UNROLL
    for (int q = 0; q < K; ++q) acc[q] = block_sum<kThreads>(ctx, scratch, acc[q]);
    if (tid != 0) return;
    if (splits == 1) {
      finish(ch, acc);
    } else {
      FASTCNN_UNROLL
      for (int q = 0; q < K; ++q) partial[(ch * splits + s) * K + q] = acc[q];
    }
  }
};

template <int K, class Finish>
struct ChannelTotals {
  Finish finish;
  index_t splits;
  const double* partial;

  FASTCNN_HD void operator()(index_t ch) const {
    double totals[K];
    FASTCNN_UNROLL
    for (int q = 0; q < K; ++q) totals[q] = 0.0;
    for (index_t s = 0; s < splits; ++s)
      FASTCNN_UNROLL
      for (int q = 0; q < K; ++q) totals[q] += partial[(ch * splits + s) * K + q];
    finish(ch, totals);
  }
};

template <int K, class Value, class Finish>
void channel_sums(const Exec& ex, const char* kernel, index_t n, index_t c, index_t l,
                  const Value& value, const Finish& finish) {
  if (c <= 0) return;
  const index_t count = n * l, splits = channel_splits(count);
  const index_t per = (count + splits - 1) / splits;
  Workspace partial(ex, splits > 1 ? static_cast<std::size_t>(c * splits * K) * sizeof(double) : 0);
  launch(ex, kernel, Grid{c * splits}, kSumThreads * sizeof(double),
         ChannelPartials<K, Value, Finish>{value, finish, n, c, l, splits, per,
                                           partial.as<double>()});
  if (splits > 1)
    for_each(ex, "channel_totals", c, ChannelTotals<K, Finish>{finish, splits, partial.as<double>()});
}

// out[ch] = the sum of channel ch of x (a bias gradient).
struct AddValue {
  const float* x;
  FASTCNN_HD void operator()(index_t, index_t o, double* acc) const { acc[0] += x[o]; }
};
struct StoreSum {
  float* out;
  FASTCNN_HD void operator()(index_t ch, const double* totals) const {
    out[ch] = static_cast<float>(totals[0]);
  }
};
inline void channel_sum(const Exec& ex, const char* kernel, index_t n, index_t c, index_t l,
                        const float* x, float* out) {
  channel_sums<1>(ex, kernel, n, c, l, AddValue{x}, StoreSum{out});
}

}  // namespace cuda
}  // namespace fastcnn
