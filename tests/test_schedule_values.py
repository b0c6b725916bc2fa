"""The learning-rate schedule against values computed by hand from the official recipe's formula.

The official CvT code builds timm's CosineLRScheduler through timm's create_scheduler with
epochs = TRAIN.END_EPOCH, so at (fractional) epoch t:
- warm-up, t < warmup_epochs: warmup_lr + (LR - warmup_lr) * t / warmup_epochs;
- cosine, warmup_epochs <= t < END_EPOCH: min_lr + (LR - min_lr) / 2 * (1 + cos(pi * t / END_EPOCH)),
  its phase counted from epoch 0 (not from the end of the warm-up: no warmup_prefix);
- min_lr from END_EPOCH on.
cooldown_epochs changes nothing (timm adds it only to the epoch count create_scheduler returns,
which the official trainer ignores). The official trainer steps the schedule once per epoch;
cvt_fast evaluates the same curve at step / iters_per_epoch after every step (equal at every
epoch boundary, checked against timm itself below).

Issue 16: ending the warm-up one epoch early was caught only by accident, because the schedule
test compared the scheduler with the schedule function itself. The expected numbers here are
written out or computed in the test from the formula above, never by cvt_fast.
"""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from test_train_utils import REPO

from cvt_fast.config import load_config
from cvt_fast.training.optim import build_scheduler

BASE, WARMUP_LR, MIN_LR = 2.5e-4, 1e-6, 1e-5  # the official CvT recipe (cvt-13-224x224.yaml)


def _config(end_epoch, warmup, cooldown):
    return load_config(str(REPO / "experiments/imagenet/cvt/cvt-13-224x224.yaml"), [
        "TRAIN.END_EPOCH", str(end_epoch), "TRAIN.LR_SCHEDULER.ARGS.warmup_epochs", str(warmup),
        "TRAIN.LR_SCHEDULER.ARGS.cooldown_epochs", str(cooldown)])


def _recipe_lr(epoch: float, end_epoch: float, warmup: float) -> float:
    """The formula of the module docstring, written out (for values too many to list)."""
    if epoch < warmup:
        return WARMUP_LR + (BASE - WARMUP_LR) * epoch / warmup
    if epoch < end_epoch:
        return MIN_LR + 0.5 * (BASE - MIN_LR) * (1.0 + math.cos(math.pi * epoch / end_epoch))
    return MIN_LR


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
    # 12 epochs of 2 steps, 4 warm-up epochs; the cool-down of 8 epochs must change nothing.
    # At epochs 4, 6, 8 the cosine's phase is pi/3, pi/2, 2pi/3 (cosines 1/2, 0, -1/2).
    lrs = _stepped_lrs(_config(12, 4, 8), iters_per_epoch=2)
    assert len(lrs) == 24

    # Warm-up, steps 0..7 (epochs 0 to 3.5): 1e-6 + (2.5e-4 - 1e-6) * step / 8.
    warmup = [1e-6, 3.2125e-5, 6.325e-5, 9.4375e-5, 1.255e-4, 1.56625e-4, 1.8775e-4, 2.18875e-4]
    assert lrs[:8] == pytest.approx(warmup, rel=1e-12)
    assert all(a < b for a, b in zip(lrs[:8], lrs[1:8])), "the warm-up must rise at every step"

    # Cosine: 1e-5 + 1.2e-4 * (1 + cos(pi * epoch / 12)).
    assert lrs[8] == pytest.approx(1.9e-4, rel=1e-12)   # the first cosine value, epoch 4
    assert lrs[12] == pytest.approx(1.3e-4, rel=1e-12)  # epoch 6
    assert lrs[16] == pytest.approx(7e-5, rel=1e-12)    # epoch 8
    assert lrs[23] == pytest.approx(1e-5 + 1.2e-4 * (1 - math.cos(math.pi / 24)), rel=1e-12)  # the last, 11.5
    assert all(a > b for a, b in zip(lrs[8:], lrs[9:])), "the cosine must fall at every step"


def test_official_recipe_at_imagenet_scale():
    # ImageNet-1k at 256 images per step: 5005 steps per epoch; 300 epochs, 5 warm-up, 10 cool-down.
    iters, end, warmup = 5005, 300, 5
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=BASE)
    scheduler = build_scheduler(_config(end, warmup, 10), optimizer, iters)
    lr_at = lambda step: BASE * scheduler.lr_lambdas[0](step)  # noqa: E731

    assert lr_at(0) == pytest.approx(1e-6, rel=1e-12)
    assert lr_at(iters) == pytest.approx(1e-6 + 2.49e-4 / 5, rel=1e-12)  # end of the first warm-up epoch
    warmup_lrs = [lr_at(step) for step in range(warmup * iters)]
    assert all(a < b for a, b in zip(warmup_lrs, warmup_lrs[1:])), "the warm-up must rise at every step"
    last_warmup = warmup * iters - 1
    assert warmup_lrs[-1] == pytest.approx(1e-6 + 2.49e-4 * last_warmup / (warmup * iters), rel=1e-12)
    assert warmup_lrs[-1] < BASE
    first_cosine = 1e-5 + 1.2e-4 * (1 + math.cos(math.pi * 5 / 300))  # 2.498356e-4
    assert lr_at(warmup * iters) == pytest.approx(first_cosine, rel=1e-12)
    assert lr_at(150 * iters) == pytest.approx(1.3e-4, rel=1e-12)  # half way
    last = end * iters - 1  # the last step of the run, a hair above min_lr
    assert lr_at(last) == pytest.approx(1e-5 + 1.2e-4 * (1 + math.cos(math.pi * last / (end * iters))), rel=1e-12)
    assert lr_at(last) > 1e-5


def test_every_step_follows_the_recipe_formula():
    # Odd sizes (3 steps per epoch, 7 epochs, 2 warm-up, cool-down 3): every step, not only the round ones.
    lrs = _stepped_lrs(_config(7, 2, 3), iters_per_epoch=3)
    expected = [_recipe_lr(step / 3, 7, 2) for step in range(21)]
    assert lrs == pytest.approx(expected, rel=1e-12)


def test_epoch_boundaries_match_timm_stepped_as_the_official_trainer_does():
    """The official code: timm's create_scheduler(args) with args.epochs = END_EPOCH, then
    step(epoch) once per epoch; the lr of epoch e is the value at e."""
    from timm.scheduler import create_scheduler

    end, warmup, iters = 9, 3, 2
    args = SimpleNamespace(sched="cosine", epochs=end, warmup_epochs=warmup, warmup_lr=WARMUP_LR,
                           min_lr=MIN_LR, cooldown_epochs=4, decay_rate=0.1, lr_noise=None)
    official_optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=BASE)
    official, _ = create_scheduler(args, official_optimizer)
    official_lrs = []
    for epoch in range(end):
        official.step(epoch)
        official_lrs.append(official_optimizer.param_groups[0]["lr"])

    ours = _stepped_lrs(_config(end, warmup, 4), iters_per_epoch=iters)
    assert ours[::iters] == pytest.approx(official_lrs, rel=1e-12)
    assert official_lrs[warmup] == pytest.approx(_recipe_lr(warmup, end, warmup), rel=1e-12)
