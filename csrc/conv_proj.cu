// Convolutional projection of CvT: three depthwise k x k convolutions of one token tensor.
//   x: (B, T, C) tokens, T = cls + height*width, channels contiguous (batch/token strides free);
//   q = dwconv(x grid, wq, stride_q, padding_q) (+ bq), k and v the same with stride_kv,
//   padding_kv; outputs (B, cls + Ho*Wo, C) contiguous in x's dtype, tokens in row-major
//   (h, w) order; row 0 is x[:, 0] copied unchanged (no bias) when has_cls. Zero padding.
//   Weights (C, 1, k, k) of any floating dtype, converted to fp32 and transposed to (k*k, C)
//   by the wrapper (once per call, tiny), so a warp reads 32 consecutive channels of one tap.
// Backward: grad_x (B, T, C) (cls row: the sum of the three cls-row grads) and the weight
// grads (C, 1, k, k) in the weights' dtype. Bias grads are a sum over (B, tokens) done in Python.
// All arithmetic is fp32; 16-bit values are converted right after the shared-memory read and
// back at the global store.
//
// Fused path (CvT's case: stride_q 1, stride_kv 2, k in {3, 5}, paddings in [0, k)).
//   Anchors: the half-resolution grid (a, b). Anchor (a, b) owns the k/v output (a, b) and the
//   four q outputs (2a + i, 2b + j), i, j in {0, 1}. A CTA (8 warps, 256 threads) owns a tile of
//   kTileRows x kTileCols = 4 x 8 anchors (8 x 16 q outputs, 4 x 8 k/v outputs) and a chunk of
//   32 channels; lane = channel, warp = anchor column. One "item" is (image, tile); a CTA walks
//   items blockIdx.x, blockIdx.x + gridDim.x, ... so that the grid is one resident wave.
//   * forward: the x box the tile's outputs read (10 x 18 positions for k = 3, padding 1) goes
//     into shared memory by 16-byte cp.async copies (zero-filled outside the grid; a scalar
//     fallback where C, the strides or the pointer are not 16-byte multiples), double-buffered:
//     the next item's box is in flight while this one is computed. Each warp then streams the
//     rows of its box column once: every row it reads feeds the q rows (k + 1 columns) or the
//     k and v rows (k columns) that use it, with the weights of its channel in registers
//     (3 k^2 floats). So every x tile is loaded once from global memory and feeds q, k and v.
//   * backward, one kernel: the same item walk with four boxes per item (x, grad_q, grad_k,
//     grad_v). Anchor (a, b) also owns the x positions (2a - p_kv + i, 2b - p_kv + j): shifted
//     by p_kv so that the k/v taps reaching each x parity are fixed at compile time. grad_x is a
//     gather (no atomics): the flipped q kernel over the grad_q box, the parity-matched k/v taps
//     over the grad_k and grad_v boxes. The weight gradients of the outputs an anchor owns are
//     register partials per lane (3 k^2 floats), summed over the 8 warps in shared memory at the
//     end of the CTA, one partial row per CTA; a second kernel sums the rows in a fixed order
//     (deterministic, no float atomics).
// Generic path (any other stride, padding or kernel size): one warp per output (forward) or
//   input (grad_x) position and lane = channel, x read straight from global memory (L1/L2),
//   loads shared by the convolutions of one (stride, padding); weight gradients per (conv, tap)
//   block over a split of the output rows, summed by the same second-stage kernel. Index math
//   is 32-bit everywhere (one division per position or row, none per tap).
//
// Floor (DRAM, memory-bound: 2k^2 FLOPs per output element): forward reads x once and writes
// q, k, v: (B*T + B*Tq + 2*B*Tk) * C elements; backward reads x, grad_q, grad_k, grad_v and
// writes grad_x: (2*B*T + B*Tq + 2*B*Tk) * C elements, plus a few MB of fp32 weight partials.
// At CvT-13 batch 256, bf16, stage 1: 257 MB forward, 360 MB backward (csrc/NOTES.md has the
// H200 times).

#include "common.cuh"

#include <algorithm>
#include <cstring>
#include <type_traits>
#ifdef CVT_FAST_HOST_EMULATION
#include <atomic>
#include <vector>
#endif

namespace cvt_fast {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kGenericChunk = 32;    // generic kernels: channels per CTA, one per lane
constexpr int kTileRows = 4;         // anchor rows per tile: 8 q rows, 4 k/v rows
constexpr int kTileCols = kWarps;    // anchor columns per tile: one per warp
constexpr int kCopyBytes = 16;       // one cp.async
constexpr int kReduceRowLanes = kWarps;  // second stage: warps sharing one column of partials

// Channels per lane of the fused kernels: two for 16-bit data and k = 3 (one 4-byte shared-memory
// read, one store and one address per pair; 3 k^2 weights and 3 k^2 weight-gradient partials per
// channel still fit in registers), else one: k = 5 has 75 of each per channel already, and fp32
// pairs would double the backward's boxes past 227 KB of shared memory for some paddings.
template <typename scalar_t>
constexpr int lane_channels_for(int kernel) { return kernel == 3 && sizeof(scalar_t) == 2 ? 2 : 1; }
constexpr int chunk_channels(int lane_channels) { return 32 * lane_channels; }  // per CTA

// ---------------------------------------------------------------- cp.async, dynamic smem, umulhi
// 16-byte global -> shared copies, zero-filled past src_bytes (0 or 16). The emulation runs them as
// cuda_on_host.h's cp_async_issue does: per emulated thread, the destination poisoned (NaN) from
// issue until a wait of the issuing thread retires its group, so a warp that reads its box before
// its own wait (or a missing wait in one warp) shows as NaN in the outputs.
#ifdef CVT_FAST_HOST_EMULATION
inline unsigned mul_hi_u32(unsigned a, unsigned b) { return static_cast<unsigned>((uint64_t{a} * b) >> 32); }
inline void cp_async_16(void* dst, const void* src, int src_bytes) { cvt_emu::cp_async_issue(dst, src, src_bytes); }
inline void cp_async_commit() { cvt_emu::cp_async_commit_group(); }
template <int kPendingGroups>
inline void cp_async_wait() {
  cvt_emu::cp_async_wait_groups(kPendingGroups);
}
// Pair accesses of the fused kernels at an address that is not a multiple of the pair's size
// (read and reset by csrc/emulate/emulate_conv_proj.cpp; see load_pair).
inline std::atomic<int> g_emulated_misaligned_pairs{0};
// Blocks run one after another in the emulation, so one buffer serves every block of a launch;
// csrc/emulate/emulate_conv_proj.cpp sizes it before each launch.
inline unsigned char* g_emulated_dynamic_smem = nullptr;
inline unsigned char* dynamic_smem() { return g_emulated_dynamic_smem; }
#else
__device__ __forceinline__ unsigned mul_hi_u32(unsigned a, unsigned b) { return __umulhi(a, b); }
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
  const unsigned dst_shared = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst_shared), "l"(src), "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int kPendingGroups>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPendingGroups) : "memory");
}
__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char conv_proj_smem[];
  return conv_proj_smem;
}
#endif

// ---------------------------------------------------------------- geometry (host and emulation)

inline int out_size(int size, int kernel, int stride, int padding) { return (size + 2 * padding - kernel) / stride + 1; }
inline int div_up(int a, int b) { return (a + b - 1) / b; }

// Geometry of one convolution of the token grid (generic path).
struct ConvGeom {
  int kernel, stride, padding, out_h, out_w;
};

inline ConvGeom make_geom(int height, int width, int kernel, int stride, int padding) {
  return ConvGeom{kernel, stride, padding, out_size(height, kernel, stride, padding),
                  out_size(width, kernel, stride, padding)};
}

// The fused kernels handle CvT's strides for the kernel sizes they are instantiated for.
inline bool use_fused_path(int kernel, int stride_q, int stride_kv, int padding_q, int padding_kv) {
  return (kernel == 3 || kernel == 5) && stride_q == 1 && stride_kv == 2 && padding_q < kernel &&
         padding_kv < kernel;
}

// Division of non-negative ints below 2^31 by a divisor fixed per launch: n / d is
// umulhi(n, mul) >> shift with mul = ceil(2^(31 + ceil(log2 d)) / d) (d = 1: n itself). The item
// decomposition runs twice per item; a hardware-less 32-bit division there costs ~20 instructions.
struct FastDiv {
  int divisor;
  unsigned mul, shift;
};

inline FastDiv make_fast_div(int divisor) {
  FastDiv f{divisor, 0u, 0u};
  if (divisor > 1) {
    int log2_up = 0;
    while ((int64_t{1} << log2_up) < divisor) ++log2_up;
    f.mul = static_cast<unsigned>(((uint64_t{1} << (31 + log2_up)) + divisor - 1) / divisor);
    f.shift = static_cast<unsigned>(log2_up - 1);
  }
  return f;
}

__device__ __forceinline__ int fast_div(int n, const FastDiv& f) {
  return f.divisor == 1 ? n : static_cast<int>(mul_hi_u32(static_cast<unsigned>(n), f.mul) >> f.shift);
}

// Everything the fused kernels need to know about one call; boxes are in positions of their grid.
struct FusedPlan {
  int kernel, height, width, cls, channels;
  int pad_q, pad_kv;
  int hq, wq, hk, wk;         // q and k/v output grids
  int tiles_w, tiles, items;  // anchor tiles per row of tiles, per image; items = batch * tiles
  FastDiv by_tiles, by_tiles_w;
  int lo;                     // x box origin: (2*a0 - lo, 2*b0 - lo), lo = max(pad_q, pad_kv)
  int box_h, box_w;           // x box size
  int gq_lo, gq_h, gq_w;      // backward: grad_q box origin (2*a0 + gq_lo, 2*b0 + gq_lo) and size
  int gkv_h, gkv_w;           // backward: grad_k / grad_v boxes, origin (a0 - (k-1)/2, b0 - (k-1)/2)
};

// backward: the anchors must also cover every x position (2a - pad_kv + i).
inline FusedPlan make_fused_plan(bool backward, int batch, int channels, int height, int width, int cls, int kernel,
                                 int pad_q, int pad_kv) {
  FusedPlan p{};
  p.kernel = kernel;
  p.height = height;
  p.width = width;
  p.cls = cls;
  p.channels = channels;
  p.pad_q = pad_q;
  p.pad_kv = pad_kv;
  p.hq = out_size(height, kernel, 1, pad_q);
  p.wq = out_size(width, kernel, 1, pad_q);
  p.hk = out_size(height, kernel, 2, pad_kv);
  p.wk = out_size(width, kernel, 2, pad_kv);
  int anchors_h = std::max(p.hk, div_up(p.hq, 2));
  int anchors_w = std::max(p.wk, div_up(p.wq, 2));
  if (backward) {
    anchors_h = std::max(anchors_h, div_up(height + pad_kv, 2));
    anchors_w = std::max(anchors_w, div_up(width + pad_kv, 2));
  }
  p.tiles_w = div_up(anchors_w, kTileCols);
  p.tiles = div_up(anchors_h, kTileRows) * p.tiles_w;
  p.items = batch * p.tiles;
  p.by_tiles = make_fast_div(p.tiles);
  p.by_tiles_w = make_fast_div(p.tiles_w);
  // Rows of x the tile reads: q rows 2a0 + [0, 2R) at offsets [-pad_q, k - 1 - pad_q], k/v rows
  // a0 + [0, R) at 2a - pad_kv + [0, k).
  p.lo = std::max(pad_q, pad_kv);
  p.box_h = std::max(2 * kTileRows + kernel - 2 - pad_q, 2 * kTileRows + kernel - 3 - pad_kv) + p.lo + 1;
  p.box_w = std::max(2 * kTileCols + kernel - 2 - pad_q, 2 * kTileCols + kernel - 3 - pad_kv) + p.lo + 1;
  // grad_q rows that x rows 2a0 - pad_kv + [0, 2R) gather from, and the q rows the tile owns.
  p.gq_lo = pad_q - pad_kv - kernel + 1;
  p.gq_h = 2 * kTileRows + std::max(0, pad_q - pad_kv) - p.gq_lo;
  p.gq_w = 2 * kTileCols + std::max(0, pad_q - pad_kv) - p.gq_lo;
  p.gkv_h = kTileRows + (kernel - 1) / 2;
  p.gkv_w = kTileCols + (kernel - 1) / 2;
  return p;
}

// Dynamic shared memory of the fused kernels: two pipeline buffers; the backward reuses them
// at the end for the cross-warp weight-gradient sums (kWarps x k^2 x chunk floats).
template <typename scalar_t, int L>
int fused_fwd_smem_bytes(const FusedPlan& p) {
  return 2 * p.box_h * p.box_w * chunk_channels(L) * static_cast<int>(sizeof(scalar_t));
}

template <int L>
int fused_bwd_buffer_elems(const FusedPlan& p) {
  return (p.box_h * p.box_w + p.gq_h * p.gq_w + 2 * p.gkv_h * p.gkv_w) * chunk_channels(L);
}

template <typename scalar_t, int L>
int fused_bwd_smem_bytes(const FusedPlan& p) {
  const int buffers = 2 * fused_bwd_buffer_elems<L>(p) * static_cast<int>(sizeof(scalar_t));
  const int reduce = kWarps * p.kernel * p.kernel * chunk_channels(L) * static_cast<int>(sizeof(float));
  return std::max(buffers, reduce);
}

// ---------------------------------------------------------------- device helpers

// Copies box rows [row0, row0 + box_h) x columns [col0, col0 + box_w) of one image's token
// grid (grid_h x grid_w after `cls` leading tokens), channels [c0, c0 + kChunk), into `dst`
// (position-major, kChunk channels per position); zeros outside the grid and past `channels`.
// A warp copies one box row at a time: a row is contiguous in `dst`, so lane i's piece needs
// no division. `vec`: 16-byte copies (C, token stride and base are multiples of 16 bytes);
// otherwise one element per lane.
template <int kChunk, typename scalar_t>
__device__ __forceinline__ void fill_box(scalar_t* dst, const scalar_t* __restrict__ image, int64_t token_stride,
                                         int row0, int col0, int box_h, int box_w, int grid_h, int grid_w, int cls,
                                         int c0, int channels, bool vec) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int r = warp; r < box_h; r += kWarps) {
    const int gr = row0 + r;
    const bool row_ok = gr >= 0 && gr < grid_h;
    const scalar_t* src_row = image + (cls + gr * grid_w + col0) * token_stride + c0;  // only read when row_ok
    scalar_t* dst_row = dst + r * box_w * kChunk;
    if (vec) {
      constexpr int kVec = kCopyBytes / sizeof(scalar_t);
      constexpr int kVecsPerPosition = kChunk / kVec;
      for (int i = lane; i < box_w * kVecsPerPosition; i += 32) {
        const int s = i / kVecsPerPosition, part = i % kVecsPerPosition;
        const bool inside = row_ok && col0 + s >= 0 && col0 + s < grid_w && c0 + part * kVec < channels;
        const scalar_t* src = inside ? src_row + s * token_stride + part * kVec : image;
        cp_async_16(dst_row + i * kVec, src, inside ? kCopyBytes : 0);
      }
    } else {
      for (int i = lane; i < box_w * kChunk; i += 32) {
        const int s = i / kChunk;
        const bool inside = row_ok && col0 + s >= 0 && col0 + s < grid_w && c0 + i % kChunk < channels;
        dst_row[i] = inside ? src_row[s * token_stride + i % kChunk] : from_float<scalar_t>(0.0f);
      }
    }
  }
}

// A lane's L consecutive channels of one position: read from shared memory as one 2-, 4- or
// 8-byte load (the offset is a multiple of L elements), written to global memory as one store
// where `paired` (C even, so the offset is too) and all L channels exist, else one by one. The
// emulation does the pair accesses element by element and counts misaligned pairs, which the
// tests require to be zero: it is the one precondition of the vector accesses it cannot run.
template <typename scalar_t>
__device__ __forceinline__ void load_pair(const scalar_t* p, float (&v)[2]) {
#ifdef CVT_FAST_HOST_EMULATION
  if (reinterpret_cast<uintptr_t>(p) % (2 * sizeof(scalar_t)) != 0) ++g_emulated_misaligned_pairs;
  v[0] = to_float(p[0]);
  v[1] = to_float(p[1]);
#else
  if constexpr (std::is_same_v<scalar_t, float>) {
    const float2 f = *reinterpret_cast<const float2*>(p);
    v[0] = f.x;
    v[1] = f.y;
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const unsigned bits = *reinterpret_cast<const unsigned*>(p);
    v[0] = __uint_as_float(bits << 16);
    v[1] = __uint_as_float(bits & 0xffff0000u);
  } else {
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(p));
    v[0] = f.x;
    v[1] = f.y;
  }
#endif
}

template <typename scalar_t>
__device__ __forceinline__ void store_pair(scalar_t* p, float a, float b) {
#ifdef CVT_FAST_HOST_EMULATION
  if (reinterpret_cast<uintptr_t>(p) % (2 * sizeof(scalar_t)) != 0) ++g_emulated_misaligned_pairs;
  p[0] = from_float<scalar_t>(a);
  p[1] = from_float<scalar_t>(b);
#else
  if constexpr (std::is_same_v<scalar_t, float>) {
    *reinterpret_cast<float2*>(p) = make_float2(a, b);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
  } else {
    *reinterpret_cast<__half2*>(p) = __floats2half2_rn(a, b);
  }
#endif
}

template <typename scalar_t, int L>
__device__ __forceinline__ void load_lane(const scalar_t* p, float (&v)[L]) {
  if constexpr (L == 2) {
    load_pair(p, v);
  } else {
    v[0] = to_float(p[0]);
  }
}

template <typename scalar_t, int L>
__device__ __forceinline__ void store_lane(scalar_t* p, const float (&v)[L], int valid, bool paired) {
  if constexpr (L == 2) {
    if (paired && valid == 2) {
      store_pair(p, v[0], v[1]);
      return;
    }
  }
#pragma unroll
  for (int l = 0; l < L; ++l) {
    if (l < valid) p[l] = from_float<scalar_t>(v[l]);
  }
}

// The item's image and anchor tile origin (a0, b0).
struct Item {
  int image, tile, a0, b0;
};

__device__ __forceinline__ Item decompose_item(int item, const FusedPlan& p) {
  Item it;
  it.image = fast_div(item, p.by_tiles);
  it.tile = item - it.image * p.tiles;
  const int tile_row = fast_div(it.tile, p.by_tiles_w);
  it.a0 = tile_row * kTileRows;
  it.b0 = (it.tile - tile_row * p.tiles_w) * kTileCols;
  return it;
}

// This lane's channels: c, c + 1, ..., c + L - 1 of which `valid` lie below C.
template <int L>
struct LaneChannels {
  int c, valid;
  bool paired;  // L-channel global stores are aligned (C even)
};

template <int L>
__device__ __forceinline__ LaneChannels<L> lane_channels(int channels) {
  LaneChannels<L> lc;
  lc.c = blockIdx.y * chunk_channels(L) + (threadIdx.x % 32) * L;
  lc.valid = channels - lc.c < 0 ? 0 : (channels - lc.c < L ? channels - lc.c : L);
  lc.paired = channels % 2 == 0;
  return lc;
}

template <int kTaps, int L>
__device__ __forceinline__ void load_weights(float (&w)[kTaps][L], const float* __restrict__ w_t, int channels,
                                             const LaneChannels<L>& lc) {
#pragma unroll
  for (int t = 0; t < kTaps; ++t) {
#pragma unroll
    for (int l = 0; l < L; ++l) w[t][l] = l < lc.valid ? w_t[t * channels + lc.c + l] : 0.0f;
  }
}

template <int L>
__device__ __forceinline__ void load_bias(float (&b)[L], const float* __restrict__ bias, const LaneChannels<L>& lc) {
#pragma unroll
  for (int l = 0; l < L; ++l) b[l] = bias != nullptr && l < lc.valid ? bias[lc.c + l] : 0.0f;
}

// ---------------------------------------------------------------- fused forward

// Warp `warp` of the tile: q rows 2a0 + [0, 2R) at columns 2b0 + 2*warp + {0, 1}. Streams x box
// rows dq + [0, 2R + k - 1), k + 1 columns each; a row feeds every q row whose window holds it.
template <typename scalar_t, int K, int L>
__device__ __forceinline__ void fwd_tile_q(const scalar_t* xs, const FusedPlan& p, const float (&w)[K * K][L],
                                           const float (&bias)[L], scalar_t* __restrict__ q_image, int a0, int b0,
                                           int warp, const LaneChannels<L>& lc) {
  constexpr int kChunk = chunk_channels(L);
  const int dq = p.lo - p.pad_q;
  const int row_stride = p.box_w * kChunk;
  const scalar_t* base = xs + (dq * p.box_w + 2 * warp + dq) * kChunk;
  // This lane's q element at row 2a0, column 2b0 + 2*warp; rows step by wq tokens.
  const int ow = 2 * b0 + 2 * warp;
  scalar_t* out = q_image + (p.cls + 2 * a0 * p.wq + ow) * p.channels + lc.c;  // advanced row by row
  const int row_step = p.wq * p.channels, rows_left = p.hq - 2 * a0;
  const bool col0_ok = ow < p.wq, col1_ok = ow + 1 < p.wq;
  float acc[2 * kTileRows][2][L];
#pragma unroll
  for (int rr = 0; rr < 2 * kTileRows + K - 1; ++rr) {
    float xr[K + 1][L];
#pragma unroll
    for (int cc = 0; cc <= K; ++cc) load_lane(base + rr * row_stride + cc * kChunk, xr[cc]);
#pragma unroll
    for (int i = 0; i < 2 * kTileRows; ++i) {
      const int dy = rr - i;
      if (dy < 0 || dy >= K) continue;
#pragma unroll
      for (int l = 0; l < L; ++l) {
        if (dy == 0) acc[i][0][l] = acc[i][1][l] = bias[l];
#pragma unroll
        for (int dx = 0; dx < K; ++dx) {
          acc[i][0][l] += xr[dx][l] * w[dy * K + dx][l];
          acc[i][1][l] += xr[dx + 1][l] * w[dy * K + dx][l];
        }
      }
      if (dy == K - 1) {  // rows finish in order
        if (i < rows_left && col0_ok) store_lane(out, acc[i][0], lc.valid, lc.paired);
        if (i < rows_left && col1_ok) store_lane(out + p.channels, acc[i][1], lc.valid, lc.paired);
        out += row_step;
      }
    }
  }
}

// Warp `warp` of the tile: k and v rows a0 + [0, R) at column b0 + warp. Streams x box rows
// dkv + [0, 2R + k - 2), k columns each; one read feeds both k and v.
template <typename scalar_t, int K, int L>
__device__ __forceinline__ void fwd_tile_kv(const scalar_t* xs, const FusedPlan& p, const float (&wk)[K * K][L],
                                            const float (&wv)[K * K][L], const float (&bias_k)[L],
                                            const float (&bias_v)[L], scalar_t* __restrict__ k_image,
                                            scalar_t* __restrict__ v_image, int a0, int b0, int warp,
                                            const LaneChannels<L>& lc) {
  constexpr int kChunk = chunk_channels(L);
  const int dkv = p.lo - p.pad_kv;
  const int row_stride = p.box_w * kChunk;
  const scalar_t* base = xs + (dkv * p.box_w + 2 * warp + dkv) * kChunk;
  // This lane's k/v element at row a0, column b0 + warp; rows step by wk tokens.
  const int ow = b0 + warp;
  const int offset = (p.cls + a0 * p.wk + ow) * p.channels + lc.c;
  scalar_t* k_out = k_image + offset;
  scalar_t* v_out = v_image + offset;
  const int row_step = p.wk * p.channels, rows_left = p.hk - a0;
  const bool col_ok = ow < p.wk;
  float acc_k[kTileRows][L], acc_v[kTileRows][L];
#pragma unroll
  for (int rr = 0; rr < 2 * kTileRows + K - 2; ++rr) {
    float xr[K][L];
#pragma unroll
    for (int cc = 0; cc < K; ++cc) load_lane(base + rr * row_stride + cc * kChunk, xr[cc]);
#pragma unroll
    for (int j = 0; j < kTileRows; ++j) {
      const int dy = rr - 2 * j;
      if (dy < 0 || dy >= K) continue;
#pragma unroll
      for (int l = 0; l < L; ++l) {
        if (dy == 0) {
          acc_k[j][l] = bias_k[l];
          acc_v[j][l] = bias_v[l];
        }
#pragma unroll
        for (int dx = 0; dx < K; ++dx) {
          acc_k[j][l] += xr[dx][l] * wk[dy * K + dx][l];
          acc_v[j][l] += xr[dx][l] * wv[dy * K + dx][l];
        }
      }
      if (dy == K - 1) {  // rows finish in order
        if (col_ok && j < rows_left) {
          store_lane(k_out, acc_k[j], lc.valid, lc.paired);
          store_lane(v_out, acc_v[j], lc.valid, lc.paired);
        }
        k_out += row_step;
        v_out += row_step;
      }
    }
  }
}

// grid (CTAs per channel chunk, channel chunks); block kThreads; dynamic smem fused_fwd_smem_bytes.
template <typename scalar_t, int K>
__global__ void __launch_bounds__(kThreads, K <= 3 ? 2 : 2)
conv_proj_fwd_fused_kernel(const scalar_t* __restrict__ x, int64_t x_sb, int64_t x_st, const float* __restrict__ wq,
                           const float* __restrict__ wk, const float* __restrict__ wv, const float* __restrict__ bq,
                           const float* __restrict__ bk, const float* __restrict__ bv, scalar_t* __restrict__ q,
                           scalar_t* __restrict__ k, scalar_t* __restrict__ v, FusedPlan p, bool vec) {
  constexpr int kTaps = K * K;
  constexpr int L = lane_channels_for<scalar_t>(K);
  constexpr int kChunk = chunk_channels(L);
  scalar_t* const smem = reinterpret_cast<scalar_t*>(dynamic_smem());
  const int buffer_elems = p.box_h * p.box_w * kChunk;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int c0 = blockIdx.y * kChunk;
  const LaneChannels<L> lc = lane_channels<L>(p.channels);
  float w_q[kTaps][L], w_k[kTaps][L], w_v[kTaps][L], b_q[L], b_k[L], b_v[L];
  load_weights(w_q, wq, p.channels, lc);
  load_weights(w_k, wk, p.channels, lc);
  load_weights(w_v, wv, p.channels, lc);
  load_bias(b_q, bq, lc);
  load_bias(b_k, bk, lc);
  load_bias(b_v, bv, lc);
  const int64_t tokens_q = p.cls + p.hq * p.wq, tokens_kv = p.cls + p.hk * p.wk;

  auto issue = [&](int item, int buffer) {
    const Item it = decompose_item(item, p);
    fill_box<kChunk>(smem + buffer * buffer_elems, x + it.image * x_sb, x_st, 2 * it.a0 - p.lo, 2 * it.b0 - p.lo,
                     p.box_h, p.box_w, p.height, p.width, p.cls, c0, p.channels, vec);
  };

  if (static_cast<int>(blockIdx.x) < p.items) issue(blockIdx.x, 0);
  cp_async_commit();
  int buffer = 0;
  for (int item = blockIdx.x; item < p.items; item += gridDim.x, buffer ^= 1) {
    // The next item's box goes into the other buffer, freed by the barrier that ended the last step.
    if (item + static_cast<int>(gridDim.x) < p.items) issue(item + gridDim.x, buffer ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    const Item it = decompose_item(item, p);
    const scalar_t* xs = smem + buffer * buffer_elems + lane * L;
    scalar_t* q_image = q + it.image * tokens_q * p.channels;
    scalar_t* k_image = k + it.image * tokens_kv * p.channels;
    scalar_t* v_image = v + it.image * tokens_kv * p.channels;
    fwd_tile_q<scalar_t, K, L>(xs, p, w_q, b_q, q_image, it.a0, it.b0, warp, lc);
    fwd_tile_kv<scalar_t, K, L>(xs, p, w_k, w_v, b_k, b_v, k_image, v_image, it.a0, it.b0, warp, lc);
    if (p.cls && it.tile == 0 && warp == 0) {  // the cls token is never convolved
      for (int l = 0; l < lc.valid; ++l) {
        const scalar_t cls_value = x[it.image * x_sb + lc.c + l];
        q_image[lc.c + l] = cls_value;
        k_image[lc.c + l] = cls_value;
        v_image[lc.c + l] = cls_value;
      }
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------- fused backward

// Pointers into one pipeline buffer of the backward, each already offset by the lane.
template <typename scalar_t>
struct BwdBoxes {
  const scalar_t *x, *gq, *gk, *gv;
};

// grad_x at x positions (2a0 - pad_kv + ix, 2b0 - pad_kv + 2*warp + jx), ix in [0, 2R), jx in
// {0, 1}, from grad_q: x row X gathers grad_q rows X + pad_q - dy, which is grad_q box row
// ix + k - 1 - dy, so the warp streams box rows [0, 2R + k - 1), k + 1 columns each.
template <typename scalar_t, int K, int L>
__device__ __forceinline__ void bwd_grad_x_from_q(float (&gx)[2 * kTileRows][2][L], const scalar_t* gqs,
                                                  const FusedPlan& p, const float (&w)[K * K][L], int warp) {
  constexpr int kChunk = chunk_channels(L);
  const int row_stride = p.gq_w * kChunk;
  const scalar_t* base = gqs + 2 * warp * kChunk;
#pragma unroll
  for (int rr = 0; rr < 2 * kTileRows + K - 1; ++rr) {
    float g[K + 1][L];
#pragma unroll
    for (int cc = 0; cc <= K; ++cc) load_lane(base + rr * row_stride + cc * kChunk, g[cc]);
#pragma unroll
    for (int ix = 0; ix < 2 * kTileRows; ++ix) {
      const int d = rr - ix;
      if (d < 0 || d >= K) continue;
      const int dy = K - 1 - d;
#pragma unroll
      for (int dx = 0; dx < K; ++dx) {
#pragma unroll
        for (int l = 0; l < L; ++l) {
          gx[ix][0][l] += g[K - 1 - dx][l] * w[dy * K + dx][l];
          gx[ix][1][l] += g[K - dx][l] * w[dy * K + dx][l];
        }
      }
    }
  }
}

// grad_x from grad_k and grad_v: x row 2a - pad_kv + i is read by k/v row a - (dy - i)/2 through
// the taps dy = i, i + 2, ...; with the box origin at a0 - (k-1)/2 that is box row
// j + (k-1)/2 - (dy - i)/2 for anchor row j. The warp streams box rows [0, R + (k-1)/2).
template <typename scalar_t, int K, int L>
__device__ __forceinline__ void bwd_grad_x_from_kv(float (&gx)[2 * kTileRows][2][L], const scalar_t* gks,
                                                   const scalar_t* gvs, const FusedPlan& p,
                                                   const float (&wk)[K * K][L], const float (&wv)[K * K][L],
                                                   int warp) {
  constexpr int kChunk = chunk_channels(L);
  constexpr int kHalf = (K - 1) / 2;
  const int row_stride = p.gkv_w * kChunk;
  const int offset = warp * kChunk;
#pragma unroll
  for (int rr = 0; rr < kTileRows + kHalf; ++rr) {
    float gk[kHalf + 1][L], gv[kHalf + 1][L];
#pragma unroll
    for (int cc = 0; cc <= kHalf; ++cc) {
      load_lane(gks + offset + rr * row_stride + cc * kChunk, gk[cc]);
      load_lane(gvs + offset + rr * row_stride + cc * kChunk, gv[cc]);
    }
#pragma unroll
    for (int j = 0; j < kTileRows; ++j) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int dy = i; dy < K; dy += 2) {
          if (j + kHalf - (dy - i) / 2 != rr) continue;
#pragma unroll
          for (int jx = 0; jx < 2; ++jx) {
#pragma unroll
            for (int dx = jx; dx < K; dx += 2) {
              const int cc = kHalf - (dx - jx) / 2;
#pragma unroll
              for (int l = 0; l < L; ++l) {
                gx[2 * j + i][jx][l] += gk[cc][l] * wk[dy * K + dx][l];
                gx[2 * j + i][jx][l] += gv[cc][l] * wv[dy * K + dx][l];
              }
            }
          }
        }
      }
    }
  }
}

// Weight gradients of the q outputs the warp owns: dwq[dy][dx] += grad_q(o) * x(o - pad_q + d).
// Streams x box rows dq + [0, 2R + k - 1) like the forward; grad_q(2a0 + i, 2b0 + 2*warp + j)
// sits at grad_q box (i - gq_lo, 2*warp + j - gq_lo).
template <typename scalar_t, int K, int L>
__device__ __forceinline__ void bwd_weight_q(float (&dw)[K * K][L], const BwdBoxes<scalar_t>& s, const FusedPlan& p,
                                             int warp) {
  constexpr int kChunk = chunk_channels(L);
  const int dq = p.lo - p.pad_q;
  const int x_stride = p.box_w * kChunk, g_stride = p.gq_w * kChunk;
  const scalar_t* xbase = s.x + (dq * p.box_w + 2 * warp + dq) * kChunk;
  const scalar_t* gbase = s.gq + (-p.gq_lo * p.gq_w + 2 * warp - p.gq_lo) * kChunk;
  float g[2 * kTileRows][2][L];
#pragma unroll
  for (int rr = 0; rr < 2 * kTileRows + K - 1; ++rr) {
    float xr[K + 1][L];
#pragma unroll
    for (int cc = 0; cc <= K; ++cc) load_lane(xbase + rr * x_stride + cc * kChunk, xr[cc]);
#pragma unroll
    for (int i = 0; i < 2 * kTileRows; ++i) {
      const int dy = rr - i;
      if (dy < 0 || dy >= K) continue;
      if (dy == 0) {
        load_lane(gbase + i * g_stride, g[i][0]);
        load_lane(gbase + i * g_stride + kChunk, g[i][1]);
      }
#pragma unroll
      for (int dx = 0; dx < K; ++dx) {
#pragma unroll
        for (int l = 0; l < L; ++l) {
          dw[dy * K + dx][l] += g[i][0][l] * xr[dx][l];
          dw[dy * K + dx][l] += g[i][1][l] * xr[dx + 1][l];
        }
      }
    }
  }
}

// Weight gradients of the k/v outputs the warp owns: (a0 + j, b0 + warp) at grad box
// (j + (k-1)/2, warp + (k-1)/2); x box rows dkv + [0, 2R + k - 2) as in the forward.
template <typename scalar_t, int K, int L>
__device__ __forceinline__ void bwd_weight_kv(float (&dwk)[K * K][L], float (&dwv)[K * K][L],
                                              const BwdBoxes<scalar_t>& s, const FusedPlan& p, int warp) {
  constexpr int kChunk = chunk_channels(L);
  constexpr int kHalf = (K - 1) / 2;
  const int dkv = p.lo - p.pad_kv;
  const int x_stride = p.box_w * kChunk, g_stride = p.gkv_w * kChunk;
  const scalar_t* xbase = s.x + (dkv * p.box_w + 2 * warp + dkv) * kChunk;
  const int g_offset = (kHalf * p.gkv_w + warp + kHalf) * kChunk;
  float gk[kTileRows][L], gv[kTileRows][L];
#pragma unroll
  for (int rr = 0; rr < 2 * kTileRows + K - 2; ++rr) {
    float xr[K][L];
#pragma unroll
    for (int cc = 0; cc < K; ++cc) load_lane(xbase + rr * x_stride + cc * kChunk, xr[cc]);
#pragma unroll
    for (int j = 0; j < kTileRows; ++j) {
      const int dy = rr - 2 * j;
      if (dy < 0 || dy >= K) continue;
      if (dy == 0) {
        load_lane(s.gk + g_offset + j * g_stride, gk[j]);
        load_lane(s.gv + g_offset + j * g_stride, gv[j]);
      }
#pragma unroll
      for (int dx = 0; dx < K; ++dx) {
#pragma unroll
        for (int l = 0; l < L; ++l) {
          dwk[dy * K + dx][l] += gk[j][l] * xr[dx][l];
          dwv[dy * K + dx][l] += gv[j][l] * xr[dx][l];
        }
      }
    }
  }
}

// Sums one convolution's per-warp weight gradients over the warps (fixed order) and writes the
// CTA's partial row partial[blockIdx.x][conv][tap][c]. Ends with a barrier: `red` is reused.
template <int kTaps, int L>
__device__ __forceinline__ void store_weight_partial(const float (&dw)[kTaps][L], float* red,
                                                     float* __restrict__ partial, int conv, int channels) {
  constexpr int kChunk = chunk_channels(L);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int c0 = blockIdx.y * kChunk;
#pragma unroll
  for (int t = 0; t < kTaps; ++t) {
#pragma unroll
    for (int l = 0; l < L; ++l) red[(warp * kTaps + t) * kChunk + lane * L + l] = dw[t][l];
  }
  __syncthreads();
  for (int e = threadIdx.x; e < kTaps * kChunk; e += kThreads) {
    const int t = e / kChunk, ch = e % kChunk;
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += red[(w * kTaps + t) * kChunk + ch];
    if (c0 + ch < channels) {
      partial[((static_cast<int64_t>(blockIdx.x) * 3 + conv) * kTaps + t) * channels + c0 + ch] = sum;
    }
  }
  __syncthreads();
}

// grid (CTAs per channel chunk, channel chunks); block kThreads; dynamic smem fused_bwd_smem_bytes.
// grad_q/k/v and grad_x contiguous. partial: (gridDim.x, 3, k*k, C) fp32.
template <typename scalar_t, int K>
__global__ void __launch_bounds__(kThreads, 1)
conv_proj_bwd_fused_kernel(const scalar_t* __restrict__ grad_q, const scalar_t* __restrict__ grad_k,
                           const scalar_t* __restrict__ grad_v, const scalar_t* __restrict__ x, int64_t x_sb,
                           int64_t x_st, const float* __restrict__ wq, const float* __restrict__ wk,
                           const float* __restrict__ wv, scalar_t* __restrict__ grad_x, float* __restrict__ partial,
                           FusedPlan p, bool vec_x, bool vec_grad) {
  constexpr int kTaps = K * K;
  constexpr int kHalf = (K - 1) / 2;
  constexpr int L = lane_channels_for<scalar_t>(K);
  constexpr int kChunk = chunk_channels(L);
  scalar_t* const smem = reinterpret_cast<scalar_t*>(dynamic_smem());
  const int x_elems = p.box_h * p.box_w * kChunk, gq_elems = p.gq_h * p.gq_w * kChunk;
  const int gkv_elems = p.gkv_h * p.gkv_w * kChunk;
  const int buffer_elems = x_elems + gq_elems + 2 * gkv_elems;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int c0 = blockIdx.y * kChunk;
  const LaneChannels<L> lc = lane_channels<L>(p.channels);
  float w_q[kTaps][L], w_k[kTaps][L], w_v[kTaps][L];
  load_weights(w_q, wq, p.channels, lc);
  load_weights(w_k, wk, p.channels, lc);
  load_weights(w_v, wv, p.channels, lc);
  float dw_q[kTaps][L], dw_k[kTaps][L], dw_v[kTaps][L];
#pragma unroll
  for (int t = 0; t < kTaps; ++t) {
#pragma unroll
    for (int l = 0; l < L; ++l) dw_q[t][l] = dw_k[t][l] = dw_v[t][l] = 0.0f;
  }
  const int64_t tokens = p.cls + p.height * p.width;
  const int64_t tokens_q = p.cls + p.hq * p.wq, tokens_kv = p.cls + p.hk * p.wk;

  auto issue = [&](int item, int buffer) {
    const Item it = decompose_item(item, p);
    scalar_t* dst = smem + buffer * buffer_elems;
    fill_box<kChunk>(dst, x + it.image * x_sb, x_st, 2 * it.a0 - p.lo, 2 * it.b0 - p.lo, p.box_h, p.box_w, p.height,
                     p.width, p.cls, c0, p.channels, vec_x);
    fill_box<kChunk>(dst + x_elems, grad_q + it.image * tokens_q * p.channels, p.channels, 2 * it.a0 + p.gq_lo,
                     2 * it.b0 + p.gq_lo, p.gq_h, p.gq_w, p.hq, p.wq, p.cls, c0, p.channels, vec_grad);
    fill_box<kChunk>(dst + x_elems + gq_elems, grad_k + it.image * tokens_kv * p.channels, p.channels,
                     it.a0 - kHalf, it.b0 - kHalf, p.gkv_h, p.gkv_w, p.hk, p.wk, p.cls, c0, p.channels, vec_grad);
    fill_box<kChunk>(dst + x_elems + gq_elems + gkv_elems, grad_v + it.image * tokens_kv * p.channels, p.channels,
                     it.a0 - kHalf, it.b0 - kHalf, p.gkv_h, p.gkv_w, p.hk, p.wk, p.cls, c0, p.channels, vec_grad);
  };

  if (static_cast<int>(blockIdx.x) < p.items) issue(blockIdx.x, 0);
  cp_async_commit();
  int buffer = 0;
  for (int item = blockIdx.x; item < p.items; item += gridDim.x, buffer ^= 1) {
    if (item + static_cast<int>(gridDim.x) < p.items) issue(item + gridDim.x, buffer ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    const Item it = decompose_item(item, p);
    const scalar_t* buf = smem + buffer * buffer_elems + lane * L;
    const BwdBoxes<scalar_t> boxes{buf, buf + x_elems, buf + x_elems + gq_elems, buf + x_elems + gq_elems + gkv_elems};
    float gx[2 * kTileRows][2][L];
#pragma unroll
    for (int ix = 0; ix < 2 * kTileRows; ++ix) {
#pragma unroll
      for (int l = 0; l < L; ++l) gx[ix][0][l] = gx[ix][1][l] = 0.0f;
    }
    bwd_grad_x_from_q<scalar_t, K, L>(gx, boxes.gq, p, w_q, warp);
    bwd_grad_x_from_kv<scalar_t, K, L>(gx, boxes.gk, boxes.gv, p, w_k, w_v, warp);
    bwd_weight_q<scalar_t, K, L>(dw_q, boxes, p, warp);
    bwd_weight_kv<scalar_t, K, L>(dw_k, dw_v, boxes, p, warp);

    // This lane's grad_x element at x row 2a0 - pad_kv, column 2b0 - pad_kv + 2*warp.
    scalar_t* gx_image = grad_x + it.image * tokens * p.channels;
    const int row0 = 2 * it.a0 - p.pad_kv, col = 2 * it.b0 - p.pad_kv + 2 * warp;
    scalar_t* out = gx_image + (p.cls + row0 * p.width + col) * p.channels + lc.c;
    const int row_step = p.width * p.channels;
    const bool col0_ok = col >= 0 && col < p.width, col1_ok = col + 1 >= 0 && col + 1 < p.width;
#pragma unroll
    for (int ix = 0; ix < 2 * kTileRows; ++ix, out += row_step) {
      if (row0 + ix < 0 || row0 + ix >= p.height) continue;
      if (col0_ok) store_lane(out, gx[ix][0], lc.valid, lc.paired);
      if (col1_ok) store_lane(out + p.channels, gx[ix][1], lc.valid, lc.paired);
    }
    if (p.cls && it.tile == 0 && warp == 0) {  // the cls row went to all three outputs
      for (int l = 0; l < lc.valid; ++l) {
        const int c = lc.c + l;
        const float sum = to_float(grad_q[it.image * tokens_q * p.channels + c]) +
                          to_float(grad_k[it.image * tokens_kv * p.channels + c]) +
                          to_float(grad_v[it.image * tokens_kv * p.channels + c]);
        gx_image[c] = from_float<scalar_t>(sum);
      }
    }
    __syncthreads();
  }

  float* red = reinterpret_cast<float*>(dynamic_smem());
  store_weight_partial(dw_q, red, partial, 0, p.channels);
  store_weight_partial(dw_k, red, partial, 1, p.channels);
  store_weight_partial(dw_v, red, partial, 2, p.channels);
}

// ---------------------------------------------------------------- second stage of the weight gradients

// out_conv[c][tap] = sum over rows r of partial[r][conv][tap][c], rows in a fixed order
// (deterministic). Block (32 entries) x (kReduceRowLanes row lanes); blocks stride over the
// 3 * taps * C entries (the wrapper launches one block per 32 of them).
__global__ void __launch_bounds__(kThreads)
conv_proj_wgrad_reduce_kernel(const float* __restrict__ partial, int rows, int taps, int channels,
                              float* __restrict__ out_q, float* __restrict__ out_k, float* __restrict__ out_v) {
  __shared__ float lane_sums[kReduceRowLanes][32];
  const int lane = threadIdx.x % 32, row_lane = threadIdx.x / 32;
  const int entries = 3 * taps * channels, per_conv = taps * channels;
  for (int first = blockIdx.x * 32; first < entries; first += gridDim.x * 32) {
    const int e = first + lane;
    float sum = 0.0f;
    if (e < entries) {
      for (int r = row_lane; r < rows; r += kReduceRowLanes) sum += partial[static_cast<int64_t>(r) * entries + e];
    }
    lane_sums[row_lane][lane] = sum;
    __syncthreads();
    if (row_lane == 0 && e < entries) {
      float total = 0.0f;
#pragma unroll
      for (int l = 0; l < kReduceRowLanes; ++l) total += lane_sums[l][lane];
      const int conv = e / per_conv, tap = (e - conv * per_conv) / channels, c = e % channels;
      float* out = conv == 0 ? out_q : (conv == 1 ? out_k : out_v);
      out[c * taps + tap] = total;
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------- generic path

// Grid of the generic forward and grad_x kernels: x = (image, block of kWarps positions), the image
// outermost, y = channel chunk. Images are folded into x (up to 2^31 - 1 blocks), not put on z
// (at most 65535): an evaluation batch of 65536 images or more launches too.
inline dim3 generic_position_grid(int positions, int channels, int64_t batch) {
  return dim3(static_cast<unsigned>(div_up(positions, kWarps) * batch),
              static_cast<unsigned>(div_up(channels, kGenericChunk)));
}

// Whether that grid is within CUDA's limits (x <= 2^31 - 1, y <= 65535); the host raises otherwise.
inline bool generic_position_grid_fits(int positions, int channels, int64_t batch) {
  return int64_t{div_up(positions, kWarps)} * batch <= int64_t{2147483647} && div_up(channels, kGenericChunk) <= 65535;
}

// The generic forward's launches: one per distinct (stride, padding) among q and k/v. Launch i
// computes outputs first .. first + count - 1 (q = 0, k = 1, v = 2) with geometry g.
struct GenericLaunch {
  ConvGeom g;
  int first, count;
};
struct GenericLaunches {
  GenericLaunch launch[2];
  int n;
};

inline GenericLaunches generic_forward_launches(const ConvGeom& gq, const ConvGeom& gkv) {
  if (gq.stride == gkv.stride && gq.padding == gkv.padding) return {{{gq, 0, 3}, {gq, 0, 0}}, 1};
  return {{{gq, 0, 1}, {gkv, 1, 2}}, 2};
}

// Slot j (0..2) of a launch's kernel arguments from a 3-entry host array of q, k, v (weights,
// biases, outputs): entry first + j, or null past the launch's count. Never reads past entry 2
// (first + count <= 3); the k/v launch used to pass `weights + 1` and read its slot 2, entry 3.
template <typename T>
inline T* generic_slot(const GenericLaunch& launch, T* const (&all)[3], int j) {
  return j < launch.count ? all[launch.first + j] : nullptr;
}

// Up to three convolutions sharing one geometry (n_out of o0, o1, o2): each x read feeds all.
// grid generic_position_grid(out_h*out_w, channels, batch); one warp per output position.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
conv_proj_fwd_generic_kernel(const scalar_t* __restrict__ x, int64_t x_sb, int64_t x_st, const float* __restrict__ w0,
                             const float* __restrict__ w1, const float* __restrict__ w2, const float* __restrict__ b0,
                             const float* __restrict__ b1, const float* __restrict__ b2, scalar_t* __restrict__ o0,
                             scalar_t* __restrict__ o1, scalar_t* __restrict__ o2, int n_out, int channels,
                             int height, int width, int cls, ConvGeom g) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int c = blockIdx.y * kGenericChunk + lane;
  if (c >= channels) return;  // no barriers in this kernel
  const int per_image = (g.out_h * g.out_w + kWarps - 1) / kWarps;  // as generic_position_grid
  const int64_t b = blockIdx.x / per_image;
  const int block = static_cast<int>(blockIdx.x - b * per_image);
  const scalar_t* x_image = x + b * x_sb;
  const int64_t out_offset = b * (cls + g.out_h * g.out_w) * channels;
  if (cls && block == 0 && warp == 0) {  // the cls token is never convolved
    const scalar_t cls_value = x_image[c];
    o0[out_offset + c] = cls_value;
    if (n_out > 1) o1[out_offset + c] = cls_value;
    if (n_out > 2) o2[out_offset + c] = cls_value;
  }
  const int position = block * kWarps + warp;
  if (position >= g.out_h * g.out_w) return;
  const int oh = position / g.out_w, ow = position - oh * g.out_w;
  const int ih0 = oh * g.stride - g.padding, iw0 = ow * g.stride - g.padding;
  float acc0 = b0 != nullptr ? b0[c] : 0.0f;
  float acc1 = b1 != nullptr ? b1[c] : 0.0f;
  float acc2 = b2 != nullptr ? b2[c] : 0.0f;
  for (int kh = 0; kh < g.kernel; ++kh) {
    const int ih = ih0 + kh;
    if (ih < 0 || ih >= height) continue;
    for (int kw = 0; kw < g.kernel; ++kw) {
      const int iw = iw0 + kw;
      if (iw < 0 || iw >= width) continue;
      const float xv = to_float(x_image[(cls + ih * width + iw) * x_st + c]);
      const int w_index = (kh * g.kernel + kw) * channels + c;
      acc0 += xv * w0[w_index];
      if (n_out > 1) acc1 += xv * w1[w_index];
      if (n_out > 2) acc2 += xv * w2[w_index];
    }
  }
  const int64_t offset = out_offset + static_cast<int64_t>(cls + position) * channels + c;
  o0[offset] = from_float<scalar_t>(acc0);
  if (n_out > 1) o1[offset] = from_float<scalar_t>(acc1);
  if (n_out > 2) o2[offset] = from_float<scalar_t>(acc2);
}

// Sum over the outputs of one convolution that read input (ih, iw): output oh reads ih through
// tap kh = ih + padding - oh*stride, so only the taps of one residue class mod stride reach it,
// with oh falling by one per step of `stride` taps (one division per position, none per tap).
template <typename scalar_t>
__device__ __forceinline__ float gather_grad(const scalar_t* __restrict__ grad_image, const float* __restrict__ w,
                                             const ConvGeom g, int cls, int channels, int c, int ih, int iw) {
  const int th = ih + g.padding, tw = iw + g.padding;
  const int kh0 = th % g.stride, kw0 = tw % g.stride;
  const int oh0 = th / g.stride, ow0 = tw / g.stride;
  float acc = 0.0f;
  for (int kh = kh0, oh = oh0; kh < g.kernel && oh >= 0; kh += g.stride, --oh) {
    if (oh >= g.out_h) continue;
    for (int kw = kw0, ow = ow0; kw < g.kernel && ow >= 0; kw += g.stride, --ow) {
      if (ow >= g.out_w) continue;
      acc += to_float(grad_image[(cls + oh * g.out_w + ow) * channels + c]) * w[(kh * g.kernel + kw) * channels + c];
    }
  }
  return acc;
}

// grad_q, grad_k, grad_v, grad_x contiguous. grid generic_position_grid(H*W, channels, batch).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
conv_proj_bwd_input_generic_kernel(const scalar_t* __restrict__ grad_q, const scalar_t* __restrict__ grad_k,
                                   const scalar_t* __restrict__ grad_v, const float* __restrict__ wq,
                                   const float* __restrict__ wk, const float* __restrict__ wv,
                                   scalar_t* __restrict__ grad_x, int channels, int height, int width, int cls,
                                   ConvGeom gq, ConvGeom gkv) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int c = blockIdx.y * kGenericChunk + lane;
  if (c >= channels) return;
  const int per_image = (height * width + kWarps - 1) / kWarps;  // as generic_position_grid
  const int64_t b = blockIdx.x / per_image;
  const int block = static_cast<int>(blockIdx.x - b * per_image);
  const scalar_t* gq_image = grad_q + b * (cls + gq.out_h * gq.out_w) * channels;
  const scalar_t* gk_image = grad_k + b * (cls + gkv.out_h * gkv.out_w) * channels;
  const scalar_t* gv_image = grad_v + b * (cls + gkv.out_h * gkv.out_w) * channels;
  scalar_t* gx_image = grad_x + b * (cls + height * width) * channels;
  if (cls && block == 0 && warp == 0) {  // the cls row was passed through to all three outputs
    gx_image[c] = from_float<scalar_t>(to_float(gq_image[c]) + to_float(gk_image[c]) + to_float(gv_image[c]));
  }
  const int position = block * kWarps + warp;
  if (position >= height * width) return;
  const int ih = position / width, iw = position - ih * width;
  const float acc = gather_grad(gq_image, wq, gq, cls, channels, c, ih, iw) +
                    gather_grad(gk_image, wk, gkv, cls, channels, c, ih, iw) +
                    gather_grad(gv_image, wv, gkv, cls, channels, c, ih, iw);
  gx_image[(cls + position) * channels + c] = from_float<scalar_t>(acc);
}

// partial[blockIdx.x][conv][tap][c] = sum over this CTA's output rows of grad * x at that tap.
// grid (row splits, channel chunks, 3 * k*k); block kThreads: warps take output rows (b, oh).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
conv_proj_bwd_weight_generic_kernel(const scalar_t* __restrict__ grad_q, const scalar_t* __restrict__ grad_k,
                                    const scalar_t* __restrict__ grad_v, const scalar_t* __restrict__ x, int64_t x_sb,
                                    int64_t x_st, float* __restrict__ partial, int batch, int channels, int height,
                                    int width, int cls, ConvGeom gq, ConvGeom gkv) {
  __shared__ float warp_sums[kWarps][32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int c = blockIdx.y * kGenericChunk + lane;
  const int taps = gq.kernel * gq.kernel;
  const int conv = blockIdx.z / taps, tap = blockIdx.z - conv * taps;
  const ConvGeom g = conv == 0 ? gq : gkv;
  const int kh = tap / g.kernel, kw = tap - kh * g.kernel;
  const scalar_t* grad = conv == 0 ? grad_q : (conv == 1 ? grad_k : grad_v);
  // Output columns whose input column ow*stride - padding + kw lies in [0, width).
  const int ow_begin = kw >= g.padding ? 0 : (g.padding - kw + g.stride - 1) / g.stride;
  const int last = width - 1 + g.padding - kw;  // ow*stride may not pass it
  const int ow_end = last < 0 ? 0 : (last / g.stride + 1 < g.out_w ? last / g.stride + 1 : g.out_w);
  float acc = 0.0f;
  if (c < channels) {
    for (int row = blockIdx.x * kWarps + warp; row < batch * g.out_h; row += gridDim.x * kWarps) {
      const int b = row / g.out_h, oh = row - b * g.out_h;  // once per output row
      const int ih = oh * g.stride - g.padding + kh;
      if (ih < 0 || ih >= height) continue;
      const scalar_t* g_row = grad + (static_cast<int64_t>(b) * (cls + g.out_h * g.out_w) + cls + oh * g.out_w) * channels + c;
      const scalar_t* x_row = x + b * x_sb + static_cast<int64_t>(cls + ih * width) * x_st + c;
      for (int ow = ow_begin; ow < ow_end; ++ow) {
        acc += to_float(g_row[ow * channels]) * to_float(x_row[(ow * g.stride - g.padding + kw) * x_st]);
      }
    }
  }
  warp_sums[warp][lane] = acc;
  __syncthreads();
  if (warp == 0 && c < channels) {
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += warp_sums[w][lane];
    partial[((static_cast<int64_t>(blockIdx.x) * 3 + conv) * taps + tap) * channels + c] = sum;
  }
}

// Row splits of the generic weight-gradient grid: about kGenericRowsPerWarp output rows per warp.
constexpr int kGenericRowsPerWarp = 8;
constexpr int kGenericMaxSplits = 256;
inline int generic_wgrad_splits(int output_rows) {
  return std::max(1, std::min(kGenericMaxSplits, div_up(output_rows, kWarps * kGenericRowsPerWarp)));
}

}  // namespace
}  // namespace cvt_fast

// ---------------------------------------------------------------- host side (launch, checks)
// Left out when csrc/emulate/ compiles the kernels above for a CPU emulation of the GPU.
#ifndef CVT_FAST_HOST_EMULATION
#include <cuda_runtime.h>

#include <type_traits>
#include <utility>
#include <vector>

#include "ops.h"

namespace cvt_fast {
namespace {

// (C, 1, k, k) weight of any floating dtype -> (k*k, C) fp32 contiguous on the same device.
at::Tensor tap_major(const at::Tensor& w) {
  return w.reshape({w.size(0), w.size(2) * w.size(3)}).to(at::kFloat).t().contiguous();
}

std::optional<at::Tensor> checked_bias(const char* op, const std::optional<at::Tensor>& bias, const char* name,
                                       const at::Tensor& x) {
  if (!bias.has_value() || !bias->defined()) return std::nullopt;
  const at::Tensor& b = *bias;
  CVT_CHECK_SAME_DEVICE(op, b, x, name, "x");
  TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == x.size(2), op, ": ", name, " must have shape (", x.size(2),
                    ",) (one value per channel), got ", b.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(b.scalar_type()), op, ": ", name, " must be floating point, got ",
                   b.scalar_type());
  return b.to(at::kFloat).contiguous();
}

}  // namespace

int64_t check_conv_proj_args(const char* op, const at::Tensor& x, const at::Tensor& wq, const at::Tensor& wk,
                             const at::Tensor& wv, int64_t height, int64_t width, bool has_cls, int64_t stride_q,
                             int64_t stride_kv, int64_t padding_q, int64_t padding_kv) {
  TORCH_CHECK_VALUE(x.dim() == 3, op, ": x must be 3-dimensional (batch, tokens, channels), got shape ",
                    x.sym_sizes());
  TORCH_CHECK_VALUE(height >= 1 && width >= 1, op, ": height and width must be positive, got ", height, " x ",
                    width);
  const int64_t tokens = (has_cls ? 1 : 0) + height * width;
  TORCH_CHECK_VALUE(x.sym_size(1) == tokens, op, ": x has ", x.sym_size(1), " tokens but has_cls=", has_cls,
                    " and a ", height, " x ", width, " grid need ", tokens);
  TORCH_CHECK_VALUE(wq.dim() == 4 && wq.size(1) == 1 && wq.size(2) == wq.size(3), op,
                    ": wq must be a depthwise Conv2d weight (channels, 1, k, k), got shape ", wq.sizes());
  TORCH_CHECK_VALUE(wq.size(0) == x.sym_size(2), op, ": wq has ", wq.size(0), " channels but x has ",
                    x.sym_size(2));
  TORCH_CHECK_VALUE(wk.sizes() == wq.sizes() && wv.sizes() == wq.sizes(), op,
                    ": wq, wk, wv must have the same shape (one kernel size), got ", wq.sizes(), ", ", wk.sizes(),
                    ", ", wv.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(wq.scalar_type()) && at::isFloatingType(wk.scalar_type()) &&
                       at::isFloatingType(wv.scalar_type()),
                   op, ": weights must be floating point, got ", wq.scalar_type(), ", ", wk.scalar_type(), ", ",
                   wv.scalar_type());
  const int64_t kernel = wq.size(2);
  TORCH_CHECK_VALUE(kernel >= 1, op, ": kernel size must be at least 1, got ", kernel);
  TORCH_CHECK_VALUE(stride_q >= 1 && stride_kv >= 1, op, ": strides must be positive, got stride_q=", stride_q,
                    ", stride_kv=", stride_kv);
  TORCH_CHECK_VALUE(padding_q >= 0 && padding_kv >= 0, op, ": paddings must be non-negative, got padding_q=",
                    padding_q, ", padding_kv=", padding_kv);
  // Compare before dividing: C++ division truncates toward zero, so conv_out_size would give 1
  // (not 0) for a padded grid up to stride - 1 smaller than the kernel.
  TORCH_CHECK_VALUE(std::min(height, width) + 2 * std::min(padding_q, padding_kv) >= kernel,
                    op, ": a ", height, " x ", width, " grid is smaller than the ", kernel, " x ", kernel,
                    " kernel with padding_q=", padding_q, ", padding_kv=", padding_kv);
  return kernel;
}

namespace {

// Device, dtype and stride checks of the CUDA path (on top of check_conv_proj_args).
void check_conv_proj_device(const char* op, const at::Tensor& x, const at::Tensor& wq, const at::Tensor& wk,
                            const at::Tensor& wv) {
  CVT_CHECK_CUDA(op, x, "x");
  CVT_CHECK_SAME_DEVICE(op, wq, x, "wq", "x");
  CVT_CHECK_SAME_DEVICE(op, wk, x, "wk", "x");
  CVT_CHECK_SAME_DEVICE(op, wv, x, "wv", "x");
}

// The kernels index within one image in 32 bits (tokens * channels) and across images in 64.
void check_conv_proj_layout(const char* op, const at::Tensor& x, int64_t max_tokens) {
  TORCH_CHECK_VALUE(x.stride(2) == 1, op, ": the channel (last) dimension of x must be contiguous, got strides ",
                    x.strides());
  TORCH_CHECK_VALUE(max_tokens * x.size(2) < (int64_t{1} << 31) && x.size(1) * x.stride(1) < (int64_t{1} << 31) &&
                        x.size(0) < (int64_t{1} << 31),
                    op, ": one image of x (or of an output) must hold fewer than 2^31 elements, got shape ",
                    x.sizes(), " with strides ", x.strides());
}

int64_t tokens_of(int cls, const ConvGeom& g) { return cls + int64_t{g.out_h} * g.out_w; }

// Whether a tensor's rows can be copied in 16-byte pieces: base, row stride and C multiples of it.
bool vector_copies_ok(const at::Tensor& t, int64_t element_size) {
  const int64_t per_vector = kCopyBytes / element_size;
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % kCopyBytes == 0 && t.size(2) % per_vector == 0 &&
         t.stride(1) % per_vector == 0 && t.stride(0) % per_vector == 0;
}

// Whether a fused plan's shared memory fits this GPU (227 KB per CTA on sm_90 after opting in; the
// largest plan, fp32 k = 5 backward with paddings (0, 4), needs 222 KB); else the generic path runs.
bool fused_smem_fits(int smem_bytes) {
  int device = 0, limit = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return smem_bytes <= limit;
}

// CTAs per channel chunk of a fused kernel: one resident wave over the whole GPU, at most one per item.
template <typename Kernel>
int fused_ctas_per_chunk(Kernel kernel, int smem_bytes, int items, int chunks) {
  if (smem_bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
  }
  int device = 0, sms = 0, per_sm = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem_bytes));
  TORCH_CHECK(per_sm >= 1, "cvt_fast conv_proj: a ", smem_bytes, "-byte CTA does not fit on this GPU");
  return std::max(1, std::min(items, div_up(per_sm * sms, chunks)));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_proj_forward_cuda(
    const at::Tensor& x, const at::Tensor& wq, const at::Tensor& wk, const at::Tensor& wv,
    const std::optional<at::Tensor>& bq, const std::optional<at::Tensor>& bk, const std::optional<at::Tensor>& bv,
    int64_t height, int64_t width, bool has_cls, int64_t stride_q, int64_t stride_kv, int64_t padding_q,
    int64_t padding_kv) {
  constexpr const char* kOp = "cvt_fast::conv_proj_forward_cuda";
  check_conv_proj_device(kOp, x, wq, wk, wv);
  const int kernel = static_cast<int>(check_conv_proj_args(kOp, x, wq, wk, wv, height, width, has_cls, stride_q,
                                                           stride_kv, padding_q, padding_kv));
  const auto bq_f = checked_bias(kOp, bq, "bq", x);
  const auto bk_f = checked_bias(kOp, bk, "bk", x);
  const auto bv_f = checked_bias(kOp, bv, "bv", x);

  const int cls = has_cls ? 1 : 0;
  const int h = static_cast<int>(height), w = static_cast<int>(width);
  const ConvGeom gq = make_geom(h, w, kernel, static_cast<int>(stride_q), static_cast<int>(padding_q));
  const ConvGeom gkv = make_geom(h, w, kernel, static_cast<int>(stride_kv), static_cast<int>(padding_kv));
  check_conv_proj_layout(kOp, x, std::max({x.size(1), tokens_of(cls, gq), tokens_of(cls, gkv)}));
  const int64_t batch = x.size(0), channels = x.size(2);
  auto q = at::empty({batch, tokens_of(cls, gq), channels}, x.options());
  auto k = at::empty({batch, tokens_of(cls, gkv), channels}, x.options());
  auto v = at::empty_like(k);
  if (batch == 0 || channels == 0) return {q, k, v};

  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const auto wq_t = tap_major(wq), wk_t = tap_major(wk), wv_t = tap_major(wv);
  const float* const biases[3] = {bq_f ? bq_f->data_ptr<float>() : nullptr,
                                  bk_f ? bk_f->data_ptr<float>() : nullptr, bv_f ? bv_f->data_ptr<float>() : nullptr};
  auto stream = c10::cuda::getCurrentCUDAStream();
  CVT_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), kOp, [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t *qp = q.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>(), *vp = v.data_ptr<scalar_t>();
    const FusedPlan plan = make_fused_plan(false, static_cast<int>(batch), static_cast<int>(channels), h, w, cls,
                                           kernel, gq.padding, gkv.padding);
    auto launch_fused = [&](auto kernel_size) {
      constexpr int K = decltype(kernel_size)::value;
      constexpr int L = lane_channels_for<scalar_t>(K);
      const int smem = fused_fwd_smem_bytes<scalar_t, L>(plan);
      if (!fused_smem_fits(smem)) return false;
      const int chunks = static_cast<int>(ceil_div(channels, chunk_channels(L)));
      const int ctas = fused_ctas_per_chunk(conv_proj_fwd_fused_kernel<scalar_t, K>, smem, plan.items, chunks);
      conv_proj_fwd_fused_kernel<scalar_t, K><<<dim3(ctas, chunks), kThreads, smem, stream>>>(
          xp, x.stride(0), x.stride(1), wq_t.data_ptr<float>(), wk_t.data_ptr<float>(), wv_t.data_ptr<float>(),
          biases[0], biases[1], biases[2], qp, kp, vp, plan, vector_copies_ok(x, sizeof(scalar_t)));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return true;
    };
    if (use_fused_path(kernel, gq.stride, gkv.stride, gq.padding, gkv.padding) &&
        (kernel == 3 ? launch_fused(std::integral_constant<int, 3>{}) : launch_fused(std::integral_constant<int, 5>{}))) {
      return;
    }
    // Generic: one launch per distinct (stride, padding), each computing every output that has it.
    const float* const weights[3] = {wq_t.data_ptr<float>(), wk_t.data_ptr<float>(), wv_t.data_ptr<float>()};
    scalar_t* const outs[3] = {qp, kp, vp};
    const GenericLaunches launches = generic_forward_launches(gq, gkv);
    for (int i = 0; i < launches.n; ++i) {
      const GenericLaunch& l = launches.launch[i];
      const int positions = l.g.out_h * l.g.out_w;
      TORCH_CHECK_VALUE(generic_position_grid_fits(positions, static_cast<int>(channels), batch), kOp, ": batch ",
                        batch, " x ", positions, " output positions x ", channels,
                        " channels exceed the CUDA grid of the generic kernels; split the batch");
      conv_proj_fwd_generic_kernel<scalar_t>
          <<<generic_position_grid(positions, static_cast<int>(channels), batch), kThreads, 0, stream>>>(
              xp, x.stride(0), x.stride(1), generic_slot(l, weights, 0), generic_slot(l, weights, 1),
              generic_slot(l, weights, 2), generic_slot(l, biases, 0), generic_slot(l, biases, 1),
              generic_slot(l, biases, 2), generic_slot(l, outs, 0), generic_slot(l, outs, 1),
              generic_slot(l, outs, 2), l.count, static_cast<int>(channels), h, w, cls, l.g);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {q, k, v};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_proj_backward_cuda(
    const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& grad_v, const at::Tensor& x,
    const at::Tensor& wq, const at::Tensor& wk, const at::Tensor& wv, int64_t height, int64_t width, bool has_cls,
    int64_t stride_q, int64_t stride_kv, int64_t padding_q, int64_t padding_kv) {
  constexpr const char* kOp = "cvt_fast::conv_proj_backward_cuda";
  check_conv_proj_device(kOp, x, wq, wk, wv);
  const int kernel = static_cast<int>(check_conv_proj_args(kOp, x, wq, wk, wv, height, width, has_cls, stride_q,
                                                           stride_kv, padding_q, padding_kv));

  const int cls = has_cls ? 1 : 0;
  const int h = static_cast<int>(height), w = static_cast<int>(width);
  const ConvGeom gq = make_geom(h, w, kernel, static_cast<int>(stride_q), static_cast<int>(padding_q));
  const ConvGeom gkv = make_geom(h, w, kernel, static_cast<int>(stride_kv), static_cast<int>(padding_kv));
  check_conv_proj_layout(kOp, x, std::max({x.size(1), tokens_of(cls, gq), tokens_of(cls, gkv)}));
  const int64_t batch = x.size(0), channels = x.size(2);
  const std::vector<int64_t> shape_q{batch, tokens_of(cls, gq), channels};
  const std::vector<int64_t> shape_kv{batch, tokens_of(cls, gkv), channels};
  const std::pair<const at::Tensor*, const char*> grads[] = {{&grad_q, "grad_q"}, {&grad_k, "grad_k"}, {&grad_v, "grad_v"}};
  for (int i = 0; i < 3; ++i) {
    const at::Tensor& g = *grads[i].first;
    const auto& expected = i == 0 ? shape_q : shape_kv;
    CVT_CHECK_SAME_DEVICE(kOp, g, x, grads[i].second, "x");
    CVT_CHECK_SAME_DTYPE(kOp, g, x, grads[i].second, "x");
    TORCH_CHECK_VALUE(g.sizes() == at::IntArrayRef(expected), kOp, ": ", grads[i].second, " must have shape ",
                      at::IntArrayRef(expected), ", got ", g.sizes());
  }

  auto grad_x = at::empty(x.sizes(), x.options());  // contiguous
  const int taps = kernel * kernel;
  const auto float_options = x.options().dtype(at::kFloat);
  // (C, k*k) fp32 per convolution, filled by the second-stage reduction.
  auto wgrad_q = at::zeros({channels, taps}, float_options), wgrad_k = at::zeros({channels, taps}, float_options),
       wgrad_v = at::zeros({channels, taps}, float_options);
  auto weight_grad = [&](const at::Tensor& g, const at::Tensor& weight) {
    return g.reshape(weight.sizes()).to(weight.scalar_type());
  };
  if (batch == 0 || channels == 0) {
    return {grad_x, weight_grad(wgrad_q, wq), weight_grad(wgrad_k, wk), weight_grad(wgrad_v, wv)};
  }

  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const auto gq_c = grad_q.contiguous(), gk_c = grad_k.contiguous(), gv_c = grad_v.contiguous();
  const auto wq_t = tap_major(wq), wk_t = tap_major(wk), wv_t = tap_major(wv);
  const int generic_chunks = static_cast<int>(ceil_div(channels, kGenericChunk));
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor partial;

  CVT_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), kOp, [&] {
    const scalar_t *gqp = gq_c.data_ptr<scalar_t>(), *gkp = gk_c.data_ptr<scalar_t>(), *gvp = gv_c.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const FusedPlan plan = make_fused_plan(true, static_cast<int>(batch), static_cast<int>(channels), h, w, cls,
                                           kernel, gq.padding, gkv.padding);
    auto launch_fused = [&](auto kernel_size) {
      constexpr int K = decltype(kernel_size)::value;
      constexpr int L = lane_channels_for<scalar_t>(K);
      const int smem = fused_bwd_smem_bytes<scalar_t, L>(plan);
      if (!fused_smem_fits(smem)) return false;
      const bool vec_x = vector_copies_ok(x, sizeof(scalar_t));
      const bool vec_grad = vector_copies_ok(gq_c, sizeof(scalar_t)) && vector_copies_ok(gk_c, sizeof(scalar_t)) &&
                            vector_copies_ok(gv_c, sizeof(scalar_t));
      const int chunks = static_cast<int>(ceil_div(channels, chunk_channels(L)));
      const int ctas = fused_ctas_per_chunk(conv_proj_bwd_fused_kernel<scalar_t, K>, smem, plan.items, chunks);
      partial = at::empty({ctas, 3, taps, channels}, float_options);
      conv_proj_bwd_fused_kernel<scalar_t, K><<<dim3(ctas, chunks), kThreads, smem, stream>>>(
          gqp, gkp, gvp, xp, x.stride(0), x.stride(1), wq_t.data_ptr<float>(), wk_t.data_ptr<float>(),
          wv_t.data_ptr<float>(), grad_x.data_ptr<scalar_t>(), partial.data_ptr<float>(), plan, vec_x, vec_grad);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return true;
    };
    if (use_fused_path(kernel, gq.stride, gkv.stride, gq.padding, gkv.padding) &&
        (kernel == 3 ? launch_fused(std::integral_constant<int, 3>{}) : launch_fused(std::integral_constant<int, 5>{}))) {
      return;
    }
    TORCH_CHECK_VALUE(generic_position_grid_fits(h * w, static_cast<int>(channels), batch), kOp, ": batch ", batch,
                      " x ", h * w, " positions x ", channels,
                      " channels exceed the CUDA grid of the generic kernels; split the batch");
    // The weight-gradient grid has one z index per (convolution, tap): 3 k^2 <= 65535.
    TORCH_CHECK_VALUE(3 * taps <= 65535, kOp, ": kernel size ", kernel,
                      " has too many taps for the generic weight-gradient grid (3 k^2 must be at most 65535)");
    conv_proj_bwd_input_generic_kernel<scalar_t>
        <<<generic_position_grid(h * w, static_cast<int>(channels), batch), kThreads, 0, stream>>>(
        gqp, gkp, gvp, wq_t.data_ptr<float>(), wk_t.data_ptr<float>(), wv_t.data_ptr<float>(),
        grad_x.data_ptr<scalar_t>(), static_cast<int>(channels), h, w, cls, gq, gkv);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int splits =
        generic_wgrad_splits(static_cast<int>(batch) * std::max(gq.out_h, gkv.out_h));
    partial = at::empty({splits, 3, taps, channels}, float_options);
    const dim3 weight_grid(splits, generic_chunks, 3 * taps);
    conv_proj_bwd_weight_generic_kernel<scalar_t><<<weight_grid, kThreads, 0, stream>>>(
        gqp, gkp, gvp, xp, x.stride(0), x.stride(1), partial.data_ptr<float>(), static_cast<int>(batch),
        static_cast<int>(channels), h, w, cls, gq, gkv);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  const int entries = 3 * taps * static_cast<int>(channels);
  conv_proj_wgrad_reduce_kernel<<<div_up(entries, 32), kThreads, 0, stream>>>(
      partial.data_ptr<float>(), static_cast<int>(partial.size(0)), taps, static_cast<int>(channels),
      wgrad_q.data_ptr<float>(), wgrad_k.data_ptr<float>(), wgrad_v.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_x, weight_grad(wgrad_q, wq), weight_grad(wgrad_k, wk), weight_grad(wgrad_v, wv)};
}

}  // namespace cvt_fast

#endif  // CVT_FAST_HOST_EMULATION
