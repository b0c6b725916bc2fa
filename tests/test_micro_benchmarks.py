"""CPU micro-benchmarks that CI can track (pytest-benchmark), each also a correctness check.

The GPU numbers come from bench/*.py; these time what a CPU can: the reference ops at CvT-13
stage shapes (small batch) and a whole small-image CvT-13 forward, on the reference path and
on the official eager path, so a change that makes the CPU path (the ground truth every kernel
is tested against, and the CPU user's model) slower shows up in the saved history:

    python -m pytest tests/test_micro_benchmarks.py -p no:xdist --benchmark-autosave
    python -m pytest tests/test_micro_benchmarks.py -p no:xdist --benchmark-compare

Under `pytest -n 2` (CI) pytest-benchmark turns timing off and each body runs once: the
results are still checked, so the benchmarks cannot rot.
"""
import pytest
import torch
import torch.nn.functional as F

import cvt_fast
from cvt_fast import ops
from cvt_fast.ops.peers import sdpa_attention

from tolerances import assert_close

# CvT-13 stages as (grid side at 224, channels, heads); head_dim is 64 throughout.
CVT13_STAGES = {"stage1": (56, 64, 1), "stage2": (28, 192, 3), "stage3": (14, 384, 6)}


def run(benchmark, function, *args):
    """A few rounds: CPU ops here take tens of milliseconds, and CI shares its 2 cores."""
    return benchmark.pedantic(function, args=args, rounds=5, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("stage", sorted(CVT13_STAGES))
def test_reference_attention_at_cvt13_stage_shape(benchmark, stage):
    side, channels, heads = CVT13_STAGES[stage]
    head_dim = channels // heads
    n_q, n_kv = 1 + side * side, 1 + (side // 2) ** 2
    q = torch.randn(2, n_q, heads, head_dim)
    k, v = (torch.randn(2, n_kv, heads, head_dim) for _ in range(2))
    scale = channels ** -0.5
    out = run(benchmark, lambda: ops.attention(q, k, v, scale, backend="reference"))
    assert_close(out, sdpa_attention(q, k, v, scale), torch.float32)


@pytest.mark.parametrize("stage", sorted(CVT13_STAGES))
def test_reference_conv_proj_at_cvt13_stage_shape(benchmark, stage):
    side, channels, _ = CVT13_STAGES[stage]
    x = torch.randn(2, 1 + side * side, channels)
    weights = [torch.randn(channels, 1, 3, 3) for _ in range(3)]
    q, k, v = run(benchmark, lambda: ops.conv_proj(x, *weights, side, side, True, backend="reference"))
    # Ground truth from the official layout: NCHW depthwise convolutions of the grid.
    grid = x[:, 1:].transpose(1, 2).reshape(2, channels, side, side)
    for got, weight, stride in zip((q, k, v), weights, (1, 2, 2)):
        want = F.conv2d(grid, weight, stride=stride, padding=1, groups=channels).flatten(2).transpose(1, 2)
        assert_close(got[:, 1:], want, torch.float32)
        assert torch.equal(got[:, 0], x[:, 0])


@pytest.fixture(scope="module")
def cvt13_pair():
    """CvT-13 on the official eager path and on the reference ops, with the same weights."""
    torch.manual_seed(0)
    official = cvt_fast.create_model("cvt-13", num_classes=10, backend="official").eval()
    reference = cvt_fast.create_model("cvt-13", num_classes=10, backend="reference").eval()
    reference.load_state_dict(official.state_dict())
    return official, reference


@pytest.mark.parametrize("path", ["official", "reference"])
def test_cvt13_forward_at_64px(benchmark, cvt13_pair, path):
    official, reference = cvt13_pair
    images = torch.randn(2, 3, 64, 64)
    model = official if path == "official" else reference
    with torch.no_grad():
        logits = run(benchmark, model, images)
        want = official(images)
    assert logits.shape == (2, 10)
    assert_close(logits, want, torch.float32)
