"""tools/gpu_smoke.py, the first command of every GPU session, dry-run on the CPU so it cannot rot.

The dry run goes through every step as the GPU run does (the runner, its deadlines, one process per
check group, the logs) with tiny shapes, the Triton kernels interpreted and the 'reference' backend
standing in for 'cuda'; the build and the compute-sanitizer runs are reported as skipped.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
SMOKE = REPO / "tools" / "gpu_smoke.py"
STEP_NAMES = ["build", "memcheck", "real", "racecheck", "synccheck", "initcheck", "memcheck-triton"]


def run_smoke(out, *args, timeout=600):
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("OUT", None)
    return subprocess.run([sys.executable, str(SMOKE), "--dry", "--out", str(out), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_gpu_smoke_dry_run_passes_every_step(tmp_path):
    pytest.importorskip("triton")
    done = run_smoke(tmp_path)
    log = (tmp_path / "smoke.log").read_text() if (tmp_path / "smoke.log").exists() else ""
    assert done.returncode == 0, done.stdout + done.stderr + log[-6000:]
    summary = json.loads((tmp_path / "smoke.json").read_text())
    steps = {step["name"]: step for step in summary["steps"]}
    assert list(steps) == STEP_NAMES
    assert steps["build"]["status"] == "skipped"
    assert steps["real"]["status"] == "passed"
    # The sanitizer steps are skipped on the CPU, but their checks ran (without the sanitizer), once
    # for the three tools that share them.
    for name in ("memcheck", "racecheck", "memcheck-triton"):
        assert steps[name]["status"] == "skipped" and "dry run (no GPU)" in steps[name]["detail"], steps[name]
        assert "exit status 0" in steps[name]["detail"], steps[name]
    for name in ("synccheck", "initcheck"):
        assert "same checks ran in step racecheck" in steps[name]["detail"]
    cases = [line for line in log.splitlines() if line.startswith(("ok ", "FAIL ", "skip "))]
    assert cases and all(line.startswith("ok ") for line in cases), "\n".join(cases)
    # Every check group and op the GPU run covers appears in the dry run.
    for needle in ("attention cuda", "conv_proj cuda", "conv_proj_bn cuda", "misaligned grad_out",
                   "attention triton", "conv_proj_bn triton", "one-pass (dq atomic)", "split (deterministic)",
                   "linear_activation, mlp_activation, residual_layer_norm triton"):
        assert any(needle in line for line in cases), needle


def test_gpu_smoke_skips_steps_when_the_deadline_is_near(tmp_path):
    # 25 s in all (15 after the margin): no check group fits, every step is skipped by the deadline,
    # and that is not a failure.
    done = run_smoke(tmp_path, "--budget", "25", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    steps = json.loads((tmp_path / "smoke.json").read_text())["steps"]
    assert [s["name"] for s in steps] == STEP_NAMES
    assert all(s["status"] == "skipped" for s in steps)
    assert all("deadline" in s["detail"] for s in steps if s["name"] != "build")


def test_gpu_session_runs_the_smoke_first():
    script = (REPO / "bench" / "gpu_session.sh").read_text()
    assert subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu_session.sh")]).returncode == 0
    assert 'STAGE="smoke,' in script  # 'all' starts with it
    assert script.index("tools/gpu_smoke.py --out") < script.index("# --- build ---")


def test_gpu_smoke_runs_each_sanitizer_tool_on_its_checks(tmp_path):
    # The GPU mode's plumbing, without a GPU: a stand-in compute-sanitizer (found through CUDA_HOME)
    # records its command line and the environment the smoke gives it, and reports one case.
    cuda_home = tmp_path / "cuda"
    (cuda_home / "bin").mkdir(parents=True)
    record = tmp_path / "calls.txt"
    fake = cuda_home / "bin" / "compute-sanitizer"
    fake.write_text(f'#!/bin/sh\necho "$* caching=$PYTORCH_NO_CUDA_MEMORY_CACHING" >> {record}\necho "ok stand-in"\n')
    fake.chmod(0o755)
    env = dict(os.environ, CUDA_HOME=str(cuda_home))
    env.pop("OUT", None)
    done = subprocess.run([sys.executable, str(SMOKE), "--skip-build", "--out", str(tmp_path / "out"), "--steps",
                           "memcheck", "racecheck", "initcheck", "memcheck-triton"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    calls = record.read_text().splitlines()
    expected = [("memcheck", "cuda-small"), ("racecheck", "tc-fused"), ("initcheck", "tc-fused"),
                ("memcheck", "triton-one")]
    assert len(calls) == len(expected), calls
    for call, (tool, worker) in zip(calls, expected):
        assert f"--tool {tool} " in call and f"--worker {worker} " in call and "--error-exitcode" in call, call
        assert call.endswith("caching=1"), call  # without the caching allocator the sanitizer sees every tensor
    steps = json.loads((tmp_path / "out" / "smoke.json").read_text())["steps"]
    assert [(s["name"], s["status"]) for s in steps] == [
        ("memcheck", "passed"), ("racecheck", "passed"), ("initcheck", "passed"), ("memcheck-triton", "passed")]
