"""bench/traffic.py, the memory-traffic counter, and the byte ratios it holds the fused path to.

The counter runs the model on the meta device (shapes only), so CvT-13 at 224 is counted in
seconds without a GPU. Issue 18's targets (CvT-13 at 224, bf16-equivalent bytes per image,
training step at most 0.5x the official path's, inference at most 0.45x) are checked at batch 2,
the convention of the issue's "before" numbers (each image also carries half of the weights'
traffic); in the large-batch limit, where parameter traffic vanishes, the ratios reached today are
held. A change that brings an elementwise pass back fails either.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import traffic  # noqa: E402

# Ratios of the fused path's bytes to the official path's (bench/results/traffic-cvt-13-224.md:
# 0.478 and 0.381 at batch 2, 0.433 and 0.313 in the large-batch limit).
TARGETS_AT_BATCH_2 = {"train": 0.50, "infer": 0.45}
HELD_LARGE_BATCH = {"train": 0.45, "infer": 0.33}


def test_counter_counts_reads_and_writes_and_leaves_views_free():
    x = torch.empty(6, 4, device="meta")
    weight = torch.empty(4, 5, device="meta")
    bias = torch.empty(5, device="meta")
    counter = traffic.TrafficCounter()
    with counter:
        torch.addmm(bias, x, weight)            # reads 5 + 24 + 20, writes 30 elements
        x.t().view(4, 6)                       # views: free
        torch.empty(100, device="meta").fill_(1.0)  # writes 100 (fill_ reads nothing)
        torch.ones(3, dtype=torch.long, device="meta").sum()  # int64: 8 bytes per element
    ops = counter.ops
    assert (ops["addmm"].read, ops["addmm"].written) == (2 * 49, 2 * 30)
    assert "t" not in ops and "view" not in ops
    assert (ops["fill_"].read, ops["fill_"].written) == (0, 2 * 100)
    assert ops["sum"].read == 8 * 3


def test_a_custom_op_counts_as_one_kernel_of_its_inputs_and_outputs():
    import cvt_fast.ops as ops

    x = torch.empty(8, 12, device="meta")
    bias = torch.empty(12, device="meta")
    counter = traffic.TrafficCounter()
    with counter, traffic._autocast_off_on_meta():
        ops.mlp_activation(x, bias, backend="reference")
    assert set(counter.ops) == {"cvt_fast::mlp_activation"}
    assert counter.ops["cvt_fast::mlp_activation"].total == 2 * (96 + 12 + 96)


@pytest.fixture(scope="module")
def cvt13_counts():
    """Total bytes of the whole step at batch 2 and 1, by (backend, mode): 8 counts, seconds each."""
    counts = {}
    for backend in ("official", "reference"):
        for mode in traffic.MODES:
            net = traffic.build_meta_model("cvt-13", backend)
            counts[backend, mode] = {batch: sum(r.total for r in traffic.count_step(net, 224, batch, mode).values())
                                     for batch in (2, 1)}
    return counts


def test_official_counts_reproduce_the_issue_before_numbers(cvt13_counts):
    # Issue 18 counted 727 MB (training) and 245 MB (inference) per image on a CPU; on the meta
    # device, as on a GPU, the depthwise convolutions return NCHW tensors whose token views the
    # official code copies (about 6 MB more).
    per_image = {mode: cvt13_counts["official", mode][2] / 2 / 1e6 for mode in traffic.MODES}
    assert per_image["train"] == pytest.approx(727, rel=0.03)
    assert per_image["infer"] == pytest.approx(245, rel=0.04)


@pytest.mark.parametrize("mode", traffic.MODES)
def test_fused_path_moves_at_most_the_target_share_of_the_official_bytes(cvt13_counts, mode):
    official, fused = cvt13_counts["official", mode], cvt13_counts["reference", mode]
    large_batch = (fused[2] - fused[1]) / (official[2] - official[1])
    at_batch_2 = fused[2] / official[2]
    assert at_batch_2 <= TARGETS_AT_BATCH_2[mode], (mode, at_batch_2)
    assert large_batch <= HELD_LARGE_BATCH[mode], (mode, large_batch)
