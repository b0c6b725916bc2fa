"""Optimizer groups, the per-iteration schedule, losses, mixup and EMA of the recipe."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cvt_fast.training.ema import ModelEma
from cvt_fast.training.optim import (LabelSmoothingCrossEntropy, SoftTargetCrossEntropy, build_criterion,
                                     build_mixup, build_optimizer, build_scheduler, cosine_lr_at,
                                     split_weight_decay)
from test_train_utils import REPO, load_tiny_config
from tolerances import assert_close


def _official_cfg(*overrides: str):
    from cvt_fast.config import load_config

    return load_config(str(REPO / "experiments/imagenet/cvt/cvt-13-224x224.yaml"), list(overrides))


def test_no_weight_decay_on_bn_ln_biases_and_cls_token(tmp_path):
    from cvt_fast.model import build_model_from_config

    cfg = load_tiny_config(tmp_path, tmp_path)
    model = build_model_from_config(cfg)
    decay, without = split_weight_decay(model, ["bn", "bias", "ln"])
    names = {n for n, _ in model.named_parameters()}
    assert set(decay) | set(without) == names and not set(decay) & set(without)
    assert "stage2.cls_token" in without
    assert any(".bn.weight" in n for n in without) and any("norm1.weight" in n for n in without)
    assert all(not n.endswith(".bias") for n in decay)
    assert all(n.endswith(".weight") for n in decay)
    assert "stage0.blocks.0.attn.proj_q.weight" in decay and "head.weight" in decay
    opt = build_optimizer(_official_cfg(), model)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert opt.param_groups[0]["lr"] == pytest.approx(2.5e-4)


def test_unknown_without_wd_entry_is_named():
    with pytest.raises(ValueError, match="'bnn'"):
        split_weight_decay(nn.Linear(2, 2), ["bnn"])


def test_cosine_schedule_warmup_cooldown_per_iteration():
    cfg = _official_cfg("TRAIN.END_EPOCH", "20", "TRAIN.LR_SCHEDULER.ARGS.warmup_epochs", "2",
                        "TRAIN.LR_SCHEDULER.ARGS.cooldown_epochs", "3")
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=float(cfg.TRAIN.LR))
    iters = 4
    sched = build_scheduler(cfg, opt, iters)
    lrs = []
    for _ in range(20 * iters):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    base, warm, low = 2.5e-4, 1e-6, 1e-5
    assert lrs[0] == pytest.approx(warm)
    assert lrs[1] == pytest.approx(warm + (base - warm) / 8)  # moves every iteration, not every epoch
    assert lrs[2 * iters] == pytest.approx(base * 0.5 * (1 + math.cos(math.pi * 2 / 17)) + low * 0.5 * (1 - math.cos(math.pi * 2 / 17)))
    assert max(lrs) <= base + 1e-12
    assert all(lr == pytest.approx(low) for lr in lrs[17 * iters:])  # cool-down at min_lr
    assert all(a >= b - 1e-15 for a, b in zip(lrs[2 * iters:], lrs[2 * iters + 1:]))  # monotone after warm-up
    for step in (0, 5, 33, 70):
        assert lrs[step] == pytest.approx(cosine_lr_at(step / iters, base, 20, 2, warm, low, 3))
    # Resuming = loading the step count; the next lrs continue exactly.
    opt2 = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=base)
    sched2 = build_scheduler(cfg, opt2, iters)
    state = {"last_epoch": 33, "base_lrs": [base], "_last_lr": [lrs[33]], "_step_count": 34}
    sched2.load_state_dict({**sched2.state_dict(), **state})
    opt2.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(lrs[34])


def test_label_smoothing_loss_matches_torch_reference():
    torch.manual_seed(0)
    logits, target = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 5, (6,))
    ours = LabelSmoothingCrossEntropy(0.1)(logits, target).double()
    ref = F.cross_entropy(logits, target, label_smoothing=0.1)
    assert_close(ours, ref, dtype=torch.float32)
    one_hot = F.one_hot(target, 5).double()
    assert_close(SoftTargetCrossEntropy()(logits, one_hot).double(), F.cross_entropy(logits, target), dtype=torch.float32)


def test_official_recipe_uses_mixup_soft_targets_and_plain_ce_for_eval():
    from timm.data import Mixup

    cfg = _official_cfg("MODEL.NUM_CLASSES", "10")
    mixup = build_mixup(cfg)
    assert isinstance(mixup, Mixup) and mixup.label_smoothing == 0.1 and mixup.cutmix_alpha == 1.0
    assert isinstance(build_criterion(cfg), SoftTargetCrossEntropy)
    assert isinstance(build_criterion(cfg, train=False), nn.CrossEntropyLoss)
    x, y = torch.randn(4, 3, 8, 8), torch.arange(4)
    _, soft = mixup(x, y)
    assert soft.shape == (4, 10) and torch.allclose(soft.sum(-1), torch.ones(4))
    off = _official_cfg("AUG.MIXUP", "0.0", "AUG.MIXCUT", "0.0")
    assert build_mixup(off) is None and isinstance(build_criterion(off), LabelSmoothingCrossEntropy)


def test_ema_is_the_exponential_average_of_weights_and_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = ModelEma(model, decay=0.9)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model.train()(torch.randn(5, 3))  # moves the BN running stats
    ema.update(model)
    for k, v in ema.module.state_dict().items():
        new = model.state_dict()[k]
        if v.is_floating_point():
            assert_close(v, 0.9 * start[k] + 0.1 * new)
        else:
            assert torch.equal(v, new)
    assert all(not p.requires_grad for p in ema.module.parameters())
