"""Every op of cvt_fast in one place: schemas, implementations by backend, fake kernels, autograd.

    cvt_fast::attention           (q, k, v, scale, backend) -> (out, lse)
    cvt_fast::attention_backward  (grad_out, q, k, v, out, lse, scale, backend) -> (dq, dk, dv)
    cvt_fast::conv_proj           (x, wq, wk, wv, bq?, bk?, bv?, height, width, has_cls,
                                   stride_q, stride_kv, padding_q, padding_kv, backend) -> (q, k, v)
    cvt_fast::conv_proj_backward  (grad_q, grad_k, grad_v, x, wq, wk, wv, height, width, has_cls,
                                   stride_q, stride_kv, padding_q, padding_kv, backend)
                                   -> (grad_x, grad_wq, grad_wk, grad_wv)
    cvt_fast::conv_proj_bn        (x, wq, wk, wv, gamma_q, gamma_k, gamma_v, beta_q, beta_k, beta_v,
                                   height, width, has_cls, stride_q, stride_kv, padding_q, padding_kv,
                                   eps[3], backend) -> (q, k, v, mean, var)
    cvt_fast::conv_proj_bn_backward (grad_q, grad_k, grad_v, x, wq, wk, wv, gamma_*, beta_*, q, k, v,
                                   mean, var, geometry..., eps[3], backend)
                                   -> (grad_x, grad_wq, grad_wk, grad_wv, grad_gamma (3, C), grad_beta (3, C))

Semantics and shapes are those of cvt_fast/ops/__init__.py. `backend` is always a concrete
name of an op backend (kind 'reference' or 'kernels' in cvt_fast/ops/backends.py), resolved
before the call (cvt_fast/ops/backend.py), so it is a plain string constant in a compiled graph.
The ops are torch.library.custom_op functions: they run eagerly on any device, have fake
implementations for torch.compile and opcheck, and the body launches the chosen implementation,
loaded by the backend's record only when that backend is used. Both the bodies and the fake
implementations first check their inputs (cvt_fast/ops/contract.py): this is the one door every
caller passes, so a direct torch.ops.cvt_fast.* call gets the same clear errors as
cvt_fast.ops.*. The CUDA extension registers its kernels under *_cuda names in the same
namespace, so these definitions and the C++ ones do not collide.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from cvt_fast.ops import contract, reference
from cvt_fast.ops.backends import TABLE, Implementation, backends_for
from cvt_fast.ops.contract import LSE_DTYPE, stats_dtype

ATTENTION_SCHEMA = "(Tensor q, Tensor k, Tensor v, float scale, str backend) -> (Tensor, Tensor)"
ATTENTION_BACKWARD_SCHEMA = ("(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
                             "float scale, str backend) -> (Tensor, Tensor, Tensor)")
CONV_PROJ_SCHEMA = ("(Tensor x, Tensor wq, Tensor wk, Tensor wv, Tensor? bq, Tensor? bk, Tensor? bv, "
                    "int height, int width, bool has_cls, int stride_q, int stride_kv, int padding_q, "
                    "int padding_kv, str backend) -> (Tensor, Tensor, Tensor)")
CONV_PROJ_BACKWARD_SCHEMA = ("(Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor x, Tensor wq, Tensor wk, "
                             "Tensor wv, int height, int width, bool has_cls, int stride_q, int stride_kv, "
                             "int padding_q, int padding_kv, str backend) -> (Tensor, Tensor, Tensor, Tensor)")
_GEOMETRY_SCHEMA = "int height, int width, bool has_cls, int stride_q, int stride_kv, int padding_q, int padding_kv"
CONV_PROJ_BN_SCHEMA = ("(Tensor x, Tensor wq, Tensor wk, Tensor wv, Tensor gamma_q, Tensor gamma_k, Tensor gamma_v, "
                       f"Tensor beta_q, Tensor beta_k, Tensor beta_v, {_GEOMETRY_SCHEMA}, float[] eps, str backend) "
                       "-> (Tensor, Tensor, Tensor, Tensor, Tensor)")
CONV_PROJ_BN_BACKWARD_SCHEMA = (
    "(Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor x, Tensor wq, Tensor wk, Tensor wv, Tensor gamma_q, "
    "Tensor gamma_k, Tensor gamma_v, Tensor beta_q, Tensor beta_k, Tensor beta_v, Tensor q, Tensor k, Tensor v, "
    f"Tensor mean, Tensor var, {_GEOMETRY_SCHEMA}, float[] eps, str backend) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")


def _implementation(op: str, backend: str) -> Implementation:
    """Forward and backward of `op` for a concrete op backend (not a peer, not 'auto')."""
    able = backends_for(op, kinds=("reference", "kernels"))
    if backend not in able:
        raise ValueError(f"cvt_fast {op}: backend {backend!r} is not an op backend; expected one of "
                         f"{', '.join(map(repr, able))} (resolve 'auto' with cvt_fast.ops.resolve_backend first; "
                         "peers are called by cvt_fast.ops.attention directly)")
    return TABLE[backend].load(op)


def _no_autocast(t: Tensor):
    # The bodies run below the Autocast dispatch key but with autocast still on in the
    # thread: without this, the reference's float32 matmuls would be recast to 16 bits.
    return torch.autocast(device_type=t.device.type, enabled=False)


def _unit_stride(*tensors: Tensor) -> tuple:
    """The backward ops' saved inputs with contiguous last dimensions, copied only where they are not
    (contract.SAVED_LAYOUT: a compiler may hand them back in another layout)."""
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in tensors)


def _fresh(t: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    # Outputs of a custom op are contiguous tensors of the declared dtype; a backend that
    # returns anything else is normalised here rather than breaking the fake-tensor contract.
    return t.to(dtype or t.dtype).contiguous()


# --------------------------------------------------------------------------- attention

@torch.library.custom_op("cvt_fast::attention", mutates_args=(), schema=ATTENTION_SCHEMA)
def attention(q: Tensor, k: Tensor, v: Tensor, scale: float, backend: str) -> tuple[Tensor, Tensor]:
    contract.check_attention(q, k, v, scale)
    forward, _ = _implementation("attention", backend)
    with _no_autocast(q):
        out, lse = forward(q, k, v, scale)
    return _fresh(out, q.dtype), _fresh(lse, LSE_DTYPE)


@attention.register_fake
def _attention_fake(q, k, v, scale, backend):
    contract.check_attention(q, k, v, scale)
    batch, n_q, heads, head_dim = q.shape
    return q.new_empty((batch, n_q, heads * head_dim)), q.new_empty((batch, heads, n_q), dtype=LSE_DTYPE)


@torch.library.custom_op("cvt_fast::attention_backward", mutates_args=(), schema=ATTENTION_BACKWARD_SCHEMA)
def attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       scale: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    contract.check_attention_backward(grad_out, q, k, v, out, lse, scale)
    grad_out, q, k, v, out = _unit_stride(grad_out, q, k, v, out)
    _, backward = _implementation("attention", backend)
    with _no_autocast(q):
        dq, dk, dv = backward(grad_out, q, k, v, out, lse, scale)
    return _fresh(dq, q.dtype), _fresh(dk, k.dtype), _fresh(dv, v.dtype)


@attention_backward.register_fake
def _attention_backward_fake(grad_out, q, k, v, out, lse, scale, backend):
    contract.check_attention_backward(grad_out, q, k, v, out, lse, scale)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale, ctx.backend = scale, backend
    # lse is saved for the backward, not a differentiable result; left unmaterialised, its absent
    # gradient costs no zero-filled (B, H, Nq) tensor.
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)


def _attention_autograd(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    # Kernels read grad_out densely; the gradient of e.g. out.sum() arrives as a stride-0 expand.
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out.contiguous()
    dq, dk, dv = attention_backward(grad_out, q, k, v, out, lse, ctx.scale, ctx.backend)
    return dq, dk, dv, None, None


attention.register_autograd(_attention_autograd, setup_context=_attention_setup_context)


# --------------------------------------------------------------------------- conv projection

@torch.library.custom_op("cvt_fast::conv_proj", mutates_args=(), schema=CONV_PROJ_SCHEMA)
def conv_proj(x: Tensor, wq: Tensor, wk: Tensor, wv: Tensor, bq: Optional[Tensor], bk: Optional[Tensor],
              bv: Optional[Tensor], height: int, width: int, has_cls: bool, stride_q: int, stride_kv: int,
              padding_q: int, padding_kv: int, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    geometry = (height, width, has_cls, stride_q, stride_kv, padding_q, padding_kv)
    contract.check_conv_proj(x, (wq, wk, wv), (bq, bk, bv), *geometry)
    forward, _ = _implementation("conv_proj", backend)
    with _no_autocast(x):
        outputs = forward(x, wq, wk, wv, bq, bk, bv, height, width, has_cls, stride_q, stride_kv, padding_q,
                          padding_kv)
    return tuple(_fresh(t, x.dtype) for t in outputs)


@conv_proj.register_fake
def _conv_proj_fake(x, wq, wk, wv, bq, bk, bv, height, width, has_cls, stride_q, stride_kv, padding_q,
                    padding_kv, backend):
    geometry = (height, width, has_cls, stride_q, stride_kv, padding_q, padding_kv)
    contract.check_conv_proj(x, (wq, wk, wv), (bq, bk, bv), *geometry)
    return tuple(x.new_empty(shape) for shape in contract.conv_proj_output_shapes(x, (wq, wk, wv), *geometry))


@torch.library.custom_op("cvt_fast::conv_proj_backward", mutates_args=(), schema=CONV_PROJ_BACKWARD_SCHEMA)
def conv_proj_backward(grad_q: Tensor, grad_k: Tensor, grad_v: Tensor, x: Tensor, wq: Tensor, wk: Tensor,
                       wv: Tensor, height: int, width: int, has_cls: bool, stride_q: int, stride_kv: int,
                       padding_q: int, padding_kv: int, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    contract.check_conv_proj_backward((grad_q, grad_k, grad_v), x, (wq, wk, wv), height, width, has_cls, stride_q,
                                      stride_kv, padding_q, padding_kv)
    x, = _unit_stride(x)
    _, backward = _implementation("conv_proj", backend)
    with _no_autocast(x):
        grads = backward(grad_q, grad_k, grad_v, x, wq, wk, wv, height, width, has_cls, stride_q, stride_kv,
                         padding_q, padding_kv)
    return tuple(_strided_like(_fresh(g, t.dtype), t) for g, t in zip(grads, (x, wq, wk, wv)))


def _strided_like(g: Tensor, t: Tensor) -> Tensor:
    # A (C, 1, k, k) gradient can be "contiguous" with another stride in its size-1 dim;
    # DDP's gradient buckets compare strides exactly and warn (and copy) on a mismatch.
    if g.stride() == t.stride() or not t.is_contiguous():
        return g
    return torch.empty_like(t, dtype=g.dtype).copy_(g)


@conv_proj_backward.register_fake
def _conv_proj_backward_fake(grad_q, grad_k, grad_v, x, wq, wk, wv, height, width, has_cls, stride_q,
                             stride_kv, padding_q, padding_kv, backend):
    contract.check_conv_proj_backward((grad_q, grad_k, grad_v), x, (wq, wk, wv), height, width, has_cls, stride_q,
                                      stride_kv, padding_q, padding_kv)
    return x.new_empty(x.shape), wq.new_empty(wq.shape), wk.new_empty(wk.shape), wv.new_empty(wv.shape)


def _conv_proj_setup_context(ctx, inputs, output):
    x, wq, wk, wv, bq, bk, bv, *geometry, backend = inputs
    ctx.save_for_backward(x, wq, wk, wv)
    ctx.geometry, ctx.backend = tuple(geometry), backend
    ctx.bias_dtypes = tuple(None if b is None else b.dtype for b in (bq, bk, bv))
    ctx.output_shapes = tuple(t.shape for t in output)


def _conv_proj_autograd(ctx, grad_q, grad_k, grad_v):
    x, wq, wk, wv = ctx.saved_tensors
    grads = tuple(x.new_zeros(shape) if g is None else g.contiguous()
                  for g, shape in zip((grad_q, grad_k, grad_v), ctx.output_shapes))
    grad_x, grad_wq, grad_wk, grad_wv = conv_proj_backward(*grads, x, wq, wk, wv, *ctx.geometry, ctx.backend)
    has_cls = ctx.geometry[2]
    # The bias is added to every convolved (non-cls) row: its gradient is their sum.
    bias_grads = tuple(None if dtype is None or not ctx.needs_input_grad[4 + i]
                       else g[:, int(has_cls):].sum(dim=(0, 1), dtype=reference.compute_dtype(g.dtype)).to(dtype)
                       for i, (g, dtype) in enumerate(zip(grads, ctx.bias_dtypes)))
    return (grad_x, grad_wq, grad_wk, grad_wv, *bias_grads) + (None,) * 8


conv_proj.register_autograd(_conv_proj_autograd, setup_context=_conv_proj_setup_context)


# --------------------------------------------------------------------------- conv projection + BatchNorm

@torch.library.custom_op("cvt_fast::conv_proj_bn", mutates_args=(), schema=CONV_PROJ_BN_SCHEMA)
def conv_proj_bn(x: Tensor, wq: Tensor, wk: Tensor, wv: Tensor, gamma_q: Tensor, gamma_k: Tensor, gamma_v: Tensor,
                 beta_q: Tensor, beta_k: Tensor, beta_v: Tensor, height: int, width: int, has_cls: bool,
                 stride_q: int, stride_kv: int, padding_q: int, padding_kv: int, eps: list[float],
                 backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    geometry = (height, width, has_cls, stride_q, stride_kv, padding_q, padding_kv)
    gammas, betas = (gamma_q, gamma_k, gamma_v), (beta_q, beta_k, beta_v)
    contract.check_conv_proj_bn(x, (wq, wk, wv), gammas, betas, *geometry, eps)
    forward, _ = _implementation("conv_proj_bn", backend)
    with _no_autocast(x):
        q, k, v, mean, var = forward(x, wq, wk, wv, *gammas, *betas, *geometry, list(eps))
    stats = stats_dtype(x.dtype)
    return _fresh(q, x.dtype), _fresh(k, x.dtype), _fresh(v, x.dtype), _fresh(mean, stats), _fresh(var, stats)


@conv_proj_bn.register_fake
def _conv_proj_bn_fake(x, wq, wk, wv, gamma_q, gamma_k, gamma_v, beta_q, beta_k, beta_v, height, width, has_cls,
                       stride_q, stride_kv, padding_q, padding_kv, eps, backend):
    geometry = (height, width, has_cls, stride_q, stride_kv, padding_q, padding_kv)
    contract.check_conv_proj_bn(x, (wq, wk, wv), (gamma_q, gamma_k, gamma_v), (beta_q, beta_k, beta_v), *geometry,
                                eps)
    outputs = tuple(x.new_empty(shape) for shape in contract.conv_proj_output_shapes(x, (wq, wk, wv), *geometry))
    stats = contract.conv_proj_bn_stats_shape(x)
    return (*outputs, x.new_empty(stats, dtype=stats_dtype(x.dtype)), x.new_empty(stats, dtype=stats_dtype(x.dtype)))


@torch.library.custom_op("cvt_fast::conv_proj_bn_backward", mutates_args=(), schema=CONV_PROJ_BN_BACKWARD_SCHEMA)
def conv_proj_bn_backward(grad_q: Tensor, grad_k: Tensor, grad_v: Tensor, x: Tensor, wq: Tensor, wk: Tensor,
                          wv: Tensor, gamma_q: Tensor, gamma_k: Tensor, gamma_v: Tensor, beta_q: Tensor,
                          beta_k: Tensor, beta_v: Tensor, q: Tensor, k: Tensor, v: Tensor, mean: Tensor, var: Tensor,
                          height: int, width: int, has_cls: bool, stride_q: int, stride_kv: int, padding_q: int,
                          padding_kv: int, eps: list[float], backend: str
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    geometry = (height, width, has_cls, stride_q, stride_kv, padding_q, padding_kv)
    gammas, betas = (gamma_q, gamma_k, gamma_v), (beta_q, beta_k, beta_v)
    contract.check_conv_proj_bn_backward((grad_q, grad_k, grad_v), x, (wq, wk, wv), gammas, betas, (q, k, v), mean,
                                         var, *geometry, eps)
    x, q, k, v = _unit_stride(x, q, k, v)
    _, backward = _implementation("conv_proj_bn", backend)
    with _no_autocast(x):
        grads = backward(grad_q, grad_k, grad_v, x, wq, wk, wv, *gammas, *betas, q, k, v, mean, var, *geometry,
                         list(eps))
    grad_x, grad_wq, grad_wk, grad_wv, grad_gamma, grad_beta = grads
    return (_fresh(grad_x, x.dtype), *(_strided_like(_fresh(g, w.dtype), w) for g, w in
                                       zip((grad_wq, grad_wk, grad_wv), (wq, wk, wv))),
            _fresh(grad_gamma, gamma_q.dtype), _fresh(grad_beta, beta_q.dtype))


@conv_proj_bn_backward.register_fake
def _conv_proj_bn_backward_fake(grad_q, grad_k, grad_v, x, wq, wk, wv, gamma_q, gamma_k, gamma_v, beta_q, beta_k,
                                beta_v, q, k, v, mean, var, height, width, has_cls, stride_q, stride_kv, padding_q,
                                padding_kv, eps, backend):
    geometry = (height, width, has_cls, stride_q, stride_kv, padding_q, padding_kv)
    contract.check_conv_proj_bn_backward((grad_q, grad_k, grad_v), x, (wq, wk, wv), (gamma_q, gamma_k, gamma_v),
                                         (beta_q, beta_k, beta_v), (q, k, v), mean, var, *geometry, eps)
    stats = contract.conv_proj_bn_stats_shape(x)
    return (x.new_empty(x.shape), wq.new_empty(wq.shape), wk.new_empty(wk.shape), wv.new_empty(wv.shape),
            gamma_q.new_empty(stats), beta_q.new_empty(stats))


def _conv_proj_bn_setup_context(ctx, inputs, output):
    x, wq, wk, wv, gamma_q, gamma_k, gamma_v, beta_q, beta_k, beta_v, *geometry, eps, backend = inputs
    q, k, v, mean, var = output
    # q, k, v are what the following Linear layers keep anyway: saving them costs no memory.
    ctx.save_for_backward(x, wq, wk, wv, gamma_q, gamma_k, gamma_v, beta_q, beta_k, beta_v, q, k, v, mean, var)
    ctx.geometry, ctx.eps, ctx.backend = tuple(geometry), list(eps), backend
    # The statistics feed the running averages (the model updates them under no_grad), not the loss;
    # unmaterialised, their (absent) gradients cost no zero-filled tensors.
    ctx.mark_non_differentiable(mean, var)
    ctx.set_materialize_grads(False)


def _conv_proj_bn_autograd(ctx, grad_q, grad_k, grad_v, grad_mean, grad_var):
    x, wq, wk, wv, *affine, q, k, v, mean, var = ctx.saved_tensors
    grads = tuple(torch.zeros_like(out) if g is None else g.contiguous() for g, out in zip((grad_q, grad_k, grad_v),
                                                                                        (q, k, v)))
    grad_x, grad_wq, grad_wk, grad_wv, grad_gamma, grad_beta = conv_proj_bn_backward(
        *grads, x, wq, wk, wv, *affine, q, k, v, mean, var, *ctx.geometry, ctx.eps, ctx.backend)
    return (grad_x, grad_wq, grad_wk, grad_wv, *grad_gamma.unbind(0), *grad_beta.unbind(0)) + (None,) * 9


conv_proj_bn.register_autograd(_conv_proj_bn_autograd, setup_context=_conv_proj_bn_setup_context)
