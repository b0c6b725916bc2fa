"""BatchNorm folded into the depthwise convolution before it, for eval, computed once per weight state.

In eval, `bn(conv(x))` is `conv'(x) + b'` with the per-channel affine map of the BatchNorm
moved into the convolution: scale = gamma / sqrt(running_var + eps), w' = w * scale,
b' = beta - running_mean * scale (`fold_batch_norm`). Recomputing that on every forward costs
about six small kernels per branch; `FoldedBatchNormCache` keeps the folded tensors of one
attention module's q, k and v branches and recomputes them only when a source tensor changed.

A source "changed" when its identity (the tensor object, held by a weak reference), storage
(`data_ptr`), version counter (`_version`, bumped by every in-place write: optimizer steps,
`load_state_dict`'s copy_, BatchNorm's running-stat updates), dtype or device differs, or eps
or a BatchNorm's mode differs. The cache is bypassed (the fold computed in the caller's graph, nothing stored)
wherever reusing a stored tensor would be wrong:
- while torch.compile / torch.export / torch.jit.trace trace the model: a stored tensor would
  be baked into the graph as a constant and go stale when the weights change;
- when a gradient must flow to the convolution or BatchNorm parameters (grad mode on and a
  source requires grad): a stored result would carry one step's autograd graph into the next;
- for inference tensors (made under torch.inference_mode), which have no version counter.
The stored tensors are made without autograd history and outside inference mode, so they can
be used under torch.no_grad, torch.inference_mode and plain grad mode alike.
"""
from __future__ import annotations

import weakref
from typing import NamedTuple, Optional, Sequence

import torch
from torch import nn

# (weight_q, weight_k, weight_v, bias_q, bias_k, bias_v), the order ops.conv_proj takes them in.
FoldedWeights = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def fold_batch_norm(weight: torch.Tensor, bn: nn.BatchNorm2d,
                    dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise conv weight and bias, computed in `dtype`, equal to the conv followed by `bn` in eval."""
    scale = torch.rsqrt(bn.running_var.to(dtype) + bn.eps)
    if bn.weight is not None:
        scale = bn.weight.to(dtype) * scale
    folded_weight = weight.to(dtype) * scale.view(-1, 1, 1, 1)
    folded_bias = -bn.running_mean.to(dtype) * scale
    if bn.bias is not None:
        folded_bias = bn.bias.to(dtype) + folded_bias
    return folded_weight, folded_bias


def _sources(branch: nn.Module) -> tuple[Optional[torch.Tensor], ...]:
    bn = branch.bn
    return (branch.conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var)


def _fold_all(branches: Sequence[nn.Module], dtype: torch.dtype) -> FoldedWeights:
    # Folded in float32 at least (float64 models in float64), then cast to what the conv computes in.
    compute = torch.promote_types(dtype, torch.float32)
    folded = [fold_batch_norm(b.conv.weight, b.bn, compute) for b in branches]
    weights = tuple(w.to(dtype) for w, _ in folded)
    biases = tuple(b.to(dtype) for _, b in folded)
    return weights + biases  # type: ignore[return-value]


def conv_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ops.conv_proj computes in for input x: autocast's where it is on, else x's."""
    device_type = x.device.type
    if x.dtype != torch.float64 and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class _Entry(NamedTuple):
    sources: tuple[weakref.ref, ...]  # identity without keeping old tensors alive
    key: tuple
    folded: FoldedWeights


class FoldedBatchNormCache:
    """The folded weights and biases of one attention module's dw_bn branches, kept between calls."""

    def __init__(self) -> None:
        self._entry: Optional[_Entry] = None  # replaced whole, never mutated

    def clear(self) -> None:
        self._entry = None

    @property
    def is_filled(self) -> bool:
        return self._entry is not None

    @property
    def stored(self) -> Optional[FoldedWeights]:
        """The folded tensors of the last stored fold (what a CUDA graph captured after it reads)."""
        return None if self._entry is None else self._entry.folded

    def get(self, branches: Sequence[nn.Module], dtype: torch.dtype) -> FoldedWeights:
        """Folded (w_q, w_k, w_v, b_q, b_k, b_v) in `dtype` for `branches` (conv + bn modules)."""
        sources = [t for b in branches for t in _sources(b) if t is not None]
        if not self._may_store(sources):
            return _fold_all(branches, dtype)
        key = self._key(branches, sources, dtype)
        entry = self._entry
        if (entry is not None and entry.key == key
                and all(ref() is t for ref, t in zip(entry.sources, sources))):
            return entry.folded
        with torch.inference_mode(False), torch.no_grad():
            folded = _fold_all(branches, dtype)
        self._entry = _Entry(tuple(weakref.ref(t) for t in sources), key, folded)
        return folded

    @staticmethod
    def _may_store(sources: list[torch.Tensor]) -> bool:
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return False
        if torch.is_grad_enabled() and any(t.requires_grad for t in sources):
            return False
        return not any(t.is_inference() for t in sources)

    @staticmethod
    def _key(branches: Sequence[nn.Module], sources: list[torch.Tensor], dtype: torch.dtype) -> tuple:
        tensors = tuple((t._version, t.data_ptr(), t.dtype, t.device) for t in sources)
        modes = tuple((b.bn.eps, b.bn.training, b.bn.weight is None, b.bn.bias is None) for b in branches)
        return tensors + modes + (dtype,)
