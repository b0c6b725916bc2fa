// Host emulation of csrc/conv_proj.cu with the production grid and block shapes. The
// weights come in tap-major fp32 (k*k, C), as the CUDA wrapper prepares them.
#define CVT_FAST_HOST_EMULATION
#include "../conv_proj.cu"
#include "emulate_common.h"

namespace {

cvt_fast::ConvGeom geom(int height, int width, int kernel, int stride, int padding) {
  return cvt_fast::ConvGeom{kernel, stride, padding, (height + 2 * padding - kernel) / stride + 1,
                            (width + 2 * padding - kernel) / stride + 1};
}

}  // namespace

extern "C" void emu_conv_proj_forward(int dtype, const void* x, int64_t x_sb, int64_t x_st, const float* wq,
                                      const float* wk, const float* wv, const float* bq, const float* bk,
                                      const float* bv, void* q, void* k, void* v, int batch, int channels,
                                      int height, int width, int cls, int kernel, int stride_q, int stride_kv,
                                      int padding_q, int padding_kv) {
  using namespace cvt_fast;
  const ConvGeom gq = geom(height, width, kernel, stride_q, padding_q);
  const ConvGeom gkv = geom(height, width, kernel, stride_kv, padding_kv);
  // As the wrapper: q.numel() + k.numel() (v is computed by k's threads).
  const int64_t items = static_cast<int64_t>(batch) * channels *
                        (2 * cls + int64_t{gq.out_h} * gq.out_w + int64_t{gkv.out_h} * gkv.out_w);
  cvt_emu::with_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    cvt_emu::launch(dim3(grid_for(items)), dim3(kThreads), &conv_proj_fwd_kernel<scalar_t>,
                    static_cast<const scalar_t*>(x), x_sb, x_st, wq, wk, wv, bq, bk, bv, static_cast<scalar_t*>(q),
                    static_cast<scalar_t*>(k), static_cast<scalar_t*>(v), batch, channels, height, width, cls, gq,
                    gkv);
  });
}

// weight_grad: (3, k*k, C) fp32, the sum over the splits of the kernel's partials.
extern "C" void emu_conv_proj_backward(int dtype, const void* grad_q, const void* grad_k, const void* grad_v,
                                       const float* wq, const float* wk, const float* wv, const void* x, int64_t x_sb,
                                       int64_t x_st, void* grad_x, float* weight_grad, int batch, int channels,
                                       int height, int width, int cls, int kernel, int stride_q, int stride_kv,
                                       int padding_q, int padding_kv) {
  using namespace cvt_fast;
  const ConvGeom gq = geom(height, width, kernel, stride_q, padding_q);
  const ConvGeom gkv = geom(height, width, kernel, stride_kv, padding_kv);
  const int64_t taps = static_cast<int64_t>(kernel) * kernel;
  const int64_t tokens = cls + static_cast<int64_t>(height) * width;
  const int64_t max_positions =
      static_cast<int64_t>(batch) * std::max<int64_t>(int64_t{gq.out_h} * gq.out_w, int64_t{gkv.out_h} * gkv.out_w);
  const int64_t splits = wgrad_splits(max_positions);
  std::vector<float> partial(static_cast<size_t>(splits * 3 * taps * channels), std::nanf(""));
  cvt_emu::with_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    cvt_emu::launch(dim3(grid_for(batch * tokens * channels)), dim3(kThreads), &conv_proj_bwd_input_kernel<scalar_t>,
                    static_cast<const scalar_t*>(grad_q), static_cast<const scalar_t*>(grad_k),
                    static_cast<const scalar_t*>(grad_v), wq, wk, wv, static_cast<scalar_t*>(grad_x), batch, channels,
                    height, width, cls, gq, gkv);
    const dim3 grid(static_cast<unsigned>(ceil_div(channels, kWgradChannels)), static_cast<unsigned>(3 * taps),
                    static_cast<unsigned>(splits));
    cvt_emu::launch(grid, dim3(kWgradChannels, kWgradLanes), &conv_proj_bwd_weight_kernel<scalar_t>,
                    static_cast<const scalar_t*>(grad_q), static_cast<const scalar_t*>(grad_k),
                    static_cast<const scalar_t*>(grad_v), static_cast<const scalar_t*>(x), x_sb, x_st,
                    partial.data(), batch, channels, height, width, cls, gq, gkv);
  });
  for (int64_t e = 0; e < 3 * taps * channels; ++e) {
    float sum = 0.0f;
    for (int64_t s = 0; s < splits; ++s) sum += partial[s * 3 * taps * channels + e];
    weight_grad[e] = sum;
  }
}
