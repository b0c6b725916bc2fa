"""Optimizer groups, the per-iteration schedule, losses, mixup and EMA of the recipe.

The schedule and the label-smoothing loss are timm's; the tests here hold them to the
official recipe's numbers, computed by hand from the official code (CvT's trainer with
timm 0.3.2, whose create_scheduler sets t_initial = epochs = TRAIN.END_EPOCH and steps the
schedule once per epoch), not to timm itself."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cvt_fast.training.ema import ModelEma
from cvt_fast.training.optim import (LabelSmoothingCrossEntropy, SoftTargetCrossEntropy, build_criterion,
                                     build_mixup, build_optimizer, build_scheduler, split_weight_decay)
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


def official_lr(epoch: int, base: float, end: int, warmup: int, warmup_lr: float, min_lr: float) -> float:
    """The official trainer's lr during `epoch` (0-based): linear warm-up, then cosine over the
    whole run (t_initial = END_EPOCH; the configs' cooldown_epochs changes nothing there)."""
    if epoch < warmup:
        return warmup_lr + epoch * (base - warmup_lr) / warmup
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * epoch / end))


def _lrs(cfg, iters: int) -> list[float]:
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=float(cfg.TRAIN.LR))
    sched = build_scheduler(cfg, opt, iters)
    lrs = []
    for _ in range(int(cfg.TRAIN.END_EPOCH) * iters):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_schedule_equals_the_official_one_at_every_epoch_and_moves_every_iteration():
    # The official CvT-13 config: 300 epochs, warm-up 5 from 1e-6, min 1e-5, cool-down 10.
    cfg = _official_cfg()
    base, warm, low, end, warmup, iters = 2.5e-4, 1e-6, 1e-5, 300, 5, 2
    assert cfg.TRAIN.LR_SCHEDULER.ARGS.cooldown_epochs == 10
    lrs = _lrs(cfg, iters)
    for epoch in range(end):  # where the official trainer sets it, the same value
        assert lrs[epoch * iters] == pytest.approx(official_lr(epoch, base, end, warmup, warm, low), rel=1e-12)
    warmup_steps = lrs[:warmup * iters + 1]
    assert lrs[0] == pytest.approx(warm, rel=1e-12)
    assert all(a < b for a, b in zip(warmup_steps, warmup_steps[1:]))  # strictly rising, every iteration
    assert lrs[1] == pytest.approx(warm + (base - warm) / (warmup * iters), rel=1e-12)
    first_cosine = lrs[warmup * iters]
    assert first_cosine == pytest.approx(low + 0.5 * (base - low) * (1 + math.cos(math.pi * warmup / end)), rel=1e-12)
    assert first_cosine < base
    after = lrs[warmup * iters:]
    assert all(a > b for a, b in zip(after, after[1:]))  # strictly falling to the end: no cool-down plateau
    last = (end * iters - 1) / iters
    assert lrs[-1] == pytest.approx(low + 0.5 * (base - low) * (1 + math.cos(math.pi * last / end)), rel=1e-12)
    assert low < lrs[-1] < lrs[(end - 1) * iters] == pytest.approx(official_lr(end - 1, base, end, warmup, warm, low))


def test_schedule_resumes_from_the_step_count_alone():
    cfg = _official_cfg("TRAIN.END_EPOCH", "20")
    iters, base = 4, 2.5e-4
    lrs = _lrs(cfg, iters)
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=base)
    sched = build_scheduler(cfg, opt, iters)
    state = {"last_epoch": 33, "base_lrs": [base], "_last_lr": [lrs[33]], "_step_count": 34}
    sched.load_state_dict({**sched.state_dict(), **state})
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(lrs[34], rel=1e-12)


def test_schedule_arguments_the_trainer_does_not_read_are_errors():
    from cvt_fast.config import load_config

    with pytest.raises(ValueError, match=r"TRAIN\.LR_SCHEDULER\.ARGS\.warmup_epoch\b.*did you mean warmup_epochs"):
        _official_cfg("TRAIN.LR_SCHEDULER.ARGS.warmup_epoch", "3")
    with pytest.raises(ValueError, match="ARGS.epochs=30 differs from TRAIN.END_EPOCH=300"):
        _official_cfg("TRAIN.LR_SCHEDULER.ARGS.epochs", "30")
    assert load_config(str(REPO / "experiments/imagenet/cvt/cvt-13-224x224.yaml"),
                       ["TRAIN.LR_SCHEDULER.ARGS.epochs", "300"]).TRAIN.LR_SCHEDULER.ARGS.epochs == 300
    with pytest.raises(ValueError, match=r"TRAIN\.OPTIMIZER_ARGS\.lr is not read"):
        _official_cfg("TRAIN.OPTIMIZER_ARGS.lr", "0.1")


def official_label_smoothing(logits: torch.Tensor, target: torch.Tensor, eps: float) -> torch.Tensor:
    """The official code's LabelSmoothingCrossEntropy (lib/core/loss.py), written out."""
    logp = F.log_softmax(logits, dim=-1)
    uniform = (-logp.sum(dim=-1)).mean() / logits.shape[-1]
    return eps * uniform + (1 - eps) * F.nll_loss(logp, target)


def test_label_smoothing_loss_is_timms_and_equals_the_official_one():
    import timm.loss

    torch.manual_seed(0)
    logits, target = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 5, (6,))
    criterion = build_criterion(_official_cfg("AUG.MIXUP", "0.0", "AUG.MIXCUT", "0.0"))
    assert type(criterion) is timm.loss.LabelSmoothingCrossEntropy and criterion.smoothing == 0.1
    assert_close(criterion(logits, target), official_label_smoothing(logits, target, 0.1))
    assert_close(criterion(logits, target), F.cross_entropy(logits, target, label_smoothing=0.1))
    one_hot = F.one_hot(target, 5).double()
    assert_close(SoftTargetCrossEntropy()(logits, one_hot), F.cross_entropy(logits, target))
    with pytest.raises(ValueError, match="LOSS.LABEL_SMOOTHING=1.0"):
        build_criterion(_official_cfg("AUG.MIXUP", "0.0", "AUG.MIXCUT", "0.0", "LOSS.LABEL_SMOOTHING", "1.0"))


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
