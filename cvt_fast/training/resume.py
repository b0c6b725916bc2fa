"""Resumable training checkpoints: write atomically, find the newest readable one, prune, restore.

A checkpoint holds everything needed to continue as if never stopped: model, optimizer,
scheduler, GradScaler, EMA, the RNG states of every rank (python, numpy, torch, CUDA)
and the data position (epoch, batches done in that epoch, global step). Files are
OUTPUT/<run>/checkpoints/ckpt_<global step>.pth, written to a temporary file, fsynced
and renamed (os.replace), so a crash mid-write never destroys the last good one.
Everything is stored in types `torch.load(weights_only=True)` reads, with a sha256
digest of the contents (cvt_fast.checkpoint.add_checksum) that reading verifies.

What may be deleted, and when:
- pruning removes only checkpoints older than the newest *readable* one (the one just
  written), keeps the newest few readable ones and never the one the run resumed from;
  a file with a higher step number than the one just written is left alone;
- temporaries of writes that were killed before their rename (`.ckpt_*.tmp`, ...) are
  removed when a run starts;
- nothing else: a run that starts over moves the earlier run's outputs aside (`set_aside`).
"""
from __future__ import annotations

import logging
import os
import random
import re
import time
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import torch

from cvt_fast.checkpoint import (TEMPORARY_NAME, CheckpointError, add_checksum, atomic_save, read_checkpoint_file,
                                 verify_checksum)

log = logging.getLogger("cvt_fast.train")

CKPT_DIR = "checkpoints"
_NAME = re.compile(r"^ckpt_(\d{8,})\.pth$")
FORMAT = "cvt_fast.train/1"
_REQUIRED = ("format", "model", "optimizer", "scheduler", "epoch", "step_in_epoch", "global_step")
# Outputs of a run that a fresh start in the same folder would overwrite or cut (set_aside).
_EARLIER_OUTPUTS = ("metrics.jsonl", "model_best.pth", "final_state.pth", "final_state_ema.pth")
# Written by logs.MetricsWriter.truncate_before before its rename.
_OTHER_TEMPORARIES = ("metrics.jsonl.tmp",)


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


def checkpoint_step(path: str | os.PathLike) -> int:
    match = _NAME.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not named like a training checkpoint (ckpt_<step>.pth)")
    return int(match.group(1))


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoints of a run, newest (highest global step) first."""
    folder = Path(run_dir) / CKPT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), folder / n) for n in os.listdir(folder) if (m := _NAME.match(n))]
    return [p for _, p in sorted(found, reverse=True)]


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write a training checkpoint atomically, with the digest of its contents inside."""
    return atomic_save(add_checksum(state), path)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load, verify and sanity-check one training checkpoint; ValueError naming it when it is
    not usable (unreadable, corrupt, or not a training checkpoint)."""
    try:
        state = read_checkpoint_file(path, weights_only=True)
        if isinstance(state, dict) and not verify_checksum(state, f"'{path}'") and state.get("format") == FORMAT:
            log.info("note: checkpoint %s has no checksum (written by an older cvt_fast): loaded unverified", path)
    except CheckpointError as err:
        raise ValueError(str(err)) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a cvt_fast training checkpoint (format {FORMAT!r} expected)")
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {missing}")
    return state


def scan_checkpoints(run_dir: str | os.PathLike) -> tuple[Optional[tuple[Path, dict[str, Any]]], list[str]]:
    """(the newest checkpoint that reads and verifies with its state, or None; why each newer
    one was skipped). Every skipped file is logged with the reason."""
    skipped: list[str] = []
    for path in list_checkpoints(run_dir):
        try:
            return (path, read_checkpoint(path)), skipped
        except ValueError as err:
            log.warning("skipping checkpoint: %s", err)
            skipped.append(str(err))
    return None, skipped


def find_resume_checkpoint(run_dir: str | os.PathLike) -> Optional[tuple[Path, dict[str, Any]]]:
    """The newest checkpoint that loads; corrupt ones are skipped with a warning."""
    return scan_checkpoints(run_dir)[0]


def prune_checkpoints(run_dir: str | os.PathLike, keep: int, newest: Path, readable: set[Path],
                      protect: Optional[Path] = None) -> list[Path]:
    """Remove checkpoints older than `newest`, keeping the `keep` newest readable ones (`newest`
    among them) and `protect` (the one the run resumed from). Returns what was removed.

    `newest` must be known to be readable (the checkpoint just written). `readable` holds the
    files known to read and verify; an older file not in it is read once to find out (and
    added to it when it does). Files with a higher step than `newest` are never touched.
    """
    newest_step = checkpoint_step(newest)
    kept, removed = 1, []
    for path in list_checkpoints(run_dir):
        if checkpoint_step(path) >= newest_step or path == protect:
            continue
        if kept < keep and _is_readable(path, readable):
            kept += 1
            continue
        try:
            path.unlink()
            removed.append(path)
        except OSError as err:
            log.warning("could not remove old checkpoint %s: %s", path, err)
    return removed


def _is_readable(path: Path, readable: set[Path]) -> bool:
    if path in readable:
        return True
    try:
        read_checkpoint(path)
    except ValueError as err:
        log.warning("old checkpoint %s is unreadable, removing it (a newer readable one exists): %s", path, err)
        return False
    readable.add(path)
    return True


def remove_stale_temporaries(run_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that writes killed before their rename left in the run folder
    and its checkpoints folder; returns them. Call it only where no other process writes."""
    removed = []
    for folder in (Path(run_dir), Path(run_dir) / CKPT_DIR):
        if not folder.is_dir():
            continue
        for name in sorted(os.listdir(folder)):
            if TEMPORARY_NAME.match(name) or name in _OTHER_TEMPORARIES:
                (folder / name).unlink()
                removed.append(folder / name)
    return removed


def earlier_outputs(run_dir: str | os.PathLike) -> list[Path]:
    """The files of an earlier run in this folder that a fresh start would overwrite or cut."""
    run_dir = Path(run_dir)
    found = [p for p in (run_dir / name for name in _EARLIER_OUTPUTS) if p.exists()]
    found += sorted(p for p in run_dir.glob("model_*.pth") if p.name != "model_best.pth")
    return list_checkpoints(run_dir) + found


def set_aside(run_dir: str | os.PathLike, files: Iterable[Path]) -> Path:
    """Move `files` of the run folder into a new run_dir/previous-<time>/ (same file system:
    renames, nothing copied or lost); returns that folder."""
    run_dir = Path(run_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = run_dir / f"previous-{stamp}"
    n = 1
    while folder.exists():
        n += 1
        folder = run_dir / f"previous-{stamp}-{n}"
    for path in files:
        destination = folder / path.relative_to(run_dir)
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, destination)
    return folder
