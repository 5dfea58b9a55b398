// Optimizer updates for many parameters in one launch (a multi-tensor
// apply): the tensors' pointers and sizes travel in the kernel's arguments,
// each block updates one chunk of one tensor with the per-element maths of
// fastcnn/optim_math.h, the same bits as the CPU update. A training step's
// optimizer is then one launch per kMaxTensors parameters instead of a
// handful of elementwise launches per parameter.
#include "fastcnn/cuda_launch.h"
#include "fastcnn/kernel_math.h"
#include "fastcnn/optim_math.h"

namespace fastcnn {
namespace cuda {
namespace {

// Elements per block: 256 threads, 8 elements each.
constexpr index_t kChunk = 2048;

// A captured Adam step's device scalars before the per-tensor pairs.
constexpr int kAdamScalars = 5;

// The tensors of one launch. Block b works on tensor t where
// first_block[t] <= b < first_block[t + 1]; at most kMaxTensors tensors keep
// the arguments well under CUDA's 4 KiB limit.
template <int kStates>
struct TensorTable {
  int count = 0;
  float* p[kMaxTensors];
  const float* g[kMaxTensors];
  float* state[kStates][kMaxTensors];
  float bias2_sqrt[kMaxTensors], step_size[kMaxTensors];  // Adam: per tensor (its step count)
  int index[kMaxTensors];                                  // the tensor's place in the call
  bool first[kMaxTensors];                                // SGD: the buffer starts as g
  index_t size[kMaxTensors];
  index_t first_block[kMaxTensors + 1];

  FASTCNN_HD int tensor_of(index_t block) const {
    int t = 0;
    while (t + 1 < count && first_block[t + 1] <= block) ++t;
    return t;
  }
};

// One block's chunk: elements [begin, end) of tensor t, strided over the threads.
template <int kStates>
struct ChunkRange {
  int t;
  index_t begin, end;

  template <class Ctx>
  FASTCNN_HD ChunkRange(const TensorTable<kStates>& table, Ctx& ctx) {
    t = table.tensor_of(ctx.bx());
    begin = (ctx.bx() - table.first_block[t]) * kChunk;
    end = index_min(table.size[t], begin + kChunk);
  }
};

struct SgdBody {
  static constexpr int kThreads = 256;
  static constexpr bool kCooperative = false;
  TensorTable<1> table;
  SgdOptions o;
  bool decay, momentum;
  const float* scalars;  // lr, momentum (read at every replay of a graph); or null

  template <class Ctx>
  FASTCNN_HD void operator()(Ctx& ctx) const {
    const ChunkRange<1> r(table, ctx);
    SgdOptions mine = o;
    if (scalars != nullptr) {
      mine.lr = scalars[0];
      mine.momentum = scalars[1];
    }
    float* p = table.p[r.t];
    const float* g = table.g[r.t];
    float* buf = table.state[0][r.t];
    const bool first = table.first[r.t];
    for (index_t i = r.begin + ctx.tid(); i < r.end; i += kThreads)
      sgd_element(mine, decay, momentum, first, o.nesterov, o.damped, p + i, g[i],
                  momentum ? buf + i : nullptr);
  }
};

struct AdamBody {
  static constexpr int kThreads = 256;
  static constexpr bool kCooperative = false;
  TensorTable<2> table;
  AdamOptions o;
  bool decoupled, l2;
  // decay_scale, beta1, 1 - beta1, beta2, 1 - beta2, then (bias2_sqrt,
  // step_size) per tensor; or null
  const float* scalars;

  template <class Ctx>
  FASTCNN_HD void operator()(Ctx& ctx) const {
    const ChunkRange<2> r(table, ctx);
    AdamOptions mine = o;
    if (scalars != nullptr) {
      const int i = table.index[r.t];
      mine.decay_scale = scalars[0];
      mine.beta1 = scalars[1];
      mine.one_minus_beta1 = scalars[2];
      mine.beta2 = scalars[3];
      mine.one_minus_beta2 = scalars[4];
      mine.bias2_sqrt = scalars[kAdamScalars + 2 * i];
      mine.step_size = scalars[kAdamScalars + 1 + 2 * i];
    } else {
      mine.bias2_sqrt = table.bias2_sqrt[r.t];
      mine.step_size = table.step_size[r.t];
    }
    float* p = table.p[r.t];
    const float* g = table.g[r.t];
    float* m = table.state[0][r.t];
    float* v = table.state[1][r.t];
    for (index_t i = r.begin + ctx.tid(); i < r.end; i += kThreads)
      adam_element(mine, decoupled, l2, p + i, g[i], m + i, v + i);
  }
};

// Cuts `tensors` into launches of at most kMaxTensors non-empty tensors:
// fill(table, slot, tensor) copies one tensor's entries, launch(table, blocks) runs one.
template <class Table, class Fill, class Launch>
void in_launches(const OptimTensor* tensors, int n, Fill fill, Launch run) {
  Table table;
  index_t blocks = 0;
  auto flush = [&] {
    if (table.count == 0) return;
    table.first_block[table.count] = blocks;
    run(table, blocks);
    table = Table();
    blocks = 0;
  };
  for (int i = 0; i < n; ++i) {
    if (tensors[i].size <= 0) continue;
    const int slot = table.count++;
    table.p[slot] = tensors[i].p;
    table.g[slot] = tensors[i].g;
    table.size[slot] = tensors[i].size;
    table.index[slot] = i;
    table.first_block[slot] = blocks;
    fill(table, slot, tensors[i]);
    blocks += (tensors[i].size + kChunk - 1) / kChunk;
    if (table.count == kMaxTensors) flush();
  }
  flush();
}

}  // namespace

void sgd_step_multi(const Exec& ex, const OptimTensor* tensors, int n, bool momentum,
                    const SgdOptions& o, const float* scalars) {
  const bool decay = o.weight_decay != 0.0f;
  in_launches<TensorTable<1>>(
      tensors, n,
      [](TensorTable<1>& table, int slot, const OptimTensor& t) {
        table.state[0][slot] = t.state0;
        table.first[slot] = t.first_step;
        table.bias2_sqrt[slot] = table.step_size[slot] = 0.0f;
      },
      [&](const TensorTable<1>& table, index_t blocks) {
        launch(ex, "sgd_step", Grid{blocks}, 0, SgdBody{table, o, decay, momentum, scalars});
      });
}

void adam_step_multi(const Exec& ex, const OptimTensor* tensors, int n, const AdamOptions& o,
                     const float* scalars) {
  // With device scalars the decay scale is always applied (it is 1 for Adam:
  // p * 1 is p, to the bit), since it is not known here.
  const bool decoupled = scalars != nullptr || o.decay_scale != 1.0f;
  const bool l2 = o.weight_decay != 0.0f;
  in_launches<TensorTable<2>>(
      tensors, n,
      [](TensorTable<2>& table, int slot, const OptimTensor& t) {
        table.state[0][slot] = t.state0;
        table.state[1][slot] = t.state1;
        table.bias2_sqrt[slot] = t.bias2_sqrt;
        table.step_size[slot] = t.step_size;
        table.first[slot] = false;
      },
      [&](const TensorTable<2>& table, index_t blocks) {
        launch(ex, "adam_step", Grid{blocks}, 0, AdamBody{table, o, decoupled, l2, scalars});
      });
}

}  // namespace cuda
}  // namespace fastcnn
