#!/usr/bin/env python
"""Measure which backend `auto` should take on this GPU or CPU, and write it into the tuning file.

On a GPU, two steps (both by default; `--steps` runs one, keeping the other's
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

On a CPU, one step, `cpu-paths` (the default there): whole CvT training steps (forward, cross-entropy,
backward; no optimizer, the same for every path) and eval forwards (no grad) of CvT-13 at 224 (batch 4),
float32, at torch's thread count (--threads to change it), with each op family of the model
(cvt_fast.ops.backend.CPU_FAMILIES) on each of its paths (the official eager ops, 'reference', 'sdpa'
for attention) and the other families official; the configurations interleaved, each's best of
--repeats. The entry for this CPU's name then holds those times, and 'auto' takes per family and mode
the fastest path. Then, in the same run, the whole model on backends official, reference, sdpa and
auto (now reading that entry), printed as the README's CPU table.

    python bench/tune.py                                  # on the GPU: tests, then timings
    python bench/tune.py --steps timings --dtypes bfloat16 --time-budget 300
    python bench/tune.py --device cpu                      # on a CPU: the paths of 'auto' there
    python bench/tune.py --quick --device cpu --steps timings --out /tmp/t.json   # smoke run
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import attn, common, conv_proj  # noqa: E402
from cvt_fast.ops import tuning  # noqa: E402
from cvt_fast.ops.backends import TABLE, backends_for  # noqa: E402

DEFAULT_MODELS = "cvt-13@224,cvt-21@224,cvt-w24@384"
STEPS = ("tests", "timings", "cpu-paths")
CPU_BATCH = 4
CPU_REPEATS = 3
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


# --------------------------------------------------------------------------- the CPU's paths

@contextlib.contextmanager
def cpu_paths_forced(paths: dict[str, str]):
    """'auto' on the CPU takes `paths` (family -> path; the others official) instead of the evidence."""
    from cvt_fast.ops import backend
    original = backend.cpu_path
    backend.cpu_path = lambda family, training: paths.get(family, "official")
    try:
        yield
    finally:
        backend.cpu_path = original


def cpu_step_times(configs: dict, spec: dict, image_size: int, batch: int, repeats: int, seed: int) -> dict:
    """configs: label -> (model backend, forced CPU paths or None: the evidence). Per label the best
    of `repeats` training steps and eval forwards, the labels interleaved in each round (a shared
    machine's load then falls on all alike), after one warm-up of each."""
    import torch
    import torch.nn.functional as F
    from cvt_fast.model import build_model

    torch.manual_seed(seed)
    models = {}
    for label, (model_backend, _) in configs.items():
        models[label] = build_model(spec, backend=model_backend)
        if models:
            models[label].load_state_dict(next(iter(models.values())).state_dict())
    images = torch.randn(batch, 3, image_size, image_size)
    labels = torch.randint(0, 1000, (batch,))
    best = {label: {"train_s": float("inf"), "eval_s": float("inf")} for label in configs}
    for round_ in range(repeats + 1):
        for label, (_, forced) in configs.items():
            model = models[label]
            with cpu_paths_forced(forced) if forced is not None else contextlib.nullcontext():
                model.train()
                start = time.perf_counter()
                F.cross_entropy(model(images), labels).backward()
                model.zero_grad(set_to_none=True)
                train = time.perf_counter() - start
                model.eval()
                start = time.perf_counter()
                with torch.no_grad():
                    model(images)
                evaluate = time.perf_counter() - start
            if round_ > 0:  # round 0 warms up
                best[label] = {"train_s": round(min(best[label]["train_s"], train), 4),
                               "eval_s": round(min(best[label]["eval_s"], evaluate), 4)}
            print(f"  round {round_}: {label:>28}: train step {train:.3f} s, eval {evaluate:.3f} s", flush=True)
    return best


def time_cpu_paths(args, spec: dict, image_size: int) -> dict:
    """The entry of this CPU: the whole model official, and each family on each of its other paths."""
    from cvt_fast.ops.backend import CPU_FAMILIES

    configs = {"official": ("official", None)}
    for family, paths in CPU_FAMILIES.items():
        for path in paths[1:]:
            configs[f"{family}:{path}"] = (None, {family: path})
    best = cpu_step_times(configs, spec, image_size, args.batch or CPU_BATCH, args.repeats, args.seed)
    timings: dict = {}
    for label, times in best.items():
        if label != "official":
            family, path = label.split(":")
            timings.setdefault(family, {})[path] = times
    return {"official": best["official"], "timings": timings}


def cpu_table(args, model_name: str, spec: dict, image_size: int, out: Path) -> str:
    """The whole model on backends official, reference, sdpa and auto (reading `out`), one run."""
    import torch
    from cvt_fast.ops import backend

    os.environ[tuning.ENV_VAR] = str(out)
    batch = args.batch or CPU_BATCH
    configs = {name: (name if name != "auto" else None, None) for name in ("official", "reference", "sdpa", "auto")}
    best = cpu_step_times(configs, spec, image_size, batch, args.repeats, args.seed)
    paths = {family: {mode: backend.cpu_path(family, mode == "train") for mode in ("train", "eval")}
             for family in backend.CPU_FAMILIES}
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    lines = [f"{model_name} at {image_size}, batch {batch}, float32, {torch.get_num_threads()} threads, "
             f"{backend.cpu_name()}, {date}, best of {args.repeats} (`python bench/tune.py --device cpu`):", "",
             "| backend | eval forward (s) | training step (s) | vs official (eval / train) |", "|---|---|---|---|"]
    for name, times in best.items():
        lines.append(f"| `{name}` | {times['eval_s']:.3f} | {times['train_s']:.3f} | "
                     f"{best['official']['eval_s'] / times['eval_s']:.2f}x / "
                     f"{best['official']['train_s'] / times['train_s']:.2f}x |")
    lines += ["", "auto's paths (train / eval): " + "; ".join(f"{family} {p['train']} / {p['eval']}"
                                                            for family, p in paths.items())]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the file

def write_entry(path: Path, device_name: str, update: dict, section: str = "devices") -> dict:
    """Merge `update` into the device's entry (a step keeps the other step's results); section
    'cpus' for a CPU's entry (keyed by its name)."""
    data = tuning.load_tuning(path) if path.exists() else {"schema": tuning.SCHEMA, "devices": {}}
    data = json.loads(json.dumps(data))  # a private copy of the cached file
    entry = data.setdefault(section, {}).setdefault(device_name, {})
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
    parser.add_argument("--steps", default=None, help="comma-separated subset of tests,timings (default: both) "
                                                     "on a GPU; cpu-paths (the default there) on a CPU")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=CPU_REPEATS, help="cpu-paths: rounds, best of")
    parser.add_argument("--backends", default=None, help="comma-separated backend names (default: every kernels "
                                                          "and peer backend of the table)")
    parser.add_argument("--test-timeout", type=float, default=600.0, help="seconds per pytest run")
    args = parser.parse_args(argv)
    import torch
    threads = args.threads or torch.get_num_threads()
    args.modes = ",".join(sorted({m for modes in RECORDED_MODES.values() for m in modes}))
    on_cpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cpu")
    steps = [s.strip() for s in (args.steps or ("cpu-paths" if on_cpu else "tests,timings")).split(",") if s.strip()]
    if not set(steps) <= set(STEPS):
        raise ValueError(f"--steps must be a subset of {STEPS}, got {args.steps!r}")
    if "cpu-paths" in steps:
        if not on_cpu or len(steps) > 1:
            raise ValueError("--steps cpu-paths runs alone, on the CPU (--device cpu)")
        return main_cpu(args, threads)
    args.models = args.models or (None if args.quick else DEFAULT_MODELS)
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


def main_cpu(args, threads: int) -> int:
    """--steps cpu-paths: this CPU's entry, then the whole-model table."""
    import torch
    from cvt_fast.ops import backend

    if os.environ.get(backend.ENV_VAR):
        raise ValueError(f"unset {backend.ENV_VAR} first: it would override the paths being measured")
    torch.set_num_threads(threads)
    common.prepare_triton_for("cpu")
    (model_name, image_size), = common.parse_model_sizes(args.models, common.QUICK_MODEL_SIZES if args.quick
                                                         else common.CPU_MODEL_SIZES)
    spec = common.tiny_spec(common.model_specs()[model_name]) if args.quick else dict(common.model_specs()[model_name])
    name = backend.cpu_name()
    print(f"'auto' paths for the CPU {name!r}: {model_name} at {image_size}, {threads} threads, writing {args.out}",
          flush=True)
    update = {"measured_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "environment": common.capture_environment(torch.device("cpu")), "threads": threads,
              "settings": {"model": model_name, "image_size": image_size, "batch": args.batch or CPU_BATCH,
                           "dtype": "float32", "repeats": args.repeats, "quick": args.quick,
                           "criterion": "best of the repeats: training step = forward, cross-entropy, backward "
                                        "(no optimizer); eval = forward under no_grad"},
              **time_cpu_paths(args, spec, image_size)}
    write_entry(Path(args.out), name, update, section="cpus")
    table = cpu_table(args, model_name, spec, image_size, Path(args.out))
    print("\n" + table)
    print(f"written: {args.out}" + ("" if Path(args.out) != tuning.PACKAGED_FILE else
                                    " (commit it: 'auto' reads it from the package)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
