# Triton kernels of the MLP's bias + activation (`mlp_activation`), forward and backward.
#
# What it computes. x: (M, N) rows of fc1's output without its bias (N = the hidden width,
# contiguous), bias: optional (N,). Forward: y = act(x + bias), act = QuickGELU
# z * sigmoid(1.702 z) (the official CvT) or exact GELU z * Phi(z) (Hugging Face's port).
# Backward: grad_x = grad * act'(x + bias); grad_bias = the column sums of grad_x (taken in fp32
# before rounding); and, when asked, the activation recomputed, which the lean MLP feeds to fc2's
# weight gradient instead of keeping it from the forward. Arithmetic in fp32 (fp64 for fp64
# inputs, which exist for gradcheck): inputs are widened right after each load, outputs rounded
# at the store.
#
# Tiling. Forward: one program owns a BLOCK_M x BLOCK_N tile (rows x hidden channels), loads it
# and the bias slice once, stores the activation: a pure streaming pass. Backward: one program
# owns BLOCK_N channels of a group of ROWS_PER_PROGRAM rows and walks them BLOCK_M at a time,
# keeping the bias-gradient partial sums of its channels in a [BLOCK_N] fp32 register vector;
# the partials go to a small (row groups, N) fp32 buffer that torch sums (deterministic, no
# atomics). Row groups are sized to leave about _TARGET_PROGRAMS programs in flight.
#
# Bandwidth floor (elementwise: a few FLOPs per element, memory bound). CvT-13 at 224, B=256, bf16:
# the hidden tensors of the 13 blocks hold 256 * 5.03M elements, 2.58 GB. Forward: read x, write
# y: 5.2 GB, about 1.5 ms at 3.35 TB/s (H100 SXM). Backward: read grad and x, write grad_x and the
# activation: 10.3 GB, about 3.1 ms; the partial buffer adds (M / ROWS_PER_PROGRAM) * N * 4 bytes
# (under 1 % of it).
import torch
import triton
import triton.language as tl

from . import _launch as launch, supported

# Triton decides at decoration time whether kernels are interpreted.
_INTERPRET = launch.interpreter_on()
ACTIVATION_CODES = {"quick_gelu": 0, "gelu": 1}

# Tiles of 32 rows x 128 channels with 4 warps: 32 elements per thread, loads of 8 contiguous
# bf16 (16 bytes) per thread along the channels. 128 divides every CvT hidden width (256, 768,
# 1536, 3072, 4096). First choices for a streaming kernel, not measured optima.
_BLOCK_M = 32
_BLOCK_N_MAX = 128
_NUM_WARPS = 4
# float64's backward on 8 warps and 16-row steps: on 4 warps and 32 rows, exact GELU's derivative
# with the recomputed activation spilled up to 2.2 KB for sm_90 (bench/kernels_report.py found it).
_NUM_WARPS_FP64_BACKWARD = 8
_BLOCK_M_FP64_BACKWARD = 16
# Backward row groups: enough programs to fill an H100 (132 SMs) several times over, and few
# enough that the partial-sum buffer stays small. Powers of two, so few kernel variants compile.
_TARGET_PROGRAMS = 1024
_MAX_ROWS_PER_PROGRAM = 1024


@triton.jit
def _activation_and_derivative(z, ACT: tl.constexpr):
    """(act(z), act'(z)) for ACT 0 (QuickGELU, slope 1.702) or 1 (exact GELU: 0.7071... = 1/sqrt(2),
    0.3989... = 1/sqrt(2 pi)), in z's dtype."""
    if ACT == 0:
        s = 1.0 / (1.0 + tl.exp(-1.702 * z))
        return z * s, s + 1.702 * z * s * (1.0 - s)
    else:
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        return z * cdf, cdf + z * pdf


@triton.jit
def _mlp_activation_fwd_kernel(x_ptr, bias_ptr, y_ptr, M, N,
                               HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    mask = (rows < M)[:, None] & col_mask[None, :]
    offsets = rows.to(tl.int64)[:, None] * N + cols[None, :]
    z = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC)
    if HAS_BIAS:
        z += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(ACC)[None, :]
    y, _ = _activation_and_derivative(z, ACT)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mlp_activation_bwd_kernel(grad_ptr, x_ptr, bias_ptr, grad_x_ptr, act_ptr, partial_ptr, M, N,
                               HAS_BIAS: tl.constexpr, WITH_ACTIVATION: tl.constexpr, ACT: tl.constexpr,
                               ROWS_PER_PROGRAM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               ACC: tl.constexpr):
    group = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    bias = tl.zeros([BLOCK_N], ACC)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(ACC)
    bias_grad = tl.zeros([BLOCK_N], ACC)
    for start in range(0, ROWS_PER_PROGRAM, BLOCK_M):
        rows = group * ROWS_PER_PROGRAM + start + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & col_mask[None, :]
        offsets = rows.to(tl.int64)[:, None] * N + cols[None, :]
        z = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC) + bias[None, :]
        grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(ACC)
        # -- recompute the activation, apply its derivative ----
        y, derivative = _activation_and_derivative(z, ACT)
        grad_z = grad * derivative
        tl.store(grad_x_ptr + offsets, grad_z.to(grad_x_ptr.dtype.element_ty), mask=mask)
        if WITH_ACTIVATION:
            tl.store(act_ptr + offsets, y.to(act_ptr.dtype.element_ty), mask=mask)
        bias_grad += tl.sum(tl.where(mask, grad_z, 0.0), axis=0)
    tl.store(partial_ptr + group * N + cols, bias_grad, mask=col_mask)


# --------------------------------------------------------------------------------------------
# Launchers (the checks of the public entry, cvt_fast.ops.mlp_activation, are not repeated)
# --------------------------------------------------------------------------------------------

def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1, t.shape[-1])


def _rows_per_program(rows: int, column_blocks: int) -> int:
    wanted = triton.cdiv(rows * column_blocks, _TARGET_PROGRAMS)
    return max(_BLOCK_M, min(_MAX_ROWS_PER_PROGRAM, triton.next_power_of_2(wanted)))


def _check(x: torch.Tensor, act: str) -> None:
    if x.dtype not in supported.DTYPES:
        raise TypeError(f"x dtype {x.dtype} is not supported; expected one of {supported.DTYPES}")
    if act not in ACTIVATION_CODES:
        raise ValueError(f"act must be one of {tuple(ACTIVATION_CODES)}, got {act!r}")
    launch.check_device(x, _INTERPRET, "the Triton mlp_activation kernels")


def mlp_activation_forward(x: torch.Tensor, bias, act: str) -> torch.Tensor:
    """act(x + bias) over the last dimension of x, in x's dtype."""
    _check(x, act)
    x2 = _rows(x)
    rows, channels = x2.shape
    y = torch.empty_like(x2)
    if rows == 0:
        return y.view(x.shape)
    block_n = min(_BLOCK_N_MAX, triton.next_power_of_2(channels))
    grid = (triton.cdiv(rows, _BLOCK_M), triton.cdiv(channels, block_n))
    with launch.device_guard(x2):
        _mlp_activation_fwd_kernel[launch.check_grid(grid, "mlp_activation")](
            x2, x2 if bias is None else bias.contiguous(), y, rows, channels,
            HAS_BIAS=bias is not None, ACT=ACTIVATION_CODES[act], BLOCK_M=_BLOCK_M, BLOCK_N=block_n,
            ACC=launch.tl_acc_dtype(x.dtype), num_warps=_NUM_WARPS)
    return y.view(x.shape)


def mlp_activation_backward(grad: torch.Tensor, x: torch.Tensor, bias, act: str, with_activation: bool):
    """(grad_x, grad_bias (the column sums, also without a bias), recomputed activation or an empty tensor)."""
    _check(x, act)
    x2, grad2 = _rows(x), _rows(grad.to(x.dtype))
    rows, channels = x2.shape
    grad_x = torch.empty_like(x2)
    activation = torch.empty_like(x2) if with_activation else x2.new_empty((0,))
    block_n = min(_BLOCK_N_MAX, triton.next_power_of_2(channels))
    column_blocks = triton.cdiv(channels, block_n)
    rows_per_program = _rows_per_program(rows, column_blocks)
    groups = triton.cdiv(rows, rows_per_program)
    partial = torch.zeros((groups, channels), dtype=launch.acc_dtype(x.dtype), device=x.device)
    fp64 = x.dtype == torch.float64
    if rows > 0:
        with launch.device_guard(x2):
            _mlp_activation_bwd_kernel[launch.check_grid((groups, column_blocks), "mlp_activation")](
                grad2, x2, x2 if bias is None else bias.contiguous(), grad_x, activation if with_activation else x2,
                partial, rows, channels,
                HAS_BIAS=bias is not None, WITH_ACTIVATION=with_activation, ACT=ACTIVATION_CODES[act],
                ROWS_PER_PROGRAM=rows_per_program, BLOCK_M=_BLOCK_M_FP64_BACKWARD if fp64 else _BLOCK_M,
                BLOCK_N=block_n, ACC=launch.tl_acc_dtype(x.dtype),
                num_warps=_NUM_WARPS_FP64_BACKWARD if fp64 else _NUM_WARPS)
    grad_bias = partial.sum(0).to(x.dtype if bias is None else bias.dtype)
    return (grad_x.view(x.shape), grad_bias,
            activation.view(x.shape) if with_activation else activation)
