// Every op of the cvt_fast CUDA extension, in one place: schemas (TORCH_LIBRARY_FRAGMENT,
// the Python ops layer declares its own ops in the same namespace), the CUDA kernels, the
// Meta shape functions (used by fake tensors / torch.compile), and a CPU registration that
// only raises a clear error (the kernels run on NVIDIA GPUs only).
// Semantics of each op: the contract in cvt_fast/ops/__init__.py.

#include <Python.h>
#include <torch/library.h>

#include "ops.h"

namespace cvt_fast {
namespace {

// ---- Meta (shape) implementations. Sizes are SymInts so dynamic shapes trace. ----

void meta_check_attention(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op,
                    ": q, k, v must be 4-dimensional (batch, tokens, heads, head_dim), got ", q.sym_sizes(), ", ",
                    k.sym_sizes(), ", ", v.sym_sizes());
  TORCH_CHECK_TYPE(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), op,
                   ": q, k, v must have one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
                   v.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> attention_forward_meta(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, double /*scale*/) {
  constexpr const char* kOp = "cvt_fast::attention_forward_cuda";
  meta_check_attention(kOp, q, k, v);
  auto out = at::empty_symint({q.sym_size(0), q.sym_size(1), q.sym_size(2) * q.sym_size(3)}, q.options());
  auto lse = at::empty_symint({q.sym_size(0), q.sym_size(2), q.sym_size(1)}, q.options().dtype(at::kFloat));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_meta(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& /*out*/, const at::Tensor& /*lse*/, double /*scale*/) {
  constexpr const char* kOp = "cvt_fast::attention_backward_cuda";
  meta_check_attention(kOp, q, k, v);
  TORCH_CHECK_VALUE(grad_out.dim() == 3, kOp, ": grad_out must be (batch, tokens, heads*head_dim), got ",
                    grad_out.sym_sizes());
  return {at::empty_symint(q.sym_sizes(), q.options()), at::empty_symint(k.sym_sizes(), k.options()),
          at::empty_symint(v.sym_sizes(), v.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_proj_forward_meta(
    const at::Tensor& x, const at::Tensor& wq, const at::Tensor& wk, const at::Tensor& wv,
    const std::optional<at::Tensor>& /*bq*/, const std::optional<at::Tensor>& /*bk*/,
    const std::optional<at::Tensor>& /*bv*/, int64_t height, int64_t width, bool has_cls, int64_t stride_q,
    int64_t stride_kv, int64_t padding_q, int64_t padding_kv) {
  const int64_t kernel = check_conv_proj_args("cvt_fast::conv_proj_forward_cuda", x, wq, wk, wv, height, width,
                                              has_cls, stride_q, stride_kv, padding_q, padding_kv);
  const int64_t cls = has_cls ? 1 : 0;
  const int64_t tokens_q = cls + conv_out_size(height, kernel, stride_q, padding_q) *
                                     conv_out_size(width, kernel, stride_q, padding_q);
  const int64_t tokens_kv = cls + conv_out_size(height, kernel, stride_kv, padding_kv) *
                                      conv_out_size(width, kernel, stride_kv, padding_kv);
  const c10::SymInt batch = x.sym_size(0);
  const c10::SymInt channels = x.sym_size(2);
  return {at::empty_symint({batch, c10::SymInt(tokens_q), channels}, x.options()),
          at::empty_symint({batch, c10::SymInt(tokens_kv), channels}, x.options()),
          at::empty_symint({batch, c10::SymInt(tokens_kv), channels}, x.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_proj_backward_meta(
    const at::Tensor& /*grad_q*/, const at::Tensor& /*grad_k*/, const at::Tensor& /*grad_v*/, const at::Tensor& x,
    const at::Tensor& wq, const at::Tensor& wk, const at::Tensor& wv, int64_t height, int64_t width, bool has_cls,
    int64_t stride_q, int64_t stride_kv, int64_t padding_q, int64_t padding_kv) {
  check_conv_proj_args("cvt_fast::conv_proj_backward_cuda", x, wq, wk, wv, height, width, has_cls, stride_q,
                       stride_kv, padding_q, padding_kv);
  return {at::empty_symint(x.sym_sizes(), x.options()), at::empty_symint(wq.sym_sizes(), wq.options()),
          at::empty_symint(wk.sym_sizes(), wk.options()), at::empty_symint(wv.sym_sizes(), wv.options())};
}

}  // namespace
}  // namespace cvt_fast

TORCH_LIBRARY_FRAGMENT(cvt_fast, m) {
  m.def("attention_forward_cuda(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor out, Tensor lse)");
  m.def(
      "attention_backward_cuda(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "float scale) -> (Tensor dq, Tensor dk, Tensor dv)");
  m.def(
      "conv_proj_forward_cuda(Tensor x, Tensor wq, Tensor wk, Tensor wv, Tensor? bq, Tensor? bk, Tensor? bv, "
      "int height, int width, bool has_cls, int stride_q, int stride_kv, int padding_q, int padding_kv) "
      "-> (Tensor q, Tensor k, Tensor v)");
  m.def(
      "conv_proj_backward_cuda(Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor x, Tensor wq, Tensor wk, "
      "Tensor wv, int height, int width, bool has_cls, int stride_q, int stride_kv, int padding_q, "
      "int padding_kv) -> (Tensor grad_x, Tensor grad_wq, Tensor grad_wk, Tensor grad_wv)");
}

TORCH_LIBRARY_IMPL(cvt_fast, CUDA, m) {
  m.impl("attention_forward_cuda", &cvt_fast::attention_forward_cuda);
  m.impl("attention_backward_cuda", &cvt_fast::attention_backward_cuda);
  m.impl("conv_proj_forward_cuda", &cvt_fast::conv_proj_forward_cuda);
  m.impl("conv_proj_backward_cuda", &cvt_fast::conv_proj_backward_cuda);
}

// The host wrappers check the device before touching CUDA, so on CPU tensors they raise
// "must be a CUDA tensor ... use backend='reference'" instead of the dispatcher's generic
// "could not run ... with arguments from the 'CPU' backend".
TORCH_LIBRARY_IMPL(cvt_fast, CPU, m) {
  m.impl("attention_forward_cuda", &cvt_fast::attention_forward_cuda);
  m.impl("attention_backward_cuda", &cvt_fast::attention_backward_cuda);
  m.impl("conv_proj_forward_cuda", &cvt_fast::conv_proj_forward_cuda);
  m.impl("conv_proj_backward_cuda", &cvt_fast::conv_proj_backward_cuda);
}

TORCH_LIBRARY_IMPL(cvt_fast, Meta, m) {
  m.impl("attention_forward_cuda", &cvt_fast::attention_forward_meta);
  m.impl("attention_backward_cuda", &cvt_fast::attention_backward_meta);
  m.impl("conv_proj_forward_cuda", &cvt_fast::conv_proj_forward_meta);
  m.impl("conv_proj_backward_cuda", &cvt_fast::conv_proj_backward_meta);
}

// `import cvt_fast._C` only has to run the static registrations above; the module is empty.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "cvt_fast CUDA kernels (torch.ops.cvt_fast.*_cuda)",
                                          -1, nullptr};
  return PyModule_Create(&module_def);
}
