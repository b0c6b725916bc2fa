// Attention backward (flash-style: the scores are recomputed tile by tile from q, k and the
// saved lse; no Nq x Nkv matrix in memory). With s_ij = scale * q_i . k_j,
// p_ij = exp(s_ij - lse_i), dO = grad_out and delta_i = dO_i . O_i (= sum_j p_ij dp_ij):
//   dv_j = sum_i p_ij dO_i
//   dp_ij = dO_i . v_j,   ds_ij = p_ij (dp_ij - delta_i)
//   dq_i = scale * sum_j ds_ij k_j,   dk_j = scale * sum_i ds_ij q_i
// Inputs as in the forward (q, k, v strided, last dim contiguous); grad_out and out are
// (B, Nq, H*D) (made contiguous by the wrapper), lse (B, H, Nq) fp32. Outputs dq, dk, dv
// are contiguous with the shapes of q, k, v and their dtype; all math in fp32.
//
// Two kernels, no atomics (deterministic), same row split as the forward (a row belongs
// to D/32 consecutive lanes, each owning 32 interleaved dims; dot products are per-lane
// partials summed with shuffles):
//   1. dq kernel: one block per (64-row query tile, head, batch). Registers per lane: q,
//      dO and the dq accumulator (32 dims each), lse_i, delta_i. delta_i = dO_i . O_i is
//      computed here from the saved output and written to a (B, H, Nq) fp32 buffer for
//      kernel 2. Loops over K/V tiles of 32 keys held in shared memory (fp32, 32 KB at D=128).
//   2. dk/dv kernel: one block per (64-row key tile, head, batch). Registers per lane: k,
//      v and the dk, dv accumulators (32 dims each). Loops over query tiles of 32 rows whose
//      q, dO (fp32) and lse, delta sit in shared memory.
//   Masks: rows past Nq / Nkv hold zeros, the inner loops stop at the last real row of a
//   tile, and nothing is stored for rows that do not exist.
// Floor: kernel 1 does 3 products per (i, j) pair (s, dp, dq) and kernel 2 does 4 (s, dv, dp,
// dk): 7 * 2*B*H*Nq*Nkv*D FLOPs on the fp32 CUDA cores. DRAM: q, k, v, dO, O, dq, dk, dv once
// each plus lse and delta (K/V and q/dO tiles are re-read from L2 once per block).

#include "common.cuh"

namespace cvt_fast {
namespace {

constexpr int kRowsPerBlock = 64;  // rows a block owns (queries in kernel 1, keys in kernel 2)
constexpr int kTileRows = 32;      // rows of the streamed operand per shared-memory tile
constexpr int kDimsPerLane = 32;
constexpr int kChunks = kDimsPerLane / 4;

template <int D>
struct RowSplit {
  static_assert(D == 32 || D == 64 || D == 128, "head_dim must be 32, 64 or 128");
  static constexpr int kThreadsPerRow = D / kDimsPerLane;
  static constexpr int kThreads = kRowsPerBlock * kThreadsPerRow;
  static __device__ __forceinline__ int chunk_dim(int c, int part) { return 4 * (c * kThreadsPerRow + part); }
};

// Loads the 32 dims a lane owns of one row (zeros when the row does not exist).
template <typename scalar_t, int D>
__device__ __forceinline__ void load_row(float (&dst)[kDimsPerLane], const scalar_t* row, bool valid, int part) {
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      dst[c * 4 + e] = valid ? to_float(row[RowSplit<D>::chunk_dim(c, part) + e]) : 0.0f;
    }
  }
}

template <typename scalar_t, int D>
__device__ __forceinline__ void store_row(scalar_t* row, const float (&src)[kDimsPerLane], float factor, int part) {
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      row[RowSplit<D>::chunk_dim(c, part) + e] = from_float<scalar_t>(src[c * 4 + e] * factor);
    }
  }
}

// Partial dot product of a lane's 32 dims with a shared-memory row (fp32, 16-byte aligned).
template <int D>
__device__ __forceinline__ float partial_dot(const float (&reg)[kDimsPerLane], const float* smem_row, int part) {
  float sum = 0.0f;
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const float4 t = *reinterpret_cast<const float4*>(smem_row + RowSplit<D>::chunk_dim(c, part));
    sum += reg[c * 4 + 0] * t.x + reg[c * 4 + 1] * t.y + reg[c * 4 + 2] * t.z + reg[c * 4 + 3] * t.w;
  }
  return sum;
}

// acc += factor * smem_row (on a lane's 32 dims).
template <int D>
__device__ __forceinline__ void axpy(float (&acc)[kDimsPerLane], float factor, const float* smem_row, int part) {
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const float4 t = *reinterpret_cast<const float4*>(smem_row + RowSplit<D>::chunk_dim(c, part));
    acc[c * 4 + 0] += factor * t.x;
    acc[c * 4 + 1] += factor * t.y;
    acc[c * 4 + 2] += factor * t.z;
    acc[c * 4 + 3] += factor * t.w;
  }
}

// Kernel 1: dq (and delta). Grid (ceil(Nq/64), H, B).
template <typename scalar_t, int D>
__global__ void __launch_bounds__(RowSplit<D>::kThreads)
attention_bwd_dq_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ q,
                        const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                        const scalar_t* __restrict__ out, const float* __restrict__ lse,
                        float* __restrict__ delta, scalar_t* __restrict__ dq, int n_q, int n_kv, int n_heads,
                        int64_t q_sb, int64_t q_sn, int64_t q_sh, int64_t k_sb, int64_t k_sn, int64_t k_sh,
                        int64_t v_sb, int64_t v_sn, int64_t v_sh, float scale) {
  using Split = RowSplit<D>;
  constexpr int kTpr = Split::kThreadsPerRow;
  constexpr int kThreads = Split::kThreads;

  __shared__ __align__(16) float k_tile[kTileRows][D];
  __shared__ __align__(16) float v_tile[kTileRows][D];

  const int tid = threadIdx.x;
  const int row = tid / kTpr;
  const int part = tid % kTpr;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int i = blockIdx.x * kRowsPerBlock + row;
  const bool row_valid = i < n_q;
  const int i_safe = row_valid ? i : 0;

  float q_reg[kDimsPerLane], do_reg[kDimsPerLane], dq_acc[kDimsPerLane];
  load_row<scalar_t, D>(q_reg, q + b * q_sb + static_cast<int64_t>(i_safe) * q_sn + h * q_sh, row_valid, part);
  // grad_out and out are contiguous (B, Nq, H*D).
  const int64_t o_offset =
      (static_cast<int64_t>(b) * n_q + i_safe) * (static_cast<int64_t>(n_heads) * D) + static_cast<int64_t>(h) * D;
  load_row<scalar_t, D>(do_reg, grad_out + o_offset, row_valid, part);
  float delta_i;
  {
    float o_reg[kDimsPerLane];
    load_row<scalar_t, D>(o_reg, out + o_offset, row_valid, part);
    float partial = 0.0f;
#pragma unroll
    for (int t = 0; t < kDimsPerLane; ++t) partial += do_reg[t] * o_reg[t];
    delta_i = group_sum<kTpr>(partial);
  }
  const int64_t stat_index = (static_cast<int64_t>(b) * n_heads + h) * n_q + i_safe;
  const float lse_i = row_valid ? lse[stat_index] : 0.0f;
  if (row_valid && part == 0) delta[stat_index] = delta_i;
#pragma unroll
  for (int t = 0; t < kDimsPerLane; ++t) dq_acc[t] = 0.0f;

  const scalar_t* k_head = k + b * k_sb + h * k_sh;
  const scalar_t* v_head = v + b * v_sb + h * v_sh;
  for (int n0 = 0; n0 < n_kv; n0 += kTileRows) {
    __syncthreads();  // every lane is done with the previous tile
    for (int idx = tid; idx < kTileRows * D; idx += kThreads) {
      const int j = idx / D;
      const int d = idx % D;
      const int n = n0 + j;
      const bool key_valid = n < n_kv;
      k_tile[j][d] = key_valid ? to_float(k_head[static_cast<int64_t>(n) * k_sn + d]) : 0.0f;
      v_tile[j][d] = key_valid ? to_float(v_head[static_cast<int64_t>(n) * v_sn + d]) : 0.0f;
    }
    __syncthreads();
    const int keys = min(kTileRows, n_kv - n0);  // same for the whole block: shuffles stay converged
    for (int j = 0; j < keys; ++j) {
      const float s = scale * group_sum<kTpr>(partial_dot<D>(q_reg, k_tile[j], part));
      const float p = __expf(s - lse_i);
      const float dp = group_sum<kTpr>(partial_dot<D>(do_reg, v_tile[j], part));
      axpy<D>(dq_acc, p * (dp - delta_i), k_tile[j], part);
    }
  }
  if (row_valid) {
    store_row<scalar_t, D>(dq + ((static_cast<int64_t>(b) * n_q + i) * n_heads + h) * D, dq_acc, scale, part);
  }
}

// Kernel 2: dk and dv. Grid (ceil(Nkv/64), H, B). Runs after kernel 1 (needs delta).
template <typename scalar_t, int D>
__global__ void __launch_bounds__(RowSplit<D>::kThreads)
attention_bwd_dkdv_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ q,
                          const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                          const float* __restrict__ lse, const float* __restrict__ delta,
                          scalar_t* __restrict__ dk, scalar_t* __restrict__ dv, int n_q, int n_kv, int n_heads,
                          int64_t q_sb, int64_t q_sn, int64_t q_sh, int64_t k_sb, int64_t k_sn, int64_t k_sh,
                          int64_t v_sb, int64_t v_sn, int64_t v_sh, float scale) {
  using Split = RowSplit<D>;
  constexpr int kTpr = Split::kThreadsPerRow;
  constexpr int kThreads = Split::kThreads;

  __shared__ __align__(16) float q_tile[kTileRows][D];
  __shared__ __align__(16) float do_tile[kTileRows][D];
  __shared__ float lse_tile[kTileRows];
  __shared__ float delta_tile[kTileRows];

  const int tid = threadIdx.x;
  const int row = tid / kTpr;
  const int part = tid % kTpr;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int j = blockIdx.x * kRowsPerBlock + row;
  const bool row_valid = j < n_kv;
  const int j_safe = row_valid ? j : 0;

  float k_reg[kDimsPerLane], v_reg[kDimsPerLane], dk_acc[kDimsPerLane], dv_acc[kDimsPerLane];
  load_row<scalar_t, D>(k_reg, k + b * k_sb + static_cast<int64_t>(j_safe) * k_sn + h * k_sh, row_valid, part);
  load_row<scalar_t, D>(v_reg, v + b * v_sb + static_cast<int64_t>(j_safe) * v_sn + h * v_sh, row_valid, part);
#pragma unroll
  for (int t = 0; t < kDimsPerLane; ++t) {
    dk_acc[t] = 0.0f;
    dv_acc[t] = 0.0f;
  }

  const scalar_t* q_head = q + b * q_sb + h * q_sh;
  const int64_t o_row_stride = static_cast<int64_t>(n_heads) * D;
  const scalar_t* do_head = grad_out + static_cast<int64_t>(b) * n_q * o_row_stride + static_cast<int64_t>(h) * D;
  const int64_t stat_head = (static_cast<int64_t>(b) * n_heads + h) * n_q;
  for (int m0 = 0; m0 < n_q; m0 += kTileRows) {
    __syncthreads();  // every lane is done with the previous tile
    for (int idx = tid; idx < kTileRows * D; idx += kThreads) {
      const int r = idx / D;
      const int d = idx % D;
      const int m = m0 + r;
      const bool query_valid = m < n_q;
      q_tile[r][d] = query_valid ? to_float(q_head[static_cast<int64_t>(m) * q_sn + d]) : 0.0f;
      do_tile[r][d] = query_valid ? to_float(do_head[static_cast<int64_t>(m) * o_row_stride + d]) : 0.0f;
    }
    for (int r = tid; r < kTileRows; r += kThreads) {
      const int m = m0 + r;
      lse_tile[r] = m < n_q ? lse[stat_head + m] : 0.0f;
      delta_tile[r] = m < n_q ? delta[stat_head + m] : 0.0f;
    }
    __syncthreads();
    const int queries = min(kTileRows, n_q - m0);  // same for the whole block: shuffles stay converged
    for (int r = 0; r < queries; ++r) {
      const float s = scale * group_sum<kTpr>(partial_dot<D>(k_reg, q_tile[r], part));
      const float p = __expf(s - lse_tile[r]);
      axpy<D>(dv_acc, p, do_tile[r], part);
      const float dp = group_sum<kTpr>(partial_dot<D>(v_reg, do_tile[r], part));
      axpy<D>(dk_acc, p * (dp - delta_tile[r]), q_tile[r], part);
    }
  }
  if (row_valid) {
    const int64_t offset = ((static_cast<int64_t>(b) * n_kv + j) * n_heads + h) * D;
    store_row<scalar_t, D>(dk + offset, dk_acc, scale, part);
    store_row<scalar_t, D>(dv + offset, dv_acc, 1.0f, part);
  }
}

}  // namespace
}  // namespace cvt_fast

// ---------------------------------------------------------------- host side (launch, checks)
// Left out when csrc/emulate/ compiles the kernels above for a CPU emulation of the GPU.
#ifndef CVT_FAST_HOST_EMULATION
#include <vector>

#include "ops.h"

namespace cvt_fast {
namespace {

template <typename scalar_t, int D>
void launch_attention_bwd(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                          const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, at::Tensor& delta,
                          at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, float scale) {
  const int batch = static_cast<int>(q.size(0));
  const int n_q = static_cast<int>(q.size(1));
  const int n_heads = static_cast<int>(q.size(2));
  const int n_kv = static_cast<int>(k.size(1));
  const dim3 block(RowSplit<D>::kThreads);
  auto stream = c10::cuda::getCurrentCUDAStream();

  const dim3 grid_q(static_cast<unsigned>(ceil_div(n_q, kRowsPerBlock)), n_heads, batch);
  attention_bwd_dq_kernel<scalar_t, D><<<grid_q, block, 0, stream>>>(
      grad_out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
      out.data_ptr<scalar_t>(), lse.data_ptr<float>(), delta.data_ptr<float>(), dq.data_ptr<scalar_t>(), n_q, n_kv,
      n_heads, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0),
      v.stride(1), v.stride(2), scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const dim3 grid_kv(static_cast<unsigned>(ceil_div(n_kv, kRowsPerBlock)), n_heads, batch);
  attention_bwd_dkdv_kernel<scalar_t, D><<<grid_kv, block, 0, stream>>>(
      grad_out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
      lse.data_ptr<float>(), delta.data_ptr<float>(), dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(), n_q, n_kv,
      n_heads, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0),
      v.stride(1), v.stride(2), scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, double scale) {
  constexpr const char* kOp = "cvt_fast::attention_backward_cuda";
  check_attention_inputs(kOp, q, k, v, scale);
  const int64_t batch = q.size(0), n_q = q.size(1), n_heads = q.size(2), head_dim = q.size(3);
  const std::vector<int64_t> out_shape{batch, n_q, n_heads * head_dim};
  CVT_CHECK_SAME_DEVICE(kOp, grad_out, q, "grad_out", "q");
  CVT_CHECK_SAME_DEVICE(kOp, out, q, "out", "q");
  CVT_CHECK_SAME_DEVICE(kOp, lse, q, "lse", "q");
  CVT_CHECK_SAME_DTYPE(kOp, grad_out, q, "grad_out", "q");
  CVT_CHECK_SAME_DTYPE(kOp, out, q, "out", "q");
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(out_shape), kOp, ": grad_out must have shape ",
                    at::IntArrayRef(out_shape), " (batch, Nq, heads*head_dim), got ", grad_out.sizes());
  TORCH_CHECK_VALUE(out.sizes() == at::IntArrayRef(out_shape), kOp, ": out must have shape ",
                    at::IntArrayRef(out_shape), " (batch, Nq, heads*head_dim), got ", out.sizes());
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef({batch, n_heads, n_q}), kOp, ": lse must have shape (",
                    batch, ", ", n_heads, ", ", n_q, ") (batch, heads, Nq), got ", lse.sizes());
  TORCH_CHECK_TYPE(lse.scalar_type() == at::kFloat, kOp, ": lse must be float32, got ", lse.scalar_type());

  auto dq = at::empty(q.sizes(), q.options());
  auto dk = at::empty(k.sizes(), k.options());
  auto dv = at::empty(v.sizes(), v.options());
  if (n_q == 0 || batch == 0 || n_heads == 0) {
    // No query rows: nothing attends, so every gradient is zero.
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }

  const c10::cuda::OptionalCUDAGuard guard(q.device());
  const auto grad_out_c = grad_out.contiguous();
  const auto out_c = out.contiguous();
  const auto lse_c = lse.contiguous();
  auto delta = at::empty({batch, n_heads, n_q}, q.options().dtype(at::kFloat));
  CVT_DISPATCH_FLOAT_HALF_BF16(q.scalar_type(), kOp, [&] {
    const float s = static_cast<float>(scale);
    switch (head_dim) {
      case 32: launch_attention_bwd<scalar_t, 32>(grad_out_c, q, k, v, out_c, lse_c, delta, dq, dk, dv, s); break;
      case 64: launch_attention_bwd<scalar_t, 64>(grad_out_c, q, k, v, out_c, lse_c, delta, dq, dk, dv, s); break;
      case 128: launch_attention_bwd<scalar_t, 128>(grad_out_c, q, k, v, out_c, lse_c, delta, dq, dk, dv, s); break;
      default: TORCH_CHECK_VALUE(false, kOp, ": head_dim ", head_dim, " is not supported");
    }
  });
  return {dq, dk, dv};
}

}  // namespace cvt_fast

#endif  // CVT_FAST_HOST_EMULATION
