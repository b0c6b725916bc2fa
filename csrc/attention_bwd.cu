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

// ---------------------------------------------------------------- tensor-core variants (16-bit)
//
// For float16/bfloat16 on sm_80+ the seven products per (query, key) pair run on the tensor
// cores through WMMA (m16n16k16, fp32 accumulation), with the same two-kernel structure as
// above. The accumulator layout is opaque, so every element-wise step goes through shared
// memory: a warp stores its 16 x 32 score / dp tiles (fp32), lanes l and l^1 take row l/2 of
// them (16 columns each) to form p and ds, write them as 16-bit tiles, and the warp multiplies
// those with the streamed tile. Blocks of 2 warps (32 rows) keep every buffer within the 48 KB
// of static shared memory at D = 128 (45.5 KB and 45.8 KB). p and ds are rounded to 16 bits
// before their products, as in FlashAttention.
//   dq kernel:   rows = 32 queries (16 per warp, q and dO tiles resident), streams K/V tiles of
//                32 keys; S = Q K^T, dP = dO V^T, ds = p (dp - delta), dQ += ds K; delta_i
//                (dO_i . O_i) is computed here and written for the dk/dv kernel.
//   dk/dv kernel: rows = 32 keys (16 per warp, K and V tiles resident), streams q/dO tiles of 32
//                queries; S^T = K Q^T, dP^T = V dO^T, dV += P^T dO, dK += dS^T Q.
// Floor: 7 * 2*B*H*Nq*Nkv*D tensor-core FLOPs, plus the element-wise exp per pair twice.

constexpr int kTcBwdWarps = 2;
constexpr int kTcBwdRows = 16 * kTcBwdWarps;  // rows a block owns
constexpr int kTcBwdTile = 32;                // rows of the streamed operand per tile
constexpr int kTcBwdThreads = 32 * kTcBwdWarps;

// rows x D tile of 16-bit values copied bit for bit into shared memory (row pitch ld), zeros
// for rows >= valid_rows. src points at row 0; rows are row_stride elements apart.
template <typename T, int D>
__device__ __forceinline__ void load_tile16(T* dst, int ld, const T* src, int64_t row_stride, int rows,
                                            int valid_rows, T zero) {
  for (int idx = threadIdx.x; idx < rows * D; idx += kTcBwdThreads) {
    const int r = idx / D;
    const int d = idx % D;
    dst[r * ld + d] = r < valid_rows ? src[static_cast<int64_t>(r) * row_stride + d] : zero;
  }
}

// out[16 x 32] (fp32, ld) = A_rows[16 x D] @ B_rows[32 x D]^T, A and B 16-bit row-major tiles.
template <typename T, int D>
__device__ __forceinline__ void tile_products_abt(float* out, int ld_out, const T* a_rows, const T* b_rows,
                                                  int ld) {
  namespace wmma = nvcuda::wmma;
#pragma unroll
  for (int nb = 0; nb < kTcBwdTile / 16; ++nb) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.0f);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bt;  // row j of B = column j of B^T
      wmma::load_matrix_sync(a, a_rows + kk * 16, ld);
      wmma::load_matrix_sync(bt, b_rows + nb * 16 * ld + kk * 16, ld);
      wmma::mma_sync(acc, a, bt, acc);
    }
    wmma::store_matrix_sync(out + nb * 16, acc, ld_out, wmma::mem_row_major);
  }
}

// acc[dn] += P[16 x 32] @ B[32 x D] (P 16-bit, ld_p; B 16-bit row-major tile, ld).
template <typename T, int D>
__device__ __forceinline__ void tile_accumulate_pb(
    nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> (&acc)[D / 16], const T* p, int ld_p,
    const T* b_rows, int ld) {
  namespace wmma = nvcuda::wmma;
#pragma unroll
  for (int kb = 0; kb < kTcBwdTile / 16; ++kb) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
    wmma::load_matrix_sync(a, p + kb * 16, ld_p);
#pragma unroll
    for (int dn = 0; dn < D / 16; ++dn) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
      wmma::load_matrix_sync(b, b_rows + kb * 16 * ld + dn * 16, ld);
      wmma::mma_sync(acc[dn], a, b, acc[dn]);
    }
  }
}

// Writes a warp's 16 x D accumulator (times factor) to rows row0.. of a contiguous (.., D) output
// with row pitch row_pitch, through the warp's fp32 staging tile (16 x 16 blocks).
template <typename scalar_t, int D>
__device__ __forceinline__ void store_rows(
    scalar_t* dst, int64_t row_pitch, int valid, const nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16,
    float> (&acc)[D / 16], float factor, float* staging, int ld_staging) {
  namespace wmma = nvcuda::wmma;
  const int lane = threadIdx.x % 32;
  const int r = lane / 2;
  const int c0 = (lane % 2) * 8;
#pragma unroll
  for (int dn = 0; dn < D / 16; ++dn) {
    wmma::store_matrix_sync(staging, acc[dn], ld_staging, wmma::mem_row_major);
    __syncwarp();
    if (r < valid) {
#pragma unroll
      for (int c = 0; c < 8; ++c) {
        dst[r * row_pitch + dn * 16 + c0 + c] = from_float<scalar_t>(staging[r * ld_staging + c0 + c] * factor);
      }
    }
    __syncwarp();
  }
}

template <typename scalar_t, int D>
__global__ void __launch_bounds__(kTcBwdThreads)
attention_bwd_dq_tc_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ q,
                           const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                           const scalar_t* __restrict__ out, const float* __restrict__ lse,
                           float* __restrict__ delta, scalar_t* __restrict__ dq, int n_q, int n_kv, int n_heads,
                           int64_t q_sb, int64_t q_sn, int64_t q_sh, int64_t k_sb, int64_t k_sn, int64_t k_sh,
                           int64_t v_sb, int64_t v_sn, int64_t v_sh, float scale) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800  // bf16 WMMA needs sm_80; the launcher checks
  namespace wmma = nvcuda::wmma;
  using T = typename TensorCoreType<scalar_t>::type;
  constexpr int kLd = D + kTcPad16;
  constexpr int kLdS = kTcBwdTile + kTcPad32;
  constexpr int kLdP = kTcBwdTile + kTcPad16;

  __shared__ __align__(32) T q_tile[kTcBwdRows * kLd];
  __shared__ __align__(32) T do_tile[kTcBwdRows * kLd];
  __shared__ __align__(32) T k_tile[kTcBwdTile * kLd];
  __shared__ __align__(32) T v_tile[kTcBwdTile * kLd];
  __shared__ __align__(32) float s_tile[kTcBwdWarps][16 * kLdS];
  __shared__ __align__(32) float dp_tile[kTcBwdWarps][16 * kLdS];
  __shared__ __align__(32) T ds_tile[kTcBwdWarps][16 * kLdP];

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int i0 = blockIdx.x * kTcBwdRows;
  const T zero = TensorCoreType<scalar_t>::from(0.0f);
  const int64_t o_pitch = static_cast<int64_t>(n_heads) * D;  // grad_out, out: contiguous (B, Nq, H*D)
  const int64_t o_head = static_cast<int64_t>(b) * n_q * o_pitch + static_cast<int64_t>(h) * D;

  load_tile16<T, D>(q_tile, kLd, reinterpret_cast<const T*>(q) + b * q_sb + h * q_sh + i0 * q_sn, q_sn, kTcBwdRows,
                    n_q - i0, zero);
  load_tile16<T, D>(do_tile, kLd, reinterpret_cast<const T*>(grad_out) + o_head + i0 * o_pitch, o_pitch,
                    kTcBwdRows, n_q - i0, zero);

  // Lanes l, l^1 own row r of the warp's 16 for all element-wise work.
  const int r = lane / 2;
  const int col0 = (lane % 2) * 16;
  const int i = i0 + warp * 16 + r;
  const bool row_valid = i < n_q;
  float delta_i = 0.0f;
  if (row_valid) {
    const scalar_t* do_row = grad_out + o_head + i * o_pitch;
    const scalar_t* o_row = out + o_head + i * o_pitch;
    for (int d = (lane % 2) * (D / 2); d < (lane % 2 + 1) * (D / 2); ++d) delta_i += to_float(do_row[d]) * to_float(o_row[d]);
  }
  delta_i += __shfl_xor_sync(0xffffffffu, delta_i, 1);
  const int64_t stat_index = (static_cast<int64_t>(b) * n_heads + h) * n_q + i;
  if (row_valid && lane % 2 == 0) delta[stat_index] = delta_i;
  const float lse_i = row_valid ? lse[stat_index] : 0.0f;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> dq_acc[D / 16];
#pragma unroll
  for (int dn = 0; dn < D / 16; ++dn) wmma::fill_fragment(dq_acc[dn], 0.0f);
  float* s_w = s_tile[warp];
  float* dp_w = dp_tile[warp];
  T* ds_w = ds_tile[warp];
  const T* q_w = q_tile + warp * 16 * kLd;
  const T* do_w = do_tile + warp * 16 * kLd;
  const T* k_head = reinterpret_cast<const T*>(k) + b * k_sb + h * k_sh;
  const T* v_head = reinterpret_cast<const T*>(v) + b * v_sb + h * v_sh;

  for (int n0 = 0; n0 < n_kv; n0 += kTcBwdTile) {
    __syncthreads();  // every warp is done with the previous K/V tile (and q/dO are loaded)
    load_tile16<T, D>(k_tile, kLd, k_head + n0 * k_sn, k_sn, kTcBwdTile, n_kv - n0, zero);
    load_tile16<T, D>(v_tile, kLd, v_head + n0 * v_sn, v_sn, kTcBwdTile, n_kv - n0, zero);
    __syncthreads();
    tile_products_abt<T, D>(s_w, kLdS, q_w, k_tile, kLd);    // S = Q K^T
    tile_products_abt<T, D>(dp_w, kLdS, do_w, v_tile, kLd);  // dP = dO V^T
    __syncwarp();
#pragma unroll
    for (int c = 0; c < 16; ++c) {
      const int col = col0 + c;
      float ds = 0.0f;
      if (n0 + col < n_kv) {
        const float p = __expf(s_w[r * kLdS + col] * scale - lse_i);
        ds = p * (dp_w[r * kLdS + col] - delta_i);
      }
      ds_w[r * kLdP + col] = TensorCoreType<scalar_t>::from(ds);
    }
    __syncwarp();
    tile_accumulate_pb<T, D>(dq_acc, ds_w, kLdP, k_tile, kLd);  // dQ += dS K
    __syncwarp();
  }
  store_rows<scalar_t, D>(dq + ((static_cast<int64_t>(b) * n_q + i0 + warp * 16) * n_heads + h) * D,
                          static_cast<int64_t>(n_heads) * D, n_q - (i0 + warp * 16), dq_acc, scale, s_w, kLdS);
#endif
}

template <typename scalar_t, int D>
__global__ void __launch_bounds__(kTcBwdThreads)
attention_bwd_dkdv_tc_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ q,
                             const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                             const float* __restrict__ lse, const float* __restrict__ delta,
                             scalar_t* __restrict__ dk, scalar_t* __restrict__ dv, int n_q, int n_kv, int n_heads,
                             int64_t q_sb, int64_t q_sn, int64_t q_sh, int64_t k_sb, int64_t k_sn, int64_t k_sh,
                             int64_t v_sb, int64_t v_sn, int64_t v_sh, float scale) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800  // bf16 WMMA needs sm_80; the launcher checks
  namespace wmma = nvcuda::wmma;
  using T = typename TensorCoreType<scalar_t>::type;
  constexpr int kLd = D + kTcPad16;
  constexpr int kLdS = kTcBwdTile + kTcPad32;
  constexpr int kLdP = kTcBwdTile + kTcPad16;

  __shared__ __align__(32) T k_tile[kTcBwdRows * kLd];
  __shared__ __align__(32) T v_tile[kTcBwdRows * kLd];
  __shared__ __align__(32) T q_tile[kTcBwdTile * kLd];
  __shared__ __align__(32) T do_tile[kTcBwdTile * kLd];
  __shared__ __align__(32) float s_tile[kTcBwdWarps][16 * kLdS];
  __shared__ __align__(32) float dp_tile[kTcBwdWarps][16 * kLdS];
  __shared__ __align__(32) T p_tile[kTcBwdWarps][16 * kLdP];
  __shared__ float lse_tile[kTcBwdTile];
  __shared__ float delta_tile[kTcBwdTile];

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int j0 = blockIdx.x * kTcBwdRows;
  const T zero = TensorCoreType<scalar_t>::from(0.0f);
  const int64_t o_pitch = static_cast<int64_t>(n_heads) * D;  // grad_out: contiguous (B, Nq, H*D)
  const T* q_head = reinterpret_cast<const T*>(q) + b * q_sb + h * q_sh;
  const T* do_head =
      reinterpret_cast<const T*>(grad_out) + static_cast<int64_t>(b) * n_q * o_pitch + static_cast<int64_t>(h) * D;
  const int64_t stat_head = (static_cast<int64_t>(b) * n_heads + h) * n_q;

  load_tile16<T, D>(k_tile, kLd, reinterpret_cast<const T*>(k) + b * k_sb + h * k_sh + j0 * k_sn, k_sn, kTcBwdRows,
                    n_kv - j0, zero);
  load_tile16<T, D>(v_tile, kLd, reinterpret_cast<const T*>(v) + b * v_sb + h * v_sh + j0 * v_sn, v_sn, kTcBwdRows,
                    n_kv - j0, zero);

  // Lanes l, l^1 own key row r of the warp's 16; columns are queries of the streamed tile.
  const int r = lane / 2;
  const int col0 = (lane % 2) * 16;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> dk_acc[D / 16];
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> dv_acc[D / 16];
#pragma unroll
  for (int dn = 0; dn < D / 16; ++dn) {
    wmma::fill_fragment(dk_acc[dn], 0.0f);
    wmma::fill_fragment(dv_acc[dn], 0.0f);
  }
  float* s_w = s_tile[warp];
  float* dp_w = dp_tile[warp];
  T* p_w = p_tile[warp];
  const T* k_w = k_tile + warp * 16 * kLd;
  const T* v_w = v_tile + warp * 16 * kLd;

  for (int m0 = 0; m0 < n_q; m0 += kTcBwdTile) {
    __syncthreads();  // every warp is done with the previous q/dO tile (and K/V are loaded)
    load_tile16<T, D>(q_tile, kLd, q_head + m0 * q_sn, q_sn, kTcBwdTile, n_q - m0, zero);
    load_tile16<T, D>(do_tile, kLd, do_head + m0 * o_pitch, o_pitch, kTcBwdTile, n_q - m0, zero);
    for (int t = threadIdx.x; t < kTcBwdTile; t += kTcBwdThreads) {
      lse_tile[t] = m0 + t < n_q ? lse[stat_head + m0 + t] : 0.0f;
      delta_tile[t] = m0 + t < n_q ? delta[stat_head + m0 + t] : 0.0f;
    }
    __syncthreads();
    tile_products_abt<T, D>(s_w, kLdS, k_w, q_tile, kLd);    // S^T = K Q^T
    tile_products_abt<T, D>(dp_w, kLdS, v_w, do_tile, kLd);  // dP^T = V dO^T
    __syncwarp();
#pragma unroll
    for (int c = 0; c < 16; ++c) {
      const int col = col0 + c;
      float p = 0.0f;
      float ds = 0.0f;
      if (m0 + col < n_q) {
        p = __expf(s_w[r * kLdS + col] * scale - lse_tile[col]);
        ds = p * (dp_w[r * kLdS + col] - delta_tile[col]);
      }
      p_w[r * kLdP + col] = TensorCoreType<scalar_t>::from(p);
      s_w[r * kLdS + col] = ds;  // dS^T waits in fp32 until P^T has been used
    }
    __syncwarp();
    tile_accumulate_pb<T, D>(dv_acc, p_w, kLdP, do_tile, kLd);  // dV += P^T dO
    __syncwarp();
#pragma unroll
    for (int c = 0; c < 16; ++c) {
      const int col = col0 + c;
      p_w[r * kLdP + col] = TensorCoreType<scalar_t>::from(s_w[r * kLdS + col]);
    }
    __syncwarp();
    tile_accumulate_pb<T, D>(dk_acc, p_w, kLdP, q_tile, kLd);  // dK += dS^T Q
    __syncwarp();
  }
  const int64_t offset = ((static_cast<int64_t>(b) * n_kv + j0 + warp * 16) * n_heads + h) * D;
  const int valid = n_kv - (j0 + warp * 16);
  store_rows<scalar_t, D>(dk + offset, static_cast<int64_t>(n_heads) * D, valid, dk_acc, scale, s_w, kLdS);
  store_rows<scalar_t, D>(dv + offset, static_cast<int64_t>(n_heads) * D, valid, dv_acc, 1.0f, s_w, kLdS);
#endif
}

}  // namespace
}  // namespace cvt_fast

// ---------------------------------------------------------------- host side (launch, checks)
// Left out when csrc/emulate/ compiles the kernels above for a CPU emulation of the GPU.
#ifndef CVT_FAST_HOST_EMULATION
#include <type_traits>
#include <vector>

#include "ops.h"

namespace cvt_fast {
namespace {

template <typename scalar_t, int D>
void launch_attention_bwd(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                          const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, at::Tensor& delta,
                          at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, float scale, bool tensor_cores) {
  const int batch = static_cast<int>(q.size(0));
  const int n_q = static_cast<int>(q.size(1));
  const int n_heads = static_cast<int>(q.size(2));
  const int n_kv = static_cast<int>(k.size(1));
  auto stream = c10::cuda::getCurrentCUDAStream();
  if constexpr (!std::is_same_v<scalar_t, float>) {
    if (tensor_cores) {
      const dim3 grid_q(static_cast<unsigned>(ceil_div(n_q, kTcBwdRows)), n_heads, batch);
      attention_bwd_dq_tc_kernel<scalar_t, D><<<grid_q, kTcBwdThreads, 0, stream>>>(
          grad_out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
          out.data_ptr<scalar_t>(), lse.data_ptr<float>(), delta.data_ptr<float>(), dq.data_ptr<scalar_t>(), n_q,
          n_kv, n_heads, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0),
          v.stride(1), v.stride(2), scale);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const dim3 grid_kv(static_cast<unsigned>(ceil_div(n_kv, kTcBwdRows)), n_heads, batch);
      attention_bwd_dkdv_tc_kernel<scalar_t, D><<<grid_kv, kTcBwdThreads, 0, stream>>>(
          grad_out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
          lse.data_ptr<float>(), delta.data_ptr<float>(), dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(), n_q,
          n_kv, n_heads, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0),
          v.stride(1), v.stride(2), scale);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  const dim3 block(RowSplit<D>::kThreads);

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
  const bool tc = attention_use_tensor_cores(q.scalar_type(), q.device());
  CVT_DISPATCH_FLOAT_HALF_BF16(q.scalar_type(), kOp, [&] {
    const float s = static_cast<float>(scale);
    switch (head_dim) {
      case 32: launch_attention_bwd<scalar_t, 32>(grad_out_c, q, k, v, out_c, lse_c, delta, dq, dk, dv, s, tc); break;
      case 64: launch_attention_bwd<scalar_t, 64>(grad_out_c, q, k, v, out_c, lse_c, delta, dq, dk, dv, s, tc); break;
      case 128: launch_attention_bwd<scalar_t, 128>(grad_out_c, q, k, v, out_c, lse_c, delta, dq, dk, dv, s, tc); break;
      default: TORCH_CHECK_VALUE(false, kOp, ": head_dim ", head_dim, " is not supported");
    }
  });
  return {dq, dk, dv};
}

}  // namespace cvt_fast

#endif  // CVT_FAST_HOST_EMULATION
