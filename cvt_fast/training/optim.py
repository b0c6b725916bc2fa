"""Optimizer, learning-rate schedule and loss of the official CvT recipe.

- Weight decay is off for the parameters named by TRAIN.WITHOUT_WD_LIST ('bn': BatchNorm
  weight/bias, 'ln': LayerNorm weight/bias, 'gn': GroupNorm, 'dw': depthwise conv
  weights, 'bias': every other `.bias`) and for model.no_weight_decay() (cls tokens).
- The schedule is timm's CosineLRScheduler, set up as the official code sets it up
  (timm's create_scheduler with epochs = TRAIN.END_EPOCH): linear warm-up from warmup_lr
  over warmup_epochs, then cosine from LR towards min_lr, reached at END_EPOCH. As in the
  official code, cooldown_epochs does not shorten the cosine (timm only adds it to the epoch
  count it returns, which the official trainer ignores). One difference, on purpose: the
  official trainer steps the schedule once per epoch; here the same curve is evaluated at
  fractional epochs every iteration (equal at every epoch boundary, smooth in between).
- Loss: timm's SoftTargetCrossEntropy when mixup/cutmix is on (the soft targets already
  carry the label smoothing), timm's LabelSmoothingCrossEntropy otherwise; both compute
  what the official code's own classes compute.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

_NORM_TYPES = {
    "bn": (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm),
    "ln": (nn.LayerNorm,),
    "gn": (nn.GroupNorm,),
}
_KNOWN_WD_TAGS = {"bn", "ln", "gn", "dw", "bias"}
_OPTIMIZERS = ("adamw", "adam", "sgd")


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels and m.groups > 1


def split_weight_decay(model: nn.Module, without_wd: list[str] | tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Names of trainable parameters (with decay, without decay)."""
    tags = {t.lower() for t in without_wd}
    unknown = tags - _KNOWN_WD_TAGS
    if unknown:
        raise ValueError(f"TRAIN.WITHOUT_WD_LIST has unknown entries {sorted(unknown)}; "
                         f"expected some of {sorted(_KNOWN_WD_TAGS)}")
    no_decay: set[str] = set()
    for mod_name, m in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        hit = any(isinstance(m, _NORM_TYPES[t]) for t in tags if t in _NORM_TYPES)
        hit = hit or ("dw" in tags and _is_depthwise(m))
        if hit:
            no_decay.update(prefix + n for n, _ in m.named_parameters(recurse=False))
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, without = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # Official semantics: an exact name or a substring of the name (e.g. 'cls_token').
        skipped = name in skip or any(s in name for s in skip)
        if skipped or name in no_decay or ("bias" in tags and name.endswith(".bias")):
            without.append(name)
        else:
            decay.append(name)
    return decay, without


def build_optimizer(cfg: Any, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW (or Adam / SGD) over two parameter groups, per TRAIN.OPTIMIZER/LR/WD."""
    name = str(cfg.TRAIN.OPTIMIZER).lower()
    if name not in _OPTIMIZERS:
        raise ValueError(f"TRAIN.OPTIMIZER={cfg.TRAIN.OPTIMIZER!r}; expected one of {_OPTIMIZERS}")
    decay, without = split_weight_decay(model, list(cfg.TRAIN.WITHOUT_WD_LIST))
    params = dict(model.named_parameters())
    groups = [
        {"params": [params[n] for n in decay], "weight_decay": float(cfg.TRAIN.WD), "group_name": "decay"},
        {"params": [params[n] for n in without], "weight_decay": 0.0, "group_name": "no_decay"},
    ]
    lr = float(cfg.TRAIN.LR)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    return torch.optim.SGD(groups, lr=lr, momentum=float(cfg.TRAIN.MOMENTUM), nesterov=bool(cfg.TRAIN.NESTEROV))


def _sched_arg(args: Mapping, key: str, default: Any) -> Any:
    return args[key] if key in args else default


class OfficialCosineSchedule:
    """The official learning-rate curve: timm's CosineLRScheduler with the arguments timm's
    create_scheduler gives it in the official code, asked for its value at any (fractional)
    epoch through timm's public `step(epoch)` on a private one-parameter optimizer."""

    def __init__(self, base_lr: float, epochs: float, warmup_epochs: float = 0.0, warmup_lr: float = 0.0,
                 min_lr: float = 0.0, decay_rate: float = 1.0):
        from timm.scheduler import CosineLRScheduler

        if base_lr <= 0:
            raise ValueError(f"TRAIN.LR={base_lr}; expected > 0")
        if epochs <= 0:
            raise ValueError(f"TRAIN.END_EPOCH={epochs}; expected > 0")
        self._probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr)
        # decay_rate is timm 0.3.2's name for cycle_decay; with one cycle it changes nothing.
        self._timm = CosineLRScheduler(self._probe, t_initial=epochs, lr_min=min_lr, cycle_decay=decay_rate,
                                       cycle_limit=1, warmup_t=warmup_epochs, warmup_lr_init=warmup_lr,
                                       t_in_epochs=True)

    def __call__(self, epoch: float) -> float:
        self._timm.step(epoch)
        return float(self._probe.param_groups[0]["lr"])


class IterationScheduler(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR over optimizer steps whose factor is a pure function of the step, so the
    state is only the step count and resuming reproduces the schedule exactly."""


def build_scheduler(cfg: Any, optimizer: torch.optim.Optimizer, iters_per_epoch: int) -> IterationScheduler:
    """Per-iteration schedule from TRAIN.LR_SCHEDULER (METHOD 'timm' + ARGS.sched cosine,
    or METHOD 'none'/'constant')."""
    if iters_per_epoch < 1:
        raise ValueError(f"iters_per_epoch={iters_per_epoch}; expected >= 1")
    sched_cfg = cfg.TRAIN.LR_SCHEDULER
    method = str(sched_cfg.get("METHOD", "timm"))
    base_lr = float(cfg.TRAIN.LR)
    if method in ("none", "constant"):
        fn: Callable[[int], float] = lambda step: 1.0
    elif method == "timm":
        # (config.load_config has checked the keys of ARGS and its 'epochs' against END_EPOCH.)
        args = sched_cfg.get("ARGS", {}) or {}
        kind = str(_sched_arg(args, "sched", "cosine"))
        if kind != "cosine":
            raise ValueError(f"TRAIN.LR_SCHEDULER.ARGS.sched={kind!r}; only 'cosine' is supported")
        epochs = int(cfg.TRAIN.END_EPOCH)
        curve = OfficialCosineSchedule(base_lr, epochs, float(_sched_arg(args, "warmup_epochs", 0)),
                                       float(_sched_arg(args, "warmup_lr", 0.0)),
                                       float(_sched_arg(args, "min_lr", 0.0)),
                                       float(_sched_arg(args, "decay_rate", 1.0)))

        def fn(step: int) -> float:
            return curve(step / iters_per_epoch) / base_lr
    else:
        raise ValueError(f"TRAIN.LR_SCHEDULER.METHOD={method!r}; expected 'timm' (cosine) or 'none'")
    # Every group shares the schedule; LambdaLR scales each group's initial lr.
    return IterationScheduler(optimizer, lr_lambda=fn)


def mixup_enabled(cfg: Any) -> bool:
    """Mixup/CutMix is on when an alpha (or MIXCUT_MINMAX) is set and MIXUP_PROB > 0;
    so either AUG.MIXUP_PROB 0 or both alphas 0 turns it off."""
    aug = cfg.AUG
    any_alpha = float(aug.MIXUP) > 0.0 or float(aug.MIXCUT) > 0.0 or bool(list(aug.MIXCUT_MINMAX))
    return any_alpha and float(aug.MIXUP_PROB) > 0.0


def build_mixup(cfg: Any):
    """timm Mixup/CutMix producing label-smoothed soft targets, or None when off."""
    if not mixup_enabled(cfg):
        return None
    from timm.data import Mixup

    aug = cfg.AUG
    return Mixup(mixup_alpha=float(aug.MIXUP), cutmix_alpha=float(aug.MIXCUT),
                 cutmix_minmax=list(aug.MIXCUT_MINMAX) or None, prob=float(aug.MIXUP_PROB),
                 switch_prob=float(aug.MIXUP_SWITCH_PROB), mode=str(aug.MIXUP_MODE),
                 label_smoothing=float(cfg.LOSS.LABEL_SMOOTHING), num_classes=int(cfg.MODEL.NUM_CLASSES))


def build_criterion(cfg: Any, train: bool = True) -> nn.Module:
    """Training loss per the recipe; evaluation is always plain cross-entropy."""
    if str(cfg.LOSS.LOSS) != "softmax":
        raise ValueError(f"LOSS.LOSS={cfg.LOSS.LOSS!r}; expected 'softmax'")
    if not train:
        return nn.CrossEntropyLoss()
    if mixup_enabled(cfg):
        return SoftTargetCrossEntropy()
    smoothing = float(cfg.LOSS.LABEL_SMOOTHING)
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"LOSS.LABEL_SMOOTHING={smoothing}; expected in [0, 1)")
    if smoothing > 0.0:
        return LabelSmoothingCrossEntropy(smoothing)
    return nn.CrossEntropyLoss()
