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
// Two families. float16/bfloat16 on sm_80+ take the tensor-core kernels further down
// (FlashAttention-2: dK/dV in registers per key block, dQ by fp32 reductions); float32, the
// 16-bit inputs the forward's tensor-core kernel cannot take (see attention_use_tensor_cores),
// CVT_FAST_CUDA_ATTENTION=simt, and torch.use_deterministic_algorithms(True) when dQ would need
// reductions from several blocks take the CUDA-core pair right below.
//
// CUDA-core pair: two kernels, no atomics (deterministic), same row split as the forward (a row
// belongs to D/32 consecutive lanes, each owning 32 interleaved dims; dot products are per-lane
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

#include <type_traits>

#include "common.cuh"
#include "ptx.cuh"

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

// ---------------------------------------------------------------- tensor-core kernels (16-bit)
//
// FlashAttention-2's backward for float16/bfloat16 on sm_80+, three kernels in a row:
//   1. attention_bwd_prep_kernel: delta_i = dO_i . O_i and lse2_i = lse_i * log2(e) (fp32) into
//      (B, H, Nq_pad) buffers, Nq_pad = Nq rounded up to whole query tiles; the pad rows get delta 0
//      and lse2 = +inf, so p = exp2(c s - lse2) = 0 there and the main loop needs no query mask.
//      It also zeroes the fp32 dQ accumulator (B, H, Nq_pad, d) when there is one. 16-byte loads.
//   2. attention_bwd_tc_kernel: a block of 4 warps owns kBwdBlockN = 64 keys of one (batch, head),
//      16 per warp, and loops over every query tile of BwdTile::kBlockM queries (64; 32 at d = 128,
//      to stay within 255 registers), streamed through shared memory by a 2-stage cp.async pipeline
//      (q, dO, lse2, delta tiles, 16 bytes per instruction, rows past Nq zero-filled). Products are
//      transposed so that a warp's 16 keys are the rows of every fragment it holds; per query tile:
//        S^T = K_w Q^T,  dP^T = V_w dO^T                                   (mma.sync, fp32)
//        P^T = exp2(c S^T - lse2),  dS^T = P^T * (dP^T - delta)            (c = scale * log2 e;
//                                                                            keys >= Nkv: P = 0)
//        dV_w += P^T dO,  dK_w += dS^T Q      (P^T, dS^T packed to 16 bits straight from their C
//                                              fragments as A operands, as FlashAttention rounds them)
//      dS^T is also written to shared memory (16-bit); after a barrier the 4 warps split the tile's
//        dQ = dS K    (A = dS by ldmatrix.trans of dS^T, B = K by ldmatrix.trans)
//      and add it to the fp32 accumulator with two-float reductions (red.global.add.v2.f32). When
//      one block holds every key (Nkv <= 64: CvT-13 stage 3), its dQ is complete: it writes
//      scale * dQ in q's dtype directly, no accumulator, no reductions, deterministic.
//      dK_w, dV_w (16 x d fp32 each) stay in registers over the whole loop and are stored once,
//      16 bytes per lane through shared memory. K_w, V_w fragments stay in registers for d <= 64.
//      In the last block, warps whose keys are all past Nkv skip their products and dQ skips their
//      rows (CvT-13 stage 2: 196 keys are three blocks and 4 keys).
//   3. attention_bwd_dq_convert_kernel: dq = scale * accumulator, in q's dtype (16-byte stores); skipped
//      when block 2 wrote dq directly.
// Shared memory (rows padded by 8 elements for conflict-free ldmatrix): K, V tiles, 2 stages of
// (q, dO, lse2, delta), the dS^T tile: 40 / 64 / 73.5 KB for d = 32 / 64 / 128 (dynamic).
// Work: 5 products per (i, j) pair (S, dP, dV, dK, dQ) = 10*B*H*Nq*Nkv*d tensor-core FLOPs, against 14
// when a separate dQ kernel recomputes S and dP; the price is Nkv/64 fp32 reductions per dQ element
// (4*d*Nq*ceil(Nkv/64) bytes per head into L2). The count and the choice: csrc/NOTES.md.
// Determinism: the reductions make dQ's fp32 sum order (and so its last bits) vary run to run when
// Nkv > 64; with torch.use_deterministic_algorithms(True) such calls take the CUDA-core pair.

constexpr int kBwdBlockN = 64;  // keys per block of the main kernel (16 per warp)

template <int D>
struct BwdTile {
  static_assert(D == 32 || D == 64 || D == 128, "head_dim must be 32, 64 or 128");
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockN = kBwdBlockN;
  static constexpr int kBlockM = D <= 64 ? 64 : 32;  // queries per streamed tile
  static constexpr int kStages = 2;                  // query tiles in shared memory (double buffering)
  static constexpr bool kKvInRegisters = D <= 64;    // K_w, V_w A fragments kept for the whole loop
  static constexpr int kPitch = D + 8;               // q, dO, K, V row pitch (elements)
  static constexpr int kDsPitch = kBlockM + 8;       // dS^T row pitch (elements)
  // dQ = dS K of a tile is split over the warps as kDqWarpsM x kDqWarpsD blocks of 16 rows x kDqCols.
  static constexpr int kDqWarpsM = kBlockM / 16;
  static constexpr int kDqWarpsD = kWarps / kDqWarpsM;
  static constexpr int kDqCols = D / kDqWarpsD;
  // Shared memory, in bytes: K, V | kStages x (q, dO, lse2, delta) | dS^T.
  static constexpr int kKvBytes = 2 * kBlockN * kPitch;
  static constexpr int kRowsBytes = 2 * kBlockM * kPitch;
  static constexpr int kStageBytes = 2 * kRowsBytes + 2 * 4 * kBlockM;
  static constexpr int kStagesOffset = 2 * kKvBytes;
  static constexpr int kDsOffset = kStagesOffset + kStages * kStageBytes;
  static constexpr int kSmemBytes = kDsOffset + 2 * kBlockN * kDsPitch;
  static_assert(kKvBytes % 16 == 0 && kRowsBytes % 16 == 0 && kStageBytes % 16 == 0, "16-byte aligned parts");
};

// delta, lse2 (and a zeroed dQ accumulator) for rows (b, h, i < Nq_pad); grad_out and out contiguous.
template <typename scalar_t, int D>
__global__ void __launch_bounds__(128)
attention_bwd_prep_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ out,
                          const float* __restrict__ lse, float* __restrict__ lse2, float* __restrict__ delta,
                          float* __restrict__ dq_accum, int batch, int n_q, int n_heads, int n_q_pad) {
  constexpr int kLanesPerRow = D / 8;  // 16 bytes of dO and of O per lane
  constexpr int kRowsPerBlock = 128 / kLanesPerRow;
  const int part = threadIdx.x % kLanesPerRow;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kLanesPerRow;
  const bool in_range = row < static_cast<int64_t>(batch) * n_heads * n_q_pad;
  const int i = static_cast<int>(row % n_q_pad);
  const int64_t bh = row / n_q_pad;  // b * n_heads + h
  const bool real = in_range && i < n_q;
  float partial = 0.0f;
  if (real) {
    const int64_t offset = ((bh / n_heads * n_q + i) * n_heads + bh % n_heads) * D + part * 8;
    const uint4 do_raw = load_16(grad_out + offset);
    const uint4 o_raw = load_16(out + offset);
    const scalar_t* do_vals = reinterpret_cast<const scalar_t*>(&do_raw);
    const scalar_t* o_vals = reinterpret_cast<const scalar_t*>(&o_raw);
#pragma unroll
    for (int e = 0; e < 8; ++e) partial += to_float(do_vals[e]) * to_float(o_vals[e]);
  }
  const float sum = group_sum<kLanesPerRow>(partial);  // every lane of the warp takes part
  if (!in_range) return;
  if (part == 0) {
    delta[row] = real ? sum : 0.0f;
    lse2[row] = real ? lse[bh * n_q + i] * kLog2e : INFINITY;
  }
  if (dq_accum != nullptr) {
    float4* dst = reinterpret_cast<float4*>(dq_accum + row * D + part * 8);
    dst[0] = float4{0.0f, 0.0f, 0.0f, 0.0f};
    dst[1] = float4{0.0f, 0.0f, 0.0f, 0.0f};
  }
}

// dq[b, i, h, :] = scale * dq_accum[b, h, i, :] in q's dtype, 8 elements (one 16-byte store) per thread.
template <typename scalar_t, int D>
__global__ void __launch_bounds__(128)
attention_bwd_dq_convert_kernel(const float* __restrict__ dq_accum, scalar_t* __restrict__ dq, int batch, int n_q,
                        int n_heads, int n_q_pad, float scale) {
  using T = typename TensorCoreType<scalar_t>::type;
  constexpr int kChunksPerRow = D / 8;
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) * 128 + threadIdx.x;  // over dq's (b, i, h, d / 8)
  if (chunk >= static_cast<int64_t>(batch) * n_q * n_heads * kChunksPerRow) return;
  const int c = static_cast<int>(chunk % kChunksPerRow);
  const int64_t bih = chunk / kChunksPerRow;
  const int h = static_cast<int>(bih % n_heads);
  const int64_t bi = bih / n_heads;
  const int64_t src_row = (bi / n_q * n_heads + h) * n_q_pad + bi % n_q;
  const float4* src = reinterpret_cast<const float4*>(dq_accum + src_row * D + c * 8);
  const float4 lo = src[0];
  const float4 hi = src[1];
  uint4 packed;
  packed.x = pack_pair<T>(lo.x * scale, lo.y * scale);
  packed.y = pack_pair<T>(lo.z * scale, lo.w * scale);
  packed.z = pack_pair<T>(hi.x * scale, hi.y * scale);
  packed.w = pack_pair<T>(hi.z * scale, hi.w * scale);
  *reinterpret_cast<uint4*>(dq + chunk * 8) = packed;
}

// Per query tile, for this warp's 16 keys: S^T, dP^T, P^T, dS^T (written to ds_rows, this warp's 16
// rows of the dS^T tile), dV += P^T dO, dK += dS^T Q.
template <typename T, int D>
__device__ __forceinline__ void bwd_tc_key_grads(FragC (&dk)[D / 8], FragC (&dv)[D / 8],
                                                 const FragA (&k_frag)[D / 16], const FragA (&v_frag)[D / 16],
                                                 const T* k_rows, const T* v_rows, const T* q_tile,
                                                 const T* do_tile, const float* lse2_tile,
                                                 const float* delta_tile, T* ds_rows, const bool (&key_valid)[2],
                                                 float scale_log2) {
  using Tile = BwdTile<D>;
  constexpr int kNTiles = Tile::kBlockM / 8;  // 8-query n-tiles
  constexpr int kPitch = Tile::kPitch;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4;
  const int t = lane % 4;

  // -- S^T = K_w Q^T and dP^T = V_w dO^T; one ldmatrix.x4 of q (dO) rows gives two n-tiles' B fragments
  FragC st[kNTiles];
  FragC dpt[kNTiles];
#pragma unroll
  for (int j = 0; j < kNTiles; ++j) {
    st[j] = FragC{{0.0f, 0.0f, 0.0f, 0.0f}};
    dpt[j] = FragC{{0.0f, 0.0f, 0.0f, 0.0f}};
  }
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    FragA kf;
    FragA vf;
    if constexpr (Tile::kKvInRegisters) {
      kf = k_frag[kk];
      vf = v_frag[kk];
    } else {
      ldmatrix_x4(kf.reg, k_rows + (lane % 16) * kPitch + kk * 16 + lane / 16 * 8);
      ldmatrix_x4(vf.reg, v_rows + (lane % 16) * kPitch + kk * 16 + lane / 16 * 8);
    }
#pragma unroll
    for (int np = 0; np < kNTiles / 2; ++np) {
      const int row_offset = (np * 16 + lane % 8 + lane / 16 * 8) * kPitch + kk * 16 + (lane / 8) % 2 * 8;
      uint32_t qb[4];
      ldmatrix_x4(qb, q_tile + row_offset);
      mma_16x8x16<T>(st[2 * np], kf, FragB{{qb[0], qb[1]}});
      mma_16x8x16<T>(st[2 * np + 1], kf, FragB{{qb[2], qb[3]}});
      uint32_t ob[4];
      ldmatrix_x4(ob, do_tile + row_offset);
      mma_16x8x16<T>(dpt[2 * np], vf, FragB{{ob[0], ob[1]}});
      mma_16x8x16<T>(dpt[2 * np + 1], vf, FragB{{ob[2], ob[3]}});
    }
  }

  // -- P^T = exp2(c S^T - lse2) (0 for keys past Nkv), dS^T = P^T (dP^T - delta); c[i] of n-tile j is
  //    key row g + 8 (i / 2), query 8j + 2t + i % 2. dS^T also goes to shared memory for dQ.
#pragma unroll
  for (int j = 0; j < kNTiles; ++j) {
    const float2 lse2 = *reinterpret_cast<const float2*>(lse2_tile + 8 * j + 2 * t);
    const float2 delta = *reinterpret_cast<const float2*>(delta_tile + 8 * j + 2 * t);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float p = exp2f(fmaf(st[j].reg[i], scale_log2, -(i % 2 ? lse2.y : lse2.x)));
      st[j].reg[i] = key_valid[i / 2] ? p : 0.0f;
      dpt[j].reg[i] = st[j].reg[i] * (dpt[j].reg[i] - (i % 2 ? delta.y : delta.x));
    }
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      *reinterpret_cast<uint32_t*>(ds_rows + (g + 8 * hr) * Tile::kDsPitch + 8 * j + 2 * t) =
          pack_pair<T>(dpt[j].reg[2 * hr], dpt[j].reg[2 * hr + 1]);
    }
  }

  // -- dV += P^T dO, dK += dS^T Q: A fragments from the C fragments of n-tiles 2kc, 2kc + 1;
  //    one ldmatrix.x4.trans of dO (q) rows gives the B fragments of two 8-column d-tiles.
#pragma unroll
  for (int kc = 0; kc < Tile::kBlockM / 16; ++kc) {
    const FragA pa{{pack_pair<T>(st[2 * kc].reg[0], st[2 * kc].reg[1]),
                    pack_pair<T>(st[2 * kc].reg[2], st[2 * kc].reg[3]),
                    pack_pair<T>(st[2 * kc + 1].reg[0], st[2 * kc + 1].reg[1]),
                    pack_pair<T>(st[2 * kc + 1].reg[2], st[2 * kc + 1].reg[3])}};
    const FragA dsa{{pack_pair<T>(dpt[2 * kc].reg[0], dpt[2 * kc].reg[1]),
                     pack_pair<T>(dpt[2 * kc].reg[2], dpt[2 * kc].reg[3]),
                     pack_pair<T>(dpt[2 * kc + 1].reg[0], dpt[2 * kc + 1].reg[1]),
                     pack_pair<T>(dpt[2 * kc + 1].reg[2], dpt[2 * kc + 1].reg[3])}};
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      const int row_offset = (kc * 16 + lane % 8 + (lane / 8) % 2 * 8) * kPitch + dp * 16 + lane / 16 * 8;
      uint32_t ob[4];
      ldmatrix_x4_trans(ob, do_tile + row_offset);
      mma_16x8x16<T>(dv[2 * dp], pa, FragB{{ob[0], ob[1]}});
      mma_16x8x16<T>(dv[2 * dp + 1], pa, FragB{{ob[2], ob[3]}});
      uint32_t qb[4];
      ldmatrix_x4_trans(qb, q_tile + row_offset);
      mma_16x8x16<T>(dk[2 * dp], dsa, FragB{{qb[0], qb[1]}});
      mma_16x8x16<T>(dk[2 * dp + 1], dsa, FragB{{qb[2], qb[3]}});
    }
  }
}

template <typename scalar_t, int D>
__global__ void __launch_bounds__(BwdTile<D>::kThreads, 2)
attention_bwd_tc_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ q,
                        const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                        const float* __restrict__ lse2, const float* __restrict__ delta,
                        float* __restrict__ dq_accum, scalar_t* __restrict__ dq, scalar_t* __restrict__ dk,
                        scalar_t* __restrict__ dv, int n_q, int n_kv, int n_heads, int n_q_pad,
                        int64_t q_sb, int64_t q_sn, int64_t q_sh, int64_t k_sb, int64_t k_sn, int64_t k_sh,
                        int64_t v_sb, int64_t v_sn, int64_t v_sh, float scale_log2, float scale) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800  // mma.sync bf16 and cp.async need sm_80
  using Tile = BwdTile<D>;
  using T = typename TensorCoreType<scalar_t>::type;
  constexpr int kStages = Tile::kStages;
  constexpr int kPitch = Tile::kPitch;
  constexpr int kBlockM = Tile::kBlockM;

  unsigned char* smem = dynamic_shared_memory();
  T* k_smem = reinterpret_cast<T*>(smem);
  T* v_smem = reinterpret_cast<T*>(smem + Tile::kKvBytes);
  T* ds_smem = reinterpret_cast<T*>(smem + Tile::kDsOffset);
  auto stage_rows = [&](int stage) { return reinterpret_cast<T*>(smem + Tile::kStagesOffset + stage * Tile::kStageBytes); };
  auto stage_stats = [&](int stage) {
    return reinterpret_cast<float*>(smem + Tile::kStagesOffset + stage * Tile::kStageBytes + 2 * Tile::kRowsBytes);
  };

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int key0 = blockIdx.x * Tile::kBlockN;
  const int64_t o_pitch = static_cast<int64_t>(n_heads) * D;  // grad_out: contiguous (B, Nq, H*D)
  const T* q_head = reinterpret_cast<const T*>(q) + b * q_sb + h * q_sh;
  const T* do_head = reinterpret_cast<const T*>(grad_out) + static_cast<int64_t>(b) * n_q * o_pitch + h * D;
  const int64_t stats_head = (static_cast<int64_t>(b) * n_heads + h) * n_q_pad;
  const int n_q_tiles = (n_q + kBlockM - 1) / kBlockM;

  auto load_query_tile = [&](int tile) {
    const int m0 = tile * kBlockM;
    T* rows = stage_rows(tile % kStages);
    float* stats = stage_stats(tile % kStages);
    copy_tile_async<kBlockM, D, Tile::kThreads>(rows, kPitch, q_head + m0 * q_sn, q_sn, n_q - m0);
    copy_tile_async<kBlockM, D, Tile::kThreads>(rows + kBlockM * kPitch, kPitch, do_head + m0 * o_pitch, o_pitch,
                                                n_q - m0);
    copy_tile_async<1, kBlockM, Tile::kThreads>(stats, kBlockM, lse2 + stats_head + m0, 0, 1);
    copy_tile_async<1, kBlockM, Tile::kThreads>(stats + kBlockM, kBlockM, delta + stats_head + m0, 0, 1);
  };

  // -- prologue: the block's K, V rows and the first kStages - 1 query tiles, one group per tile
  copy_tile_async<Tile::kBlockN, D, Tile::kThreads>(k_smem, kPitch, reinterpret_cast<const T*>(k) + b * k_sb +
                                                    h * k_sh + key0 * k_sn, k_sn, n_kv - key0);
  copy_tile_async<Tile::kBlockN, D, Tile::kThreads>(v_smem, kPitch, reinterpret_cast<const T*>(v) + b * v_sb +
                                                    h * v_sh + key0 * v_sn, v_sn, n_kv - key0);
#pragma unroll
  for (int tile = 0; tile < kStages - 1; ++tile) {
    if (tile < n_q_tiles) load_query_tile(tile);
    cp_async_commit();
  }
  cp_async_wait<kStages - 2>();
  __syncthreads();

  const T* k_rows = k_smem + warp * 16 * kPitch;  // this warp's 16 keys
  const T* v_rows = v_smem + warp * 16 * kPitch;
  FragA k_frag[D / 16];
  FragA v_frag[D / 16];
  if constexpr (Tile::kKvInRegisters) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      ldmatrix_x4(k_frag[kk].reg, k_rows + (lane % 16) * kPitch + kk * 16 + lane / 16 * 8);
      ldmatrix_x4(v_frag[kk].reg, v_rows + (lane % 16) * kPitch + kk * 16 + lane / 16 * 8);
    }
  }
  const int block_keys = n_kv - key0;           // real keys of this block (> 0; < 64 in the last block)
  const int warp_keys = block_keys - warp * 16;  // of this warp's 16 (may be <= 0)
  const bool key_valid[2] = {g < warp_keys, g + 8 < warp_keys};
  FragC dk_acc[D / 8];
  FragC dv_acc[D / 8];
#pragma unroll
  for (int j = 0; j < D / 8; ++j) {
    dk_acc[j] = FragC{{0.0f, 0.0f, 0.0f, 0.0f}};
    dv_acc[j] = FragC{{0.0f, 0.0f, 0.0f, 0.0f}};
  }
  // This warp's block of the tile's dQ: rows dq_row0.., columns dq_col0..
  const int dq_row0 = warp % Tile::kDqWarpsM * 16;
  const int dq_col0 = warp / Tile::kDqWarpsM * Tile::kDqCols;
  const bool dq_direct = dq_accum == nullptr;  // this block holds every key

  for (int tile = 0; tile < n_q_tiles; ++tile) {
    // -- prefetch into the stage every warp finished with before the barrier ending the last step
    if (tile + kStages - 1 < n_q_tiles) load_query_tile(tile + kStages - 1);
    cp_async_commit();
    const T* q_tile = stage_rows(tile % kStages);
    const T* do_tile = q_tile + kBlockM * kPitch;
    const float* stats = stage_stats(tile % kStages);
    if (warp_keys > 0) {  // a warp whose 16 keys are all past Nkv has nothing to add (its dS^T rows go unread)
      bwd_tc_key_grads<T, D>(dk_acc, dv_acc, k_frag, v_frag, k_rows, v_rows, q_tile, do_tile, stats,
                             stats + kBlockM, ds_smem + warp * 16 * Tile::kDsPitch, key_valid, scale_log2);
    }
    __syncthreads();  // the whole dS^T tile is written

    // -- dQ block = dS K over the block's 64 keys
    FragC dq_part[Tile::kDqCols / 8];
#pragma unroll
    for (int j = 0; j < Tile::kDqCols / 8; ++j) dq_part[j] = FragC{{0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
    for (int kc = 0; kc < Tile::kBlockN / 16; ++kc) {
      if (16 * kc >= block_keys) break;  // warp kc's keys are all past Nkv
      FragA dsa;
      ldmatrix_x4_trans(dsa.reg, ds_smem + (kc * 16 + lane % 8 + lane / 16 * 8) * Tile::kDsPitch + dq_row0 +
                                     (lane / 8) % 2 * 8);
#pragma unroll
      for (int dp = 0; dp < Tile::kDqCols / 16; ++dp) {
        uint32_t kb[4];
        ldmatrix_x4_trans(kb, k_smem + (kc * 16 + lane % 8 + (lane / 8) % 2 * 8) * kPitch + dq_col0 + dp * 16 +
                                  lane / 16 * 8);
        mma_16x8x16<T>(dq_part[2 * dp], dsa, FragB{{kb[0], kb[1]}});
        mma_16x8x16<T>(dq_part[2 * dp + 1], dsa, FragB{{kb[2], kb[3]}});
      }
    }
    const int m0 = tile * kBlockM;
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int i = m0 + dq_row0 + g + 8 * hr;
      if (dq_direct) {
        if (i < n_q) {
          T* dst = reinterpret_cast<T*>(dq) + ((static_cast<int64_t>(b) * n_q + i) * n_heads + h) * D + dq_col0 + 2 * t;
#pragma unroll
          for (int j = 0; j < Tile::kDqCols / 8; ++j) {
            *reinterpret_cast<uint32_t*>(dst + 8 * j) =
                pack_pair<T>(dq_part[j].reg[2 * hr] * scale, dq_part[j].reg[2 * hr + 1] * scale);
          }
        }
      } else {  // rows past Nq land in the accumulator's padding
        float* dst = dq_accum + (stats_head + i) * D + dq_col0 + 2 * t;
#pragma unroll
        for (int j = 0; j < Tile::kDqCols / 8; ++j) {
          atomic_add_pair(dst + 8 * j, dq_part[j].reg[2 * hr], dq_part[j].reg[2 * hr + 1]);
        }
      }
    }
    cp_async_wait<kStages - 2>();  // tile + 1 has landed (this thread's part) ...
    __syncthreads();               // ... every thread's part; the dS^T tile and tile's stage are free
  }

  // -- epilogue: dK (times scale) and dV through this warp's own rows of the K and V tiles, then
  //    16-byte stores of the rows of real keys.
  T* dk_rows = k_smem + warp * 16 * kPitch;
  T* dv_rows = v_smem + warp * 16 * kPitch;
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      const int offset = (g + 8 * hr) * kPitch + 8 * j + 2 * t;
      *reinterpret_cast<uint32_t*>(dk_rows + offset) =
          pack_pair<T>(dk_acc[j].reg[2 * hr] * scale, dk_acc[j].reg[2 * hr + 1] * scale);
      *reinterpret_cast<uint32_t*>(dv_rows + offset) = pack_pair<T>(dv_acc[j].reg[2 * hr], dv_acc[j].reg[2 * hr + 1]);
    }
  }
  __syncwarp();
  constexpr int kChunksPerRow = D / 8;
#pragma unroll
  for (int chunk = lane; chunk < 16 * kChunksPerRow; chunk += 32) {
    const int r = chunk / kChunksPerRow;
    const int c = chunk % kChunksPerRow * 8;
    const int key = key0 + warp * 16 + r;
    if (key < n_kv) {
      const int64_t offset = ((static_cast<int64_t>(b) * n_kv + key) * n_heads + h) * D + c;
      *reinterpret_cast<uint4*>(reinterpret_cast<T*>(dk) + offset) = *reinterpret_cast<const uint4*>(dk_rows + r * kPitch + c);
      *reinterpret_cast<uint4*>(reinterpret_cast<T*>(dv) + offset) = *reinterpret_cast<const uint4*>(dv_rows + r * kPitch + c);
    }
  }
#endif
}

// ---------------------------------------------------------------- which backward runs (host, pure)
// Shared by the wrapper below and csrc/emulate/emulate_attention_bwd.cpp, so the emulation runs the
// choice the GPU build makes; no CUDA call, so tests reach it without a GPU.

// A tensor as the kernels walk it: a (B, N, H) grid of rows of D elements, base pointer and strides in
// elements (grad_out, out: (B, Nq, H*D) contiguous seen as (B, Nq, H) rows of D).
struct RowsView {
  const void* base;
  int64_t sizes[3];
  int64_t strides[3];
};

inline bool rows_aligned(const RowsView& t) { return rows_are_16_byte_aligned(t.base, t.sizes, t.strides); }

struct BwdPlan {
  bool tensor_cores;   // the tensor-core kernels (else the CUDA-core pair, which reads element by element)
  bool copy_grad_out;  // copy grad_out to a fresh (16-byte aligned) contiguous buffer first
  bool copy_out;       // the same for out
};

// tensor_cores_allowed: the dtype, the GPU, CVT_FAST_CUDA_ATTENTION and the scale permit them
// (attention_use_tensor_cores). The tensor-core backward moves 16 bytes at a time through every
// tensor it touches: q, k, v by cp.async; grad_out by cp.async and, with out, by the prep kernel's
// 16-byte loads; dq (convert kernel), dk, dv by 16-byte stores. A view that starts off a 16-byte
// boundary (buf[1:].view(...)) would be a sticky "misaligned address" on the GPU, which kills every
// later CUDA call of the process. q, k, v that fail take the CUDA-core kernels, as in the forward;
// grad_out and out (contiguous, rows of D >= 32 16-bit elements) are copied instead (one pass over
// (B, Nq, H*D), small against the backward), and outputs the wrapper allocated are aligned, but are
// checked too.
inline BwdPlan plan_attention_backward(bool tensor_cores_allowed, bool deterministic, const RowsView& q,
                                       const RowsView& k, const RowsView& v, const RowsView& grad_out,
                                       const RowsView& out, const RowsView& dq, const RowsView& dk,
                                       const RowsView& dv) {
  // With several key blocks dQ is summed by fp32 reductions in no fixed order; under
  // torch.use_deterministic_algorithms(True) the CUDA-core pair (no atomics) runs instead.
  const bool dq_by_reductions = k.sizes[1] > kBwdBlockN;
  const bool tensor_cores = tensor_cores_allowed && !(dq_by_reductions && deterministic) && rows_aligned(q) &&
                            rows_aligned(k) && rows_aligned(v) && rows_aligned(dq) && rows_aligned(dk) &&
                            rows_aligned(dv);
  return {tensor_cores, tensor_cores && !rows_aligned(grad_out), tensor_cores && !rows_aligned(out)};
}

}  // namespace
}  // namespace cvt_fast

// ---------------------------------------------------------------- host side (launch, checks)
// Left out when csrc/emulate/ compiles the kernels above for a CPU emulation of the GPU.
#ifndef CVT_FAST_HOST_EMULATION
#include <vector>

#include <ATen/Context.h>

#include "ops.h"

namespace cvt_fast {
namespace {

// (B, N, H, D) q, k, v, dq, dk, dv as RowsView.
RowsView rows_view(const at::Tensor& t) {
  return {t.data_ptr(), {t.size(0), t.size(1), t.size(2)}, {t.stride(0), t.stride(1), t.stride(2)}};
}

// (B, Nq, H*D) grad_out, out (contiguous) as (B, Nq, H) rows of D.
RowsView rows_view(const at::Tensor& t, int64_t n_heads) {
  const int64_t d = t.size(2) / n_heads;
  return {t.data_ptr(), {t.size(0), t.size(1), n_heads}, {t.stride(0), t.stride(1), d * t.stride(2)}};
}

template <typename scalar_t, int D>
void launch_attention_bwd_tc(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                             const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq,
                             at::Tensor& dk, at::Tensor& dv, float scale) {
  using Tile = BwdTile<D>;
  const int batch = static_cast<int>(q.size(0));
  const int n_q = static_cast<int>(q.size(1));
  const int n_heads = static_cast<int>(q.size(2));
  const int n_kv = static_cast<int>(k.size(1));
  const int n_q_pad = static_cast<int>(ceil_div(n_q, Tile::kBlockM) * Tile::kBlockM);
  const bool dq_direct = n_kv <= Tile::kBlockN;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto f32 = q.options().dtype(at::kFloat);
  auto lse2 = at::empty({batch, n_heads, n_q_pad}, f32);
  auto delta = at::empty({batch, n_heads, n_q_pad}, f32);
  auto dq_accum = dq_direct ? at::Tensor() : at::empty({batch, n_heads, n_q_pad, D}, f32);
  float* dq_accum_ptr = dq_direct ? nullptr : dq_accum.data_ptr<float>();

  constexpr int kPrepRows = 128 / (D / 8);
  const int64_t prep_blocks = ceil_div(static_cast<int64_t>(batch) * n_heads * n_q_pad, kPrepRows);
  attention_bwd_prep_kernel<scalar_t, D><<<static_cast<unsigned>(prep_blocks), 128, 0, stream>>>(
      grad_out.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), lse.data_ptr<float>(), lse2.data_ptr<float>(),
      delta.data_ptr<float>(), dq_accum_ptr, batch, n_q, n_heads, n_q_pad);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const auto kernel = &attention_bwd_tc_kernel<scalar_t, D>;
  if (Tile::kSmemBytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tile::kSmemBytes));
  }
  const dim3 grid(static_cast<unsigned>(ceil_div(n_kv, Tile::kBlockN)), n_heads, batch);
  kernel<<<grid, Tile::kThreads, Tile::kSmemBytes, stream>>>(
      grad_out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
      lse2.data_ptr<float>(), delta.data_ptr<float>(), dq_accum_ptr, dq.data_ptr<scalar_t>(),
      dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(), n_q, n_kv, n_heads, n_q_pad, q.stride(0), q.stride(1),
      q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
      scale * kLog2e, scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  if (!dq_direct) {
    const int64_t chunks = static_cast<int64_t>(batch) * n_q * n_heads * (D / 8);
    attention_bwd_dq_convert_kernel<scalar_t, D><<<static_cast<unsigned>(ceil_div(chunks, 128)), 128, 0, stream>>>(
        dq_accum_ptr, dq.data_ptr<scalar_t>(), batch, n_q, n_heads, n_q_pad, scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename scalar_t, int D>
void launch_attention_bwd(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                          const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq,
                          at::Tensor& dk, at::Tensor& dv, float scale, bool tensor_cores) {
  if constexpr (!std::is_same_v<scalar_t, float>) {
    if (tensor_cores) {
      launch_attention_bwd_tc<scalar_t, D>(grad_out, q, k, v, out, lse, dq, dk, dv, scale);
      return;
    }
  }
  const int batch = static_cast<int>(q.size(0));
  const int n_q = static_cast<int>(q.size(1));
  const int n_heads = static_cast<int>(q.size(2));
  const int n_kv = static_cast<int>(k.size(1));
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto delta = at::empty({batch, n_heads, n_q}, q.options().dtype(at::kFloat));
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
  auto grad_out_c = grad_out.contiguous();
  auto out_c = out.contiguous();
  const auto lse_c = lse.contiguous();
  const BwdPlan plan = plan_attention_backward(
      attention_use_tensor_cores(q, k, v, scale), at::globalContext().deterministicAlgorithms(), rows_view(q),
      rows_view(k), rows_view(v), rows_view(grad_out_c, n_heads), rows_view(out_c, n_heads), rows_view(dq),
      rows_view(dk), rows_view(dv));
  // clone() of a contiguous tensor is a fresh allocation: the caching allocator aligns those to 512 bytes.
  if (plan.copy_grad_out) grad_out_c = grad_out_c.clone();
  if (plan.copy_out) out_c = out_c.clone();
  const bool tc = plan.tensor_cores;
  CVT_DISPATCH_FLOAT_HALF_BF16(q.scalar_type(), kOp, [&] {
    const float s = static_cast<float>(scale);
    switch (head_dim) {
      case 32: launch_attention_bwd<scalar_t, 32>(grad_out_c, q, k, v, out_c, lse_c, dq, dk, dv, s, tc); break;
      case 64: launch_attention_bwd<scalar_t, 64>(grad_out_c, q, k, v, out_c, lse_c, dq, dk, dv, s, tc); break;
      case 128: launch_attention_bwd<scalar_t, 128>(grad_out_c, q, k, v, out_c, lse_c, dq, dk, dv, s, tc); break;
      default: TORCH_CHECK_VALUE(false, kOp, ": head_dim ", head_dim, " is not supported");
    }
  });
  return {dq, dk, dv};
}

}  // namespace cvt_fast

#endif  // CVT_FAST_HOST_EMULATION
