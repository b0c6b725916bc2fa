// Attention forward (flash-style, online softmax): for every batch b, head h, query row i
//   out[b, i, h*D:(h+1)*D] = softmax_j(scale * q[b,i,h] . k[b,j,h]) @ v[b,:,h]
//   lse[b, h, i]           = log sum_j exp(scale * q[b,i,h] . k[b,j,h])      (natural log, fp32)
// q: (B, Nq, H, D), k/v: (B, Nkv, H, D), any strides with the last one 1 (read in place);
// out: (B, Nq, H*D) contiguous, dtype of q. D in {32, 64, 128}; float32/float16/bfloat16 in,
// all math in fp32. No Nq x Nkv matrix exists anywhere: scores live in registers one
// K/V tile at a time.
//
// Two kernels: float16/bfloat16 on sm_80+ use the tensor-core kernel further down (WMMA,
// two-pass softmax); float32, and 16-bit when CVT_FAST_CUDA_ATTENTION=simt, use this one.
//
// Tiling of the fp32 CUDA-core kernel (chosen to be obviously correct first):
//   * one block per (query tile of kBlockM = 64 rows, head, batch): grid (ceil(Nq/64), H, B).
//   * a query row belongs to kThreadsPerRow = D/32 consecutive lanes of one warp; each lane
//     owns 32 of the D dims, as 8 chunks of 4 interleaved between the lanes of the row
//     (lane part p owns dims 4*(c*kThreadsPerRow + p) .. +3 for c = 0..7), so the lanes
//     of a row read neighbouring 16-byte words of shared memory (no bank conflicts) and
//     all rows of a warp read the same words (broadcast). Block = 64 * D/32 threads.
//   * registers per lane: its 32 dims of q (pre-multiplied by scale), of the output
//     accumulator, and the kBlockN = 32 scores of the current K/V tile; plus the running
//     row max m and row sum l of the online softmax.
//   * shared memory: one K tile and one V tile, kBlockN x D each, converted to fp32
//     (32 KB at D = 128). A dot product is a 32-term partial per lane, summed over the
//     lanes of the row with shuffles.
//   * masks: query rows >= Nq compute on zeros and store nothing; keys >= Nkv get score
//     -inf and zero V rows, so they add exactly 0. Every tile holds at least one real key,
//     so the running max is finite after the first tile.
// Floor: 4*B*H*Nq*Nkv*D FLOPs on the fp32 CUDA cores (~60 TFLOP/s FMA on an H100 SXM) and
// (2*B*Nq*H*D + 2*B*Nkv*H*D) elements + 4*B*H*Nq bytes of DRAM traffic (K/V are re-read
// from L2 once per query tile). For CvT shapes (D = 64, Nkv = Nq/4) the kernel is
// compute-bound on the CUDA cores, hence the tensor-core kernel for 16-bit inputs.

#include "common.cuh"

namespace cvt_fast {
namespace {

constexpr int kBlockM = 64;  // query rows per block: 2 tiles cover CvT stage 3 (Nq = 197)
constexpr int kBlockN = 32;  // keys per shared-memory tile: K+V fp32 tiles = 32 KB at D = 128
constexpr int kDimsPerLane = 32;
constexpr int kChunks = kDimsPerLane / 4;

template <int D>
struct RowSplit {
  static_assert(D == 32 || D == 64 || D == 128, "head_dim must be 32, 64 or 128");
  static constexpr int kThreadsPerRow = D / kDimsPerLane;
  static constexpr int kThreads = kBlockM * kThreadsPerRow;
  // First dim of chunk c of lane part p (see the file comment).
  static __device__ __forceinline__ int chunk_dim(int c, int part) { return 4 * (c * kThreadsPerRow + part); }
};

template <typename scalar_t, int D>
__global__ void __launch_bounds__(RowSplit<D>::kThreads)
attention_fwd_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                     const scalar_t* __restrict__ v, scalar_t* __restrict__ out,
                     float* __restrict__ lse, int n_q, int n_kv, int n_heads,
                     int64_t q_sb, int64_t q_sn, int64_t q_sh,
                     int64_t k_sb, int64_t k_sn, int64_t k_sh,
                     int64_t v_sb, int64_t v_sn, int64_t v_sh, float scale) {
  using Split = RowSplit<D>;
  constexpr int kTpr = Split::kThreadsPerRow;
  constexpr int kThreads = Split::kThreads;

  __shared__ __align__(16) float k_tile[kBlockN][D];
  __shared__ __align__(16) float v_tile[kBlockN][D];

  const int tid = threadIdx.x;
  const int row = tid / kTpr;
  const int part = tid % kTpr;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int i = blockIdx.x * kBlockM + row;
  const bool row_valid = i < n_q;

  float q_reg[kDimsPerLane];
  float acc[kDimsPerLane];
  {
    const scalar_t* q_row = q + b * q_sb + static_cast<int64_t>(row_valid ? i : 0) * q_sn + h * q_sh;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int d = Split::chunk_dim(c, part) + e;
        q_reg[c * 4 + e] = row_valid ? to_float(q_row[d]) * scale : 0.0f;
        acc[c * 4 + e] = 0.0f;
      }
    }
  }
  float row_max = -INFINITY;
  float row_sum = 0.0f;

  const scalar_t* k_head = k + b * k_sb + h * k_sh;
  const scalar_t* v_head = v + b * v_sb + h * v_sh;

  for (int n0 = 0; n0 < n_kv; n0 += kBlockN) {
    __syncthreads();  // every lane is done with the previous tile
    for (int idx = tid; idx < kBlockN * D; idx += kThreads) {
      const int j = idx / D;
      const int d = idx % D;
      const int n = n0 + j;
      const bool key_valid = n < n_kv;
      k_tile[j][d] = key_valid ? to_float(k_head[static_cast<int64_t>(n) * k_sn + d]) : 0.0f;
      v_tile[j][d] = key_valid ? to_float(v_head[static_cast<int64_t>(n) * v_sn + d]) : 0.0f;
    }
    __syncthreads();

    float score[kBlockN];
    float tile_max = -INFINITY;
#pragma unroll
    for (int j = 0; j < kBlockN; ++j) {
      float partial = 0.0f;
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        const float4 kk = *reinterpret_cast<const float4*>(&k_tile[j][Split::chunk_dim(c, part)]);
        partial += q_reg[c * 4 + 0] * kk.x + q_reg[c * 4 + 1] * kk.y + q_reg[c * 4 + 2] * kk.z +
                   q_reg[c * 4 + 3] * kk.w;
      }
      const float s = group_sum<kTpr>(partial);
      score[j] = (n0 + j < n_kv) ? s : -INFINITY;
      tile_max = fmaxf(tile_max, score[j]);
    }
    // Key n0 is always real, so new_max is finite; exp(-inf) = 0 rescales the empty start.
    const float new_max = fmaxf(row_max, tile_max);
    const float correction = __expf(row_max - new_max);
    row_sum *= correction;
#pragma unroll
    for (int t = 0; t < kDimsPerLane; ++t) acc[t] *= correction;
#pragma unroll
    for (int j = 0; j < kBlockN; ++j) {
      const float p = __expf(score[j] - new_max);
      row_sum += p;
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        const float4 vv = *reinterpret_cast<const float4*>(&v_tile[j][Split::chunk_dim(c, part)]);
        acc[c * 4 + 0] += p * vv.x;
        acc[c * 4 + 1] += p * vv.y;
        acc[c * 4 + 2] += p * vv.z;
        acc[c * 4 + 3] += p * vv.w;
      }
    }
    row_max = new_max;
  }

  if (row_valid) {
    const float inv_sum = 1.0f / row_sum;
    scalar_t* out_row = out + (static_cast<int64_t>(b) * n_q + i) * (static_cast<int64_t>(n_heads) * D) +
                        static_cast<int64_t>(h) * D;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        out_row[Split::chunk_dim(c, part) + e] = from_float<scalar_t>(acc[c * 4 + e] * inv_sum);
      }
    }
    if (part == 0) {
      lse[(static_cast<int64_t>(b) * n_heads + h) * n_q + i] = row_max + logf(row_sum);
    }
  }
}

// ---------------------------------------------------------------- tensor-core variant (16-bit)
//
// For float16/bfloat16 inputs the products q.k and p.v run on the tensor cores through WMMA
// (m16n16k16, fp32 accumulation); everything else is fp32 on the CUDA cores. To keep the WMMA
// accumulator layout opaque (no per-row rescaling of fragments, which would need it), the
// softmax takes two passes over K: pass 1 computes each row's max and sum (the lse), pass 2
// recomputes the scores, forms the final probabilities p = exp(s - max) / sum in 16-bit, and
// accumulates p @ V straight into the output fragments. That costs one extra q.k product
// (3 instead of 2 matrix products) in exchange for an obviously correct kernel.
//
// Tiling: one block of 4 warps per (64 query rows, head, batch), warp w owns rows 16w..16w+15
// and keeps its q rows as WMMA A fragments (D/16 of them) and its output as D/16 accumulator
// fragments. K/V tiles of 32 keys in shared memory (16-bit, rows padded by 8 elements); per warp
// a 16 x 32 fp32 score tile and a 16 x 32 16-bit probability tile. Lane l handles row l/2 of its
// warp's tiles, columns 16*(l%2)..+15, for the softmax statistics (the two lanes of a row combine
// with one shuffle). Shared memory at D = 128: 16 + 2*8.5 + 9 + 5 = 47 KB (static limit 48 KB).
// Floor: 6*B*H*Nq*Nkv*D tensor-core FLOPs (dense bf16/fp16 ~990 TFLOP/s on an H100 SXM;
// WMMA with shared-memory round trips reaches a fraction of it) and the DRAM bytes of the SIMT
// kernel above.

constexpr int kTcWarps = 4;
constexpr int kTcBlockM = 16 * kTcWarps;  // query rows per block
constexpr int kTcBlockN = 32;             // keys per K/V tile
constexpr int kTcThreads = 32 * kTcWarps;
template <typename scalar_t, int D>
__global__ void __launch_bounds__(kTcThreads)
attention_fwd_tc_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                        const scalar_t* __restrict__ v, scalar_t* __restrict__ out,
                        float* __restrict__ lse, int n_q, int n_kv, int n_heads,
                        int64_t q_sb, int64_t q_sn, int64_t q_sh,
                        int64_t k_sb, int64_t k_sn, int64_t k_sh,
                        int64_t v_sb, int64_t v_sn, int64_t v_sh, float scale) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800  // bf16 WMMA needs sm_80; the launcher checks
  namespace wmma = nvcuda::wmma;
  using T = typename TensorCoreType<scalar_t>::type;
  constexpr int kLdQ = D;                       // q tile is read once into fragments: no padding
  constexpr int kLdKV = D + kTcPad16;
  constexpr int kLdS = kTcBlockN + kTcPad32;
  constexpr int kLdP = kTcBlockN + kTcPad16;
  constexpr int kDBlocks = D / 16;
  constexpr int kNBlocks = kTcBlockN / 16;

  // Every fragment pointer below starts a 16-row block at a multiple of 16 columns: 32-byte
  // aligned given these 32-byte aligned bases (WMMA needs 256-bit aligned pointers).
  __shared__ __align__(32) T q_tile[kTcBlockM * kLdQ];
  __shared__ __align__(32) T k_tile[kTcBlockN * kLdKV];
  __shared__ __align__(32) T v_tile[kTcBlockN * kLdKV];
  __shared__ __align__(32) float s_tile[kTcWarps][16 * kLdS];
  __shared__ __align__(32) T p_tile[kTcWarps][16 * kLdP];

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int m0 = blockIdx.x * kTcBlockM;
  const T zero = TensorCoreType<scalar_t>::from(0.0f);
  // 16-bit values are copied bit for bit: c10::Half/BFloat16 and __half/__nv_bfloat16 share them.
  const T* q_bits = reinterpret_cast<const T*>(q) + b * q_sb + h * q_sh;
  const T* k_bits = reinterpret_cast<const T*>(k) + b * k_sb + h * k_sh;
  const T* v_bits = reinterpret_cast<const T*>(v) + b * v_sb + h * v_sh;

  for (int idx = tid; idx < kTcBlockM * D; idx += kTcThreads) {
    const int r = idx / D;
    const int d = idx % D;
    const int i = m0 + r;
    q_tile[r * kLdQ + d] = i < n_q ? q_bits[static_cast<int64_t>(i) * q_sn + d] : zero;
  }
  __syncthreads();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> q_frag[kDBlocks];
#pragma unroll
  for (int kk = 0; kk < kDBlocks; ++kk) {
    wmma::load_matrix_sync(q_frag[kk], q_tile + warp * 16 * kLdQ + kk * 16, kLdQ);
  }

  float* s_warp = s_tile[warp];
  T* p_warp = p_tile[warp];
  const int r = lane / 2;              // row of the warp's 16
  const int col0 = (lane % 2) * 16;    // this lane's 16 of the tile's 32 columns

  // K (and V) tile of keys n0..n0+31 into shared memory, zeros past n_kv.
  auto load_tiles = [&](int n0, bool with_v) {
    __syncthreads();  // every warp is done with the previous tile
    for (int idx = tid; idx < kTcBlockN * D; idx += kTcThreads) {
      const int j = idx / D;
      const int d = idx % D;
      const int n = n0 + j;
      const bool key_valid = n < n_kv;
      k_tile[j * kLdKV + d] = key_valid ? k_bits[static_cast<int64_t>(n) * k_sn + d] : zero;
      if (with_v) v_tile[j * kLdKV + d] = key_valid ? v_bits[static_cast<int64_t>(n) * v_sn + d] : zero;
    }
    __syncthreads();
  };
  // s_warp = q_w @ k_tile^T (unscaled, fp32), visible to the whole warp on return.
  auto tile_scores = [&]() {
#pragma unroll
    for (int nb = 0; nb < kNBlocks; ++nb) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.0f);
#pragma unroll
      for (int kk = 0; kk < kDBlocks; ++kk) {
        // k_tile row j = key j is column j of K^T: a column-major B operand with ldm kLdKV.
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> k_frag;
        wmma::load_matrix_sync(k_frag, k_tile + nb * 16 * kLdKV + kk * 16, kLdKV);
        wmma::mma_sync(acc, q_frag[kk], k_frag, acc);
      }
      wmma::store_matrix_sync(s_warp + nb * 16, acc, kLdS, wmma::mem_row_major);
    }
    __syncwarp();
  };

  // Pass 1: row max and row sum over all keys.
  float row_max = -INFINITY;
  float row_sum = 0.0f;
  for (int n0 = 0; n0 < n_kv; n0 += kTcBlockN) {
    load_tiles(n0, false);
    tile_scores();
    float tile_max = -INFINITY;
#pragma unroll
    for (int c = 0; c < 16; ++c) {
      const int col = col0 + c;
      if (n0 + col < n_kv) tile_max = fmaxf(tile_max, s_warp[r * kLdS + col] * scale);
    }
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    const float new_max = fmaxf(row_max, tile_max);  // finite: key n0 is real
    float tile_sum = 0.0f;
#pragma unroll
    for (int c = 0; c < 16; ++c) {
      const int col = col0 + c;
      if (n0 + col < n_kv) tile_sum += __expf(s_warp[r * kLdS + col] * scale - new_max);
    }
    tile_sum += __shfl_xor_sync(0xffffffffu, tile_sum, 1);
    row_sum = row_sum * __expf(row_max - new_max) + tile_sum;
    row_max = new_max;
    __syncwarp();  // s_warp is overwritten by the next tile
  }
  const float inv_sum = 1.0f / row_sum;

  // Pass 2: out = sum over tiles of p @ V with the final p = exp(s - max) / sum.
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> o_frag[kDBlocks];
#pragma unroll
  for (int dn = 0; dn < kDBlocks; ++dn) wmma::fill_fragment(o_frag[dn], 0.0f);
  for (int n0 = 0; n0 < n_kv; n0 += kTcBlockN) {
    load_tiles(n0, true);
    tile_scores();
#pragma unroll
    for (int c = 0; c < 16; ++c) {
      const int col = col0 + c;
      const float p = (n0 + col < n_kv) ? __expf(s_warp[r * kLdS + col] * scale - row_max) * inv_sum : 0.0f;
      p_warp[r * kLdP + col] = TensorCoreType<scalar_t>::from(p);
    }
    __syncwarp();
#pragma unroll
    for (int kb = 0; kb < kNBlocks; ++kb) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> p_frag;
      wmma::load_matrix_sync(p_frag, p_warp + kb * 16, kLdP);
#pragma unroll
      for (int dn = 0; dn < kDBlocks; ++dn) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> v_frag;
        wmma::load_matrix_sync(v_frag, v_tile + kb * 16 * kLdKV + dn * 16, kLdKV);
        wmma::mma_sync(o_frag[dn], p_frag, v_frag, o_frag[dn]);
      }
    }
    __syncwarp();  // p_warp and s_warp are overwritten by the next tile
  }

  // Store: each 16 x 16 output block goes through s_warp (the fragment layout is opaque).
  const int i = m0 + warp * 16 + r;
  const int c0 = (lane % 2) * 8;
  scalar_t* out_row = out + (static_cast<int64_t>(b) * n_q + i) * (static_cast<int64_t>(n_heads) * D) +
                      static_cast<int64_t>(h) * D;
#pragma unroll
  for (int dn = 0; dn < kDBlocks; ++dn) {
    wmma::store_matrix_sync(s_warp, o_frag[dn], kLdS, wmma::mem_row_major);
    __syncwarp();
    if (i < n_q) {
#pragma unroll
      for (int c = 0; c < 8; ++c) out_row[dn * 16 + c0 + c] = from_float<scalar_t>(s_warp[r * kLdS + c0 + c]);
    }
    __syncwarp();
  }
  if (i < n_q && lane % 2 == 0) {
    lse[(static_cast<int64_t>(b) * n_heads + h) * n_q + i] = row_max + logf(row_sum);
  }
#endif
}

}  // namespace
}  // namespace cvt_fast

// ---------------------------------------------------------------- host side (launch, checks)
// Left out when csrc/emulate/ compiles the kernels above for a CPU emulation of the GPU.
#ifndef CVT_FAST_HOST_EMULATION
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "ops.h"

namespace cvt_fast {
namespace {

template <typename scalar_t, int D>
void launch_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          at::Tensor& out, at::Tensor& lse, float scale, bool tensor_cores) {
  const int batch = static_cast<int>(q.size(0));
  const int n_q = static_cast<int>(q.size(1));
  const int n_heads = static_cast<int>(q.size(2));
  const int n_kv = static_cast<int>(k.size(1));
  auto stream = c10::cuda::getCurrentCUDAStream();
  if constexpr (!std::is_same_v<scalar_t, float>) {
    if (tensor_cores) {
      const dim3 grid(static_cast<unsigned>(ceil_div(n_q, kTcBlockM)), n_heads, batch);
      attention_fwd_tc_kernel<scalar_t, D><<<grid, kTcThreads, 0, stream>>>(
          q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
          lse.data_ptr<float>(), n_q, n_kv, n_heads, q.stride(0), q.stride(1), q.stride(2), k.stride(0),
          k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), scale);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  const dim3 grid(static_cast<unsigned>(ceil_div(n_q, kBlockM)), n_heads, batch);
  const dim3 block(RowSplit<D>::kThreads);
  attention_fwd_kernel<scalar_t, D><<<grid, block, 0, stream>>>(
      q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
      lse.data_ptr<float>(), n_q, n_kv, n_heads, q.stride(0), q.stride(1), q.stride(2), k.stride(0),
      k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// The tensor-core kernels serve float16/bfloat16 on sm_80 and newer, unless the environment
// variable CVT_FAST_CUDA_ATTENTION=simt asks for the fp32 CUDA-core kernels (a fallback and a
// second opinion when a result looks wrong). Read per call, so tests can switch it.
bool attention_use_tensor_cores(at::ScalarType dtype, const at::Device& device) {
  if (dtype != at::kHalf && dtype != at::kBFloat16) return false;
  const char* choice = std::getenv("CVT_FAST_CUDA_ATTENTION");
  if (choice != nullptr && std::strcmp(choice, "simt") == 0) return false;
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device.index()));
  return major >= 8;
}

void check_attention_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            double scale) {
  CVT_CHECK_CUDA(op, q, "q");
  CVT_CHECK_SAME_DEVICE(op, k, q, "k", "q");
  CVT_CHECK_SAME_DEVICE(op, v, q, "v", "q");
  CVT_CHECK_DIM(op, q, "q", 4, "(batch, tokens, heads, head_dim)");
  CVT_CHECK_DIM(op, k, "k", 4, "(batch, tokens, heads, head_dim)");
  CVT_CHECK_DIM(op, v, "v", 4, "(batch, tokens, heads, head_dim)");
  CVT_CHECK_SAME_DTYPE(op, k, q, "k", "q");
  CVT_CHECK_SAME_DTYPE(op, v, q, "v", "q");
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), op, ": k and v must have the same shape, got ", k.sizes(), " and ",
                    v.sizes());
  TORCH_CHECK_VALUE(q.size(0) == k.size(0) && q.size(2) == k.size(2) && q.size(3) == k.size(3), op,
                    ": q ", q.sizes(), " and k ", k.sizes(), " must agree in batch, heads and head_dim");
  const int64_t head_dim = q.size(3);
  TORCH_CHECK_VALUE(head_dim == 32 || head_dim == 64 || head_dim == 128, op, ": head_dim ", head_dim,
                    " is not supported; expected 32, 64 or 128 (use backend='triton' or 'reference')");
  TORCH_CHECK_VALUE(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, op,
                    ": the last (head_dim) dimension must be contiguous, got strides q ", q.strides(), ", k ",
                    k.strides(), ", v ", v.strides());
  TORCH_CHECK_VALUE(k.size(1) >= 1, op, ": k and v need at least one token, got shape ", k.sizes());
  TORCH_CHECK_VALUE(q.size(0) <= 65535 && q.size(2) <= 65535, op,
                    ": batch and heads must each be at most 65535 (CUDA grid limit), got q ", q.sizes());
  TORCH_CHECK_VALUE(q.size(1) < (int64_t{1} << 31) && k.size(1) < (int64_t{1} << 31), op,
                    ": token counts must fit in 32 bits, got q ", q.sizes(), ", k ", k.sizes());
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": scale must be finite, got ", scale);
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cuda(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, double scale) {
  constexpr const char* kOp = "cvt_fast::attention_forward_cuda";
  check_attention_inputs(kOp, q, k, v, scale);

  const int64_t batch = q.size(0), n_q = q.size(1), n_heads = q.size(2), head_dim = q.size(3);
  auto out = at::empty({batch, n_q, n_heads * head_dim}, q.options());
  auto lse = at::empty({batch, n_heads, n_q}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};

  const c10::cuda::OptionalCUDAGuard guard(q.device());
  const bool tensor_cores = attention_use_tensor_cores(q.scalar_type(), q.device());
  CVT_DISPATCH_FLOAT_HALF_BF16(q.scalar_type(), kOp, [&] {
    const float s = static_cast<float>(scale);
    switch (head_dim) {
      case 32: launch_attention_fwd<scalar_t, 32>(q, k, v, out, lse, s, tensor_cores); break;
      case 64: launch_attention_fwd<scalar_t, 64>(q, k, v, out, lse, s, tensor_cores); break;
      case 128: launch_attention_fwd<scalar_t, 128>(q, k, v, out, lse, s, tensor_cores); break;
      default: TORCH_CHECK_VALUE(false, kOp, ": head_dim ", head_dim, " is not supported");
    }
  });
  return {out, lse};
}

}  // namespace cvt_fast

#endif  // CVT_FAST_HOST_EMULATION
