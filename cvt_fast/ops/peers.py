"""Attention through other libraries' kernels, as selectable backends ('sdpa', 'xformers').

Both are differentiable natively, so they are called directly rather than through the
cvt_fast custom ops. They take q, k, v in cvt_fast's (B, N, H, d) layout and return
(B, Nq, H*d), the contract of cvt_fast.ops.attention.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """torch.nn.functional.scaled_dot_product_attention, which wants (B, H, N, d)."""
    batch, n_q, heads, head_dim = q.shape
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         scale=scale)
    return out.transpose(1, 2).reshape(batch, n_q, heads * head_dim)


def xformers_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """xformers.ops.memory_efficient_attention, which takes the (B, N, H, d) layout as it is."""
    import xformers.ops  # imported here: it needs a matching CUDA runtime (see backend.py)

    batch, n_q, heads, head_dim = q.shape
    out = xformers.ops.memory_efficient_attention(q, k, v, scale=scale)
    return out.reshape(batch, n_q, heads * head_dim)

