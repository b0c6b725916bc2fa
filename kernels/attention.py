"""Flash-style multi-head attention with K/V shorter than Q, as Triton kernels.

What it computes (per batch b, head h, query row i):
    out[b, i, h*d:(h+1)*d] = softmax_j(scale * q[b,i,h] . k[b,j,h]) @ v[b,:,h]
    lse[b, h, i]           = log(sum_j exp(scale * q[b,i,h] . k[b,j,h]))   (natural log, fp32)
q: (B, Nq, H, d), k/v: (B, Nkv, H, d), read in place through their strides (only the last
dim must be contiguous), so the Linear outputs `proj_q(x).view(B, N, H, d)` need no copy.
out is written as (B, Nq, H*d), the layout the output Linear `proj` reads.

Tiling
- Forward: one program owns a BLOCK_M tile of queries of one (b, h) and walks over
  K/V in BLOCK_N tiles with the online softmax (running max m, running sum l, rescaled
  accumulator). The q tile, the (BLOCK_M, d) accumulator, m and l stay in registers for
  the whole loop; each K/V tile is streamed through shared memory (software-pipelined by
  num_stages on the GPU). Scores are pre-multiplied by scale*log2(e) so the kernel uses
  exp2, and lse is turned back into natural log at the end.
- Backward, nothing of size Nq x Nkv in memory:
  1. delta kernel: delta[b,h,i] = sum_c dO[b,i,h,c] * O[b,i,h,c] (fp32, one pass over O, dO).
  2. one-pass kernel (the default where the count below favours it): a program owns a BLOCK_N
     tile of K and V (kept in registers with its fp32 dK, dV accumulators) and loops over all
     Q tiles, recomputing P^T = exp2(scale*log2e * K Q^T - lse*log2e) tile by tile:
        dV += P^T dO,  dS^T = P^T * (V dO^T - delta),  dK += dS^T Q,
        dQ[tile] += scale * (K^T dS^T)^T   (this K/V tile's share of the query tile's dQ).
     The shares of the Nkv/BLOCK_N programs of one (b, h) meet by fp32 tl.atomic_add in an
     accumulator zeroed first (dq itself for fp32, an fp32 buffer cast to q's dtype after for
     bf16/fp16). The order of those additions is not fixed, so dQ is NOT bit-reproducible
     from run to run (dK, dV are). When one K/V tile covers Nkv (CvT-13 stage 3: Nkv=50 with
     BLOCK_N=64) there is one share per query row: it is stored, no atomics, deterministic.
  3. split (deterministic): the dK/dV kernel (step 2 without dQ) and a dQ kernel, where a
     program owns a BLOCK_M tile of Q, dO, lse, delta and loops over the K/V tiles:
     dS = P * (dO V^T - delta), dQ += dS K. Taken with CVT_FAST_DETERMINISTIC_ATTENTION=1 or
     torch.use_deterministic_algorithms(True), and for 16-bit inputs with several K/V tiles
     and fewer than ATOMIC_DQ_MIN_KEYS keys, where it moves fewer bytes (count below).
  For float64 inputs (interpreter only) one more pass recomputes lse in fp64 first,
  since the lse the forward returns is float32 by contract.
- All accumulation is fp32 (fp64 for fp64 inputs); on the GPU the tl.dot operands stay
  in the input dtype (bf16/fp16 tensor cores), under the interpreter they are upcast to
  fp32 right after tl.load because the interpreter holds bf16 as raw bits.

Floor (per call), itemsize = bytes per element of q:
- forward: 4*B*H*Nq*Nkv*d FLOPs (S = QK^T and PV); HBM traffic at least
  B*H*d*(2*Nq + 2*Nkv)*itemsize + 4*B*H*Nq bytes (read q, k, v, write out and lse),
  K/V re-reads by the Nq/BLOCK_M programs of one (b, h) being served from L2.
- backward: 10*B*H*Nq*Nkv*d FLOPs (2.5x the forward: S recomputed, dP, dV, dK, dQ), the
  one-pass kernel's count; the split runs 14 units (its dQ kernel recomputes S and dP).
  HBM traffic at least reads of q, k, v, out, dO, lse and writes of dq, dk, dv (plus delta,
  4*B*H*Nq bytes each way).

Which backward (a count, not a measurement: no GPU was at hand; H200 peaks taken as 989
TFLOP/s bf16 dense and 4.8 TB/s). With U = B*H*Nq*Nkv*d and Q = B*H*Nq*d elements, going
from the split to one pass saves 4U FLOPs and the dQ kernel's bytes (q, dO, lse, delta, k, v
read again, dq written: 6Q + 4*B*H*Nkv*d + 8*B*H*Nq bytes at 2 bytes an element), and with
several K/V tiles adds, for 16-bit inputs, the fp32 accumulator: zeroing (4Q), the summed
lines written back (4Q), the cast pass (4Q read, 2Q written), 14Q bytes; plus
ceil(Nkv/BLOCK_N)*4Q bytes of fp32 reductions that stay in L2 (the Nkv/BLOCK_N programs of
one (b, h) run side by side). Net for 16-bit: 4U FLOPs saved against about 8Q bytes, so
one pass wins once 4U/989e12 > 8Q/4.8e12, i.e. Nkv > about 410; ATOMIC_DQ_MIN_KEYS = 512
leaves room for the L2 reductions (about a fifth of the FLOP time saved). CvT-13, batch 256,
bf16, d=64, BLOCK_N=64:
  stage  Nq    Nkv  H  split: FLOPs / HBM      one pass: FLOPs / HBM / L2 atomics  chosen
  1      3136  784  1  564 G / 890 MB          403 G / 1243 MB / 2672 MB          one pass
                       (at peaks: 161 GFLOP saved = 0.16 ms, 353 MB more = 0.07 ms)
  2       784  196  3  106 G / 667 MB           76 G /  932 MB /  617 MB          split
                       (30 GFLOP saved = 0.03 ms, 265 MB more = 0.06 ms)
  3       197   50  6   14 G / 336 MB           10 G /  237 MB /    0 (stored)    one pass
For fp32 inputs the accumulator is dq itself (8Q bytes: zero and write-back, against the dQ
kernel's 12Q), so one pass moves fewer bytes and does fewer FLOPs at every shape.
Stage 3's tiles (Nq=197, Nkv=50): the one-pass config BLOCK_M=32, BLOCK_N=64 uses 78% of
its K/V tile (64 is wgmma's smallest M) and 88% of its query tiles (7 x 32 = 224 rows), the
best the autotune list offers there (64 x 64: 77% of 256 rows); the forward's 64-key tiles
are 78% used, its 64- and 128-row query tiles 77%.
"""
from __future__ import annotations

import math
import os
import struct
from typing import Tuple

import torch
import triton
import triton.language as tl

from . import _launch as launch, supported
from .interpreter import float64_dot_problem

# Triton decides at decoration time whether kernels are interpreted, so remember the
# setting that was in force when this module (and its @triton.jit) was imported.
_INTERPRET = launch.interpreter_on()

__all__ = ["attention_forward", "attention_backward", "SUPPORTED_HEAD_DIMS"]

# The head sizes these kernels are compiled and tuned for, declared in supported.py, where the
# backend table ('triton' record) reads them too.
SUPPORTED_HEAD_DIMS = supported.ATTENTION_HEAD_DIMS

# Globals read inside kernels must be tl.constexpr instances (an annotation is not enough).
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------
@triton.jit
def _split_program(pid, n, BLOCK: tl.constexpr):
    # (b*H + h, tile) of a program of the one-axis grid (b*H + h) * cdiv(n, BLOCK) + tile.
    tiles = tl.cdiv(n, BLOCK)
    return pid // tiles, pid % tiles


@triton.jit
def _scaled(x, hi, lo, SPLIT_SCALE: tl.constexpr):
    # Scalar kernel arguments are fp32; for fp64 inputs the scale is passed as an
    # fp32 pair hi + lo (about 48 significant bits) so fp64 results stay fp64-accurate.
    if SPLIT_SCALE:
        return x * hi + x * lo
    else:
        return x * hi


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out, Lse,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_on,
    H, Nq, Nkv,
    qk_scale_hi, qk_scale_lo,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    SPLIT_SCALE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # One grid axis (see _grid): query tile fastest, then (b, h), so B*H is not bound by axis 1's 65535.
    pid_bh, pid_m = _split_program(tl.program_id(0), Nq, BLOCK_M)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < Nq

    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_m[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    # K is read transposed, (d, BLOCK_N), straight from memory: no in-register transpose.
    kT_base = K + off_b * stride_kb + off_h * stride_kh + offs_d[:, None]
    v_base = V + off_b * stride_vb + off_h * stride_vh + offs_d[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC_DTYPE)
    l_i = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=ACC_DTYPE)

    for start_n in range(0, Nkv, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < Nkv
        kT = tl.load(kT_base + cols[None, :] * stride_kn, mask=mask_n[None, :], other=0.0)
        if UPCAST:
            kT = kT.to(tl.float32)
        s = tl.dot(q, kT, input_precision=DOT_PRECISION).to(ACC_DTYPE)
        s = _scaled(s, qk_scale_hi, qk_scale_lo, SPLIT_SCALE)
        s = tl.where(mask_n[None, :], s, float("-inf"))
        # Nkv >= 1, so the first tile has a finite column and m_new is finite from then on.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * stride_vn, mask=mask_n[:, None], other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    out_ptrs = Out + off_b * stride_ob + offs_m[:, None] * stride_on + off_h * HEAD_DIM + offs_d[None, :]
    tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=mask_m[:, None])
    # m_i is in log2 units of the scaled scores; lse in natural log.
    lse = (m_i + tl.log2(l_i)) * LN2
    tl.store(Lse + pid_bh.to(tl.int64) * Nq + offs_m, lse.to(tl.float32), mask=mask_m)


@triton.jit
def _attn_bwd_delta_kernel(
    O, DO, Delta,
    stride_ob, stride_on,
    stride_dob, stride_don,
    H, Nq,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    # One grid axis (see _grid): query tile fastest, then (b, h), so B*H is not bound by axis 1's 65535.
    pid_bh, pid_m = _split_program(tl.program_id(0), Nq, BLOCK_M)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = (offs_m < Nq)[:, None]
    col = off_h * HEAD_DIM + offs_d[None, :]
    o = tl.load(O + off_b * stride_ob + offs_m[:, None] * stride_on + col, mask=mask, other=0.0)
    do = tl.load(DO + off_b * stride_dob + offs_m[:, None] * stride_don + col, mask=mask, other=0.0)
    delta = tl.sum(o.to(ACC_DTYPE) * do.to(ACC_DTYPE), 1)
    tl.store(Delta + pid_bh.to(tl.int64) * Nq + offs_m, delta, mask=offs_m < Nq)


@triton.jit
def _attn_bwd_lse2_kernel(
    Q, K, Lse2,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    H, Nq, Nkv,
    qk_scale_hi, qk_scale_lo,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    SPLIT_SCALE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Only for float64 inputs: the lse the forward returns is float32 by contract, which
    # would cap the gradients at fp32 accuracy, so the row statistics are recomputed here
    # (one extra pass over K, the forward's loop without V) in log2 units of the scaled
    # scores, the unit the gradient kernels use.
    # One grid axis (see _grid): query tile fastest, then (b, h), so B*H is not bound by axis 1's 65535.
    pid_bh, pid_m = _split_program(tl.program_id(0), Nq, BLOCK_M)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < Nq
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=mask_m[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    kT_base = K + off_b * stride_kb + off_h * stride_kh + offs_d[:, None]
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC_DTYPE)
    l_i = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    for start_n in range(0, Nkv, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < Nkv
        kT = tl.load(kT_base + cols[None, :] * stride_kn, mask=mask_n[None, :], other=0.0)
        if UPCAST:
            kT = kT.to(tl.float32)
        s = tl.dot(q, kT, input_precision=DOT_PRECISION).to(ACC_DTYPE)
        s = _scaled(s, qk_scale_hi, qk_scale_lo, SPLIT_SCALE)
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
        m_i = m_new
    tl.store(Lse2 + pid_bh.to(tl.int64) * Nq + offs_m, m_i + tl.log2(l_i), mask=mask_m)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_don,
    stride_lb, stride_lh, stride_ln,
    stride_dkb, stride_dkn, stride_dkh,
    H, Nq, Nkv,
    qk_scale_hi, qk_scale_lo, scale_hi, scale_lo,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    SPLIT_SCALE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    LSE_LOG2: tl.constexpr,
):
    # One grid axis (see _grid): K/V tile fastest, then (b, h).
    pid_bh, pid_n = _split_program(tl.program_id(0), Nkv, BLOCK_N)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_n = offs_n < Nkv

    k = tl.load(K + off_b * stride_kb + off_h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=mask_n[:, None], other=0.0)
    v = tl.load(V + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                mask=mask_n[:, None], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=ACC_DTYPE)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=ACC_DTYPE)

    qT_base = Q + off_b * stride_qb + off_h * stride_qh + offs_d[:, None]
    do_base = DO + off_b * stride_dob + off_h * HEAD_DIM + offs_d[None, :]
    lse_base = Lse + off_b * stride_lb + off_h * stride_lh
    delta_base = Delta + pid_bh.to(tl.int64) * Nq

    for start_m in range(0, Nq, BLOCK_M):
        rows = start_m + offs_m
        mask_m = rows < Nq
        qT = tl.load(qT_base + rows[None, :] * stride_qn, mask=mask_m[None, :], other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_don, mask=mask_m[:, None], other=0.0)
        if UPCAST:
            qT = qT.to(tl.float32)
            do = do.to(tl.float32)
        lse2 = tl.load(lse_base + rows * stride_ln, mask=mask_m, other=0.0).to(ACC_DTYPE)
        if not LSE_LOG2:
            lse2 = lse2 * LOG2E
        delta = tl.load(delta_base + rows, mask=mask_m, other=0.0)

        sT = tl.dot(k, qT, input_precision=DOT_PRECISION).to(ACC_DTYPE)
        sT = _scaled(sT, qk_scale_hi, qk_scale_lo, SPLIT_SCALE)
        # Padded query columns must not contribute; padded K rows are never stored.
        pT = tl.where(mask_m[None, :], tl.exp2(sT - lse2[None, :]), 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION).to(ACC_DTYPE)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=DOT_PRECISION)

    dk = _scaled(dk, scale_hi, scale_lo, SPLIT_SCALE)
    out_off = off_b * stride_dkb + off_h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :]
    tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=mask_n[:, None])
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=mask_n[:, None])


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_don,
    stride_lb, stride_lh, stride_ln,
    stride_dqb, stride_dqn, stride_dqh,
    H, Nq, Nkv,
    qk_scale_hi, qk_scale_lo, scale_hi, scale_lo,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    SPLIT_SCALE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    LSE_LOG2: tl.constexpr,
):
    # One grid axis (see _grid): query tile fastest, then (b, h), so B*H is not bound by axis 1's 65535.
    pid_bh, pid_m = _split_program(tl.program_id(0), Nq, BLOCK_M)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < Nq

    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=mask_m[:, None], other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * HEAD_DIM + offs_m[:, None] * stride_don + offs_d[None, :],
                 mask=mask_m[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse2 = tl.load(Lse + off_b * stride_lb + off_h * stride_lh + offs_m * stride_ln,
                   mask=mask_m, other=0.0).to(ACC_DTYPE)
    if not LSE_LOG2:
        lse2 = lse2 * LOG2E
    delta = tl.load(Delta + pid_bh.to(tl.int64) * Nq + offs_m, mask=mask_m, other=0.0)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=ACC_DTYPE)
    kT_base = K + off_b * stride_kb + off_h * stride_kh + offs_d[:, None]
    vT_base = V + off_b * stride_vb + off_h * stride_vh + offs_d[:, None]

    for start_n in range(0, Nkv, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < Nkv
        kT = tl.load(kT_base + cols[None, :] * stride_kn, mask=mask_n[None, :], other=0.0)
        vT = tl.load(vT_base + cols[None, :] * stride_vn, mask=mask_n[None, :], other=0.0)
        if UPCAST:
            kT = kT.to(tl.float32)
            vT = vT.to(tl.float32)
        s = tl.dot(q, kT, input_precision=DOT_PRECISION).to(ACC_DTYPE)
        s = _scaled(s, qk_scale_hi, qk_scale_lo, SPLIT_SCALE)
        p = tl.where(mask_n[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, vT, input_precision=DOT_PRECISION).to(ACC_DTYPE)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=DOT_PRECISION)

    dq = _scaled(dq, scale_hi, scale_lo, SPLIT_SCALE)
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqn + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=mask_m[:, None])


@triton.jit
def _attn_bwd_fused_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, DQ,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_don,
    stride_lb, stride_lh, stride_ln,
    stride_dkb, stride_dkn, stride_dkh,
    stride_dqb, stride_dqn, stride_dqh,
    H, Nq, Nkv,
    qk_scale_hi, qk_scale_lo, scale_hi, scale_lo,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    SPLIT_SCALE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    LSE_LOG2: tl.constexpr,
    DQ_ATOMIC: tl.constexpr,
):
    # The dK/dV kernel's loop, plus dQ from the same P and dS tiles: a program owns a BLOCK_N
    # tile of K/V and adds its share dS K of each query tile's dQ into DQ. With several K/V
    # tiles per (b, h) the shares meet in DQ through atomic adds (zeroed by the host: dq itself
    # for fp32/fp64, an fp32 buffer for 16-bit inputs); with one K/V tile (DQ_ATOMIC false, the host checked Nkv <= BLOCK_N) the share is
    # the whole dQ and is stored directly, in order, so the result is deterministic.
    # One grid axis (see _grid): K/V tile fastest, then (b, h).
    pid_bh, pid_n = _split_program(tl.program_id(0), Nkv, BLOCK_N)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_n = offs_n < Nkv

    k = tl.load(K + off_b * stride_kb + off_h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=mask_n[:, None], other=0.0)
    v = tl.load(V + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                mask=mask_n[:, None], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    # Hopper's wgmma needs 64 rows (M) per warp group. For d >= 64 dQ is formed transposed,
    # dQ^T = K^T dS^T, with d as M, so the query tile may be 32 rows; for d < 64 it is
    # dS K with BLOCK_M as M (the d <= 32 configs have BLOCK_M >= 64).
    kT = tl.trans(k)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=ACC_DTYPE)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=ACC_DTYPE)

    qT_base = Q + off_b * stride_qb + off_h * stride_qh + offs_d[:, None]
    do_base = DO + off_b * stride_dob + off_h * HEAD_DIM + offs_d[None, :]
    dq_base = DQ + off_b * stride_dqb + off_h * stride_dqh
    lse_base = Lse + off_b * stride_lb + off_h * stride_lh
    delta_base = Delta + pid_bh.to(tl.int64) * Nq

    for start_m in range(0, Nq, BLOCK_M):
        rows = start_m + offs_m
        mask_m = rows < Nq
        qT = tl.load(qT_base + rows[None, :] * stride_qn, mask=mask_m[None, :], other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_don, mask=mask_m[:, None], other=0.0)
        if UPCAST:
            qT = qT.to(tl.float32)
            do = do.to(tl.float32)
        lse2 = tl.load(lse_base + rows * stride_ln, mask=mask_m, other=0.0).to(ACC_DTYPE)
        if not LSE_LOG2:
            lse2 = lse2 * LOG2E
        delta = tl.load(delta_base + rows, mask=mask_m, other=0.0)

        sT = tl.dot(k, qT, input_precision=DOT_PRECISION).to(ACC_DTYPE)
        sT = _scaled(sT, qk_scale_hi, qk_scale_lo, SPLIT_SCALE)
        # Padded query columns must not contribute to dK/dV, nor padded K rows to dQ (their
        # k = 0 zeroes that share already; the mask keeps P itself exact).
        pT = tl.where(mask_m[None, :] & mask_n[:, None], tl.exp2(sT - lse2[None, :]), 0.0)
        dv = tl.dot(pT.to(do.dtype), do, acc=dv, input_precision=DOT_PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION).to(ACC_DTYPE)
        dsT = (pT * (dpT - delta[None, :])).to(qT.dtype)
        dk = tl.dot(dsT, tl.trans(qT), dk, input_precision=DOT_PRECISION)
        if HEAD_DIM >= 64:  # constexpr: one branch is compiled
            dq_part = tl.dot(kT, dsT, input_precision=DOT_PRECISION).to(ACC_DTYPE)
            dq_ptrs = dq_base + rows[None, :] * stride_dqn + offs_d[:, None]
            dq_mask = mask_m[None, :]
        else:
            dq_part = tl.dot(tl.trans(dsT), k, input_precision=DOT_PRECISION).to(ACC_DTYPE)
            dq_ptrs = dq_base + rows[:, None] * stride_dqn + offs_d[None, :]
            dq_mask = mask_m[:, None]
        dq_part = _scaled(dq_part, scale_hi, scale_lo, SPLIT_SCALE)
        if DQ_ATOMIC:
            tl.atomic_add(dq_ptrs, dq_part, mask=dq_mask, sem="relaxed")
        else:
            tl.store(dq_ptrs, dq_part.to(DQ.dtype.element_ty), mask=dq_mask)

    dk = _scaled(dk, scale_hi, scale_lo, SPLIT_SCALE)
    out_off = off_b * stride_dkb + off_h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :]
    tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=mask_n[:, None])
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=mask_n[:, None])


# --------------------------------------------------------------------------------------
# Launch configurations (GPU autotune lists, fixed fp32 and interpreter configs)
# --------------------------------------------------------------------------------------
def _config(block_m: int, block_n: int, num_warps: int, num_stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)


# bf16/fp16 on the GPU: short autotune lists (every config is compiled once per shape and
# dtype), split by head dim because the register budget is what limits the tiles. Every
# config listed compiles for sm_90 without register spills and with every 16-bit tl.dot on
# wgmma (checked in CI without a GPU: bench/kernels_report.py, tests/test_kernels_report.py).
# - forward: BLOCK_M=128 x BLOCK_N=64, 4 warps, 3 stages is the usual Hopper/Ampere
#   choice for d=64 (q tile and accumulator in registers, three K/V tiles in flight in
#   shared memory); BLOCK_M=64 doubles the number of programs, which matters for CvT
#   stages 1-2 where B*H is small (H=1 and 3). For d=128 the accumulator doubles:
#   128x64 needs 8 warps (with 4 it spills), 64-row tiles fit 4 warps.
# - dK/dV keeps K, V, dK, dV (4 x BLOCK_N x d) in registers and streams Q/dO, so its owned
#   K/V tile is the big one (64-128) and the streamed Q tile small (32-64), as in
#   flash-attention 2; for d=128 only 8-warp configs avoid spilling.
# - dQ keeps Q, dO, dQ (3 x BLOCK_M x d) and streams K/V: the mirror image.
# Configs that do not fit shared memory on a smaller GPU are dropped by the autotuner.
_GPU_CONFIGS = {
    "fwd": {
        64: [_config(128, 64, 4, 3), _config(128, 64, 8, 2), _config(64, 64, 4, 3), _config(64, 32, 4, 3)],
        128: [_config(128, 64, 8, 2), _config(64, 64, 4, 3), _config(64, 32, 4, 3)],
    },
    "dkdv": {
        # Every dot here has BLOCK_N (the owned K/V rows) as its M dimension, and Hopper's wgmma
        # needs 64 rows per warp group: a 32-row K/V tile (once listed for more programs at CvT
        # stage 1, Nkv=784, H=1, small batch) compiles to mma.sync instead (bench/kernels_report.py).
        64: [_config(32, 128, 8, 3), _config(64, 64, 4, 3), _config(32, 64, 4, 3)],
        128: [_config(32, 64, 8, 3), _config(64, 64, 8, 2)],
    },
    "dq": {
        64: [_config(128, 32, 8, 3), _config(64, 64, 4, 3), _config(64, 32, 4, 3)],
        128: [_config(64, 64, 8, 2), _config(64, 32, 4, 3)],
    },
    # The one-pass backward: dK/dV's registers plus a (d, BLOCK_M) fp32 dQ share per step.
    # Its products have BLOCK_N or d as their M dimension for d >= 64 (dQ is formed
    # transposed), so the streamed query tile may be 32 rows; for d <= 32, dQ's product has
    # BLOCK_M as M, so those configs stream 64-row query tiles. CvT-13 stage 3 (Nq=197, Nkv=50) is covered by
    # BLOCK_N=64, BLOCK_M=32: one K/V tile 78% used (50 of 64; 64 is wgmma's smallest M) and
    # 7 query tiles 88% used (197 of 224), against 77% (256 rows) for 64- or 128-row tiles.
    # Stages 1-2 (Nkv=784, 196) also take 64x64 and 32x128 (784 = 12.25 x 64 = 6.1 x 128).
    "fused": {
        32: [_config(64, 64, 4, 3), _config(64, 128, 8, 3)],
        64: [_config(32, 64, 4, 3), _config(64, 64, 4, 3), _config(32, 128, 8, 3)],
        128: [_config(32, 64, 8, 3), _config(64, 64, 8, 2)],
    },
}
# fp32 on the GPU is the accuracy path (tl.dot with input_precision="ieee" runs on FMA
# units, not tensor cores, and needs far more registers): one fixed small config that
# compiles without spills for d up to 128, and no autotuning (which would compile slow
# fp32 variants for nothing).
_GPU_FP32_CONFIG = _config(32, 32, 8, 2)
# ...except where ptxas spills with it (checked by bench/kernels_report.py): the one-pass
# backward at d <= 32 (8 bytes on 8 warps; none on 4; d=128 needs the 8).
_GPU_FP32_CONFIG_BY_GROUP = {("fused", 32): _config(32, 32, 4, 2)}
# The interpreter's cost grows with the number of programs and loop trips, not with the
# tile size; these mid-size tiles still leave several tiles at the small odd test shapes
# (Nq=37, Nkv=50: 2 query tiles x 4 key tiles), so the masks and the online softmax
# across tiles are exercised. dK/dV owns the K/V tile, so its larger block is along Nkv.
_INTERPRETER_CONFIGS = {"fwd": _config(32, 16, 4, 1), "dkdv": _config(16, 32, 4, 1), "dq": _config(32, 16, 4, 1),
                        "fused": _config(16, 32, 4, 1)}
# The delta pass is pure bandwidth (one row tile per program, no reuse): one fixed config.
_DELTA_BLOCK_M = 64
_DELTA_NUM_WARPS = 4

# tests/test_kernel_configs.py swaps each entry of _GPU_CONFIGS into _INTERPRETER_CONFIGS (and
# spies on _KERNELS), so every GPU config also runs on the CPU: keep both read at launch time.
_KERNELS = {"fwd": _attn_fwd_kernel, "dkdv": _attn_bwd_dkdv_kernel, "dq": _attn_bwd_dq_kernel,
            "fused": _attn_bwd_fused_kernel}
_AUTOTUNE_KEY = ["Nq", "Nkv", "HEAD_DIM"]
# The autotuner runs every config on the same arguments: the fused kernel adds into DQ, which
# must start from zero for each of those runs.
_RESET_TO_ZERO = {"fused": ["DQ"]}
# Multi-config autotuning needs a GPU driver; the interpreter uses _INTERPRETER_CONFIGS.
_TUNED = {} if _INTERPRET else {
    (name, d_group): triton.autotune(configs=configs, key=_AUTOTUNE_KEY,
                                     reset_to_zero=_RESET_TO_ZERO.get(name))(_KERNELS[name])
    for name, by_d in _GPU_CONFIGS.items() for d_group, configs in by_d.items()
}
# 16-bit inputs take the one-pass backward with atomic dQ from this many keys (the count in
# the module docstring: the FLOPs saved outweigh the fp32 buffer's bytes from about 410 keys).
ATOMIC_DQ_MIN_KEYS = 512
# Set to 1 for the split backward (bit-reproducible dQ, 14 units of FLOPs instead of 10);
# torch.use_deterministic_algorithms(True) selects it too.
DETERMINISTIC_ENV = "CVT_FAST_DETERMINISTIC_ATTENTION"


def _grid(n: int, block: str, batch_heads: int):
    """grid(meta) of the kernels: one axis of cdiv(n, meta[block]) tiles for each of the batch_heads
    (b, h) pairs, tiles fastest (_split_program), as the former (tiles, B*H) grid ran them. Axis 0 takes
    2^31 - 1 programs, where axis 1 took 65535 (batch 4096 with CvT-W24's 16 heads did not launch)."""
    return lambda meta: launch.check_grid((triton.cdiv(n, meta[block]) * batch_heads,), "attention")


def _launch(name: str, grid, args: tuple, head_dim: int, dtype: torch.dtype, **constexprs) -> None:
    """Launch kernel `name` with the config for this device and dtype; grid(meta) -> launch grid.
    With _run below, the only places this module launches kernels (bench/kernels_report.py
    records the launches there to compile them ahead of time)."""
    if _INTERPRET or dtype == torch.float32:
        cfg = _INTERPRETER_CONFIGS[name] if _INTERPRET else _gpu_fp32_config(name, head_dim)
        options = {} if _INTERPRET else {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        _run(_KERNELS[name], grid(cfg.kwargs), args, HEAD_DIM=head_dim, **cfg.kwargs, **constexprs, **options)
    else:
        _TUNED[(name, _d_group(name, head_dim))][grid](*args, HEAD_DIM=head_dim, **constexprs)


def _block_ns(name: str, head_dim: int, dtype: torch.dtype) -> list:
    """The BLOCK_N values kernel `name` may launch with on this device and dtype (as _launch picks)."""
    if _INTERPRET:
        return [_INTERPRETER_CONFIGS[name].kwargs["BLOCK_N"]]
    if dtype == torch.float32:
        return [_gpu_fp32_config(name, head_dim).kwargs["BLOCK_N"]]
    return [cfg.kwargs["BLOCK_N"] for cfg in _GPU_CONFIGS[name][_d_group(name, head_dim)]]


def _gpu_fp32_config(name: str, head_dim: int) -> triton.Config:
    return _GPU_FP32_CONFIG_BY_GROUP.get((name, _d_group(name, head_dim)), _GPU_FP32_CONFIG)


def _d_group(name: str, head_dim: int) -> int:
    """The key of kernel `name`'s autotune list for head size `head_dim`: the smallest >= it."""
    return min(group for group in _GPU_CONFIGS[name] if group >= head_dim)


def _use_one_pass_backward(Nkv: int, head_dim: int, dtype: torch.dtype) -> Tuple[bool, bool]:
    """(one pass?, dQ added atomically?) by the count in the module docstring."""
    if os.environ.get(DETERMINISTIC_ENV) == "1" or torch.are_deterministic_algorithms_enabled():
        return False, False
    if Nkv <= min(_block_ns("fused", head_dim, dtype)):
        return True, False  # one K/V tile: dQ stored, fewer FLOPs and fewer bytes than the split
    # fp32/fp64 accumulate in dq itself (no buffer, no cast): fewer bytes too. 16-bit inputs pay
    # an fp32 buffer and a cast, worth it only for enough keys to amortise them.
    return dtype in (torch.float32, torch.float64) or Nkv >= ATOMIC_DQ_MIN_KEYS, True


def _run(kernel, grid: tuple, args: tuple, **meta) -> None:
    """Launch one kernel with fixed meta-parameters (constexprs, num_warps, num_stages)."""
    kernel[grid](*args, **meta)


# --------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------
def _check_launch(q: torch.Tensor) -> None:
    """What these kernels need to launch. The inputs themselves were checked by the op that
    calls them (cvt_fast/ops/contract.py): shapes, dtypes, devices and strides are trusted here."""
    launch.check_device(q, _INTERPRET, "the Triton attention kernels")
    head_dim = q.shape[-1]
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim d={head_dim} is not supported by the Triton attention kernels; "
                         f"supported: {', '.join(map(str, SUPPORTED_HEAD_DIMS))} "
                         f"(the reference backend takes any d)")
    if q.dtype == torch.float64:
        if not _INTERPRET:
            why = supported.DTYPE_LIMITS[("attention", "cuda", torch.float64)]
            raise TypeError(f"float64 is not supported by the Triton attention kernels on the GPU ({why}); "
                            "use bfloat16/float16/float32, or the reference backend for float64")
        problem = float64_dot_problem()
        if problem:
            raise TypeError(problem)


def _split_fp32(x: float) -> Tuple[float, float]:
    """x as hi + lo with both exactly representable in fp32 (Triton passes Python floats as fp32)."""
    def to_fp32(value: float) -> float:
        return struct.unpack("f", struct.pack("f", value))[0]

    hi = to_fp32(x)
    return hi, to_fp32(x - hi)


def _dtype_flags(dtype: torch.dtype) -> dict:
    is_fp64 = dtype == torch.float64
    return dict(
        # The interpreter cannot do arithmetic on bf16 (held as raw bits): upcast at load.
        UPCAST=_INTERPRET and dtype in (torch.bfloat16, torch.float16),
        SPLIT_SCALE=is_fp64,
        ACC_DTYPE=launch.tl_acc_dtype(dtype),
        # fp32 inputs are the accuracy path: real fp32 products, not TF32.
        DOT_PRECISION="ieee" if dtype in (torch.float32, torch.float64) else "tf32",
    )


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused attention forward.

    q: (B, Nq, H, d), k, v: (B, Nkv, H, d), any strides with a contiguous last dim; one dtype
    (bf16, fp16, fp32; fp64 only under the interpreter); d in 16/32/64/128. Inputs as the op
    checks them (cvt_fast.ops.contract.check_attention); only the launch itself is checked here.
    Returns out (B, Nq, H*d) contiguous in q's dtype, and lse (B, H, Nq) float32, the
    natural-log log-sum-exp of each row of scale * q k^T.
    """
    _check_launch(q)
    B, Nq, H, d = q.shape
    Nkv = k.shape[1]
    out = torch.empty((B, Nq, H * d), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    if B * H * Nq == 0:
        return out, lse
    qk_hi, qk_lo = _split_fp32(scale * math.log2(math.e))
    args = (
        q, k, v, out, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1),
        H, Nq, Nkv,
        qk_hi, qk_lo,
    )
    with launch.device_guard(q):
        _launch("fwd", _grid(Nq, "BLOCK_M", B * H), args, d, q.dtype,
                **_dtype_flags(q.dtype))
    return out, lse


def attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, scale: float
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused attention backward (flash-attention-2 style, scores recomputed tile by tile).

    grad_out, out: (B, Nq, H*d), any strides with a contiguous last dim, dtype of q;
    q, k, v, scale as given to attention_forward; lse (B, H, Nq) float32 from it.
    Returns (dq, dk, dv), contiguous, shaped and typed like q, k, v.
    """
    _check_launch(q)
    B, Nq, H, d = q.shape
    Nkv = k.shape[1]
    if grad_out.stride(-1) != 1:
        # The kernels read rows of grad_out contiguously; autograd may hand over an expanded
        # gradient (e.g. of out.sum(), all strides 0): only then is a copy made.
        grad_out = grad_out.contiguous()

    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if B * H * Nq == 0:
        return dq, dk.zero_(), dv.zero_()

    flags = _dtype_flags(q.dtype)
    is_fp64 = q.dtype == torch.float64
    qk_hi, qk_lo = _split_fp32(scale * math.log2(math.e))
    s_hi, s_lo = _split_fp32(scale)
    delta = torch.empty((B, H, Nq), dtype=launch.acc_dtype(q.dtype), device=q.device)
    with launch.device_guard(q):
        delta_block = _INTERPRETER_CONFIGS["fwd"].kwargs["BLOCK_M"] if _INTERPRET else _DELTA_BLOCK_M
        _run(_attn_bwd_delta_kernel, _grid(Nq, "BLOCK_M", B * H)({"BLOCK_M": delta_block}),
             (out, grad_out, delta, out.stride(0), out.stride(1), grad_out.stride(0), grad_out.stride(1), H, Nq),
             HEAD_DIM=d, BLOCK_M=delta_block, ACC_DTYPE=flags["ACC_DTYPE"],
             **({} if _INTERPRET else {"num_warps": _DELTA_NUM_WARPS}))
        if is_fp64:
            # fp64 runs only under the interpreter (rejected on the GPU by _check_launch).
            lse_rows = torch.empty((B, H, Nq), dtype=torch.float64, device=q.device)
            blocks = _INTERPRETER_CONFIGS["fwd"].kwargs
            _run(_attn_bwd_lse2_kernel, _grid(Nq, "BLOCK_M", B * H)(blocks),
                 (q, k, lse_rows, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                  H, Nq, Nkv, qk_hi, qk_lo),
                 HEAD_DIM=d, **blocks, **flags)
        else:
            lse_rows = lse
        common = (
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            grad_out.stride(0), grad_out.stride(1),
            lse_rows.stride(0), lse_rows.stride(1), lse_rows.stride(2),
        )
        scalars = (H, Nq, Nkv, qk_hi, qk_lo, s_hi, s_lo)
        one_pass, dq_atomic = _use_one_pass_backward(Nkv, d, q.dtype)
        if one_pass:
            # Without atomics one K/V tile per (b, h) covers Nkv whatever config runs: dQ is
            # stored straight into dq. Else the shares are added in an accumulator of the
            # accumulation dtype (dq itself for fp32/fp64).
            if not dq_atomic or dq.dtype == delta.dtype:
                dq_acc = dq.zero_() if dq_atomic else dq
            else:
                dq_acc = torch.zeros(dq.shape, dtype=delta.dtype, device=q.device)
            _launch("fused", _grid(Nkv, "BLOCK_N", B * H),
                    (q, k, v, grad_out, lse_rows, delta, dk, dv, dq_acc, *common,
                     dk.stride(0), dk.stride(1), dk.stride(2),
                     dq_acc.stride(0), dq_acc.stride(1), dq_acc.stride(2), *scalars),
                    # lse_rows is lse, or (fp64) its recomputation in log2 units.
                    d, q.dtype, LSE_LOG2=lse_rows is not lse, DQ_ATOMIC=dq_atomic, **flags)
            if dq_acc is not dq:
                dq.copy_(dq_acc)
            return dq, dk, dv
        _launch("dkdv", _grid(Nkv, "BLOCK_N", B * H),
                (q, k, v, grad_out, lse_rows, delta, dk, dv, *common,
                 dk.stride(0), dk.stride(1), dk.stride(2), *scalars),
                d, q.dtype, LSE_LOG2=is_fp64, **flags)
        _launch("dq", _grid(Nq, "BLOCK_M", B * H),
                (q, k, v, grad_out, lse_rows, delta, dq, *common,
                 dq.stride(0), dq.stride(1), dq.stride(2), *scalars),
                d, q.dtype, LSE_LOG2=is_fp64, **flags)
    return dq, dk, dv
