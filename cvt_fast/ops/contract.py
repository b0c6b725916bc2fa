"""The ops' contract in code: the dtypes they take, the shapes they produce, and the input
checks, written once.

The checks run at the one door every caller passes: the registered custom ops
(`torch.ops.cvt_fast.*`, cvt_fast/ops/library.py) call them in their bodies and in their fake
(meta) implementations, so a direct `torch.ops.cvt_fast.attention(...)`, a call through
`cvt_fast.ops.attention` and a `torch.compile` trace all raise the same ValueError/TypeError.
The peers (SDPA, xformers), which the entry points call directly, are checked here too. Behind
the door the implementations trust their inputs: the Triton launchers keep only what their
kernels need to launch (device, head size, kernel size), the CUDA extension its own TORCH_CHECKs.

The `*_arguments` checks are the Python-level types that a schema enforces for the registered
ops; the public entry points (plain Python functions) run them before choosing a backend.
"""
from __future__ import annotations

import math
import torch
from torch import Tensor

# Every op computes in these; 16-bit inputs accumulate in float32 (float64 exists for gradcheck).
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
# The dtype of attention's saved log-sum-exp, whatever the input dtype.
LSE_DTYPE = torch.float32

ATTENTION_LAYOUT = "(B, N, heads, head_dim)"
# The backward ops take the forward's inputs in any strides: autograd hands back the saved tensors,
# and under torch.compile inductor may store a saved activation in a layout of its own (a saved q
# came back head-major, (B, H, d, N)). The op bodies copy such a tensor (contiguous_inputs); the
# forward ops, whose inputs the caller controls, still demand contiguous channels.
SAVED_LAYOUT = "any strides"
TOKENS_LAYOUT = "(B, tokens, channels)"


def output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Spatial size after a convolution (floor mode), as nn.Conv2d computes it."""
    return (size + 2 * padding - kernel) // stride + 1


def dtype_names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


# --------------------------------------------------------------------------- building blocks

def _check_tensor(name: str, t: object, dims: int, layout: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D {layout}, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; expected one of {dtype_names(FLOAT_DTYPES)}")


def _check_same(what: str, names: tuple, values: tuple) -> None:
    if any(v != values[0] for v in values[1:]):
        pairs = ", ".join(f"{n}: {v}" for n, v in zip(names, values))
        raise ValueError(f"{what} must match ({pairs})")


def _check_last_dim_contiguous(**tensors: Tensor) -> None:
    for name, t in tensors.items():
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got strides "
                             f"{tuple(t.stride())}; call .contiguous() on it")


def _check_like(name: str, t: object, shape: tuple, like: Tensor, like_name: str) -> None:
    """t must be a tensor of exactly `shape`, with like's dtype and device."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape}, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.dtype != like.dtype:
        raise TypeError(f"{name} has dtype {t.dtype}, expected {like_name}'s dtype {like.dtype}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but {like_name} is on {like.device}; they must share one device")


def check_scale(scale: object) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python float, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale!r}")


# --------------------------------------------------------------------------- attention

def check_attention_arguments(q: object, k: object, v: object, scale: object) -> None:
    """Python types only: q, k, v tensors and a real scale (what the op's schema enforces)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor {ATTENTION_LAYOUT}, got {type(t).__name__}")
    check_scale(scale)


def check_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, contiguous_last_dim: bool = True) -> None:
    """q (B, Nq, H, d), k and v (B, Nkv, H, d): one dtype, one device, last dims contiguous (unless
    contiguous_last_dim is False: the backward, see SAVED_LAYOUT)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, 4, ATTENTION_LAYOUT)
    _check_same("batch sizes", ("q", "k", "v"), (q.shape[0], k.shape[0], v.shape[0]))
    _check_same("numbers of heads", ("q", "k", "v"), (q.shape[2], k.shape[2], v.shape[2]))
    _check_same("head sizes", ("q", "k", "v"), (q.shape[3], k.shape[3], v.shape[3]))
    _check_same("key and value lengths", ("k", "v"), (k.shape[1], v.shape[1]))
    _check_same("dtypes", ("q", "k", "v"), (q.dtype, k.dtype, v.dtype))
    _check_same("devices", ("q", "k", "v"), (q.device, k.device, v.device))
    if q.shape[1] == 0 or k.shape[1] == 0:
        raise ValueError(f"attention needs at least one query and one key, got Nq={q.shape[1]}, Nkv={k.shape[1]}")
    if contiguous_last_dim:
        _check_last_dim_contiguous(q=q, k=k, v=v)
    check_scale(scale)


def check_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                             scale: float) -> None:
    """The forward's inputs, plus grad_out and out (B, Nq, H*d) in q's dtype, lse (B, H, Nq) float32;
    q, k, v, out and grad_out in any strides (SAVED_LAYOUT: inductor laid out a q recomputed for the
    backward with its tokens innermost)."""
    check_attention(q, k, v, scale, contiguous_last_dim=False)
    batch, n_q, heads, head_dim = q.shape
    for name, t in (("grad_out", grad_out), ("out", out)):
        _check_like(name, t, (batch, n_q, heads * head_dim), q, "q")
    if not isinstance(lse, Tensor):
        raise TypeError(f"lse must be a torch.Tensor, got {type(lse).__name__}")
    if tuple(lse.shape) != (batch, heads, n_q):
        raise ValueError(f"lse has shape {tuple(lse.shape)}, expected {(batch, heads, n_q)}")
    if lse.dtype != LSE_DTYPE:
        raise TypeError(f"lse has dtype {lse.dtype}, expected {LSE_DTYPE}")
    if lse.device != q.device:
        raise ValueError(f"lse is on {lse.device} but q is on {q.device}; they must share one device")


# --------------------------------------------------------------------------- conv projection

_GEOMETRY_NAMES = ("height", "width", "stride_q", "stride_kv", "padding_q", "padding_kv")


def check_conv_proj_arguments(x: object, weights: tuple, biases: tuple, has_cls: object, **geometry: object) -> None:
    """Python types only: tensors where tensors go, ints for the geometry, a bool has_cls."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor {TOKENS_LAYOUT}, got {type(x).__name__}")
    for name, w in zip(("weight_q", "weight_k", "weight_v"), weights):
        if not isinstance(w, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor (C, 1, k, k), got {type(w).__name__}")
    for name, b in zip(("bias_q", "bias_k", "bias_v"), biases):
        if b is not None and not isinstance(b, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor (C,) or None, got {type(b).__name__}")
    for name, value in geometry.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if not isinstance(has_cls, bool):
        raise TypeError(f"has_cls must be a bool, got {has_cls!r}")


def _check_geometry(x: Tensor, height: int, width: int, has_cls: bool, stride_q: int, stride_kv: int,
                    padding_q: int, padding_kv: int) -> None:
    values = dict(zip(_GEOMETRY_NAMES, (height, width, stride_q, stride_kv, padding_q, padding_kv)))
    for name, value in values.items():
        low = 0 if name.startswith("padding") else 1
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    tokens = x.shape[1]
    if tokens != int(has_cls) + height * width:
        raise ValueError(f"x has {tokens} tokens but has_cls={has_cls}, height={height}, width={width} "
                         f"need {int(has_cls) + height * width}")


def _check_weights(x: Tensor, weights: tuple, height: int, width: int, stride_q: int, stride_kv: int,
                   padding_q: int, padding_kv: int) -> None:
    channels = x.shape[2]
    for name, w, stride, padding in (("weight_q", weights[0], stride_q, padding_q),
                                     ("weight_k", weights[1], stride_kv, padding_kv),
                                     ("weight_v", weights[2], stride_kv, padding_kv)):
        _check_tensor(name, w, 4, "(C, 1, k, k)")
        if w.shape[0] != channels or w.shape[1] != 1 or w.shape[2] != w.shape[3]:
            raise ValueError(f"{name} must be a depthwise weight of shape ({channels}, 1, k, k), "
                             f"got {tuple(w.shape)}")
        if output_size(min(height, width), w.shape[2], stride, padding) < 1:
            raise ValueError(f"{name}: kernel {w.shape[2]} with padding {padding} does not fit the "
                             f"{height}x{width} grid")
        if w.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {w.dtype} but x has {x.dtype}; the op computes in x's dtype "
                            "(cvt_fast.ops.conv_proj casts the weights for you)")


def conv_proj_output_shapes(x: Tensor, weights: tuple, height: int, width: int, has_cls: bool, stride_q: int,
                            stride_kv: int, padding_q: int, padding_kv: int) -> tuple:
    """(B, has_cls + Ho*Wo, C) of q, k and v; each follows its own weight's kernel size."""
    shapes = []
    for w, stride, padding in ((weights[0], stride_q, padding_q), (weights[1], stride_kv, padding_kv),
                               (weights[2], stride_kv, padding_kv)):
        rows = output_size(height, w.shape[2], stride, padding) * output_size(width, w.shape[3], stride, padding)
        shapes.append((x.shape[0], int(has_cls) + rows, x.shape[2]))
    return tuple(shapes)


def check_conv_proj(x: Tensor, weights: tuple, biases: tuple, height: int, width: int, has_cls: bool,
                    stride_q: int, stride_kv: int, padding_q: int, padding_kv: int,
                    contiguous_last_dim: bool = True) -> None:
    """x (B, has_cls + H*W, C), depthwise weights (C, 1, k, k) and optional biases (C,), all in x's
    dtype and on its device; x's channels contiguous (unless contiguous_last_dim is False: the
    backward, SAVED_LAYOUT); every kernel fits the grid."""
    _check_tensor("x", x, 3, TOKENS_LAYOUT)
    _check_geometry(x, height, width, has_cls, stride_q, stride_kv, padding_q, padding_kv)
    _check_weights(x, weights, height, width, stride_q, stride_kv, padding_q, padding_kv)
    channels = x.shape[2]
    named = {"x": x, "weight_q": weights[0], "weight_k": weights[1], "weight_v": weights[2]}
    for name, b in zip(("bias_q", "bias_k", "bias_v"), biases):
        if b is None:
            continue
        _check_tensor(name, b, 1, "(C,)")
        if b.shape[0] != channels:
            raise ValueError(f"{name} must have shape ({channels},), got {tuple(b.shape)}")
        if b.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {b.dtype} but x has {x.dtype}; the op computes in x's dtype "
                            "(cvt_fast.ops.conv_proj casts the biases for you)")
        named[name] = b
    _check_same("devices", tuple(named), tuple(t.device for t in named.values()))
    if contiguous_last_dim:
        _check_last_dim_contiguous(x=x)


def check_conv_proj_backward(grads: tuple, x: Tensor, weights: tuple, height: int, width: int, has_cls: bool,
                             stride_q: int, stride_kv: int, padding_q: int, padding_kv: int) -> None:
    """The forward's checks (without biases; x in any strides, SAVED_LAYOUT), plus grad_q/k/v shaped like
    the outputs, in x's dtype."""
    check_conv_proj(x, weights, (None, None, None), height, width, has_cls, stride_q, stride_kv, padding_q,
                    padding_kv, contiguous_last_dim=False)
    shapes = conv_proj_output_shapes(x, weights, height, width, has_cls, stride_q, stride_kv, padding_q, padding_kv)
    for name, g, shape in zip(("grad_q", "grad_k", "grad_v"), grads, shapes):
        _check_like(name, g, shape, x, "x")



# --------------------------------------------------------------------------- conv projection + BatchNorm

def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of conv_proj_bn's batch statistics: float32 for every training dtype, float64 for
    float64 inputs (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_conv_proj_bn_arguments(x: object, weights: tuple, gammas: tuple, betas: tuple, has_cls: object,
                                 eps: object, **geometry: object) -> None:
    """Python types only (the entry point's part): conv_proj's, plus BatchNorm affine tensors and eps."""
    check_conv_proj_arguments(x, weights, (None, None, None), has_cls, **geometry)
    for prefix, tensors in (("bn_weight", gammas), ("bn_bias", betas)):
        for branch, t in zip("qkv", tensors):
            if not isinstance(t, Tensor):
                raise TypeError(f"{prefix}_{branch} must be a torch.Tensor (C,), got {type(t).__name__}")
    if not isinstance(eps, (list, tuple)) or len(eps) != 3:
        raise TypeError(f"eps must be a sequence of three floats (q, k, v), got {eps!r}")
    for branch, e in zip("qkv", eps):
        if isinstance(e, bool) or not isinstance(e, (int, float)):
            raise TypeError(f"eps of {branch} must be a Python float, got {e!r}")


def check_conv_proj_bn(x: Tensor, weights: tuple, gammas: tuple, betas: tuple, height: int, width: int,
                       has_cls: bool, stride_q: int, stride_kv: int, padding_q: int, padding_kv: int,
                       eps: "list[float]", contiguous_last_dim: bool = True) -> None:
    """conv_proj's checks (no conv bias; contiguous_last_dim as there), plus: BatchNorm weights and
    biases (C,), one floating dtype for all six, on x's device; eps three finite floats >= 0
    (nn.BatchNorm2d takes 0 too); more than one grid value per channel in every output, as
    BatchNorm2d requires in training."""
    check_conv_proj(x, weights, (None, None, None), height, width, has_cls, stride_q, stride_kv, padding_q,
                    padding_kv, contiguous_last_dim)
    channels = x.shape[2]
    named = {}
    for prefix, tensors in (("bn_weight", gammas), ("bn_bias", betas)):
        for branch, t in zip("qkv", tensors):
            name = f"{prefix}_{branch}"
            _check_tensor(name, t, 1, "(C,)")
            if t.shape[0] != channels:
                raise ValueError(f"{name} must have shape ({channels},), got {tuple(t.shape)}")
            named[name] = t
    _check_same("BatchNorm weight and bias dtypes", tuple(named), tuple(t.dtype for t in named.values()))
    _check_same("devices", ("x",) + tuple(named), (x.device,) + tuple(t.device for t in named.values()))
    if len(eps) != 3:
        raise ValueError(f"eps must hold three values (q, k, v), got {len(eps)}")
    for branch, e in zip("qkv", eps):
        if not math.isfinite(e) or e < 0:
            raise ValueError(f"eps of {branch} must be finite and >= 0, got {e!r}")
    shapes = conv_proj_output_shapes(x, weights, height, width, has_cls, stride_q, stride_kv, padding_q, padding_kv)
    for branch, shape in zip("qkv", shapes):
        values = shape[0] * (shape[1] - int(has_cls))
        if values <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {values} for {branch} "
                             f"(batch {shape[0]} x {shape[1] - int(has_cls)} grid rows): BatchNorm's batch "
                             "statistics need at least two")


def conv_proj_bn_stats_shape(x: Tensor) -> tuple:
    """(3, C): one row per branch q, k, v, of the batch mean and of the biased batch variance."""
    return (3, x.shape[2])


def check_conv_proj_bn_backward(grads: tuple, x: Tensor, weights: tuple, gammas: tuple, betas: tuple,
                                outputs: tuple, mean: Tensor, var: Tensor, height: int, width: int, has_cls: bool,
                                stride_q: int, stride_kv: int, padding_q: int, padding_kv: int,
                                eps: "list[float]") -> None:
    """The forward's checks (x in any strides, SAVED_LAYOUT), plus grad_q/k/v and the forward's outputs
    q/k/v shaped like the outputs in x's dtype, and its statistics mean/var (3, C) in stats_dtype(x.dtype)."""
    geometry = (height, width, has_cls, stride_q, stride_kv, padding_q, padding_kv)
    check_conv_proj_bn(x, weights, gammas, betas, *geometry, eps, contiguous_last_dim=False)
    shapes = conv_proj_output_shapes(x, weights, *geometry)
    for prefix, tensors in (("grad_", grads), ("", outputs)):
        for branch, t, shape in zip("qkv", tensors, shapes):
            _check_like(f"{prefix}{branch}", t, shape, x, "x")
    expected = (conv_proj_bn_stats_shape(x), stats_dtype(x.dtype))
    for name, t in (("mean", mean), ("var", var)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor {expected[0]}, got {type(t).__name__}")
        if (tuple(t.shape), t.dtype) != expected:
            raise ValueError(f"{name} must be the forward's {expected[0]} {expected[1]} statistics, "
                             f"got shape {tuple(t.shape)} and dtype {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; they must share one device")
