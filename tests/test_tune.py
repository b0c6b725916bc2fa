"""bench/tune.py, the command that writes the evidence behind 'auto': its CPU smoke run, the
format cvt_fast/ops/tuning.py reads back, and its rule that skipped GPU tests verify nothing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from cvt_fast.ops import tuning

REPO = Path(__file__).resolve().parents[1]


def run_tune(out: Path, *extra: str) -> tuple[dict, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, str(REPO / "bench" / "tune.py"), "--quick", "--device", "cpu",
                           "--out", str(out), *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"tune.py failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return json.loads(out.read_text()), done.stdout


def test_tune_writes_an_entry_that_tuning_reads_and_that_verifies_nothing_without_gpu_tests(tmp_path):
    out = tmp_path / "tuning.json"
    # Timings: the reference and SDPA are quick on the CPU (the smoke run names them explicitly).
    data, stdout = run_tune(out, "--steps", "timings", "--backends", "reference,sdpa")
    assert data["schema"] == tuning.SCHEMA and len(data["devices"]) == 1
    (device_name, entry), = data["devices"].items()
    assert entry["environment"]["device"] == device_name and entry["measured_utc"]
    attention = entry["timings"]["attention"]["float32"]
    assert set(attention["total_ms"]) == {"reference", "sdpa"} and attention["incomplete"] == {}
    assert all(t > 0 for t in attention["total_ms"].values())
    assert len(attention["shapes"]) == 3 and {r["mode"] for r in attention["rows"]} == {"fwd", "fwd+bwd"}
    assert set(entry["timings"]["conv_proj"]["float32"]["total_ms"]) == {"reference"}

    # Tests: on the CPU every GPU test skips, and a backend whose tests all skipped is not verified.
    data, _ = run_tune(out, "--steps", "tests", "--backends", "sdpa")
    entry = data["devices"][device_name]
    assert entry["tests"]["sdpa"]["passed"] is False and entry["tests"]["sdpa"]["summary"].startswith("0 ran")
    assert "timings" in entry, "a tests-only run keeps the timings already in the file"

    # What tuning.py makes of it: the timed backends, none of them verified.
    choice = tuning.tuned_choice("attention", "float32", device_name, lambda name: None, path=out)
    assert choice.backend is None and "sdpa" in choice.reason and "GPU tests did not pass" in choice.reason


def test_tune_on_the_cpu_writes_this_cpus_paths_that_auto_reads(tmp_path):
    from cvt_fast.ops import backend

    out = tmp_path / "tuning.json"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("CVT_FAST_BACKEND", None)
    done = subprocess.run([sys.executable, str(REPO / "bench" / "tune.py"), "--quick", "--device", "cpu",
                           "--repeats", "1", "--threads", "1", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"tune.py failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    data = json.loads(out.read_text())
    (name, entry), = data["cpus"].items()
    assert name == backend.cpu_name() and data["devices"] == {} and entry["threads"] == 1 and entry["measured_utc"]
    assert entry["official"]["train_s"] > 0 and entry["official"]["eval_s"] > 0
    assert {f: set(p) for f, p in entry["timings"].items()} == {
        f: set(paths) - {"official"} for f, paths in backend.CPU_FAMILIES.items()}
    for family, paths in backend.CPU_FAMILIES.items():
        for mode in ("train", "eval"):
            assert tuning.cpu_choice(family, mode, name, paths, path=out).backend in paths
    # The README's table, from the same run: the whole model on each backend and on auto.
    for row in ("| `official` |", "| `reference` |", "| `sdpa` |", "| `auto` |", "auto's paths"):
        assert row in done.stdout
