"""The elementwise steps of a CvT block, fused: schemas, fake kernels, autograd, entry points.

Between the fused attention and convolution ops, a CvT block is elementwise passes over the
residual stream and the MLP's hidden tensor, and in a training step they move more bytes than
anything else (bench/traffic.py). Two ops take them in one pass each, forward and backward:

mlp_activation(x, bias=None, act='quick_gelu', backend=None) -> y
    x: (..., N) fc1's output without its bias (any float dtype, last dim contiguous);
    bias: optional (N,). y = act(x + bias) in x's dtype, computed in float32 (float64 for
    float64), act = 'quick_gelu' (z * sigmoid(1.702 z), the official CvT) or 'gelu' (exact,
    erf-based: Hugging Face's port). Backward: one pass reading grad and x that writes grad_x
    and the bias gradient (row sums taken in the same pass), and, when asked (the lean MLP,
    cvt_fast/lean_mlp.py), the recomputed activation for fc2's weight gradient, so keeping only
    fc1's output costs no extra pass.

linear_activation(x, weight, bias=None, act='quick_gelu', backend=None) -> y
    The same activation in the epilogue of fc1's product: y = act(x @ weight^T + bias), x (..., K),
    weight (N, K) as nn.Linear holds it, the product rounded to x's dtype before the bias (as the
    unfused model stores fc1's output). The hidden tensor makes no trip through memory; the lean
    MLP (cvt_fast/lean_mlp.py) also has it written once for its backward, whose own fused product
    is cvt_fast::activation_grad_through_linear: for out = act(hidden + bias) @ weight^T it computes
    fc2's input gradient grad_out @ weight and, in the product's epilogue, what
    mlp_activation_backward computes from it (the gradient through the activation, the bias
    gradient's row sums, the recomputed activation).

residual_layer_norm(x, branch, weight, bias, eps=1e-5, branch_bias=None, scale=None,
                    backend=None) -> (out, normed)
    x, branch: (B, ..., C), the same dtype; branch_bias: optional (C,) (the bias of the Linear
    that produced `branch`, left out of it); scale: optional (B,) per-sample factor (drop path:
    0 or 1 / keep probability). out = x + scale[b] * (branch + branch_bias), stored in x's dtype
    (the residual stream); normed = LayerNorm(out) with weight, bias (C,) and eps, statistics in
    float32 (float64 for float64), over the stored `out`, in x's dtype. One pass forward, writing
    both; the backward is one pass that reads the two incoming gradients and the saved `out` (the
    16-bit residual stream, not a float32 copy) and writes grad_x and grad_branch, with
    LayerNorm's and the branch bias's gradients as row sums in the same pass.

Registered ops (`backend` is always concrete: a backend of the table that implements the op,
see elementwise_backend):
    cvt_fast::mlp_activation          (x, bias?, act, backend) -> y
    cvt_fast::mlp_activation_backward (grad, x, bias?, act, with_activation, backend)
                                      -> (grad_x, grad_bias, activation)
    cvt_fast::linear_activation       (x, weight, bias?, act, keep_hidden, backend) -> (y, hidden)
    cvt_fast::activation_grad_through_linear (grad_out, weight, hidden, bias?, act, with_activation,
                                      backend) -> (grad_hidden, grad_bias, activation)
    cvt_fast::residual_layer_norm     (x, branch, branch_bias?, scale?, weight, bias, eps, backend)
                                      -> (out, normed, mean, rstd)
    cvt_fast::residual_layer_norm_backward (grad_out, grad_normed, out, mean, rstd, scale?, weight, backend)
                                      -> (grad_x, grad_branch, grad_branch_bias, grad_weight, grad_bias)
Outputs may be empty (0,) tensors: hidden when keep_hidden is False, the activation when
with_activation is False, and
grad_branch without a scale (it is grad_x then). The bias gradients are always the row sums
(N,) and (C,), a negligible write even where no bias takes them (so no two outputs are empty:
custom ops may not return aliases, and empty tensors count as such). mean and rstd have shape
x.shape[:-1] in the compute dtype; grad_branch_bias is in the compute dtype too (the autograd
formula casts it to the bias's), mlp_activation's grad_bias in the bias's dtype (x's without one).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from cvt_fast.ops import elementwise_reference as reference
from cvt_fast.ops.backend import resolve_backend
from cvt_fast.ops.backends import TABLE, backends_for
from cvt_fast.ops.reference import compute_dtype

ACTIVATIONS = reference.ACTIVATIONS
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)

MLP_ACTIVATION_SCHEMA = "(Tensor x, Tensor? bias, str act, str backend) -> Tensor"
MLP_ACTIVATION_BACKWARD_SCHEMA = ("(Tensor grad, Tensor x, Tensor? bias, str act, bool with_activation, "
                                  "str backend) -> (Tensor, Tensor, Tensor)")
LINEAR_ACTIVATION_SCHEMA = ("(Tensor x, Tensor weight, Tensor? bias, str act, bool keep_hidden, str backend) "
                            "-> (Tensor, Tensor)")
ACTIVATION_GRAD_THROUGH_LINEAR_SCHEMA = ("(Tensor grad_out, Tensor weight, Tensor hidden, Tensor? bias, str act, "
                                         "bool with_activation, str backend) -> (Tensor, Tensor, Tensor)")
RESIDUAL_LAYER_NORM_SCHEMA = ("(Tensor x, Tensor branch, Tensor? branch_bias, Tensor? scale, Tensor weight, "
                              "Tensor bias, float eps, str backend) -> (Tensor, Tensor, Tensor, Tensor)")
RESIDUAL_LAYER_NORM_BACKWARD_SCHEMA = (
    "(Tensor grad_out, Tensor grad_normed, Tensor out, Tensor mean, Tensor rstd, Tensor? scale, Tensor weight, "
    "str backend) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")


def elementwise_backend(requested: Optional[str], x: Tensor, op: str = "mlp_activation") -> str:
    """The concrete backend of fused elementwise `op` for a call's or a model's backend choice.

    The backend table decides (cvt_fast/ops/backends.py: 'reference' and 'triton' implement these
    ops). A backend without them ('cuda', 'sdpa', 'xformers') chosen for a whole model means
    'auto' for them: Triton on CUDA tensors where it can run, the reference on the CPU.
    """
    if isinstance(requested, str) and requested in TABLE and op not in TABLE[requested].ops:
        requested = "auto"
    return resolve_backend(op, requested, x)


def _implementation(op: str, backend: str) -> tuple[Callable, Callable]:
    record = TABLE.get(backend)
    if record is None or op not in record.ops:
        raise ValueError(f"cvt_fast {op}: backend {backend!r} does not implement it; expected one of "
                         f"{', '.join(backends_for(op))} (resolve it with elementwise_backend first)")
    return record.load(op)


def _no_autocast(t: Tensor):
    # The bodies run below the Autocast key with autocast still on in the thread.
    return torch.autocast(device_type=t.device.type, enabled=False)


def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,))


# --------------------------------------------------------------------------- MLP activation

@torch.library.custom_op("cvt_fast::mlp_activation", mutates_args=(), schema=MLP_ACTIVATION_SCHEMA)
def mlp_activation_op(x: Tensor, bias: Optional[Tensor], act: str, backend: str) -> Tensor:
    forward, _ = _implementation("mlp_activation", backend)
    with _no_autocast(x):
        return forward(x, bias, act).to(x.dtype).contiguous()


@mlp_activation_op.register_fake
def _mlp_activation_fake(x, bias, act, backend):
    return x.new_empty(x.shape)


@torch.library.custom_op("cvt_fast::mlp_activation_backward", mutates_args=(),
                         schema=MLP_ACTIVATION_BACKWARD_SCHEMA)
def mlp_activation_backward_op(grad: Tensor, x: Tensor, bias: Optional[Tensor], act: str, with_activation: bool,
                               backend: str) -> tuple[Tensor, Tensor, Tensor]:
    _, backward = _implementation("mlp_activation", backend)
    with _no_autocast(x):
        grad_x, grad_bias, activation = backward(grad, x, bias, act, with_activation)
    return (grad_x.to(x.dtype).contiguous(), grad_bias.to(x.dtype if bias is None else bias.dtype).contiguous(),
            activation.to(x.dtype).contiguous() if with_activation else _empty(x))


@mlp_activation_backward_op.register_fake
def _mlp_activation_backward_fake(grad, x, bias, act, with_activation, backend):
    return (x.new_empty(x.shape), x.new_empty(x.shape[-1:]) if bias is None else bias.new_empty(bias.shape),
            x.new_empty(x.shape) if with_activation else _empty(x))


def _mlp_activation_setup_context(ctx, inputs, output):
    x, bias, act, backend = inputs
    ctx.save_for_backward(x, bias)
    ctx.act, ctx.backend = act, backend


def _mlp_activation_autograd(ctx, grad):
    x, bias = ctx.saved_tensors
    grad_x, grad_bias, _ = mlp_activation_backward_op(grad.contiguous(), x, bias, ctx.act, False, ctx.backend)
    return grad_x, (grad_bias if bias is not None and ctx.needs_input_grad[1] else None), None, None


mlp_activation_op.register_autograd(_mlp_activation_autograd, setup_context=_mlp_activation_setup_context)


# --------------------------------------------------------------------------- fc1 + activation

@torch.library.custom_op("cvt_fast::linear_activation", mutates_args=(), schema=LINEAR_ACTIVATION_SCHEMA)
def linear_activation_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: str, keep_hidden: bool,
                         backend: str) -> tuple[Tensor, Tensor]:
    forward, _ = _implementation("linear_activation", backend)
    with _no_autocast(x):
        y, hidden = forward(x, weight, bias, act, keep_hidden)
    return y.to(x.dtype).contiguous(), hidden.to(x.dtype).contiguous() if keep_hidden else _empty(x)


@linear_activation_op.register_fake
def _linear_activation_fake(x, weight, bias, act, keep_hidden, backend):
    shape = tuple(x.shape[:-1]) + (weight.shape[0],)
    return x.new_empty(shape), x.new_empty(shape) if keep_hidden else _empty(x)


@torch.library.custom_op("cvt_fast::activation_grad_through_linear", mutates_args=(),
                         schema=ACTIVATION_GRAD_THROUGH_LINEAR_SCHEMA)
def activation_grad_through_linear_op(grad_out: Tensor, weight: Tensor, hidden: Tensor, bias: Optional[Tensor],
                                      act: str, with_activation: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    _, backward = _implementation("linear_activation", backend)
    with _no_autocast(hidden):
        grad_hidden, grad_bias, activation = backward(grad_out, weight, hidden, bias, act, with_activation)
    return (grad_hidden.to(hidden.dtype).contiguous(),
            grad_bias.to(hidden.dtype if bias is None else bias.dtype).contiguous(),
            activation.to(hidden.dtype).contiguous() if with_activation else _empty(hidden))


@activation_grad_through_linear_op.register_fake
def _activation_grad_through_linear_fake(grad_out, weight, hidden, bias, act, with_activation, backend):
    return (hidden.new_empty(hidden.shape),
            hidden.new_empty(hidden.shape[-1:]) if bias is None else bias.new_empty(bias.shape),
            hidden.new_empty(hidden.shape) if with_activation else _empty(hidden))


def _linear_activation_setup_context(ctx, inputs, output):
    x, weight, bias, act, keep_hidden, backend = inputs
    ctx.save_for_backward(x, weight, bias, output[1] if keep_hidden else None)
    ctx.act, ctx.backend = act, backend


def _linear_activation_autograd(ctx, grad_y, grad_hidden):
    x, weight, bias, hidden = ctx.saved_tensors
    if hidden is None:  # not kept: recompute fc1's product
        hidden = linear_activation_op(x, weight, None, ctx.act, True, ctx.backend)[1]
    grad_z, grad_bias, _ = mlp_activation_backward_op(grad_y.contiguous(), hidden, bias, ctx.act, False, ctx.backend)
    if grad_hidden is not None and grad_hidden.numel():
        grad_z = grad_z + grad_hidden
    rows_z, rows_x = grad_z.reshape(-1, grad_z.shape[-1]), x.reshape(-1, x.shape[-1])
    return (grad_z @ weight, rows_z.t() @ rows_x, grad_bias if bias is not None and ctx.needs_input_grad[2] else None,
            None, None, None)


linear_activation_op.register_autograd(_linear_activation_autograd, setup_context=_linear_activation_setup_context)


# --------------------------------------------------------------------------- residual add + LayerNorm

@torch.library.custom_op("cvt_fast::residual_layer_norm", mutates_args=(), schema=RESIDUAL_LAYER_NORM_SCHEMA)
def residual_layer_norm_op(x: Tensor, branch: Tensor, branch_bias: Optional[Tensor], scale: Optional[Tensor],
                           weight: Tensor, bias: Tensor, eps: float,
                           backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    forward, _ = _implementation("residual_layer_norm", backend)
    with _no_autocast(x):
        out, normed, mean, rstd = forward(x, branch, branch_bias, scale, weight, bias, eps)
    stats = compute_dtype(x.dtype)
    return (out.to(x.dtype).contiguous(), normed.to(x.dtype).contiguous(), mean.to(stats).contiguous(),
            rstd.to(stats).contiguous())


@residual_layer_norm_op.register_fake
def _residual_layer_norm_fake(x, branch, branch_bias, scale, weight, bias, eps, backend):
    stats = compute_dtype(x.dtype)
    return (x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=stats),
            x.new_empty(x.shape[:-1], dtype=stats))


@torch.library.custom_op("cvt_fast::residual_layer_norm_backward", mutates_args=(),
                         schema=RESIDUAL_LAYER_NORM_BACKWARD_SCHEMA)
def residual_layer_norm_backward_op(grad_out: Tensor, grad_normed: Tensor, out: Tensor, mean: Tensor, rstd: Tensor,
                                    scale: Optional[Tensor], weight: Tensor,
                                    backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    _, backward = _implementation("residual_layer_norm", backend)
    with _no_autocast(out):
        grad_x, grad_branch, grad_branch_bias, grad_weight, grad_bias = backward(
            grad_out, grad_normed, out, mean, rstd, scale, weight)
    stats = compute_dtype(out.dtype)
    return (grad_x.to(out.dtype).contiguous(),
            _empty(out) if scale is None else grad_branch.to(out.dtype).contiguous(),
            grad_branch_bias.to(stats).contiguous(),
            grad_weight.to(weight.dtype).contiguous(), grad_bias.to(weight.dtype).contiguous())


@residual_layer_norm_backward_op.register_fake
def _residual_layer_norm_backward_fake(grad_out, grad_normed, out, mean, rstd, scale, weight, backend):
    stats = compute_dtype(out.dtype)
    return (out.new_empty(out.shape), _empty(out) if scale is None else out.new_empty(out.shape),
            out.new_empty(out.shape[-1:], dtype=stats),
            weight.new_empty(weight.shape), weight.new_empty(weight.shape))


def _residual_layer_norm_setup_context(ctx, inputs, output):
    x, branch, branch_bias, scale, weight, bias, eps, backend = inputs
    out, _, mean, rstd = output
    ctx.save_for_backward(out, mean, rstd, scale, weight)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.branch_bias_dtype = None if branch_bias is None else branch_bias.dtype
    ctx.backend = backend


def _residual_layer_norm_autograd(ctx, grad_out, grad_normed, _grad_mean, _grad_rstd):
    out, mean, rstd, scale, weight = ctx.saved_tensors
    # The kernels read the gradients densely; an unused output's gradient arrives as None.
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out.contiguous()
    grad_normed = torch.zeros_like(out) if grad_normed is None else grad_normed.contiguous()
    has_branch_bias = ctx.branch_bias_dtype is not None
    grad_x, grad_branch, grad_branch_bias, grad_weight, grad_bias = residual_layer_norm_backward_op(
        grad_out, grad_normed, out, mean, rstd, scale, weight, ctx.backend)
    if scale is None:
        grad_branch = grad_x  # out = x + branch: both inputs get the same gradient
    return (grad_x, grad_branch, grad_branch_bias.to(ctx.branch_bias_dtype) if has_branch_bias else None, None,
            grad_weight, grad_bias, None, None)


residual_layer_norm_op.register_autograd(_residual_layer_norm_autograd,
                                         setup_context=_residual_layer_norm_setup_context)


# --------------------------------------------------------------------------- entry points

def _check_float(name: str, t: object) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; expected one of bfloat16, float16, float32, float64")


def _check_vector(name: str, t: Optional[Tensor], size: int, device: torch.device) -> None:
    if t is None:
        return
    _check_float(name, t)
    if t.shape != (size,):
        raise ValueError(f"{name} must have shape ({size},), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the input is on {device}; move it there")


def cast_as_autocast_would(*tensors: Optional[Tensor]) -> tuple:
    """The tensors cast to the autocast dtype when autocast is on for their device, as a Linear's
    inputs would be (float64 stays float64); unchanged otherwise."""
    first = tensors[0]
    if not torch.is_autocast_enabled(first.device.type) or first.dtype == torch.float64:
        return tensors
    dtype = torch.get_autocast_dtype(first.device.type)
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def mlp_activation(x: Tensor, bias: Optional[Tensor] = None, act: str = "quick_gelu",
                   backend: Optional[str] = None) -> Tensor:
    """act(x + bias) over the last dimension in one pass, x (..., N), bias (N,); see the module doc.

    Under autocast the bias is first cast to the autocast dtype, as the Linear it belongs to
    would have cast it."""
    _check_float("x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    _check_vector("bias", bias, x.shape[-1], x.device)
    name = elementwise_backend(backend, x, "mlp_activation")
    return mlp_activation_op(x.contiguous(), cast_as_autocast_would(x, bias)[1], act, name)


def linear_activation(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, act: str = "quick_gelu",
                      backend: Optional[str] = None) -> Tensor:
    """act(x @ weight^T + bias) as one matrix product with the activation in its epilogue; x (..., K),
    weight (N, K), bias (N,). Under autocast all three are cast to the autocast dtype first, as
    F.linear would cast them; otherwise they must share x's dtype."""
    _check_float("x", x)
    _check_float("weight", weight)
    if x.dim() < 1 or weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must be (N, {x.shape[-1] if x.dim() else '?'}) for x of shape {tuple(x.shape)}, "
                         f"got {tuple(weight.shape)}")
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    _check_vector("bias", bias, weight.shape[0], x.device)
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}; move it there")
    x, weight, bias = cast_as_autocast_would(x, weight, bias)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; cast them to one dtype (or use autocast)")
    name = elementwise_backend(backend, x, "linear_activation")
    return linear_activation_op(x.contiguous(), weight.contiguous(), bias, act, False, name)[0]


def residual_layer_norm(x: Tensor, branch: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5,
                        branch_bias: Optional[Tensor] = None, scale: Optional[Tensor] = None,
                        backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """(out, normed): out = x + scale[b] * (branch + branch_bias), normed = LayerNorm(out); see the module doc.

    x and branch of different dtypes are both promoted first, as `x + branch` would; under
    autocast the branch bias is cast to the autocast dtype, as its Linear would have cast it."""
    _check_float("x", x)
    _check_float("branch", branch)
    if x.dim() < 2:
        raise ValueError(f"x must be (B, ..., C) with at least 2 dimensions, got shape {tuple(x.shape)}")
    if branch.shape != x.shape:
        raise ValueError(f"branch must have x's shape {tuple(x.shape)}, got {tuple(branch.shape)}")
    if branch.device != x.device:
        raise ValueError(f"branch is on {branch.device} but x is on {x.device}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    if weight is None or bias is None:
        raise TypeError("weight and bias of the LayerNorm are required (an affine LayerNorm, as CvT's)")
    channels = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias), ("branch_bias", branch_bias)):
        _check_vector(name, t, channels, x.device)
    _check_vector("scale", scale, x.shape[0], x.device)
    dtype = torch.promote_types(x.dtype, branch.dtype)
    name = elementwise_backend(backend, x, "residual_layer_norm")
    out, normed, _, _ = residual_layer_norm_op(
        x.to(dtype).contiguous(), branch.to(dtype).contiguous(), cast_as_autocast_would(branch, branch_bias)[1],
        scale, weight, bias, float(eps), name)
    return out, normed


__all__ = ["mlp_activation", "linear_activation", "residual_layer_norm", "elementwise_backend",
           "cast_as_autocast_would", "mlp_activation_op", "mlp_activation_backward_op", "linear_activation_op",
           "activation_grad_through_linear_op", "residual_layer_norm_op", "residual_layer_norm_backward_op"]
