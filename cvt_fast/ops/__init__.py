"""The two fused operations of CvT, behind one contract and several backends.

Every op of the package is declared in `cvt_fast/ops/library.py` (schemas, fake
implementations, autograd); this module holds the public Python entry points.

attention(q, k, v, scale, backend=None) -> out
    q: (B, Nq, H, d); k, v: (B, Nkv, H, d). Any strides as long as the last dim is
    contiguous (stride 1), so the Linear outputs `proj_q(x).view(B, N, H, d)` are read
    in place. Nq and Nkv are arbitrary (Nkv < Nq in CvT). d in {32, 64, 128} for the
    fused kernels (the reference takes any d). dtype bf16, fp16, fp32 or fp64, the
    same for q, k, v. `scale` multiplies the scores (CvT uses dim_out ** -0.5).
    Returns out: (B, Nq, H * d), contiguous, dtype of q:
        out[b, i, h*d:(h+1)*d] = softmax_j(scale * q[b,i,h] . k[b,j,h]) @ v[b,:,h]
    Forward also produces lse (B, H, Nq) float32, the natural-log log-sum-exp of the
    scaled scores of each row, saved for the backward; the backward recomputes the
    scores tile by tile (no Nq x Nkv matrix in memory in either direction).
    Backends: reference, triton, cuda, sdpa, xformers.

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
    Backends: reference, triton, cuda.

BatchNorm is NOT part of conv_proj: the model applies it (training: batch statistics
over the spatial rows, exactly nn.BatchNorm2d semantics; eval: folded into
weight/bias of conv_proj). See cvt_fast/model.py.

Backend choice: argument `backend` here, else the model's, else the global one
(`cvt_fast.set_backend`), else the environment variable CVT_FAST_BACKEND, else
"auto". See cvt_fast/ops/backend.py.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from cvt_fast.ops import library  # noqa: F401  (registers torch.ops.cvt_fast.*)
from cvt_fast.ops import peers
from cvt_fast.ops.backend import (BACKENDS, BackendUnavailableError, available_backends, get_backend,
                                  resolve_backend, set_backend)
from cvt_fast.ops.reference import avg_proj_reference, linear_proj_reference, output_size
from cvt_fast.ops.fused_elementwise import linear_activation, mlp_activation, residual_layer_norm  # noqa: F401  (issue 18)

__all__ = ["attention", "conv_proj", "avg_proj", "linear_proj", "set_backend", "get_backend",
           "resolve_backend", "available_backends", "BackendUnavailableError", "BACKENDS"]

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


# --------------------------------------------------------------------------- input checks

def _check_tensor(name: str, t: object, dims: int, layout: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D {layout}, got shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; expected one of bfloat16, float16, float32, float64")


def _check_same(what: str, names: tuple, values: tuple) -> None:
    if any(v != values[0] for v in values[1:]):
        pairs = ", ".join(f"{n}: {v}" for n, v in zip(names, values))
        raise ValueError(f"{what} must match ({pairs})")


def _check_last_dim_contiguous(**tensors: Tensor) -> None:
    for name, t in tensors.items():
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got strides "
                             f"{tuple(t.stride())}; call .contiguous() on it")


def _autocast(*tensors: Optional[Tensor]) -> tuple:
    """Cast floating inputs to the autocast dtype when autocast is on, as torch's conv2d and
    matmul do (the custom ops themselves are not autocast-aware; float64 is left alone)."""
    first = tensors[0]
    if not isinstance(first, Tensor) or not torch.is_autocast_enabled(first.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(first.device.type)
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64
                 else t for t in tensors)


# --------------------------------------------------------------------------- entry points

def attention(q: Tensor, k: Tensor, v: Tensor, scale: float, backend: Optional[str] = None) -> Tensor:
    """Multi-head attention, q (B, Nq, H, d), k/v (B, Nkv, H, d) -> (B, Nq, H*d); see the module doc."""
    layout = "(B, N, heads, head_dim)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, 4, layout)
    q, k, v = _autocast(q, k, v)
    _check_same("batch sizes", ("q", "k", "v"), (q.shape[0], k.shape[0], v.shape[0]))
    _check_same("numbers of heads", ("q", "k", "v"), (q.shape[2], k.shape[2], v.shape[2]))
    _check_same("head sizes", ("q", "k", "v"), (q.shape[3], k.shape[3], v.shape[3]))
    _check_same("key and value lengths", ("k", "v"), (k.shape[1], v.shape[1]))
    _check_same("dtypes", ("q", "k", "v"), (q.dtype, k.dtype, v.dtype))
    _check_same("devices", ("q", "k", "v"), (q.device, k.device, v.device))
    if q.shape[1] == 0 or k.shape[1] == 0:
        raise ValueError(f"attention needs at least one query and one key, got Nq={q.shape[1]}, Nkv={k.shape[1]}")
    _check_last_dim_contiguous(q=q, k=k, v=v)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python float, got {type(scale).__name__}")
    name = resolve_backend("attention", backend, q, k, v)
    if name == "sdpa":
        return peers.sdpa_attention(q, k, v, float(scale))
    if name == "xformers":
        return peers.xformers_attention(q, k, v, float(scale))
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
    _check_tensor("x", x, 3, "(B, tokens, channels)")
    for name, value in (("height", height), ("width", width), ("stride_q", stride_q), ("stride_kv", stride_kv),
                        ("padding_q", padding_q), ("padding_kv", padding_kv)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
        low = 0 if name.startswith("padding") else 1
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if not isinstance(has_cls, bool):
        raise TypeError(f"has_cls must be a bool, got {has_cls!r}")
    batch, tokens, channels = x.shape
    if tokens != int(has_cls) + height * width:
        raise ValueError(f"x has {tokens} tokens but has_cls={has_cls}, height={height}, width={width} "
                         f"need {int(has_cls) + height * width}")
    x, weight_q, weight_k, weight_v, bias_q, bias_k, bias_v = _autocast(
        x, weight_q, weight_k, weight_v, bias_q, bias_k, bias_v)
    for name, w, stride, padding in (("weight_q", weight_q, stride_q, padding_q),
                                     ("weight_k", weight_k, stride_kv, padding_kv),
                                     ("weight_v", weight_v, stride_kv, padding_kv)):
        _check_tensor(name, w, 4, "(C, 1, k, k)")
        if w.shape[0] != channels or w.shape[1] != 1 or w.shape[2] != w.shape[3]:
            raise ValueError(f"{name} must be a depthwise weight of shape ({channels}, 1, k, k), "
                             f"got {tuple(w.shape)}")
        if output_size(min(height, width), w.shape[2], stride, padding) < 1:
            raise ValueError(f"{name}: kernel {w.shape[2]} with padding {padding} does not fit the "
                             f"{height}x{width} grid")
    for name, b in (("bias_q", bias_q), ("bias_k", bias_k), ("bias_v", bias_v)):
        if b is not None:
            _check_tensor(name, b, 1, "(C,)")
            if b.shape[0] != channels:
                raise ValueError(f"{name} must have shape ({channels},), got {tuple(b.shape)}")
    tensors = {"x": x, "weight_q": weight_q, "weight_k": weight_k, "weight_v": weight_v}
    tensors.update({n: b for n, b in (("bias_q", bias_q), ("bias_k", bias_k), ("bias_v", bias_v)) if b is not None})
    _check_same("devices", tuple(tensors), tuple(t.device for t in tensors.values()))
    _check_last_dim_contiguous(x=x)
    name = resolve_backend("conv_proj", backend, x, weight_q, weight_k, weight_v)
    # The kernels compute in x's dtype; casting here keeps the weight gradients flowing in theirs.
    weight_q, weight_k, weight_v, bias_q, bias_k, bias_v = (
        None if t is None else t.to(x.dtype) for t in (weight_q, weight_k, weight_v, bias_q, bias_k, bias_v))
    return torch.ops.cvt_fast.conv_proj(x, weight_q, weight_k, weight_v, bias_q, bias_k, bias_v, height, width,
                                        has_cls, stride_q, stride_kv, padding_q, padding_kv, name)


def avg_proj(x: Tensor, height: int, width: int, has_cls: bool, kernel_size: int = 3, stride_kv: int = 2,
             padding_kv: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """QKV_PROJ_METHOD 'avg' (q: the tokens; k = v: AvgPool2d ceil_mode=True of the grid); plain torch."""
    return avg_proj_reference(x, height, width, has_cls, kernel_size, stride_kv, padding_kv)


def linear_proj(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """QKV_PROJ_METHOD 'linear': q = k = v = x."""
    return linear_proj_reference(x)
