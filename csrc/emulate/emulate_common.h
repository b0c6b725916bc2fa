// Dtype and head-dim dispatch for the host-emulation entry points (csrc/emulate/*.cpp),
// which tests/test_cuda_extension.py calls through ctypes with CPU tensors' data pointers.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

namespace cvt_emu {

// dtype codes: 0 float32, 1 float16, 2 bfloat16.
template <typename F>
void with_dtype(int dtype, F&& f) {
  switch (dtype) {
    case 0: f(float{}); break;
    case 1: f(c10::Half{}); break;
    case 2: f(c10::BFloat16{}); break;
    default: break;
  }
}

template <typename F>
void with_head_dim(int head_dim, F&& f) {
  switch (head_dim) {
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 64: f(std::integral_constant<int, 64>{}); break;
    case 128: f(std::integral_constant<int, 128>{}); break;
    default: break;
  }
}

}  // namespace cvt_emu
