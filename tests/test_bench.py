"""The benchmark scripts' --quick smoke runs on the CPU, and their shared helpers.

Each script runs as a user runs it (`python bench/<script>.py --quick --out ...`) in a
subprocess; the test checks the results JSON (environment, implementations, every row with
a status, figures for what must run on a CPU) and that a Markdown table was printed.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402
from bench.model import search_max_batch  # noqa: E402

ENVIRONMENT_FIELDS = ("device", "date_utc", "command", "torch", "torch_cuda", "triton", "driver", "python")


def run_script(script: str, out: Path, *extra: str, timeout: float = 600, device: str = "cpu",
               quick: bool = True) -> tuple[dict, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)  # the interpreter would run the kernels on the host
    done = subprocess.run([sys.executable, str(REPO / "bench" / script), *(["--quick"] if quick else []),
                           "--device", device, "--out", str(out), *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{script} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert out.exists(), f"{script} wrote no {out}"
    return json.loads(out.read_text()), done.stdout


def check_common(payload: dict, stdout: str, out: Path, benchmark: str, expected_impls: set[str]) -> None:
    assert payload["benchmark"] == benchmark
    assert payload["complete"] is True
    env = payload["environment"]
    for field in ENVIRONMENT_FIELDS:
        assert field in env, f"environment lacks {field!r}"
    assert env["device_type"] == "cpu"
    assert "--quick" in env["command"]
    assert expected_impls <= set(payload["implementations"]), sorted(payload["implementations"])
    for name, info in payload["implementations"].items():
        # Unavailable implementations are listed with the reason, never dropped.
        assert info["available"] or info["reason"], name
    rows = payload["results"]
    assert rows
    for row in rows:
        assert row["status"] in ("ok", "error", "oom", "unavailable", "skipped"), row
        if row["status"] == "ok":
            assert row["time_ms"] > 0 and math.isfinite(row["time_ms"]), row
        else:
            assert row.get("error") or row.get("reason"), row
    # The Markdown table is printed and written beside the JSON, with the plot.
    assert "| implementation |" in stdout
    assert "\n|---|" in stdout
    assert out.with_suffix(".md").read_text().count("\n|") > 3
    assert out.with_suffix(".png").stat().st_size > 1000


def ok_rows(payload: dict, impl: str) -> list[dict]:
    return [r for r in payload["results"] if r["impl"] == impl and r["status"] == "ok"]


def test_attention_quick_run_records_every_implementation(tmp_path):
    out = tmp_path / "attn.json"
    payload, stdout = run_script("attn.py", out)
    impls = {"cvt_fast-triton", "cvt_fast-cuda", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math",
             "xformers", "official"}
    check_common(payload, stdout, out, "attn", impls)
    rows = payload["results"]
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}
    assert {r["stage"] for r in rows} == {1, 2, 3}
    # CvT-13 geometry at 32x32: 8x8 grid with k/v at stride 2, cls token in the last stage.
    stage3 = next(r for r in rows if r["stage"] == 3)
    assert (stage3["nq"], stage3["nkv"], stage3["heads"], stage3["head_dim"]) == (5, 2, 6, 64)
    # On a CPU the CUDA-only ones are unavailable with a reason, the rest run and are right.
    assert payload["implementations"]["cvt_fast-cuda"]["available"] is False
    for impl in ("official", "sdpa-math", "cvt_fast-triton"):
        measured = ok_rows(payload, impl)
        assert len(measured) == 6, (impl, [r for r in rows if r["impl"] == impl])
        for row in measured:
            assert row["tflops"] > 0 and row["gbps"] > 0
            assert row["rel_err"] < 1e-3, row  # float32 on the CPU
            assert row["speedup_vs_best_peer"] > 0
    assert "Median ms per implementation" in stdout


def test_conv_proj_quick_run_compares_with_the_official_path(tmp_path):
    out = tmp_path / "conv_proj.json"
    payload, stdout = run_script("conv_proj.py", out)
    impls = {"cvt_fast-triton", "cvt_fast-cuda", "official", "official-nchw", "official-channels_last",
             "official-compile"}
    check_common(payload, stdout, out, "conv_proj", impls)
    assert payload["copy_bandwidth"]["gbps"] > 0
    rows = payload["results"]
    assert {r["mode"] for r in rows} == {"eval-fwd", "train-fwd+bwd"}
    assert {r["has_cls"] for r in rows} == {0, 1}
    for impl in ("official", "official-nchw", "official-channels_last", "cvt_fast-triton"):
        measured = ok_rows(payload, impl)
        assert len(measured) == 6, (impl, [r for r in rows if r["impl"] == impl])
        for row in measured:
            assert row["gbps"] > 0 and 0 < row["fraction_of_copy_bw"]
            assert row["rel_err"] < 1e-4, row
    # torch.compile is left out of --quick, and says so.
    assert all(r["status"] == "skipped" for r in rows if r["impl"] == "official-compile")


def test_model_quick_run_measures_train_and_inference(tmp_path):
    out = tmp_path / "model.json"
    payload, stdout = run_script("model.py", out)
    impls = {"official", "official-compile", "hf", "cvt_fast-triton", "cvt_fast-cuda", "cvt_fast-sdpa",
             "cvt_fast-xformers", "cvt_fast-triton-compile"}
    check_common(payload, stdout, out, "model", impls)
    for impl in ("official", "hf", "cvt_fast-triton", "cvt_fast-sdpa"):
        measured = ok_rows(payload, impl)
        assert {r["mode"] for r in measured} == {"train", "infer"}, (impl, payload["results"])
        for row in measured:
            assert row["images_per_s"] > 0 and row["first_step_s"] > 0
    for row in ok_rows(payload, "official"):
        assert row["speedup_vs_official"] == 1.0
    assert all(r["speedup_vs_official"] > 0 for r in ok_rows(payload, "cvt_fast-triton"))
    # Same weights as the official backend: the fused path computes the same logits.
    for row in ok_rows(payload, "cvt_fast-triton") + ok_rows(payload, "cvt_fast-sdpa") + ok_rows(payload, "official"):
        assert row["logits_rel_err_vs_official"] < 1e-4, row


def test_model_find_max_batch_reports_the_search(tmp_path):
    out = tmp_path / "model.json"
    payload, _ = run_script("model.py", out, "--only", "official", "--modes", "infer", "--find-max-batch",
                            "--max-batch-limit", "4")
    search = [r for r in payload["results"] if r["mode"] == "infer-max-batch"]
    assert len(search) == 1 and search[0]["status"] == "ok", payload["results"]
    # Nothing runs out of memory at these sizes: the search stops at the limit.
    assert search[0]["max_batch"] == 4
    assert [b for b, _ in search[0]["probes"]] == [2, 4]


def test_search_max_batch_finds_the_boundary():
    calls = []

    def fits(b):
        calls.append(b)
        return b <= 37

    best, probes = search_max_batch(fits, start=8, limit=4096, granularity=1)
    assert best == 37
    assert [b for b, _ in probes] == calls
    assert calls[:4] == [8, 16, 32, 64]
    best, _ = search_max_batch(lambda b: b <= 37, start=256, limit=4096, granularity=8)
    assert 37 - 8 <= best <= 37
    assert search_max_batch(lambda b: False, start=4, limit=16, granularity=1)[0] == 0
    assert search_max_batch(lambda b: True, start=3, limit=10, granularity=1)[0] == 10
    with pytest.raises(ValueError, match="granularity"):
        search_max_batch(lambda b: True, start=1, limit=4, granularity=0)


def test_stage_geometry_matches_the_paper_table():
    specs = common.model_specs()
    stages = common.stage_geometry(specs["cvt-13"], 224)
    assert [(s["nq"], s["nkv"], s["heads"], s["dim"]) for s in stages] == [
        (3136, 784, 1, 64), (784, 196, 3, 192), (197, 50, 6, 384)]
    w24 = common.stage_geometry(specs["cvt-w24"], 384)
    assert [(s["grid"], s["nq"], s["nkv"], s["head_dim"]) for s in w24] == [
        (96, 9216, 2304, 64), (48, 2304, 576, 64), (24, 577, 145, 64)]


def test_markdown_table_and_number_format():
    table = common.markdown_table(["a", "b"], [[1.23456, None], ["x|y", 0.000123456]])
    lines = table.splitlines()
    assert lines[0] == "| a | b |" and lines[1] == "|---|---|"
    assert lines[2] == "| 1.23 | - |"
    assert lines[3] == "| x\\|y | 0.000123 |"
    assert common.fmt(12345.6) == "12346" and common.fmt(float("nan")) == "-"


def test_selector_and_only_patterns():
    pick = common.selector("cvt_fast-*,official")
    assert pick("cvt_fast-triton") and pick("official") and not pick("official-compile")
    with pytest.raises(ValueError, match="matches none"):
        common.check_only_patterns("tritn", ["cvt_fast-triton"])
    assert common.parse_model_sizes("cvt-13@224,cvt-w24@384", []) == [("cvt-13", 224), ("cvt-w24", 384)]
    with pytest.raises(ValueError, match="NAME@IMAGE_SIZE"):
        common.parse_model_sizes("cvt-13", [])


def test_conv_proj_compiled_official_path_runs_on_the_cpu(tmp_path):
    # torch.compile is left out of --quick by default; this runs it on two shapes (a static
    # graph each: automatic dynamic shapes once broke inductor here).
    out = tmp_path / "conv_proj.json"
    payload, _ = run_script("conv_proj.py", out, "--only", "official-compile", "--modes", "eval-fwd",
                            "--stages", "1,3")
    rows = payload["results"]
    assert [(r["stage"], r["status"]) for r in rows] == [(1, "ok"), (3, "ok")], rows
    assert all(r["rel_err"] < 1e-4 for r in rows)


def test_deadline_stops_after_a_sticky_cuda_error_or_the_budget():
    deadline = common.Deadline(None)
    deadline.note({"impl": "a", "status": "error", "error": "RuntimeError: shapes differ"})
    deadline.note({"impl": "b", "status": "oom", "error": "OutOfMemoryError: CUDA out of memory"})
    assert deadline.skip_reason() is None
    deadline.note({"impl": "c", "status": "error",
                   "error": "AcceleratorError: CUDA error: an illegal memory access was encountered"})
    assert "CUDA context was lost" in deadline.skip_reason() and "c:" in deadline.skip_reason()
    assert common.Deadline(0.0).skip_reason() == "time budget exhausted"


def test_run_guarded_records_errors_and_out_of_memory():
    import torch

    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def broken():
        raise ValueError("head_dim 48 is not supported\nsecond line")

    device = torch.device("cpu")
    assert common.run_guarded(oom, device) == {
        "status": "oom", "error": "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"}
    assert common.run_guarded(broken, device) == {
        "status": "error", "error": "ValueError: head_dim 48 is not supported | second line"}
    assert common.run_guarded(lambda: {"status": "ok"}, device) == {"status": "ok"}


# --------------------------------------------------------------------------- on a GPU
# Small versions of the real runs, so a GPU test session also checks the CUDA side of the
# scripts (events, CUDA graphs, peak memory, the environment) before a long benchmark run.

def check_gpu_payload(payload: dict) -> None:
    env = payload["environment"]
    assert env["device_type"] == "cuda" and env["driver"] and env["multiprocessors"] > 0
    assert payload["complete"] is True


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graph", [False, True], ids=["eager", "cuda_graph"])
def test_attention_bench_on_the_gpu(tmp_path, cuda_graph):
    out = tmp_path / "attn.json"
    extra = ["--cuda-graph", "--only", "cvt_fast-*,sdpa-flash"] if cuda_graph else []
    payload, stdout = run_script("attn.py", out, "--models", "cvt-13@224", "--stages", "3", "--batch", "8",
                                 "--warmup-ms", "5", "--rep-ms", "20", *extra, device="cuda", quick=False)
    check_gpu_payload(payload)
    assert payload["settings"]["cuda_graph"] is cuda_graph
    # Under CUDA graphs only the peer is required to capture; cvt_fast's rows say whether its ops do.
    for impl in ["sdpa-flash"] + ([] if cuda_graph else ["cvt_fast-triton", "official", "sdpa-math"]):
        rows = ok_rows(payload, impl)
        assert len(rows) == 2, (impl, [r for r in payload["results"] if r["impl"] == impl])
        for row in rows:
            assert row["rel_err"] < 2e-2 and row["peak_mem_mib"] is not None and row["tflops"] > 0, row
    assert "| implementation |" in stdout


@pytest.mark.gpu
def test_conv_proj_bench_on_the_gpu(tmp_path):
    out = tmp_path / "conv_proj.json"
    payload, _ = run_script("conv_proj.py", out, "--models", "cvt-13@224", "--stages", "1,3", "--batch", "8",
                            "--modes", "eval-fwd,train-fwd+bwd", "--only", "cvt_fast-*,official,official-nchw",
                            "--warmup-ms", "5", "--rep-ms", "20", device="cuda", quick=False)
    check_gpu_payload(payload)
    assert payload["copy_bandwidth"]["gbps"] > 100
    for impl in ("cvt_fast-triton", "official", "official-nchw"):
        rows = ok_rows(payload, impl)
        assert len(rows) == 4, (impl, [r for r in payload["results"] if r["impl"] == impl])
        for row in rows:
            assert row["rel_err"] < 2e-2 and row["fraction_of_copy_bw"] > 0, row


@pytest.mark.gpu
def test_model_bench_on_the_gpu(tmp_path):
    out = tmp_path / "model.json"
    payload, _ = run_script("model.py", out, "--only", "official,hf,cvt_fast-triton", "--find-max-batch",
                            "--max-batch-limit", "4", device="cuda")
    check_gpu_payload(payload)
    for impl in ("official", "hf", "cvt_fast-triton"):
        rows = ok_rows(payload, impl)
        assert {r["mode"] for r in rows} == {"train", "infer", "train-max-batch", "infer-max-batch"}, \
            [r for r in payload["results"] if r["impl"] == impl]
        for row in rows:
            if "max-batch" in row["mode"]:
                assert row["max_batch"] == 4
            else:
                assert row["images_per_s"] > 0 and row["peak_mem_gib"] > 0 and row["peak_mem_vs_official"] > 0
    assert all(r["logits_rel_err_vs_official"] < 2e-2 for r in ok_rows(payload, "cvt_fast-triton"))


def test_ratios_against_the_official_model():
    rows = [{"impl": "official", "status": "ok", "model": "m", "mode": "train", "time_ms": 30.0, "peak_mem_gib": 10.0},
            {"impl": "cvt_fast-cuda", "status": "ok", "model": "m", "mode": "train", "time_ms": 10.0,
             "peak_mem_gib": 5.0},
            {"impl": "cvt_fast-cuda", "status": "ok", "model": "m", "mode": "infer", "time_ms": 4.0},
            {"impl": "hf", "status": "oom", "model": "m", "mode": "train"}]
    common.add_ratios_vs(rows, ("model", "mode"), "official")
    assert rows[1]["speedup_vs_official"] == 3.0 and rows[1]["peak_mem_vs_official"] == 0.5
    assert "speedup_vs_official" not in rows[2]  # no official row for that mode
    assert "speedup_vs_official" not in rows[3]
