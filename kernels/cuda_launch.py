"""What every Triton launch of cvt_fast.kernels needs besides its kernel and arguments.

- The tensors' CUDA device made current: Triton launches on the current device's stream, so a
  tensor on cuda:1 launched from a process whose current device is cuda:0 fails (or reads the
  wrong device's memory). Every launcher wraps its launches in `device_guard(tensor)`.
- A grid within CUDA's limits: at most 2^31 - 1 programs on axis 0 and 65535 on axes 1 and 2.
  The launchers put the axes that grow with the batch (batch x heads, images) on axis 0;
  `check_grid` turns a grid that still does not fit into a clear error instead of a launch failure.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Sequence

import torch

# Programs per grid axis that CUDA accepts (compute capability 3.0 and newer).
CUDA_GRID_LIMITS = (2 ** 31 - 1, 65535, 65535)


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
