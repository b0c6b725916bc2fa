"""The learning-rate schedule against values computed by hand, not by `cosine_lr_at`.

The recipe: linear warm-up from warmup_lr to LR over warmup_epochs, then timm's cosine
(not warm-up-prefixed: its phase is epoch / (END_EPOCH - cooldown_epochs), counted from
epoch 0), reaching min_lr at END_EPOCH - cooldown_epochs and staying there through the
cool-down; evaluated in fractional epochs at every iteration. Issue 16: ending the warm-up
one epoch early was caught only by accident, because the schedule test compared the
scheduler with `cosine_lr_at` itself. The expected numbers below are written out.
"""
import math

import pytest
import torch
import torch.nn as nn

from test_train_utils import REPO

from cvt_fast.config import load_config
from cvt_fast.training.optim import build_scheduler

BASE, WARMUP_LR, MIN_LR = 2.5e-4, 1e-6, 1e-5  # the official CvT recipe


def _config(end_epoch, warmup, cooldown):
    return load_config(str(REPO / "experiments/imagenet/cvt/cvt-13-224x224.yaml"), [
        "TRAIN.END_EPOCH", str(end_epoch), "TRAIN.LR_SCHEDULER.ARGS.warmup_epochs", str(warmup),
        "TRAIN.LR_SCHEDULER.ARGS.cooldown_epochs", str(cooldown)])


def _stepped_lrs(cfg, iters_per_epoch):
    """The lr the optimizer holds at each step of the run, stepping as the trainer does."""
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=float(cfg.TRAIN.LR))
    scheduler = build_scheduler(cfg, optimizer, iters_per_epoch)
    lrs = []
    for _ in range(int(cfg.TRAIN.END_EPOCH) * iters_per_epoch):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_small_schedule_matches_hand_computed_values():
    # 20 epochs of 2 steps, 4 warm-up epochs, 8 cool-down epochs: the cosine spans epochs
    # 0..12, so at epochs 4, 6, 8 its phase is pi/3, pi/2, 2pi/3 (cosines 1/2, 0, -1/2).
    lrs = _stepped_lrs(_config(20, 4, 8), iters_per_epoch=2)
    assert len(lrs) == 40

    # Warm-up, steps 0..7 (epochs 0 to 3.5): 1e-6 + (2.5e-4 - 1e-6) * step / 8.
    warmup = [1e-6, 3.2125e-5, 6.325e-5, 9.4375e-5, 1.255e-4, 1.56625e-4, 1.8775e-4, 2.18875e-4]
    assert lrs[:8] == pytest.approx(warmup, rel=1e-12)
    assert all(a < b for a, b in zip(lrs[:8], lrs[1:8])), "the warm-up must rise at every step"

    # Cosine: min_lr + (LR - min_lr) / 2 * (1 + cos(pi * epoch / 12)).
    assert lrs[8] == pytest.approx(1.9e-4, rel=1e-12)   # first step after the warm-up, epoch 4
    assert lrs[12] == pytest.approx(1.3e-4, rel=1e-12)  # epoch 6
    assert lrs[16] == pytest.approx(7e-5, rel=1e-12)    # epoch 8
    assert lrs[23] == pytest.approx(1e-5 + 1.2e-4 * (1 - math.cos(math.pi / 24)), rel=1e-12)  # epoch 11.5
    assert all(a > b for a, b in zip(lrs[8:24], lrs[9:24])), "the cosine must fall at every step"

    # Cool-down: min_lr from epoch 12 to the end, the last step included.
    assert lrs[24:] == pytest.approx([1e-5] * 16, rel=1e-12)


def test_official_recipe_at_imagenet_scale():
    # ImageNet-1k at 256 images per step: 5005 steps per epoch; 300 epochs, 5 warm-up, 10 cool-down.
    iters = 5005
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=BASE)
    scheduler = build_scheduler(_config(300, 5, 10), optimizer, iters)
    lr_at = lambda step: BASE * scheduler.lr_lambdas[0](step)  # noqa: E731

    assert lr_at(0) == pytest.approx(1e-6, rel=1e-12)
    assert lr_at(iters) == pytest.approx(1e-6 + 2.49e-4 / 5, rel=1e-12)  # end of the first warm-up epoch
    last_warmup = 5 * iters - 1
    assert lr_at(last_warmup) == pytest.approx(1e-6 + 2.49e-4 * last_warmup / (5 * iters), rel=1e-12)
    assert lr_at(last_warmup) < BASE
    first_cosine = 1e-5 + 1.2e-4 * (1 + math.cos(math.pi * 5 / 290))  # 2.49859e-4
    assert lr_at(5 * iters) == pytest.approx(first_cosine, rel=1e-12)
    assert lr_at(145 * iters) == pytest.approx(1.3e-4, rel=1e-12)  # half way through the cosine
    assert lr_at(290 * iters) == pytest.approx(1e-5, rel=1e-12)
    assert lr_at(300 * iters - 1) == pytest.approx(1e-5, rel=1e-12)  # the last step of the run
