// Host emulation of csrc/attention_fwd.cu with the production grid and block shapes.
#define CVT_FAST_HOST_EMULATION
#include "../attention_fwd.cu"
#include "emulate_common.h"

#include <type_traits>

extern "C" void emu_attention_forward(int dtype, int head_dim, const void* q, const void* k, const void* v,
                                      void* out, float* lse, int batch, int n_q, int n_kv, int n_heads,
                                      const int64_t* strides /* q, k, v: batch, token, head */, float scale,
                                      int tensor_cores) {
  using namespace cvt_fast;
  cvt_emu::with_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    cvt_emu::with_head_dim(head_dim, [&](auto dim) {
      constexpr int D = decltype(dim)::value;
      if constexpr (!std::is_same_v<scalar_t, float>) {
        if (tensor_cores) {
          const dim3 grid(static_cast<unsigned>(ceil_div(n_q, kTcBlockM)), n_heads, batch);
          cvt_emu::launch(grid, dim3(kTcThreads), &attention_fwd_tc_kernel<scalar_t, D>,
                          static_cast<const scalar_t*>(q), static_cast<const scalar_t*>(k),
                          static_cast<const scalar_t*>(v), static_cast<scalar_t*>(out), lse, n_q, n_kv, n_heads,
                          strides[0], strides[1], strides[2], strides[3], strides[4], strides[5], strides[6],
                          strides[7], strides[8], scale);
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
}
