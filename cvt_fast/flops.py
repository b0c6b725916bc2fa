"""Parameter and multiply-accumulate counts of a CvT, counted the way the paper's numbers were.

The paper's "GFLOPs" (CvT-13: 4.5 at 224, 16.3 at 384; CvT-21: 7.1 / 24.9; CvT-W24:
193.2 at 384) are multiply-accumulates from a hook-based counter: the official
Attention module carries its own rule (`compute_macs`) and the generic counter takes
every other layer. This module reproduces those rules analytically from the model's
spec, for one image:

- a layer with weights (Conv2d, Linear) costs its parameter count, bias included,
  per output position: Conv2d `(k*k*C_in/groups*C_out + C_out) * H_out * W_out`,
  Linear `(in*out + out) * tokens`; this is also how `compute_macs` prices the
  q/k/v/output projections and the depthwise convolutions (which have no bias);
- attention: `Nq * Nkv * C` for q @ k^T and again for attn @ v (summed over heads,
  C = embedding width), where Nq and Nkv include the cls token;
- LayerNorm: 2 per element (normalise, then the affine map), as the generic counter
  prices affine normalisation layers; BatchNorm inside the projection is part of the
  attention rule and, like softmax, activations, dropout and the residual adds, free.

Deviation from the official rule, on purpose: it derived the grid as
`H = W = int(sqrt(T - 1))` and `H / stride` (a float), which is wrong for non-square
inputs and odd sizes; here the true convolution output sizes are used. Both agree for
square inputs whose grids divide by the strides (224 and 384 included). The results
(GMACs): CvT-13 4.58 at 224 / 16.32 at 384, CvT-21 7.20 / 24.92, CvT-W24 194.45 at 384;
the paper's 224 numbers are 1.4-1.8 % lower, its 384 numbers agree within 0.7 %.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (buffers such as BatchNorm running statistics excluded).

    Works on models built on the meta device too (only shapes are read).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model is a {type(model).__name__}; expected a torch.nn.Module")
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _image_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        size = (image_size, image_size)
    elif isinstance(image_size, Sequence) and len(image_size) == 2 and all(isinstance(s, int) for s in image_size):
        size = (int(image_size[0]), int(image_size[1]))
    else:
        raise ValueError(f"image_size={image_size!r}; expected an int or an (height, width) pair of ints")
    if min(size) < 1:
        raise ValueError(f"image_size={image_size!r}; expected positive sizes")
    return size


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _pool_out(size: int, kernel: int, stride: int, padding: int) -> int:
    # nn.AvgPool2d(ceil_mode=True): the last window must start inside the padded input's left part.
    out = math.ceil((size + 2 * padding - kernel) / stride) + 1
    if (out - 1) * stride >= size + padding:
        out -= 1
    return out


def _projection_grid(method: str, height: int, width: int, kernel: int, stride: int,
                     padding: int) -> tuple[int, int]:
    if method == "dw_bn":
        return _conv_out(height, kernel, stride, padding), _conv_out(width, kernel, stride, padding)
    if method == "avg":
        return _pool_out(height, kernel, stride, padding), _pool_out(width, kernel, stride, padding)
    return height, width  # "linear": the tokens go to the Linear projections unchanged


def flops_by_part(model_or_spec: nn.Module | Mapping[str, Any], image_size: int | Sequence[int] = (224, 224),
                  num_classes: int | None = None, in_chans: int | None = None) -> dict[str, int]:
    """Multiply-accumulates for one image, split into 'stage{i}.patch_embed', 'stage{i}.attn',
    'stage{i}.mlp', 'stage{i}.norm' (the blocks' LayerNorms) and 'head' (final norm + classifier)."""
    from cvt_fast.model import normalize_spec

    if isinstance(model_or_spec, nn.Module):
        spec = getattr(model_or_spec, "spec", None)
        if spec is None:
            raise TypeError(f"{type(model_or_spec).__name__} has no .spec; expected a cvt_fast CvT model "
                            "or a MODEL.SPEC mapping")
        if num_classes is None:
            num_classes = int(getattr(model_or_spec, "num_classes", 1000))
        if in_chans is None:
            in_chans = int(getattr(model_or_spec, "in_chans", 3))
    elif isinstance(model_or_spec, Mapping):
        spec = model_or_spec
    else:
        raise TypeError(f"model_or_spec is a {type(model_or_spec).__name__}; "
                        "expected a cvt_fast CvT model or a MODEL.SPEC mapping")
    num_classes = 1000 if num_classes is None else num_classes
    in_chans = 3 if in_chans is None else in_chans
    height, width = _image_size(image_size)

    parts: dict[str, int] = {}
    chans = in_chans
    tokens = height * width
    for i, st in enumerate(normalize_spec(spec)):
        dim, kernel = st["DIM_EMBED"], st["PATCH_SIZE"]
        height = _conv_out(height, kernel, st["PATCH_STRIDE"], st["PATCH_PADDING"])
        width = _conv_out(width, kernel, st["PATCH_STRIDE"], st["PATCH_PADDING"])
        if height < 1 or width < 1:
            raise ValueError(f"image_size {image_size} is too small: stage {i} has no tokens left")
        grid = height * width
        cls = int(bool(st["CLS_TOKEN"]))
        tokens = grid + cls
        parts[f"stage{i}.patch_embed"] = (kernel * kernel * chans * dim + dim) * grid + 2 * grid * dim

        # Attention, the official compute_macs rule.
        method = st["QKV_PROJ_METHOD"]
        k_qkv = st["KERNEL_QKV"]
        # The official model projects q with "linear" when the method is "avg".
        q_method = "linear" if method == "avg" else method
        hq, wq = _projection_grid(q_method, height, width, k_qkv, st["STRIDE_Q"], st["PADDING_Q"])
        hkv, wkv = _projection_grid(method, height, width, k_qkv, st["STRIDE_KV"], st["PADDING_KV"])
        n_q, n_kv = hq * wq + cls, hkv * wkv + cls
        linear = dim * dim + (dim if st["QKV_BIAS"] else 0)
        attn = 2 * n_q * n_kv * dim
        attn += linear * n_q + 2 * linear * n_kv
        attn += (dim * dim + dim) * n_q  # output projection 'proj' (always with bias)
        depthwise = k_qkv * k_qkv * dim  # depthwise conv parameters (no bias)
        if q_method == "dw_bn":
            attn += depthwise * hq * wq
        if method == "dw_bn":
            attn += 2 * depthwise * hkv * wkv

        hidden = int(dim * st["MLP_RATIO"])
        mlp = (dim * hidden + hidden) * tokens + (hidden * dim + dim) * tokens
        norms = 2 * (2 * tokens * dim)

        depth = st["DEPTH"]
        parts[f"stage{i}.attn"] = depth * attn
        parts[f"stage{i}.mlp"] = depth * mlp
        parts[f"stage{i}.norm"] = depth * norms
        chans = dim

    # Final LayerNorm: on the cls token only when the last stage has one, else on every token.
    last_cls = bool(normalize_spec(spec)[-1]["CLS_TOKEN"])
    head = 2 * chans * (1 if last_cls else tokens)
    if num_classes > 0:
        head += chans * num_classes + num_classes
    parts["head"] = head
    return parts


def count_flops(model_or_spec: nn.Module | Mapping[str, Any], image_size: int | Sequence[int] = (224, 224),
                num_classes: int | None = None, in_chans: int | None = None) -> int:
    """Multiply-accumulates of one forward pass of one image (the paper's "FLOPs").

    `model_or_spec`: a cvt_fast CvT (its spec, head size and input channels are used; any
    device, meta included: nothing runs) or a MODEL.SPEC mapping (then `num_classes`,
    default 1000, and `in_chans`, default 3). The count does not depend on the backend.
    """
    return sum(flops_by_part(model_or_spec, image_size, num_classes, in_chans).values())


__all__ = ["count_flops", "count_params", "flops_by_part"]
