// The runtime side of the CUDA backend: error reporting, device queries, the
// TF32 switch, the workspace pool, and the host emulator of kernel bodies.
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "fastcnn/cuda_launch.h"
#include "fastcnn/kernel_math.h"

namespace fastcnn {
namespace cuda {

namespace {
// Kernels emulated (and recorded) so far, by name: emulated_launches().
std::mutex g_launch_mutex;
std::map<std::string, std::int64_t> g_launches;
}  // namespace

// ------------------------------------------------------------------ errors --

[[noreturn]] void throw_cuda_error(cudaError_t err, const std::string& what) {
  // The failed call also set the runtime's last error, which the next
  // check_launch would read and blame on an unrelated kernel: clear it (a
  // sticky error, a fault in a kernel, stays and is reported again).
  (void)cudaGetLastError();
  std::string hint;
  if (err == cudaErrorMemoryAllocation)
    hint = "; free cached GPU memory (cupy.get_default_memory_pool().free_all_blocks()) or "
           "use smaller batches";
  throw CudaError(what + ": " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")" +
                  hint);
}

namespace {
bool sync_after_launch() {
  static const bool on = [] {
    const char* v = std::getenv("FASTCNN_CUDA_SYNC");
    return v != nullptr && *v != '\0' && std::strcmp(v, "0") != 0;
  }();
  return on;
}
}  // namespace

void check_launch(const char* kernel, cudaStream_t stream) {
  cudaError_t err = cudaGetLastError();
  const bool sync = sync_after_launch();
  if (err == cudaSuccess && sync) {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    err = cudaStreamIsCapturing(stream, &status);
    if (err == cudaSuccess && status == cudaStreamCaptureStatusNone)
      err = cudaStreamSynchronize(stream);
  }
  if (err != cudaSuccess)
    throw_cuda_error(err, std::string("CUDA kernel ") + kernel +
                              (sync ? "" : " (or an earlier asynchronous error: set "
                                           "FASTCNN_CUDA_SYNC=1 to check every kernel)"));
}

void check_grid(const char* kernel, Grid grid, std::size_t smem_bytes) {
  if (grid.x > 0x7FFFFFFF || grid.y > 65535 || grid.z > 65535)
    throw CudaError(std::string("CUDA kernel ") + kernel + ": grid (" + std::to_string(grid.x) +
                    ", " + std::to_string(grid.y) + ", " + std::to_string(grid.z) +
                    ") exceeds the CUDA limits (2^31-1, 65535, 65535); the problem is too large");
  if (smem_bytes > 48 * 1024)
    throw CudaError(std::string("CUDA kernel ") + kernel + ": " + std::to_string(smem_bytes) +
                    " bytes of shared memory exceed 48 KiB");
}

// ----------------------------------------------------------------- devices --

int device_count() noexcept {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // no driver / no device: not an error to carry
    return 0;
  }
  return n;
}

namespace {
// A kernel that does nothing: whether the runtime finds code for the current
// device in this build (compiled for CMAKE_CUDA_ARCHITECTURES, as every kernel).
__global__ void probe_kernel() {}
}  // namespace

std::string unavailable_reason() {
  if (device_count() == 0) return "no CUDA device or driver found";
  int device = 0;
  cudaFuncAttributes attr{};
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, probe_kernel);
  if (err == cudaSuccess) return "";
  (void)cudaGetLastError();
  cudaDeviceProp prop{};
  std::string what = "GPU " + std::to_string(device);
  if (cudaGetDeviceProperties(&prop, device) == cudaSuccess)
    what += " (" + std::string(prop.name) + ", compute capability " +
            std::to_string(prop.major) + "." + std::to_string(prop.minor) + ")";
  else
    (void)cudaGetLastError();
  return what + " cannot run this build's kernels (" + cudaGetErrorName(err) +
         "): rebuild fastcnn for it, e.g. CUDAARCHS=" + std::to_string(prop.major) +
         std::to_string(prop.minor) + " pip install .";
}

bool is_available() noexcept {
  try {
    return unavailable_reason().empty();
  } catch (...) {
    return false;
  }
}

namespace {
std::atomic<bool> g_allow_tf32{false};
}
void set_allow_tf32(bool allow) { g_allow_tf32.store(allow, std::memory_order_relaxed); }
bool allow_tf32() { return g_allow_tf32.load(std::memory_order_relaxed); }

// --------------------------------------------------------------- workspace --

namespace {

struct DevicePool {
  bool ready = false;
  cudaMemPool_t pool = nullptr;  // null: the device has no memory pools; cudaMalloc instead
};

std::mutex g_pool_mutex;
std::vector<DevicePool> g_pools;

DevicePool pool_for(int device) {
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  if (static_cast<int>(g_pools.size()) <= device) g_pools.resize(static_cast<size_t>(device) + 1);
  DevicePool& p = g_pools[static_cast<size_t>(device)];
  if (!p.ready) {
    int supported = 0;
    FASTCNN_CUDA_CHECK(cudaDeviceGetAttribute(&supported, cudaDevAttrMemoryPoolsSupported, device));
    if (supported != 0) {
      cudaMemPoolProps props{};
      props.allocType = cudaMemAllocationTypePinned;
      props.location.type = cudaMemLocationTypeDevice;
      props.location.id = device;
      FASTCNN_CUDA_CHECK(cudaMemPoolCreate(&p.pool, &props));
      // Keep freed memory in the pool, up to a bound: the next step reuses it,
      // and more than that goes back to the device at synchronisations (so that
      // CuPy, whose out-of-memory retry frees only its own cache, can have it).
      std::uint64_t keep = std::uint64_t{512} << 20;
      FASTCNN_CUDA_CHECK(cudaMemPoolSetAttribute(p.pool, cudaMemPoolAttrReleaseThreshold, &keep));
    }
    p.ready = true;
  }
  return p;
}

}  // namespace

namespace {
void keep_for_graph(void* ptr);
}

Workspace::Workspace(const Exec& ex, std::size_t bytes) : ex_(ex) {
  if (bytes == 0) return;
  if (ex.emulated) {
    ptr_ = std::malloc(bytes);
    if (ptr_ == nullptr) throw std::bad_alloc();
    std::memset(ptr_, 0xFF, bytes);  // NaN: a read of unwritten scratch shows up
    if (emulated_recording()) {
      keep_for_graph(ptr_);  // the recorded kernels use it at every replay
      kept_ = true;
    }
    return;
  }
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  FASTCNN_CUDA_CHECK(cudaStreamIsCapturing(ex.stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) {
    // Captured: an allocation node of the graph (the default pool's
    // stream-ordered allocator, which graphs support), freed by a free node.
    FASTCNN_CUDA_CHECK(cudaMallocAsync(&ptr_, bytes, ex.stream));
    pooled_ = true;
    return;
  }
  int device = 0;
  FASTCNN_CUDA_CHECK(cudaGetDevice(&device));
  const DevicePool p = pool_for(device);
  if (p.pool != nullptr) {
    FASTCNN_CUDA_CHECK(cudaMallocFromPoolAsync(&ptr_, bytes, p.pool, ex.stream));
    pooled_ = true;
  } else {
    FASTCNN_CUDA_CHECK(cudaMalloc(&ptr_, bytes));
  }
}

Workspace::~Workspace() {
  if (ptr_ == nullptr || kept_) return;
  if (ex_.emulated) {
    std::free(ptr_);
  } else if (pooled_) {
    // stream-ordered: after the kernels using it; a failure (a destructor cannot
    // throw) must not stay behind as the runtime's last error
    if (cudaFreeAsync(ptr_, ex_.stream) != cudaSuccess) (void)cudaGetLastError();
  } else if (cudaFree(ptr_) != cudaSuccess) {  // synchronises the device first
    (void)cudaGetLastError();
  }
}

namespace {
constexpr std::size_t kGpuBudget = std::size_t{256} << 20;
constexpr std::size_t kEmulatedBudget = std::size_t{64} << 10;
std::atomic<std::size_t> g_emulated_budget{kEmulatedBudget};
}  // namespace

// ------------------------------------------------------------------ graphs --

namespace {

struct Recording {
  struct Launch {
    std::string kernel;
    Grid grid;
    int threads;
    std::size_t smem_bytes;
    bool cooperative;
    std::function<void(HostCtx&)> body;
  };
  std::vector<Launch> launches;
  std::vector<void*> kept;  // scratch memory the launches use
  ~Recording() {
    for (void* p : kept) std::free(p);
  }
};

thread_local std::unique_ptr<Recording> t_recording;

void keep_for_graph(void* ptr) { t_recording->kept.push_back(ptr); }

class EmulatedGraph final : public Graph {
 public:
  explicit EmulatedGraph(std::unique_ptr<Recording> r) : r_(std::move(r)) {}
  void launch(const Exec&) override {
    for (const Recording::Launch& l : r_->launches)
      emulate(l.kernel.c_str(), l.grid, l.threads, l.smem_bytes, l.cooperative, l.body);
  }
  bool emulated() const override { return true; }
  std::int64_t kernels() const override { return static_cast<std::int64_t>(r_->launches.size()); }

 private:
  std::unique_ptr<Recording> r_;
};

class DeviceGraph final : public Graph {
 public:
  explicit DeviceGraph(cudaGraph_t graph) : graph_(graph) {
    const cudaError_t err = cudaGraphInstantiate(&exec_, graph_, 0);
    if (err != cudaSuccess) {
      (void)cudaGraphDestroy(graph_);
      throw_cuda_error(err, "cudaGraphInstantiate");
    }
  }
  ~DeviceGraph() override {
    (void)cudaGraphExecDestroy(exec_);
    (void)cudaGraphDestroy(graph_);
  }
  void launch(const Exec& ex) override {
    FASTCNN_CUDA_CHECK(cudaGraphLaunch(exec_, ex.stream));
  }
  bool emulated() const override { return false; }
  std::int64_t kernels() const override { return -1; }

 private:
  cudaGraph_t graph_ = nullptr;
  cudaGraphExec_t exec_ = nullptr;
};

}  // namespace

bool emulated_recording() { return t_recording != nullptr; }

void record_emulated(const char* kernel, Grid grid, int threads, std::size_t smem_bytes,
                     bool cooperative, std::function<void(HostCtx&)> body) {
  {
    std::lock_guard<std::mutex> lock(g_launch_mutex);
    ++g_launches[std::string("captured ") + kernel];
  }
  t_recording->launches.push_back(
      Recording::Launch{kernel, grid, threads, smem_bytes, cooperative, std::move(body)});
}

void graph_begin(const Exec& ex) {
  if (ex.emulated) {
    if (t_recording != nullptr) throw CudaError("graph_begin: already recording a graph");
    t_recording.reset(new Recording());
    return;
  }
  FASTCNN_CUDA_CHECK(cudaStreamBeginCapture(ex.stream, cudaStreamCaptureModeRelaxed));
}

std::unique_ptr<Graph> graph_end(const Exec& ex) {
  if (ex.emulated) {
    if (t_recording == nullptr) throw CudaError("graph_end: no graph is being recorded");
    return std::unique_ptr<Graph>(new EmulatedGraph(std::move(t_recording)));
  }
  cudaGraph_t graph = nullptr;
  FASTCNN_CUDA_CHECK(cudaStreamEndCapture(ex.stream, &graph));
  if (graph == nullptr) throw CudaError("cudaStreamEndCapture: the capture was invalidated");
  return std::unique_ptr<Graph>(new DeviceGraph(graph));
}

std::size_t workspace_budget(const Exec& ex) {
  return ex.emulated ? g_emulated_budget.load() : kGpuBudget;
}

void set_emulated_workspace_budget(bool gpu) {
  g_emulated_budget.store(gpu ? kGpuBudget : kEmulatedBudget);
}

// ---------------------------------------------------------------- emulator --
//
// The threads of a block run as fibers (ucontext) on the calling thread. A
// fiber runs until it reaches a barrier (ctx.sync()) or a warp-synchronous
// operation (MMA), or finishes; when every thread of the block waits at the
// barrier (or every lane of a warp at the warp operation) they are released.
// Anything else is a divergent barrier, which hangs or corrupts a real GPU:
// here it is an error.

class Fibers {
 public:
  enum class State : unsigned char { Ready, AtSync, AtWarp, Done };
  struct MmaSlot {
    std::uint32_t a[4], b[2];
  };

  Fibers(int threads, const std::function<void(HostCtx&)>& body)
      : threads_(threads), body_(&body), uc_(static_cast<size_t>(threads)),
        state_(static_cast<size_t>(threads)), ctx_(static_cast<size_t>(threads)),
        mma(static_cast<size_t>(threads)) {
    thread_local std::vector<char> stacks;
    const size_t need = static_cast<size_t>(threads) * kStack;
    if (stacks.size() < need) stacks.resize(need);
    stacks_ = stacks.data();
  }

  int threads() const { return threads_; }

  void run_block(const HostCtx& proto) {
    for (int t = 0; t < threads_; ++t) {
      ctx_[t] = proto;
      ctx_[t].thread = t;
      ctx_[t].fibers = this;
      state_[t] = State::Ready;
      getcontext(&uc_[t]);
      uc_[t].uc_stack.ss_sp = stacks_ + static_cast<size_t>(t) * kStack;
      uc_[t].uc_stack.ss_size = kStack;
      uc_[t].uc_link = &main_;
      makecontext(&uc_[t], &Fibers::entry, 0);
    }
    bool forward = true;  // alternate the order, so a missing barrier shows either way
    for (;;) {
      for (int i = 0; i < threads_; ++i) {
        const int t = forward ? i : threads_ - 1 - i;
        if (state_[t] != State::Ready) continue;
        current_ = t;
        t_current = this;
        swapcontext(&main_, &uc_[t]);
        if (error_) std::rethrow_exception(error_);
      }
      forward = !forward;
      bool released = false;
      for (int w = 0; w < threads_; w += 32) {
        const int end = std::min(threads_, w + 32);
        bool all = true;
        for (int t = w; t < end; ++t) all = all && state_[t] == State::AtWarp;
        if (all) {
          for (int t = w; t < end; ++t) state_[t] = State::Ready;
          released = true;
        }
      }
      if (released) continue;
      int done = 0, at_sync = 0, at_warp = 0;
      for (int t = 0; t < threads_; ++t) {
        done += state_[t] == State::Done;
        at_sync += state_[t] == State::AtSync;
        at_warp += state_[t] == State::AtWarp;
      }
      if (done == threads_) return;
      if (at_sync == threads_) {
        for (int t = 0; t < threads_; ++t) state_[t] = State::Ready;
        continue;
      }
      throw std::logic_error("divergent barrier: " + std::to_string(at_sync) +
                             " threads wait at __syncthreads, " + std::to_string(at_warp) +
                             " at a warp-synchronous operation, " + std::to_string(done) +
                             " have exited (block of " + std::to_string(threads_) + ")");
    }
  }

  // Called on a fiber: park it in state s and return to the scheduler.
  void wait(int t, State s) {
    state_[t] = s;
    swapcontext(&uc_[t], &main_);
  }

  std::vector<MmaSlot> mma;  // per thread: the fragments a warp exchanges

 private:
  static constexpr size_t kStack = 128 * 1024;
  static thread_local Fibers* t_current;

  static void entry() {
    Fibers* f = t_current;
    const int t = f->current_;
    try {
      (*f->body_)(f->ctx_[t]);
    } catch (...) {
      if (!f->error_) f->error_ = std::current_exception();
    }
    f->state_[t] = State::Done;
  }  // returns to main_ through uc_link

  int threads_;
  const std::function<void(HostCtx&)>* body_;
  std::vector<ucontext_t> uc_;
  std::vector<State> state_;
  std::vector<HostCtx> ctx_;
  ucontext_t main_{};
  int current_ = 0;
  char* stacks_ = nullptr;
  std::exception_ptr error_;
};

thread_local Fibers* Fibers::t_current = nullptr;

namespace {
Fibers& fibers_of(HostCtx& ctx, const char* what) {
  if (ctx.fibers == nullptr)
    throw std::logic_error(std::string(what) +
                           " in a kernel body not declared kCooperative");
  return *ctx.fibers;
}

// A TF32 operand as the tensor core reads it: the top 19 bits of the float.
float tf32_operand(std::uint32_t bits) { return bits_float(bits & 0xFFFFE000u); }
}  // namespace

void emulated_sync(HostCtx& ctx) { fibers_of(ctx, "__syncthreads").wait(ctx.thread, Fibers::State::AtSync); }

// mma.sync.m16n8k8.row.col.f32.tf32.tf32.f32, from the PTX ISA's fragment
// layout: lane = 4 * group + t;  a0 (group, t), a1 (group + 8, t),
// a2 (group, t + 4), a3 (group + 8, t + 4);  b0 (k = t, n = group),
// b1 (k = t + 4, n = group);  d0 (group, 2t), d1 (group, 2t + 1),
// d2 (group + 8, 2t), d3 (group + 8, 2t + 1).
void emulated_mma_tf32(HostCtx& ctx, float* d, const std::uint32_t* a, const std::uint32_t* b) {
  Fibers& f = fibers_of(ctx, "warp-level MMA");
  if (f.threads() % 32 != 0) throw std::logic_error("warp-level MMA in a block of partial warps");
  Fibers::MmaSlot& mine = f.mma[static_cast<size_t>(ctx.thread)];
  std::copy(a, a + 4, mine.a);
  std::copy(b, b + 2, mine.b);
  f.wait(ctx.thread, Fibers::State::AtWarp);  // every lane has deposited its fragments
  const int lane = ctx.thread % 32, warp0 = ctx.thread - lane;
  float am[16][8], bm[8][8];
  for (int l = 0; l < 32; ++l) {
    const Fibers::MmaSlot& s = f.mma[static_cast<size_t>(warp0 + l)];
    const int g = l / 4, t = l % 4;
    am[g][t] = tf32_operand(s.a[0]);
    am[g + 8][t] = tf32_operand(s.a[1]);
    am[g][t + 4] = tf32_operand(s.a[2]);
    am[g + 8][t + 4] = tf32_operand(s.a[3]);
    bm[t][g] = tf32_operand(s.b[0]);
    bm[t + 4][g] = tf32_operand(s.b[1]);
  }
  const int g = lane / 4, t = lane % 4;
  for (int q = 0; q < 4; ++q) {
    const int row = g + (q / 2) * 8, col = 2 * t + q % 2;
    float sum = d[q];
    for (int k = 0; k < 8; ++k) sum += am[row][k] * bm[k][col];
    d[q] = sum;
  }
  f.wait(ctx.thread, Fibers::State::AtWarp);  // nobody overwrites a slot still being read
}


std::map<std::string, std::int64_t> emulated_launches() {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  return g_launches;
}

void emulate(const char* kernel, Grid grid, int threads, std::size_t smem_bytes,
             bool cooperative, const std::function<void(HostCtx&)>& body) {
  {
    std::lock_guard<std::mutex> lock(g_launch_mutex);
    ++g_launches[kernel];
  }
  try {
    // Exactly smem_bytes (a sanitizer then sees overruns), 16-byte aligned by operator new.
    std::vector<std::uint64_t> smem((smem_bytes + 7) / 8 + (smem_bytes == 0));
    unsigned char* shared = reinterpret_cast<unsigned char*>(smem.data());
    std::unique_ptr<Fibers> fibers;
    if (cooperative) fibers.reset(new Fibers(threads, body));
    for (index_t z = 0; z < grid.z; ++z)
      for (index_t y = 0; y < grid.y; ++y)
        for (index_t x = 0; x < grid.x; ++x) {
          std::memset(shared, 0xFF, smem_bytes);  // NaN: reads of unwritten shared memory show up
          HostCtx proto;
          proto.block_x = x;
          proto.block_y = y;
          proto.block_z = z;
          proto.grid_x = grid.x;
          proto.shared = shared;
          if (cooperative) {
            fibers->run_block(proto);
          } else {
            for (int t = 0; t < threads; ++t) {
              HostCtx ctx = proto;
              ctx.thread = t;
              body(ctx);
            }
          }
        }
  } catch (const std::exception& e) {
    throw CudaError(std::string("emulated CUDA kernel ") + kernel + ": " + e.what());
  }
}

}  // namespace cuda
}  // namespace fastcnn
