// Host emulation of csrc/attention_bwd.cu with the production grid, block and shared-memory
// shapes, choosing and sequencing the kernels as the host launcher does.
#define CVT_FAST_HOST_EMULATION
#include "../attention_bwd.cu"
#include "emulate_common.h"

#include <cmath>
#include <type_traits>
#include <vector>

// grad_out, out, lse contiguous. tensor_cores: 1 = as on sm_80+, 0 = as with
// CVT_FAST_CUDA_ATTENTION=simt; deterministic: as torch.use_deterministic_algorithms(True).
// Returns 1 when the tensor-core kernels ran.
extern "C" int emu_attention_backward(int dtype, int head_dim, const void* grad_out, const void* q, const void* k,
                                      const void* v, const void* out, const float* lse, void* dq, void* dk,
                                      void* dv, int batch, int n_q, int n_kv, int n_heads,
                                      const int64_t* strides /* q, k, v: batch, token, head */, float scale,
                                      int tensor_cores, int deterministic) {
  using namespace cvt_fast;
  const int64_t q_sizes[3] = {batch, n_q, n_heads};
  const int64_t kv_sizes[3] = {batch, n_kv, n_heads};
  const bool aligned = rows_are_16_byte_aligned(q, q_sizes, {strides[0], strides[1], strides[2]}) &&
                       rows_are_16_byte_aligned(k, kv_sizes, {strides[3], strides[4], strides[5]}) &&
                       rows_are_16_byte_aligned(v, kv_sizes, {strides[6], strides[7], strides[8]});
  const bool dq_by_reductions = n_kv > kBwdBlockN;
  const bool use_tc = tensor_cores && aligned && scale >= 0.0f && !(dq_by_reductions && deterministic);
  int ran_tensor_cores = 0;
  cvt_emu::with_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    cvt_emu::with_head_dim(head_dim, [&](auto dim) {
      constexpr int D = decltype(dim)::value;
      const auto* go = static_cast<const scalar_t*>(grad_out);
      const auto* qq = static_cast<const scalar_t*>(q);
      const auto* kk = static_cast<const scalar_t*>(k);
      const auto* vv = static_cast<const scalar_t*>(v);
      if constexpr (!std::is_same_v<scalar_t, float>) {
        if (use_tc) {
          using Tile = BwdTile<D>;
          const int n_q_pad = static_cast<int>(ceil_div(n_q, Tile::kBlockM) * Tile::kBlockM);
          const size_t stats = static_cast<size_t>(batch) * n_heads * n_q_pad;
          std::vector<float> lse2(stats, NAN), delta(stats, NAN);
          std::vector<float> dq_accum(dq_by_reductions ? stats * D : 0, NAN);
          float* dq_accum_ptr = dq_by_reductions ? dq_accum.data() : nullptr;
          constexpr int kPrepRows = 128 / (D / 8);
          cvt_emu::launch(dim3(static_cast<unsigned>(ceil_div(static_cast<int64_t>(stats), kPrepRows))), dim3(128),
                          &attention_bwd_prep_kernel<scalar_t, D>, go, static_cast<const scalar_t*>(out), lse,
                          lse2.data(), delta.data(), dq_accum_ptr, batch, n_q, n_heads, n_q_pad);
          const dim3 grid(static_cast<unsigned>(ceil_div(n_kv, Tile::kBlockN)), n_heads, batch);
          cvt_emu::launch_with_shared(grid, dim3(Tile::kThreads), Tile::kSmemBytes,
                                      &attention_bwd_tc_kernel<scalar_t, D>, go, qq, kk, vv,
                                      static_cast<const float*>(lse2.data()), static_cast<const float*>(delta.data()),
                                      dq_accum_ptr, static_cast<scalar_t*>(dq), static_cast<scalar_t*>(dk),
                                      static_cast<scalar_t*>(dv), n_q, n_kv, n_heads, n_q_pad, strides[0],
                                      strides[1], strides[2], strides[3], strides[4], strides[5], strides[6],
                                      strides[7], strides[8], scale * kLog2e, scale);
          if (dq_by_reductions) {
            const int64_t chunks = static_cast<int64_t>(batch) * n_q * n_heads * (D / 8);
            cvt_emu::launch(dim3(static_cast<unsigned>(ceil_div(chunks, 128))), dim3(128),
                            &attention_bwd_dq_convert_kernel<scalar_t, D>, static_cast<const float*>(dq_accum_ptr),
                            static_cast<scalar_t*>(dq), batch, n_q, n_heads, n_q_pad, scale);
          }
          ran_tensor_cores = 1;
          return;
        }
      }
      std::vector<float> delta(static_cast<size_t>(batch) * n_heads * n_q, NAN);
      const dim3 block(RowSplit<D>::kThreads);
      const dim3 grid_q(static_cast<unsigned>(ceil_div(n_q, kRowsPerBlock)), n_heads, batch);
      cvt_emu::launch(grid_q, block, &attention_bwd_dq_kernel<scalar_t, D>, go, qq, kk, vv,
                      static_cast<const scalar_t*>(out), lse, delta.data(), static_cast<scalar_t*>(dq), n_q, n_kv,
                      n_heads, strides[0], strides[1], strides[2], strides[3], strides[4], strides[5], strides[6],
                      strides[7], strides[8], scale);
      const dim3 grid_kv(static_cast<unsigned>(ceil_div(n_kv, kRowsPerBlock)), n_heads, batch);
      cvt_emu::launch(grid_kv, block, &attention_bwd_dkdv_kernel<scalar_t, D>, go, qq, kk, vv, lse,
                      static_cast<const float*>(delta.data()), static_cast<scalar_t*>(dk), static_cast<scalar_t*>(dv),
                      n_q, n_kv, n_heads, strides[0], strides[1], strides[2], strides[3], strides[4], strides[5],
                      strides[6], strides[7], strides[8], scale);
    });
  });
  return ran_tensor_cores;
}
