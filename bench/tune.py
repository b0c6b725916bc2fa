#!/usr/bin/env python
"""Measure which backend `auto` should take on this GPU, and write it into the tuning file.

Run on the GPU itself. Two steps (both by default; `--steps` runs one, keeping the other's
results already in the file for this device):
- tests: each backend's GPU tests (its record's `gpu_tests` in cvt_fast/ops/backends.py),
  one pytest run per selection; a backend is verified on this device when every run passed
  and ran at least one test.
- timings: every backend of kind 'kernels' or 'peer' that can run here, through the public
  ops exactly as the model calls them, at the stage shapes of the models (default CvT-13@224,
  CvT-21@224 and CvT-W24@384, batch of the official configs) for each dtype, with the
  machinery of bench/attn.py and bench/conv_proj.py: attention fwd and fwd+bwd, conv_proj
  (with its BatchNorm, as the model runs it) eval-fwd and train-fwd+bwd.
The entry for this device (torch.cuda.get_device_name()) in the tuning file then holds the
environment (device, versions, git commit), the test results and, per op and dtype, every
timing row and `total_ms`: the training-step (fwd+bwd) medians summed over the shapes, for the
backends measured at every shape. `auto` takes the smallest total among the verified backends
(cvt_fast/ops/tuning.py). Commit the file: it is package data (cvt_fast/ops/tuning.json).

    python bench/tune.py                                  # on the GPU: tests, then timings
    python bench/tune.py --steps timings --dtypes bfloat16 --time-budget 300
    python bench/tune.py --quick --device cpu --steps timings --out /tmp/t.json   # smoke run
"""
from __future__ import annotations

import datetime as _dt
import json
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import attn, common, conv_proj  # noqa: E402
from cvt_fast.ops import tuning  # noqa: E402
from cvt_fast.ops.backends import TABLE, backends_for  # noqa: E402

DEFAULT_MODELS = "cvt-13@224,cvt-21@224,cvt-w24@384"
STEPS = ("tests", "timings")
# Per op: the mode that ranks the backends (a training step) and the ones only recorded.
# The fused elementwise ops (ELEMENTWISE_OPS of cvt_fast/ops/backends.py: mlp_activation,
# linear_activation, residual_layer_norm) are not timed: on CUDA only 'triton' implements them
# ('reference' is the ground truth, not a candidate), so 'auto' has nothing to choose between and
# takes Triton there without a measurement. Their kernels are verified all the same: the Triton
# record's gpu_tests include tests/test_fused_elementwise_gpu.py. Time them here once a second
# implementation (a CUDA one, say) joins the table.
RANKING_MODE = {"attention": "fwd+bwd", "conv_proj": "train-fwd+bwd"}
RECORDED_MODES = {"attention": ("fwd", "fwd+bwd"), "conv_proj": ("eval-fwd", "train-fwd+bwd")}


def candidates(op: str, only: Optional[str]) -> tuple[str, ...]:
    """The backends timed for `op`: every kernels and peer backend, or those --backends names
    (which may include 'reference', for smoke runs)."""
    if not only:
        return backends_for(op, kinds=("kernels", "peer"))
    wanted = {n.strip() for n in only.split(",") if n.strip()}
    unknown = wanted - set(TABLE)
    if unknown:
        raise ValueError(f"--backends names unknown backends {sorted(unknown)}; the table has {list(TABLE)}")
    return tuple(n for n in backends_for(op) if n in wanted)


# --------------------------------------------------------------------------- tests

def _junit_counts(path: Path) -> dict:
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return counts
    for suite in root.iter("testsuite"):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    return counts


def run_gpu_tests(name: str, timeout: float) -> dict:
    """Every pytest selection of the backend's record; passed when all ran tests and none failed."""
    record = TABLE[name]
    runs = []
    for selection in record.gpu_tests:
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / "junit.xml"
            cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                   f"--junitxml={report}", *selection]
            try:
                done = subprocess.run(cmd, cwd=common.REPO_ROOT, capture_output=True, text=True, timeout=timeout)
                returncode, tail = done.returncode, (done.stdout + done.stderr).strip().splitlines()[-3:]
            except subprocess.TimeoutExpired:
                returncode, tail = None, [f"timed out after {timeout:.0f} s"]
            counts = _junit_counts(report)
        ran = counts["tests"] - counts["skipped"]
        runs.append({"command": " ".join(["pytest", *selection]), "returncode": returncode, **counts,
                     "passed": returncode == 0 and ran > 0 and not counts["failures"] and not counts["errors"],
                     "tail": tail})
        print(f"  {name}: pytest {' '.join(selection)} -> {returncode} {counts}", flush=True)
    passed = bool(runs) and all(r["passed"] for r in runs)
    summary = "; ".join(f"{r['tests'] - r['skipped']} ran, {r['failures']} failed, {r['errors']} errors, "
                        f"{r['skipped']} skipped" for r in runs) or "no GPU tests named in its record"
    return {"passed": passed, "summary": summary, "runs": runs,
            "utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


# --------------------------------------------------------------------------- timings

def time_attention(setup: common.Prologue, names, args) -> list[dict]:
    rows = []
    impls = attn.cvt_fast_implementations(setup.device, names)
    element_size = _element_size(setup.dtype)
    for shape in attn.attention_shapes(setup.pairs, args.batch, args.quick):
        for mode in RECORDED_MODES["attention"]:
            count = common.rotation_count(int(attn.flops_and_bytes(shape, mode, element_size)[1]), setup.device)
            sets = attn.make_inputs(shape, mode, setup.device, setup.dtype, count, args.seed)
            for impl in impls:
                rows.append(_measure(setup, "attention", shape["label"], mode, impl,
                                     lambda: attn.measure(impl, shape, mode, sets, setup.device, setup.dtype,
                                                          setup.timing)))
            sets = None
            common.free_memory(setup.device)
    return rows


def time_conv_proj(setup: common.Prologue, names, args) -> list[dict]:
    rows = []
    impls = conv_proj.cvt_fast_implementations(setup.device, names)
    element_size = _element_size(setup.dtype)
    for stage in conv_proj.projection_shapes(setup.pairs, args.batch, args.quick):
        module = conv_proj.projection_module(stage, setup.device)
        for mode in RECORDED_MODES["conv_proj"]:
            count = common.rotation_count(int(conv_proj.traffic_bytes(stage, mode, element_size)), setup.device)
            sets = conv_proj.make_inputs(stage, mode, setup.device, setup.dtype, count, args.seed)
            for impl in impls:
                rows.append(_measure(setup, "conv_proj", stage["label"], mode, impl,
                                     lambda: conv_proj.measure(impl, module, stage, mode, sets, setup.device,
                                                               setup.dtype, setup.timing)))
            sets = None
            common.free_memory(setup.device)
        module = None
        common.free_memory(setup.device)
    return rows


def _measure(setup: common.Prologue, op: str, shape: str, mode: str, impl, measure) -> dict:
    """One row: the implementation's timing, or why it was not measured."""
    if impl.reason is not None:
        result = {"status": "unavailable", "reason": impl.reason}
    elif setup.deadline.skip_reason():
        result = {"status": "skipped", "reason": setup.deadline.skip_reason()}
    else:
        result = common.run_guarded(measure, setup.device)
    row = {"op": op, "shape": shape, "mode": mode, "backend": impl.name[len("cvt_fast-"):]}
    return _row(row, result)


def _row(row: dict, result: dict) -> dict:
    keep = ("status", "reason", "error", "time_ms", "time_ms_q1", "time_ms_q3", "reps", "rel_err", "gbps", "tflops")
    row.update({k: result[k] for k in keep if k in result})
    print(f"  {row['op']:>9} {row['shape']:>26} {row['mode']:>13} {row['backend']:>9}: "
          f"{common.fmt(row.get('time_ms'))} ms {row.get('error', row.get('reason', ''))[:80]}", flush=True)
    return row


def _element_size(dtype) -> int:
    import torch
    return torch.empty((), dtype=dtype).element_size()


def summarise(op: str, rows: list[dict]) -> dict:
    """total_ms per backend measured ok at every shape in the ranking mode; why the others are not."""
    ranking = [r for r in rows if r["mode"] == RANKING_MODE[op]]
    shapes = list(dict.fromkeys(r["shape"] for r in ranking))
    totals, incomplete = {}, {}
    for backend in dict.fromkeys(r["backend"] for r in ranking):
        mine = [r for r in ranking if r["backend"] == backend]
        bad = [r for r in mine if r.get("status") != "ok"]
        if bad:
            incomplete[backend] = f"{bad[0]['shape']}: {bad[0].get('status')} {bad[0].get('error') or bad[0].get('reason')}"
        else:
            totals[backend] = round(sum(r["time_ms"] for r in mine), 6)
    return {"criterion": f"{RANKING_MODE[op]} median ms summed over {len(shapes)} shapes", "shapes": shapes,
            "total_ms": totals, "incomplete": incomplete, "rows": rows}


# --------------------------------------------------------------------------- the file

def write_entry(path: Path, device_name: str, update: dict) -> dict:
    """Merge `update` into the device's entry (a step keeps the other step's results)."""
    data = tuning.load_tuning(path) if path.exists() else {"schema": tuning.SCHEMA, "devices": {}}
    data = json.loads(json.dumps(data))  # a private copy of the cached file
    entry = data["devices"].setdefault(device_name, {})
    for key, value in update.items():
        if key in ("tests", "timings") and isinstance(entry.get(key), dict):
            for sub, item in value.items():
                if key == "timings":
                    entry[key].setdefault(sub, {}).update(item)
                else:
                    entry[key][sub] = item
        else:
            entry[key] = value
    common.write_json_atomic(path, data)
    return entry


def main(argv: Optional[list[str]] = None) -> int:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.set_defaults(out=tuning.PACKAGED_FILE)
    parser.add_argument("--models", default=None, help=f"comma-separated NAME@IMAGE_SIZE (default: {DEFAULT_MODELS})")
    parser.add_argument("--dtypes", default=None, help="comma-separated (default: bfloat16,float16 on CUDA; "
                                                        "float32 on the CPU)")
    parser.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset of tests,timings")
    parser.add_argument("--backends", default=None, help="comma-separated backend names (default: every kernels "
                                                          "and peer backend of the table)")
    parser.add_argument("--test-timeout", type=float, default=600.0, help="seconds per pytest run")
    args = parser.parse_args(argv)
    args.modes = ",".join(sorted({m for modes in RECORDED_MODES.values() for m in modes}))
    args.models = args.models or (None if args.quick else DEFAULT_MODELS)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    if not set(steps) <= set(STEPS):
        raise ValueError(f"--steps must be a subset of {STEPS}, got {args.steps!r}")
    setup = common.prologue(args, sorted(args.modes.split(",")))
    if setup.device.type != "cuda" and not args.quick:
        raise ValueError("the tuning file records GPUs: run bench/tune.py on a CUDA device "
                         "(--quick --device cpu is a smoke run only)")
    device_name = common.device_name(setup.device)
    print(f"tuning for {device_name}: steps {steps}, writing {args.out}", flush=True)
    update: dict = {"measured_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "environment": common.capture_environment(setup.device)}

    if "tests" in steps:
        names = sorted(set(candidates("attention", args.backends)) | set(candidates("conv_proj", args.backends)),
                       key=list(TABLE).index)
        update["tests"] = {}
        for name in names:
            print(f"GPU tests of {name!r}", flush=True)
            update["tests"][name] = run_gpu_tests(name, args.test_timeout)
        write_entry(Path(args.out), device_name, update)

    if "timings" in steps:
        dtype_names = [d.strip() for d in (args.dtypes or ("bfloat16,float16" if setup.device.type == "cuda"
                                                            else "float32")).split(",") if d.strip()]
        update["timings"] = {"attention": {}, "conv_proj": {}}
        update["timing_settings"] = {"models": [f"{m}@{s}" for m, s in setup.pairs], "batch": args.batch,
                                     "timing": vars(setup.timing), "quick": args.quick}
        for dtype_name in dtype_names:
            setup.dtype = common.parse_dtype(dtype_name)
            print(f"timing {dtype_name}", flush=True)
            rows = time_attention(setup, candidates("attention", args.backends), args)
            update["timings"]["attention"][dtype_name] = summarise("attention", rows)
            rows = time_conv_proj(setup, candidates("conv_proj", args.backends), args)
            update["timings"]["conv_proj"][dtype_name] = summarise("conv_proj", rows)
            write_entry(Path(args.out), device_name, update)

    entry = write_entry(Path(args.out), device_name, update)
    verified = sorted(n for n, t in entry.get("tests", {}).items() if t.get("passed"))
    print(f"\n{device_name}: GPU tests passed for {verified or 'none'}")
    for op, by_dtype in entry.get("timings", {}).items():
        for dtype_name, timing in by_dtype.items():
            print(f"  {op} {dtype_name}: {timing['criterion']}: {timing['total_ms']}"
                  + (f"; incomplete: {timing['incomplete']}" if timing["incomplete"] else ""))
    print(f"written: {args.out}" + ("" if Path(args.out) != tuning.PACKAGED_FILE else
                                    " (commit it: 'auto' reads it from the package)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
