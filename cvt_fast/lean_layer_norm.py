"""LayerNorm of a 16-bit tensor in float32 that keeps the 16-bit input for the backward.

The official CvT LayerNorm casts its input to float32 and back (and autocast would do the
first cast anyway). Autograd then keeps the float32 copy for the backward: twice the bytes
of the bfloat16 residual stream it came from, twice per block. `layer_norm_16bit` runs the
same float32 forward but keeps the 16-bit input (and the float32 per-row mean and 1/std),
and widens it again in the backward; widening is exact, so the backward sees the very same
float32 input, and forward and gradients are bit for bit those of the official module.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

SIXTEEN_BIT = (torch.bfloat16, torch.float16)


class _LayerNorm16(torch.autograd.Function):
    @staticmethod
    def forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float):
        wide = x.to(torch.float32)
        out, mean, rstd = torch.ops.aten.native_layer_norm(
            wide, [x.shape[-1]], None if weight is None else weight.to(torch.float32),
            None if bias is None else bias.to(torch.float32), eps)
        return out.to(x.dtype), mean, rstd

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias, _ = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.mark_non_differentiable(mean, rstd)

    @staticmethod
    def backward(ctx, grad_out: Tensor, _grad_mean, _grad_rstd):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        wide_weight = None if weight is None else weight.to(torch.float32)
        wide_bias = None if bias is None else bias.to(torch.float32)
        grad_x, grad_weight, grad_bias = torch.ops.aten.native_layer_norm_backward(
            grad_out.to(torch.float32), x.to(torch.float32), [x.shape[-1]], mean, rstd, wide_weight, wide_bias,
            [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1],
             bias is not None and ctx.needs_input_grad[2]])
        return (None if grad_x is None else grad_x.to(x.dtype),
                None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None)


def layer_norm_16bit(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    """LayerNorm over the last dimension, computed in float32, returned in x's 16-bit dtype."""
    if x.dtype not in SIXTEEN_BIT:
        raise TypeError(f"layer_norm_16bit takes bfloat16 or float16 input, got {x.dtype}")
    return _LayerNorm16.apply(x, weight, bias, eps)[0]
