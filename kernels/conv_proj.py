# Triton kernels of CvT's convolutional projection (`conv_proj`), forward and backward.
#
# What it computes. x: (B, T, C) tokens, channels last, T = has_cls + H*W. Three depthwise
# k x k convolutions of the (H, W) grid, zero padding, optional per-channel bias:
#   q = dwconv(x, weight_q, stride_q, padding_q) (+ bias_q)
#   k = dwconv(x, weight_k, stride_kv, padding_kv) (+ bias_k), v likewise with weight_v.
# Outputs are written in token layout (B, has_cls + Ho*Wo, C); row 0 is x[:, 0] copied through
# (no convolution, no bias) when has_cls. Backward: grad_x (transposed depthwise convolution,
# summed over the three branches, plus the cls row) and grad_weight_{q,k,v}. Everything is
# accumulated in fp32 (fp64 for fp64 inputs, which exist for gradcheck); inputs are cast right
# after each load and outputs converted at the store.
#
# Tiling, forward, common CvT case (stride_q=1, stride_kv=2: `_fwd_s1s2_kernel`). One program
# owns a TILE_H x TILE_W tile of the half-resolution grid (a, b) and BLOCK_C channels of one
# image. That tile is the k/v output tile, and also the q tile of 2*TILE_H x 2*TILE_W split into
# its four parity sub-tiles q(2a+pi, 2b+pj). Every input the three convolutions need lies at
# x(2a+ry, 2b+rx) for a small range of offsets (ry, rx) (4 x 4 for k=3, padding 1), so the
# program loads each of those 16 shifted [TILE_H*TILE_W, BLOCK_C] x tiles ONCE and adds it to
# every accumulator that uses it (a q parity sub-tile or k/v at the matching tap). Registers
# hold six fp32 accumulators [TILE_H*TILE_W, BLOCK_C] (4 q parities, k, v) and the current x
# tile; nothing goes through shared memory explicitly. Loads are vectorised along C, which is
# contiguous; the host passes the weights tap-major, (K*K, C), so a tap's weights for the
# channel block are one contiguous load too (in the (C, K*K) layout of nn.Conv2d they would be
# gathers K*K apart). Other stride combinations use `_fwd_generic_kernel`: one program per output tile
# of one grid, one load per tap feeding every branch that shares that (stride, padding).
#
# Tiling, backward. Gather formulation (no atomics): a program owns a tile of x positions and
# sums, for each tap, the output gradients that read that position. In the common case
# (`_bwd_s1s2_kernel`) the x tile is again split into four parity sub-tiles (2a+pi, 2b+pj):
# registers hold the four x sub-tiles and four fp32 grad_x accumulators. The loop is tap-major:
# for a q tap, the four parities' grad_q tiles are loaded (neighbouring taps re-read them from
# L1/L2, not HBM), added into grad_x, and their products with x summed, so the weight gradient
# of that tap costs one cross-thread reduction per image; a k/v tap reaches exactly one x
# parity. A program loops over a group of images, keeps the per-tap weight-gradient partial sums
# in [K*K (padded), BLOCK_C] fp32 register tiles, and writes them to a small buffer that torch
# sums (deterministic). `_bwd_generic_kernel` does the same for any strides, one tap at a time.
#
# BatchNorm in training (`conv_proj_bn_forward` / `_backward`, the op cvt_fast::conv_proj_bn). The
# batch statistics are global (every image, every grid position) and the normalised outputs
# depend on them, so one pass cannot both reduce and normalise. Forward, two launches over x:
# (1) `_stats_*_kernel` computes the convolution tile by tile exactly as the forward kernel does
# and keeps per channel fp32 (count, mean, M2) of each output's grid rows, merged tile after tile
# (Chan's update: every term is a deviation, so |mean| >> std loses nothing in fp32, where sums
# of y and y^2 would); one partial row per program goes to a small buffer that torch merges in a
# fixed order (deterministic); (2) the forward kernel with the normalisation (y - mean) *
# gamma*invstd + beta in its epilogue, writing q, k, v with the cls row in place. Recomputing
# the convolution costs one more read of x (9 MACs per output are free on a memory-bound
# kernel); writing y unnormalised and normalising it afterwards would cost a write and a read
# and a write of all three outputs. Backward, two launches: (1) the statistics kernel in its
# gradient mode sums dy and dy * x_hat per channel (y recomputed from x, the output gradients
# read beside it); (2) the conv_proj backward kernel turns each output gradient it gathers into
# the convolution's, a * (dy - mean(dy)) - b * (out - beta) (`_bn_grad`: x_hat from the saved
# output, so no division by gamma), before the transposed convolution and the weight gradients.
# The cls row is never normalised, never counted, and its gradient passes straight to x's.
#
# Bandwidth floor (the kernels are memory bound: 9 MACs per output element). Forward: read x
# once, write q, k, v. CvT-13 stage 1 at B=256, bf16: x = 256*3136*64*2 B = 102.8 MB, q the
# same, k and v a quarter each (25.7 MB): 257 MB in all, about 77 us at 3.35 TB/s (H100 SXM).
# Backward: read x, grad_q, grad_k, grad_v, write grad_x: 102.8*3 + 2*25.7 = 360 MB; the
# weight-gradient partial buffer is (images / group) * tiles * 3 * 9 * C fp32, a few MB. With
# BatchNorm: forward one more read of x (stage 1: 360 MB against the 257 MB floor), backward one
# more read of x and the output gradients and one read of q, k, v (771 MB against 617 MB for two
# passes); kernels/BYTES.md has every stage and the unfused sequences.
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import _launch as launch, supported

# Triton decides at decoration time whether kernels are interpreted, so remember the
# setting that was in force when this module (and its @triton.jit) was imported.
_INTERPRET = launch.interpreter_on()

# Block choices. BLOCK_C = 64 channels: 128 contiguous bytes in bf16 per row (a full
# transaction) and divides every CvT width (64, 192, 384, 768, 1024). GPU tiles are 4 x 4
# positions of the grid a program walks (for s1s2: the half-resolution grid, so 16 k/v rows and
# 64 q rows) with 4 warps: compiled for sm_90 (ptxas, bf16, C % 16 == 0) every kernel then
# fits in registers without spills (fwd s1s2 and bwd s1s2 about 250 registers per thread,
# mostly loads the compiler issues early; generic 96 / 142), while 4 x 8 tiles spill in the
# backward. Small tiles also keep enough programs for stage 3 (7 x 7 k/v grid). These are
# first choices, not measured optima: time them with bench/conv_proj.py on the GPU. Under the
# interpreter every program is a Python-level step, so bigger tiles there are only faster.
_BLOCK_C_MAX = 64
_TILE_S1S2 = (4, 4)
_TILE_GENERIC = (4, 4)
_TILE_INTERPRET = (8, 8)
_NUM_WARPS = 4
# Backward: each program loops over a group of images so that the weight-gradient partial
# buffer stays small; groups are sized to leave at least this many programs in flight.
_BWD_TARGET_PROGRAMS = 1024
# tests/test_kernel_configs.py sets _TILE_INTERPRET to the GPU tiles and lowers
# _BWD_TARGET_PROGRAMS, so the GPU tiling and the multi-image backward run on the CPU: keep
# them module constants read at launch time.


# --------------------------------------------------------------------------------------------
# Shared device helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _tap_accumulate(acc, xv, w_ptr, C, c, cmask, DY: tl.constexpr, DX: tl.constexpr, K: tl.constexpr):
    """acc += xv * w[:, DY, DX] when (DY, DX) is a tap of the k x k kernel (decided at compile time).
    w_ptr: the weights tap-major, (K*K, C), so one tap's channels are one contiguous vector load."""
    if DY >= 0:
        if DY < K:
            if DX >= 0:
                if DX < K:
                    w = tl.load(w_ptr + (DY * K + DX) * C + c, mask=cmask, other=0.0).to(acc.dtype)
                    acc += xv * w[None, :]
    return acc


@triton.jit
def _tap_backward(gx, gw, xv, g, w_ptr, C, c, cmask, kk, tap):
    """gx += g * w[:, tap] and row `tap` of gw += sum over positions of x * g (w tap-major, (K*K, C))."""
    w = tl.load(w_ptr + tap * C + c, mask=cmask, other=0.0).to(gx.dtype)
    gx += g * w[None, :]
    part = tl.sum(xv * g, axis=0)
    gw += tl.where(kk[:, None] == tap, part[None, :], 0.0)
    return gx, gw


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


@triton.jit
def _conv_s1s2_tile(x_base, wq_ptr, wk_ptr, wv_ptr, a, b, c, cmask, C, H, W, x_stride_t,
                    HAS_CLS: tl.constexpr, K: tl.constexpr, PQ: tl.constexpr, PKV: tl.constexpr,
                    R_OFF: tl.constexpr, NR: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
                    BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """The three convolutions of one image at a tile (a, b) of the half-resolution grid: the four q
    parity sub-tiles q(2a+pi, 2b+pj), then k(a, b) and v(a, b), as ACC accumulators."""
    q00 = tl.zeros((TILE_H * TILE_W, BLOCK_C), dtype=ACC)
    q01 = tl.zeros((TILE_H * TILE_W, BLOCK_C), dtype=ACC)
    q10 = tl.zeros((TILE_H * TILE_W, BLOCK_C), dtype=ACC)
    q11 = tl.zeros((TILE_H * TILE_W, BLOCK_C), dtype=ACC)
    kacc = tl.zeros((TILE_H * TILE_W, BLOCK_C), dtype=ACC)
    vacc = tl.zeros((TILE_H * TILE_W, BLOCK_C), dtype=ACC)

    # x(2a + ry, 2b + rx): q parity (pi, pj) uses it at tap (ry - pi + PQ, rx - pj + PQ), k and v
    # at tap (ry + PKV, rx + PKV); each shifted tile is loaded once for all six accumulators.
    for ty in tl.static_range(NR):
        xr = 2 * a + (ty - R_OFF)
        row_ok = (xr >= 0) & (xr < H)
        for tx in tl.static_range(NR):
            xc = 2 * b + (tx - R_OFF)
            ok = row_ok & (xc >= 0) & (xc < W)
            offs = (HAS_CLS + xr * W + xc).to(tl.int64) * x_stride_t
            xv = tl.load(x_base + offs[:, None] + c[None, :], mask=ok[:, None] & cmask[None, :],
                         other=0.0).to(ACC)
            q00 = _tap_accumulate(q00, xv, wq_ptr, C, c, cmask, ty - R_OFF + PQ, tx - R_OFF + PQ, K)
            q01 = _tap_accumulate(q01, xv, wq_ptr, C, c, cmask, ty - R_OFF + PQ, tx - R_OFF - 1 + PQ, K)
            q10 = _tap_accumulate(q10, xv, wq_ptr, C, c, cmask, ty - R_OFF - 1 + PQ, tx - R_OFF + PQ, K)
            q11 = _tap_accumulate(q11, xv, wq_ptr, C, c, cmask, ty - R_OFF - 1 + PQ, tx - R_OFF - 1 + PQ, K)
            kacc = _tap_accumulate(kacc, xv, wk_ptr, C, c, cmask, ty - R_OFF + PKV, tx - R_OFF + PKV, K)
            vacc = _tap_accumulate(vacc, xv, wv_ptr, C, c, cmask, ty - R_OFF + PKV, tx - R_OFF + PKV, K)
    return q00, q01, q10, q11, kacc, vacc


@triton.jit
def _normalise(acc, norm_ptr, BRANCH: tl.constexpr, C, c, cmask):
    """BatchNorm's affine map with batch statistics, (y - mean) * (gamma * invstd) + beta; norm_ptr
    holds (3 branches, [mean, gamma * invstd, beta], C) in the accumulator dtype."""
    row = norm_ptr + BRANCH * 3 * C
    mean = tl.load(row + c, mask=cmask, other=0.0)
    scale = tl.load(row + C + c, mask=cmask, other=0.0)
    beta = tl.load(row + 2 * C + c, mask=cmask, other=0.0)
    return (acc - mean[None, :]) * scale[None, :] + beta[None, :]


@triton.jit
def _split_forward_program(pid, num_tiles, C, BLOCK_C: tl.constexpr):
    # (tile, channel block, image) of a program of the forward's one-axis grid (_forward_grid): tile
    # fastest, then channel block, then image, the order of the former (tiles, c_blocks, batch) grid,
    # whose batch axis took at most 65535 images.
    rest = pid // num_tiles
    c_blocks = tl.cdiv(C, BLOCK_C)
    return pid % num_tiles, rest % c_blocks, (rest // c_blocks).to(tl.int64)


@triton.jit
def _fwd_s1s2_kernel(
    x_ptr, wq_ptr, wk_ptr, wv_ptr, bq_ptr, bk_ptr, bv_ptr, norm_ptr, q_ptr, k_ptr, v_ptr,
    C, H, W, Hq, Wq, Hk, Wk, tiles_w, num_tiles, x_stride_b, x_stride_t,
    HAS_CLS: tl.constexpr, K: tl.constexpr, PQ: tl.constexpr, PKV: tl.constexpr,
    R_OFF: tl.constexpr, NR: tl.constexpr,
    HAS_BQ: tl.constexpr, HAS_BK: tl.constexpr, HAS_BV: tl.constexpr, NORM: tl.constexpr,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    pid_t, pid_c, pid_b = _split_forward_program(tl.program_id(0), num_tiles, C, BLOCK_C)

    p = tl.arange(0, TILE_H * TILE_W)
    a = (pid_t // tiles_w) * TILE_H + p // TILE_W
    b = (pid_t % tiles_w) * TILE_W + p % TILE_W
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    x_base = x_ptr + pid_b * x_stride_b

    q00, q01, q10, q11, kacc, vacc = _conv_s1s2_tile(x_base, wq_ptr, wk_ptr, wv_ptr, a, b, c, cmask, C, H, W,
                                                     x_stride_t, HAS_CLS, K, PQ, PKV, R_OFF, NR, TILE_H, TILE_W,
                                                     BLOCK_C, ACC)

    if HAS_BQ:
        bias = tl.load(bq_ptr + c, mask=cmask, other=0.0).to(ACC)
        q00 += bias[None, :]
        q01 += bias[None, :]
        q10 += bias[None, :]
        q11 += bias[None, :]
    if HAS_BK:
        kacc += tl.load(bk_ptr + c, mask=cmask, other=0.0).to(ACC)[None, :]
    if HAS_BV:
        vacc += tl.load(bv_ptr + c, mask=cmask, other=0.0).to(ACC)[None, :]
    if NORM:
        q00 = _normalise(q00, norm_ptr, 0, C, c, cmask)
        q01 = _normalise(q01, norm_ptr, 0, C, c, cmask)
        q10 = _normalise(q10, norm_ptr, 0, C, c, cmask)
        q11 = _normalise(q11, norm_ptr, 0, C, c, cmask)
        kacc = _normalise(kacc, norm_ptr, 1, C, c, cmask)
        vacc = _normalise(vacc, norm_ptr, 2, C, c, cmask)

    out_ty = q_ptr.dtype.element_ty
    tq = HAS_CLS + Hq * Wq
    q_base = q_ptr + pid_b * tq * C
    _store_tile(q_base, q00, 2 * a, 2 * b, Hq, Wq, C, c, cmask, HAS_CLS)
    _store_tile(q_base, q01, 2 * a, 2 * b + 1, Hq, Wq, C, c, cmask, HAS_CLS)
    _store_tile(q_base, q10, 2 * a + 1, 2 * b, Hq, Wq, C, c, cmask, HAS_CLS)
    _store_tile(q_base, q11, 2 * a + 1, 2 * b + 1, Hq, Wq, C, c, cmask, HAS_CLS)
    tk = HAS_CLS + Hk * Wk
    _store_tile(k_ptr + pid_b * tk * C, kacc, a, b, Hk, Wk, C, c, cmask, HAS_CLS)
    _store_tile(v_ptr + pid_b * tk * C, vacc, a, b, Hk, Wk, C, c, cmask, HAS_CLS)

    if HAS_CLS:
        if pid_t == 0:
            cls = tl.load(x_base + c, mask=cmask, other=0.0)
            tl.store(q_base + c, cls.to(out_ty), mask=cmask)
            tl.store(k_ptr + pid_b * tk * C + c, cls.to(out_ty), mask=cmask)
            tl.store(v_ptr + pid_b * tk * C + c, cls.to(out_ty), mask=cmask)


@triton.jit
def _store_tile(base, acc, r, s, Ho, Wo, C, c, cmask, HAS_CLS: tl.constexpr):
    """Store acc (rows = grid positions (r, s)) into the token-layout output, masking the edges."""
    ok = (r < Ho) & (s < Wo)
    tok = (HAS_CLS + r * Wo + s).to(tl.int64)
    tl.store(base + tok[:, None] * C + c[None, :], acc.to(base.dtype.element_ty),
             mask=ok[:, None] & cmask[None, :])


@triton.jit
def _conv_generic_tile(x_base, w0_ptr, w1_ptr, w2_ptr, r, s, c, cmask, C, H, W, x_stride_t,
                       HAS_CLS: tl.constexpr, K: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
                       NUM_OUT: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_C: tl.constexpr,
                       ACC: tl.constexpr):
    """Up to three depthwise convolutions sharing (STRIDE, PAD) at output positions (r, s) of one
    image: one x load per tap feeds all."""
    acc0 = tl.zeros((TILE_H * TILE_W, BLOCK_C), dtype=ACC)
    acc1 = tl.zeros((TILE_H * TILE_W, BLOCK_C), dtype=ACC)
    acc2 = tl.zeros((TILE_H * TILE_W, BLOCK_C), dtype=ACC)
    for dy in tl.static_range(K):
        xr = r * STRIDE - PAD + dy
        row_ok = (xr >= 0) & (xr < H)
        for dx in tl.static_range(K):
            xc = s * STRIDE - PAD + dx
            ok = row_ok & (xc >= 0) & (xc < W)
            offs = (HAS_CLS + xr * W + xc).to(tl.int64) * x_stride_t
            xv = tl.load(x_base + offs[:, None] + c[None, :], mask=ok[:, None] & cmask[None, :],
                         other=0.0).to(ACC)
            acc0 = _tap_accumulate(acc0, xv, w0_ptr, C, c, cmask, dy, dx, K)
            if NUM_OUT >= 2:
                acc1 = _tap_accumulate(acc1, xv, w1_ptr, C, c, cmask, dy, dx, K)
            if NUM_OUT >= 3:
                acc2 = _tap_accumulate(acc2, xv, w2_ptr, C, c, cmask, dy, dx, K)
    return acc0, acc1, acc2


@triton.jit
def _fwd_generic_kernel(
    x_ptr, w0_ptr, w1_ptr, w2_ptr, b0_ptr, b1_ptr, b2_ptr, norm_ptr, o0_ptr, o1_ptr, o2_ptr,
    C, H, W, Ho, Wo, tiles_w, num_tiles, x_stride_b, x_stride_t,
    HAS_CLS: tl.constexpr, K: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
    NUM_OUT: tl.constexpr, HAS_B0: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
    NORM: tl.constexpr, BRANCH0: tl.constexpr,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    """Up to three depthwise convolutions sharing (STRIDE, PAD); output i is branch BRANCH0 + i
    (q, k, v = 0, 1, 2) of the BatchNorm parameters when NORM."""
    pid_t, pid_c, pid_b = _split_forward_program(tl.program_id(0), num_tiles, C, BLOCK_C)

    p = tl.arange(0, TILE_H * TILE_W)
    r = (pid_t // tiles_w) * TILE_H + p // TILE_W
    s = (pid_t % tiles_w) * TILE_W + p % TILE_W
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    x_base = x_ptr + pid_b * x_stride_b

    acc0, acc1, acc2 = _conv_generic_tile(x_base, w0_ptr, w1_ptr, w2_ptr, r, s, c, cmask, C, H, W, x_stride_t,
                                          HAS_CLS, K, STRIDE, PAD, NUM_OUT, TILE_H, TILE_W, BLOCK_C, ACC)

    if HAS_B0:
        acc0 += tl.load(b0_ptr + c, mask=cmask, other=0.0).to(ACC)[None, :]
    if HAS_B1:
        acc1 += tl.load(b1_ptr + c, mask=cmask, other=0.0).to(ACC)[None, :]
    if HAS_B2:
        acc2 += tl.load(b2_ptr + c, mask=cmask, other=0.0).to(ACC)[None, :]
    if NORM:
        acc0 = _normalise(acc0, norm_ptr, BRANCH0, C, c, cmask)
        if NUM_OUT >= 2:
            acc1 = _normalise(acc1, norm_ptr, BRANCH0 + 1, C, c, cmask)
        if NUM_OUT >= 3:
            acc2 = _normalise(acc2, norm_ptr, BRANCH0 + 2, C, c, cmask)

    t_out = HAS_CLS + Ho * Wo
    out_off = pid_b * t_out * C
    _store_tile(o0_ptr + out_off, acc0, r, s, Ho, Wo, C, c, cmask, HAS_CLS)
    if NUM_OUT >= 2:
        _store_tile(o1_ptr + out_off, acc1, r, s, Ho, Wo, C, c, cmask, HAS_CLS)
    if NUM_OUT >= 3:
        _store_tile(o2_ptr + out_off, acc2, r, s, Ho, Wo, C, c, cmask, HAS_CLS)

    if HAS_CLS:
        if pid_t == 0:
            out_ty = o0_ptr.dtype.element_ty
            cls = tl.load(x_base + c, mask=cmask, other=0.0)
            tl.store(o0_ptr + out_off + c, cls.to(out_ty), mask=cmask)
            if NUM_OUT >= 2:
                tl.store(o1_ptr + out_off + c, cls.to(out_ty), mask=cmask)
            if NUM_OUT >= 3:
                tl.store(o2_ptr + out_off + c, cls.to(out_ty), mask=cmask)


# --------------------------------------------------------------------------------------------
# BatchNorm statistics: the convolution recomputed from x, reduced over the grid rows
# --------------------------------------------------------------------------------------------


@triton.jit
def _tile_moments(y, ok, ACC: tl.constexpr):
    """(count, mean, sum of squared deviations from that mean) of the valid rows of a tile, per
    channel; centred on the tile's own mean, so nothing cancels when |mean| >> std."""
    n = tl.sum(ok.to(ACC), axis=0)
    mean = tl.sum(tl.where(ok[:, None], y, 0.0), axis=0) / tl.maximum(n, 1.0)
    dev = tl.where(ok[:, None], y - mean[None, :], 0.0)
    return n, mean, tl.sum(dev * dev, axis=0)


@triton.jit
def _tile_moments4(y00, y01, y10, y11, ok00, ok01, ok10, ok11, ACC: tl.constexpr):
    """_tile_moments over the four q parity sub-tiles of the s1s2 layout together."""
    n = tl.sum(ok00.to(ACC), axis=0) + tl.sum(ok01.to(ACC), axis=0) + tl.sum(ok10.to(ACC), axis=0) \
        + tl.sum(ok11.to(ACC), axis=0)
    total = tl.sum(tl.where(ok00[:, None], y00, 0.0), axis=0) + tl.sum(tl.where(ok01[:, None], y01, 0.0), axis=0) \
        + tl.sum(tl.where(ok10[:, None], y10, 0.0), axis=0) + tl.sum(tl.where(ok11[:, None], y11, 0.0), axis=0)
    mean = total / tl.maximum(n, 1.0)
    d00 = tl.where(ok00[:, None], y00 - mean[None, :], 0.0)
    d01 = tl.where(ok01[:, None], y01 - mean[None, :], 0.0)
    d10 = tl.where(ok10[:, None], y10 - mean[None, :], 0.0)
    d11 = tl.where(ok11[:, None], y11 - mean[None, :], 0.0)
    return n, mean, tl.sum(d00 * d00 + d01 * d01 + d10 * d10 + d11 * d11, axis=0)


@triton.jit
def _merge_moments(n, mean, m2, n_t, mean_t, m2_t):
    """Chan et al.'s pairwise update of (count, mean, M2) with a tile's: exact in exact arithmetic,
    and every term is a deviation, so fp32 keeps the variance when |mean| >> std."""
    total = n + n_t
    frac = n_t / tl.maximum(total, 1.0)
    delta = mean_t - mean
    return total, mean + delta * frac, m2 + m2_t + delta * delta * n * frac


@triton.jit
def _store_stats(part_ptr, row, BRANCH: tl.constexpr, NUM_BRANCHES: tl.constexpr, NSTAT: tl.constexpr, C, c, cmask,
                 s0, s1, s2):
    """Row `row` of the partial-statistics buffer (rows, NUM_BRANCHES, NSTAT, C): s0..s{NSTAT-1}."""
    base = part_ptr + (row.to(tl.int64) * NUM_BRANCHES + BRANCH) * NSTAT * C
    tl.store(base + c, s0, mask=cmask)
    tl.store(base + C + c, s1, mask=cmask)
    if NSTAT >= 3:
        tl.store(base + 2 * C + c, s2, mask=cmask)


@triton.jit
def _stats_s1s2_kernel(
    x_ptr, wq_ptr, wk_ptr, wv_ptr, gq_ptr, gk_ptr, gv_ptr, centre_ptr, part_ptr,
    B, C, H, W, Hq, Wq, Hk, Wk, tiles_w, num_tiles, images_per_program, x_stride_b, x_stride_t,
    HAS_CLS: tl.constexpr, K: tl.constexpr, PQ: tl.constexpr, PKV: tl.constexpr,
    R_OFF: tl.constexpr, NR: tl.constexpr, GRAD: tl.constexpr,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    """Per-channel reductions over the grid rows of q, k, v, the convolutions recomputed from x (what
    the forward kernel computes at the same tile), over a group of images; one partial row per program.
    GRAD=False (forward): (count, mean, M2) of each output, merged tile by tile (_merge_moments).
    GRAD=True (backward): sum of dy and of dy * x_hat, x_hat = (y - mean) * invstd with the forward's
    statistics from centre_ptr (2, 3, C): [mean; invstd] of q, k, v."""
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_g = tl.program_id(2)

    p = tl.arange(0, TILE_H * TILE_W)
    a = (pid_t // tiles_w) * TILE_H + p // TILE_W
    b = (pid_t % tiles_w) * TILE_W + p % TILE_W
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    m = cmask[None, :]
    tq = HAS_CLS + Hq * Wq
    tk = HAS_CLS + Hk * Wk
    # Validity and token offsets of the outputs this tile computes.
    ok00 = (2 * a < Hq) & (2 * b < Wq)
    ok01 = (2 * a < Hq) & (2 * b + 1 < Wq)
    ok10 = (2 * a + 1 < Hq) & (2 * b < Wq)
    ok11 = (2 * a + 1 < Hq) & (2 * b + 1 < Wq)
    okk = (a < Hk) & (b < Wk)
    tok00 = (HAS_CLS + (2 * a) * Wq + 2 * b).to(tl.int64)
    tokk = (HAS_CLS + a * Wk + b).to(tl.int64)

    zero = tl.zeros((BLOCK_C,), dtype=ACC)
    # Forward: (count, mean, M2) per branch; backward: (sum dy, sum dy * (y - mean)) per branch.
    sq0, sq1, sq2 = zero, zero, zero
    sk0, sk1, sk2 = zero, zero, zero
    sv0, sv1, sv2 = zero, zero, zero
    if GRAD:
        mean_q = tl.load(centre_ptr + c, mask=cmask, other=0.0)
        mean_k = tl.load(centre_ptr + C + c, mask=cmask, other=0.0)
        mean_v = tl.load(centre_ptr + 2 * C + c, mask=cmask, other=0.0)

    for i in range(images_per_program):
        img = pid_g * images_per_program + i
        if img < B:
            img64 = img.to(tl.int64)
            q00, q01, q10, q11, kacc, vacc = _conv_s1s2_tile(
                x_ptr + img64 * x_stride_b, wq_ptr, wk_ptr, wv_ptr, a, b, c, cmask, C, H, W, x_stride_t,
                HAS_CLS, K, PQ, PKV, R_OFF, NR, TILE_H, TILE_W, BLOCK_C, ACC)
            if GRAD:
                gq_base = gq_ptr + img64 * tq * C + tok00[:, None] * C + c[None, :]
                # One parity at a time: its gradient tile is dead before the next one is loaded.
                d = tl.load(gq_base, mask=ok00[:, None] & m, other=0.0).to(ACC)
                sq0 += tl.sum(d, axis=0)
                sq1 += tl.sum(d * (q00 - mean_q[None, :]), axis=0)
                d = tl.load(gq_base + C, mask=ok01[:, None] & m, other=0.0).to(ACC)
                sq0 += tl.sum(d, axis=0)
                sq1 += tl.sum(d * (q01 - mean_q[None, :]), axis=0)
                d = tl.load(gq_base + Wq * C, mask=ok10[:, None] & m, other=0.0).to(ACC)
                sq0 += tl.sum(d, axis=0)
                sq1 += tl.sum(d * (q10 - mean_q[None, :]), axis=0)
                d = tl.load(gq_base + (Wq + 1) * C, mask=ok11[:, None] & m, other=0.0).to(ACC)
                sq0 += tl.sum(d, axis=0)
                sq1 += tl.sum(d * (q11 - mean_q[None, :]), axis=0)
                kv_offs = img64 * tk * C + tokk[:, None] * C + c[None, :]
                dk = tl.load(gk_ptr + kv_offs, mask=okk[:, None] & m, other=0.0).to(ACC)
                sk0 += tl.sum(dk, axis=0)
                sk1 += tl.sum(dk * (kacc - mean_k[None, :]), axis=0)
                dv = tl.load(gv_ptr + kv_offs, mask=okk[:, None] & m, other=0.0).to(ACC)
                sv0 += tl.sum(dv, axis=0)
                sv1 += tl.sum(dv * (vacc - mean_v[None, :]), axis=0)
            else:
                n_t, mean_t, m2_t = _tile_moments4(q00, q01, q10, q11, ok00, ok01, ok10, ok11, ACC)
                sq0, sq1, sq2 = _merge_moments(sq0, sq1, sq2, n_t, mean_t, m2_t)
                n_t, mean_t, m2_t = _tile_moments(kacc, okk, ACC)
                sk0, sk1, sk2 = _merge_moments(sk0, sk1, sk2, n_t, mean_t, m2_t)
                n_t, mean_t, m2_t = _tile_moments(vacc, okk, ACC)
                sv0, sv1, sv2 = _merge_moments(sv0, sv1, sv2, n_t, mean_t, m2_t)

    row = pid_g * num_tiles + pid_t
    if GRAD:
        # x_hat = (y - mean) * invstd: the invstd factor once, here.
        sq1 *= tl.load(centre_ptr + 3 * C + c, mask=cmask, other=0.0)
        sk1 *= tl.load(centre_ptr + 4 * C + c, mask=cmask, other=0.0)
        sv1 *= tl.load(centre_ptr + 5 * C + c, mask=cmask, other=0.0)
        _store_stats(part_ptr, row, 0, 3, 2, C, c, cmask, sq0, sq1, sq2)
        _store_stats(part_ptr, row, 1, 3, 2, C, c, cmask, sk0, sk1, sk2)
        _store_stats(part_ptr, row, 2, 3, 2, C, c, cmask, sv0, sv1, sv2)
    else:
        _store_stats(part_ptr, row, 0, 3, 3, C, c, cmask, sq0, sq1, sq2)
        _store_stats(part_ptr, row, 1, 3, 3, C, c, cmask, sk0, sk1, sk2)
        _store_stats(part_ptr, row, 2, 3, 3, C, c, cmask, sv0, sv1, sv2)


@triton.jit
def _stats_generic_kernel(
    x_ptr, w0_ptr, w1_ptr, w2_ptr, g0_ptr, g1_ptr, g2_ptr, centre_ptr, part_ptr,
    B, C, H, W, Ho, Wo, tiles_w, num_tiles, images_per_program, x_stride_b, x_stride_t,
    HAS_CLS: tl.constexpr, K: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
    NUM_OUT: tl.constexpr, BRANCH0: tl.constexpr, GRAD: tl.constexpr,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    """_stats_s1s2_kernel for up to three outputs sharing (STRIDE, PAD); output i is branch
    BRANCH0 + i of centre_ptr, and slot i of the partial rows (rows, NUM_OUT, NSTAT, C)."""
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_g = tl.program_id(2)

    p = tl.arange(0, TILE_H * TILE_W)
    r = (pid_t // tiles_w) * TILE_H + p // TILE_W
    s = (pid_t % tiles_w) * TILE_W + p % TILE_W
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    ok = (r < Ho) & (s < Wo)
    m = ok[:, None] & cmask[None, :]
    t_out = HAS_CLS + Ho * Wo
    tok = (HAS_CLS + r * Wo + s).to(tl.int64)

    zero = tl.zeros((BLOCK_C,), dtype=ACC)
    s00, s01, s02 = zero, zero, zero
    s10, s11, s12 = zero, zero, zero
    s20, s21, s22 = zero, zero, zero
    if GRAD:
        # With NUM_OUT < 3 the unused rows read are still inside the (2, 3, C) buffer, and unused.
        mean0 = tl.load(centre_ptr + BRANCH0 * C + c, mask=cmask, other=0.0)
        mean1 = tl.load(centre_ptr + (BRANCH0 + 1) * C + c, mask=cmask, other=0.0)
        mean2 = tl.load(centre_ptr + (BRANCH0 + 2) * C + c, mask=cmask, other=0.0)

    for i in range(images_per_program):
        img = pid_g * images_per_program + i
        if img < B:
            img64 = img.to(tl.int64)
            acc0, acc1, acc2 = _conv_generic_tile(x_ptr + img64 * x_stride_b, w0_ptr, w1_ptr, w2_ptr, r, s, c,
                                                  cmask, C, H, W, x_stride_t, HAS_CLS, K, STRIDE, PAD, NUM_OUT,
                                                  TILE_H, TILE_W, BLOCK_C, ACC)
            if GRAD:
                offs = img64 * t_out * C + tok[:, None] * C + c[None, :]
                d = tl.load(g0_ptr + offs, mask=m, other=0.0).to(ACC)
                s00 += tl.sum(d, axis=0)
                s01 += tl.sum(d * (acc0 - mean0[None, :]), axis=0)
                if NUM_OUT >= 2:
                    d = tl.load(g1_ptr + offs, mask=m, other=0.0).to(ACC)
                    s10 += tl.sum(d, axis=0)
                    s11 += tl.sum(d * (acc1 - mean1[None, :]), axis=0)
                if NUM_OUT >= 3:
                    d = tl.load(g2_ptr + offs, mask=m, other=0.0).to(ACC)
                    s20 += tl.sum(d, axis=0)
                    s21 += tl.sum(d * (acc2 - mean2[None, :]), axis=0)
            else:
                n_t, mean_t, m2_t = _tile_moments(acc0, ok, ACC)
                s00, s01, s02 = _merge_moments(s00, s01, s02, n_t, mean_t, m2_t)
                if NUM_OUT >= 2:
                    n_t, mean_t, m2_t = _tile_moments(acc1, ok, ACC)
                    s10, s11, s12 = _merge_moments(s10, s11, s12, n_t, mean_t, m2_t)
                if NUM_OUT >= 3:
                    n_t, mean_t, m2_t = _tile_moments(acc2, ok, ACC)
                    s20, s21, s22 = _merge_moments(s20, s21, s22, n_t, mean_t, m2_t)

    row = pid_g * num_tiles + pid_t
    if GRAD:
        s01 *= tl.load(centre_ptr + (3 + BRANCH0) * C + c, mask=cmask, other=0.0)
        _store_stats(part_ptr, row, 0, NUM_OUT, 2, C, c, cmask, s00, s01, s02)
        if NUM_OUT >= 2:
            s11 *= tl.load(centre_ptr + (4 + BRANCH0) * C + c, mask=cmask, other=0.0)
            _store_stats(part_ptr, row, 1, NUM_OUT, 2, C, c, cmask, s10, s11, s12)
        if NUM_OUT >= 3:
            s21 *= tl.load(centre_ptr + (5 + BRANCH0) * C + c, mask=cmask, other=0.0)
            _store_stats(part_ptr, row, 2, NUM_OUT, 2, C, c, cmask, s20, s21, s22)
    else:
        _store_stats(part_ptr, row, 0, NUM_OUT, 3, C, c, cmask, s00, s01, s02)
        if NUM_OUT >= 2:
            _store_stats(part_ptr, row, 1, NUM_OUT, 3, C, c, cmask, s10, s11, s12)
        if NUM_OUT >= 3:
            _store_stats(part_ptr, row, 2, NUM_OUT, 3, C, c, cmask, s20, s21, s22)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------


@triton.jit
def _pick4(PI: tl.constexpr, PJ: tl.constexpr, t00, t01, t10, t11):
    """The parity sub-tile (PI, PJ) of four, chosen at compile time."""
    if PI == 0:
        if PJ == 0:
            picked = t00
        else:
            picked = t01
    else:
        if PJ == 0:
            picked = t10
        else:
            picked = t11
    return picked


@triton.jit
def _add4(PI: tl.constexpr, PJ: tl.constexpr, t00, t01, t10, t11, delta):
    """Add delta to the parity sub-tile (PI, PJ) of four, chosen at compile time."""
    if PI == 0:
        if PJ == 0:
            t00 += delta
        else:
            t01 += delta
    else:
        if PJ == 0:
            t10 += delta
        else:
            t11 += delta
    return t00, t01, t10, t11


@triton.jit
def _bn_grad(d_out, out, ok, bn_ptr, BRANCH: tl.constexpr, C, c, cmask):
    """Gradient of the convolution output y from that of BatchNorm's output, at valid rows:
        dy = gamma * invstd * (d_out - mean(d_out) - x_hat * mean(d_out * x_hat))
    with gamma * x_hat = out - beta (the forward's output), so that
        dy = a * d_out - b * out + e,  a = gamma * invstd,  b = invstd * mean(d_out * x_hat),
        e = b * beta - a * mean(d_out); the means are over the grid rows (the statistics pass).
    bn_ptr holds (3 branches, [a, b, e], C). The three vectors are loaded here, at each use (L1
    hits), not once per program: held for the whole tap loop they cost the registers that made
    the s1s2 backward spill."""
    row = bn_ptr + BRANCH * 3 * C
    a = tl.load(row + c, mask=cmask, other=0.0)
    b = tl.load(row + C + c, mask=cmask, other=0.0)
    e = tl.load(row + 2 * C + c, mask=cmask, other=0.0)
    dy = a[None, :] * d_out - b[None, :] * out + e[None, :]
    return tl.where(ok[:, None], dy, 0.0)


@triton.jit
def _bwd_s1s2_kernel(
    x_ptr, gq_ptr, gk_ptr, gv_ptr, wq_ptr, wk_ptr, wv_ptr, gx_ptr, gw_part_ptr,
    outq_ptr, outk_ptr, outv_ptr, bn_ptr,
    B, C, H, W, Hq, Wq, Hk, Wk, tiles_w, num_tiles, images_per_program,
    x_stride_b, x_stride_t,
    HAS_CLS: tl.constexpr, K: tl.constexpr, PQ: tl.constexpr, PKV: tl.constexpr,
    HAS_GQ: tl.constexpr, HAS_GKV: tl.constexpr, HAS_GV: tl.constexpr, BN: tl.constexpr,
    KK_PAD: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_g = tl.program_id(2)

    p = tl.arange(0, TILE_H * TILE_W)
    a = (pid_t // tiles_w) * TILE_H + p // TILE_W
    b = (pid_t % tiles_w) * TILE_W + p % TILE_W
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    m = cmask[None, :]
    kk = tl.arange(0, KK_PAD)
    tq = HAS_CLS + Hq * Wq
    tk = HAS_CLS + Hk * Wk
    t_in = HAS_CLS + H * W
    gx_ty = gx_ptr.dtype.element_ty

    # Validity and token offsets of the four x parity sub-tiles (2a+pi, 2b+pj).
    ok00 = (2 * a < H) & (2 * b < W)
    ok01 = (2 * a < H) & (2 * b + 1 < W)
    ok10 = (2 * a + 1 < H) & (2 * b < W)
    ok11 = (2 * a + 1 < H) & (2 * b + 1 < W)
    tok00 = (HAS_CLS + (2 * a) * W + 2 * b).to(tl.int64)
    tok01 = tok00 + 1
    tok10 = tok00 + W
    tok11 = tok10 + 1

    gwq = tl.zeros((KK_PAD, BLOCK_C), dtype=ACC)
    gwk = tl.zeros((KK_PAD, BLOCK_C), dtype=ACC)
    gwv = tl.zeros((KK_PAD, BLOCK_C), dtype=ACC)
    # With BN the grads given are BatchNorm's output gradients: turned into the convolution's at
    # each load (_bn_grad).

    for i in range(images_per_program):
        img = pid_g * images_per_program + i
        if img < B:
            img64 = img.to(tl.int64)
            x_base = x_ptr + img64 * x_stride_b
            x00 = tl.load(x_base + tok00[:, None] * x_stride_t + c[None, :], mask=ok00[:, None] & m, other=0.0).to(ACC)
            x01 = tl.load(x_base + tok01[:, None] * x_stride_t + c[None, :], mask=ok01[:, None] & m, other=0.0).to(ACC)
            x10 = tl.load(x_base + tok10[:, None] * x_stride_t + c[None, :], mask=ok10[:, None] & m, other=0.0).to(ACC)
            x11 = tl.load(x_base + tok11[:, None] * x_stride_t + c[None, :], mask=ok11[:, None] & m, other=0.0).to(ACC)
            g00 = tl.zeros((TILE_H * TILE_W, BLOCK_C), dtype=ACC)
            g01 = tl.zeros((TILE_H * TILE_W, BLOCK_C), dtype=ACC)
            g10 = tl.zeros((TILE_H * TILE_W, BLOCK_C), dtype=ACC)
            g11 = tl.zeros((TILE_H * TILE_W, BLOCK_C), dtype=ACC)

            # Tap-major order: the products x * grad of one tap are summed over the four
            # parities first, so each tap costs one cross-thread reduction per image. The tap
            # loops are runtime loops on purpose: fully unrolled, the compiler hoists every
            # grad load of the image at once and runs out of registers.
            if HAS_GQ:
                # q(o) reads x(o - PQ + dy): x(2a+pi) receives grad_q(2a+pi+PQ-dy) at tap dy.
                gq_base = gq_ptr + img64 * tq * C
                for tap in range(K * K):
                    dy = tap // K
                    dx = tap % K
                    w = tl.load(wq_ptr + tap * C + c, mask=cmask, other=0.0).to(ACC)
                    prod = tl.zeros((TILE_H * TILE_W, BLOCK_C), dtype=ACC)
                    for pi in tl.static_range(2):
                        orow = 2 * a + (pi + PQ - dy)
                        row_ok = (orow >= 0) & (orow < Hq)
                        for pj in tl.static_range(2):
                            ocol = 2 * b + (pj + PQ - dx)
                            ok = row_ok & (ocol >= 0) & (ocol < Wq)
                            tok = (HAS_CLS + orow * Wq + ocol).to(tl.int64)
                            g = tl.load(gq_base + tok[:, None] * C + c[None, :], mask=ok[:, None] & m,
                                        other=0.0).to(ACC)
                            if BN:
                                o = tl.load(outq_ptr + img64 * tq * C + tok[:, None] * C + c[None, :],
                                            mask=ok[:, None] & m, other=0.0).to(ACC)
                                g = _bn_grad(g, o, ok, bn_ptr, 0, C, c, cmask)
                            g00, g01, g10, g11 = _add4(pi, pj, g00, g01, g10, g11, g * w[None, :])
                            prod += _pick4(pi, pj, x00, x01, x10, x11) * g
                    gwq += tl.where(kk[:, None] == tap, tl.sum(prod, axis=0)[None, :], 0.0)

            if HAS_GKV:
                # k/v(o) reads x(2o - PKV + dy): x(2a+pi) receives grad_k/v(a+ko) at tap
                # dy = pi + PKV - 2*ko, for the ko that put dy in [0, K).
                gk_base = gk_ptr + img64 * tk * C
                gv_base = gv_ptr + img64 * tk * C
                for pi in tl.static_range(2):
                    for pj in tl.static_range(2):
                        xv = _pick4(pi, pj, x00, x01, x10, x11)
                        delta = tl.zeros((TILE_H * TILE_W, BLOCK_C), dtype=ACC)
                        for ko_r in range(-((K - 1 - pi - PKV) // 2), (pi + PKV) // 2 + 1):
                            dy = pi + PKV - 2 * ko_r
                            orow = a + ko_r
                            row_ok = (orow >= 0) & (orow < Hk)
                            for ko_c in range(-((K - 1 - pj - PKV) // 2), (pj + PKV) // 2 + 1):
                                tap = dy * K + pj + PKV - 2 * ko_c
                                ocol = b + ko_c
                                ok = row_ok & (ocol >= 0) & (ocol < Wk)
                                tok = (HAS_CLS + orow * Wk + ocol).to(tl.int64)
                                gk = tl.load(gk_base + tok[:, None] * C + c[None, :], mask=ok[:, None] & m,
                                             other=0.0).to(ACC)
                                if BN:
                                    o = tl.load(outk_ptr + img64 * tk * C + tok[:, None] * C + c[None, :],
                                                mask=ok[:, None] & m, other=0.0).to(ACC)
                                    gk = _bn_grad(gk, o, ok, bn_ptr, 1, C, c, cmask)
                                w = tl.load(wk_ptr + tap * C + c, mask=cmask, other=0.0).to(ACC)
                                delta += gk * w[None, :]
                                gwk += tl.where(kk[:, None] == tap, tl.sum(xv * gk, axis=0)[None, :], 0.0)
                                if HAS_GV:
                                    gv = tl.load(gv_base + tok[:, None] * C + c[None, :], mask=ok[:, None] & m,
                                                 other=0.0).to(ACC)
                                    if BN:
                                        o = tl.load(outv_ptr + img64 * tk * C + tok[:, None] * C + c[None, :],
                                                    mask=ok[:, None] & m, other=0.0).to(ACC)
                                        gv = _bn_grad(gv, o, ok, bn_ptr, 2, C, c, cmask)
                                    w = tl.load(wv_ptr + tap * C + c, mask=cmask, other=0.0).to(ACC)
                                    delta += gv * w[None, :]
                                    gwv += tl.where(kk[:, None] == tap, tl.sum(xv * gv, axis=0)[None, :], 0.0)
                        g00, g01, g10, g11 = _add4(pi, pj, g00, g01, g10, g11, delta)

            gx_base = gx_ptr + img64 * t_in * C
            tl.store(gx_base + tok00[:, None] * C + c[None, :], g00.to(gx_ty), mask=ok00[:, None] & m)
            tl.store(gx_base + tok01[:, None] * C + c[None, :], g01.to(gx_ty), mask=ok01[:, None] & m)
            tl.store(gx_base + tok10[:, None] * C + c[None, :], g10.to(gx_ty), mask=ok10[:, None] & m)
            tl.store(gx_base + tok11[:, None] * C + c[None, :], g11.to(gx_ty), mask=ok11[:, None] & m)
            if HAS_CLS:
                if pid_t == 0:
                    _store_cls_grad(gx_base, gq_ptr + img64 * tq * C, gk_ptr + img64 * tk * C,
                                    gv_ptr + img64 * tk * C, c, cmask, HAS_GQ, HAS_GKV, HAS_GV, BLOCK_C, ACC)

    _store_weight_partials(gw_part_ptr, gwq, gwk, gwv, pid_g * num_tiles + pid_t, C, c, cmask, kk, K)


@triton.jit
def _store_cls_grad(gx_base, gq_base, gk_base, gv_base, c, cmask,
                    HAS_GQ: tl.constexpr, HAS_GKV: tl.constexpr, HAS_GV: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """grad of the cls row: it was copied into q, k and v, so its gradient is the sum of theirs."""
    acc = tl.zeros((BLOCK_C,), dtype=ACC)
    if HAS_GQ:
        acc += tl.load(gq_base + c, mask=cmask, other=0.0).to(ACC)
    if HAS_GKV:
        acc += tl.load(gk_base + c, mask=cmask, other=0.0).to(ACC)
        if HAS_GV:
            acc += tl.load(gv_base + c, mask=cmask, other=0.0).to(ACC)
    tl.store(gx_base + c, acc.to(gx_base.dtype.element_ty), mask=cmask)


@triton.jit
def _store_weight_partials(gw_part_ptr, gwq, gwk, gwv, row, C, c, cmask, kk, K: tl.constexpr):
    """Partial weight gradients of one program -> gw_part[row, branch, tap, c] (fp32)."""
    base = gw_part_ptr + row.to(tl.int64) * (3 * K * K) * C
    offs = kk[:, None] * C + c[None, :]
    m = (kk[:, None] < K * K) & cmask[None, :]
    tl.store(base + offs, gwq, mask=m)
    tl.store(base + K * K * C + offs, gwk, mask=m)
    tl.store(base + 2 * K * K * C + offs, gwv, mask=m)


@triton.jit
def _bwd_generic_kernel(
    x_ptr, gq_ptr, gk_ptr, gv_ptr, wq_ptr, wk_ptr, wv_ptr, gx_ptr, gw_part_ptr,
    outq_ptr, outk_ptr, outv_ptr, bn_ptr,
    B, C, H, W, Hq, Wq, Hk, Wk, tiles_w, num_tiles, images_per_program,
    x_stride_b, x_stride_t,
    HAS_CLS: tl.constexpr, K: tl.constexpr,
    SQ: tl.constexpr, PQ: tl.constexpr, SKV: tl.constexpr, PKV: tl.constexpr,
    HAS_GQ: tl.constexpr, HAS_GKV: tl.constexpr, HAS_GV: tl.constexpr, BN: tl.constexpr,
    KK_PAD: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    """Any strides: per x tile and tap, gather the one output of each branch that read it."""
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_g = tl.program_id(2)

    p = tl.arange(0, TILE_H * TILE_W)
    r = (pid_t // tiles_w) * TILE_H + p // TILE_W
    s = (pid_t % tiles_w) * TILE_W + p % TILE_W
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    kk = tl.arange(0, KK_PAD)
    tq = HAS_CLS + Hq * Wq
    tk = HAS_CLS + Hk * Wk
    t_in = HAS_CLS + H * W
    ok_x = (r < H) & (s < W)
    tok_x = (HAS_CLS + r * W + s).to(tl.int64)
    m = cmask[None, :]

    gwq = tl.zeros((KK_PAD, BLOCK_C), dtype=ACC)
    gwk = tl.zeros((KK_PAD, BLOCK_C), dtype=ACC)
    gwv = tl.zeros((KK_PAD, BLOCK_C), dtype=ACC)

    for i in range(images_per_program):
        img = pid_g * images_per_program + i
        if img < B:
            img64 = img.to(tl.int64)
            x_base = x_ptr + img64 * x_stride_b
            xv = tl.load(x_base + tok_x[:, None] * x_stride_t + c[None, :], mask=ok_x[:, None] & m,
                         other=0.0).to(ACC)
            gx = tl.zeros((TILE_H * TILE_W, BLOCK_C), dtype=ACC)
            gq_base = gq_ptr + img64 * tq * C
            gk_base = gk_ptr + img64 * tk * C
            gv_base = gv_ptr + img64 * tk * C
            # A runtime tap loop, as in the s1s2 backward: unrolled, the compiler hoists every
            # tap's gradient loads at once and spills (16-bit inputs: 255 registers).
            for tap in range(K * K):
                dy = tap // K
                dx = tap % K
                if HAS_GQ:
                    # x(r) is read by q(o) at tap dy iff o*SQ = r + PQ - dy; masked lanes
                    # (negative numerators) never load, so C-style % and // are harmless.
                    nr = r + PQ - dy
                    nc = s + PQ - dx
                    orow = nr // SQ
                    ocol = nc // SQ
                    ok = ok_x & (nr >= 0) & (nc >= 0) & (nr % SQ == 0) & (nc % SQ == 0) \
                        & (orow < Hq) & (ocol < Wq)
                    tok = (HAS_CLS + orow * Wq + ocol).to(tl.int64)
                    g = tl.load(gq_base + tok[:, None] * C + c[None, :], mask=ok[:, None] & m,
                                other=0.0).to(ACC)
                    if BN:
                        o = tl.load(outq_ptr + img64 * tq * C + tok[:, None] * C + c[None, :], mask=ok[:, None] & m,
                                    other=0.0).to(ACC)
                        g = _bn_grad(g, o, ok, bn_ptr, 0, C, c, cmask)
                    gx, gwq = _tap_backward(gx, gwq, xv, g, wq_ptr, C, c, cmask, kk, tap)
                if HAS_GKV:
                    nr = r + PKV - dy
                    nc = s + PKV - dx
                    orow = nr // SKV
                    ocol = nc // SKV
                    ok = ok_x & (nr >= 0) & (nc >= 0) & (nr % SKV == 0) & (nc % SKV == 0) \
                        & (orow < Hk) & (ocol < Wk)
                    tok = (HAS_CLS + orow * Wk + ocol).to(tl.int64)
                    g = tl.load(gk_base + tok[:, None] * C + c[None, :], mask=ok[:, None] & m,
                                other=0.0).to(ACC)
                    if BN:
                        o = tl.load(outk_ptr + img64 * tk * C + tok[:, None] * C + c[None, :], mask=ok[:, None] & m,
                                    other=0.0).to(ACC)
                        g = _bn_grad(g, o, ok, bn_ptr, 1, C, c, cmask)
                    gx, gwk = _tap_backward(gx, gwk, xv, g, wk_ptr, C, c, cmask, kk, tap)
                    if HAS_GV:
                        g = tl.load(gv_base + tok[:, None] * C + c[None, :], mask=ok[:, None] & m,
                                    other=0.0).to(ACC)
                        if BN:
                            o = tl.load(outv_ptr + img64 * tk * C + tok[:, None] * C + c[None, :],
                                        mask=ok[:, None] & m, other=0.0).to(ACC)
                            g = _bn_grad(g, o, ok, bn_ptr, 2, C, c, cmask)
                        gx, gwv = _tap_backward(gx, gwv, xv, g, wv_ptr, C, c, cmask, kk, tap)
            gx_base = gx_ptr + img64 * t_in * C
            tl.store(gx_base + tok_x[:, None] * C + c[None, :], gx.to(gx_ptr.dtype.element_ty),
                     mask=ok_x[:, None] & m)
            if HAS_CLS:
                if pid_t == 0:
                    _store_cls_grad(gx_base, gq_base, gk_base, gv_base, c, cmask, HAS_GQ, HAS_GKV, HAS_GV, BLOCK_C, ACC)

    _store_weight_partials(gw_part_ptr, gwq, gwk, gwv, pid_g * num_tiles + pid_t, C, c, cmask, kk, K)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------


def _check_launch(x: torch.Tensor, weights, padding_q: int, padding_kv: int) -> int:
    """What these kernels need to launch; returns the kernel size. The inputs themselves were
    checked by the op that calls them (cvt_fast/ops/contract.py): shapes, dtypes, devices and
    the grid's fit are trusted here."""
    launch.check_device(x, _INTERPRET, "the Triton conv_proj kernels")
    # One odd kernel size (supported.py says why); padding below it keeps every tap range non-empty.
    sizes = tuple(w.shape[-1] for w in weights)
    problem = supported.conv_proj_kernel_size_problem(sizes)
    if problem is not None:
        raise ValueError(f"the Triton conv_proj kernels need {problem}")
    kernel = sizes[0]
    for name, padding in (("padding_q", padding_q), ("padding_kv", padding_kv)):
        if not padding < kernel:
            raise ValueError(f"{name} must be below the kernel size {kernel} for the Triton kernels, got {padding}")
    return kernel


def _run(kernel, grid: tuple, args: tuple, **meta) -> None:
    """The one place this module launches a kernel (bench/kernels_report.py records the launches
    here to compile them ahead of time)."""
    kernel[launch.check_grid(grid, "conv_proj")](*args, **meta)


def _forward_grid(num_tiles: int, c_blocks: int, batch: int) -> tuple:
    """The forward kernels' grid: one axis of num_tiles * c_blocks * batch programs
    (_split_forward_program). Axis 0 takes 2^31 - 1 programs; the batch used to be axis 2 (65535).
    The statistics and backward kernels keep (tiles, c_blocks, groups): their image groups are
    sized to about _BWD_TARGET_PROGRAMS programs in all, far below 65535."""
    return (num_tiles * c_blocks * batch,)


def _taps_major(weight: torch.Tensor) -> torch.Tensor:
    """(C, 1, k, k) depthwise weights as (k*k, C): a tap's weights for a block of channels are
    then one contiguous (vectorised) load, where the (C, k*k) layout gathers them k*k apart."""
    channels = weight.shape[0]
    return weight.reshape(channels, -1).t().contiguous()


def _block_c(channels: int) -> int:
    return min(_BLOCK_C_MAX, triton.next_power_of_2(channels))


def _tile(generic: bool) -> Tuple[int, int]:
    if _INTERPRET:
        return _TILE_INTERPRET
    return _TILE_GENERIC if generic else _TILE_S1S2


def _shift_range(lo: int, hi: int) -> Tuple[int, int]:
    """(offset, count) for a static loop over the integers lo..hi inclusive: value = index - offset."""
    return -lo, hi - lo + 1


def _output_sizes(height: int, width: int, kernel: int, stride_q: int, stride_kv: int, padding_q: int,
                  padding_kv: int) -> Tuple[int, int, int, int]:
    return (_output_size(height, kernel, stride_q, padding_q), _output_size(width, kernel, stride_q, padding_q),
            _output_size(height, kernel, stride_kv, padding_kv), _output_size(width, kernel, stride_kv, padding_kv))


def _output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Spatial size after a convolution (floor mode), as nn.Conv2d computes it (and the op's checks,
    cvt_fast.ops.contract.output_size: tests/test_kernels_are_leaves.py holds the two equal)."""
    return (size + 2 * padding - kernel) // stride + 1


def _branch_groups(stride_q: int, stride_kv: int, padding_q: int, padding_kv: int) -> list:
    """The generic kernels' launches: (first branch, number of branches, stride, padding) for each
    distinct (stride, padding) among q (branch 0) and k, v (branches 1, 2)."""
    if stride_q == stride_kv and padding_q == padding_kv:
        return [(0, 3, stride_q, padding_q)]
    return [(0, 1, stride_q, padding_q), (1, 2, stride_kv, padding_kv)]


def _images_per_program(batch: int, per_image: int) -> int:
    """Images one program loops over, so that about _BWD_TARGET_PROGRAMS programs remain: the
    per-program partial buffers (weight gradients, statistics) then stay small."""
    return max(1, min(batch, (per_image * batch) // _BWD_TARGET_PROGRAMS))


@launch.on_device_of(0)
def _forward(x: torch.Tensor, weights: tuple, biases: tuple, norm: Optional[torch.Tensor], kernel: int,
             height: int, width: int, has_cls: bool, stride_q: int, stride_kv: int, padding_q: int,
             padding_kv: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward: weights tap-major (k*k, C); biases (C,) or None; norm: None, or the
    BatchNorm epilogue's (3, 3, C) [mean, gamma * invstd, beta] per branch."""
    channels = x.shape[2]
    batch = x.shape[0]
    cls = int(has_cls)
    hq, wq, hk, wk = _output_sizes(height, width, kernel, stride_q, stride_kv, padding_q, padding_kv)
    q = torch.empty((batch, cls + hq * wq, channels), dtype=x.dtype, device=x.device)
    k = torch.empty((batch, cls + hk * wk, channels), dtype=x.dtype, device=x.device)
    v = torch.empty_like(k)
    if batch == 0:
        return q, k, v
    biases = [bias.contiguous() if bias is not None else None for bias in biases]
    block_c = _block_c(channels)
    c_blocks = triton.cdiv(channels, block_c)
    norm_arg = norm if norm is not None else x

    if stride_q == 1 and stride_kv == 2:
        tile_h, tile_w = _tile(generic=False)
        # The half-resolution grid must cover every k/v output and every q parity pair.
        ha, wa = max(hk, triton.cdiv(hq, 2)), max(wk, triton.cdiv(wq, 2))
        tiles_w = triton.cdiv(wa, tile_w)
        r_off, nr = _s1s2_rows(kernel, padding_q, padding_kv)
        num_tiles = triton.cdiv(ha, tile_h) * tiles_w
        _run(
            _fwd_s1s2_kernel, _forward_grid(num_tiles, c_blocks, batch),
            (x, *weights, *(bias if bias is not None else x for bias in biases), norm_arg, q, k, v,
             channels, height, width, hq, wq, hk, wk, tiles_w, num_tiles, x.stride(0), x.stride(1)),
            HAS_CLS=cls, K=kernel, PQ=padding_q, PKV=padding_kv, R_OFF=r_off, NR=nr,
            HAS_BQ=biases[0] is not None, HAS_BK=biases[1] is not None, HAS_BV=biases[2] is not None,
            NORM=norm is not None,
            TILE_H=tile_h, TILE_W=tile_w, BLOCK_C=block_c, ACC=launch.tl_acc_dtype(x.dtype), num_warps=_NUM_WARPS,
        )
        return q, k, v

    # Generic path: one launch per distinct (stride, padding), each computing all its branches.
    outputs, sizes = (q, k, v), ((hq, wq), (hk, wk), (hk, wk))
    tile_h, tile_w = _tile(generic=True)
    for first, n, stride, padding in _branch_groups(stride_q, stride_kv, padding_q, padding_kv):
        ws = tuple(weights[first:first + n]) + (weights[first],) * (3 - n)
        bs = tuple(biases[first:first + n]) + (None,) * (3 - n)
        outs = tuple(outputs[first:first + n]) + (outputs[first],) * (3 - n)
        ho, wo = sizes[first]
        tiles_w = triton.cdiv(wo, tile_w)
        num_tiles = triton.cdiv(ho, tile_h) * tiles_w
        _run(
            _fwd_generic_kernel, _forward_grid(num_tiles, c_blocks, batch),
            (x, *ws, *(bias if bias is not None else x for bias in bs), norm_arg, *outs,
             channels, height, width, ho, wo, tiles_w, num_tiles, x.stride(0), x.stride(1)),
            HAS_CLS=cls, K=kernel, STRIDE=stride, PAD=padding, NUM_OUT=n,
            HAS_B0=bs[0] is not None, HAS_B1=bs[1] is not None, HAS_B2=bs[2] is not None,
            NORM=norm is not None, BRANCH0=first,
            TILE_H=tile_h, TILE_W=tile_w, BLOCK_C=block_c, ACC=launch.tl_acc_dtype(x.dtype), num_warps=_NUM_WARPS,
        )
    return q, k, v


def _s1s2_rows(kernel: int, padding_q: int, padding_kv: int) -> Tuple[int, int]:
    """Offsets ry of the x rows 2a+ry that q (ry = pi - PQ + dy) or k/v (ry = dy - PKV) read."""
    return _shift_range(min(-padding_q, -padding_kv), max(kernel - padding_q, kernel - 1 - padding_kv))


def conv_proj_forward(
    x: torch.Tensor,
    weight_q: torch.Tensor, weight_k: torch.Tensor, weight_v: torch.Tensor,
    bias_q: Optional[torch.Tensor], bias_k: Optional[torch.Tensor], bias_v: Optional[torch.Tensor],
    height: int, width: int, has_cls: bool,
    stride_q: int = 1, stride_kv: int = 2, padding_q: int = 1, padding_kv: int = 1,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v = the three depthwise convolutions of the token grid (see cvt_fast.ops.conv_proj).

    x: (B, has_cls + height*width, C), channels contiguous; weights (C, 1, k, k), odd k, the same
    for all three; biases (C,) or None; all in x's dtype and on its device. Returns contiguous
    q (B, has_cls + Hq*Wq, C), k and v (B, has_cls + Hk*Wk, C) in x's dtype (fp32 accumulation).
    Inputs as the op checks them (cvt_fast.ops.contract.check_conv_proj); only the launch is checked here.
    """
    kernel = _check_launch(x, (weight_q, weight_k, weight_v), padding_q, padding_kv)
    weights = tuple(_taps_major(w) for w in (weight_q, weight_k, weight_v))
    return _forward(x, weights, (bias_q, bias_k, bias_v), None, kernel, height, width, has_cls, stride_q, stride_kv,
                    padding_q, padding_kv)


@launch.on_device_of(0)
def _grid_reductions(x: torch.Tensor, weights: tuple, kernel: int, height: int, width: int, has_cls: bool,
                     stride_q: int, stride_kv: int, padding_q: int, padding_kv: int,
                     grads: Optional[tuple] = None, centre: Optional[torch.Tensor] = None) -> list:
    """Launch the statistics kernels and reduce their per-program partial rows (deterministically,
    in torch, over a few hundred rows). weights tap-major (k*k, C).

    grads None (forward): per branch q, k, v the (count, mean, M2) merged over the grid rows, as a
    list of three (rows, 3, C) partial tensors' reductions: returns [(mean, var_biased)] * 3.
    grads given (backward, with centre (2, 3, C) = [mean; invstd]): returns [(sum dy, sum dy * x_hat)] * 3.
    """
    batch, _, channels = x.shape
    cls = int(has_cls)
    hq, wq, hk, wk = _output_sizes(height, width, kernel, stride_q, stride_kv, padding_q, padding_kv)
    acc = launch.tl_acc_dtype(x.dtype)
    part_dtype = launch.acc_dtype(x.dtype)
    nstat = 3 if grads is None else 2
    block_c = _block_c(channels)
    c_blocks = triton.cdiv(channels, block_c)
    gq, gk, gv = grads if grads is not None else (x, x, x)
    centre_arg = centre if centre is not None else x
    fused = stride_q == 1 and stride_kv == 2
    tile_h, tile_w = _tile(generic=not fused)
    if fused:
        launches = [(0, 3, None, None, max(hk, triton.cdiv(hq, 2)), max(wk, triton.cdiv(wq, 2)))]
    else:
        sizes = ((hq, wq), (hk, wk), (hk, wk))
        launches = [(first, n, stride, padding, *sizes[first])
                    for first, n, stride, padding in _branch_groups(stride_q, stride_kv, padding_q, padding_kv)]
    per_branch = [None, None, None]
    for first, n, stride, padding, ha, wa in launches:
        tiles_w = triton.cdiv(wa, tile_w)
        num_tiles = triton.cdiv(ha, tile_h) * tiles_w
        images_per_program = _images_per_program(batch, num_tiles * c_blocks)
        groups = triton.cdiv(batch, images_per_program)
        part = torch.empty((groups * num_tiles, n, nstat, channels), dtype=part_dtype, device=x.device)
        grid = (num_tiles, c_blocks, groups)
        meta = dict(HAS_CLS=cls, K=kernel, GRAD=grads is not None, TILE_H=tile_h, TILE_W=tile_w, BLOCK_C=block_c,
                    ACC=acc, num_warps=_NUM_WARPS)
        if fused:
            r_off, nr = _s1s2_rows(kernel, padding_q, padding_kv)
            _run(_stats_s1s2_kernel, grid,
                 (x, *weights, gq, gk, gv, centre_arg, part, batch, channels, height, width, hq, wq, hk, wk,
                  tiles_w, num_tiles, images_per_program, x.stride(0), x.stride(1)),
                 PQ=padding_q, PKV=padding_kv, R_OFF=r_off, NR=nr, **meta)
        else:
            ws = tuple(weights[first:first + n]) + (weights[first],) * (3 - n)
            gs = tuple((gq, gk, gv)[first:first + n]) + (gq,) * (3 - n)
            _run(_stats_generic_kernel, grid,
                 (x, *ws, *gs, centre_arg, part, batch, channels, height, width, ha, wa, tiles_w, num_tiles,
                  images_per_program, x.stride(0), x.stride(1)),
                 STRIDE=stride, PAD=padding, NUM_OUT=n, BRANCH0=first, **meta)
        for i in range(n):
            per_branch[first + i] = part[:, i]
    if grads is not None:
        sums = [p.sum(dim=0) for p in per_branch]  # (2, C) each: sum dy, sum dy * x_hat
        return [(s[0], s[1]) for s in sums]
    return [_merged_moments(p) for p in per_branch]


def _merged_moments(part: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased variance) per channel from per-program (count, mean, M2) rows (rows, 3, C):
    Chan's merge of all rows at once, M2 = sum M2_i + sum n_i (mean_i - mean)^2, every term a deviation."""
    count, means, m2 = part[:, 0], part[:, 1], part[:, 2]
    total = count.sum(dim=0)
    mean = (count * means).sum(dim=0) / total
    m2_total = m2.sum(dim=0) + (count * (means - mean).square()).sum(dim=0)
    return mean, m2_total / total


def conv_proj_bn_forward(
    x: torch.Tensor, weight_q: torch.Tensor, weight_k: torch.Tensor, weight_v: torch.Tensor,
    gamma_q: torch.Tensor, gamma_k: torch.Tensor, gamma_v: torch.Tensor,
    beta_q: torch.Tensor, beta_k: torch.Tensor, beta_v: torch.Tensor,
    height: int, width: int, has_cls: bool, stride_q: int, stride_kv: int, padding_q: int, padding_kv: int,
    eps: list,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """conv_proj + training-mode BatchNorm (see cvt_fast.ops.conv_proj_bn) in two passes over x:
    the statistics kernel (reads x, writes a few hundred partial rows), then the forward kernel with
    the normalisation in its epilogue (reads x, writes q, k, v with the cls row in place).
    Returns q, k, v and the (3, C) batch mean and biased variance (fp32; fp64 for fp64 x)."""
    kernel = _check_launch(x, (weight_q, weight_k, weight_v), padding_q, padding_kv)
    geometry = (height, width, has_cls, stride_q, stride_kv, padding_q, padding_kv)
    weights = tuple(_taps_major(w) for w in (weight_q, weight_k, weight_v))
    stats = launch.acc_dtype(x.dtype)
    # The op guarantees more than one grid value per channel (so at least one image).
    moments = _grid_reductions(x, weights, kernel, *geometry)
    mean = torch.stack([m for m, _ in moments])
    var = torch.stack([v for _, v in moments])
    invstd = (var + var.new_tensor(eps)[:, None]).rsqrt()
    gamma = torch.stack([gamma_q, gamma_k, gamma_v]).to(stats)
    beta = torch.stack([beta_q, beta_k, beta_v]).to(stats)
    norm = torch.stack([mean, gamma * invstd, beta], dim=1).contiguous()  # (3, 3, C)
    q, k, v = _forward(x, weights, (None,) * 3, norm, kernel, *geometry)
    return q, k, v, mean, var


def conv_proj_bn_backward(
    grad_q: torch.Tensor, grad_k: torch.Tensor, grad_v: torch.Tensor, x: torch.Tensor,
    weight_q: torch.Tensor, weight_k: torch.Tensor, weight_v: torch.Tensor,
    gamma_q: torch.Tensor, gamma_k: torch.Tensor, gamma_v: torch.Tensor,
    beta_q: torch.Tensor, beta_k: torch.Tensor, beta_v: torch.Tensor,
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
    height: int, width: int, has_cls: bool, stride_q: int, stride_kv: int, padding_q: int, padding_kv: int,
    eps: list,
) -> Tuple[torch.Tensor, ...]:
    """Gradients (grad_x, grad_wq, grad_wk, grad_wv, grad_gamma (3, C), grad_beta (3, C)) of
    conv_proj_bn_forward, in two passes: the statistics kernel in its gradient mode (reads x and the
    output gradients, recomputes y, sums dy and dy * x_hat per channel), then the conv_proj backward
    kernel, which turns each output gradient it gathers into the convolution's (_bn_grad, reading the
    forward's output beside it) before the transposed convolution and the weight gradients."""
    kernel = _check_launch(x, (weight_q, weight_k, weight_v), padding_q, padding_kv)
    geometry = (height, width, has_cls, stride_q, stride_kv, padding_q, padding_kv)
    weights = tuple(_taps_major(w) for w in (weight_q, weight_k, weight_v))
    grads = tuple(g.contiguous() for g in (grad_q, grad_k, grad_v))
    outputs = tuple(t.contiguous() for t in (q, k, v))
    batch, _, channels = x.shape
    stats = mean.dtype
    invstd = (var + var.new_tensor(eps)[:, None]).rsqrt()
    centre = torch.stack([mean, invstd]).contiguous()  # (2, 3, C)
    sums = _grid_reductions(x, weights, kernel, *geometry, grads=grads, centre=centre)
    sum_dy = torch.stack([s for s, _ in sums])
    sum_dy_xhat = torch.stack([s for _, s in sums])
    cls = int(has_cls)
    count = torch.tensor([batch * (t.shape[1] - cls) for t in outputs], dtype=stats, device=x.device)[:, None]
    gamma = torch.stack([gamma_q, gamma_k, gamma_v]).to(stats)
    beta = torch.stack([beta_q, beta_k, beta_v]).to(stats)
    a = gamma * invstd
    b = invstd * sum_dy_xhat / count
    coefficients = torch.stack([a, b, b * beta - a * sum_dy / count], dim=1)  # (3, [a, b, e], C): see _bn_grad
    grad_x, grad_wq, grad_wk, grad_wv = _backward(grads, x, (weight_q, weight_k, weight_v), weights, kernel,
                                                  *geometry, outputs=outputs, bn=coefficients.contiguous())
    return (grad_x, grad_wq, grad_wk, grad_wv, sum_dy_xhat.to(gamma_q.dtype), sum_dy.to(beta_q.dtype))


def conv_proj_backward(
    grad_q: Optional[torch.Tensor], grad_k: Optional[torch.Tensor], grad_v: Optional[torch.Tensor],
    x: torch.Tensor,
    weight_q: torch.Tensor, weight_k: torch.Tensor, weight_v: torch.Tensor,
    height: int, width: int, has_cls: bool,
    stride_q: int = 1, stride_kv: int = 2, padding_q: int = 1, padding_kv: int = 1,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight_q, grad_weight_k, grad_weight_v) of conv_proj_forward.

    grad_*: gradients of q, k, v (shapes of the forward outputs, x's dtype) or None for an
    output that received none (treated as zeros). grad_x has x's shape and dtype and includes
    the cls row (grad_q[:, 0] + grad_k[:, 0] + grad_v[:, 0]); grad weights are (C, 1, k, k),
    accumulated in fp32 over batch and positions, returned in the weights' dtype. Bias
    gradients are not computed here (they are sums of the output gradients over tokens). Inputs as
    the op checks them (cvt_fast.ops.contract.check_conv_proj_backward); only the launch is checked here.
    """
    kernel = _check_launch(x, (weight_q, weight_k, weight_v), padding_q, padding_kv)
    # The kernels index the output gradients densely (token * C + channel).
    gq, gk, gv = (None if g is None else g.contiguous() for g in (grad_q, grad_k, grad_v))
    # The kernels treat k and v as one branch (same grid); a missing grad_k with a present
    # grad_v is handled by swapping the pair's roles, which is symmetric.
    wk_, wv_ = weight_k, weight_v
    swapped = gk is None and gv is not None
    if swapped:
        gk, gv, wk_, wv_ = gv, None, weight_v, weight_k
    originals = (weight_q, wk_, wv_)
    grad_x, grad_wq, grad_wk, grad_wv = _backward((gq, gk, gv), x, originals, tuple(_taps_major(w) for w in originals),
                                                  kernel, height, width, has_cls, stride_q, stride_kv, padding_q,
                                                  padding_kv)
    if swapped:
        grad_wk, grad_wv = grad_wv, grad_wk
    return grad_x, grad_wq, grad_wk, grad_wv


@launch.on_device_of(1)  # x
def _backward(grads: tuple, x: torch.Tensor, originals: tuple, weights: tuple, kernel: int, height: int, width: int,
              has_cls: bool, stride_q: int, stride_kv: int, padding_q: int, padding_kv: int,
              outputs: Optional[tuple] = None, bn: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, ...]:
    """Launch the backward: grads (contiguous or None; grad_k None implies grad_v None), weights
    tap-major (originals: the (C, 1, k, k) tensors, for the gradients' dtypes). With bn (3, 3, C) [a, b, e] and
    the forward's outputs, the grads are BatchNorm's output gradients (see _bn_grad)."""
    batch, _, channels = x.shape
    cls = int(has_cls)
    gq, gk, gv = grads
    hq, wq, hk, wk = _output_sizes(height, width, kernel, stride_q, stride_kv, padding_q, padding_kv)
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    kk = kernel * kernel
    if batch == 0:
        zeros = torch.zeros_like(originals[0])
        return grad_x, zeros, zeros.clone(), zeros.clone()
    block_c = _block_c(channels)
    c_blocks = triton.cdiv(channels, block_c)
    fused = stride_q == 1 and stride_kv == 2
    tile_h, tile_w = _tile(generic=not fused)
    if fused:
        ha, wa = triton.cdiv(height, 2), triton.cdiv(width, 2)
    else:
        ha, wa = height, width
    tiles_w = triton.cdiv(wa, tile_w)
    num_tiles = triton.cdiv(ha, tile_h) * tiles_w
    images_per_program = _images_per_program(batch, num_tiles * c_blocks)
    groups = triton.cdiv(batch, images_per_program)
    part_dtype = launch.acc_dtype(x.dtype)
    gw_part = torch.empty((groups * num_tiles, 3, kk, channels), dtype=part_dtype, device=x.device)
    dummy = x
    outq, outk, outv = outputs if outputs is not None else (dummy, dummy, dummy)
    common = (x, gq if gq is not None else dummy, gk if gk is not None else dummy,
              gv if gv is not None else dummy, *weights, grad_x, gw_part, outq, outk, outv,
              bn if bn is not None else dummy,
              batch, channels, height, width, hq, wq, hk, wk, tiles_w, num_tiles, images_per_program,
              x.stride(0), x.stride(1))
    flags = dict(HAS_CLS=cls, K=kernel, HAS_GQ=gq is not None, HAS_GKV=gk is not None,
                 HAS_GV=gv is not None, BN=bn is not None, KK_PAD=triton.next_power_of_2(kk),
                 TILE_H=tile_h, TILE_W=tile_w, BLOCK_C=block_c, ACC=launch.tl_acc_dtype(x.dtype), num_warps=_NUM_WARPS)
    grid = (num_tiles, c_blocks, groups)
    if fused:
        _run(_bwd_s1s2_kernel, grid, common, PQ=padding_q, PKV=padding_kv, **flags)
    else:
        _run(_bwd_generic_kernel, grid, common, SQ=stride_q, PQ=padding_q, SKV=stride_kv, PKV=padding_kv, **flags)

    gw = gw_part.sum(dim=0)  # (3, k*k, C), fp32 (fp64 for fp64 inputs)
    gw = gw.permute(0, 2, 1).reshape(3, channels, 1, kernel, kernel)
    return grad_x, gw[0].to(originals[0].dtype), gw[1].to(originals[1].dtype), gw[2].to(originals[2].dtype)
