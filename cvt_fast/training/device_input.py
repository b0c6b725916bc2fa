"""The training batch's per-pixel float work, on the training device (timm's PrefetchLoader does the same).

Both training loaders (DATA.LOADER torch and dali) deliver uint8 CHW batches: the loader workers
stop after the last PIL (or DALI) augmentation, so the CPU never converts a pixel to float. Where
the batch arrives, `DeviceInput` moves it to the device (a quarter of float32's bytes), converts and
normalises it with the same operations in the same order as torchvision's ToTensor + Normalize
(x / 255, then (x - mean) / std: equal to them to the float32 bit on the CPU), and applies timm's
RandomErasing to the batch (AUG.TIMM_AUG.RE_PROB, RE_MODE, RE_COUNT, each image on its own as in
the official per-image transform). Mixup/cutmix follow in the training loop.

The random draws: erasing's choices come from Python's `random` of the training process, its
'rand'/'pixel' colours from the device's torch generator (the CPU generator on a CPU run); both
are in the RNG states a checkpoint saves (resume.capture_rng), so a resumed run erases as the
uninterrupted one would.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch


class DeviceInput:
    """uint8 (B, 3, H, W) batch -> float32 on `device`, normalised, randomly erased (re_prob > 0)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device, re_prob: float = 0.0,
                 re_mode: str = "const", re_count: int = 1):
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"INPUT.MEAN={list(mean)}, INPUT.STD={list(std)}; expected 3 values each, std > 0")
        if not 0.0 <= re_prob <= 1.0:
            raise ValueError(f"AUG.TIMM_AUG.RE_PROB={re_prob}; expected a probability in [0, 1]")
        self.device = torch.device(device)
        # Normalize's own constants: float32 tensors made from the config's floats.
        self.mean = torch.tensor(list(mean), dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.erasing = None
        if re_prob > 0:
            from timm.data.random_erasing import RandomErasing

            self.erasing = RandomErasing(re_prob, mode=re_mode, max_count=re_count, device=str(self.device))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise TypeError(f"a training batch of dtype {x.dtype} and shape {tuple(x.shape)}; expected uint8 "
                            "(B, 3, H, W) from the training loader")
        x = x.to(self.device, non_blocking=True).float().div_(255).sub_(self.mean).div_(self.std)
        if self.erasing is not None:
            x = self.erasing(x)
        return x

    def __repr__(self) -> str:
        return (f"DeviceInput(device={self.device}, mean={self.mean.flatten().tolist()}, "
                f"std={self.std.flatten().tolist()}, erasing={self.erasing!r})")


def build_device_input(cfg: Any, device: torch.device) -> DeviceInput:
    """The config's normalisation (INPUT.MEAN/STD) and random erasing (AUG.TIMM_AUG, timm recipe only)."""
    from .data import erasing_settings

    return DeviceInput(cfg.INPUT.MEAN, cfg.INPUT.STD, device, *erasing_settings(cfg))
