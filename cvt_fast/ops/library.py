"""Every op of cvt_fast in one place: schemas, implementations by backend, fake kernels, autograd.

    cvt_fast::attention           (q, k, v, scale, backend) -> (out, lse)
    cvt_fast::attention_backward  (grad_out, q, k, v, out, lse, scale, backend) -> (dq, dk, dv)
    cvt_fast::conv_proj           (x, wq, wk, wv, bq?, bk?, bv?, height, width, has_cls,
                                   stride_q, stride_kv, padding_q, padding_kv, backend) -> (q, k, v)
    cvt_fast::conv_proj_backward  (grad_q, grad_k, grad_v, x, wq, wk, wv, height, width, has_cls,
                                   stride_q, stride_kv, padding_q, padding_kv, backend)
                                   -> (grad_x, grad_wq, grad_wk, grad_wv)

Semantics and shapes are those of cvt_fast/ops/__init__.py. `backend` is always a concrete
name ('reference', 'triton' or 'cuda'), resolved before the call (cvt_fast/ops/backend.py),
so it is a plain string constant in a compiled graph. The ops are torch.library.custom_op
functions: they run eagerly on any device, have fake implementations for torch.compile and
opcheck, and the body launches the chosen implementation (Triton kernels from
cvt_fast.kernels, or the CUDA extension's torch.ops.cvt_fast.*_cuda ops), imported only when
that backend is used. The CUDA extension registers its kernels under *_cuda names in the same
namespace, so these definitions and the C++ ones do not collide.
"""
from __future__ import annotations

import importlib
from typing import Callable, Optional

import torch
from torch import Tensor

from cvt_fast.ops import reference

ATTENTION_SCHEMA = "(Tensor q, Tensor k, Tensor v, float scale, str backend) -> (Tensor, Tensor)"
ATTENTION_BACKWARD_SCHEMA = ("(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
                             "float scale, str backend) -> (Tensor, Tensor, Tensor)")
CONV_PROJ_SCHEMA = ("(Tensor x, Tensor wq, Tensor wk, Tensor wv, Tensor? bq, Tensor? bk, Tensor? bv, "
                    "int height, int width, bool has_cls, int stride_q, int stride_kv, int padding_q, "
                    "int padding_kv, str backend) -> (Tensor, Tensor, Tensor)")
CONV_PROJ_BACKWARD_SCHEMA = ("(Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor x, Tensor wq, Tensor wk, "
                             "Tensor wv, int height, int width, bool has_cls, int stride_q, int stride_kv, "
                             "int padding_q, int padding_kv, str backend) -> (Tensor, Tensor, Tensor, Tensor)")

# The dtype of the saved log-sum-exp, whatever the input dtype (the contract's).
LSE_DTYPE = torch.float32


def _implementation(op: str, backend: str) -> tuple[Callable, Callable]:
    """(forward, backward) callables of `op` ('attention' or 'conv_proj') for a concrete backend."""
    if backend == "reference":
        return getattr(reference, f"{op}_reference"), getattr(reference, f"{op}_backward_reference")
    if backend == "triton":
        # Imported on first use: it imports Triton (and decorates the kernels, which is when
        # TRITON_INTERPRET is read).
        kernels = importlib.import_module(f"cvt_fast.kernels.{op}")
        return getattr(kernels, f"{op}_forward"), getattr(kernels, f"{op}_backward")
    if backend == "cuda":
        from cvt_fast.extension import extension_status, load_extension

        if load_extension() is None:
            raise RuntimeError(f"cvt_fast {op}: the CUDA extension cvt_fast._C is {extension_status()}")
        return getattr(torch.ops.cvt_fast, f"{op}_forward_cuda"), getattr(torch.ops.cvt_fast, f"{op}_backward_cuda")
    raise ValueError(f"cvt_fast {op}: backend {backend!r} is not an op backend; expected 'reference', "
                     "'triton' or 'cuda' (resolve 'auto' with cvt_fast.ops.backend.resolve_backend first)")


def _no_autocast(t: Tensor):
    # The bodies run below the Autocast dispatch key but with autocast still on in the
    # thread: without this, the reference's float32 matmuls would be recast to 16 bits.
    return torch.autocast(device_type=t.device.type, enabled=False)


def _fresh(t: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    # Outputs of a custom op are contiguous tensors of the declared dtype; a backend that
    # returns anything else is normalised here rather than breaking the fake-tensor contract.
    return t.to(dtype or t.dtype).contiguous()


# --------------------------------------------------------------------------- attention

@torch.library.custom_op("cvt_fast::attention", mutates_args=(), schema=ATTENTION_SCHEMA)
def attention(q: Tensor, k: Tensor, v: Tensor, scale: float, backend: str) -> tuple[Tensor, Tensor]:
    forward, _ = _implementation("attention", backend)
    with _no_autocast(q):
        out, lse = forward(q, k, v, scale)
    return _fresh(out, q.dtype), _fresh(lse, LSE_DTYPE)


@attention.register_fake
def _attention_fake(q, k, v, scale, backend):
    batch, n_q, heads, head_dim = q.shape
    return q.new_empty((batch, n_q, heads * head_dim)), q.new_empty((batch, heads, n_q), dtype=LSE_DTYPE)


@torch.library.custom_op("cvt_fast::attention_backward", mutates_args=(), schema=ATTENTION_BACKWARD_SCHEMA)
def attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       scale: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    _, backward = _implementation("attention", backend)
    with _no_autocast(q):
        dq, dk, dv = backward(grad_out, q, k, v, out, lse, scale)
    return _fresh(dq, q.dtype), _fresh(dk, k.dtype), _fresh(dv, v.dtype)


@attention_backward.register_fake
def _attention_backward_fake(grad_out, q, k, v, out, lse, scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale, ctx.backend = scale, backend
    # lse is saved for the backward, not a differentiable result.
    ctx.mark_non_differentiable(lse)


def _attention_autograd(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    # Kernels read grad_out densely; the gradient of e.g. out.sum() arrives as a stride-0 expand.
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out.contiguous()
    dq, dk, dv = attention_backward(grad_out, q, k, v, out, lse, ctx.scale, ctx.backend)
    return dq, dk, dv, None, None


attention.register_autograd(_attention_autograd, setup_context=_attention_setup_context)


# --------------------------------------------------------------------------- conv projection

def _tokens_out(x: Tensor, kernel: int, height: int, width: int, has_cls: bool, stride: int,
                padding: int) -> tuple:
    """Shape (B, has_cls + Ho*Wo, C) of one conv_proj output."""
    rows = (reference.output_size(height, kernel, stride, padding)
            * reference.output_size(width, kernel, stride, padding))
    return (x.shape[0], int(has_cls) + rows, x.shape[2])


@torch.library.custom_op("cvt_fast::conv_proj", mutates_args=(), schema=CONV_PROJ_SCHEMA)
def conv_proj(x: Tensor, wq: Tensor, wk: Tensor, wv: Tensor, bq: Optional[Tensor], bk: Optional[Tensor],
              bv: Optional[Tensor], height: int, width: int, has_cls: bool, stride_q: int, stride_kv: int,
              padding_q: int, padding_kv: int, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    forward, _ = _implementation("conv_proj", backend)
    with _no_autocast(x):
        outputs = forward(x, wq, wk, wv, bq, bk, bv, height, width, has_cls, stride_q, stride_kv, padding_q,
                          padding_kv)
    return tuple(_fresh(t, x.dtype) for t in outputs)


@conv_proj.register_fake
def _conv_proj_fake(x, wq, wk, wv, bq, bk, bv, height, width, has_cls, stride_q, stride_kv, padding_q,
                    padding_kv, backend):
    # Each output follows its own weight's kernel size.
    return (x.new_empty(_tokens_out(x, wq.shape[2], height, width, has_cls, stride_q, padding_q)),
            x.new_empty(_tokens_out(x, wk.shape[2], height, width, has_cls, stride_kv, padding_kv)),
            x.new_empty(_tokens_out(x, wv.shape[2], height, width, has_cls, stride_kv, padding_kv)))


@torch.library.custom_op("cvt_fast::conv_proj_backward", mutates_args=(), schema=CONV_PROJ_BACKWARD_SCHEMA)
def conv_proj_backward(grad_q: Tensor, grad_k: Tensor, grad_v: Tensor, x: Tensor, wq: Tensor, wk: Tensor,
                       wv: Tensor, height: int, width: int, has_cls: bool, stride_q: int, stride_kv: int,
                       padding_q: int, padding_kv: int, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
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
