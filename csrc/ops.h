// Host entry points of the cvt_fast CUDA extension. Schemas and registration: csrc/ops.cpp.
// Semantics: the op contract in cvt_fast/ops/__init__.py.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace cvt_fast {

// Whether the attention kernels for these inputs run on the tensor cores (see attention_fwd.cu:
// float16/bfloat16 on sm_80+ with 16-byte aligned rows and scale >= 0, unless
// CVT_FAST_CUDA_ATTENTION=simt).
bool attention_use_tensor_cores(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale);

// Shape/dtype/device/stride checks of q, k, v shared by the attention forward and backward.
void check_attention_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            double scale);

std::tuple<at::Tensor, at::Tensor> attention_forward_cuda(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, double scale);

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, double scale);

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_proj_forward_cuda(
    const at::Tensor& x, const at::Tensor& wq, const at::Tensor& wk, const at::Tensor& wv,
    const std::optional<at::Tensor>& bq, const std::optional<at::Tensor>& bk,
    const std::optional<at::Tensor>& bv, int64_t height, int64_t width, bool has_cls, int64_t stride_q,
    int64_t stride_kv, int64_t padding_q, int64_t padding_kv);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_proj_backward_cuda(
    const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& grad_v, const at::Tensor& x,
    const at::Tensor& wq, const at::Tensor& wk, const at::Tensor& wv, int64_t height, int64_t width,
    bool has_cls, int64_t stride_q, int64_t stride_kv, int64_t padding_q, int64_t padding_kv);

// Output size of a convolution along one axis; shared by the CUDA and Meta implementations.
inline int64_t conv_out_size(int64_t size, int64_t kernel, int64_t stride, int64_t padding) {
  return (size + 2 * padding - kernel) / stride + 1;
}

// Checks of the conv_proj arguments that need no device (shared with the Meta kernels).
// Returns the kernel size k.
int64_t check_conv_proj_args(const char* op, const at::Tensor& x, const at::Tensor& wq, const at::Tensor& wk,
                             const at::Tensor& wv, int64_t height, int64_t width, bool has_cls,
                             int64_t stride_q, int64_t stride_kv, int64_t padding_q, int64_t padding_kv);

}  // namespace cvt_fast
