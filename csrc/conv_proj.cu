// Convolutional projection of CvT: three depthwise k x k convolutions of one token tensor.
//   x: (B, T, C) tokens, T = cls + height*width, channels contiguous (batch/token strides free);
//   q = dwconv(x grid, wq, stride_q, padding_q) (+ bq), k and v the same with stride_kv,
//   padding_kv; outputs (B, cls + Ho*Wo, C) contiguous in x's dtype, tokens in row-major
//   (h, w) order; row 0 is x[:, 0] copied unchanged (no bias) when has_cls. Zero padding.
//   Weights (C, 1, k, k) of any floating dtype (converted to fp32 and transposed to
//   (k*k, C) by the wrapper, so a warp reads consecutive channels), all math in fp32.
// Backward: grad_x (B, T, C) (cls row: the sum of the three cls-row grads) and the weight
// grads (C, 1, k, k) in the weights' dtype, accumulated in fp32. Bias grads are a sum over
// (B, tokens) done in Python.
//
// Tiling (memory-bound, kept simple):
//   * forward: one thread per output element (b, token, c), channel fastest so a warp
//     reads and writes 32 consecutive channels. The first B*Tq*C threads compute q, the
//     rest compute k and v together (one read of each input tap feeds both). The k*k taps
//     of neighbouring outputs overlap, so the input is re-read from L1/L2, not DRAM.
//   * grad_x: one thread per input element (b, token, c), gathering from every output
//     position whose window covers it (no atomics, deterministic).
//   * weight grads: block (32 channels x 8 lanes), grid (channel groups, 3 convs * k*k taps,
//     S position splits). A thread accumulates in fp32 the products g * x of its channel and
//     tap over its share of the B*Ho*Wo output positions; the block sums its 8 lanes in shared
//     memory and writes one partial per split; the wrapper sums the S partials (deterministic).
// Floor (DRAM): forward reads x once and writes q, k, v: (B*T + B*Tq + 2*B*Tk) * C elements;
// backward reads grad_q, grad_k, grad_v and x and writes grad_x, plus k*k re-reads from L2 in
// the weight-grad kernel. FLOPs are negligible (2*k*k per output element per conv).

#include "common.cuh"

#include <algorithm>

namespace cvt_fast {
namespace {

constexpr int kThreads = 256;          // elementwise kernels
constexpr int kWgradChannels = 32;     // weight-grad block: one warp spans 32 channels ...
constexpr int kWgradLanes = 8;         // ... and 8 warps split the output positions
constexpr int64_t kWgradTargetPerThread = 128;  // positions per thread before adding splits
constexpr int64_t kWgradMaxSplits = 256;

// Geometry of one convolution of the token grid.
struct ConvGeom {
  int kernel, stride, padding, out_h, out_w;
};

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
conv_proj_fwd_kernel(const scalar_t* __restrict__ x, int64_t x_sb, int64_t x_st, const float* __restrict__ wq,
                     const float* __restrict__ wk, const float* __restrict__ wv, const float* __restrict__ bq,
                     const float* __restrict__ bk, const float* __restrict__ bv, scalar_t* __restrict__ q_out,
                     scalar_t* __restrict__ k_out, scalar_t* __restrict__ v_out, int batch, int channels, int height,
                     int width, int cls, ConvGeom gq, ConvGeom gkv) {
  const int64_t tokens_q = cls + static_cast<int64_t>(gq.out_h) * gq.out_w;
  const int64_t tokens_kv = cls + static_cast<int64_t>(gkv.out_h) * gkv.out_w;
  const int64_t items_q = batch * tokens_q * channels;
  const int64_t items = items_q + batch * tokens_kv * channels;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < items;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const bool is_q = idx < items_q;
    const int64_t local = is_q ? idx : idx - items_q;  // flat index into the contiguous output
    const int64_t tokens = is_q ? tokens_q : tokens_kv;
    const int c = static_cast<int>(local % channels);
    const int64_t t = (local / channels) % tokens;
    const int64_t b = local / (channels * tokens);
    const scalar_t* x_b = x + b * x_sb;
    if (cls && t == 0) {  // the cls token is never convolved
      const scalar_t cls_value = x_b[c];
      if (is_q) {
        q_out[local] = cls_value;
      } else {
        k_out[local] = cls_value;
        v_out[local] = cls_value;
      }
      continue;
    }
    const ConvGeom g = is_q ? gq : gkv;  // by value: a reference to a kernel parameter costs a stack copy
    const int o = static_cast<int>(t - cls);
    const int oh = o / g.out_w;
    const int ow = o % g.out_w;
    const int ih0 = oh * g.stride - g.padding;
    const int iw0 = ow * g.stride - g.padding;
    if (is_q) {
      float acc = bq != nullptr ? bq[c] : 0.0f;
      for (int kh = 0; kh < g.kernel; ++kh) {
        const int ih = ih0 + kh;
        if (ih < 0 || ih >= height) continue;
        for (int kw = 0; kw < g.kernel; ++kw) {
          const int iw = iw0 + kw;
          if (iw < 0 || iw >= width) continue;
          const float xv = to_float(x_b[(cls + static_cast<int64_t>(ih) * width + iw) * x_st + c]);
          acc += xv * wq[(kh * g.kernel + kw) * channels + c];
        }
      }
      q_out[local] = from_float<scalar_t>(acc);
    } else {
      float acc_k = bk != nullptr ? bk[c] : 0.0f;
      float acc_v = bv != nullptr ? bv[c] : 0.0f;
      for (int kh = 0; kh < g.kernel; ++kh) {
        const int ih = ih0 + kh;
        if (ih < 0 || ih >= height) continue;
        for (int kw = 0; kw < g.kernel; ++kw) {
          const int iw = iw0 + kw;
          if (iw < 0 || iw >= width) continue;
          const float xv = to_float(x_b[(cls + static_cast<int64_t>(ih) * width + iw) * x_st + c]);
          const int w_index = (kh * g.kernel + kw) * channels + c;
          acc_k += xv * wk[w_index];
          acc_v += xv * wv[w_index];
        }
      }
      k_out[local] = from_float<scalar_t>(acc_k);
      v_out[local] = from_float<scalar_t>(acc_v);
    }
  }
}

// Sum over the outputs of one convolution that read input (ih, iw): output (oh, ow) reads it
// through tap (kh, kw) when oh*stride - padding + kh == ih (and the same for w).
template <typename scalar_t>
__device__ __forceinline__ float gather_grad(const scalar_t* __restrict__ grad_b, const float* __restrict__ w,
                                             const ConvGeom g, int cls, int channels, int c, int ih, int iw) {
  float acc = 0.0f;
  for (int kh = 0; kh < g.kernel; ++kh) {
    const int th = ih + g.padding - kh;
    if (th < 0 || th % g.stride != 0) continue;
    const int oh = th / g.stride;
    if (oh >= g.out_h) continue;
    for (int kw = 0; kw < g.kernel; ++kw) {
      const int tw = iw + g.padding - kw;
      if (tw < 0 || tw % g.stride != 0) continue;
      const int ow = tw / g.stride;
      if (ow >= g.out_w) continue;
      const float gv = to_float(grad_b[(cls + static_cast<int64_t>(oh) * g.out_w + ow) * channels + c]);
      acc += gv * w[(kh * g.kernel + kw) * channels + c];
    }
  }
  return acc;
}

// grad_q, grad_k, grad_v, grad_x contiguous; one thread per element of grad_x.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
conv_proj_bwd_input_kernel(const scalar_t* __restrict__ grad_q, const scalar_t* __restrict__ grad_k,
                           const scalar_t* __restrict__ grad_v, const float* __restrict__ wq,
                           const float* __restrict__ wk, const float* __restrict__ wv,
                           scalar_t* __restrict__ grad_x, int batch, int channels, int height, int width, int cls,
                           ConvGeom gq, ConvGeom gkv) {
  const int64_t tokens = cls + static_cast<int64_t>(height) * width;
  const int64_t tokens_q = cls + static_cast<int64_t>(gq.out_h) * gq.out_w;
  const int64_t tokens_kv = cls + static_cast<int64_t>(gkv.out_h) * gkv.out_w;
  const int64_t items = batch * tokens * channels;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < items;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int c = static_cast<int>(idx % channels);
    const int64_t t = (idx / channels) % tokens;
    const int64_t b = idx / (channels * tokens);
    const scalar_t* gq_b = grad_q + b * tokens_q * channels;
    const scalar_t* gk_b = grad_k + b * tokens_kv * channels;
    const scalar_t* gv_b = grad_v + b * tokens_kv * channels;
    float acc;
    if (cls && t == 0) {  // the cls row was passed through to all three outputs
      acc = to_float(gq_b[c]) + to_float(gk_b[c]) + to_float(gv_b[c]);
    } else {
      const int s = static_cast<int>(t - cls);
      const int ih = s / width;
      const int iw = s % width;
      acc = gather_grad(gq_b, wq, gq, cls, channels, c, ih, iw) + gather_grad(gk_b, wk, gkv, cls, channels, c, ih, iw) +
            gather_grad(gv_b, wv, gkv, cls, channels, c, ih, iw);
    }
    grad_x[idx] = from_float<scalar_t>(acc);
  }
}

// partial[split][conv][tap][c] = sum over this split's output positions of g * x.
// Block (kWgradChannels, kWgradLanes); grid (ceil(C/32), 3 * k*k, splits).
template <typename scalar_t>
__global__ void __launch_bounds__(kWgradChannels * kWgradLanes)
conv_proj_bwd_weight_kernel(const scalar_t* __restrict__ grad_q, const scalar_t* __restrict__ grad_k,
                            const scalar_t* __restrict__ grad_v, const scalar_t* __restrict__ x, int64_t x_sb,
                            int64_t x_st, float* __restrict__ partial, int batch, int channels, int height,
                            int width, int cls, ConvGeom gq, ConvGeom gkv) {
  __shared__ float lane_sums[kWgradLanes][kWgradChannels];

  const int taps = gq.kernel * gq.kernel;
  const int conv = blockIdx.y / taps;  // 0: q, 1: k, 2: v
  const int tap = blockIdx.y % taps;
  const ConvGeom g = conv == 0 ? gq : gkv;
  const int kh = tap / g.kernel;
  const int kw = tap % g.kernel;
  const scalar_t* grad = conv == 0 ? grad_q : (conv == 1 ? grad_k : grad_v);
  const int64_t tokens_out = cls + static_cast<int64_t>(g.out_h) * g.out_w;
  const int64_t plane = static_cast<int64_t>(g.out_h) * g.out_w;
  const int64_t positions = batch * plane;

  const int c = blockIdx.x * kWgradChannels + threadIdx.x;
  float acc = 0.0f;
  if (c < channels) {
    for (int64_t pos = static_cast<int64_t>(blockIdx.z) * kWgradLanes + threadIdx.y; pos < positions;
         pos += static_cast<int64_t>(gridDim.z) * kWgradLanes) {
      const int64_t b = pos / plane;
      const int r = static_cast<int>(pos % plane);
      const int oh = r / g.out_w;
      const int ow = r % g.out_w;
      const int ih = oh * g.stride - g.padding + kh;
      const int iw = ow * g.stride - g.padding + kw;
      if (ih < 0 || ih >= height || iw < 0 || iw >= width) continue;
      const float gv = to_float(grad[(b * tokens_out + cls + r) * channels + c]);
      const float xv = to_float(x[b * x_sb + (cls + static_cast<int64_t>(ih) * width + iw) * x_st + c]);
      acc += gv * xv;
    }
  }
  lane_sums[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < channels) {
    float sum = 0.0f;
#pragma unroll
    for (int lane = 0; lane < kWgradLanes; ++lane) sum += lane_sums[lane][threadIdx.x];
    partial[((static_cast<int64_t>(blockIdx.z) * 3 + conv) * taps + tap) * channels + c] = sum;
  }
}

int grid_for(int64_t items) {
  // Grid-stride loops: enough blocks to fill the GPU many times over, capped for huge tensors.
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(items, kThreads), int64_t{1} << 20)));
}

// Position splits of the weight-grad grid: about kWgradTargetPerThread positions per thread.
int64_t wgrad_splits(int64_t max_positions) {
  return std::max<int64_t>(
      1, std::min<int64_t>(kWgradMaxSplits, ceil_div(max_positions, kWgradLanes * kWgradTargetPerThread)));
}

}  // namespace
}  // namespace cvt_fast

// ---------------------------------------------------------------- host side (launch, checks)
// Left out when csrc/emulate/ compiles the kernels above for a CPU emulation of the GPU.
#ifndef CVT_FAST_HOST_EMULATION
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

void check_conv_proj_layout(const char* op, const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.stride(2) == 1, op, ": the channel (last) dimension of x must be contiguous, got strides ",
                    x.strides());
  TORCH_CHECK_VALUE(x.numel() < (int64_t{1} << 40) && x.size(0) < (int64_t{1} << 31) &&
                        x.size(2) < (int64_t{1} << 31),
                    op, ": x is too large, got shape ", x.sizes());
}

ConvGeom make_geom(int64_t height, int64_t width, int64_t kernel, int64_t stride, int64_t padding) {
  return ConvGeom{static_cast<int>(kernel), static_cast<int>(stride), static_cast<int>(padding),
                  static_cast<int>(conv_out_size(height, kernel, stride, padding)),
                  static_cast<int>(conv_out_size(width, kernel, stride, padding))};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_proj_forward_cuda(
    const at::Tensor& x, const at::Tensor& wq, const at::Tensor& wk, const at::Tensor& wv,
    const std::optional<at::Tensor>& bq, const std::optional<at::Tensor>& bk, const std::optional<at::Tensor>& bv,
    int64_t height, int64_t width, bool has_cls, int64_t stride_q, int64_t stride_kv, int64_t padding_q,
    int64_t padding_kv) {
  constexpr const char* kOp = "cvt_fast::conv_proj_forward_cuda";
  check_conv_proj_device(kOp, x, wq, wk, wv);
  const int64_t kernel = check_conv_proj_args(kOp, x, wq, wk, wv, height, width, has_cls, stride_q, stride_kv,
                                              padding_q, padding_kv);
  check_conv_proj_layout(kOp, x);
  const auto bq_f = checked_bias(kOp, bq, "bq", x);
  const auto bk_f = checked_bias(kOp, bk, "bk", x);
  const auto bv_f = checked_bias(kOp, bv, "bv", x);

  const int cls = has_cls ? 1 : 0;
  const ConvGeom gq = make_geom(height, width, kernel, stride_q, padding_q);
  const ConvGeom gkv = make_geom(height, width, kernel, stride_kv, padding_kv);
  const int64_t batch = x.size(0), channels = x.size(2);
  auto q = at::empty({batch, cls + int64_t{gq.out_h} * gq.out_w, channels}, x.options());
  auto k = at::empty({batch, cls + int64_t{gkv.out_h} * gkv.out_w, channels}, x.options());
  auto v = at::empty_like(k);
  const int64_t items = q.numel() + k.numel();
  if (items == 0) return {q, k, v};

  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const auto wq_t = tap_major(wq), wk_t = tap_major(wk), wv_t = tap_major(wv);
  auto stream = c10::cuda::getCurrentCUDAStream();
  CVT_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), kOp, [&] {
    conv_proj_fwd_kernel<scalar_t><<<grid_for(items), kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), wq_t.data_ptr<float>(), wk_t.data_ptr<float>(),
        wv_t.data_ptr<float>(), bq_f ? bq_f->data_ptr<float>() : nullptr, bk_f ? bk_f->data_ptr<float>() : nullptr,
        bv_f ? bv_f->data_ptr<float>() : nullptr, q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
        v.data_ptr<scalar_t>(), static_cast<int>(batch), static_cast<int>(channels), static_cast<int>(height),
        static_cast<int>(width), cls, gq, gkv);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {q, k, v};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_proj_backward_cuda(
    const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& grad_v, const at::Tensor& x,
    const at::Tensor& wq, const at::Tensor& wk, const at::Tensor& wv, int64_t height, int64_t width, bool has_cls,
    int64_t stride_q, int64_t stride_kv, int64_t padding_q, int64_t padding_kv) {
  constexpr const char* kOp = "cvt_fast::conv_proj_backward_cuda";
  check_conv_proj_device(kOp, x, wq, wk, wv);
  const int64_t kernel = check_conv_proj_args(kOp, x, wq, wk, wv, height, width, has_cls, stride_q, stride_kv,
                                              padding_q, padding_kv);
  check_conv_proj_layout(kOp, x);

  const int cls = has_cls ? 1 : 0;
  const ConvGeom gq = make_geom(height, width, kernel, stride_q, padding_q);
  const ConvGeom gkv = make_geom(height, width, kernel, stride_kv, padding_kv);
  const int64_t batch = x.size(0), channels = x.size(2);
  const std::vector<int64_t> shape_q{batch, cls + int64_t{gq.out_h} * gq.out_w, channels};
  const std::vector<int64_t> shape_kv{batch, cls + int64_t{gkv.out_h} * gkv.out_w, channels};
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
  const int64_t taps = kernel * kernel;
  if (x.numel() == 0) {
    return {grad_x, at::zeros(wq.sizes(), wq.options()), at::zeros(wk.sizes(), wk.options()),
            at::zeros(wv.sizes(), wv.options())};
  }

  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const auto gq_c = grad_q.contiguous(), gk_c = grad_k.contiguous(), gv_c = grad_v.contiguous();
  const auto wq_t = tap_major(wq), wk_t = tap_major(wk), wv_t = tap_major(wv);
  const int64_t max_positions = batch * std::max<int64_t>(int64_t{gq.out_h} * gq.out_w, int64_t{gkv.out_h} * gkv.out_w);
  const int64_t splits = wgrad_splits(max_positions);
  auto partial = at::empty({splits, 3, taps, channels}, x.options().dtype(at::kFloat));
  auto stream = c10::cuda::getCurrentCUDAStream();

  CVT_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), kOp, [&] {
    conv_proj_bwd_input_kernel<scalar_t><<<grid_for(grad_x.numel()), kThreads, 0, stream>>>(
        gq_c.data_ptr<scalar_t>(), gk_c.data_ptr<scalar_t>(), gv_c.data_ptr<scalar_t>(), wq_t.data_ptr<float>(),
        wk_t.data_ptr<float>(), wv_t.data_ptr<float>(), grad_x.data_ptr<scalar_t>(), static_cast<int>(batch),
        static_cast<int>(channels), static_cast<int>(height), static_cast<int>(width), cls, gq, gkv);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    const dim3 grid(static_cast<unsigned>(ceil_div(channels, kWgradChannels)), static_cast<unsigned>(3 * taps),
                    static_cast<unsigned>(splits));
    const dim3 block(kWgradChannels, kWgradLanes);
    conv_proj_bwd_weight_kernel<scalar_t><<<grid, block, 0, stream>>>(
        gq_c.data_ptr<scalar_t>(), gk_c.data_ptr<scalar_t>(), gv_c.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
        x.stride(0), x.stride(1), partial.data_ptr<float>(), static_cast<int>(batch), static_cast<int>(channels),
        static_cast<int>(height), static_cast<int>(width), cls, gq, gkv);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  // (splits, 3, k*k, C) -> (3, k*k, C) -> per conv (C, k*k) -> (C, 1, k, k) in the weight's dtype.
  const auto summed = partial.sum(0);
  auto weight_grad = [&](int conv, const at::Tensor& w) {
    return summed[conv].t().reshape(w.sizes()).to(w.scalar_type()).contiguous();
  };
  return {grad_x, weight_grad(0, wq), weight_grad(1, wk), weight_grad(2, wv)};
}

}  // namespace cvt_fast

#endif  // CVT_FAST_HOST_EMULATION
