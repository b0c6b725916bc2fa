// Host emulation of csrc/attention_bwd.cu with the production grid, block and shared-memory
// shapes, choosing and sequencing the kernels as the host launcher does.
#define CVT_FAST_HOST_EMULATION
#include "../attention_bwd.cu"
#include "emulate_common.h"

#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

// The wrapper's choice (plan_attention_backward, shared with attention_bwd.cu's host side) for
// grad_out, out, lse, dq, dk, dv contiguous and q, k, v with the given strides.
cvt_fast::BwdPlan emulated_plan(const void* grad_out, const void* q, const void* k, const void* v, const void* out,
                                const void* dq, const void* dk, const void* dv, int batch, int n_q, int n_kv,
                                int n_heads, int head_dim, const int64_t* strides, float scale, int tensor_cores,
                                int deterministic, int dtype) {
  using cvt_fast::RowsView;
  const int64_t b = batch, nq = n_q, nkv = n_kv, h = n_heads, d = head_dim;
  const RowsView qv{q, {b, nq, h}, {strides[0], strides[1], strides[2]}};
  const RowsView kv{k, {b, nkv, h}, {strides[3], strides[4], strides[5]}};
  const RowsView vv{v, {b, nkv, h}, {strides[6], strides[7], strides[8]}};
  auto contiguous = [&](const void* base, int64_t n) { return RowsView{base, {b, n, h}, {n * h * d, h * d, d}}; };
  // As attention_use_tensor_cores on sm_80+: 16-bit dtypes and scale >= 0 (its q/k/v row check is in the plan).
  const bool allowed = tensor_cores && dtype != 0 && scale >= 0.0f;
  return cvt_fast::plan_attention_backward(allowed, deterministic != 0, qv, kv, vv, contiguous(grad_out, nq),
                                           contiguous(out, nq), contiguous(dq, nq), contiguous(dk, nkv),
                                           contiguous(dv, nkv));
}

}  // namespace

// The plan alone, for tests of the choice at any alignment (bit 0: tensor cores, bit 1: grad_out
// copied, bit 2: out copied).
extern "C" int emu_attention_backward_plan(int dtype, int head_dim, const void* grad_out, const void* q,
                                           const void* k, const void* v, const void* out, const void* dq,
                                           const void* dk, const void* dv, int batch, int n_q, int n_kv,
                                           int n_heads, const int64_t* strides, float scale, int tensor_cores,
                                           int deterministic) {
  const cvt_fast::BwdPlan plan = emulated_plan(grad_out, q, k, v, out, dq, dk, dv, batch, n_q, n_kv, n_heads,
                                               head_dim, strides, scale, tensor_cores, deterministic, dtype);
  return (plan.tensor_cores ? 1 : 0) | (plan.copy_grad_out ? 2 : 0) | (plan.copy_out ? 4 : 0);
}

// grad_out, out, lse contiguous (grad_out and out at any alignment, as the wrapper's .contiguous()
// leaves them). tensor_cores: 1 = as on sm_80+, 0 = as with CVT_FAST_CUDA_ATTENTION=simt;
// deterministic: as torch.use_deterministic_algorithms(True). Returns 1 when the tensor-core kernels ran.
extern "C" int emu_attention_backward(int dtype, int head_dim, const void* grad_out, const void* q, const void* k,
                                      const void* v, const void* out, const float* lse, void* dq, void* dk,
                                      void* dv, int batch, int n_q, int n_kv, int n_heads,
                                      const int64_t* strides /* q, k, v: batch, token, head */, float scale,
                                      int tensor_cores, int deterministic) {
  using namespace cvt_fast;
  const BwdPlan plan = emulated_plan(grad_out, q, k, v, out, dq, dk, dv, batch, n_q, n_kv, n_heads, head_dim,
                                     strides, scale, tensor_cores, deterministic, dtype);
  const bool dq_by_reductions = n_kv > kBwdBlockN;
  const bool use_tc = plan.tensor_cores;
  // The wrapper's copies: fresh 16-byte aligned buffers (uint4 is alignas(16)).
  const size_t row_bytes = static_cast<size_t>(batch) * n_q * n_heads * head_dim * (dtype == 0 ? 4 : 2);
  std::vector<uint4> grad_out_copy, out_copy;
  if (plan.copy_grad_out) {
    grad_out_copy.resize(row_bytes / sizeof(uint4) + 1);
    std::memcpy(grad_out_copy.data(), grad_out, row_bytes);
    grad_out = grad_out_copy.data();
  }
  if (plan.copy_out) {
    out_copy.resize(row_bytes / sizeof(uint4) + 1);
    std::memcpy(out_copy.data(), out, row_bytes);
    out = out_copy.data();
  }
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
