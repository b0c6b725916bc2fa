"""Test set-up shared by the whole suite.

Triton reads TRITON_INTERPRET when a kernel is decorated, so it is set here, before any
test module imports cvt_fast.kernels: without a GPU every Triton kernel then runs on
CPU tensors through the interpreter.
"""
import os

import pytest
import torch

GPU_AVAILABLE = torch.cuda.is_available()
if not GPU_AVAILABLE:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    """Stop at once, with the fix, where Triton's interpreter cannot run the kernels (an old
    Triton beside a new NumPy), instead of failing every Triton test on its own."""
    if GPU_AVAILABLE:
        return
    try:
        from cvt_fast.kernels.interpreter import interpreter_problem
        problem = interpreter_problem()
    except ImportError:  # no triton: the Triton tests skip themselves
        return
    if problem:
        raise pytest.UsageError(f"the CPU tests run the Triton kernels through its interpreter, and {problem}")


def pytest_collection_modifyitems(config, items):
    if GPU_AVAILABLE:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same seed, so failures reproduce."""
    torch.manual_seed(0)
    yield
