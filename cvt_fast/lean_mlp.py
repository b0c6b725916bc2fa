"""The MLP's activation and second Linear as one autograd step that keeps only its input.

In eager training the MLP is most of CvT's activation memory: the official
`fc2(x * sigmoid(1.702 x))` leaves three hidden-width (4 x C) tensors per block for the
backward (fc1's output, the sigmoid, and fc2's input). `act_then_linear` gives the same
forward, op for op, but saves only fc1's output and recomputes the activation in the
backward (one elementwise pass, next to two matrix products), so one hidden-width tensor
per block stays alive instead of three. At CvT-13 (224x224, float32, batch 2) the fused
backends' saved activations drop from 214.7 to 137.9 MiB, against 244.9 MiB for the official
code (tests/test_lean_mlp.py). torch.compile does this on its own (its partitioner recomputes
cheap elementwise ops); this is for the eager model.

Autocast: the forward computes the Linear in the autocast dtype, as autocast would, casting
by hand (see _linear_as_autocast_would for why). The backward runs outside autocast, so it
also redoes by hand what autocast did: the products in the dtype the forward's product had,
the weight and bias gradients returned in the parameters' dtypes.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

QUICK_GELU_SLOPE = 1.702


def quick_gelu(x: Tensor) -> Tensor:
    """x * sigmoid(1.702 x), exactly the official formula (the same ops, so the same rounding)."""
    return x * torch.sigmoid(QUICK_GELU_SLOPE * x)


def quick_gelu_backward(grad: Tensor, x: Tensor) -> Tensor:
    """d/dx [x sigmoid(a x)] = s + a x s (1 - s), with s = sigmoid(a x); in float32 at least."""
    compute = torch.promote_types(x.dtype, torch.float32)
    xf, gf = x.to(compute), grad.to(compute)
    s = torch.sigmoid(QUICK_GELU_SLOPE * xf)
    return (gf * (s + QUICK_GELU_SLOPE * xf * s * (1.0 - s))).to(x.dtype)


def _activation(name: str, x: Tensor) -> Tensor:
    return quick_gelu(x) if name == "quick_gelu" else F.gelu(x)


def _activation_backward(name: str, grad: Tensor, x: Tensor) -> Tensor:
    if name == "quick_gelu":
        return quick_gelu_backward(grad, x)
    return torch.ops.aten.gelu_backward(grad.to(x.dtype), x)


def _linear_as_autocast_would(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """F.linear in the autocast dtype when autocast is on, with the casts made here rather than
    by autocast: its cast cache would otherwise keep the weight's copy made in this forward,
    where grad is off, and a plain use of the same weight later in the same autocast region
    would take that copy and silently get no gradient (seen with torch 2.6)."""
    device_type = hidden.device.type
    if not torch.is_autocast_enabled(device_type):
        return F.linear(hidden, weight, bias)
    dtype = torch.get_autocast_dtype(device_type)
    with torch.autocast(device_type, enabled=False):
        return F.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))


class _ActThenLinear(torch.autograd.Function):
    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: str) -> Tensor:
        return _linear_as_autocast_would(_activation(act, x), weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias, act = inputs
        ctx.save_for_backward(x, weight)
        ctx.act = act
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.product_dtype = output.dtype  # the autocast dtype, or the inputs' own

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        dtype = ctx.product_dtype
        hidden = _activation(ctx.act, x).to(dtype)
        grad = grad_out.to(dtype)
        grad_rows = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_hidden = grad @ weight.to(dtype)
            grad_x = _activation_backward(ctx.act, grad_hidden, x)
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_rows.t() @ hidden.reshape(-1, hidden.shape[-1])).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_rows.sum(0, dtype=torch.promote_types(dtype, torch.float32)).to(ctx.bias_dtype)
        return grad_x, grad_weight, grad_bias, None


def act_then_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: str) -> Tensor:
    """F.linear(act(x), weight, bias), keeping only x (and the weight) for the backward.

    act: 'quick_gelu' (the official CvT MLP) or 'gelu' (exact GELU, Hugging Face's port).
    """
    if act not in ("quick_gelu", "gelu"):
        raise ValueError(f"act must be 'quick_gelu' or 'gelu', got {act!r}")
    return _ActThenLinear.apply(x, weight, bias, act)
