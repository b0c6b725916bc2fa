// Just enough of CUDA for a host C++ compiler to run the cvt_fast kernels on the CPU, so
// their index math, masks, barriers and warp shuffles are tested on machines without a GPU.
// Not a performance tool and not part of the extension (setup.py compiles csrc/*.cu and
// csrc/*.cpp only; this folder is built by tests/test_cuda_extension.py).
//
// Model: every CUDA thread of a block is an OS thread; blocks run one after another, so a
// `__shared__` array (a function-local static here) belongs to one block at a time.
// __syncthreads is a barrier over the block; __shfl_xor_sync exchanges values through a
// per-warp slot array between two barriers over the warp, so, as on the GPU, every lane of
// the warp must reach it (a divergent shuffle deadlocks here instead of giving garbage).
// Left out: memory alignment, register limits, the cost of anything.
#pragma once

#include <math.h>

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct float4 {
  float x, y, z, w;
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

struct BlockContext {
  explicit BlockContext(int threads) : block_barrier(threads), slots(threads) {
    for (int w = 0; w < (threads + kWarpSize - 1) / kWarpSize; ++w) {
      const int lanes = std::min(kWarpSize, threads - w * kWarpSize);
      warp_barriers.push_back(std::make_unique<std::barrier<>>(lanes));
    }
  }
  std::barrier<> block_barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  std::vector<float> slots;  // one per thread, for shuffles
};

inline thread_local dim3 tl_thread_idx;
inline thread_local dim3 tl_block_idx;
inline thread_local int tl_linear_tid = 0;
inline thread_local BlockContext* tl_block = nullptr;
inline dim3 g_grid_dim;
inline dim3 g_block_dim;

// Runs kernel<<<grid, block>>>(args...) to completion.
template <typename... Params, typename... Args>
void launch(dim3 grid, dim3 block, void (*kernel)(Params...), Args... args) {
  g_grid_dim = grid;
  g_block_dim = block;
  const int threads = static_cast<int>(block.x * block.y * block.z);
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        BlockContext context(threads);
        std::vector<std::thread> workers;
        workers.reserve(threads);
        for (int t = 0; t < threads; ++t) {
          workers.emplace_back([&, t] {
            tl_block = &context;
            tl_linear_tid = t;
            tl_block_idx = dim3(bx, by, bz);
            tl_thread_idx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            kernel(static_cast<Params>(args)...);
          });
        }
        for (auto& worker : workers) worker.join();
      }
    }
  }
}

}  // namespace cvt_emu

#define threadIdx (cvt_emu::tl_thread_idx)
#define blockIdx (cvt_emu::tl_block_idx)
#define blockDim (cvt_emu::g_block_dim)
#define gridDim (cvt_emu::g_grid_dim)

inline void __syncthreads() { cvt_emu::tl_block->block_barrier.arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned /*mask*/, float value, int lane_mask) {
  cvt_emu::BlockContext& block = *cvt_emu::tl_block;
  const int tid = cvt_emu::tl_linear_tid;
  const int warp = tid / cvt_emu::kWarpSize;
  const int lane = tid % cvt_emu::kWarpSize;
  block.slots[tid] = value;
  block.warp_barriers[warp]->arrive_and_wait();
  const float other = block.slots[warp * cvt_emu::kWarpSize + (lane ^ lane_mask)];
  block.warp_barriers[warp]->arrive_and_wait();
  return other;
}

inline void __syncwarp(unsigned /*mask*/ = 0xffffffffu) {
  const int warp = cvt_emu::tl_linear_tid / cvt_emu::kWarpSize;
  cvt_emu::tl_block->warp_barriers[warp]->arrive_and_wait();
}

inline float __expf(float x) { return std::exp(x); }

// 16-bit types: the c10 ones hold the same bits and round the same way.
using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;
inline __half __float2half(float x) { return c10::Half(x); }
inline __nv_bfloat16 __float2bfloat16(float x) { return c10::BFloat16(x); }

// WMMA (m16n16k16 only). Every lane holds the whole 16 x 16 tile (row-major, in fp32), so the
// emulation needs no fragment layout; the kernels never index fragments, only load, store, fill
// and multiply them. Products of 16-bit values are exact in fp32, as on the tensor cores.
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulation knows m16n16k16 only");
  float x[16 * 16];
};

template <typename Use, typename T, typename Layout>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, float value) {
  for (float& e : f.x) e = value;
}

template <typename Use, typename T, typename Layout, typename Element>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const Element* ptr, unsigned ldm) {
  static_assert(std::is_same_v<T, Element>, "fragment and memory element types differ");
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) {
      const Element e = std::is_same_v<Layout, row_major> ? ptr[r * ldm + c] : ptr[c * ldm + r];
      f.x[r * 16 + c] = static_cast<float>(e);
    }
  }
}

inline void store_matrix_sync(float* ptr, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) {
      ptr[layout == mem_row_major ? r * ldm + c : c * ldm + r] = f.x[r * 16 + c];
    }
  }
}

template <typename TA, typename LA, typename TB, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, TB, LB>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
  float result[16 * 16];
  for (int r = 0; r < 16; ++r) {
    for (int n = 0; n < 16; ++n) {
      float sum = c.x[r * 16 + n];
      for (int kk = 0; kk < 16; ++kk) sum += a.x[r * 16 + kk] * b.x[kk * 16 + n];
      result[r * 16 + n] = sum;
    }
  }
  std::copy(result, result + 16 * 16, d.x);
}
}  // namespace wmma
}  // namespace nvcuda

using std::max;
using std::min;
