"""Optimizer, learning-rate schedule and loss of the official CvT recipe.

- Weight decay is off for the parameters named by TRAIN.WITHOUT_WD_LIST ('bn': BatchNorm
  weight/bias, 'ln': LayerNorm weight/bias, 'gn': GroupNorm, 'dw': depthwise conv
  weights, 'bias': every other `.bias`) and for model.no_weight_decay() (cls tokens).
- The schedule is timm's cosine with linear warm-up, evaluated in fractional epochs at
  every iteration (smooth, and exact when resuming mid-epoch): warm-up from warmup_lr
  to LR over warmup_epochs, cosine from LR down to min_lr reaching it at
  END_EPOCH - cooldown_epochs, then min_lr for the cool-down epochs.
- Loss: SoftTargetCrossEntropy when mixup/cutmix is on (the soft targets already carry
  the label smoothing), label-smoothing cross-entropy otherwise.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

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


def cosine_lr_at(epoch: float, base_lr: float, total_epochs: float, warmup_epochs: float = 0.0,
                 warmup_lr: float = 0.0, min_lr: float = 0.0, cooldown_epochs: float = 0.0) -> float:
    """Learning rate at fractional `epoch` (timm's cosine, warm-up not prefixed)."""
    if epoch < warmup_epochs:
        return warmup_lr + (base_lr - warmup_lr) * epoch / warmup_epochs
    t_initial = max(total_epochs - cooldown_epochs, 1e-12)
    if epoch >= t_initial:
        return min_lr
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * epoch / t_initial))


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
        args = sched_cfg.get("ARGS", {}) or {}
        kind = str(_sched_arg(args, "sched", "cosine"))
        if kind != "cosine":
            raise ValueError(f"TRAIN.LR_SCHEDULER.ARGS.sched={kind!r}; only 'cosine' is supported")
        total = float(cfg.TRAIN.END_EPOCH)
        warmup = float(_sched_arg(args, "warmup_epochs", 0))
        warmup_lr = float(_sched_arg(args, "warmup_lr", 0.0))
        min_lr = float(_sched_arg(args, "min_lr", 0.0))
        cooldown = float(_sched_arg(args, "cooldown_epochs", 0))
        if base_lr <= 0:
            raise ValueError(f"TRAIN.LR={base_lr}; expected > 0")

        def fn(step: int) -> float:
            lr = cosine_lr_at(step / iters_per_epoch, base_lr, total, warmup, warmup_lr, min_lr, cooldown)
            return lr / base_lr
    else:
        raise ValueError(f"TRAIN.LR_SCHEDULER.METHOD={method!r}; expected 'timm' (cosine) or 'none'")
    # Every group shares the schedule; LambdaLR scales each group's initial lr.
    return IterationScheduler(optimizer, lr_lambda=fn)


class LabelSmoothingCrossEntropy(nn.Module):
    """(1 - eps) * NLL + eps * mean over classes of -log p (the official definition)."""

    def __init__(self, smoothing: float = 0.1):
        super().__init__()
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"label smoothing {smoothing}; expected in [0, 1)")
        self.smoothing = smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(logits.float(), dim=-1)
        nll = F.nll_loss(logp, target)
        uniform = -logp.mean(dim=-1).mean()
        return (1.0 - self.smoothing) * nll + self.smoothing * uniform


class SoftTargetCrossEntropy(nn.Module):
    """Cross-entropy against a distribution (mixup/cutmix targets)."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


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
    if float(cfg.LOSS.LABEL_SMOOTHING) > 0.0:
        return LabelSmoothingCrossEntropy(float(cfg.LOSS.LABEL_SMOOTHING))
    return nn.CrossEntropyLoss()
