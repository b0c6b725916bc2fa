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

CPUs have their own entries, keyed by the CPU's name (/proc/cpuinfo's "model name"), written by
`python bench/tune.py --device cpu`:

    "cpus": {
      "AMD EPYC ...": {
        "measured_utc": "...", "environment": {...}, "threads": 2,
        "settings": {"model": "cvt-13", "image_size": 224, "batch": 4, "repeats": 3, ...},
        "official": {"train_s": 0.94, "eval_s": 0.31},          # the whole model on its official path
        "timings": {"attention": {"reference": {"train_s": ..., "eval_s": ...}, "sdpa": {...}},
                    "conv_proj": {"reference": {...}}, "mlp": {...}, "residual_layer_norm": {...}}}}

Each timing is a whole CvT step (training: forward + backward; eval: forward without grad) with
one op family on that path and every other family on the official path. `auto` takes, per family
and mode, the fastest of the timed paths when it beats the official path by CPU_MARGIN, else the
official path.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

SCHEMA = 1
# On a CPU another path replaces the official one only when its step is at least this much faster:
# repeated best-of-3 steps on this project's shared 2-core CPU differ by a few percent (the tuning
# run that first wrote its entry saw 0.1% to 2% "wins" that were noise), and within that the
# official path, never slower than itself, stays.
CPU_MARGIN = 0.05
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


def cpu_choice(family: str, mode: str, cpu_name: str, candidates: tuple[str, ...],
               path: Optional[Path] = None) -> TunedChoice:
    """The fastest of `candidates` ('official' and backend names) for op family `family` in `mode`
    ('train' or 'eval') on the CPU named `cpu_name`, per the tuning file's CPU entry."""
    path = Path(path) if path is not None else tuning_path()
    cpus = load_tuning(path).get("cpus", {})
    entry: Optional[dict[str, Any]] = cpus.get(cpu_name) if isinstance(cpus, dict) else None
    if entry is None:
        measured = ", ".join(sorted(cpus)) if isinstance(cpus, dict) and cpus else "none"
        return TunedChoice(None, f"no CPU entry for {cpu_name!r} in {path} (CPUs measured: {measured})")
    key = f"{mode}_s"
    timed = {"official": entry.get("official", {}).get(key)}
    timed.update({name: t.get(key) for name, t in entry.get("timings", {}).get(family, {}).items()})
    timed = {name: t for name, t in timed.items() if name in candidates and isinstance(t, (int, float))}
    if "official" not in timed or len(timed) < 2:
        return TunedChoice(None, f"the CPU entry for {cpu_name!r} in {path} has no {mode} timings of {family}")
    best = min(timed, key=lambda name: timed[name])
    if timed[best] > (1 - CPU_MARGIN) * timed["official"]:
        best = "official"
    listed = ", ".join(f"{name} {t:.3f} s" for name, t in sorted(timed.items(), key=lambda item: item[1]))
    settings = entry.get("settings", {})
    return TunedChoice(best, f"the {family} path for {mode} on {cpu_name} per {path} (a "
                             f"{settings.get('model', 'CvT')} {mode} step at batch {settings.get('batch', '?')}, "
                             f"{entry.get('threads', '?')} threads, {family} on each path, the rest official: "
                             f"{listed}; another path than the official one must be {CPU_MARGIN:.0%} faster; "
                             f"measured {entry.get('measured_utc', '?')})")
