"""The MLP's bias + activation and second Linear as one autograd step that keeps only fc1's output.

In eager training the MLP is most of CvT's activation memory: the official
`fc2(x * sigmoid(1.702 x))` leaves three hidden-width (4 x C) tensors per block for the
backward (fc1's output, the sigmoid, and fc2's input), and moves the hidden tensor through
three elementwise passes forward and more backward. `act_then_linear` computes
`F.linear(act(x + hidden_bias), weight, bias)` with the activation as ONE fused pass
(cvt_fast.ops.mlp_activation, which also adds fc1's bias, so fc1 runs as a bias-free product)
and saves only x, fc1's output. Its backward is one fused pass too
(`mlp_activation_backward` with with_activation=True): it reads the activation's gradient and
x, and writes x's gradient, fc1's bias gradient (row sums in the same pass) and the
recomputed activation that fc2's weight gradient needs. Keeping one hidden tensor instead of
three therefore costs no extra pass: the recomputation rides on the backward pass that reads x
anyway. At CvT-13 (224x224, float32, batch 2) the fused backends keep 0.56x of the official
code's saved activations (tests/test_training_memory.py).

Autocast: the forward computes the Linear in the autocast dtype, as autocast would, casting
by hand (see _linear_as_autocast_would for why), and casts fc1's bias to that dtype as fc1's
own autocast product would have. The backward runs outside autocast, so it also redoes by
hand what autocast did: the products in the dtype the forward's product had, the gradients
returned in the parameters' dtypes.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from cvt_fast.ops.elementwise_reference import ACTIVATIONS, QUICK_GELU_SLOPE
from cvt_fast.ops.fused_elementwise import (_autocast_like_linear, elementwise_backend, mlp_activation_backward_op,
                                            mlp_activation_op)


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


class _ActThenLinear(torch.autograd.Function):
    @staticmethod
    def forward(x: Tensor, hidden_bias: Optional[Tensor], weight: Tensor, bias: Optional[Tensor], act: str,
                backend: str) -> Tensor:
        hidden = mlp_activation_op(x, _autocast_like_linear(hidden_bias, x), act, backend)
        return _linear_as_autocast_would(hidden, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, hidden_bias, weight, bias, act, backend = inputs
        # fc1's bias as the forward used it (cast under autocast): the backward must see the same.
        ctx.save_for_backward(x, _autocast_like_linear(hidden_bias, x), weight)
        ctx.act, ctx.backend = act, backend
        ctx.hidden_bias_dtype = None if hidden_bias is None else hidden_bias.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.product_dtype = output.dtype  # the autocast dtype, or the inputs' own

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, hidden_bias, weight = ctx.saved_tensors
        dtype = ctx.product_dtype
        grad = grad_out.to(dtype)
        grad_rows = grad.reshape(-1, grad.shape[-1])
        need_x = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        need_weight = ctx.needs_input_grad[2]
        grad_x = grad_hidden_bias = grad_weight = grad_bias = None
        hidden = None
        if need_x:
            grad_hidden = (grad @ weight.to(dtype)).to(x.dtype)
            # One pass: the activation's derivative applied, fc1's bias gradient summed, and the
            # activation recomputed for fc2's weight gradient.
            grad_x, grad_b1, hidden = mlp_activation_backward_op(grad_hidden.contiguous(), x, hidden_bias, ctx.act,
                                                                 need_weight, ctx.backend)
            if hidden_bias is not None and ctx.needs_input_grad[1]:
                grad_hidden_bias = grad_b1.to(ctx.hidden_bias_dtype)
            if not ctx.needs_input_grad[0]:
                grad_x = None
        if need_weight:
            if hidden is None or hidden.numel() == 0:
                hidden = mlp_activation_op(x, hidden_bias, ctx.act, ctx.backend)
            hidden = hidden.to(dtype)
            grad_weight = (grad_rows.t() @ hidden.reshape(-1, hidden.shape[-1])).to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
            grad_bias = grad_rows.sum(0, dtype=torch.promote_types(dtype, torch.float32)).to(ctx.bias_dtype)
        return grad_x, grad_hidden_bias, grad_weight, grad_bias, None, None


def act_then_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: str, hidden_bias: Optional[Tensor] = None,
                    backend: Optional[str] = None) -> Tensor:
    """F.linear(act(x + hidden_bias), weight, bias), keeping only x (and the weights) for the backward.

    x: fc1's output, without its bias when hidden_bias (fc1's bias) is given; act: 'quick_gelu'
    (the official CvT MLP) or 'gelu' (exact GELU, Hugging Face's port); bias: fc2's bias or None
    (the caller may add it later, e.g. inside cvt_fast.ops.residual_layer_norm). backend: that of
    cvt_fast.ops.mlp_activation (None: the default).
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    if hidden_bias is not None and hidden_bias.shape != (x.shape[-1],):
        raise ValueError(f"hidden_bias must have shape ({x.shape[-1]},), got {tuple(hidden_bias.shape)}")
    return _ActThenLinear.apply(x.contiguous(), hidden_bias, weight, bias, act, elementwise_backend(backend, x))
