"""What every Triton launch of cvt_fast.kernels needs besides its kernel and arguments, in one place.

- Whether Triton's CPU interpreter runs the kernels (`interpreter_on`): TRITON_INTERPRET=1, which
  Triton reads when it decorates a kernel (@triton.jit). A kernel module asks once, at import, and
  keeps the answer; the backend probe (cvt_fast/ops/backends.py) asks at each call.
- The tensors on a device the kernels run on (`check_device`): CUDA, or the CPU under the
  interpreter; otherwise an error that names the fix.
- The accumulator dtype (`acc_dtype`, `tl_acc_dtype`): fp32 for every training dtype; fp64 inputs
  (gradcheck) keep fp64 throughout.
- The tensors' CUDA device made current: Triton launches on the current device's stream, so a
  tensor on cuda:1 launched from a process whose current device is cuda:0 fails (or reads the
  wrong device's memory). Every launcher wraps its launches in `device_guard(tensor)`.
- A grid within CUDA's limits: at most 2^31 - 1 programs on axis 0 and 65535 on axes 1 and 2.
  The launchers put the axes that grow with the batch (batch x heads, images) on axis 0;
  `check_grid` turns a grid that still does not fit into a clear error instead of a launch failure.

Importing this module does not import Triton (the backend probe imports it on every op call).
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Sequence

import torch

INTERPRET_ENV = "TRITON_INTERPRET"
# Programs per grid axis that CUDA accepts (compute capability 3.0 and newer).
CUDA_GRID_LIMITS = (2 ** 31 - 1, 65535, 65535)


def interpreter_on() -> bool:
    """True when TRITON_INTERPRET=1 is set now: kernels decorated now run in Triton's CPU interpreter."""
    return os.environ.get(INTERPRET_ENV) == "1"


def check_device(tensor: torch.Tensor, interpreted: bool, kernels: str) -> None:
    """RuntimeError for CPU tensors when the kernels were not decorated under the interpreter,
    ValueError for a device that is neither CUDA nor the CPU. `kernels` names them in the message."""
    if tensor.device.type == "cpu":
        if not interpreted:
            raise RuntimeError(
                f"{kernels} got CPU tensors but Triton's interpreter is off: set {INTERPRET_ENV}=1 in the "
                "environment before importing triton / cvt_fast.kernels, or pass CUDA tensors")
    elif tensor.device.type != "cuda":
        raise ValueError(f"{kernels} run on 'cuda' (or 'cpu' under {INTERPRET_ENV}=1), got device {tensor.device}")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulator (and partial-sum buffer) dtype of inputs of `dtype`: fp32, or fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc_dtype(dtype: torch.dtype):
    """acc_dtype(dtype) as the Triton dtype a kernel's ACC constexpr takes."""
    import triton.language as tl

    return tl.float64 if acc_dtype(dtype) == torch.float64 else tl.float32


def device_guard(tensor: torch.Tensor):
    """torch.cuda.device(tensor.device) for a CUDA tensor; nothing for a CPU one (the interpreter)."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def check_grid(grid: Sequence[int], kernel: str) -> tuple:
    """The grid as a tuple, or ValueError naming the axis over CUDA's limit."""
    grid = tuple(int(size) for size in grid)
    for axis, (size, limit) in enumerate(zip(grid, CUDA_GRID_LIMITS)):
        if size > limit:
            raise ValueError(f"{kernel}: launch grid {grid} has {size} programs on axis {axis}, over CUDA's limit of "
                             f"{limit}; split the call (a smaller batch)")
    return grid


def on_device_of(position: int):
    """Decorator for a launcher: its body runs under device_guard(its positional argument `position`)."""
    def decorate(launcher):
        @functools.wraps(launcher)
        def guarded(*args, **kwargs):
            with device_guard(args[position]):
                return launcher(*args, **kwargs)
        return guarded
    return decorate
