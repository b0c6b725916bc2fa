"""The two fused operations of CvT, behind one contract and several backends.

Every op of the package is declared in `cvt_fast/ops/library.py` (schemas, fake
implementations, autograd); this module holds the public Python entry points.

attention(q, k, v, scale, backend=None) -> out
    q: (B, Nq, H, d); k, v: (B, Nkv, H, d). Any strides as long as the last dim is
    contiguous (stride 1), so the Linear outputs `proj_q(x).view(B, N, H, d)` are read
    in place. Nq and Nkv are arbitrary (Nkv < Nq in CvT). d: any for the reference and
    the peers, the record's head_dims for the fused kernels (backends.py). dtype bf16,
    fp16, fp32 or fp64 (per backend: its record), the same for q, k, v. `scale`
    multiplies the scores (CvT uses dim_out ** -0.5).
    Returns out: (B, Nq, H * d), contiguous, dtype of q:
        out[b, i, h*d:(h+1)*d] = softmax_j(scale * q[b,i,h] . k[b,j,h]) @ v[b,:,h]
    Forward also produces lse (B, H, Nq) float32, the natural-log log-sum-exp of the
    scaled scores of each row, saved for the backward; the backward recomputes the
    scores tile by tile (no Nq x Nkv matrix in memory in either direction).
    Backends: every record of backends.py (reference, triton, cuda, sdpa, xformers).

conv_proj(x, weight_q, weight_k, weight_v, height, width, has_cls,
          stride_q=1, stride_kv=2, padding_q=1, padding_kv=1,
          bias_q=None, bias_k=None, bias_v=None, backend=None) -> (q, k, v)
    x: (B, T, C) tokens, channels last, T = has_cls + height * width; C contiguous.
    weight_*: (C, 1, k, k) depthwise Conv2d weights (kernel size k taken from them);
    bias_*: optional (C,) added to the convolved tokens (used for BatchNorm folded
    into the convolution at eval time). Zero padding.
    Returns q: (B, has_cls + Hq*Wq, C), k and v: (B, has_cls + Hk*Wk, C), contiguous,
    dtype of x, where Hq = (height + 2*padding_q - k) // stride_q + 1 (same for W and
    for k/v with stride_kv, padding_kv). Row 0 of each output is x[:, 0] passed through
    unconvolved (and without bias) when has_cls; the other rows are the depthwise
    convolution of the (height, width) grid of x[:, has_cls:], in row-major (h, w)
    token order. The input is read once for all three convolutions.
    Backends: the records of backends.py that implement conv_proj (reference, triton, cuda).

conv_proj_bn(x, weight_q, weight_k, weight_v, bn_weight_q, bn_weight_k, bn_weight_v,
             bn_bias_q, bn_bias_k, bn_bias_v, height, width, has_cls,
             stride_q=1, stride_kv=2, padding_q=1, padding_kv=1, eps=1e-5, backend=None)
    -> (q, k, v, mean, var)
    conv_proj without conv bias, then on each output nn.BatchNorm2d in training mode, with
    batch statistics over the grid rows only (all images, all Ho*Wo positions; the cls row
    passes through untouched, never normalised and never counted):
        q[:, has_cls:] = (y_q - mean[0]) / sqrt(var[0] + eps_q) * bn_weight_q + bn_bias_q
    (k and v likewise with rows 1 and 2), y the depthwise convolution in the compute dtype
    (float32 for 16-bit x). bn_weight_*, bn_bias_*: (C,), one floating dtype for all six (the
    module's parameters, float32 under autocast); eps: one float or three (q, k, v). Returns
    q, k, v as conv_proj does (x's dtype, contiguous, cls row in place) and mean, var: (3, C)
    batch means and BIASED variances (what the normalisation used), float32 (float64 for
    float64 x), not differentiable. The running statistics are not touched: the caller
    updates them (running_var with the unbiased variance var * n / (n - 1), n = B * Ho * Wo),
    as cvt_fast/model.py does. Needs n > 1 per output, as BatchNorm2d in training.
    Backward: gradients of x, the three conv weights and the six BatchNorm parameters, with
    BatchNorm's reductions (sums of dy and of dy * x_hat) done by the op's backward kernels.
    Eval-mode BatchNorm (running statistics) is an affine map: the model folds it into
    conv_proj's weight and bias instead. Backends: those that implement conv_proj (for the
    CUDA extension, BatchNorm in torch around its conv_proj kernels until they have an epilogue).

Backend choice: argument `backend` here, else the model's, else the global one
(`cvt_fast.set_backend`), else the environment variable CVT_FAST_BACKEND, else "auto";
`explain_backend(op, ...)` says which backend a call takes and why. What each backend runs
(ops, dtypes, head sizes, kernel sizes, where) is its record in cvt_fast/ops/backends.py;
the README's backend table is printed from it (`python -m cvt_fast.ops`).

Inputs are checked once, by the registered ops themselves (cvt_fast/ops/contract.py), so
`torch.ops.cvt_fast.*` called directly raises the same errors as these entry points; the
entry points check only the Python types of their arguments before choosing a backend.

Adding a backend: write its implementation module (forward and backward functions with the
signatures of cvt_fast/ops/reference.py, or for an attention peer one differentiable
function like cvt_fast/ops/peers.py's), then add one `Backend(...)` record to `_RECORDS` in
cvt_fast/ops/backends.py: its name, kind ('kernels' run inside the custom ops, 'peer' is
called directly), the ops it implements, dtypes, head sizes, kernel-size rule, an
availability probe that returns why it cannot run (or None), its loader, and the pytest
selections of its GPU tests. The backend choice, the model (`backend=`), the benchmarks
(cvt_fast-<name> rows) and bench/tune.py pick it up from there; run bench/tune.py on a GPU
to let `auto` choose it where its GPU tests pass and it is fastest, and paste
`python -m cvt_fast.ops` into the README (a test compares them).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from cvt_fast.ops import contract
from cvt_fast.ops import library  # noqa: F401  (registers torch.ops.cvt_fast.*)
from cvt_fast.ops.backend import (BackendChoice, BackendUnavailableError, available_backends, explain_backend,
                                  get_backend, resolve_backend, set_backend)
from cvt_fast.ops.backends import BACKENDS, TABLE
from cvt_fast.ops.reference import avg_proj_reference, linear_proj_reference
from cvt_fast.ops.fused_elementwise import linear_activation, mlp_activation, residual_layer_norm  # noqa: F401

__all__ = ["attention", "conv_proj", "conv_proj_bn", "avg_proj", "linear_proj", "set_backend", "get_backend",
           "resolve_backend", "explain_backend", "BackendChoice", "available_backends", "BackendUnavailableError",
           "BACKENDS", "TABLE"]


# --------------------------------------------------------------------------- autocast

def _autocast_enabled(device_type: str) -> bool:
    # torch asks autocast about device types it has a dispatch key for; others (meta) have no
    # autocast, and asking raises a RuntimeError that would hide the contract's own message.
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def _autocast(*tensors: Optional[Tensor]) -> tuple:
    """Cast floating inputs to the autocast dtype when autocast is on, as torch's conv2d and
    matmul do (the custom ops themselves are not autocast-aware; float64 is left alone)."""
    first = tensors[0]
    if not isinstance(first, Tensor) or not _autocast_enabled(first.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(first.device.type)
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64
                 else t for t in tensors)


# --------------------------------------------------------------------------- entry points

def attention(q: Tensor, k: Tensor, v: Tensor, scale: float, backend: Optional[str] = None) -> Tensor:
    """Multi-head attention, q (B, Nq, H, d), k/v (B, Nkv, H, d) -> (B, Nq, H*d); see the module doc."""
    contract.check_attention_arguments(q, k, v, scale)
    q, k, v = _autocast(q, k, v)
    name = resolve_backend("attention", backend, q, k, v)
    if TABLE[name].kind == "peer":
        # Peers are differentiable on their own and called directly, not through the op (which
        # would check these inputs): check them here.
        contract.check_attention(q, k, v, scale)
        return TABLE[name].load("attention").forward(q, k, v, float(scale))
    out, _ = torch.ops.cvt_fast.attention(q, k, v, float(scale), name)
    return out


def conv_proj(x: Tensor, weight_q: Tensor, weight_k: Tensor, weight_v: Tensor, height: int, width: int,
              has_cls: bool, stride_q: int = 1, stride_kv: int = 2, padding_q: int = 1, padding_kv: int = 1,
              bias_q: Optional[Tensor] = None, bias_k: Optional[Tensor] = None, bias_v: Optional[Tensor] = None,
              backend: Optional[str] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Depthwise convolutional q/k/v projection of tokens (B, [1+]H*W, C); see the module doc.

    Weights and biases are cast to x's dtype (under autocast everything goes to the autocast
    dtype first), as the official model's Conv2d computes in the activations' dtype.
    """
    contract.check_conv_proj_arguments(x, (weight_q, weight_k, weight_v), (bias_q, bias_k, bias_v), has_cls,
                                       height=height, width=width, stride_q=stride_q, stride_kv=stride_kv,
                                       padding_q=padding_q, padding_kv=padding_kv)
    x, weight_q, weight_k, weight_v, bias_q, bias_k, bias_v = _autocast(
        x, weight_q, weight_k, weight_v, bias_q, bias_k, bias_v)
    name = resolve_backend("conv_proj", backend, x, weight_q, weight_k, weight_v)
    # The kernels compute in x's dtype; casting here keeps the weight gradients flowing in theirs.
    weight_q, weight_k, weight_v, bias_q, bias_k, bias_v = (
        None if t is None else t.to(x.dtype) for t in (weight_q, weight_k, weight_v, bias_q, bias_k, bias_v))
    return torch.ops.cvt_fast.conv_proj(x, weight_q, weight_k, weight_v, bias_q, bias_k, bias_v, height, width,
                                        has_cls, stride_q, stride_kv, padding_q, padding_kv, name)


def conv_proj_bn(x: Tensor, weight_q: Tensor, weight_k: Tensor, weight_v: Tensor, bn_weight_q: Tensor,
                 bn_weight_k: Tensor, bn_weight_v: Tensor, bn_bias_q: Tensor, bn_bias_k: Tensor, bn_bias_v: Tensor,
                 height: int, width: int, has_cls: bool, stride_q: int = 1, stride_kv: int = 2, padding_q: int = 1,
                 padding_kv: int = 1, eps: "float | Sequence[float]" = 1e-5, backend: Optional[str] = None
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """conv_proj followed by training-mode BatchNorm2d on each output's grid rows; see the module doc.

    Returns (q, k, v, mean, var); mean and var (3, C) are the batch statistics (var biased). The
    conv weights are cast as conv_proj casts them; the BatchNorm parameters keep their dtype.
    """
    eps = [eps] * 3 if isinstance(eps, (int, float)) and not isinstance(eps, bool) else eps
    eps = list(eps) if isinstance(eps, (list, tuple)) else eps
    gammas, betas = (bn_weight_q, bn_weight_k, bn_weight_v), (bn_bias_q, bn_bias_k, bn_bias_v)
    contract.check_conv_proj_bn_arguments(x, (weight_q, weight_k, weight_v), gammas, betas, has_cls, eps,
                                          height=height, width=width, stride_q=stride_q, stride_kv=stride_kv,
                                          padding_q=padding_q, padding_kv=padding_kv)
    x, weight_q, weight_k, weight_v = _autocast(x, weight_q, weight_k, weight_v)
    name = resolve_backend("conv_proj", backend, x, weight_q, weight_k, weight_v)
    weight_q, weight_k, weight_v = (t.to(x.dtype) for t in (weight_q, weight_k, weight_v))
    return torch.ops.cvt_fast.conv_proj_bn(x, weight_q, weight_k, weight_v, *gammas, *betas, height, width, has_cls,
                                           stride_q, stride_kv, padding_q, padding_kv, [float(e) for e in eps], name)


def avg_proj(x: Tensor, height: int, width: int, has_cls: bool, kernel_size: int = 3, stride_kv: int = 2,
             padding_kv: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """QKV_PROJ_METHOD 'avg' (q: the tokens; k = v: AvgPool2d ceil_mode=True of the grid); plain torch."""
    return avg_proj_reference(x, height, width, has_cls, kernel_size, stride_kv, padding_kv)


def linear_proj(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """QKV_PROJ_METHOD 'linear': q = k = v = x."""
    return linear_proj_reference(x)
