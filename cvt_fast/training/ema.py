"""Exponential moving average of the model weights (TRAIN.EMA.*).

After every optimizer step: ema = decay * ema + (1 - decay) * weights for floating
parameters and buffers (BatchNorm running statistics included); integer buffers
(num_batches_tracked) are copied. The EMA copy lives on the model's device, is
never trained, and is evaluated beside the model when enabled.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn


class ModelEma:
    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"TRAIN.EMA.DECAY={decay}; expected in [0, 1)")
        self.decay = float(decay)
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        src = model.state_dict()
        for name, ema_value in self.module.state_dict().items():
            value = src[name].detach()
            if ema_value.is_floating_point():
                ema_value.lerp_(value.to(ema_value.dtype), 1.0 - self.decay)
            else:
                ema_value.copy_(value)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "model": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
