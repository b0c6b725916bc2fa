"""What the Triton kernels of this folder take, declared without importing Triton.

The 'triton' record of the backend table (cvt_fast/ops/backends.py) reads these when cvt_fast
is imported, so the backend choice knows the kernels' limits before any kernel is loaded; each
kernel module checks its launches against the same declarations. Change a kernel's reach here.
"""
from __future__ import annotations

from typing import Optional

import torch

# Every kernel module takes these input dtypes (float64 for gradcheck and the tests' oracles).
DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)

# (op, device type, dtype) -> why the kernels of `op` do not take that dtype there.
DTYPE_LIMITS = {
    ("attention", "cuda", torch.float64): "tl.dot has no fp64 path there",
}

# The attention head sizes the kernels are compiled and tuned for: every power of two from 16,
# the smallest tl.dot tile, to 128.
ATTENTION_HEAD_DIMS = (16, 32, 64, 128)


def conv_proj_kernel_size_problem(kernel_sizes: tuple[int, ...]) -> Optional[str]:
    """What the conv_proj kernels need of the depthwise kernel sizes (k_q, k_k, k_v) that these lack,
    or None. One kernel size K is a compile-time constant of all three branches; odd, so that the
    tap ranges of the parity decomposition are symmetric."""
    kernel_sizes = tuple(kernel_sizes)
    if len(set(kernel_sizes)) != 1:
        return f"one kernel size for q, k and v, got {kernel_sizes}"
    if kernel_sizes[0] % 2 != 1:
        return f"an odd kernel size, got {kernel_sizes[0]}"
    return None
