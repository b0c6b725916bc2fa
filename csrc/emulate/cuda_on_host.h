// Just enough of CUDA for a host C++ compiler to run the cvt_fast kernels on the CPU, so
// their index math, masks, barriers and warp-level exchanges are tested on machines without a GPU.
// Not a performance tool and not part of the extension (setup.py compiles csrc/*.cu and
// csrc/*.cpp only; this folder is built by tests/test_cuda_extension.py).
//
// Model: every CUDA thread of a block is a fiber (POSIX ucontext) on the calling OS thread, run
// cooperatively: a fiber runs until it waits at a barrier, then the next runnable one runs (see
// Barrier for the order). Blocks
// run one after another, so a `__shared__` array (a function-local static here) belongs to one block
// at a time, and so does the dynamic shared memory (poisoned with 0xFF bytes, NaN in every float
// type, at block start). __syncthreads is a barrier over the block, __syncwarp one over the warp.
// Warp-collective operations (__shfl_xor_sync here, mma / ldmatrix in ptx_on_host.h) post each
// lane's operands in a per-warp exchange area and pass one barrier over the warp; so, as on the GPU,
// every lane of the warp must reach them. The schedule is deterministic and lets each thread run as
// far ahead as the barriers allow, so a missing barrier shows as reads of poison (NaN) or of stale
// data rather than passing by luck; a barrier or collective that some thread never reaches stops
// the run with a message ("deadlock") instead of hanging.
// Kernels that pun 16-bit pairs through 32-bit stores (as GPU code does) need -fno-strict-aliasing.
// Left out: register limits, bank conflicts, the cost of anything.
#pragma once

#include <math.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <type_traits>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct alignas(8) float2 {
  float x, y;
};

struct alignas(16) float4 {
  float x, y, z, w;
};

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

namespace cvt_emu {

constexpr int kWarpSize = 32;
constexpr size_t kFiberStackBytes = 256 * 1024;

// A cp.async of kCpAsyncBytes in flight: lands at the wait of the issuing thread that retires its group.
constexpr int kCpAsyncBytes = 16;
struct PendingCopy {
  void* dst;
  const void* src;
  int src_bytes;  // bytes read from src; the rest of the 16 is zero-filled (as cp.async's src-size)
};

// What a CUDA thread has of its own besides its stack.
struct ThreadState {
  ucontext_t context;
  dim3 thread_idx;
  int linear_tid = 0;
  bool finished = false;
  int exchange_parity = 0;  // see WarpExchange
  std::vector<PendingCopy> open_copies;
  std::deque<std::vector<PendingCopy>> committed_copies;
};

// The fibers of the block being run, and the queue of those ready to run.
struct Scheduler {
  ucontext_t launcher;
  std::vector<ThreadState> threads;
  std::deque<int> runnable;
  int current = 0;
  dim3 block_idx;
};

inline thread_local Scheduler* tl_scheduler = nullptr;

inline ThreadState& current_thread() { return tl_scheduler->threads[tl_scheduler->current]; }

// Suspends the current fiber; it runs again once something puts it back on the run queue.
inline void suspend() { swapcontext(&current_thread().context, &tl_scheduler->launcher); }

// A barrier over `count` fibers. The last to arrive releases the others and runs on. Fibers released
// by a warp barrier run next (so one warp runs ahead until it waits at a block barrier, the largest
// skew between warps that the barriers allow); those released by a block barrier queue behind.
struct Barrier {
  Barrier(int count_, bool run_released_next_) : count(count_), run_released_next(run_released_next_) {}
  void arrive_and_wait() {
    if (++arrived == count) {
      arrived = 0;
      auto& queue = tl_scheduler->runnable;
      if (run_released_next) {
        queue.insert(queue.begin(), waiting.begin(), waiting.end());
      } else {
        queue.insert(queue.end(), waiting.begin(), waiting.end());
      }
      waiting.clear();
    } else {
      waiting.push_back(tl_scheduler->current);
      suspend();
    }
  }
  int count;
  bool run_released_next;
  int arrived = 0;
  std::vector<int> waiting;
};

// Per warp, two alternating sets of 32 lane slots for warp-collective operations. A lane posts
// into set (its op count % 2), passes the warp barrier, reads the others' slots and returns. One
// barrier per operation is enough: a lane can post into the same set again only two operations
// later, after the barrier of the operation in between, which every lane reaches only once done
// reading this set.
struct WarpExchange {
  static constexpr int kWords = 8;
  uint64_t slot[2][kWarpSize][kWords];
};

struct BlockContext {
  BlockContext(int threads, size_t shared_bytes)
      : block_barrier(threads, false),
        exchange((threads + kWarpSize - 1) / kWarpSize),
        dynamic_shared(shared_bytes, 0xFF) {
    for (int w = 0; w < (threads + kWarpSize - 1) / kWarpSize; ++w) {
      warp_barriers.emplace_back(std::min(kWarpSize, threads - w * kWarpSize), true);
    }
  }
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<WarpExchange> exchange;
  std::vector<unsigned char> dynamic_shared;
};

inline thread_local BlockContext* tl_block = nullptr;
inline dim3 g_grid_dim;
inline dim3 g_block_dim;

// The CUDA launch limits (compute capability 3.0 and newer): a grid over these fails to launch
// ("invalid configuration argument"), so the emulation refuses it too.
constexpr unsigned kMaxGridX = 2147483647u, kMaxGridYZ = 65535u, kMaxBlockThreads = 1024u;
inline bool grid_fits(dim3 grid) {
  return grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.x <= kMaxGridX && grid.y <= kMaxGridYZ &&
         grid.z <= kMaxGridYZ;
}

// Launch recording for tests of the host-side plans at sizes too large to emulate: with
// g_dry_launches set, launch_with_shared records the grid and returns without running the kernel
// (the outputs are left as they were). g_launch_log keeps every launch's grid either way, and
// g_oversized_launches counts the grids over the CUDA limits (run or not).
inline bool g_dry_launches = false;
inline std::vector<dim3> g_launch_log;
inline int g_oversized_launches = 0;

// The kernel call of the launch being run, type-erased for the fiber entry point.
inline thread_local void (*tl_body)(void*) = nullptr;
inline thread_local void* tl_body_arg = nullptr;

inline void fiber_entry() {
  tl_body(tl_body_arg);
  current_thread().finished = true;
}  // returns to the launcher through uc_link

// Runs kernel<<<grid, block, shared_bytes>>>(args...) to completion.
template <typename... Params, typename... Args>
void launch_with_shared(dim3 grid, dim3 block, size_t shared_bytes, void (*kernel)(Params...), Args... args) {
  g_launch_log.push_back(grid);
  const int threads = static_cast<int>(block.x * block.y * block.z);
  if (!grid_fits(grid) || threads < 1 || threads > static_cast<int>(kMaxBlockThreads)) {
    ++g_oversized_launches;
    if (g_dry_launches) return;
    std::fprintf(stderr,
                 "cvt_fast emulation: launch of grid (%u, %u, %u), block of %d threads is over the CUDA limits "
                 "(grid x <= 2^31 - 1, y and z <= 65535, at most 1024 threads per block)\n",
                 grid.x, grid.y, grid.z, threads);
    std::abort();
  }
  if (g_dry_launches) return;
  g_grid_dim = grid;
  g_block_dim = block;
  auto body = [&] { kernel(static_cast<Params>(args)...); };
  tl_body = [](void* call) { (*static_cast<decltype(body)*>(call))(); };
  tl_body_arg = &body;
  std::vector<std::unique_ptr<char[]>> stacks;
  for (int t = 0; t < threads; ++t) stacks.emplace_back(new char[kFiberStackBytes]);
  Scheduler* const outer = tl_scheduler;
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        BlockContext context(threads, shared_bytes);
        Scheduler scheduler;
        scheduler.block_idx = dim3(bx, by, bz);
        scheduler.threads.resize(threads);
        for (int t = 0; t < threads; ++t) {
          ThreadState& thread = scheduler.threads[t];
          thread.linear_tid = t;
          thread.thread_idx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
          getcontext(&thread.context);
          thread.context.uc_stack.ss_sp = stacks[t].get();
          thread.context.uc_stack.ss_size = kFiberStackBytes;
          thread.context.uc_link = &scheduler.launcher;
          makecontext(&thread.context, &fiber_entry, 0);
          scheduler.runnable.push_back(t);
        }
        tl_block = &context;
        tl_scheduler = &scheduler;
        while (!scheduler.runnable.empty()) {
          scheduler.current = scheduler.runnable.front();
          scheduler.runnable.pop_front();
          swapcontext(&scheduler.launcher, &scheduler.threads[scheduler.current].context);
        }
        for (const ThreadState& thread : scheduler.threads) {
          if (!thread.finished) {
            std::fprintf(stderr,
                         "cvt_fast emulation: deadlock in block (%u, %u, %u): thread %d waits at a barrier or warp "
                         "collective that other threads of its block or warp never reach\n",
                         bx, by, bz, thread.linear_tid);
            std::abort();
          }
        }
        tl_scheduler = outer;
        tl_block = nullptr;
      }
    }
  }
}

// Runs kernel<<<grid, block>>>(args...) to completion.
template <typename... Params, typename... Args>
void launch(dim3 grid, dim3 block, void (*kernel)(Params...), Args... args) {
  launch_with_shared(grid, block, 0, kernel, args...);
}

inline int linear_tid() { return current_thread().linear_tid; }
inline int lane_id() { return linear_tid() % kWarpSize; }

// cp.async, as one emulated thread issues it (ptx_on_host.h and conv_proj.cu both use these):
// "poison at issue, land at wait". The 16 destination bytes become 0xFF (NaN in fp16, bf16 and
// fp32) when the copy is issued; src_bytes bytes of the source (and zeros after them) arrive only
// when a wait_group of the *issuing* thread retires the copy's group. The queues are per emulated
// thread (ThreadState), not thread_local: every thread of a block is a fiber on one OS thread, so a
// thread_local queue would be shared by the block, and one warp's wait would land the copies of a
// warp that never waited. Here a thread that reads a buffer before its own copies were waited for
// (or another thread's, without the barrier after that thread's wait) reads NaN.
inline void cp_async_issue(void* dst, const void* src, int src_bytes) {
  std::memset(dst, 0xFF, kCpAsyncBytes);
  current_thread().open_copies.push_back({dst, src, src_bytes});
}

inline void cp_async_commit_group() {
  ThreadState& thread = current_thread();
  thread.committed_copies.push_back(std::move(thread.open_copies));
  thread.open_copies.clear();
}

// cp.async.wait_group pending: retires this thread's groups until at most `pending` remain.
inline void cp_async_wait_groups(int pending) {
  auto& groups = current_thread().committed_copies;
  while (static_cast<int>(groups.size()) > pending) {
    for (const PendingCopy& copy : groups.front()) {
      if (copy.src_bytes > 0) std::memcpy(copy.dst, copy.src, copy.src_bytes);
      std::memset(static_cast<char*>(copy.dst) + copy.src_bytes, 0, kCpAsyncBytes - copy.src_bytes);
    }
    groups.pop_front();
  }
}

// Posts `count` 64-bit words of this lane, waits for the whole warp, and returns the warp's slot set
// (valid until this lane's next warp-collective operation). See WarpExchange.
inline const uint64_t (*warp_exchange(const uint64_t* words, int count))[WarpExchange::kWords] {
  ThreadState& thread = current_thread();
  const int warp = thread.linear_tid / kWarpSize;
  auto& set = tl_block->exchange[warp].slot[thread.exchange_parity];
  thread.exchange_parity ^= 1;
  std::copy(words, words + count, set[thread.linear_tid % kWarpSize]);
  tl_block->warp_barriers[warp].arrive_and_wait();
  return set;
}

}  // namespace cvt_emu

#define threadIdx (cvt_emu::current_thread().thread_idx)
#define blockIdx (cvt_emu::tl_scheduler->block_idx)
#define blockDim (cvt_emu::g_block_dim)
#define gridDim (cvt_emu::g_grid_dim)

inline void __syncthreads() { cvt_emu::tl_block->block_barrier.arrive_and_wait(); }

// The value of lane (this lane ^ lane_mask); any 4-byte type.
template <typename T>
inline T __shfl_xor_sync(unsigned /*mask*/, T value, int lane_mask) {
  static_assert(sizeof(T) == 4, "the emulation shuffles 4-byte values");
  uint64_t word = 0;
  std::memcpy(&word, &value, sizeof(T));
  const auto slots = cvt_emu::warp_exchange(&word, 1);
  T other;
  std::memcpy(&other, &slots[cvt_emu::lane_id() ^ lane_mask][0], sizeof(T));
  return other;
}

inline void __syncwarp(unsigned /*mask*/ = 0xffffffffu) {
  cvt_emu::tl_block->warp_barriers[cvt_emu::linear_tid() / cvt_emu::kWarpSize].arrive_and_wait();
}

inline float __expf(float x) { return std::exp(x); }

// 16-bit types: the c10 ones hold the same bits and round the same way.
using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;
inline __half __float2half(float x) { return c10::Half(x); }
inline __nv_bfloat16 __float2bfloat16(float x) { return c10::BFloat16(x); }


using std::max;
using std::min;
