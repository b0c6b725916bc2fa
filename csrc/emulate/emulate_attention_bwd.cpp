// Host emulation of csrc/attention_bwd.cu with the production grid and block shapes.
#define CVT_FAST_HOST_EMULATION
#include "../attention_bwd.cu"
#include "emulate_common.h"

#include <type_traits>

extern "C" void emu_attention_backward(int dtype, int head_dim, const void* grad_out, const void* q, const void* k,
                                       const void* v, const void* out, const float* lse, float* delta, void* dq,
                                       void* dk, void* dv, int batch, int n_q, int n_kv, int n_heads,
                                       const int64_t* strides /* q, k, v: batch, token, head */, float scale,
                                       int tensor_cores) {
  using namespace cvt_fast;
  cvt_emu::with_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    cvt_emu::with_head_dim(head_dim, [&](auto dim) {
      constexpr int D = decltype(dim)::value;
      if constexpr (!std::is_same_v<scalar_t, float>) {
        if (tensor_cores) {
          const dim3 grid_q(static_cast<unsigned>(ceil_div(n_q, kTcBwdRows)), n_heads, batch);
          cvt_emu::launch(grid_q, dim3(kTcBwdThreads), &attention_bwd_dq_tc_kernel<scalar_t, D>,
                          static_cast<const scalar_t*>(grad_out), static_cast<const scalar_t*>(q),
                          static_cast<const scalar_t*>(k), static_cast<const scalar_t*>(v),
                          static_cast<const scalar_t*>(out), lse, delta, static_cast<scalar_t*>(dq), n_q, n_kv,
                          n_heads, strides[0], strides[1], strides[2], strides[3], strides[4], strides[5],
                          strides[6], strides[7], strides[8], scale);
          const dim3 grid_kv(static_cast<unsigned>(ceil_div(n_kv, kTcBwdRows)), n_heads, batch);
          cvt_emu::launch(grid_kv, dim3(kTcBwdThreads), &attention_bwd_dkdv_tc_kernel<scalar_t, D>,
                          static_cast<const scalar_t*>(grad_out), static_cast<const scalar_t*>(q),
                          static_cast<const scalar_t*>(k), static_cast<const scalar_t*>(v),
                          static_cast<const float*>(lse), static_cast<const float*>(delta),
                          static_cast<scalar_t*>(dk), static_cast<scalar_t*>(dv), n_q, n_kv, n_heads, strides[0],
                          strides[1], strides[2], strides[3], strides[4], strides[5], strides[6], strides[7],
                          strides[8], scale);
          return;
        }
      }
      const dim3 block(RowSplit<D>::kThreads);
      const dim3 grid_q(static_cast<unsigned>(ceil_div(n_q, kRowsPerBlock)), n_heads, batch);
      cvt_emu::launch(grid_q, block, &attention_bwd_dq_kernel<scalar_t, D>, static_cast<const scalar_t*>(grad_out),
                      static_cast<const scalar_t*>(q), static_cast<const scalar_t*>(k),
                      static_cast<const scalar_t*>(v), static_cast<const scalar_t*>(out), lse, delta,
                      static_cast<scalar_t*>(dq), n_q, n_kv, n_heads, strides[0], strides[1], strides[2],
                      strides[3], strides[4], strides[5], strides[6], strides[7], strides[8], scale);
      const dim3 grid_kv(static_cast<unsigned>(ceil_div(n_kv, kRowsPerBlock)), n_heads, batch);
      cvt_emu::launch(grid_kv, block, &attention_bwd_dkdv_kernel<scalar_t, D>,
                      static_cast<const scalar_t*>(grad_out), static_cast<const scalar_t*>(q),
                      static_cast<const scalar_t*>(k), static_cast<const scalar_t*>(v),
                      static_cast<const float*>(lse), static_cast<const float*>(delta), static_cast<scalar_t*>(dk),
                      static_cast<scalar_t*>(dv), n_q, n_kv, n_heads, strides[0], strides[1], strides[2],
                      strides[3], strides[4], strides[5], strides[6], strides[7], strides[8], scale);
    });
  });
}
