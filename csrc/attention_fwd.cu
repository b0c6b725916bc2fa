// Attention forward (flash-style, online softmax): for every batch b, head h, query row i
//   out[b, i, h*D:(h+1)*D] = softmax_j(scale * q[b,i,h] . k[b,j,h]) @ v[b,:,h]
//   lse[b, h, i]           = log sum_j exp(scale * q[b,i,h] . k[b,j,h])      (natural log, fp32)
// q: (B, Nq, H, D), k/v: (B, Nkv, H, D), any strides with the last one 1 (read in place);
// out: (B, Nq, H*D) contiguous, dtype of q. D in {32, 64, 128}; float32/float16/bfloat16 in,
// all math in fp32. No Nq x Nkv matrix exists anywhere: scores live in registers one
// K/V tile at a time.
//
// Two kernels. float16/bfloat16 on sm_80+ take the tensor-core kernel further down
// (FlashAttention-2: one pass, mma.sync, ldmatrix, cp.async pipeline). float32 takes the
// CUDA-core kernel right below, and so do 16-bit inputs the tensor-core kernel cannot take:
// CVT_FAST_CUDA_ATTENTION=simt, rows not 16-byte aligned (a view at an odd element offset or
// with a stride not a multiple of 8), or a negative scale (see attention_use_tensor_cores).
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

#include <type_traits>

#include "common.cuh"
#include "ptx.cuh"

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

// ---------------------------------------------------------------- tensor-core kernel (16-bit)
//
// FlashAttention-2's forward for float16/bfloat16 on sm_80+: one pass over K/V with the online
// softmax, both products on the tensor cores (mma.sync m16n8k16, fp32 accumulation), operands read
// from shared memory by ldmatrix, P never leaving registers.
//
// Tiling: a block of 4 warps owns FwdTile::kBlockM query rows of one (batch, head): 128 for d <= 64
// (each warp two 16-row m-tiles, so every K/V fragment read from shared memory feeds two mma and the
// ldmatrix traffic stays under the shared-memory bandwidth of an H100 SM), 64 for d = 128 (one m-tile;
// two would need more than 255 registers). K/V stream through shared memory in tiles of 64 keys,
// kStages = 2 buffers deep: cp.async brings tile t+1, 16 bytes per instruction straight from the
// strided (B, N, H, d) tensors (rows past Nkv zero-filled), while tile t is computed; one
// __syncthreads per tile.
// Registers per warp: its q rows as A fragments (loaded once), the output accumulator (16 x d fp32 per
// m-tile), the 16 x 64 score tile per m-tile (C fragments, turned into P in place), and per row the
// running max m (log2 domain) and a lane-partial running sum.
// Per tile, with c = scale * log2(e) (scale >= 0, see attention_use_tensor_cores):
//   S = Q K^T; keys >= Nkv -> -inf (last tile only); m_new = max(m, c * rowmax(S));
//   O, sum *= exp2(m - m_new); P = exp2(c * S - m_new) (one FFMA + one MUFU.EX2 per score);
//   O += P V, P packed to 16 bits straight from its C fragments (= the A fragment layout of P).
// End: O / sum staged in the warp's part of the Q tile, stored 16 bytes per lane; lse = (m + log2 sum) ln 2.
// Shared memory: the Q tile and kStages x (K, V) tiles, rows padded by 8 elements (16 bytes) so the 8
// rows an ldmatrix reads fall in distinct banks: 30 / 54 / 85 KB for d = 32 / 64 / 128 (dynamic).
// Floor: 4*B*H*Nq*Nkv*d tensor-core FLOPs plus B*H*Nq*Nkv exp2 on the MUFU units (16 per clock per SM:
// about as long as the products at d = 64), and 2*(2*B*Nq*H*d + 2*B*Nkv*H*d) + 4*B*H*Nq DRAM bytes
// (K/V are re-read from L2 by every query block of their head).

template <int D>
struct FwdTile {
  static_assert(D == 32 || D == 64 || D == 128, "head_dim must be 32, 64 or 128");
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kMTiles = D <= 64 ? 2 : 1;      // 16-row m-tiles per warp
  static constexpr int kWarpRows = 16 * kMTiles;
  static constexpr int kBlockM = kWarps * kWarpRows;  // query rows per block
  static constexpr int kBlockN = 64;                  // keys per K/V tile
  static constexpr int kStages = 2;                   // K/V tiles in shared memory (double buffering)
  static constexpr int kPitch = D + 8;                // shared-memory row pitch, elements
  static constexpr int kQElems = kBlockM * kPitch;
  static constexpr int kKvElems = kBlockN * kPitch;
  static constexpr int kSmemBytes = 2 * (kQElems + 2 * kStages * kKvElems);
};
// The d = 64 kernel must keep two blocks on an SM (228 KB of shared memory; registers: __launch_bounds__).
static_assert(2 * FwdTile<64>::kSmemBytes <= 227 * 1024, "two d = 64 forward blocks must fit on an SM");

// One K/V tile of the forward: S, the online-softmax update, O += P V. kMasked: the last, partial
// tile, whose keys >= valid_keys must not count (and whose 16-key chunks wholly past them are skipped:
// CvT-13 stage 2 has 196 keys, three tiles and 4 keys).
template <typename T, int D, bool kMasked>
__device__ __forceinline__ void fwd_tc_tile(const FragA (&q_frag)[FwdTile<D>::kMTiles][D / 16],
                                            FragC (&o)[FwdTile<D>::kMTiles][D / 8],
                                            float (&row_max)[FwdTile<D>::kMTiles][2],
                                            float (&row_sum)[FwdTile<D>::kMTiles][2], const T* k_tile,
                                            const T* v_tile, int valid_keys, float scale_log2) {
  using Tile = FwdTile<D>;
  constexpr int kMTiles = Tile::kMTiles;
  constexpr int kNTiles = Tile::kBlockN / 8;
  constexpr int kPitch = Tile::kPitch;
  const int lane = threadIdx.x % 32;
  const int t = lane % 4;

  // -- S = Q K^T (raw scores). One ldmatrix.x4 of K gives the B fragments of two 8-key n-tiles.
  FragC s[kMTiles][kNTiles];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int j = 0; j < kNTiles; ++j) s[mt][j] = FragC{{0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
    for (int np = 0; np < kNTiles / 2; ++np) {
      // Keys wholly past Nkv keep score 0, masked below. (A `break` here cost ptxas 4 more registers
      // and a spill at d = 64.)
      if (!kMasked || 16 * np < valid_keys) {
        uint32_t kb[4];
        ldmatrix_x4(kb, k_tile + (np * 16 + lane % 8 + (lane / 16) * 8) * kPitch + kk * 16 + (lane / 8) % 2 * 8);
        const FragB b0{{kb[0], kb[1]}};
        const FragB b1{{kb[2], kb[3]}};
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          mma_16x8x16<T>(s[mt][2 * np], q_frag[mt][kk], b0);
          mma_16x8x16<T>(s[mt][2 * np + 1], q_frag[mt][kk], b1);
        }
      }
    }
  }

  // -- keys past Nkv take no part (c[i] of n-tile j is key 8j + 2t + i % 2)
  if constexpr (kMasked) {
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int j = 0; j < kNTiles; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i)
          if (8 * j + 2 * t + i % 2 >= valid_keys) s[mt][j].reg[i] = -INFINITY;
  }

  // -- online softmax: rows g (hr = 0) and g + 8 (hr = 1) of each m-tile; a row's 4 lanes share it
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      float tile_max = -INFINITY;
#pragma unroll
      for (int j = 0; j < kNTiles; ++j) tile_max = fmaxf(tile_max, fmaxf(s[mt][j].reg[2 * hr], s[mt][j].reg[2 * hr + 1]));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
      // Finite: key 0 of every tile is real. exp2(-inf) = 0 rescales the empty start.
      const float new_max = fmaxf(row_max[mt][hr], tile_max * scale_log2);
      const float correction = exp2f(row_max[mt][hr] - new_max);
      row_max[mt][hr] = new_max;
      row_sum[mt][hr] *= correction;
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        o[mt][j].reg[2 * hr] *= correction;
        o[mt][j].reg[2 * hr + 1] *= correction;
      }
#pragma unroll
      for (int j = 0; j < kNTiles; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float p = exp2f(fmaf(s[mt][j].reg[2 * hr + e], scale_log2, -new_max));
          // A masked key gives exp2(-inf) = 0, or exp2(NaN) when scale = 0: select.
          if constexpr (kMasked) p = 8 * j + 2 * t + e < valid_keys ? p : 0.0f;
          s[mt][j].reg[2 * hr + e] = p;
          row_sum[mt][hr] += p;
        }
      }
    }
  }

  // -- O += P V: P's A fragment for keys 16kc..16kc+15 is the packed C fragments of n-tiles 2kc, 2kc+1;
  //    one ldmatrix.x4.trans of V gives the B fragments of two 8-column d-tiles.
#pragma unroll
  for (int kc = 0; kc < Tile::kBlockN / 16; ++kc) {
    if (kMasked && 16 * kc >= valid_keys) break;  // P = 0 there
    FragA p_frag[kMTiles];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
      const FragC& lo = s[mt][2 * kc];
      const FragC& hi = s[mt][2 * kc + 1];
      p_frag[mt] = FragA{{pack_pair<T>(lo.reg[0], lo.reg[1]), pack_pair<T>(lo.reg[2], lo.reg[3]),
                          pack_pair<T>(hi.reg[0], hi.reg[1]), pack_pair<T>(hi.reg[2], hi.reg[3])}};
    }
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      uint32_t vb[4];
      ldmatrix_x4_trans(vb, v_tile + (kc * 16 + lane % 8 + (lane / 8) % 2 * 8) * kPitch + dp * 16 + lane / 16 * 8);
      const FragB b0{{vb[0], vb[1]}};
      const FragB b1{{vb[2], vb[3]}};
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        mma_16x8x16<T>(o[mt][2 * dp], p_frag[mt], b0);
        mma_16x8x16<T>(o[mt][2 * dp + 1], p_frag[mt], b1);
      }
    }
  }
}

template <typename scalar_t, int D>
__global__ void __launch_bounds__(FwdTile<D>::kThreads, 2)
attention_fwd_tc_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                        const scalar_t* __restrict__ v, scalar_t* __restrict__ out,
                        float* __restrict__ lse, int n_q, int n_kv, int n_heads,
                        int64_t q_sb, int64_t q_sn, int64_t q_sh,
                        int64_t k_sb, int64_t k_sn, int64_t k_sh,
                        int64_t v_sb, int64_t v_sn, int64_t v_sh, float scale_log2) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800  // mma.sync bf16 and cp.async need sm_80
  using Tile = FwdTile<D>;
  using T = typename TensorCoreType<scalar_t>::type;
  constexpr int kMTiles = Tile::kMTiles;
  constexpr int kStages = Tile::kStages;
  constexpr int kPitch = Tile::kPitch;

  T* q_smem = reinterpret_cast<T*>(dynamic_shared_memory());
  T* kv_smem = q_smem + Tile::kQElems;  // stage s: K tile at 2s, V tile at 2s + 1
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int m0 = blockIdx.x * Tile::kBlockM;
  // 16-bit values are copied bit for bit: c10::Half/BFloat16 and __half/__nv_bfloat16 share them.
  const T* q_head = reinterpret_cast<const T*>(q) + b * q_sb + h * q_sh;
  const T* k_head = reinterpret_cast<const T*>(k) + b * k_sb + h * k_sh;
  const T* v_head = reinterpret_cast<const T*>(v) + b * v_sb + h * v_sh;
  const int n_tiles = (n_kv + Tile::kBlockN - 1) / Tile::kBlockN;

  auto load_kv_tile = [&](int tile) {
    const int n0 = tile * Tile::kBlockN;
    T* k_dst = kv_smem + (2 * (tile % kStages)) * Tile::kKvElems;
    copy_tile_async<Tile::kBlockN, D, Tile::kThreads>(k_dst, kPitch, k_head + n0 * k_sn, k_sn, n_kv - n0);
    copy_tile_async<Tile::kBlockN, D, Tile::kThreads>(k_dst + Tile::kKvElems, kPitch, v_head + n0 * v_sn, v_sn,
                                                      n_kv - n0);
  };

  // -- prologue: Q and the first kStages - 1 K/V tiles in flight, one commit group per K/V tile
  copy_tile_async<Tile::kBlockM, D, Tile::kThreads>(q_smem, kPitch, q_head + m0 * q_sn, q_sn, n_q - m0);
#pragma unroll
  for (int tile = 0; tile < kStages - 1; ++tile) {
    if (tile < n_tiles) load_kv_tile(tile);
    cp_async_commit();
  }
  cp_async_wait<kStages - 2>();
  __syncthreads();

  // -- this warp's q rows as A fragments, for the whole loop
  FragA q_frag[kMTiles][D / 16];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
      ldmatrix_x4(q_frag[mt][kk].reg,
                  q_smem + (warp * Tile::kWarpRows + mt * 16 + lane % 16) * kPitch + kk * 16 + lane / 16 * 8);

  FragC o[kMTiles][D / 8];
  float row_max[kMTiles][2];
  float row_sum[kMTiles][2];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int j = 0; j < D / 8; ++j) o[mt][j] = FragC{{0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      row_max[mt][hr] = -INFINITY;
      row_sum[mt][hr] = 0.0f;
    }
  }

  // One pipeline step: prefetch tile + kStages - 1 into the buffer that every warp finished with
  // before the barrier ending the previous step, compute tile, wait for tile + 1.
  auto step = [&](int tile, auto masked) {
    if (tile + kStages - 1 < n_tiles) load_kv_tile(tile + kStages - 1);
    cp_async_commit();
    const T* k_tile = kv_smem + (2 * (tile % kStages)) * Tile::kKvElems;
    fwd_tc_tile<T, D, decltype(masked)::value>(q_frag, o, row_max, row_sum, k_tile, k_tile + Tile::kKvElems,
                                               n_kv - tile * Tile::kBlockN, scale_log2);
    cp_async_wait<kStages - 2>();  // tile + 1 has landed (this thread's part) ...
    __syncthreads();               // ... every thread's part, and tile's buffer is free
  };
  const int full_tiles = n_kv / Tile::kBlockN;
  for (int tile = 0; tile < full_tiles; ++tile) step(tile, std::false_type{});
  if (full_tiles < n_tiles) step(full_tiles, std::true_type{});  // the partial last tile, masked

  // -- epilogue: O / sum into the warp's own rows of the Q tile (no other warp reads them), then
  //    16-byte stores of whole rows; lse from the row max and sum.
  const int g = lane / 4;
  const int t = lane % 4;
  T* o_smem = q_smem + warp * Tile::kWarpRows * kPitch;
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      float sum = row_sum[mt][hr];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      row_sum[mt][hr] = sum;
      const float inv_sum = 1.0f / sum;
      T* row = o_smem + (mt * 16 + hr * 8 + g) * kPitch + 2 * t;
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        *reinterpret_cast<uint32_t*>(row + 8 * j) =
            pack_pair<T>(o[mt][j].reg[2 * hr] * inv_sum, o[mt][j].reg[2 * hr + 1] * inv_sum);
      }
    }
  }
  __syncwarp();
  constexpr int kChunksPerRow = D / 8;
  T* out_bits = reinterpret_cast<T*>(out);
#pragma unroll
  for (int chunk = lane; chunk < Tile::kWarpRows * kChunksPerRow; chunk += 32) {
    const int r = chunk / kChunksPerRow;
    const int c = chunk % kChunksPerRow * 8;
    const int i = m0 + warp * Tile::kWarpRows + r;
    if (i < n_q) {
      *reinterpret_cast<uint4*>(out_bits + (static_cast<int64_t>(b) * n_q + i) * (static_cast<int64_t>(n_heads) * D) +
                                h * D + c) = *reinterpret_cast<const uint4*>(o_smem + r * kPitch + c);
    }
  }
  if (t == 0) {
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const int i = m0 + warp * Tile::kWarpRows + mt * 16 + hr * 8 + g;
        if (i < n_q) {
          lse[(static_cast<int64_t>(b) * n_heads + h) * n_q + i] =
              (row_max[mt][hr] + log2f(row_sum[mt][hr])) * kLn2;
        }
      }
    }
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
      using Tile = FwdTile<D>;
      const auto kernel = &attention_fwd_tc_kernel<scalar_t, D>;
      if (Tile::kSmemBytes > 48 * 1024) {
        C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tile::kSmemBytes));
      }
      const dim3 grid(static_cast<unsigned>(ceil_div(n_q, Tile::kBlockM)), n_heads, batch);
      kernel<<<grid, Tile::kThreads, Tile::kSmemBytes, stream>>>(
          q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
          lse.data_ptr<float>(), n_q, n_kv, n_heads, q.stride(0), q.stride(1), q.stride(2), k.stride(0),
          k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), scale * kLog2e);
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

bool rows_aligned(const at::Tensor& t) {
  return rows_are_16_byte_aligned(t.data_ptr(), {t.size(0), t.size(1), t.size(2)},
                                  {t.stride(0), t.stride(1), t.stride(2)});
}

}  // namespace

// The tensor-core kernels serve float16/bfloat16 on sm_80 and newer when they can: every row of
// q, k, v must start on a 16-byte boundary (cp.async moves 16 bytes; a view at an odd element
// offset or with a stride that is not a multiple of 8 elements fails that), and scale must be
// >= 0 (the online softmax takes the max of the raw scores and multiplies it by the scale). The
// rest, and every call when the environment variable CVT_FAST_CUDA_ATTENTION=simt asks for it (a
// fallback and a second opinion when a result looks wrong), take the fp32 CUDA-core kernels,
// which read any such input. Read per call, so tests can switch it.
bool attention_use_tensor_cores(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  const at::ScalarType dtype = q.scalar_type();
  if (dtype != at::kHalf && dtype != at::kBFloat16) return false;
  const char* choice = std::getenv("CVT_FAST_CUDA_ATTENTION");
  if (choice != nullptr && std::strcmp(choice, "simt") == 0) return false;
  if (!(scale >= 0.0) || !rows_aligned(q) || !rows_aligned(k) || !rows_aligned(v)) return false;
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.device().index()));
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
  const bool tensor_cores = attention_use_tensor_cores(q, k, v, scale);
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
