# Triton kernels of the residual add + drop-path + LayerNorm (`residual_layer_norm`), forward and backward.
#
# What it computes. x, branch: (M, C) rows of the residual stream and of a block's branch (the
# attention's or the MLP's output, optionally without its Linear's bias), sample b owning rows
# [b * R, (b + 1) * R). Forward:
#   out    = x + scale[b] * (branch + branch_bias)        stored in x's dtype (the residual stream)
#   normed = (out - mean) * rstd * weight + bias          LayerNorm of the STORED out, eps inside rstd
# with mean and rstd = 1 / sqrt(var + eps) per row kept for the backward. Backward, from grad_out
# (the residual stream's gradient) and grad_normed:
#   grad_x      = grad_out + rstd * (g - mean_C(g) - xhat * mean_C(g * xhat)),  g = grad_normed * weight
#   grad_branch = scale[b] * grad_x (not written without a scale: it is grad_x)
#   grad_weight = sum_rows(grad_normed * xhat), grad_bias = sum_rows(grad_normed),
#   grad_branch_bias = sum_rows(grad_branch).
# Arithmetic in fp32 (fp64 for fp64 inputs, for gradcheck): widened after each load, rounded at
# the store; the LayerNorm reads `out` after its rounding, as the unfused model normalises what
# it stored.
#
# Tiling. A row (C <= a few thousand channels) fits in registers: one program owns BLOCK_M whole
# rows (BLOCK_C = C rounded up to a power of two), so the row statistics are register reductions
# and every tensor is read or written exactly once. The backward program walks ROWS_PER_PROGRAM
# rows BLOCK_M at a time and keeps the column sums of its rows (weight, bias and branch-bias
# gradients) in [BLOCK_C] fp32 registers, written to a small (3, programs, C) buffer that torch
# sums (deterministic, no atomics).
#
# Bandwidth floor (memory bound). Per element, forward: read x and branch, write out and normed
# (8 bytes in bf16); backward: read grad_out, grad_normed and out, write grad_x (and grad_branch
# under drop path): 8 to 10 bytes. CvT-13 at 224, B=256, bf16: the 13 blocks' residual streams
# hold 256 * 1.26M elements, so each of the 26 fused residual steps moves on average 0.1 GB
# forward, about 30 us at 3.35 TB/s (H100 SXM).
import torch
import triton
import triton.language as tl

from . import _launch as launch, supported

# Triton decides at decoration time whether kernels are interpreted.
_INTERPRET = launch.interpreter_on()

# Elements per register tile: forward holds about three live [BLOCK_M, BLOCK_C] tiles, backward
# about six, so the backward tile is half as large (4 warps: 32 and 16 fp32 values per thread and
# tile). BLOCK_M follows from the row width: 64 rows at C = 64, 8 at C = 384 (forward).
_TILE_ELEMENTS_FWD = 4096
_TILE_ELEMENTS_BWD = 2048
_NUM_WARPS = 4
# Backward row groups: enough programs to fill an H100 (132 SMs) several times over, few enough
# that the partial-sum buffer stays small. Powers of two, so few kernel variants compile.
_TARGET_PROGRAMS = 1024
_MAX_ROWS_PER_PROGRAM = 1024


@triton.jit
def _residual_layer_norm_fwd_kernel(x_ptr, branch_ptr, branch_bias_ptr, scale_ptr, weight_ptr, bias_ptr,
                                    out_ptr, normed_ptr, mean_ptr, rstd_ptr, M, C, ROWS_PER_SAMPLE, eps,
                                    HAS_BRANCH_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
                                    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    row_mask = rows < M
    col_mask = cols < C
    mask = row_mask[:, None] & col_mask[None, :]
    offsets = rows.to(tl.int64)[:, None] * C + cols[None, :]
    # -- residual add: out = x + scale * (branch + branch_bias) ----
    update = tl.load(branch_ptr + offsets, mask=mask, other=0.0).to(ACC)
    if HAS_BRANCH_BIAS:
        update += tl.load(branch_bias_ptr + cols, mask=col_mask, other=0.0).to(ACC)[None, :]
    if HAS_SCALE:
        scale = tl.load(scale_ptr + rows // ROWS_PER_SAMPLE, mask=row_mask, other=0.0).to(ACC)
        update = update * scale[:, None]
    out = (tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC) + update).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offsets, out, mask=mask)
    # -- LayerNorm of the stored residual stream ----
    stored = tl.where(mask, out.to(ACC), 0.0)
    mean = tl.sum(stored, axis=1) / C
    centred = tl.where(mask, stored - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / C + eps)
    weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(ACC)
    bias = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(ACC)
    normed = centred * rstd[:, None] * weight[None, :] + bias[None, :]
    tl.store(normed_ptr + offsets, normed.to(normed_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=row_mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit
def _residual_layer_norm_bwd_kernel(grad_out_ptr, grad_normed_ptr, out_ptr, mean_ptr, rstd_ptr, scale_ptr,
                                    weight_ptr, grad_x_ptr, grad_branch_ptr, partial_ptr,
                                    M, C, ROWS_PER_SAMPLE, PROGRAMS,
                                    HAS_SCALE: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr, BLOCK_M: tl.constexpr,
                                    BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    group = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    col_mask = cols < C
    weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(ACC)
    weight_grad = tl.zeros([BLOCK_C], ACC)
    bias_grad = tl.zeros([BLOCK_C], ACC)
    branch_bias_grad = tl.zeros([BLOCK_C], ACC)
    for start in range(0, ROWS_PER_PROGRAM, BLOCK_M):
        rows = group * ROWS_PER_PROGRAM + start + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        mask = row_mask[:, None] & col_mask[None, :]
        offsets = rows.to(tl.int64)[:, None] * C + cols[None, :]
        mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0).to(ACC)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0).to(ACC)
        xhat = (tl.load(out_ptr + offsets, mask=mask, other=0.0).to(ACC) - mean[:, None]) * rstd[:, None]
        xhat = tl.where(mask, xhat, 0.0)
        grad_normed = tl.load(grad_normed_ptr + offsets, mask=mask, other=0.0).to(ACC)
        # -- LayerNorm's input gradient, plus the residual stream's own ----
        g = grad_normed * weight[None, :]
        mean_g = tl.sum(g, axis=1) / C
        mean_g_xhat = tl.sum(g * xhat, axis=1) / C
        grad_x = (tl.load(grad_out_ptr + offsets, mask=mask, other=0.0).to(ACC)
                  + rstd[:, None] * (g - mean_g[:, None] - xhat * mean_g_xhat[:, None]))
        tl.store(grad_x_ptr + offsets, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)
        grad_branch = grad_x
        if HAS_SCALE:
            scale = tl.load(scale_ptr + rows // ROWS_PER_SAMPLE, mask=row_mask, other=0.0).to(ACC)
            grad_branch = grad_x * scale[:, None]
            tl.store(grad_branch_ptr + offsets, grad_branch.to(grad_branch_ptr.dtype.element_ty), mask=mask)
        # -- column sums: LayerNorm's weight and bias, the branch's bias ----
        weight_grad += tl.sum(grad_normed * xhat, axis=0)
        bias_grad += tl.sum(grad_normed, axis=0)
        branch_bias_grad += tl.sum(tl.where(mask, grad_branch, 0.0), axis=0)
    tl.store(partial_ptr + group * C + cols, weight_grad, mask=col_mask)
    tl.store(partial_ptr + (PROGRAMS + group) * C + cols, bias_grad, mask=col_mask)
    tl.store(partial_ptr + (2 * PROGRAMS + group) * C + cols, branch_bias_grad, mask=col_mask)


# --------------------------------------------------------------------------------------------
# Launchers (the checks of the public entry, cvt_fast.ops.residual_layer_norm, are not repeated)
# --------------------------------------------------------------------------------------------

def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1, t.shape[-1])


def _block_shape(channels: int, tile_elements: int) -> tuple:
    block_c = triton.next_power_of_2(channels)
    return max(1, tile_elements // block_c), block_c


def _check(x: torch.Tensor) -> None:
    if x.dtype not in supported.DTYPES:
        raise TypeError(f"x dtype {x.dtype} is not supported; expected one of {supported.DTYPES}")
    launch.check_device(x, _INTERPRET, "the Triton residual_layer_norm kernels")


def _rows_per_sample(x: torch.Tensor) -> int:
    return max(1, x.numel() // max(1, x.shape[0] * x.shape[-1]))


def residual_layer_norm_forward(x, branch, branch_bias, scale, weight, bias, eps: float):
    """(out, normed, mean, rstd); see the file header."""
    _check(x)
    x2, branch2 = _rows(x), _rows(branch.to(x.dtype))
    rows, channels = x2.shape
    acc = launch.acc_dtype(x.dtype)
    out, normed = torch.empty_like(x2), torch.empty_like(x2)
    mean = torch.empty(rows, dtype=acc, device=x.device)
    rstd = torch.empty(rows, dtype=acc, device=x.device)
    if rows > 0:
        block_m, block_c = _block_shape(channels, _TILE_ELEMENTS_FWD)
        with launch.device_guard(x2):
            _residual_layer_norm_fwd_kernel[(triton.cdiv(rows, block_m),)](
                x2, branch2, x2 if branch_bias is None else branch_bias.contiguous(),
                x2 if scale is None else scale.contiguous(), weight.contiguous(), bias.contiguous(),
                out, normed, mean, rstd, rows, channels, _rows_per_sample(x), eps,
                HAS_BRANCH_BIAS=branch_bias is not None, HAS_SCALE=scale is not None,
                BLOCK_M=block_m, BLOCK_C=block_c, ACC=launch.tl_acc_dtype(x.dtype), num_warps=_NUM_WARPS)
    stats_shape = x.shape[:-1]
    return out.view(x.shape), normed.view(x.shape), mean.view(stats_shape), rstd.view(stats_shape)


def residual_layer_norm_backward(grad_out, grad_normed, out, mean, rstd, scale, weight):
    """(grad_x, grad_branch or empty, grad_branch_bias, grad_weight, grad_bias); see the file header."""
    _check(out)
    out2 = _rows(out)
    grad_out2, grad_normed2 = _rows(grad_out.to(out.dtype)), _rows(grad_normed.to(out.dtype))
    rows, channels = out2.shape
    acc = launch.acc_dtype(out.dtype)
    grad_x = torch.empty_like(out2)
    grad_branch = torch.empty_like(out2) if scale is not None else out2.new_empty((0,))
    block_m, block_c = _block_shape(channels, _TILE_ELEMENTS_BWD)
    rows_per_program = max(block_m, min(_MAX_ROWS_PER_PROGRAM,
                                        triton.next_power_of_2(triton.cdiv(max(rows, 1), _TARGET_PROGRAMS))))
    programs = triton.cdiv(rows, rows_per_program)
    partial = torch.zeros((3, programs, channels), dtype=acc, device=out.device)
    if rows > 0:
        with launch.device_guard(out2):
            _residual_layer_norm_bwd_kernel[(programs,)](
                grad_out2, grad_normed2, out2, mean.contiguous().view(-1), rstd.contiguous().view(-1),
                out2 if scale is None else scale.contiguous(), weight.contiguous(), grad_x,
                grad_branch if scale is not None else out2, partial,
                rows, channels, _rows_per_sample(out), programs,
                HAS_SCALE=scale is not None, ROWS_PER_PROGRAM=rows_per_program, BLOCK_M=block_m, BLOCK_C=block_c,
                ACC=launch.tl_acc_dtype(out.dtype), num_warps=_NUM_WARPS)
    # Three separate sums: outputs of a custom op may not be views of one another.
    weight_grad, bias_grad, branch_bias_grad = (partial[i].sum(0) for i in range(3))
    return (grad_x.view(out.shape), grad_branch.view(out.shape) if scale is not None else grad_branch,
            branch_bias_grad, weight_grad.to(weight.dtype), bias_grad.to(weight.dtype))
