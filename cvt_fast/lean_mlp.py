"""CvT's MLP, fc2(act(fc1(x))), as one autograd step that keeps only x and fc1's output.

In eager training the MLP is most of CvT's activation memory and of its elementwise traffic:
the official `fc2(x * sigmoid(1.702 x))` leaves three hidden-width (4 x C) tensors per block
for the backward (fc1's output, the sigmoid, and fc2's input) and moves the hidden tensor
through three elementwise passes forward and more backward. `lean_mlp` computes the same
function with two fused matrix products (cvt_fast.ops.fused_elementwise):
- forward: fc1's product with fc1's bias and the activation in its epilogue
  (cvt_fast::linear_activation), writing the activation for fc2 and fc1's output (before the
  bias) for the backward; then fc2 as a plain product;
- backward: fc2's input gradient grad_out @ W2 with the activation's backward in its epilogue
  (cvt_fast::activation_grad_through_linear): it reads fc1's output, writes the gradient through
  the activation, sums fc1's bias gradient, and writes the recomputed activation that fc2's weight
  gradient needs. Keeping one hidden tensor instead of three therefore costs no extra pass: the
  recomputation rides on a product that reads fc1's output anyway.
At CvT-13 (224x224, float32, batch 2) the fused backends keep 0.56x of the official code's saved
activations (tests/test_training_memory.py).

Autocast: the forward computes the products in the autocast dtype, as autocast would, casting by
hand (see _linear_as_autocast_would for why); the backward runs outside autocast, so it also redoes
by hand what autocast did: the products in the dtype the forward's had, the gradients returned in
the parameters' and the input's dtypes.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from cvt_fast.ops.elementwise_reference import ACTIVATIONS, QUICK_GELU_SLOPE
from cvt_fast.ops.fused_elementwise import (activation_grad_through_linear_op, cast_as_autocast_would,
                                            elementwise_backend, linear_activation_op, mlp_activation_op)


def quick_gelu(x: Tensor) -> Tensor:
    """x * sigmoid(1.702 x), exactly the official formula (the same ops, so the same rounding)."""
    return x * torch.sigmoid(QUICK_GELU_SLOPE * x)


def _linear_as_autocast_would(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """F.linear in the autocast dtype when autocast is on, with the casts made here rather than
    by autocast: its cast cache would otherwise keep the weight's copy made in this forward,
    where grad is off, and a plain use of the same weight later in the same autocast region
    would take that copy and silently get no gradient (seen with torch 2.6)."""
    device_type = hidden.device.type
    if not torch.is_autocast_enabled(device_type):
        return torch.nn.functional.linear(hidden, weight, bias)
    dtype = torch.get_autocast_dtype(device_type)
    with torch.autocast(device_type, enabled=False):
        return torch.nn.functional.linear(hidden.to(dtype), weight.to(dtype),
                                          None if bias is None else bias.to(dtype))


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


class _LeanMlp(torch.autograd.Function):
    # forward with ctx (not setup_context): fc1's output is an intermediate, saved from here.
    @staticmethod
    def forward(ctx, x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor,
                fc2_bias: Optional[Tensor], act: str, backend: str, keep_hidden: bool) -> Tensor:
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias))
        ctx.act, ctx.backend = act, backend
        x, weight, bias = cast_as_autocast_would(x, fc1_weight, fc1_bias)
        activation, hidden = linear_activation_op(x.contiguous(), weight.contiguous(), bias, act, keep_hidden,
                                                  backend)
        out = _linear_as_autocast_would(activation, fc2_weight, fc2_bias)
        ctx.product_dtype = out.dtype  # the autocast dtype, or the inputs' own
        # Kept: x (already in the product dtype under autocast), fc1's output, and parameters.
        ctx.save_for_backward(x, fc1_weight, fc1_bias, fc2_weight, hidden)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, fc1_weight, fc1_bias, fc2_weight, hidden = ctx.saved_tensors
        dtype = ctx.product_dtype
        x_dtype, w1_dtype, b1_dtype, w2_dtype, b2_dtype = ctx.dtypes
        x = x.to(dtype)
        bias = None if fc1_bias is None else fc1_bias.to(dtype)
        grad = grad_out.to(dtype).contiguous()
        need_fc1 = any(ctx.needs_input_grad[:3])
        grads = [None] * 8
        activation = None
        if need_fc1:
            # One product: fc2's input gradient, the activation's derivative applied in its
            # epilogue, fc1's bias gradient summed, the activation recomputed for fc2's weight.
            grad_hidden, grad_bias, activation = activation_grad_through_linear_op(
                grad, fc2_weight.to(dtype).contiguous(), hidden, bias, ctx.act, ctx.needs_input_grad[3], ctx.backend)
            if ctx.needs_input_grad[0]:
                grads[0] = (grad_hidden @ fc1_weight.to(dtype)).to(x_dtype)
            if ctx.needs_input_grad[1]:
                grads[1] = (_rows(grad_hidden).t() @ _rows(x)).to(w1_dtype)
            if fc1_bias is not None and ctx.needs_input_grad[2]:
                grads[2] = grad_bias.to(b1_dtype)
        if ctx.needs_input_grad[3]:
            if activation is None or activation.numel() == 0:
                activation = mlp_activation_op(hidden, bias, ctx.act, ctx.backend)
            grads[3] = (_rows(grad).t() @ _rows(activation)).to(w2_dtype)
        if b2_dtype is not None and ctx.needs_input_grad[4]:
            grads[4] = _rows(grad).sum(0, dtype=torch.promote_types(dtype, torch.float32)).to(b2_dtype)
        return tuple(grads)


def lean_mlp(x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor,
             fc2_bias: Optional[Tensor], act: str, backend: Optional[str] = None) -> Tensor:
    """F.linear(act(F.linear(x, fc1_weight, fc1_bias)), fc2_weight, fc2_bias), keeping only x and
    fc1's output for the backward.

    act: 'quick_gelu' (the official CvT MLP) or 'gelu' (exact GELU, Hugging Face's port). fc2_bias
    may be None: the caller may add it later (e.g. inside cvt_fast.ops.residual_layer_norm).
    backend: that of cvt_fast.ops.fused_elementwise (None: the default).
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    if fc1_weight.dim() != 2 or fc1_weight.shape[1] != x.shape[-1] or fc2_weight.dim() != 2 \
            or fc2_weight.shape[1] != fc1_weight.shape[0]:
        raise ValueError(f"shapes do not chain: x {tuple(x.shape)}, fc1_weight {tuple(fc1_weight.shape)} "
                         f"(hidden, in), fc2_weight {tuple(fc2_weight.shape)} (out, hidden)")
    tensors = (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    keep_hidden = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return _LeanMlp.apply(*tensors, act, elementwise_backend(backend, x, "linear_activation"), keep_hidden)
