"""conv_proj_bn for a backend whose kernels have only the plain conv_proj: BatchNorm around it in torch.

The CUDA extension has no BatchNorm epilogue yet (csrc/NOTES.md, section "conv_proj", says where
its statistics would go); until it has one, its `conv_proj_bn` is its own conv_proj kernels with
the statistics, the normalisation and the BatchNorm backward done here by torch reductions. Same
contract as cvt_fast/ops/reference.py's conv_proj_bn_reference, except that the statistics are
those of the convolution rounded to x's dtype (as the official model's BatchNorm sees them) rather
than of the unrounded one: the two differ by the rounding of a 16-bit output.

What it costs in passes over the outputs (what the Triton kernels avoid): the forward writes y,
reads it for the statistics and reads and writes it again to normalise; the backward recomputes y
(one more conv_proj forward), reads it with the output gradients for the two BatchNorm sums, and
writes the convolution's gradients before conv_proj's backward reads them.
"""
from __future__ import annotations

import torch
from torch import Tensor

from cvt_fast.ops.contract import stats_dtype


def _convolved(plain_forward, x, wq, wk, wv, geometry):
    return plain_forward(x, wq, wk, wv, None, None, None, *geometry)


def compose(plain_forward, plain_backward):
    """(forward, backward) of conv_proj_bn, with the signatures of the reference's, from a backend's
    conv_proj forward and backward."""

    def forward(x: Tensor, wq: Tensor, wk: Tensor, wv: Tensor, gamma_q: Tensor, gamma_k: Tensor, gamma_v: Tensor,
                beta_q: Tensor, beta_k: Tensor, beta_v: Tensor, height: int, width: int, has_cls: bool,
                stride_q: int, stride_kv: int, padding_q: int, padding_kv: int, eps: list[float]):
        geometry = (height, width, has_cls, stride_q, stride_kv, padding_q, padding_kv)
        ct = stats_dtype(x.dtype)
        n_cls = int(has_cls)
        outputs = [y.contiguous() for y in _convolved(plain_forward, x, wq, wk, wv, geometry)]
        means, variances = [], []
        for y, gamma, beta, e in zip(outputs, (gamma_q, gamma_k, gamma_v), (beta_q, beta_k, beta_v), eps):
            grid = y[:, n_cls:]
            # torch's two-pass var_mean: no cancellation when |mean| >> std.
            var, mean = torch.var_mean(grid.to(ct), dim=(0, 1), correction=0)
            scale = gamma.to(ct) * (var + e).rsqrt()
            # Normalised in place: the cls row of y is already x's cls row.
            grid.copy_((grid.to(ct) - mean) * scale + beta.to(ct))
            means.append(mean)
            variances.append(var)
        return (*outputs, torch.stack(means), torch.stack(variances))

    def backward(grad_q: Tensor, grad_k: Tensor, grad_v: Tensor, x: Tensor, wq: Tensor, wk: Tensor, wv: Tensor,
                 gamma_q: Tensor, gamma_k: Tensor, gamma_v: Tensor, beta_q: Tensor, beta_k: Tensor, beta_v: Tensor,
                 q: Tensor, k: Tensor, v: Tensor, mean: Tensor, var: Tensor, height: int, width: int,
                 has_cls: bool, stride_q: int, stride_kv: int, padding_q: int, padding_kv: int, eps: list[float]):
        geometry = (height, width, has_cls, stride_q, stride_kv, padding_q, padding_kv)
        ct = stats_dtype(x.dtype)
        n_cls = int(has_cls)
        convolved = _convolved(plain_forward, x, wq, wk, wv, geometry)
        grads_y, grad_gammas, grad_betas = [], [], []
        for i, (y, g, gamma) in enumerate(zip(convolved, (grad_q, grad_k, grad_v), (gamma_q, gamma_k, gamma_v))):
            invstd = (var[i] + eps[i]).rsqrt()
            x_hat = (y[:, n_cls:].to(ct) - mean[i]) * invstd
            d_out = g[:, n_cls:].to(ct)
            grad_beta = d_out.sum(dim=(0, 1))
            grad_gamma = (d_out * x_hat).sum(dim=(0, 1))
            count = d_out.shape[0] * d_out.shape[1]
            grad_y = g.clone()
            grad_y[:, n_cls:] = gamma.to(ct) * invstd * (d_out - grad_beta / count - x_hat * (grad_gamma / count))
            grads_y.append(grad_y)
            grad_gammas.append(grad_gamma)
            grad_betas.append(grad_beta)
        grad_x, grad_wq, grad_wk, grad_wv = plain_backward(*grads_y, x, wq, wk, wv, *geometry)
        return (grad_x, grad_wq, grad_wk, grad_wv, torch.stack(grad_gammas).to(gamma_q.dtype),
                torch.stack(grad_betas).to(beta_q.dtype))

    return forward, backward

