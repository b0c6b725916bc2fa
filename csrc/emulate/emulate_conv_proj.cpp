// Host emulation of csrc/conv_proj.cu: the same kernels, plans and grid/block shapes as the CUDA
// wrapper, with two knobs the tests need (csrc/NOTES.md, "conv_proj"): the number of CTAs per
// channel chunk of the fused kernels (on a GPU: one resident wave, so every CTA walks many items;
// tests pick small counts so that the item loop, its double buffer and a partial last round run
// on the CPU), and whether 16-byte copies may be used (to reach the scalar fallback on aligned data).
// The weights come in tap-major fp32 (k*k, C), as the CUDA wrapper prepares them.
#define CVT_FAST_HOST_EMULATION
#include "../conv_proj.cu"
#include "emulate_common.h"

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

using namespace cvt_fast;

// 16-byte aligned dynamic shared memory for one launch (blocks run one after another).
struct alignas(16) SmemBlock {
  unsigned char bytes[16];
};

struct DynamicSmem {
  // Poisoned (0xFF: NaN in every float type) as on the attention side, so a read of shared memory
  // that nothing wrote shows.
  explicit DynamicSmem(int bytes) : storage(static_cast<size_t>(bytes) / sizeof(SmemBlock) + 1) {
    std::memset(storage.data(), 0xFF, storage.size() * sizeof(SmemBlock));
    g_emulated_dynamic_smem = storage.front().bytes;
  }
  ~DynamicSmem() { g_emulated_dynamic_smem = nullptr; }
  std::vector<SmemBlock> storage;
};

bool aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % kCopyBytes == 0; }

// As vector_copies_ok in the wrapper: base, token and batch strides and C in 16-byte units.
template <typename scalar_t>
bool vector_copies_ok(const void* p, int64_t batch_stride, int64_t token_stride, int channels) {
  constexpr int64_t kPerVector = kCopyBytes / sizeof(scalar_t);
  return aligned(p) && channels % kPerVector == 0 && token_stride % kPerVector == 0 && batch_stride % kPerVector == 0;
}

int ctas_for(int requested, int items) { return std::max(1, std::min(items, requested > 0 ? requested : 2)); }

// f(std::integral_constant<int, K>) for the kernel sizes the fused kernels are instantiated for.
template <typename F>
void with_kernel_size(int kernel, F&& f) {
  if (kernel == 3) {
    f(std::integral_constant<int, 3>{});
  } else {
    f(std::integral_constant<int, 5>{});
  }
}

}  // namespace

// path_out (may be null): 1 when the fused kernels ran, 0 for the generic ones.
extern "C" void emu_conv_proj_forward_ex(int dtype, const void* x, int64_t x_sb, int64_t x_st, const float* wq,
                                         const float* wk, const float* wv, const float* bq, const float* bk,
                                         const float* bv, void* q, void* k, void* v, int batch, int channels,
                                         int height, int width, int cls, int kernel, int stride_q, int stride_kv,
                                         int padding_q, int padding_kv, int allow_vector_copies, int ctas_per_chunk,
                                         int* path_out) {
  const ConvGeom gq = make_geom(height, width, kernel, stride_q, padding_q);
  const ConvGeom gkv = make_geom(height, width, kernel, stride_kv, padding_kv);
  const bool fused = use_fused_path(kernel, stride_q, stride_kv, padding_q, padding_kv);
  if (path_out != nullptr) *path_out = fused ? 1 : 0;
  cvt_emu::with_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* xp = static_cast<const scalar_t*>(x);
    scalar_t *qp = static_cast<scalar_t*>(q), *kp = static_cast<scalar_t*>(k), *vp = static_cast<scalar_t*>(v);
    if (fused) {
      const FusedPlan plan = make_fused_plan(false, batch, channels, height, width, cls, kernel, padding_q, padding_kv);
      const bool vec = allow_vector_copies && vector_copies_ok<scalar_t>(x, x_sb, x_st, channels);
      with_kernel_size(kernel, [&](auto kernel_size) {
        constexpr int K = decltype(kernel_size)::value;
        constexpr int L = lane_channels_for<scalar_t>(K);
        const DynamicSmem smem(fused_fwd_smem_bytes<scalar_t, L>(plan));
        const dim3 grid(ctas_for(ctas_per_chunk, plan.items), div_up(channels, chunk_channels(L)));
        cvt_emu::launch(grid, dim3(kThreads), &conv_proj_fwd_fused_kernel<scalar_t, K>, xp, x_sb, x_st, wq, wk, wv,
                        bq, bk, bv, qp, kp, vp, plan, vec);
      });
      return;
    }
    // As the wrapper: its launch plan, slots and grid.
    const float* const weights[3] = {wq, wk, wv};
    const float* const biases[3] = {bq, bk, bv};
    scalar_t* const outs[3] = {qp, kp, vp};
    const GenericLaunches launches = generic_forward_launches(gq, gkv);
    for (int i = 0; i < launches.n; ++i) {
      const GenericLaunch& l = launches.launch[i];
      cvt_emu::launch(generic_position_grid(l.g.out_h * l.g.out_w, channels, batch), dim3(kThreads),
                      &conv_proj_fwd_generic_kernel<scalar_t>, xp, x_sb, x_st, generic_slot(l, weights, 0),
                      generic_slot(l, weights, 1), generic_slot(l, weights, 2), generic_slot(l, biases, 0),
                      generic_slot(l, biases, 1), generic_slot(l, biases, 2), generic_slot(l, outs, 0),
                      generic_slot(l, outs, 1), generic_slot(l, outs, 2), l.count, channels, height, width, cls, l.g);
    }
  });
}

// grad_q/k/v contiguous; weight_grad: (3, C, k*k) fp32, as the second-stage kernel writes it.
extern "C" void emu_conv_proj_backward_ex(int dtype, const void* grad_q, const void* grad_k, const void* grad_v,
                                          const float* wq, const float* wk, const float* wv, const void* x,
                                          int64_t x_sb, int64_t x_st, void* grad_x, float* weight_grad, int batch,
                                          int channels, int height, int width, int cls, int kernel, int stride_q,
                                          int stride_kv, int padding_q, int padding_kv, int allow_vector_copies,
                                          int ctas_per_chunk, int* path_out) {
  const ConvGeom gq = make_geom(height, width, kernel, stride_q, padding_q);
  const ConvGeom gkv = make_geom(height, width, kernel, stride_kv, padding_kv);
  const int taps = kernel * kernel;
  const int generic_chunks = div_up(channels, kGenericChunk);
  const bool fused = use_fused_path(kernel, stride_q, stride_kv, padding_q, padding_kv);
  if (path_out != nullptr) *path_out = fused ? 1 : 0;
  std::vector<float> partial;
  int partial_rows = 0;
  cvt_emu::with_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t *gqp = static_cast<const scalar_t*>(grad_q), *gkp = static_cast<const scalar_t*>(grad_k),
                   *gvp = static_cast<const scalar_t*>(grad_v), *xp = static_cast<const scalar_t*>(x);
    scalar_t* gxp = static_cast<scalar_t*>(grad_x);
    if (fused) {
      const FusedPlan plan = make_fused_plan(true, batch, channels, height, width, cls, kernel, padding_q, padding_kv);
      const bool vec_x = allow_vector_copies && vector_copies_ok<scalar_t>(x, x_sb, x_st, channels);
      const int64_t tokens_q = cls + int64_t{plan.hq} * plan.wq, tokens_kv = cls + int64_t{plan.hk} * plan.wk;
      const bool vec_grad = allow_vector_copies &&
                            vector_copies_ok<scalar_t>(grad_q, tokens_q * channels, channels, channels) &&
                            vector_copies_ok<scalar_t>(grad_k, tokens_kv * channels, channels, channels) &&
                            vector_copies_ok<scalar_t>(grad_v, tokens_kv * channels, channels, channels);
      partial_rows = ctas_for(ctas_per_chunk, plan.items);
      partial.assign(static_cast<size_t>(partial_rows) * 3 * taps * channels, std::nanf(""));
      with_kernel_size(kernel, [&](auto kernel_size) {
        constexpr int K = decltype(kernel_size)::value;
        constexpr int L = lane_channels_for<scalar_t>(K);
        const DynamicSmem smem(fused_bwd_smem_bytes<scalar_t, L>(plan));
        cvt_emu::launch(dim3(partial_rows, div_up(channels, chunk_channels(L))), dim3(kThreads),
                        &conv_proj_bwd_fused_kernel<scalar_t, K>, gqp, gkp, gvp, xp, x_sb, x_st, wq, wk, wv, gxp,
                        partial.data(), plan, vec_x, vec_grad);
      });
      return;
    }
    cvt_emu::launch(generic_position_grid(height * width, channels, batch), dim3(kThreads),
                    &conv_proj_bwd_input_generic_kernel<scalar_t>, gqp, gkp, gvp, wq, wk, wv, gxp, channels, height,
                    width, cls, gq, gkv);
    partial_rows = generic_wgrad_splits(batch * std::max(gq.out_h, gkv.out_h));
    partial.assign(static_cast<size_t>(partial_rows) * 3 * taps * channels, std::nanf(""));
    cvt_emu::launch(dim3(partial_rows, generic_chunks, 3 * taps), dim3(kThreads),
                    &conv_proj_bwd_weight_generic_kernel<scalar_t>,
                    gqp, gkp, gvp, xp, x_sb, x_st, partial.data(), batch, channels, height, width, cls, gq, gkv);
  });
  // Two blocks (the wrapper: one per 32 entries) run the kernel's block-stride loop at few OS threads.
  const int64_t per_conv = int64_t{channels} * taps;
  cvt_emu::launch(dim3(2), dim3(kThreads), &conv_proj_wgrad_reduce_kernel,
                  static_cast<const float*>(partial.data()), partial_rows, taps, channels, weight_grad,
                  weight_grad + per_conv, weight_grad + 2 * per_conv);
}

// How many pair loads or stores of the fused kernels were misaligned since the last call (must be 0).
extern "C" int emu_conv_proj_misaligned_pairs() { return g_emulated_misaligned_pairs.exchange(0); }

// The entry points tests/test_cuda_extension.py binds (default CTA count, 16-byte copies where
// the data allows); its backward takes the weight gradients tap-major, (3, k*k, C).
extern "C" void emu_conv_proj_forward(int dtype, const void* x, int64_t x_sb, int64_t x_st, const float* wq,
                                      const float* wk, const float* wv, const float* bq, const float* bk,
                                      const float* bv, void* q, void* k, void* v, int batch, int channels,
                                      int height, int width, int cls, int kernel, int stride_q, int stride_kv,
                                      int padding_q, int padding_kv) {
  emu_conv_proj_forward_ex(dtype, x, x_sb, x_st, wq, wk, wv, bq, bk, bv, q, k, v, batch, channels, height, width, cls,
                           kernel, stride_q, stride_kv, padding_q, padding_kv, 1, 0, nullptr);
}

extern "C" void emu_conv_proj_backward(int dtype, const void* grad_q, const void* grad_k, const void* grad_v,
                                       const float* wq, const float* wk, const float* wv, const void* x, int64_t x_sb,
                                       int64_t x_st, void* grad_x, float* weight_grad, int batch, int channels,
                                       int height, int width, int cls, int kernel, int stride_q, int stride_kv,
                                       int padding_q, int padding_kv) {
  const int taps = kernel * kernel;
  std::vector<float> channel_major(static_cast<size_t>(3) * channels * taps);
  emu_conv_proj_backward_ex(dtype, grad_q, grad_k, grad_v, wq, wk, wv, x, x_sb, x_st, grad_x, channel_major.data(),
                            batch, channels, height, width, cls, kernel, stride_q, stride_kv, padding_q, padding_kv, 1,
                            0, nullptr);
  for (int conv = 0; conv < 3; ++conv) {
    for (int c = 0; c < channels; ++c) {
      for (int t = 0; t < taps; ++t) {
        weight_grad[(static_cast<int64_t>(conv) * taps + t) * channels + c] =
            channel_major[(static_cast<int64_t>(conv) * channels + c) * taps + t];
      }
    }
  }
}

// Launch recording (cuda_on_host.h): with dry set, the entry points above plan and "launch" without
// running a kernel, so the host plans can be checked at sizes too large to emulate (a batch past
// 65535). emu_launch_log copies up to `capacity` recorded grids (x, y, z each) and returns how many
// were recorded since the last call, which clears the log; *oversized gets the count of grids over
// the CUDA limits.
extern "C" void emu_set_dry_launches(int dry) { cvt_emu::g_dry_launches = dry != 0; }

extern "C" int emu_launch_log(unsigned* grids, int capacity, int* oversized) {
  const int n = static_cast<int>(cvt_emu::g_launch_log.size());
  for (int i = 0; i < n && i < capacity; ++i) {
    grids[3 * i] = cvt_emu::g_launch_log[i].x;
    grids[3 * i + 1] = cvt_emu::g_launch_log[i].y;
    grids[3 * i + 2] = cvt_emu::g_launch_log[i].z;
  }
  if (oversized != nullptr) *oversized = cvt_emu::g_oversized_launches;
  cvt_emu::g_launch_log.clear();
  cvt_emu::g_oversized_launches = 0;
  return n;
}
