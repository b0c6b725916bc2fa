# Triton kernels of the MLP's two matrix products that touch its hidden tensor, each with the
# activation fused into its epilogue, so the hidden-width tensors make no extra trip through memory.
#
# What they compute (x: (M, K) rows, act = QuickGELU or exact GELU, as in mlp_activation.py):
#   linear_activation:   hidden = x @ weight^T             weight (N, K): fc1's, nn.Linear layout
#                        y      = act(hidden + bias)       hidden rounded to x's dtype first, as
#                                                          the unfused model stores fc1's output
#     writes y, and hidden only when asked (the lean MLP keeps it for the backward).
#   activation_grad_through_linear, for out = act(hidden + bias) @ weight^T with weight (K, N) fc2's:
#                        grad_act    = grad_out @ weight   (kept in fp32, never stored)
#                        grad_hidden = grad_act * act'(hidden + bias)
#                        grad_bias   = column sums of grad_hidden; activation = act(hidden + bias)
#     writes grad_hidden, and the recomputed activation when asked (fc2's weight gradient needs it).
# Products accumulate in fp32 (fp64 for fp64 inputs, for gradcheck); on the GPU the tl.dot
# operands stay 16-bit (tensor cores), under the interpreter they are upcast after the load
# (it holds bf16 as raw bits). fp32 inputs use input_precision="ieee": exact, not TF32.
#
# Tiling. Standard output-tile GEMM: a program owns a BLOCK_M x BLOCK_N tile of the hidden
# tensor and walks K in BLOCK_K steps, keeping the fp32 accumulator in registers; programs are
# ordered in groups of GROUP_M row tiles so that neighbours share weight tiles in L2. The
# epilogue works on the accumulator tile in registers: bias, activation (and its derivative),
# rounding, stores. The bias-gradient column sums of a tile go to a (row tiles, N) fp32 buffer
# that torch sums (deterministic, no atomics); BLOCK_M is therefore fixed (not autotuned), so
# every configuration writes the same buffer rows.
#
# Floor. In CvT the reduced dimension is small (K = C = 64..384 for fc1's forward; K = C for the
# backward's grad_out @ weight) and the output wide (N = 4C): 2*K FLOPs per output element, so
# these products are as much about bytes as FLOPs. CvT-13 at 224, B=256, bf16, all blocks: the
# hidden tensors hold 1.29G elements. Forward: read x (0.32G elements), write y (+ hidden in
# training): 3.2 GB (5.8 GB), 1.0 ms (1.7 ms) at 3.35 TB/s, against 2.5 TFLOP, 2.5 ms at 990
# TFLOP/s (H100 SXM, dense bf16). Unfused, hidden's write and the activation's read and write
# would add 7.7 GB (2.3 ms). Backward: read grad_out and hidden, write grad_hidden and the
# activation: 10.9 GB (3.3 ms); the partial-sum buffer adds N*4 bytes per BLOCK_M rows (about 1 % of it).
import torch
import triton
import triton.language as tl

from . import _launch as launch, supported
from .mlp_activation import ACTIVATION_CODES, _activation_and_derivative

# Triton decides at decoration time whether kernels are interpreted.
_INTERPRET = launch.interpreter_on()

# GPU, 16-bit inputs: BLOCK_M is fixed at 64 (see the header); N and K tiles, warps and stages
# are autotuned. Every configuration below compiles for sm_90 without register spills for both
# activations (ptxas; bench/kernels_report.py, checked in CI by tests/test_kernels_report.py):
# the activation epilogue holds several fp32 tiles at once, so 128 x 128 tiles or BLOCK_K = 64
# spill (measured: up to 4 KB per thread in the backward). 64 x 256 tiles spill only in the
# backward's heavier epilogue.
# First choices, to be timed with bench/model.py on the GPU. fp32 (the accuracy path: FMA, not
# tensor cores) and the interpreter use one small config each; the interpreter's cost grows with
# programs and loop trips, and 32-wide tiles still leave several tiles at the odd test shapes.
_BLOCK_M = 64
_GROUP_M = 8
_COMMON_CONFIGS = [
    triton.Config({"BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
]
_GPU_CONFIGS = {
    "forward": _COMMON_CONFIGS + [triton.Config({"BLOCK_N": 256, "BLOCK_K": 32}, num_warps=8, num_stages=3)],
    "backward": _COMMON_CONFIGS,
}
_FP32_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}
# fp64 (on the GPU a test dtype, but 'auto' takes Triton for it): the same tiles, so the same
# BLOCK_M for the bias-gradient buffer, over 8 warps; with 4 the backward's epilogue spilled
# (392 B per thread at 255 registers; bench/kernels_report.py).
_FP64_CONFIG = {**_FP32_CONFIG, "num_warps": 8}
_INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}


@triton.jit
def _tile_program(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of this program, row tiles grouped GROUP_M at a time for L2 reuse."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_rows, (pid % per_group) // group_rows


@triton.jit
def _tile_product(a_ptr, b_ptr, rows, cols, M, N, K, stride_am, stride_bk, stride_bn,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  UPCAST: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """A[rows, :] @ B[:, cols] for a row-major A (M, K) and B (K, N) with the given strides; a_ptr
    points at row rows[0] (so the in-tile offsets stay 32-bit)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    row_mask = (rows < M)[:, None]
    col_mask = (cols < N)[None, :]
    local_rows = tl.arange(0, BLOCK_M)
    for start in range(0, K, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + local_rows[:, None] * stride_am + ks[None, :],
                    mask=row_mask & (ks < K)[None, :], other=0.0)
        b = tl.load(b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=(ks < K)[:, None] & col_mask, other=0.0)
        if UPCAST:
            a = a.to(ACC)
            b = b.to(ACC)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _linear_activation_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, hidden_ptr, M, N, K,
                              HAS_BIAS: tl.constexpr, KEEP_HIDDEN: tl.constexpr, ACT: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              GROUP_M: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
                              DOT_PRECISION: tl.constexpr):
    tile_m, tile_n = _tile_program(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    first_row = (tile_m * BLOCK_M).to(tl.int64)  # 64-bit tile bases, 32-bit offsets inside the tile
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # -- hidden = x @ weight^T: weight (N, K) row-major is weight^T (K, N) with strides (1, K) ----
    acc = _tile_product(x_ptr + first_row * K, w_ptr, rows, cols, M, N, K, K, 1, K,
                        BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, ACC, DOT_PRECISION)
    # -- epilogue: round as stored, add the bias, activate ----
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    offsets = tl.arange(0, BLOCK_M)[:, None] * N + cols[None, :]
    y_ptr += first_row * N
    hidden_ptr += first_row * N
    hidden = acc.to(y_ptr.dtype.element_ty)
    if KEEP_HIDDEN:
        tl.store(hidden_ptr + offsets, hidden, mask=mask)
    z = hidden.to(ACC)
    if HAS_BIAS:
        z += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(ACC)[None, :]
    y, _ = _activation_and_derivative(z, ACT)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _activation_grad_kernel(grad_ptr, w_ptr, hidden_ptr, bias_ptr, grad_hidden_ptr, act_ptr, partial_ptr,
                            M, N, K,
                            HAS_BIAS: tl.constexpr, WITH_ACTIVATION: tl.constexpr, ACT: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            GROUP_M: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
                            DOT_PRECISION: tl.constexpr):
    tile_m, tile_n = _tile_program(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    first_row = (tile_m * BLOCK_M).to(tl.int64)  # 64-bit tile bases, 32-bit offsets inside the tile
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # -- grad_act = grad_out @ weight: weight (K, N) row-major ----
    grad_act = _tile_product(grad_ptr + first_row * K, w_ptr, rows, cols, M, N, K, K, N, 1,
                             BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, ACC, DOT_PRECISION)
    # -- epilogue: recompute the activation, apply its derivative, sum for the bias ----
    col_mask = cols < N
    mask = (rows < M)[:, None] & col_mask[None, :]
    offsets = tl.arange(0, BLOCK_M)[:, None] * N + cols[None, :]
    hidden_ptr += first_row * N
    grad_hidden_ptr += first_row * N
    act_ptr += first_row * N
    z = tl.load(hidden_ptr + offsets, mask=mask, other=0.0).to(ACC)
    if HAS_BIAS:
        z += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(ACC)[None, :]
    y, derivative = _activation_and_derivative(z, ACT)
    grad_z = grad_act * derivative
    tl.store(grad_hidden_ptr + offsets, grad_z.to(grad_hidden_ptr.dtype.element_ty), mask=mask)
    if WITH_ACTIVATION:
        tl.store(act_ptr + offsets, y.to(act_ptr.dtype.element_ty), mask=mask)
    tl.store(partial_ptr + tile_m * N + cols, tl.sum(tl.where(mask, grad_z, 0.0), axis=0), mask=col_mask)


_AUTOTUNE_KEY = ["M", "N", "K"]
_TUNED = {} if _INTERPRET else {
    kernel: triton.autotune(configs=_GPU_CONFIGS[direction], key=_AUTOTUNE_KEY)(kernel)
    for kernel, direction in ((_linear_activation_kernel, "forward"), (_activation_grad_kernel, "backward"))
}


# --------------------------------------------------------------------------------------------
# Launchers (the checks of the public entries in cvt_fast/ops/fused_elementwise.py are not repeated)
# --------------------------------------------------------------------------------------------

def _check(x: torch.Tensor, act: str) -> None:
    if x.dtype not in supported.DTYPES:
        raise TypeError(f"dtype {x.dtype} is not supported; expected one of {supported.DTYPES}")
    if act not in ACTIVATION_CODES:
        raise ValueError(f"act must be one of {tuple(ACTIVATION_CODES)}, got {act!r}")
    launch.check_device(x, _INTERPRET, "the Triton linear_activation kernels")


def _launch(kernel, rows: int, columns: int, args: tuple, dtype: torch.dtype, **constexprs) -> int:
    """Launch with the configuration for this device and dtype, on the device of the tensors (args[0]);
    returns the BLOCK_M used."""
    with launch.device_guard(args[0]):
        return _launch_here(kernel, rows, columns, args, dtype, **constexprs)


def _launch_here(kernel, rows: int, columns: int, args: tuple, dtype: torch.dtype, **constexprs) -> int:
    constexprs.update(GROUP_M=_GROUP_M, UPCAST=_INTERPRET, ACC=launch.tl_acc_dtype(dtype),
                      DOT_PRECISION="ieee" if dtype in (torch.float32, torch.float64) else "tf32")
    if _INTERPRET or dtype in (torch.float32, torch.float64):
        gpu_config = _FP64_CONFIG if dtype == torch.float64 else _FP32_CONFIG
        config = dict(_INTERPRETER_CONFIG if _INTERPRET else gpu_config)
        grid = (triton.cdiv(rows, config["BLOCK_M"]) * triton.cdiv(columns, config["BLOCK_N"]),)
        kernel[grid](*args, **config, **constexprs)
        return config["BLOCK_M"]

    def grid(meta):
        return (triton.cdiv(rows, _BLOCK_M) * triton.cdiv(columns, meta["BLOCK_N"]),)

    _TUNED[kernel][grid](*args, BLOCK_M=_BLOCK_M, **constexprs)
    return _BLOCK_M


def _block_m(dtype: torch.dtype) -> int:
    if _INTERPRET:
        return _INTERPRETER_CONFIG["BLOCK_M"]
    return _FP32_CONFIG["BLOCK_M"] if dtype in (torch.float32, torch.float64) else _BLOCK_M


def linear_activation_forward(x: torch.Tensor, weight: torch.Tensor, bias, act: str, keep_hidden: bool):
    """(act(x @ weight^T + bias), x @ weight^T or an empty tensor); x (..., K), weight (N, K)."""
    _check(x, act)
    x2 = x.contiguous().view(-1, x.shape[-1])
    rows, depth = x2.shape
    width = weight.shape[0]
    y = x2.new_empty((rows, width))
    hidden = x2.new_empty((rows, width)) if keep_hidden else x2.new_empty((0,))
    if rows > 0:
        _launch(_linear_activation_kernel, rows, width,
                (x2, weight.contiguous(), x2 if bias is None else bias.contiguous(), y, hidden if keep_hidden else y,
                 rows, width, depth), x.dtype,
                HAS_BIAS=bias is not None, KEEP_HIDDEN=keep_hidden, ACT=ACTIVATION_CODES[act])
    shape = tuple(x.shape[:-1]) + (width,)
    return y.view(shape), hidden.view(shape) if keep_hidden else hidden


def activation_grad_through_linear(grad_out: torch.Tensor, weight: torch.Tensor, hidden: torch.Tensor, bias,
                                   act: str, with_activation: bool):
    """(grad_hidden, grad_bias (column sums), activation or an empty tensor) for
    out = act(hidden + bias) @ weight^T; grad_out (..., K), weight (K, N), hidden (..., N)."""
    _check(hidden, act)
    grad2 = grad_out.to(hidden.dtype).contiguous().view(-1, grad_out.shape[-1])
    hidden2 = hidden.contiguous().view(-1, hidden.shape[-1])
    rows, depth = grad2.shape
    width = hidden2.shape[1]
    grad_hidden = torch.empty_like(hidden2)
    activation = torch.empty_like(hidden2) if with_activation else hidden2.new_empty((0,))
    acc = launch.acc_dtype(hidden.dtype)
    partial = torch.empty((triton.cdiv(rows, _block_m(hidden.dtype)), width), dtype=acc, device=hidden.device)
    if rows > 0:
        _launch(_activation_grad_kernel, rows, width,
                (grad2, weight.to(hidden.dtype).contiguous(), hidden2, hidden2 if bias is None else bias.contiguous(),
                 grad_hidden, activation if with_activation else grad_hidden, partial, rows, width, depth),
                hidden.dtype, HAS_BIAS=bias is not None, WITH_ACTIVATION=with_activation, ACT=ACTIVATION_CODES[act])
    grad_bias = partial.sum(0).to(hidden.dtype if bias is None else bias.dtype)
    return (grad_hidden.view(hidden.shape), grad_bias,
            activation.view(hidden.shape) if with_activation else activation)
