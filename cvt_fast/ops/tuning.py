"""The measured evidence behind `auto` on a GPU: the tuning file that `python bench/tune.py` writes.

The file (JSON, schema 1; cvt_fast/ops/tuning.json ships with the package, the environment
variable CVT_FAST_TUNING_FILE points elsewhere) holds one entry per CUDA device name, as
torch.cuda.get_device_name() spells it:

    {"schema": 1,
     "devices": {
       "NVIDIA H100 80GB HBM3": {
         "measured_utc": "...", "environment": {torch, triton, CUDA, driver, git commit, ...},
         "tests": {"triton": {"passed": true, "summary": "41 passed, 2 skipped", "command": "..."}, ...},
         "timings": {
           "attention": {"bfloat16": {"criterion": "...", "shapes": [...],
                                      "total_ms": {"triton": 3.1, "cuda": 3.5, "sdpa": 4.0},
                                      "rows": [...per shape and mode...]}, ...},
           "conv_proj": {...}}}}}

`auto` takes, among the backends whose GPU tests passed on that device (`tests[name].passed`)
and that can run the call's tensors, the one with the smallest `total_ms` for the op and dtype.
Nothing is invented: a device, op or dtype without an entry has no evidence, and `auto` then
takes its default (backend.py).
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

SCHEMA = 1
ENV_VAR = "CVT_FAST_TUNING_FILE"
PACKAGED_FILE = Path(__file__).with_name("tuning.json")


class TuningFileError(ValueError):
    """The tuning file exists but cannot be used (bad JSON, unknown schema)."""


def tuning_path() -> Path:
    """CVT_FAST_TUNING_FILE if set, else the file shipped with the package."""
    override = os.environ.get(ENV_VAR)
    return Path(override) if override else PACKAGED_FILE


@functools.lru_cache(maxsize=8)
def _read(path: str, stamp: tuple) -> dict:
    del stamp  # part of the cache key only: a rewritten file is read again
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise TuningFileError(f"tuning file {path} cannot be read: {error}") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("devices"), dict):
        raise TuningFileError(f"tuning file {path} is not a schema-{SCHEMA} cvt_fast tuning file "
                              "(write one with `python bench/tune.py` on the GPU)")
    return data


def load_tuning(path: Optional[Path] = None) -> dict:
    """The tuning file's contents; an absent file reads as no devices."""
    path = Path(path) if path is not None else tuning_path()
    try:
        stat = path.stat()
    except OSError:
        return {"schema": SCHEMA, "devices": {}}
    return _read(str(path), (stat.st_mtime_ns, stat.st_size))


@dataclass(frozen=True)
class TunedChoice:
    """What the evidence says for one (device, op, dtype): the backend, or None and why not."""
    backend: Optional[str]
    reason: str


def _fmt_ms(value: float) -> str:
    return f"{value:.3g} ms"


def tuned_choice(op: str, dtype_name: str, device_name: str, why_not: Callable[[str], Optional[str]],
                 path: Optional[Path] = None) -> TunedChoice:
    """The fastest verified backend that can run here, per the tuning file.

    why_not(name) says why backend `name` cannot run the call's tensors (None if it can).
    """
    path = Path(path) if path is not None else tuning_path()
    data = load_tuning(path)
    entry: Optional[dict[str, Any]] = data["devices"].get(device_name)
    if entry is None:
        measured = ", ".join(sorted(data["devices"])) or "none"
        return TunedChoice(None, f"no tuning entry for {device_name!r} in {path} (devices measured: {measured})")
    timing = entry.get("timings", {}).get(op, {}).get(dtype_name)
    if not timing or not timing.get("total_ms"):
        return TunedChoice(None, f"the tuning file {path} has no {op} {dtype_name} timings for {device_name!r}")
    tests = entry.get("tests", {})
    ranked = sorted(timing["total_ms"].items(), key=lambda item: item[1])
    passed = [name for name, _ in ranked if tests.get(name, {}).get("passed") is True]
    skipped = []
    for name, total in ranked:
        if name not in passed:
            skipped.append(f"{name} ({_fmt_ms(total)}; its GPU tests did not pass there)")
            continue
        reason = why_not(name)
        if reason is not None:
            skipped.append(f"{name} ({_fmt_ms(total)}; cannot run these tensors: {reason})")
            continue
        timed = ", ".join(f"{n} {_fmt_ms(t)}" for n, t in ranked)
        note = f"; passed over: {'; '.join(skipped)}" if skipped else ""
        return TunedChoice(name, f"fastest with passing GPU tests on {device_name} per {path} "
                                 f"({timing.get('criterion', 'total time')}: {timed}; measured "
                                 f"{entry.get('measured_utc', '?')}){note}")
    return TunedChoice(None, f"no backend timed in {path} for {op} {dtype_name} on {device_name!r} can be taken: "
                             + "; ".join(skipped))
