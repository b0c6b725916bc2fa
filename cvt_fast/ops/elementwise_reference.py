"""Plain-PyTorch references of the fused steps around the MLP and the residual stream: the
ground truth of their kernels (the activation, alone or in a matrix product's epilogue, and the
residual add + LayerNorm).

Shapes and semantics are those of cvt_fast/ops/fused_elementwise.py. As in reference.py,
16-bit inputs are computed in float32 and returned in their own dtype; float32 and float64
are computed as they are. No tricks: speed belongs to kernels/.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from cvt_fast.ops.reference import compute_dtype

QUICK_GELU_SLOPE = 1.702
ACTIVATIONS = ("quick_gelu", "gelu")


def _empty(like: Tensor) -> Tensor:
    """The placeholder for an output that was not asked for."""
    return like.new_empty((0,))


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


# --------------------------------------------------------------------------- MLP activation

def activation(act: str, z: Tensor) -> Tensor:
    """QuickGELU z * sigmoid(1.702 z) (the official CvT, the same ops) or exact GELU (Hugging Face's port)."""
    return z * torch.sigmoid(QUICK_GELU_SLOPE * z) if act == "quick_gelu" else F.gelu(z)


def activation_derivative(act: str, z: Tensor) -> Tensor:
    """d act / dz: s + 1.702 z s (1 - s) with s = sigmoid(1.702 z); or Phi(z) + z phi(z)."""
    if act == "quick_gelu":
        s = torch.sigmoid(QUICK_GELU_SLOPE * z)
        return s + QUICK_GELU_SLOPE * z * s * (1.0 - s)
    cdf = 0.5 * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * z * z) * (1.0 / math.sqrt(2.0 * math.pi))
    return cdf + z * pdf


def mlp_activation_reference(x: Tensor, bias: Optional[Tensor], act: str) -> Tensor:
    """act(x + bias) over the last dimension, in x's dtype."""
    ct = compute_dtype(x.dtype)
    z = x.to(ct) if bias is None else x.to(ct) + bias.to(ct)
    return activation(act, z).to(x.dtype)


def mlp_activation_backward_reference(grad: Tensor, x: Tensor, bias: Optional[Tensor], act: str,
                                      with_activation: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_bias, activation): grad_x = grad * act'(x + bias) in x's dtype; grad_bias its
    sum over rows (taken before rounding), in bias's dtype (x's without a bias); activation =
    act(x + bias) recomputed when with_activation, else empty."""
    ct = compute_dtype(x.dtype)
    z = x.to(ct) if bias is None else x.to(ct) + bias.to(ct)
    grad_z = grad.to(ct) * activation_derivative(act, z)
    grad_bias = _rows(grad_z).sum(0).to(x.dtype if bias is None else bias.dtype)
    recomputed = activation(act, z).to(x.dtype) if with_activation else _empty(x)
    return grad_z.to(x.dtype), grad_bias, recomputed


def linear_activation_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: str,
                                keep_hidden: bool) -> tuple[Tensor, Tensor]:
    """(y, hidden): hidden = x @ weight^T rounded to x's dtype (as fc1's output is stored),
    y = act(hidden + bias); hidden is empty unless keep_hidden."""
    ct = compute_dtype(x.dtype)
    hidden = (x.to(ct) @ weight.to(ct).t()).to(x.dtype)
    return mlp_activation_reference(hidden, bias, act), hidden if keep_hidden else _empty(x)


def activation_grad_through_linear_reference(grad_out: Tensor, weight: Tensor, hidden: Tensor,
                                             bias: Optional[Tensor], act: str,
                                             with_activation: bool) -> tuple[Tensor, Tensor, Tensor]:
    """For out = act(hidden + bias) @ weight^T, weight (K, N): mlp_activation_backward_reference
    of grad_act = grad_out @ weight, that product kept in the compute dtype."""
    ct = compute_dtype(hidden.dtype)
    grad_act = grad_out.to(ct) @ weight.to(ct)
    return mlp_activation_backward_reference(grad_act, hidden, bias, act, with_activation)


# --------------------------------------------------------------------------- residual + LayerNorm

def _per_sample(scale: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1), broadcasting over every dimension of `like` but the first."""
    return scale.reshape((-1,) + (1,) * (like.dim() - 1))


def residual_layer_norm_reference(x: Tensor, branch: Tensor, branch_bias: Optional[Tensor],
                                  scale: Optional[Tensor], weight: Tensor, bias: Tensor,
                                  eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """out = x + scale[b] * (branch + branch_bias), stored in x's dtype; normed = LayerNorm(out)
    over the last dimension (of the stored out, in float32 at least), in x's dtype; mean and
    rstd = 1 / sqrt(var + eps) per row (shape x.shape[:-1]) in the compute dtype."""
    ct = compute_dtype(x.dtype)
    update = branch.to(ct)
    if branch_bias is not None:
        update = update + branch_bias.to(ct)
    if scale is not None:
        update = update * _per_sample(scale.to(ct), update)
    out = (x.to(ct) + update).to(x.dtype)
    wide = out.to(ct)
    mean = wide.mean(-1)
    rstd = torch.rsqrt(wide.var(-1, unbiased=False) + eps)
    normed = (wide - mean.unsqueeze(-1)) * rstd.unsqueeze(-1) * weight.to(ct) + bias.to(ct)
    return out, normed.to(x.dtype), mean, rstd


def residual_layer_norm_backward_reference(grad_out: Tensor, grad_normed: Tensor, out: Tensor, mean: Tensor,
                                           rstd: Tensor, scale: Optional[Tensor], weight: Tensor) -> tuple[Tensor, ...]:
    """(grad_x, grad_branch, grad_branch_bias, grad_weight, grad_bias) of residual_layer_norm.

    grad_x = grad_out + LayerNorm's input gradient; grad_branch = scale[b] * grad_x, or empty when
    there is no scale (it is grad_x then); grad_branch_bias = the row sum of grad_branch in the
    compute dtype; grad_weight, grad_bias: LayerNorm's, in weight's dtype."""
    ct = compute_dtype(out.dtype)
    xhat = (out.to(ct) - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    g = grad_normed.to(ct)
    gw = g * weight.to(ct)
    # LayerNorm's input gradient: rstd * (gw - mean(gw) - xhat * mean(gw * xhat)) per row.
    grad_ln = rstd.unsqueeze(-1) * (gw - gw.mean(-1, keepdim=True) - xhat * (gw * xhat).mean(-1, keepdim=True))
    grad_x = grad_out.to(ct) + grad_ln
    grad_branch = grad_x if scale is None else grad_x * _per_sample(scale.to(ct), grad_x)
    return (grad_x.to(out.dtype), _empty(out) if scale is None else grad_branch.to(out.dtype), _rows(grad_branch).sum(0),
            _rows(g * xhat).sum(0).to(weight.dtype), _rows(g).sum(0).to(weight.dtype))
