"""Plain-PyTorch reference implementations: the ground truth of every backend.

Each function states what the fused kernels compute, in the fewest readable lines. They
run on any device and take any float dtype; bf16/fp16 inputs are computed in float32 and
the results returned in the input dtype (fp32 and fp64 are computed as they are). No
tricks here: speed belongs to kernels/ and csrc/.

Shapes follow the contract in cvt_fast/ops/__init__.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cvt_fast.ops.contract import output_size


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the arithmetic runs in: float32 for the 16-bit types, else the dtype itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# --------------------------------------------------------------------------- attention

def attention_reference(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """q (B,Nq,H,d), k/v (B,Nkv,H,d) -> out (B,Nq,H*d) in q's dtype, lse (B,H,Nq) float32."""
    batch, n_q, heads, head_dim = q.shape
    ct = compute_dtype(q.dtype)
    # Heads to the front: (B, H, N, d).
    qh, kh, vh = (t.transpose(1, 2).to(ct) for t in (q, k, v))
    scores = scale * (qh @ kh.transpose(-1, -2))           # (B, H, Nq, Nkv)
    lse = torch.logsumexp(scores, dim=-1)                  # (B, H, Nq)
    out = torch.exp(scores - lse.unsqueeze(-1)) @ vh       # (B, H, Nq, d)
    out = out.transpose(1, 2).reshape(batch, n_q, heads * head_dim)
    return out.to(q.dtype).contiguous(), lse.to(torch.float32).contiguous()


def attention_backward_reference(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                                 lse: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of `attention_reference`, shaped and typed like q, k, v.

    The probabilities are recomputed from q and k in the compute dtype rather than from
    the float32 `lse`, so float64 gradients stay exact; `lse` is accepted for the
    contract's sake (the kernels use it to avoid a second softmax).
    """
    del lse
    batch, n_q, heads, head_dim = q.shape
    ct = compute_dtype(q.dtype)
    qh, kh, vh = (t.transpose(1, 2).to(ct) for t in (q, k, v))
    d_out = grad_out.reshape(batch, n_q, heads, head_dim).transpose(1, 2).to(ct)
    o = out.reshape(batch, n_q, heads, head_dim).transpose(1, 2).to(ct)
    p = torch.softmax(scale * (qh @ kh.transpose(-1, -2)), dim=-1)   # (B, H, Nq, Nkv)
    dv = p.transpose(-1, -2) @ d_out
    dp = d_out @ vh.transpose(-1, -2)
    # Softmax backward: dS = P * (dP - rowsum(dP * P)), and rowsum(dP * P) = rowsum(dO * O).
    ds = p * (dp - (d_out * o).sum(-1, keepdim=True))
    dq = scale * (ds @ kh)
    dk = scale * (ds.transpose(-1, -2) @ qh)
    return tuple(g.transpose(1, 2).to(t.dtype).contiguous() for g, t in ((dq, q), (dk, k), (dv, v)))


# --------------------------------------------------------------------------- conv projection

def _grid(x: Tensor, height: int, width: int, has_cls: bool) -> tuple[Tensor, Tensor]:
    """Tokens (B, [1+]H*W, C) -> (cls rows (B, 0 or 1, C), NCHW grid (B, C, H, W))."""
    cls, tokens = x[:, : int(has_cls)], x[:, int(has_cls):]
    return cls, tokens.transpose(1, 2).reshape(x.shape[0], x.shape[2], height, width)


def _tokens(cls: Tensor, grid: Tensor) -> Tensor:
    """NCHW grid -> tokens in row-major (h, w) order, with the cls rows in front."""
    return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)


def conv_proj_reference(x: Tensor, wq: Tensor, wk: Tensor, wv: Tensor,
                        bq: Tensor | None, bk: Tensor | None, bv: Tensor | None,
                        height: int, width: int, has_cls: bool, stride_q: int, stride_kv: int,
                        padding_q: int, padding_kv: int) -> tuple[Tensor, Tensor, Tensor]:
    """Three depthwise convolutions of the token grid; the cls row passes through unconvolved."""
    ct = compute_dtype(x.dtype)
    cls, grid = _grid(x.to(ct), height, width, has_cls)
    channels = x.shape[2]
    outputs = []
    for w, b, stride, padding in ((wq, bq, stride_q, padding_q), (wk, bk, stride_kv, padding_kv),
                                  (wv, bv, stride_kv, padding_kv)):
        b = None if b is None else b.to(ct)
        conv = F.conv2d(grid, w.to(ct), b, stride=stride, padding=padding, groups=channels)
        outputs.append(_tokens(cls, conv).to(x.dtype).contiguous())
    return tuple(outputs)


def conv_proj_backward_reference(grad_q: Tensor, grad_k: Tensor, grad_v: Tensor, x: Tensor,
                                 wq: Tensor, wk: Tensor, wv: Tensor, height: int, width: int,
                                 has_cls: bool, stride_q: int, stride_kv: int, padding_q: int,
                                 padding_kv: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients (grad_x, grad_wq, grad_wk, grad_wv) of `conv_proj_reference` (bias grads excluded:
    they are the sums of the non-cls rows of the output gradients)."""
    ct = compute_dtype(x.dtype)
    n_cls = int(has_cls)
    _, grid = _grid(x.to(ct), height, width, has_cls)
    channels = x.shape[2]
    grad_grid = torch.zeros_like(grid)
    grad_cls = torch.zeros_like(x[:, :n_cls], dtype=ct)
    grad_weights = []
    for g, w, stride, padding in ((grad_q, wq, stride_q, padding_q), (grad_k, wk, stride_kv, padding_kv),
                                  (grad_v, wv, stride_kv, padding_kv)):
        g = g.to(ct)
        grad_cls = grad_cls + g[:, :n_cls]
        # Output tokens back to the output grid: (B, C, Ho, Wo).
        g_grid = g[:, n_cls:].transpose(1, 2).reshape(
            g.shape[0], channels, output_size(height, w.shape[2], stride, padding),
            output_size(width, w.shape[3], stride, padding))
        grad_grid = grad_grid + torch.nn.grad.conv2d_input(
            grid.shape, w.to(ct), g_grid, stride=stride, padding=padding, groups=channels)
        grad_weights.append(torch.nn.grad.conv2d_weight(
            grid, w.shape, g_grid, stride=stride, padding=padding, groups=channels).to(w.dtype))
    grad_x = _tokens(grad_cls, grad_grid).to(x.dtype).contiguous()
    return (grad_x, *grad_weights)


# --------------------------------------------------------------------------- conv projection + BatchNorm

def conv_proj_bn_reference(x: Tensor, wq: Tensor, wk: Tensor, wv: Tensor,
                           gamma_q: Tensor, gamma_k: Tensor, gamma_v: Tensor,
                           beta_q: Tensor, beta_k: Tensor, beta_v: Tensor,
                           height: int, width: int, has_cls: bool, stride_q: int, stride_kv: int,
                           padding_q: int, padding_kv: int, eps: list[float]
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """conv_proj without bias, then BatchNorm2d in training mode on each output's grid rows.

    Returns q, k, v (x's dtype; the cls row passed through untouched) and the batch statistics
    mean and biased var, (3, C) in the compute dtype, row i for output i. The statistics are those
    of the convolution in the compute dtype, before rounding to x's dtype.
    """
    ct = compute_dtype(x.dtype)
    n_cls = int(has_cls)
    convolved = conv_proj_reference(x.to(ct), wq.to(ct), wk.to(ct), wv.to(ct), None, None, None, height, width,
                                    has_cls, stride_q, stride_kv, padding_q, padding_kv)
    outputs, means, variances = [], [], []
    for y, gamma, beta, e in zip(convolved, (gamma_q, gamma_k, gamma_v), (beta_q, beta_k, beta_v), eps):
        grid = y[:, n_cls:]
        mean = grid.mean(dim=(0, 1))
        var = grid.var(dim=(0, 1), correction=0)  # biased: what BatchNorm normalises with
        normed = (grid - mean) * torch.rsqrt(var + e) * gamma.to(ct) + beta.to(ct)
        outputs.append(torch.cat([y[:, :n_cls], normed], dim=1).to(x.dtype).contiguous())
        means.append(mean)
        variances.append(var)
    return (*outputs, torch.stack(means), torch.stack(variances))


def conv_proj_bn_backward_reference(grad_q: Tensor, grad_k: Tensor, grad_v: Tensor, x: Tensor,
                                    wq: Tensor, wk: Tensor, wv: Tensor,
                                    gamma_q: Tensor, gamma_k: Tensor, gamma_v: Tensor,
                                    beta_q: Tensor, beta_k: Tensor, beta_v: Tensor,
                                    q: Tensor, k: Tensor, v: Tensor, mean: Tensor, var: Tensor,
                                    height: int, width: int, has_cls: bool, stride_q: int, stride_kv: int,
                                    padding_q: int, padding_kv: int, eps: list[float]
                                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (grad_x, grad_wq, grad_wk, grad_wv, grad_bn_weight (3, C), grad_bn_bias (3, C)) of
    `conv_proj_bn_reference`, from the BatchNorm backward formula on the recomputed convolution.
    The forward's outputs q, k, v are accepted for the contract's sake (the kernels read them)."""
    del q, k, v
    ct = compute_dtype(x.dtype)
    n_cls = int(has_cls)
    geometry = (height, width, has_cls, stride_q, stride_kv, padding_q, padding_kv)
    convolved = conv_proj_reference(x.to(ct), wq.to(ct), wk.to(ct), wv.to(ct), None, None, None, *geometry)
    grad_convolved, grad_gammas, grad_betas = [], [], []
    for i, (y, g, gamma) in enumerate(zip(convolved, (grad_q, grad_k, grad_v), (gamma_q, gamma_k, gamma_v))):
        g = g.to(ct)
        invstd = torch.rsqrt(var[i].to(ct) + eps[i])
        x_hat = (y[:, n_cls:] - mean[i].to(ct)) * invstd
        d_out = g[:, n_cls:]
        grad_beta = d_out.sum(dim=(0, 1))
        grad_gamma = (d_out * x_hat).sum(dim=(0, 1))
        count = d_out.shape[0] * d_out.shape[1]
        # BatchNorm backward with batch statistics: the mean and the variance depend on every row.
        d_grid = gamma.to(ct) * invstd * (d_out - grad_beta / count - x_hat * grad_gamma / count)
        grad_convolved.append(torch.cat([g[:, :n_cls], d_grid], dim=1))
        grad_gammas.append(grad_gamma)
        grad_betas.append(grad_beta)
    grad_x, *grad_weights = conv_proj_backward_reference(*grad_convolved, x.to(ct), wq.to(ct), wk.to(ct),
                                                         wv.to(ct), *geometry)
    return (grad_x.to(x.dtype), *(g.to(w.dtype) for g, w in zip(grad_weights, (wq, wk, wv))),
            torch.stack(grad_gammas).to(gamma_q.dtype), torch.stack(grad_betas).to(beta_q.dtype))


# --------------------------------------------------------------------------- other projections

def avg_proj_reference(x: Tensor, height: int, width: int, has_cls: bool, kernel_size: int,
                       stride_kv: int, padding_kv: int) -> tuple[Tensor, Tensor, Tensor]:
    """QKV_PROJ_METHOD 'avg' of the official code: q is the token grid itself; k and v are
    AvgPool2d(kernel_size, stride_kv, padding_kv, ceil_mode=True) of it (one tensor, returned
    twice). The cls row passes through in front of each."""
    cls, grid = _grid(x, height, width, has_cls)
    pooled = F.avg_pool2d(grid, kernel_size, stride=stride_kv, padding=padding_kv, ceil_mode=True)
    kv = _tokens(cls, pooled)
    return x, kv, kv


def linear_proj_reference(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """QKV_PROJ_METHOD 'linear' of the official code: no projection, q = k = v = x."""
    return x, x, x
