"""Launch limits and devices of the Triton kernels, checked on the CPU.

Every Triton launch of cvt_fast.kernels is recorded here instead of run (the interpreter's launch
entry is replaced), so the host code runs at sizes far too large to interpret:
- grid limits: B*H = 70000 (evaluation at batch 4375 with CvT-W24's 16 heads) for attention, 70000
  images for conv_proj; every grid must fit CUDA's limits (2^31 - 1 programs on axis 0, 65535 on
  axes 1 and 2). Attention had B*H on axis 1 and the conv_proj forward the batch on axis 2.
- devices: every launch happens inside _launch.device_guard of the tensors' device (Triton
  launches on the current device; conv_proj, linear_activation, mlp_activation and
  residual_layer_norm used to launch on whatever device was current).
The kernels' results under the new grids are checked by the interpreter tests of each kernel
(tests/test_kernels_attention.py, test_kernels_conv_proj.py, test_conv_proj_bn.py, ...).
"""
import contextlib
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="records the Triton interpreter's launches (TRITON_INTERPRET=1)")

triton = pytest.importorskip("triton")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from cvt_fast.kernels import _launch, attention, conv_proj  # noqa: E402
from cvt_fast.kernels import linear_activation, mlp_activation, residual_layer_norm  # noqa: E402

MAX_AXIS = _launch.CUDA_GRID_LIMITS
# Kept in sync with CUDA by hand: the limits of compute capability 3.0 and newer.
assert MAX_AXIS == (2 ** 31 - 1, 65535, 65535)


class Launches:
    """The interpreter's launches, recorded and not run: (kernel name, grid, inside a device guard)."""

    def __init__(self):
        self.records = []
        self.guard_depth = 0

    def run(self, kernel, *args, grid, warmup, **kwargs):
        if warmup:
            return
        grid = grid(kwargs) if callable(grid) else grid
        self.records.append((kernel.fn.__name__, tuple(grid), self.guard_depth > 0))

    @contextlib.contextmanager
    def guard(self, tensor):
        self.guard_depth += 1
        try:
            yield
        finally:
            self.guard_depth -= 1


@pytest.fixture
def launches(monkeypatch):
    recorder = Launches()
    monkeypatch.setattr(InterpretedFunction, "run", lambda kernel, *a, **k: recorder.run(kernel, *a, **k))
    monkeypatch.setattr(_launch, "device_guard", recorder.guard)
    return recorder


def assert_grids_fit(records):
    assert records, "no launch was recorded"
    for name, grid, _ in records:
        assert len(grid) <= 3 and all(1 <= size <= limit for size, limit in zip(grid, MAX_AXIS)), (
            f"{name}: grid {grid} is over CUDA's limits {MAX_AXIS}")


@pytest.mark.parametrize("n_kv,deterministic", [(1, False), (70, False), (70, True)],
                         ids=["one-pass-stored", "one-pass-atomic", "split"])
def test_attention_grids_fit_cuda_limits_at_70000_batch_heads(launches, monkeypatch, n_kv, deterministic):
    if deterministic:
        monkeypatch.setenv(attention.DETERMINISTIC_ENV, "1")
    batch, heads, n_q, d = 4375, 16, 2, 16
    q = torch.zeros(batch, n_q, heads, d)
    k = torch.zeros(batch, n_kv, heads, d)
    out, lse = attention.attention_forward(q, k, k, 0.25)
    attention.attention_backward(torch.zeros_like(out), q, k, k, out, lse, 0.25)
    names = {name for name, _, _ in launches.records}
    assert "_attn_fwd_kernel" in names and "_attn_bwd_delta_kernel" in names
    assert_grids_fit(launches.records)


def conv_args(batch, stride_q, stride_kv, has_cls=True, height=3, width=3, channels=8):
    x = torch.zeros(batch, int(has_cls) + height * width, channels)
    w = torch.zeros(channels, 1, 3, 3)
    return x, w, (height, width, has_cls, stride_q, stride_kv, 1, 1)


@pytest.mark.parametrize("strides", [(1, 2), (2, 2)], ids=["s1s2", "generic"])
def test_conv_proj_grids_fit_cuda_limits_at_70000_images(launches, strides):
    x, w, geometry = conv_args(70_000, *strides)
    q, k, v = conv_proj.conv_proj_forward(x, w, w, w, None, None, None, *geometry)
    conv_proj.conv_proj_backward(torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), x, w, w, w, *geometry)
    ones, zeros = torch.ones(8), torch.zeros(8)
    q, k, v, mean, var = conv_proj.conv_proj_bn_forward(x, w, w, w, ones, ones, ones, zeros, zeros, zeros, *geometry,
                                                        [1e-5] * 3)
    conv_proj.conv_proj_bn_backward(torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), x, w, w, w, ones,
                                    ones, ones, zeros, zeros, zeros, q, k, v, mean, var, *geometry, [1e-5] * 3)
    assert_grids_fit(launches.records)


def test_check_grid_names_the_axis_over_the_limit():
    assert _launch.check_grid((2 ** 31 - 1, 65535, 1), "k") == (2 ** 31 - 1, 65535, 1)
    with pytest.raises(ValueError, match="70000 programs on axis 1, over CUDA's limit of 65535"):
        _launch.check_grid((4, 70000), "attention")


def every_launcher():
    """(name, call) for each public launcher of cvt_fast.kernels, at tiny sizes on CPU tensors."""
    q = torch.randn(2, 5, 2, 16)
    k = torch.randn(2, 3, 2, 16)
    out = torch.randn(2, 5, 32)
    lse = torch.randn(2, 2, 5)
    x, w, geometry = conv_args(2, 1, 2)
    ones, zeros = torch.ones(8), torch.zeros(8)
    grads = [torch.randn(2, 10, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8)]
    mean, var = torch.zeros(3, 8), torch.ones(3, 8)
    rows = torch.randn(4, 6, 8)
    weight = torch.randn(12, 8)
    return [
        ("attention_forward", lambda: attention.attention_forward(q, k, k, 0.25)),
        ("attention_backward", lambda: attention.attention_backward(out, q, k, k, out, lse, 0.25)),
        ("conv_proj_forward", lambda: conv_proj.conv_proj_forward(x, w, w, w, None, None, None, *geometry)),
        ("conv_proj_backward", lambda: conv_proj.conv_proj_backward(*grads, x, w, w, w, *geometry)),
        ("conv_proj_bn_forward", lambda: conv_proj.conv_proj_bn_forward(
            x, w, w, w, ones, ones, ones, zeros, zeros, zeros, *geometry, [1e-5] * 3)),
        ("conv_proj_bn_backward", lambda: conv_proj.conv_proj_bn_backward(
            *grads, x, w, w, w, ones, ones, ones, zeros, zeros, zeros, *grads, mean, var, *geometry, [1e-5] * 3)),
        ("linear_activation_forward", lambda: linear_activation.linear_activation_forward(
            rows, weight, None, "quick_gelu", True)),
        ("activation_grad_through_linear", lambda: linear_activation.activation_grad_through_linear(
            torch.randn(4, 6, 8), weight.t().contiguous(), torch.randn(4, 6, 12), None, "quick_gelu", True)),
        ("mlp_activation_forward", lambda: mlp_activation.mlp_activation_forward(rows, None, "gelu")),
        ("mlp_activation_backward", lambda: mlp_activation.mlp_activation_backward(rows, rows, None, "gelu", True)),
        ("residual_layer_norm_forward", lambda: residual_layer_norm.residual_layer_norm_forward(
            rows, rows, None, None, torch.ones(8), torch.zeros(8), 1e-5)),
        ("residual_layer_norm_backward", lambda: residual_layer_norm.residual_layer_norm_backward(
            rows, rows, rows, torch.zeros(4, 6), torch.ones(4, 6), None, torch.ones(8))),
    ]


@pytest.mark.parametrize("name,call", every_launcher(), ids=[name for name, _ in every_launcher()])
def test_every_triton_launch_runs_under_a_device_guard(launches, name, call):
    # Triton launches on the current CUDA device: without torch.cuda.device(tensor.device) around
    # the launch, tensors on another GPU of the process fail (or are read on the wrong device).
    call()
    assert launches.records, f"{name} launched nothing"
    unguarded = [kernel for kernel, _, guarded in launches.records if not guarded]
    assert not unguarded, f"{name} launched {unguarded} outside _launch.device_guard"


def test_device_guard_selects_cuda_devices_only():
    assert isinstance(_launch.device_guard(torch.zeros(1)), contextlib.nullcontext)
    assert isinstance(_launch.device_guard(torch.zeros(1, device="meta")), contextlib.nullcontext)
