"""Is training input-bound? Per step, the time spent waiting on the data loader against the step time.

The loop reads the clock when a step ends and again when the loader hands over the next batch:
the difference is time the model could have used (on a GPU, after the step's `loss.item()` has
synchronised, so the host clock is the device's too). The first step of each epoch is left out of
the judgement: it includes starting the loader's worker processes.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

# Judge only after this many steps (or a whole epoch after its first step, if shorter): the first
# steps also warm up the allocator, cuDNN's autotuner and torch.compile.
MIN_STEPS = 50


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass
class InputWaitMeter:
    """Sums of waiting and step time over the judged steps of a run; `warning()` returns the one
    message when the waiting share exceeds `threshold` (0 switches it off), then never again."""
    threshold: float
    min_steps: int = MIN_STEPS
    workers: int = 0
    loader: str = "torch"   # DATA.LOADER: the advice differs once DALI already does the work
    wait_s: float = 0.0
    step_s: float = 0.0
    steps: int = 0
    warned: bool = False

    def add(self, wait_s: float, step_s: float) -> None:
        self.wait_s += max(0.0, wait_s)
        self.step_s += max(0.0, step_s)
        self.steps += 1

    @property
    def fraction(self) -> float:
        return self.wait_s / self.step_s if self.step_s > 0 else 0.0

    def warning(self) -> Optional[str]:
        if self.warned or self.threshold <= 0 or self.steps < max(self.min_steps, 1):
            return None
        if self.fraction <= self.threshold:
            return None
        self.warned = True
        step_ms, wait_ms = 1e3 * self.step_s / self.steps, 1e3 * self.wait_s / self.steps
        # A loader with W workers delivers a batch per step time; the model needs one per
        # (step - wait): about W / (1 - fraction) workers keep up (the main process counts as one).
        needed = math.ceil(max(self.workers, 1) / max(1.0 - self.fraction, 0.05))
        if self.loader == "dali":
            remedies = (f"raise WORKERS (DALI's threads, which read the files and feed the GPU; about {needed}), "
                        "or re-encode the training set once at a bounded size (python -m cvt_fast.data prepare SRC "
                        "DST --max-side 320; smaller files decode faster)")
        else:
            remedies = (f"raise WORKERS (about {needed}, one core each), set DATA.LOADER dali (decoding and "
                        "augmentation on the GPU; pip install 'cvt-fast[dali]'), or re-encode the training set once "
                        "at a bounded size (python -m cvt_fast.data prepare SRC DST --max-side 320)")
        return (f"input-bound: {100 * self.fraction:.0f}% of the step time went to waiting for the data loader over "
                f"{self.steps} steps ({wait_ms:.1f} ms of {step_ms:.1f} ms a step; DATA.LOADER {self.loader}, "
                f"WORKERS {self.workers}, {usable_cores()} usable cores here). To feed the model: {remedies}. "
                "README: 'Is my training input-bound?'. Said once per run; metrics.jsonl records "
                "data_wait_fraction every epoch")
