// Host emulation of csrc/attention_fwd.cu with the production grid, block and shared-memory
// shapes, choosing the kernel as the host launcher does.
#define CVT_FAST_HOST_EMULATION
#include "../attention_fwd.cu"
#include "emulate_common.h"

#include <cmath>
#include <type_traits>

// tensor_cores: 1 = as on sm_80+ (the tensor-core kernel for 16-bit inputs it can take), 0 = as with
// CVT_FAST_CUDA_ATTENTION=simt. Returns 1 when the tensor-core kernel ran.
extern "C" int emu_attention_forward(int dtype, int head_dim, const void* q, const void* k, const void* v,
                                     void* out, float* lse, int batch, int n_q, int n_kv, int n_heads,
                                     const int64_t* strides /* q, k, v: batch, token, head */, float scale,
                                     int tensor_cores) {
  using namespace cvt_fast;
  const int64_t q_sizes[3] = {batch, n_q, n_heads};
  const int64_t kv_sizes[3] = {batch, n_kv, n_heads};
  const bool aligned = rows_are_16_byte_aligned(q, q_sizes, {strides[0], strides[1], strides[2]}) &&
                       rows_are_16_byte_aligned(k, kv_sizes, {strides[3], strides[4], strides[5]}) &&
                       rows_are_16_byte_aligned(v, kv_sizes, {strides[6], strides[7], strides[8]});
  int ran_tensor_cores = 0;
  cvt_emu::with_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    cvt_emu::with_head_dim(head_dim, [&](auto dim) {
      constexpr int D = decltype(dim)::value;
      if constexpr (!std::is_same_v<scalar_t, float>) {
        if (tensor_cores && aligned && scale >= 0.0f) {
          using Tile = FwdTile<D>;
          const dim3 grid(static_cast<unsigned>(ceil_div(n_q, Tile::kBlockM)), n_heads, batch);
          cvt_emu::launch_with_shared(grid, dim3(Tile::kThreads), Tile::kSmemBytes,
                                      &attention_fwd_tc_kernel<scalar_t, D>, static_cast<const scalar_t*>(q),
                                      static_cast<const scalar_t*>(k), static_cast<const scalar_t*>(v),
                                      static_cast<scalar_t*>(out), lse, n_q, n_kv, n_heads, strides[0], strides[1],
                                      strides[2], strides[3], strides[4], strides[5], strides[6], strides[7],
                                      strides[8], scale * kLog2e);
          ran_tensor_cores = 1;
          return;
        }
      }
      const dim3 grid(static_cast<unsigned>(ceil_div(n_q, kBlockM)), n_heads, batch);
      cvt_emu::launch(grid, dim3(RowSplit<D>::kThreads), &attention_fwd_kernel<scalar_t, D>,
                      static_cast<const scalar_t*>(q), static_cast<const scalar_t*>(k),
                      static_cast<const scalar_t*>(v), static_cast<scalar_t*>(out), lse, n_q, n_kv, n_heads,
                      strides[0], strides[1], strides[2], strides[3], strides[4], strides[5], strides[6],
                      strides[7], strides[8], scale);
    });
  });
  return ran_tensor_cores;
}
