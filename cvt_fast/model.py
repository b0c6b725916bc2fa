"""CvT: Convolutional vision Transformer (Wu et al. 2021, arXiv 2103.15808).

The modules follow the official implementation one to one (same names, same
state-dict keys, same numerics), in the order of the paper's figure:
ConvEmbed -> [Block: norm1 -> Attention (conv projection, multi-head attention) ->
norm2 -> Mlp] x depth, per stage; final LayerNorm on the cls token -> head.

Each attention module runs on one of two paths:
- backend 'official': plain eager PyTorch, op for op like the official code
  (rearrange to NCHW, depthwise Conv2d, BatchNorm2d, einsum-softmax-einsum);
- any other backend: the conv projection and the attention go through the fused ops
  of `cvt_fast.ops` (the model does not know which implementation answers); the MLP runs
  as two fused products with the activation in their epilogues, keeping only fc1's output
  for the backward (`cvt_fast.lean_mlp`); each residual add, its drop path and the LayerNorm
  after it are one op (`cvt_fast.ops.residual_layer_norm`; the second add of a block feeds
  the next block's norm1, so Stage chains the blocks); and the other LayerNorms keep 16-bit
  inputs rather than their float32 copies (`cvt_fast.lean_layer_norm`).
Both paths use the same parameters and buffers, so checkpoints are interchangeable.

The classifier follows timm's conventions (forward_features -> unpooled normalised tokens,
forward_head -> pooling by global_pool and the head), and the stage outputs are a backbone's
feature maps (feature_info, forward_intermediates, prune_intermediate_layers).
"""
from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from cvt_fast.batch_norm_fold import FoldedBatchNormCache, conv_dtype
from cvt_fast.lean_layer_norm import SIXTEEN_BIT, layer_norm_16bit
from cvt_fast.lean_mlp import lean_mlp, quick_gelu
from cvt_fast.ops.backend import auto_cpu_path
from cvt_fast.ops.backends import BACKENDS, TABLE
from cvt_fast.specs import get_spec, normalize_spec  # noqa: F401  (normalize_spec: re-exported, it lived here)

ACTIVATIONS = ("quick_gelu", "gelu")
# 'official' is the model's own eager path; the others choose the fused ops' backend.
MODEL_BACKENDS = ("official",) + BACKENDS

def standard_ops_only() -> bool:
    """True while torch.jit.trace or torch.onnx.export (either exporter) records the model. They know
    only standard operators (no cvt_fast custom ops, no autograd Functions, sizes traced as tensors),
    so the model then takes its official path: the same parameters and function, in plain aten ops.
    torch.export and torch.compile keep the fused ops (export.py lowers them itself for ONNX)."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def module_path(backend: str | None, family: str, x: torch.Tensor) -> str | None:
    """The path of op family `family` ('attention', 'conv_proj', 'mlp', 'residual_layer_norm') in a
    module whose backend is `backend`: on the CPU, where that resolves to 'auto', the path measured
    fastest there ('official', 'reference' or 'sdpa': cvt_fast.ops.backend.cpu_path); else `backend`
    itself (None: the ops resolve it)."""
    if isinstance(x, torch.fx.Proxy):
        return backend
    path = auto_cpu_path(family, backend, x.device.type, torch.is_grad_enabled())
    return backend if path is None else path


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation of the official CvT MLP."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quick_gelu(x)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in (at least) float32 whatever the input dtype, as the official code does."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # Off on the 'official' backend; on the others a 16-bit input is kept for the backward
        # instead of its float32 copy (lean_layer_norm.py; same numbers, half the bytes).
        self.keep_16bit_input = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.keep_16bit_input and x.dtype in SIXTEEN_BIT and torch.is_grad_enabled()
                and not standard_ops_only()):
            return layer_norm_16bit(x, self.weight, self.bias, self.eps)
        compute = torch.promote_types(x.dtype, torch.float32)  # float64 stays float64
        # The parameters are widened too: a 16-bit model (model.to(torch.bfloat16)) keeps 16-bit ones,
        # which the float32 LayerNorm kernel refuses. For float32 parameters .to() is the tensor itself.
        weight = None if self.weight is None else self.weight.to(compute)
        bias = None if self.bias is None else self.bias.to(compute)
        return F.layer_norm(x.to(compute), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def sample_scale(self, x: torch.Tensor) -> torch.Tensor | None:
        """The per-sample factors (B,) float32 that forward() multiplies x by (0 or 1 / keep), drawn
        from the same random numbers as forward() would; None when it is the identity."""
        if self.rate == 0.0 or not self.training:
            return None
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return mask.reshape(-1).to(torch.float32) / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str, drop: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act_name = act
        self.act = QuickGELU() if act == "quick_gelu" else nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)
        # Off on the 'official' backend (the official code's ops, and autograd keeps what the
        # official code keeps); on the others the activation runs in fc1's product's epilogue and
        # the backward recomputes it in fc2's input-gradient product's epilogue (lean_mlp.py).
        self.recompute_activation = True
        self.backend: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x, leave_output_bias=False)[0]

    def forward_without_output_bias(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(out, bias): the MLP's output is out + bias. On the fused path fc2's bias is left to the
        caller (the residual step adds it in its own pass) and returned; else it is in out, bias None."""
        return self._forward(x, leave_output_bias=True)

    def _forward(self, x: torch.Tensor, leave_output_bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        # The lean step has no dropout between the activation and fc2: used when that dropout is off.
        backend = module_path(self.backend, "mlp", x)
        if (self.recompute_activation and backend != "official" and (self.drop.p == 0.0 or not self.training)
                and not standard_ops_only()):
            out = lean_mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight,
                           None if leave_output_bias else self.fc2.bias, self.act_name, backend=backend)
            return out, self.fc2.bias if leave_output_bias else None
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x))))), None


class ConvEmbed(nn.Module):
    """Overlapping patch embedding: strided Conv2d, then LayerNorm over channels."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, stride: int, padding: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=stride, padding=padding)
        self.norm = LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """(B, C_in, H, W) image or feature map -> (B, H' * W', C) tokens, H', W'."""
        x = self.proj(x)
        height, width = x.shape[-2], x.shape[-1]  # indexed, not unpacked: fx traces indexing
        return self.norm(x.flatten(2).transpose(1, 2)), height, width


def _tokens_to_grid(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], height, width)


def _grid_to_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head attention with convolutional projections of q, k and v."""

    def __init__(self, dim_in: int, dim_out: int, num_heads: int, qkv_bias: bool,
                 attn_drop: float, proj_drop: float, method: str, kernel_size: int,
                 stride_kv: int, stride_q: int, padding_kv: int, padding_q: int,
                 with_cls_token: bool):
        super().__init__()
        self.num_heads = num_heads
        self.dim = dim_out
        # The official code scales by the whole width, not the head width.
        self.scale = dim_out ** -0.5
        self.with_cls_token = with_cls_token
        self.method = method
        self.stride_q, self.stride_kv = stride_q, stride_kv
        self.padding_q, self.padding_kv = padding_q, padding_kv
        self.backend: str | None = None
        # 'avg' pools k and v only; q stays the plain tokens (official behaviour).
        self.conv_proj_q = self._projection(dim_in, kernel_size, padding_q, stride_q,
                                            "linear" if method == "avg" else method)
        self.conv_proj_k = self._projection(dim_in, kernel_size, padding_kv, stride_kv, method)
        self.conv_proj_v = self._projection(dim_in, kernel_size, padding_kv, stride_kv, method)
        self.proj_q = nn.Linear(dim_in, dim_out, bias=qkv_bias)
        self.proj_k = nn.Linear(dim_in, dim_out, bias=qkv_bias)
        self.proj_v = nn.Linear(dim_in, dim_out, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim_out, dim_out)
        self.proj_drop = nn.Dropout(proj_drop)
        # Eval: conv_proj's weights with BatchNorm folded in, kept until a source tensor changes.
        self._folded_bn = FoldedBatchNormCache()

    @staticmethod
    def _projection(dim: int, kernel_size: int, padding: int, stride: int, method: str):
        if method == "dw_bn":
            return nn.Sequential(OrderedDict([
                ("conv", nn.Conv2d(dim, dim, kernel_size, stride=stride, padding=padding,
                                   bias=False, groups=dim)),
                ("bn", nn.BatchNorm2d(dim)),
            ]))
        if method == "avg":
            return nn.Sequential(OrderedDict([
                ("avg", nn.AvgPool2d(kernel_size, stride=stride, padding=padding, ceil_mode=True)),
            ]))
        return None

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        if standard_ops_only():
            return self._attend_official(*self._project_official(x, height, width))
        projection, attention = module_path(self.backend, "conv_proj", x), module_path(self.backend, "attention", x)
        q, k, v = (self._project_official(x, height, width) if projection == "official"
                   else self._project_fused(x, height, width, projection))
        return self._attend_official(q, k, v) if attention == "official" else self._attend_fused(q, k, v, attention)

    # -- the official path ---------------------------------------------------------
    def _project_official(self, x, height, width):
        cls_token = None
        if self.with_cls_token:
            cls_token, x = torch.split(x, [1, height * width], dim=1)
        grid = _tokens_to_grid(x, height, width)
        outs = []
        for proj in (self.conv_proj_q, self.conv_proj_k, self.conv_proj_v):
            t = _grid_to_tokens(proj(grid)) if proj is not None else x
            outs.append(torch.cat((cls_token, t), dim=1) if cls_token is not None else t)
        return outs

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(t.shape[0], t.shape[1], self.num_heads, -1).transpose(1, 2)

    def _attend_official(self, q, k, v):
        q = self._split_heads(self.proj_q(q))
        k = self._split_heads(self.proj_k(k))
        v = self._split_heads(self.proj_v(v))
        score = torch.einsum("bhlk,bhtk->bhlt", q, k) * self.scale
        attn = self.attn_drop(F.softmax(score, dim=-1))
        out = torch.einsum("bhlt,bhtv->bhlv", attn, v)
        out = out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)
        return self.proj_drop(self.proj(out))

    # -- the fused path ------------------------------------------------------------
    def _project_fused(self, x, height, width, backend=None):
        # backend None: the module's (bench/conv_proj.py calls this path directly).
        backend = _conv_backend(self.backend if backend is None else backend)
        if self.method != "dw_bn":
            return self._project_official(x, height, width)
        from cvt_fast import ops

        convs = (self.conv_proj_q, self.conv_proj_k, self.conv_proj_v)
        has_cls = self.with_cls_token
        batch_statistics = _uses_batch_statistics([c.bn for c in convs])
        if batch_statistics is None:
            # One op serves the three branches; BatchNorms in different modes take the modules'
            # own path (rare: a partly frozen model), which is nn.BatchNorm2d by construction.
            return self._project_official(x, height, width)
        if batch_statistics:
            # Batch statistics come from the convolution outputs: the op computes them and
            # normalises the grid rows (cls rows never), and the running statistics are
            # updated here, as nn.BatchNorm2d updates them.
            return _conv_proj_batch_norm(x, convs, height, width, has_cls, self.stride_q, self.stride_kv,
                                         self.padding_q, self.padding_kv, backend)
        # Eval: BatchNorm is an affine map per channel, folded into the convolution (once per
        # weight state: cvt_fast/batch_norm_fold.py).
        wq, wk, wv, bq, bk, bv = self._folded_bn.get(convs, conv_dtype(x))
        return ops.conv_proj(x, wq, wk, wv, height, width, has_cls, self.stride_q, self.stride_kv,
                             self.padding_q, self.padding_kv, bq, bk, bv, backend=backend)

    def _attend_fused(self, q, k, v, backend=None):
        if self.attn_drop.p > 0 and self.training:
            # Dropout on the attention matrix needs the matrix: no fused kernel does that.
            return self._attend_official(q, k, v)
        from cvt_fast import ops

        batch = q.shape[0]
        q = self.proj_q(q).view(batch, q.shape[1], self.num_heads, -1)
        k = self.proj_k(k).view(batch, k.shape[1], self.num_heads, -1)
        v = self.proj_v(v).view(batch, v.shape[1], self.num_heads, -1)
        out = ops.attention(q, k, v, self.scale, backend=self.backend if backend is None else backend)
        return self.proj_drop(self.proj(out))


def _conv_backend(backend: str | None) -> str | None:
    # An attention-only backend (sdpa, xformers) leaves the projection to the default.
    return None if backend in TABLE and TABLE[backend].attention_only else backend


def _uses_batch_statistics(batch_norms: list[nn.BatchNorm2d]) -> bool | None:
    """Whether the q, k, v BatchNorms normalise with batch statistics (training mode, or no running
    statistics kept), as nn.BatchNorm2d decides; None when they disagree (one frozen, say)."""
    modes = {bn.training or bn.running_mean is None for bn in batch_norms}
    return modes.pop() if len(modes) == 1 else None


def _conv_proj_batch_norm(x: torch.Tensor, convs: tuple, height: int, width: int, has_cls: bool, stride_q: int,
                          stride_kv: int, padding_q: int, padding_kv: int, backend: str | None) -> list[torch.Tensor]:
    """Each of `convs` (depthwise Conv2d -> BatchNorm2d) on the token grid, with nn.BatchNorm2d's
    training semantics: batch statistics over the grid rows (cls rows pass through), running
    statistics and the batch counter updated in place."""
    from cvt_fast import ops

    bns = [c.bn for c in convs]
    channels = x.shape[-1]
    # affine=False BatchNorms normalise only: the identity affine map.
    gammas = [bn.weight if bn.weight is not None else x.new_ones(channels, dtype=torch.float32) for bn in bns]
    betas = [bn.bias if bn.bias is not None else x.new_zeros(channels, dtype=torch.float32) for bn in bns]
    *outputs, mean, var = ops.conv_proj_bn(x, *(c.conv.weight for c in convs), *gammas, *betas, height, width,
                                           has_cls, stride_q, stride_kv, padding_q, padding_kv,
                                           eps=[bn.eps for bn in bns], backend=backend)
    with torch.no_grad():
        for bn, out, batch_mean, batch_var in zip(bns, outputs, mean.unbind(0), var.unbind(0)):
            _update_running_statistics(bn, batch_mean, batch_var, out.shape[0] * (out.shape[1] - int(has_cls)))
    return outputs


def _update_running_statistics(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
    """What nn.BatchNorm2d does to its buffers in training: count the batch, then move the running
    mean and the running (unbiased) variance towards the batch's by `momentum`, or by 1 / batches
    seen (a cumulative average) when momentum is None."""
    if not (bn.training and bn.track_running_stats):
        return
    bn.num_batches_tracked.add_(1)
    momentum = bn.momentum
    if momentum is None:  # a tensor, not float(): no host sync, no graph break under torch.compile
        momentum = bn.num_batches_tracked.to(bn.running_mean.dtype).reciprocal()
    bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), momentum)
    bn.running_var.lerp_((var * (count / (count - 1))).to(bn.running_var.dtype), momentum)


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop: float,
                 attn_drop: float, drop_path: float, act: str, **attn_kwargs: Any):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, dim, num_heads, attn_drop=attn_drop, proj_drop=drop, **attn_kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act, drop)
        # Off on the 'official' backend; on the others each residual add, its drop path and the
        # LayerNorm that follows are one fused pass (cvt_fast.ops.residual_layer_norm).
        self.fuse_residuals = True
        self.backend: str | None = None

    def fused(self, x: torch.Tensor) -> bool:
        """Whether the residual adds and the LayerNorms after them run as one fused op each."""
        return (self.fuse_residuals and module_path(self.backend, "residual_layer_norm", x) != "official"
                and not standard_ops_only())

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        if not self.fused(x):
            x = x + self.drop_path(self.attn(self.norm1(x), height, width))
            return x + self.drop_path(self.mlp(self.norm2(x)))
        return self.forward_chained(x, self.norm1(x), height, width, next_norm=None)[0]

    def forward_chained(self, x: torch.Tensor, normed: torch.Tensor, height: int, width: int,
                        next_norm: "LayerNorm | None") -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fused path: (x, norm1(x)) in, (x', next_norm(x')) out, where x' is this block's output
        and next_norm the following block's norm1 (None for the last block: then None out)."""
        from cvt_fast import ops

        backend = module_path(self.backend, "residual_layer_norm", x)
        branch = self.attn(normed, height, width)
        x, normed = ops.residual_layer_norm(x, branch, self.norm2.weight, self.norm2.bias, self.norm2.eps,
                                            scale=self._drop_path_scale(x), backend=backend)
        if next_norm is None:  # the stage's last block: no LayerNorm follows
            return x + self.drop_path(self.mlp(normed)), None
        branch, branch_bias = self.mlp.forward_without_output_bias(normed)
        return ops.residual_layer_norm(x, branch, next_norm.weight, next_norm.bias, next_norm.eps,
                                       branch_bias=branch_bias, scale=self._drop_path_scale(x),
                                       backend=backend)

    def _drop_path_scale(self, x: torch.Tensor) -> torch.Tensor | None:
        return self.drop_path.sample_scale(x) if isinstance(self.drop_path, DropPath) else None


class Blocks(nn.ModuleList):
    """A stage's blocks, run in order (a ModuleList, so the keys stay `blocks.{j}.*`).

    One module for the whole stack because the fused path chains the blocks: each residual add is
    fused with the LayerNorm after it, which for the second add of a block is the next block's
    norm1. timm's fx tracer keeps this module a leaf (cvt_fast/timm_models.py): inside, the ops take
    the grid's height and width as ints, which a symbolic trace cannot give them.
    """

    def __init__(self, blocks: list[Block]):
        super().__init__(blocks)
        # set_grad_checkpointing: recompute each block's forward in the backward instead of keeping its
        # activations (only the block's inputs are kept).
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        blocks = list(self)
        checkpointing = self.grad_checkpointing and torch.is_grad_enabled()
        if blocks and all(b.fused(x) for b in blocks):
            normed = blocks[0].norm1(x)
            for block, following in zip(blocks, blocks[1:] + [None]):
                step = (block.forward_chained, x, normed, height, width,
                        None if following is None else following.norm1)
                x, normed = _checkpoint_block(block, *step) if checkpointing else step[0](*step[1:])
            return x
        for block in blocks:
            x = _checkpoint_block(block, block, x, height, width) if checkpointing else block(x, height, width)
        return x


def _checkpoint_block(block: Block, function, *args):
    """function(*args) under activation checkpointing, with the block's BatchNorm buffers left as the
    first forward leaves them: the recomputation in the backward runs the forward again, and in
    training BatchNorm would update its running statistics (and the batch counter) a second time."""
    from torch.utils.checkpoint import checkpoint

    return checkpoint(function, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _batch_norm_buffers_kept(block)))


@contextlib.contextmanager
def _batch_norm_buffers_kept(module: nn.Module):
    buffers = [b for m in module.modules() if isinstance(m, nn.BatchNorm2d) for b in m.buffers()]
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)


class Stage(nn.Module):
    """One CvT stage (the official code calls it VisionTransformer)."""

    def __init__(self, in_chans: int, stage: Mapping[str, Any], act: str):
        super().__init__()
        dim = stage["DIM_EMBED"]
        self.patch_embed = ConvEmbed(stage["PATCH_SIZE"], in_chans, dim,
                                     stage["PATCH_STRIDE"], stage["PATCH_PADDING"])
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if stage["CLS_TOKEN"] else None
        self.pos_drop = nn.Dropout(stage["DROP_RATE"])
        depth = stage["DEPTH"]
        # Stochastic depth ramps from 0 within each stage.
        rates = [r.item() for r in torch.linspace(0, stage["DROP_PATH_RATE"], depth, device="cpu")]
        self.blocks = Blocks([
            Block(dim, stage["NUM_HEADS"], stage["MLP_RATIO"], stage["DROP_RATE"],
                  stage["ATTN_DROP_RATE"], rates[j], act,
                  qkv_bias=stage["QKV_BIAS"], method=stage["QKV_PROJ_METHOD"],
                  kernel_size=stage["KERNEL_QKV"], stride_kv=stage["STRIDE_KV"],
                  stride_q=stage["STRIDE_Q"], padding_kv=stage["PADDING_KV"],
                  padding_q=stage["PADDING_Q"], with_cls_token=stage["CLS_TOKEN"])
            for j in range(depth)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, C_in, H, W) -> ((B, C, H', W') feature map, (B, 1, C) cls token or None)."""
        x, height, width = self.forward_tokens(x)
        cls_token = None
        if self.cls_token is not None:
            # split, not two slices: its backward is one concatenation, where each slice's would
            # write a zero-filled copy of the whole stream
            cls_token, x = torch.split(x, [1, height * width], dim=1)
        return _tokens_to_grid(x, height, width), cls_token

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """(B, C_in, H, W) -> (B, [1 +] H' * W', C) tokens (the cls token first, when the stage has one), H', W'."""
        x, height, width = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x), dim=1)
        return self.blocks(self.pos_drop(x), height, width), height, width


class ConvolutionalVisionTransformer(nn.Module):
    """CvT classifier. Build it with `build_model(spec)` or `create_model(name)`."""

    def __init__(self, spec: Mapping[str, Any], num_classes: int = 1000, act: str = "quick_gelu",
                 backend: str | None = None, in_chans: int = 3, global_pool: str | None = None):
        super().__init__()
        stages = normalize_spec(spec)
        _check_num_classes(num_classes)
        if act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
        self.spec = {k: v for k, v in dict(spec).items()}
        self.act = act
        self.in_chans = in_chans
        self.num_stages = len(stages)
        chans, reduction = in_chans, 1
        # timm's feature_info: one entry per stage output (its grid, NCHW).
        self.feature_info: list[dict[str, Any]] = []
        for i, stage in enumerate(stages):
            setattr(self, f"stage{i}", Stage(chans, stage, act))
            chans = stage["DIM_EMBED"]
            reduction *= stage["PATCH_STRIDE"]
            self.feature_info.append(dict(num_chs=chans, reduction=reduction, module=f"stage{i}"))
        self.num_features = self.head_hidden_size = chans
        self.norm = LayerNorm(chans)
        self.use_cls_token = stages[-1]["CLS_TOKEN"]
        # The tokens in front of the grid in forward_features' output (timm's name): the cls token.
        self.num_prefix_tokens = 1 if self.use_cls_token else 0
        self.global_pool = self._check_global_pool(global_pool)
        self.num_classes = num_classes
        self.head = nn.Linear(chans, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights(self.spec.get("INIT", "trunc_norm"))
        self.set_backend(backend)

    def _init_weights(self, init: str) -> None:
        if init not in ("trunc_norm", "xavier"):
            raise ValueError(f"MODEL.SPEC.INIT must be 'trunc_norm' or 'xavier', got {init!r}")
        for m in self.modules():
            if isinstance(m, nn.Linear):
                if init == "trunc_norm":
                    nn.init.trunc_normal_(m.weight, std=0.02)
                else:
                    nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for i in range(self.num_stages):
            stage = getattr(self, f"stage{i}")
            if stage.cls_token is not None:
                nn.init.trunc_normal_(stage.cls_token, std=0.02)

    @property
    def stages(self) -> list[Stage]:
        return [getattr(self, f"stage{i}") for i in range(self.num_stages)]

    def set_backend(self, backend: str | None) -> "ConvolutionalVisionTransformer":
        """Choose the implementation of conv projection and attention for this model.

        None defers to `cvt_fast.set_backend` / CVT_FAST_BACKEND / 'auto' at each call.
        """
        if backend is not None and backend not in MODEL_BACKENDS:
            raise ValueError(f"backend must be one of {MODEL_BACKENDS} or None, got {backend!r}")
        self.backend = backend
        for m in self.modules():
            if isinstance(m, Attention):
                m.backend = backend
            elif isinstance(m, Mlp):
                m.recompute_activation = backend != "official"
                m.backend = backend
            elif isinstance(m, Block):
                m.fuse_residuals = backend != "official"
                m.backend = backend
            elif isinstance(m, LayerNorm):
                m.keep_16bit_input = backend != "official"
        return self

    def no_weight_decay(self) -> set[str]:
        """Parameter names that the official recipe excludes from weight decay by name."""
        return {f"stage{i}.cls_token" for i, s in enumerate(self.stages) if s.cls_token is not None}

    # -- timm's model conventions: classifier, pooling, parameter groups, checkpointing ------------
    def _check_global_pool(self, global_pool: str | None) -> str:
        """None -> the official pooling: the cls token when the last stage has one, else the token mean."""
        if global_pool is None:
            return "token" if self.use_cls_token else "avg"
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {GLOBAL_POOLS} or None, got {global_pool!r}")
        if global_pool == "token" and not self.use_cls_token:
            raise ValueError("global_pool='token' needs a cls token in the last stage (MODEL.SPEC.CLS_TOKEN); "
                             "this model has none: use 'avg'")
        return global_pool

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a freshly initialised one for `num_classes` classes (0: none, forward
        returns the pooled features); global_pool, when given, changes the pooling too ('' none)."""
        _check_num_classes(num_classes)
        if global_pool is not None:
            self.global_pool = self._check_global_pool(global_pool)
        self.num_classes = num_classes
        like = self.stage0.patch_embed.proj.weight  # the new head lives where the model does, in its dtype
        self.head = (nn.Linear(self.num_features, num_classes, device=like.device, dtype=like.dtype)
                     if num_classes > 0 else nn.Identity())
        if num_classes > 0:
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups by depth for timm's layer decay and group freezing: the first patch
        embedding is the stem; then each stage (coarse) or each block (fine) in the order the image
        goes through them, a stage's patch embedding and cls token before its blocks, the final
        LayerNorm last. The head is left out (timm puts unmatched parameters in the last group)."""
        if coarse:
            return dict(stem=r"^stage0\.patch_embed", blocks=[(r"^stage(\d+)", None), (r"^norm", (99999,))])
        return dict(stem=r"^stage0\.patch_embed", blocks=[
            (r"^stage(\d+)\.(?:patch_embed|cls_token)", (0,)),  # (stage, 0): before the stage's blocks
            (r"^stage(\d+)\.blocks\.(\d+)", (1,)),                 # (stage, block, 1)
            (r"^norm", (99999,)),
        ])

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward instead of keeping its activations (training only)."""
        for stage in self.stages:
            stage.blocks.grad_checkpointing = bool(enable)

    @property
    def grad_checkpointing(self) -> bool:
        return any(stage.blocks.grad_checkpointing for stage in self.stages)

    @grad_checkpointing.setter
    def grad_checkpointing(self, enable: bool) -> None:  # some timm code sets the attribute directly
        self.set_grad_checkpointing(enable)

    def _check_input(self, x: torch.Tensor) -> None:
        if isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing():
            # fx traces symbolically (timm's feature extraction): there are no values to check; the
            # TorchScript tracer (jit.trace, ONNX) would record each check as a constant, with a warning.
            return
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"CvT expects a torch.Tensor image batch, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"CvT expects a 4-D image batch (B, {self.in_chans}, H, W), "
                             f"got a {x.dim()}-D tensor of shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"CvT expects {self.in_chans} input channels, got {x.shape[1]} "
                             f"(shape {tuple(x.shape)}); images must be (B, C, H, W)")
        if not x.is_floating_point():
            raise TypeError(f"CvT expects a floating-point image batch, got {x.dtype}; "
                            "convert with x.float() and normalise it first")
        if x.shape[0] == 0:
            raise ValueError(f"CvT got an empty batch (shape {tuple(x.shape)}); pass at least one image")
        weight_dtype = self.stage0.patch_embed.proj.weight.dtype
        if x.dtype != weight_dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"the image batch is {x.dtype} but the model's weights are {weight_dtype}; convert one "
                            f"(x.to({weight_dtype}) or model.to({x.dtype})) or run under torch.autocast")
        size = tuple(x.shape[-2:])
        for stage in self.stages:
            proj = stage.patch_embed.proj
            if min(size) + 2 * proj.padding[0] < proj.kernel_size[0]:
                raise ValueError(f"input of spatial size {tuple(x.shape[-2:])} is too small for "
                                 f"the patch embedding {proj}")
            size = tuple((s + 2 * proj.padding[0] - proj.kernel_size[0]) // proj.stride[0] + 1 for s in size)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, num_prefix_tokens + H' * W', num_features): the last stage's tokens
        (the cls token first, when the model has one) after the final LayerNorm, unpooled (timm's
        convention: forward_head pools)."""
        self._check_input(x)
        *stages, last = self.stages
        for stage in stages:
            x, _ = stage(x)
        # The last stage's tokens as its blocks leave them: no grid, no split and cat back.
        return self.norm(last.forward_tokens(x)[0])

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """forward_features' tokens -> pooled by global_pool ('token': the cls token, as the official
        model classifies; 'avg': the mean of the grid tokens; '': no pooling) -> the head's logits,
        or the pooled features when pre_logits."""
        if self.global_pool == "token":
            x = x[:, 0]  # never squeeze(): batch size 1 must stay 2-D
        elif self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # -- timm's feature API: the stages' outputs as a backbone's feature maps -----------------------
    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | tuple[int, ...] | None = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False, return_prefix_tokens: bool = False):
        """The stage outputs as feature maps, timm's way.

        indices: the stages to return (negative from the end), or an int n for the last n; None: all.
        norm: apply the final LayerNorm to the last stage's output (only that stage has its width).
        stop_early: run no stage after the last one asked for.
        output_fmt: 'NCHW' (B, C, H', W') or 'NHWC' (B, H', W', C).
        return_prefix_tokens: each intermediate is (map, prefix tokens (B, P, C)) with P = 1 for a
        stage with a cls token, 0 otherwise.
        Returns the list of intermediates when intermediates_only, else (forward_features' tokens,
        intermediates); when stop_early left the last stage out, those tokens are the last stage run's,
        without the final LayerNorm (which has the last stage's width).
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(self.num_stages, indices)
        self._check_input(x)
        stages = self.stages[:max_index + 1] if stop_early else self.stages
        intermediates = []
        cls_token = None
        for i, stage in enumerate(stages):
            x, cls_token = stage(x)
            if i not in take_indices:
                continue
            feature, prefix = x, cls_token
            if norm and i == self.num_stages - 1:
                height, width = x.shape[-2], x.shape[-1]
                tokens = self.norm(_with_prefix(cls_token, _grid_to_tokens(x)))
                prefix = tokens[:, :1] if cls_token is not None else None
                feature = _tokens_to_grid(tokens[:, 1:] if cls_token is not None else tokens, height, width)
            if output_fmt == "NHWC":
                feature = feature.permute(0, 2, 3, 1)
            if return_prefix_tokens:
                prefix = prefix if prefix is not None else x.new_zeros(x.shape[0], 0, x.shape[1])
                intermediates.append((feature, prefix))
            else:
                intermediates.append(feature)
        if intermediates_only:
            return intermediates
        tokens = _with_prefix(cls_token, _grid_to_tokens(x))
        return (self.norm(tokens) if len(stages) == self.num_stages else tokens), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] | tuple[int, ...] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Remove the stages after the last of `indices` (and the final LayerNorm with prune_norm, the
        classifier with prune_head), so that a backbone keeps only what its features need; return
        the stage indices. The final LayerNorm goes too when its stage does."""
        take_indices, max_index = feature_take_indices(self.num_stages, indices)
        for i in range(max_index + 1, self.num_stages):
            delattr(self, f"stage{i}")
        if max_index + 1 < self.num_stages:
            self.feature_info = self.feature_info[:max_index + 1]
            self.num_stages = max_index + 1
            prune_norm = True
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def __prepare_scriptable__(self):
        # torch.jit.script calls this first: refuse with the routes that work instead of a compiler
        # error deep inside a custom op.
        raise RuntimeError("CvT cannot be compiled by torch.jit.script (its fused ops are Python custom ops and "
                           "autograd Functions that TorchScript cannot compile); use torch.jit.trace(model.eval(), "
                           "images), torch.export / cvt_fast.export_program, cvt_fast.export_onnx, or torch.compile")


GLOBAL_POOLS = ("token", "avg", "")


def _check_num_classes(num_classes: Any) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be an int >= 0 (0: no classifier, features out), got {num_classes!r}")


def _with_prefix(cls_token: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor:
    return tokens if cls_token is None else torch.cat((cls_token, tokens), dim=1)


def feature_take_indices(num_stages: int, indices: int | list[int] | tuple[int, ...] | None) -> tuple[list[int], int]:
    """timm's index convention for forward_intermediates: None -> all stages, an int n -> the last n,
    a sequence -> those stages (negative counted from the end); returns (sorted indices, the largest)."""
    if indices is None:
        indices = num_stages
    if isinstance(indices, int) and not isinstance(indices, bool):
        if not 0 < indices <= num_stages:
            raise ValueError(f"indices={indices}: the number of last stages to take must be 1..{num_stages}")
        take = list(range(num_stages - indices, num_stages))
    else:
        take = []
        for index in indices:
            if isinstance(index, bool) or not isinstance(index, int) or not -num_stages <= index < num_stages:
                raise ValueError(f"indices={indices!r}: each must be a stage index in "
                                 f"[{-num_stages}, {num_stages - 1}]")
            take.append(index % num_stages)
        take = sorted(set(take))
        if not take:
            raise ValueError("indices is empty: name at least one stage")
    return take, max(take)


def build_model(spec: Mapping[str, Any], num_classes: int = 1000, act: str = "quick_gelu",
                backend: str | None = None, in_chans: int = 3,
                global_pool: str | None = None) -> ConvolutionalVisionTransformer:
    """A CvT from a MODEL.SPEC mapping with the official upper-case keys."""
    return ConvolutionalVisionTransformer(spec, num_classes, act=act, backend=backend, in_chans=in_chans,
                                          global_pool=global_pool)


def create_model(name: str, num_classes: int = 1000, **kwargs: Any) -> ConvolutionalVisionTransformer:
    """A CvT of the paper by name: 'cvt-13', 'cvt-21' or 'cvt-w24'."""
    return build_model(get_spec(name), num_classes, **kwargs)


def build_model_from_config(cfg, backend: str | None = None) -> ConvolutionalVisionTransformer:
    """A CvT from a loaded config (MODEL.SPEC, MODEL.NUM_CLASSES, MODEL.ACT, MODEL.BACKEND)."""
    model_cfg = cfg.MODEL
    chosen = backend or model_cfg.get("BACKEND", "auto")
    return build_model(dict(model_cfg.SPEC), model_cfg.NUM_CLASSES, act=model_cfg.get("ACT", "quick_gelu"),
                       backend=None if chosen == "auto" else chosen)
