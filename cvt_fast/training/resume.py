"""Resumable training checkpoints: write atomically, find the newest valid one, restore.

A checkpoint holds everything needed to continue as if never stopped: model, optimizer,
scheduler, GradScaler, EMA, the RNG states of every rank (python, numpy, torch, CUDA)
and the data position (epoch, batches done in that epoch, global step). Files are
OUTPUT/<run>/checkpoints/ckpt_<global step>.pth, written to a temporary file, fsynced
and renamed (os.replace), so a crash mid-write never destroys the last good one; the
newest few are kept. Everything is stored in types `torch.load(weights_only=True)` reads.
"""
from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from cvt_fast.checkpoint import atomic_save  # noqa: F401 (re-exported: temp file, fsync, os.replace)

log = logging.getLogger("cvt_fast.train")

CKPT_DIR = "checkpoints"
_NAME = re.compile(r"^ckpt_(\d{8,})\.pth$")
FORMAT = "cvt_fast.train/1"
_REQUIRED = ("format", "model", "optimizer", "scheduler", "epoch", "step_in_epoch", "global_step")


def capture_rng() -> dict[str, Any]:
    """This process's RNG states, in weights_only-loadable types."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def checkpoint_path(run_dir: str | os.PathLike, global_step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"ckpt_{global_step:08d}.pth"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoints of a run, newest (highest global step) first."""
    folder = Path(run_dir) / CKPT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), folder / n) for n in os.listdir(folder) if (m := _NAME.match(n))]
    return [p for _, p in sorted(found, reverse=True)]


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> None:
    for old in list_checkpoints(run_dir)[max(keep, 1):]:
        try:
            old.unlink()
        except OSError as err:
            log.warning("could not remove old checkpoint %s: %s", old, err)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load and sanity-check one training checkpoint; ValueError when it is not usable."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, bad pickle, I/O error: all mean "unusable"
        raise ValueError(f"checkpoint {path} is unreadable ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a cvt_fast training checkpoint (format {FORMAT!r} expected)")
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {missing}")
    return state


def find_resume_checkpoint(run_dir: str | os.PathLike) -> Optional[tuple[Path, dict[str, Any]]]:
    """The newest checkpoint that loads; corrupt ones are skipped with a warning."""
    for path in list_checkpoints(run_dir):
        try:
            return path, read_checkpoint(path)
        except ValueError as err:
            log.warning("skipping checkpoint: %s", err)
    return None
