// A SIMT emulator for the warp-level CUDA that csrc/cuda (score.cu, label.cu) uses, so that its kernels run,
// unchanged, as host C++ on the CPU and are tested against reference.py where no GPU is lent
// (csrc/cuda/simt/oucl_cuda_simt.cpp, tests/test_cuda_simt.py).
//
// Every CUDA thread of a launch is a fiber (ucontext) with its own stack. The lanes of a warp run on one
// OS thread, each until it reaches a warp collective (__shfl_xor_sync, __any_sync) or returns; when every
// lane waits, the collective is evaluated and the lanes resume. That is the contract the kernels rely on
// (lanes exchange values only through collectives), and the emulator checks the rules a GPU does not: a
// full-mask collective must be reached by every lane of the warp, all at the same kind of collective, so a
// lane that returned early or diverged is an error raised to the caller, never a silently wrong value.
// Limits, by design: warps run one after another (races between warps are not detected), launches are
// 1-D, masks must name the whole warp, and there is no __syncthreads or __shared__ (the kernels use
// neither; code that does fails to compile here).
#pragma once

#include <c10/util/Exception.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>

#define __global__
#define __device__
#define __host__

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = struct SimtStream*;

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace simt {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

enum class Op { kShflXor, kAny };

inline const char* op_name(Op op) { return op == Op::kShflXor ? "__shfl_xor_sync" : "__any_sync"; }

// One warp's fibers, reused for every warp of every launch on this OS thread.
class Warp {
 public:
  Warp() {
    page_ = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t bytes = kWarpSize * (kStackBytes + page_);
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(p != MAP_FAILED, "simt: cannot map the fiber stacks");
    stacks_ = static_cast<char*>(p);
    // A guard page under each stack: an overflow faults instead of writing into the next lane's stack.
    for (int l = 0; l < kWarpSize; ++l) mprotect(stacks_ + l * (kStackBytes + page_), page_, PROT_NONE);
  }
  ~Warp() { munmap(stacks_, kWarpSize * (kStackBytes + page_)); }
  Warp(const Warp&) = delete;
  Warp& operator=(const Warp&) = delete;

  // Runs `body` as the lanes [0, n) of one warp whose first thread is threadIdx.x = first.
  void run(int n, unsigned first, const std::function<void()>& body) {
    n_ = n;
    first_ = first;
    body_ = &body;
    struct Detach {  // collectives outside a launch must fail, also after an error
      ~Detach() { current_ = nullptr; }
    } detach;
    for (int l = 0; l < n; ++l) {
      getcontext(&lane_ctx_[l]);
      lane_ctx_[l].uc_stack.ss_sp = stacks_ + l * (kStackBytes + page_) + page_;
      lane_ctx_[l].uc_stack.ss_size = kStackBytes;
      lane_ctx_[l].uc_link = &sched_ctx_;
      makecontext(&lane_ctx_[l], &Warp::lane_entry, 0);
      state_[l] = State::kReady;
    }
    for (;;) {
      for (int l = 0; l < n; ++l) {
        if (state_[l] != State::kReady) continue;
        current_ = this;
        lane_ = l;
        threadIdx = dim3(first + l);
        swapcontext(&sched_ctx_, &lane_ctx_[l]);
      }
      int waiting = 0;
      for (int l = 0; l < n; ++l) waiting += state_[l] == State::kWaiting;
      if (waiting == 0) break;
      evaluate();  // throws on a broken collective; the parked fibers are simply abandoned
    }
  }

  // Called by a lane: park at a collective until the whole warp is there, then return this lane's result.
  uint64_t collective(Op op, unsigned mask, uint64_t value, int arg) {
    const int l = lane_;
    op_[l] = op;
    mask_[l] = mask;
    value_[l] = value;
    arg_[l] = arg;
    state_[l] = State::kWaiting;
    swapcontext(&lane_ctx_[l], &sched_ctx_);
    return result_[l];
  }

  static Warp& current() {
    TORCH_CHECK(current_ != nullptr, "simt: a warp collective was called outside a kernel launch");
    return *current_;
  }

 private:
  static constexpr size_t kStackBytes = 128 * 1024;
  enum class State { kReady, kWaiting, kDone };

  static void lane_entry() {
    Warp& w = *current_;
    (*w.body_)();
    w.state_[w.lane_] = State::kDone;  // uc_link then returns to the scheduler
  }

  void evaluate() {
    const unsigned warp_mask = n_ == kWarpSize ? kFullMask : (1u << n_) - 1u;
    int first_waiting = 0;
    while (state_[first_waiting] != State::kWaiting) ++first_waiting;
    const Op op = op_[first_waiting];
    for (int l = 0; l < n_; ++l) {
      const unsigned tid = first_ + l;
      TORCH_CHECK(state_[l] == State::kWaiting, "simt: block ", blockIdx.x, ", thread ", tid,
                  " returned while its warp waits at ", op_name(op),
                  ": a full-mask collective must be reached by every lane");
      TORCH_CHECK(op_[l] == op, "simt: block ", blockIdx.x, ", thread ", tid, " is at ", op_name(op_[l]),
                  " while its warp is at ", op_name(op), " (divergent collectives)");
      TORCH_CHECK(mask_[l] == warp_mask, "simt: block ", blockIdx.x, ", thread ", tid, ": ", op_name(op),
                  " with mask ", mask_[l], "; the emulator supports masks naming the whole warp (", warp_mask, ")");
    }
    if (op == Op::kAny) {
      uint64_t any = 0;
      for (int l = 0; l < n_; ++l) any |= value_[l] != 0;
      for (int l = 0; l < n_; ++l) result_[l] = any;
    } else {
      for (int l = 0; l < n_; ++l) {
        const int src = l ^ arg_[l];
        TORCH_CHECK(src >= 0 && src < n_, "simt: __shfl_xor_sync from lane ", src, " of a ", n_, "-lane warp");
        result_[l] = value_[src];
      }
    }
    for (int l = 0; l < n_; ++l) state_[l] = State::kReady;
  }

  static inline thread_local Warp* current_ = nullptr;
  static inline thread_local int lane_ = 0;

  size_t page_ = 0;
  char* stacks_ = nullptr;
  int n_ = 0;
  unsigned first_ = 0;
  const std::function<void()>* body_ = nullptr;
  ucontext_t sched_ctx_;
  ucontext_t lane_ctx_[kWarpSize];
  State state_[kWarpSize];
  Op op_[kWarpSize];
  unsigned mask_[kWarpSize];
  uint64_t value_[kWarpSize];
  int arg_[kWarpSize];
  uint64_t result_[kWarpSize];
};

// kernel<<<grid, block, 0, stream>>>(args...): every block, warp by warp, in order.
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, cudaStream_t, A... args) {
  TORCH_CHECK(grid.y == 1 && grid.z == 1 && block.y == 1 && block.z == 1, "simt: 1-D launches only");
  TORCH_CHECK(block.x >= 1 && block.x <= 1024, "simt: block of ", block.x, " threads");
  static thread_local Warp warp;
  const std::function<void()> body = [&] { kernel(args...); };
  gridDim = grid;
  blockDim = block;
  for (unsigned b = 0; b < grid.x; ++b) {
    blockIdx = dim3(b);
    for (unsigned t = 0; t < block.x; t += kWarpSize)
      warp.run(static_cast<int>(std::min<unsigned>(kWarpSize, block.x - t)), t, body);
  }
}

template <typename T>
uint64_t to_bits(T v) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= sizeof(uint64_t), "simt: 8-byte values at most");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}

template <typename T>
T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

}  // namespace simt

// No width argument: sub-warp shuffles are not emulated (code passing one fails to compile here).
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask) {
  return simt::from_bits<T>(simt::Warp::current().collective(simt::Op::kShflXor, mask, simt::to_bits(var), lane_mask));
}

inline int __any_sync(unsigned mask, int predicate) {
  return static_cast<int>(simt::Warp::current().collective(simt::Op::kAny, mask, predicate != 0, 0));
}
