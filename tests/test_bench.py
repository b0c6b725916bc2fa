"""The benchmark scripts' --quick smoke runs on the CPU, their plans, and their shared helpers.

Each script runs as a user runs it (`python bench/<script>.py --quick --out ...`) in a
subprocess; the test checks the results JSON (environment, implementations, every row with
a status, figures for what must run on a CPU), the plan it starts with, the results printed as
they land, and that a Markdown table was printed. What a bare run plans on a CPU (`--dry-run`),
and the time estimate and progress loop of bench/plan.py, are checked without timing anything.
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

from bench import attn, common, conv_proj, model, plan  # noqa: E402
from bench.model import search_max_batch  # noqa: E402

ENVIRONMENT_FIELDS = ("device", "date_utc", "command", "torch", "torch_cuda", "triton", "driver", "python")


def run_script(script: str, out: Path, *extra: str, timeout: float = 600, device: str = "cpu",
               quick: bool = True) -> tuple[dict, str]:
    """Run a script; returns its JSON and its console output (stdout and stderr in one stream,
    as a terminal shows them: the progress bar is on stderr, the results on stdout)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)  # the interpreter would run the kernels on the host
    done = subprocess.run([sys.executable, str(REPO / "bench" / script), *(["--quick"] if quick else []),
                           "--device", device, "--out", str(out), *extra],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{script} failed ({done.returncode}):\n{done.stdout[-6000:]}"
    assert out.exists(), f"{script} wrote no {out}"
    return json.loads(out.read_text()), done.stdout


def screen_lines(output: str) -> list[str]:
    """The lines a terminal ends up showing: a carriage return goes back to the line's start
    (the progress bar redraws itself that way), so only the text after the last one stays."""
    return [line.split("\r")[-1] for line in output.split("\n")]


def check_plan_and_progress(output: str, script: str, rows: list[dict], line_of) -> None:
    """The run starts with its plan, shows a bar with the time left, and prints every measured
    result on a line of its own as it lands (not glued to the bar)."""
    lines = screen_lines(output)
    assert lines[0].startswith(f"bench/{script}.py: "), lines[:3]
    header = lines[: lines.index(next(l for l in lines if l.startswith("  time: ")) ) + 1]
    assert any(l.startswith("  measuring: ") for l in header) and any(" measurements; each: " in l for l in header)
    assert "measuring: " in output and "left" in output  # the bar, with its time left
    assert any(l.startswith("time: about ") for l in lines), "no estimate after the first measurement"
    measured = [r for r in rows if r["status"] in ("ok", "error", "oom")]
    assert measured
    for row in measured:
        assert line_of(row) in lines, f"result line {line_of(row)!r} not on a line of its own"


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
    check_plan_and_progress(stdout, "attn", rows, lambda r: f"{r['label']:>22} {r['mode']:>7} {r['impl']:>16}: "
                            f"{common.fmt(r.get('time_ms'))} ms {r.get('error', '')}")
    assert f"  note: cvt_fast-triton {plan.INTERPRETED_NOTE}" in stdout


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
    compiled = [r for r in rows if r["impl"] == "official-compile"]
    assert compiled and all(r["status"] == "skipped" and "--only official-compile" in r["reason"] for r in compiled)
    assert "  left out: official-compile: torch.compile takes minutes on a CPU" in stdout
    check_plan_and_progress(stdout, "conv_proj", rows,
                            lambda r: f"{r['label']:>22} {r['mode']:>13} {r['impl']:>22}: "
                                      f"{common.fmt(r.get('time_ms'))} ms {r.get('error', '')}")


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
    check_plan_and_progress(stdout, "model", payload["results"],
                            lambda r: f"cvt-13@32 {r['mode']:>16} {r['impl']:>24}: "
                                      f"{common.fmt(r.get('images_per_s'))} img/s {r.get('error', '')}")


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


# --------------------------------------------------------------------------- plans (no timing)

@pytest.fixture
def keep_threads():
    """The scripts' prologue sets torch's thread count for the run: restore it for other tests."""
    import torch
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def dry_run(script_module, capsys, *argv: str) -> list[str]:
    assert script_module.main(["--dry-run", "--device", "cpu", *argv]) == 0
    return capsys.readouterr().out.splitlines()


def section(lines: list[str], prefix: str) -> dict[str, str]:
    """'  left out: NAME: reason' lines -> {NAME: reason}."""
    return dict(line[len(prefix):].split(": ", 1) for line in lines if line.startswith(prefix))


def measuring(lines: list[str]) -> list[str]:
    return next(l for l in lines if l.startswith("  measuring: "))[len("  measuring: "):].split(", ")


def test_bare_attention_run_on_a_cpu_plans_cvt13_without_the_interpreter(capsys, keep_threads):
    lines = dry_run(attn, capsys)
    assert lines[0].startswith("bench/attn.py: attention") and "fwd and fwd+bwd" in lines[0]
    assert "1 thread" in lines[1] and "float32" in lines[1] and "plan: CPU-sized" in lines[1]
    shapes = [l.strip() for l in lines if l.startswith("    ")]
    assert shapes == [f"cvt-13@224 s{i}: B={attn.CPU_BATCH}, Nq={nq}, Nkv={nkv}, H={h}, d=64"
                      for i, (nq, nkv, h) in enumerate([(3136, 784, 1), (784, 196, 3), (197, 50, 6)], 1)]
    assert measuring(lines) == ["sdpa-flash", "sdpa-math", "official"]
    left_out = section(lines, "  left out: ")
    assert set(left_out) == {"cvt_fast-triton"} and "interpreter" in left_out["cvt_fast-triton"]
    assert "--include-interpreted" in left_out["cvt_fast-triton"]
    unavailable = section(lines, "  unavailable: ")
    # The reasons are the backend table's probes, word for word.
    from cvt_fast.ops.backends import TABLE
    assert unavailable["xformers"] == TABLE["xformers"].probe("attention", "cpu")
    assert unavailable["cvt_fast-cuda"] == TABLE["cuda"].probe("attention", "cpu")
    assert set(unavailable) == {"cvt_fast-cuda", "sdpa-efficient", "sdpa-cudnn", "xformers"}
    assert "  18 measurements; each: a first call (checked against a float32 reference), then 3 timed calls; " \
           "the median is reported" in lines
    # The first estimate, before anything is measured: the plan's work at the reference CPU's speed.
    assert lines[-1].startswith("  time: about ") and "2-core reference CPU" in lines[-1]


def test_the_readme_shows_what_a_bare_cpu_run_prints(capsys, keep_threads):
    """README's Benchmarks section pastes a real bare CPU run of attn.py: its plan lines must be
    what the script prints today (the device line and the CUDA extension's state vary by machine)."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Benchmarks"):readme.index("\n## ", readme.index("## Benchmarks") + 1)]
    assert "needs a GPU, and none has been measured yet" in section
    pasted = section[section.index("bench/attn.py: attention"):].splitlines()
    printed = dry_run(attn, capsys)
    stable = [line for line in printed if not line.startswith(("  on ", "  unavailable: cvt_fast-cuda"))]
    assert stable == [line for line in pasted[:len(printed)] if not line.startswith(("  on ", "  unavailable: cvt_fast-cuda"))]


def test_asking_for_the_interpreter_or_the_full_plan(capsys, keep_threads):
    for argv in (["--include-interpreted"], ["--only", "cvt_fast-triton,official"]):
        lines = dry_run(attn, capsys, *argv)
        assert "cvt_fast-triton" in measuring(lines) and not section(lines, "  left out: ")
        assert f"  note: cvt_fast-triton {plan.INTERPRETED_NOTE}" in lines
    lines = dry_run(attn, capsys, "--full", "--time-budget", "60")
    assert "plan: full" in lines[1]
    shapes = [l.strip() for l in lines if l.startswith("    ")]
    assert len(shapes) == 9 and shapes[0].startswith("cvt-13/21@224 s1: B=256") and "B=128" in shapes[-1]
    assert "cvt_fast-triton" in section(lines, "  left out: ")  # --full does not bring the interpreter in
    assert lines[-1].endswith("no measurement starts after --time-budget 60 s")
    with pytest.raises(ValueError, match="--quick and --full"):
        attn.main(["--dry-run", "--device", "cpu", "--quick", "--full"])


def test_bare_conv_proj_and_model_runs_leave_compilation_out_on_a_cpu(capsys, keep_threads):
    lines = dry_run(conv_proj, capsys)
    assert measuring(lines) == ["official", "official-nchw", "official-channels_last"]
    left_out = section(lines, "  left out: ")
    assert set(left_out) == {"cvt_fast-triton", "official-compile"}
    assert "--full or --only official-compile" in left_out["official-compile"]
    assert f"  {3 * 4 * 3} measurements; each: a first call" in "\n".join(lines)
    assert "official-compile" in measuring(dry_run(conv_proj, capsys, "--full"))

    lines = dry_run(model, capsys)
    assert [l.strip() for l in lines if l.startswith("    ")] == [f"cvt-13@224: batch {model.CPU_BATCH}"]
    assert measuring(lines) == ["official", "hf", "cvt_fast-sdpa"]
    left_out = section(lines, "  left out: ")
    assert set(left_out) == {"official-compile", "cvt_fast-triton", "cvt_fast-triton-compile",
                             "cvt_fast-sdpa-compile"}
    unavailable = section(lines, "  unavailable: ")
    from cvt_fast.ops.backends import TABLE
    assert unavailable["cvt_fast-xformers"] == "attention: " + TABLE["xformers"].probe("attention", "cpu")
    assert f"then {model.CPU_TIMED_STEPS} more, timed" in "\n".join(lines)


def test_plan_size_and_left_out_reasons():
    import argparse
    import torch
    cpu, cuda = torch.device("cpu"), torch.device("cuda")

    def args(**given):
        return argparse.Namespace(**{"quick": False, "full": False, "only": None, "include_interpreted": False,
                                     **given})
    assert plan.plan_size(args(), cpu) == "cpu" and plan.plan_size(args(), cuda) == "full"
    assert plan.plan_size(args(full=True), cpu) == "full" and plan.plan_size(args(quick=True), cuda) == "quick"

    def reason(size, device, **given):
        return {what: plan.left_out_reason("x", size, device, args(**given), **{what: True})
                for what in ("interpreted", "compiled")}
    assert all(reason("cpu", cpu).values())
    assert reason("cpu", cpu, include_interpreted=True)["interpreted"] is None
    assert reason("cpu", cpu, only="x,y") == {"interpreted": None, "compiled": None}
    assert reason("cpu", cpu, only="y")["interpreted"]  # --only naming something else brings nothing back
    assert reason("quick", cpu)["interpreted"] is None and "--full" not in reason("quick", cpu)["compiled"]
    assert reason("full", cpu) == {"interpreted": plan.left_out_reason("x", "full", cpu, args(), interpreted=True),
                                   "compiled": None}
    assert reason("full", cuda)["compiled"] is None
    assert plan.runs_interpreted("triton", cpu) and not plan.runs_interpreted("triton", cuda)
    assert not plan.runs_interpreted("reference", cpu) and not plan.runs_interpreted("sdpa", cpu)


def test_time_estimate_learns_each_implementations_rate():
    estimate = plan.TimeEstimate([("a", 1.0), ("a", 2.0), ("b", 1.0), ("a", 4.0), ("b", 3.0), ("c", 1.0)])
    assert estimate.seconds_left() is None  # nothing measured yet: no guess
    estimate.finished(0, 2.0)  # a: 2 s per unit
    # b and c are not measured: taken as slow as the slowest measured (a), so 2 * (2 + 1 + 4 + 3 + 1).
    assert estimate.seconds_left() == pytest.approx(22.0)
    estimate.finished(2, 10.0)  # b: 10 s per unit, now the slowest: c is taken as slow as b
    assert estimate.seconds_left() == pytest.approx(2 * (2 + 4) + 10 * 3 + 10 * 1)
    estimate.finished(1, 8.0)  # a: (2 + 8) s / 3 units
    assert estimate.seconds_left() == pytest.approx(10 / 3 * 4 + 10 * 3 + 10 * 1)
    estimate.skipped(4)  # a step that will not run costs nothing
    estimate.finished(5, 0.5)  # c: 0.5 s per unit
    assert estimate.seconds_left() == pytest.approx(10 / 3 * 4)
    assert estimate.seconds_spent() == pytest.approx(20.5)
    with pytest.raises(ValueError, match="work must be > 0"):
        plan.TimeEstimate([("a", 0.0)])
    assert plan.step_weight(5e9, common.resolve_device("cpu")) == 5e9
    assert [plan.format_duration(s) for s in (0.2, 42, 150, 7200, None)] == ["1 s", "42 s", "2.5 min", "2.0 h",
                                                                            "unknown"]


def test_first_estimate_judges_the_plans_work_before_measuring():
    import torch

    def setup_on(device: str, budget=None):
        return common.Prologue(torch.device(device), torch.float32, ["m"], lambda n: True, [], common.TimingConfig(),
                               common.Deadline(budget), False, time_budget=budget)
    steps = [plan.Step("a", {}, work=1e10), plan.Step("a", {}, work=1.0),
             plan.Step("gone", {}, unmeasured=("unavailable", "not here")), plan.Step("slow", {}, work=1e10)]
    rate = plan.REFERENCE_CPU_SECONDS_PER_WORK["attn"]
    # On a CPU: each counted step's work at the reference speed, a tiny step at the floor; the
    # unmeasured and the uncounted steps cost nothing.
    assert plan.expected_seconds("attn", steps, setup_on("cpu"), uncounted=["slow"]) == pytest.approx(
        rate * 1e10 + plan.MIN_STEP_SECONDS)
    assert plan.expected_seconds("attn", steps, setup_on("cpu")) == pytest.approx(
        2 * rate * 1e10 + plan.MIN_STEP_SECONDS)
    assert plan.expected_seconds("unknown-script", steps, setup_on("cpu")) is None
    # On a GPU: every step is time-boxed, whatever its work.
    timing = common.TimingConfig()
    box = (timing.warmup_ms + timing.rep_ms) / 1e3 + plan.GPU_STEP_OVERHEAD_SECONDS
    assert plan.expected_seconds("attn", steps, setup_on("cuda")) == pytest.approx(3 * box)

    line = plan.time_line("attn", steps, setup_on("cpu", budget=30.0), uncounted=["slow"])
    assert line.startswith(f"  time: about {plan.format_duration(rate * 1e10 + plan.MIN_STEP_SECONDS)} (")
    assert "not counted: slow" in line and line.endswith("no measurement starts after --time-budget 30 s")
    assert plan.time_line("unknown-script", steps, setup_on("cpu")).startswith(
        "  time: estimated from the first measurement")


class FakeRun:
    def __init__(self):
        self.rows, self.payload = [], {}

    def add(self, row):
        self.rows.append(row)
        return row


def test_run_steps_records_every_step_and_prints_each_result(capsys):
    import torch
    setup = common.Prologue(torch.device("cpu"), torch.float32, ["m"], lambda n: True, [], common.TimingConfig(),
                            common.Deadline(None), False)
    steps = [plan.Step("a", {"impl": "a", "n": 1}, work=1.0),
             plan.Step("gone", {"impl": "gone", "n": 1}, unmeasured=("unavailable", "not here")),
             plan.Step("a", {"impl": "a", "n": 2}, work=2.0),
             plan.Step("b", {"impl": "b", "n": 2}, work=2.0)]

    def measure(step):
        if step.impl == "b":
            raise RuntimeError("b broke")
        return {"status": "ok", "time_ms": float(step.row["n"])}
    run = FakeRun()
    plan.run_steps(run, steps, setup, measure, lambda step, result: f"RESULT {step.impl} {step.row['n']}")
    assert [(r["impl"], r["status"]) for r in run.rows] == [("a", "ok"), ("gone", "unavailable"), ("a", "ok"),
                                                          ("b", "error")]
    assert run.rows[1]["reason"] == "not here" and "b broke" in run.rows[3]["error"]
    assert run.payload["complete"] is True
    captured = capsys.readouterr()
    assert [l for l in captured.out.splitlines() if l.startswith("RESULT")] == ["RESULT a 1", "RESULT a 2",
                                                                               "RESULT b 2"]
    assert "time: about" in captured.out and "measuring: 3/3" in captured.err
    assert screen_lines(captured.err)[-2].rstrip().endswith("done")  # not 'about 1 s left' once finished

    # A spent time budget: the remaining steps are recorded as skipped, none is measured.
    setup.deadline = common.Deadline(0.0)
    run = FakeRun()
    plan.run_steps(run, steps, setup, lambda step: pytest.fail("measured after the budget"), lambda s, r: "")
    assert [r["status"] for r in run.rows] == ["skipped", "unavailable", "skipped", "skipped"]
    with pytest.raises(ValueError, match="work must be > 0"):
        plan.Step("a", {}, work=0)


def test_latest_keeps_one_value_and_its_failure():
    import torch
    made = []
    latest = common.Latest(torch.device("cpu"))

    def make(value):
        made.append(value)
        if value == "bad":
            raise MemoryError("too big")
        return value
    assert latest.get(1, lambda: make("one")) == "one" and latest.get(1, lambda: make("again")) == "one"
    assert latest.get(2, lambda: make("two")) == "two"
    for _ in range(2):  # a failure is made once and raised again for its key
        with pytest.raises(MemoryError, match="too big"):
            latest.get(3, lambda: make("bad"))
    assert made == ["one", "two", "bad"]
