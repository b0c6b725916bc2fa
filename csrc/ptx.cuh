// The sm_80+ instructions of the tensor-core attention kernels, each a thin inline wrapper over one
// PTX instruction: mma.sync m16n8k16 (16-bit inputs, fp32 accumulation), ldmatrix .x4 (plain and
// .trans), cp.async with zero fill (+ commit_group / wait_group), and a two-float global reduction.
// Kernels call only these, so csrc/emulate/ptx_on_host.h can run the same kernel source on the CPU;
// that emulation follows the fragment layouts below lane by lane, so a wrong index in a kernel gives
// wrong numbers there as it would on the GPU.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16" and "ldmatrix"). With g = lane / 4
// and t = lane % 4, and a 32-bit register holding two 16-bit values, the lower-indexed in its low half:
//   A, 16 x 16 row-major (rows m, columns k):  a[0] = A[g][2t, 2t+1]     a[1] = A[g+8][2t, 2t+1]
//                                              a[2] = A[g][2t+8, 2t+9]   a[3] = A[g+8][2t+8, 2t+9]
//   B, 16 x 8 "col" (rows k, columns n):       b[0] = B[2t, 2t+1][g]     b[1] = B[2t+8, 2t+9][g]
//   C, 16 x 8 fp32:                            c[0], c[1] = C[g][2t, 2t+1]   c[2], c[3] = C[g+8][2t, 2t+1]
// So the C fragments of two neighbouring 8-column tiles, packed to 16 bits, are exactly the A fragment
// of the 16 x 16 block they form (c of tile 0 -> a[0], a[1]; tile 1 -> a[2], a[3]): a product's result
// feeds the next product from registers.
//   ldmatrix .x4: lanes 8i .. 8i+7 give the addresses of rows 0..7 of 8 x 8 matrix i (16 bytes each,
// 16-byte aligned); register i of lane l receives row g, elements 2t and 2t+1 of matrix i. With .trans
// it receives elements [2t][g] and [2t+1][g] (the matrix transposed).
#pragma once

#include <cstdint>
#include <type_traits>

#ifdef CVT_FAST_HOST_EMULATION
#include "emulate/ptx_on_host.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace cvt_fast {

struct FragA { uint32_t reg[4]; };  // 16 x 16 block of 16-bit values
struct FragB { uint32_t reg[2]; };  // 16 x 8 block of 16-bit values
struct FragC { float reg[4]; };     // 16 x 8 block of fp32 accumulators

__device__ __forceinline__ uint32_t shared_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

// acc += a @ b on the tensor cores; T is __nv_bfloat16 or __half.
template <typename T>
__device__ __forceinline__ void mma_16x8x16(FragC& acc, const FragA& a, const FragB& b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(acc.reg[0]), "+f"(acc.reg[1]), "+f"(acc.reg[2]), "+f"(acc.reg[3])
        : "r"(a.reg[0]), "r"(a.reg[1]), "r"(a.reg[2]), "r"(a.reg[3]), "r"(b.reg[0]), "r"(b.reg[1]));
  } else {
    static_assert(std::is_same_v<T, __half>, "mma_16x8x16 takes __nv_bfloat16 or __half");
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(acc.reg[0]), "+f"(acc.reg[1]), "+f"(acc.reg[2]), "+f"(acc.reg[3])
        : "r"(a.reg[0]), "r"(a.reg[1]), "r"(a.reg[2]), "r"(a.reg[3]), "r"(b.reg[0]), "r"(b.reg[1]));
  }
#else
  __trap();  // the launchers use these kernels on sm_80 and newer only
#endif
}

// Four 8 x 8 matrices of 16-bit values from shared memory; `row` is this lane's row address.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&dst)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(dst[0]), "=r"(dst[1]), "=r"(dst[2]), "=r"(dst[3])
               : "r"(shared_address(row)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&dst)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(dst[0]), "=r"(dst[1]), "=r"(dst[2]), "=r"(dst[3])
               : "r"(shared_address(row)));
}

// Two fp32 values rounded to 16 bits (nearest even) in one register, `low` in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float low, float high) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 pair = __floats2bfloat162_rn(low, high);
    return *reinterpret_cast<const uint32_t*>(&pair);
  } else {
    const __half2 pair = __floats2half2_rn(low, high);
    return *reinterpret_cast<const uint32_t*>(&pair);
  }
}

// 16 bytes global -> shared without passing through registers (L2 only: .cg). When !fill nothing is
// read and the 16 bytes are zeroed (src-size 0); `src` must still be a valid address.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool fill) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst)), "l"(src),
               "r"(fill ? 16 : 0));
#endif
}

// Closes the group of cp.async issued by this thread since the last commit.
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most kPending of this thread's committed groups are still in flight. Other threads
// see the data only after a barrier.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}

// address[0] += a, address[1] += b (global fp32, 8-byte aligned); one vector reduction on sm_90.
__device__ __forceinline__ void atomic_add_pair(float* address, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(address), "f"(a), "f"(b) : "memory");
#else
  atomicAdd(address, a);
  atomicAdd(address + 1, b);
#endif
}

// 16 bytes from global memory in one vector load (the address must be 16-byte aligned: a misaligned
// one is a sticky "misaligned address" error on the GPU; the emulation aborts on it).
__device__ __forceinline__ uint4 load_16(const void* address) { return *reinterpret_cast<const uint4*>(address); }

// The block's dynamic shared memory (size given at launch).
__device__ __forceinline__ unsigned char* dynamic_shared_memory() {
  extern __shared__ __align__(16) unsigned char cvt_fast_dynamic_smem[];
  return cvt_fast_dynamic_smem;
}

}  // namespace cvt_fast

#endif  // CVT_FAST_HOST_EMULATION

namespace cvt_fast {

// A kRows x kCols tile (kCols * sizeof(T) a multiple of 16 bytes) into shared memory with row pitch
// `pitch` elements, by cp.async of 16 bytes, the block's kThreads threads taking consecutive chunks
// (so a warp reads whole rows: coalesced). `src` is row 0, rows are `row_stride` elements apart;
// rows >= valid_rows are zero-filled without being read. The caller commits the group.
template <int kRows, int kCols, int kThreads, typename T>
__device__ __forceinline__ void copy_tile_async(T* dst, int pitch, const T* src, int64_t row_stride, int valid_rows) {
  constexpr int kChunkElems = 16 / static_cast<int>(sizeof(T));
  static_assert(kCols % kChunkElems == 0, "rows must be whole 16-byte chunks");
  constexpr int kChunksPerRow = kCols / kChunkElems;
  constexpr int kChunks = kRows * kChunksPerRow;
#pragma unroll
  for (int step = 0; step < (kChunks + kThreads - 1) / kThreads; ++step) {
    const int chunk = static_cast<int>(threadIdx.x) + step * kThreads;
    if (kChunks % kThreads == 0 || chunk < kChunks) {
      const int r = chunk / kChunksPerRow;
      const int c = chunk % kChunksPerRow * kChunkElems;
      const bool valid = r < valid_rows;
      cp_async_16(dst + r * pitch + c, src + (valid ? r : 0) * row_stride + c, valid);
    }
  }
}

// Whether the rows of a (B, N, H, d) 16-bit tensor all start on 16-byte boundaries, as cp.async of
// 16 bytes needs: the base pointer and every stride (elements) that can be stepped (size > 1).
inline bool rows_are_16_byte_aligned(const void* base, const int64_t (&sizes)[3], const int64_t (&strides)[3]) {
  if (reinterpret_cast<uintptr_t>(base) % 16 != 0) return false;
  for (int i = 0; i < 3; ++i) {
    if (sizes[i] > 1 && (strides[i] * 2) % 16 != 0) return false;
  }
  return true;
}

}  // namespace cvt_fast
