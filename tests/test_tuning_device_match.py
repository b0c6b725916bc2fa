"""Issue 26: the tuning file's evidence belongs to one device name exactly.

The PCIe, SXM (HBM3) and NVL forms of one GPU differ in memory bandwidth, clocks and power
limits, so one form's timings say nothing about another's: a near-miss name must find no
entry (and 'auto' then its documented default), never a neighbour's measurement. The names
below are spelt as torch.cuda.get_device_name() spells them.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cvt_fast.ops import tuning
from cvt_fast.ops.backend import choose_auto

MEASURED = "NVIDIA H100 80GB HBM3"
NEAR_MISSES = (
    "NVIDIA H100 PCIe",          # the same chip, another board
    "NVIDIA H100 NVL",
    "NVIDIA H100",               # a prefix of the measured name
    "NVIDIA H100 80GB HBM3e",    # the measured name is a prefix of it
    "nvidia h100 80gb hbm3",     # case
    " NVIDIA H100 80GB HBM3",    # spacing
    "NVIDIA H200",
    "NVIDIA GH200 480GB",
)


def _write_tuning(path: Path, device_name: str, timings: dict, passed: tuple) -> Path:
    entry = {"measured_utc": "2026-12-08T00:00:00Z",
             "tests": {name: {"passed": True, "summary": "1 passed"} for name in passed},
             "timings": {"attention": {"bfloat16": {"criterion": "fwd+bwd", "total_ms": timings}}}}
    path.write_text(json.dumps({"schema": tuning.SCHEMA, "devices": {device_name: entry}}))
    return path


@pytest.fixture
def tuning_file(tmp_path) -> Path:
    # 'reference' stands in for a fast backend: it can run anywhere, so why_not never vetoes it.
    return _write_tuning(tmp_path / "tuning.json", MEASURED, {"reference": 1.0, "triton": 2.0},
                         ("reference", "triton"))


def test_the_exact_device_name_takes_its_fastest_verified_backend(tuning_file):
    choice = tuning.tuned_choice("attention", "bfloat16", MEASURED, lambda name: None, path=tuning_file)
    assert choice.backend == "reference" and MEASURED in choice.reason


@pytest.mark.parametrize("device_name", NEAR_MISSES)
def test_a_near_miss_device_name_takes_no_other_devices_timings(tuning_file, device_name):
    choice = tuning.tuned_choice("attention", "bfloat16", device_name, lambda name: None, path=tuning_file)
    assert choice.backend is None, f"{device_name!r} took {MEASURED!r}'s timings: {choice.reason}"
    assert "no tuning entry" in choice.reason and repr(device_name) in choice.reason


@pytest.mark.parametrize("device_name", NEAR_MISSES[:3])
def test_auto_on_a_near_miss_device_falls_back_to_its_default_and_says_why(tuning_file, device_name, monkeypatch):
    monkeypatch.setenv(tuning.ENV_VAR, str(tuning_file))
    measured = choose_auto("attention", "cuda", torch.bfloat16, 64, device_name=MEASURED)
    other = choose_auto("attention", "cuda", torch.bfloat16, 64, device_name=device_name)
    assert measured.backend == "reference", measured.reason
    assert other.backend != "reference" or "without a measurement" in other.reason, other.reason
    assert "no tuning entry" in other.reason and repr(device_name) in other.reason


def test_each_of_two_measured_forms_keeps_its_own_choice(tmp_path):
    path = tmp_path / "two.json"
    forms = {"NVIDIA H100 PCIe": {"reference": 1.0, "sdpa": 3.0}, "NVIDIA H100 80GB HBM3": {"reference": 4.0, "sdpa": 2.0}}
    devices = {name: {"tests": {"reference": {"passed": True}, "sdpa": {"passed": True}},
                      "timings": {"attention": {"bfloat16": {"total_ms": timings}}}} for name, timings in forms.items()}
    path.write_text(json.dumps({"schema": tuning.SCHEMA, "devices": devices}))
    picks = {name: tuning.tuned_choice("attention", "bfloat16", name, lambda n: None, path=path).backend
             for name in forms}
    assert picks == {"NVIDIA H100 PCIe": "reference", "NVIDIA H100 80GB HBM3": "sdpa"}
