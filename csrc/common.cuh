// Shared helpers of the cvt_fast CUDA kernels: dtype conversion at the edges (all math
// is fp32), the dtype dispatch (exactly float32, float16, bfloat16: nothing else is
// instantiated, to keep the build short), and the argument checks the host wrappers use.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#ifdef CVT_FAST_HOST_EMULATION
// csrc/emulate/: the kernels compiled by a host compiler; every CUDA thread of a block is a fiber
// on the calling OS thread (cuda_on_host.h), blocks run one after another.
#include "emulate/cuda_on_host.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>

// c10/cuda headers, not ATen/cuda/CUDAContext.h: that one also pulls cuSPARSE/cuBLAS headers,
// which a bare CUDA toolkit lacks. c10::cuda::getCurrentCUDAStream is at::cuda's.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <cstdint>
#include <limits>

namespace cvt_fast {

// Loads convert to fp32 right away and stores convert back last: the kernels accumulate in fp32.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(c10::Half x) { return static_cast<float>(x); }
__device__ __forceinline__ float to_float(c10::BFloat16 x) { return static_cast<float>(x); }

template <typename scalar_t>
__device__ __forceinline__ scalar_t from_float(float x) {
  return static_cast<scalar_t>(x);  // c10::Half / c10::BFloat16 round to nearest even
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

constexpr float kLog2e = 1.44269504088896340736f;  // exp(x) = exp2(x * kLog2e)
constexpr float kLn2 = 0.69314718055994530942f;

// The CUDA type of a 16-bit c10 type, for the tensor-core kernels (csrc/ptx.cuh).
template <typename scalar_t>
struct TensorCoreType;  // float has none: fp32 inputs use the CUDA-core kernels
template <>
struct TensorCoreType<c10::Half> {
  using type = __half;
};
template <>
struct TensorCoreType<c10::BFloat16> {
  using type = __nv_bfloat16;
};

// Sum over the `kGroup` consecutive lanes of a warp that share one row (kGroup is a power
// of two dividing 32). Every lane of the warp must call it (full mask).
template <int kGroup>
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
  for (int offset = kGroup / 2; offset > 0; offset /= 2) {
    x += __shfl_xor_sync(0xffffffffu, x, offset);
  }
  return x;
}

}  // namespace cvt_fast

#ifndef CVT_FAST_HOST_EMULATION
// Runs the lambda given as the variadic argument with `scalar_t` bound to float,
// c10::Half or c10::BFloat16; any other dtype raises a TypeError naming the op.
#define CVT_DISPATCH_FLOAT_HALF_BF16(TYPE, OP_NAME, ...)                                  \
  [&] {                                                                                  \
    switch (TYPE) {                                                                      \
      case at::ScalarType::Float: {                                                      \
        using scalar_t = float;                                                          \
        return __VA_ARGS__();                                                            \
      }                                                                                  \
      case at::ScalarType::Half: {                                                       \
        using scalar_t = c10::Half;                                                      \
        return __VA_ARGS__();                                                            \
      }                                                                                  \
      case at::ScalarType::BFloat16: {                                                   \
        using scalar_t = c10::BFloat16;                                                  \
        return __VA_ARGS__();                                                            \
      }                                                                                  \
      default:                                                                           \
        TORCH_CHECK_TYPE(false, OP_NAME, ": unsupported dtype ", TYPE,                  \
                         "; expected torch.float32, torch.float16 or torch.bfloat16");   \
    }                                                                                    \
  }()

// Argument checks shared by the host wrappers. They run before any CUDA call, so a call
// with CPU tensors fails here with a message, not inside the runtime.
#define CVT_CHECK_CUDA(OP_NAME, T, ARG_NAME)                                               \
  TORCH_CHECK_VALUE((T).is_cuda(), OP_NAME, ": ", ARG_NAME, " must be a CUDA tensor, got a ", \
                    (T).device().str(), " tensor (the 'cuda' backend runs on NVIDIA GPUs only; " \
                    "use backend='reference' or 'triton' elsewhere)")

#define CVT_CHECK_SAME_DEVICE(OP_NAME, T, REF, ARG_NAME, REF_NAME)                            \
  TORCH_CHECK_VALUE((T).device() == (REF).device(), OP_NAME, ": ", ARG_NAME, " is on ",     \
                    (T).device().str(), " but ", REF_NAME, " is on ", (REF).device().str())

#define CVT_CHECK_DIM(OP_NAME, T, ARG_NAME, NDIM, LAYOUT)                                   \
  TORCH_CHECK_VALUE((T).dim() == (NDIM), OP_NAME, ": ", ARG_NAME, " must be ", NDIM,        \
                    "-dimensional ", LAYOUT, ", got shape ", (T).sizes())

#define CVT_CHECK_SAME_DTYPE(OP_NAME, T, REF, ARG_NAME, REF_NAME)                             \
  TORCH_CHECK_TYPE((T).scalar_type() == (REF).scalar_type(), OP_NAME, ": ", ARG_NAME,        \
                   " has dtype ", (T).scalar_type(), " but ", REF_NAME, " has dtype ",       \
                   (REF).scalar_type(), "; they must match")

#endif  // CVT_FAST_HOST_EMULATION
