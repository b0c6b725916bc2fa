"""Shared machinery of the cvt_fast benchmarks: timing, environment capture, shapes,
results JSON, Markdown tables and plots.

How times are taken (see the device notes on method):
- CUDA: every call is bracketed by CUDA events, after a warm-up (which also absorbs
  compilation, autotuning and handle creation); the figure is the median over many
  repetitions, with min / quartiles kept beside it. Calls rotate over several input sets
  whose total size is a few times the L2 cache, so a repetition never finds its inputs
  already in L2.
- CPU: `time.perf_counter` around each call, a few repetitions (the CPU-sized default
  plan and the `--quick` smoke runs; see bench/plan.py for the plans).

Every script records failures instead of dying: an implementation that is unavailable
gets its reason, one that raises gets its error string, and the run goes on. Results are
written after every measurement, so a run cut short (timeout, Ctrl-C) still leaves them.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import fnmatch
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"
SCHEMA_VERSION = 1

# Per-GPU batch of the official ImageNet configs (TRAIN.BATCH_SIZE_PER_GPU of
# experiments/imagenet/cvt/cvt-*-224x224.yaml and *-384x384.yaml).
CONFIG_BATCH = {224: 256, 384: 128}

# The model/image-size pairs of the official configs that the benchmarks cover.
DEFAULT_MODEL_SIZES: tuple[tuple[str, int], ...] = (
    ("cvt-13", 224), ("cvt-13", 384), ("cvt-21", 224), ("cvt-21", 384), ("cvt-w24", 384),
)


def ensure_repo_on_path() -> None:
    """`python bench/x.py` puts bench/ (not the repository root) on sys.path; cvt_fast and
    the bench package live in the root, which may not be pip-installed on a bare machine."""
    root = str(REPO_ROOT)
    if root not in sys.path:
        sys.path.insert(0, root)


def prepare_triton_for(device_type: str) -> None:
    """Without a GPU, Triton kernels only run under the interpreter, and Triton reads the
    variable when kernels are decorated: set it before cvt_fast.kernels is imported."""
    if device_type != "cuda":
        os.environ.setdefault("TRITON_INTERPRET", "1")


# --------------------------------------------------------------------------- CLI

def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: tiny shapes, few repetitions (seconds on a CPU)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results JSON path (default bench/results/<device>-<date>-<script>.json); "
                             "the .md table and .png plot are written beside it")
    parser.add_argument("--only", default=None,
                        help="comma-separated implementation names or glob patterns (e.g. 'cvt_fast-*,official')")
    parser.add_argument("--device", default=None, help="'cuda', 'cuda:1' or 'cpu' (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="activation / autocast dtype (default: bfloat16 on CUDA, float32 on the CPU, "
                             "where bf16 arithmetic is mostly emulated)")
    parser.add_argument("--batch", type=int, default=None,
                        help="batch size for every shape (default: the official configs' 256 at 224, 128 at 384)")
    parser.add_argument("--warmup-ms", type=float, default=None, help="warm-up time per measurement (CUDA)")
    parser.add_argument("--rep-ms", type=float, default=None, help="target timed duration per measurement (CUDA)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="timed blocks per measurement (CUDA); >1 records each block's median and their "
                             "spread, the noise level below which differences mean nothing")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds; measurements not started by then are recorded as skipped")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def resolve_device(name: Optional[str], quick: bool = False, threads: Optional[int] = None):
    """The run's device. On the CPU, `threads` intra-op threads (None: torch's default), except that
    --quick uses one: its ops are tiny, and on a shared machine intra-op threads cost more in
    waiting than they gain (seen: 11 s -> 0.05 s a step)."""
    import torch
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name!r} asked for, but torch.cuda.is_available() is False; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ValueError(f"--device must be 'cuda[:N]' or 'cpu', got {name!r}")
    elif threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    elif quick:
        torch.set_num_threads(1)
    return device


def resolve_dtype(args: argparse.Namespace, device):
    """--dtype, defaulting by device; writes the choice back to args for the records."""
    if args.dtype is None:
        args.dtype = "bfloat16" if device.type == "cuda" else "float32"
    return parse_dtype(args.dtype)


def parse_dtype(name: str):
    import torch
    table = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if name not in table:
        raise ValueError(f"dtype must be one of {sorted(table)}, got {name!r}")
    return table[name]


def selector(only: Optional[str]) -> Callable[[str], bool]:
    """`--only a,b*` -> predicate on names (exact names or shell-style globs)."""
    if not only:
        return lambda name: True
    patterns = [p.strip() for p in only.split(",") if p.strip()]
    return lambda name: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def check_only_patterns(only: Optional[str], known: Iterable[str]) -> None:
    """A typo in --only would silently measure nothing: refuse patterns that match no name."""
    if not only:
        return
    known = list(known)
    for pattern in (p.strip() for p in only.split(",")):
        if pattern and not any(fnmatch.fnmatchcase(name, pattern) for name in known):
            raise ValueError(f"--only pattern {pattern!r} matches none of {known}")


def parse_model_sizes(text: Optional[str], default: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    """'cvt-13@224,cvt-w24@384' -> [('cvt-13', 224), ('cvt-w24', 384)]."""
    if not text:
        return list(default)
    pairs = []
    for item in text.split(","):
        item = item.strip()
        match = re.fullmatch(r"([A-Za-z0-9_\-]+)@(\d+)", item)
        if not match:
            raise ValueError(f"model must be written NAME@IMAGE_SIZE (e.g. cvt-13@224), got {item!r}")
        pairs.append((match.group(1), int(match.group(2))))
    return pairs


class Deadline:
    """When to stop starting measurements: --time-budget spent (so a long run ends cleanly
    inside an outer time limit), or the CUDA context lost to a kernel fault."""

    def __init__(self, seconds: Optional[float]):
        self.end = None if seconds is None else time.monotonic() + seconds
        self.fatal: Optional[str] = None  # set once the CUDA context is lost

    def expired(self) -> bool:
        return self.end is not None and time.monotonic() >= self.end

    def skip_reason(self) -> Optional[str]:
        """Why no further measurement should start, or None."""
        if self.fatal:
            return f"not run: the CUDA context was lost earlier ({self.fatal})"
        if self.expired():
            return "time budget exhausted"
        return None

    def note(self, row: Mapping[str, Any]) -> None:
        """Look at a finished row: a sticky CUDA error ends the measuring."""
        if self.fatal is None and row.get("status") == "error" and is_sticky_cuda_error(row.get("error", "")):
            self.fatal = f"{row.get('impl', '?')}: {row['error'][:200]}"


# --------------------------------------------------------------------------- the scripts' shared start

QUICK_MODEL_SIZES: tuple[tuple[str, int], ...] = (("cvt-13", 32),)
# The CPU-sized plan: CvT-13's real stage shapes (CvT-21 shares them), at a batch each script
# chooses so that a bare run ends in a couple of minutes on two cores.
CPU_MODEL_SIZES: tuple[tuple[str, int], ...] = (("cvt-13", 224),)


def add_shape_arguments(parser: argparse.ArgumentParser, modes: Sequence[str], default_modes: Optional[str] = None,
                        stages: bool = True, modes_note: str = "", models_note: str = "") -> None:
    """--models, --modes and (kernel benchmarks) --stages and --cuda-graph."""
    parser.add_argument("--models", default=None,
                        help="comma-separated NAME@IMAGE_SIZE (default: cvt-13/21 at 224 and 384, cvt-w24 at 384)"
                             + models_note)
    parser.add_argument("--modes", default=default_modes if default_modes is not None else ",".join(modes),
                        help=f"comma-separated subset of {','.join(modes)}{modes_note}")
    if stages:
        parser.add_argument("--cuda-graph", action="store_true",
                            help="time CUDA-graph replays (kernel time without host launch overhead) instead of "
                                 "eager calls")
        parser.add_argument("--stages", default=None, help="comma-separated stage numbers (default: all)")


@dataclass
class Prologue:
    """What every benchmark settles before measuring: device, dtype, the plan's size, modes,
    which implementations, which models at which batch, timing and the time budget."""
    device: Any
    dtype: Any
    modes: list[str]
    wanted: Callable[[str], bool]
    pairs: list[tuple[str, int]]
    timing: "TimingConfig"
    deadline: "Deadline"
    cuda_graph: bool
    size: str = "full"             # bench.plan.PLAN_SIZES: 'quick', 'cpu' or 'full'
    batch: Optional[int] = None    # every shape's batch; None: the official configs' per image size
    dtype_name: str = "float32"
    time_budget: Optional[float] = None


def plan_size(args: argparse.Namespace, device) -> str:
    """'quick' (--quick), 'full' (--full, or a GPU) or 'cpu' (the default elsewhere): bench/plan.py's
    plans come in these sizes."""
    if args.quick:
        return "quick"
    if getattr(args, "full", False) or device.type == "cuda":
        return "full"
    return "cpu"


def prologue(args: argparse.Namespace, modes: Sequence[str], implementations: Optional[Iterable[str]] = None,
             cpu_batch: Optional[int] = None) -> Prologue:
    """Resolve the common options (after parse_args). `implementations`: the names --only must
    match (None: the script checks --only itself). `cpu_batch`: the batch of the CPU-sized plan."""
    if args.quick and getattr(args, "full", False):
        raise ValueError("--quick and --full ask for opposite plans: give one of them")
    device = resolve_device(args.device, args.quick, getattr(args, "threads", None))
    prepare_triton_for(device.type)
    dtype = resolve_dtype(args, device)
    chosen = [m.strip() for m in args.modes.split(",") if m.strip()]
    for mode in chosen:
        if mode not in modes:
            raise ValueError(f"--modes entries must be in {tuple(modes)}, got {mode!r}")
    if implementations is not None:
        check_only_patterns(args.only, implementations)
    size = plan_size(args, device)
    if size == "cpu" and getattr(args, "threads", None) is None:
        import torch
        # One thread, as --quick: on a shared machine a second intra-op thread mostly waits (seen
        # here: a depthwise convolution at 0.5 ms on one thread, 16 ms on two, the cores busy).
        torch.set_num_threads(1)
    default_pairs = {"quick": QUICK_MODEL_SIZES, "cpu": CPU_MODEL_SIZES, "full": DEFAULT_MODEL_SIZES}[size]
    pairs = parse_model_sizes(args.models, default_pairs)
    batch = args.batch or (cpu_batch if size == "cpu" else None)
    cuda_graph = bool(getattr(args, "cuda_graph", False) and device.type == "cuda")
    return Prologue(device, dtype, chosen, selector(args.only), pairs, TimingConfig.from_args(args, size),
                    Deadline(args.time_budget), cuda_graph, size=size, batch=batch, dtype_name=args.dtype,
                    time_budget=args.time_budget)


def select_stages(shapes: list[dict], stages: Optional[str], pairs: Sequence[tuple[str, int]]) -> list[dict]:
    """--stages 1,3: keep those stages' shapes; refuse a selection that keeps nothing."""
    if not stages:
        return shapes
    wanted = {int(s) for s in stages.split(",") if s.strip()}
    kept = [s for s in shapes if s["stage"] in wanted]
    if not kept:
        raise ValueError(f"--stages {stages!r} selects no stage of {[f'{m}@{s}' for m, s in pairs]}")
    return kept


# --------------------------------------------------------------------------- environment

def _run_text(cmd: Sequence[str], timeout: float = 20.0) -> Optional[str]:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _version(module: str) -> Optional[str]:
    try:
        mod = __import__(module)
    except Exception as error:  # noqa: BLE001 - a broken optional package must not stop the run
        return f"unavailable ({type(error).__name__}: {error})"[:200]
    return getattr(mod, "__version__", "unknown")


def device_name(device) -> str:
    import torch
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU ({name})"


def device_slug(device) -> str:
    import torch
    if device.type != "cuda":
        return "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return slug or "cuda"


def l2_cache_bytes(device) -> int:
    import torch
    if device.type == "cuda":
        size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        if size:
            return int(size)
        return 64 << 20  # no property in this torch: assume a large (Hopper-sized) L2
    return 32 << 20  # CPU last-level cache order of magnitude; only used for --quick


def capture_environment(device) -> dict:
    """Everything needed to reproduce or compare a run: device, versions, command line."""
    import torch
    env: dict[str, Any] = {
        "device": device_name(device),
        "device_type": device.type,
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": [sys.executable] + sys.argv,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "xformers": _version("xformers"),
        "driver": None,
        "cpu_threads": torch.get_num_threads(),
        "env": {k: os.environ[k] for k in ("TRITON_INTERPRET", "CVT_FAST_BACKEND", "CUDA_VISIBLE_DEVICES",
                                           "TORCHINDUCTOR_CACHE_DIR") if k in os.environ},
    }
    try:
        import cvt_fast
        env["cvt_fast"] = cvt_fast.__version__
        from cvt_fast.extension import extension_status
        env["cvt_fast_extension"] = extension_status()
    except Exception as error:  # noqa: BLE001
        env["cvt_fast"] = f"unavailable ({describe_error(error)})"
    commit = _run_text(["git", "rev-parse", "HEAD"])
    if commit:
        dirty = _run_text(["git", "status", "--porcelain", "--untracked-files=no"])
        env["git_commit"] = commit + ("-dirty" if dirty else "")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({
            "compute_capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 2),
            "l2_cache_mib": round(l2_cache_bytes(device) / 2**20, 1),
        })
        smi = _run_text(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem,power.limit",
                         "--format=csv,noheader", f"--id={device.index or 0}"])
        if smi:
            fields = [f.strip() for f in smi.splitlines()[0].split(",")]
            env["driver"] = fields[0]
            env["nvidia_smi"] = smi
    return env


# --------------------------------------------------------------------------- errors & memory

def describe_error(error: BaseException, limit: int = 600) -> str:
    """One short line for the JSON: exception type and the first lines of its message."""
    text = " | ".join(line.strip() for line in str(error).strip().splitlines()[:4] if line.strip())
    return f"{type(error).__name__}: {text}"[:limit]


# Errors after which the CUDA context is unusable: every later call fails too, so the run
# stops measuring instead of recording the same failure for everything that follows.
_STICKY_CUDA_ERRORS = ("illegal memory access", "device-side assert", "unspecified launch failure",
                       "illegal instruction", "misaligned address", "cuda error: an illegal")


def is_sticky_cuda_error(message: str) -> bool:
    text = message.lower()
    return any(marker in text for marker in _STICKY_CUDA_ERRORS)


def is_out_of_memory(error: BaseException) -> bool:
    import torch
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    text = str(error).lower()
    return "out of memory" in text or "cudnn_status_alloc_failed" in text


def free_memory(device) -> None:
    """Drop cached blocks between implementations so each starts from the same state."""
    import torch
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def synchronize(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak_memory(fn: Callable[[], Any], device) -> Optional[float]:
    """MiB allocated by one call beyond what was allocated before it (its output included).
    None on the CPU, where the caching allocator's statistics do not exist."""
    import torch
    if device.type != "cuda":
        return None
    synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del result
    return peak / 2**20


# --------------------------------------------------------------------------- timing

@dataclass
class TimingConfig:
    warmup_ms: float = 50.0       # CUDA: warm-up duration (at least `min_warmup` calls)
    rep_ms: float = 200.0         # CUDA: aim for this much timed work per measurement
    min_warmup: int = 3
    probe: int = 5                # CUDA: calls timed together to choose the repetition count
    repeat: int = 1               # CUDA: timed blocks per measurement (--repeat; spread = noise)
    min_reps: int = 10
    max_reps: int = 500
    cpu_warmup: int = 1           # CPU: plain call counts
    cpu_reps: int = 3

    @classmethod
    def from_args(cls, args: argparse.Namespace, size: str = "full") -> "TimingConfig":
        config = cls()
        if args.quick:
            config.warmup_ms, config.rep_ms, config.min_warmup, config.min_reps = 5.0, 20.0, 1, 3
            # The benchmarks make one checked call before timing, which is the CPU warm-up.
            config.cpu_warmup, config.cpu_reps = 0, 2
        elif size == "cpu":
            config.cpu_warmup = 0  # the checked first call warms up
        if getattr(args, "warmup_ms", None) is not None:
            config.warmup_ms = args.warmup_ms
        if getattr(args, "rep_ms", None) is not None:
            config.rep_ms = args.rep_ms
        config.repeat = max(1, getattr(args, "repeat", 1) or 1)
        return config


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    q1_ms: float
    q3_ms: float
    mean_ms: float
    reps: int
    warmup_calls: int
    rotation: int
    block_medians_ms: Optional[list] = None  # --repeat: the median of each timed block

    def as_dict(self) -> dict:
        result = {
            "time_ms": self.median_ms, "time_ms_min": self.min_ms, "time_ms_q1": self.q1_ms,
            "time_ms_q3": self.q3_ms, "time_ms_mean": self.mean_ms, "reps": self.reps,
            "warmup_calls": self.warmup_calls, "input_sets": self.rotation,
        }
        if self.block_medians_ms and len(self.block_medians_ms) > 1:
            # Run-to-run spread of the same measurement: differences below it are noise.
            result["block_medians_ms"] = self.block_medians_ms
            result["repeat_spread"] = (max(self.block_medians_ms) - min(self.block_medians_ms)) / self.median_ms
        return result


def _summarise(times_ms: Sequence[float], warmup: int, rotation: int) -> Timing:
    ordered = sorted(times_ms)
    n = len(ordered)
    return Timing(median_ms=statistics.median(ordered), min_ms=ordered[0],
                  q1_ms=ordered[(n - 1) // 4], q3_ms=ordered[(3 * (n - 1)) // 4],
                  mean_ms=statistics.fmean(ordered), reps=n, warmup_calls=warmup, rotation=rotation)


def rotation_count(bytes_per_set: int, device, max_sets: int = 8) -> int:
    """Input sets to rotate over so that all of them together are >= 3x the L2 cache
    (at least 2 on a GPU: the tail of the last call's data can still sit in L2)."""
    if device.type != "cuda":
        return 1
    wanted = math.ceil(3 * l2_cache_bytes(device) / max(bytes_per_set, 1))
    return max(2, min(max_sets, wanted))


def capture_graphs(fn: Callable[[int], Any], device, rotation: int) -> Callable[[int], Any]:
    """One CUDA graph of fn(i) per input set; returns a replaying fn. Timing replays removes
    the host's launch and dispatch overhead, leaving the kernels' own time (what matters for
    the small stage-3 shapes, where a kernel is a few microseconds)."""
    import torch
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up before capture, as CUDA graphs require
        for i in range(max(3, rotation)):
            fn(i)
    torch.cuda.current_stream(device).wait_stream(side)
    synchronize(device)
    graphs = []
    for i in range(rotation):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn(i)
        graphs.append(graph)
    synchronize(device)
    return lambda i: graphs[i % rotation].replay()


def time_calls(fn: Callable[[int], Any], device, config: TimingConfig, rotation: int = 1,
               graph: bool = False) -> Timing:
    """Median time of `fn(i)` (i = call index; fn picks input set i % rotation). With
    graph=True (CUDA only), the calls are captured into CUDA graphs and their replays timed."""
    import torch
    if device.type != "cuda":
        for i in range(config.cpu_warmup):
            fn(i)
        times = []
        for i in range(config.cpu_reps):
            start = time.perf_counter()
            fn(i)
            times.append((time.perf_counter() - start) * 1e3)
        return _summarise(times, config.cpu_warmup, rotation)

    if graph:
        fn = capture_graphs(fn, device, rotation)

    # Warm-up by duration (compilation and autotuning happen in the first calls).
    synchronize(device)
    calls, start = 0, time.perf_counter()
    while calls < config.min_warmup or (time.perf_counter() - start) * 1e3 < config.warmup_ms:
        fn(calls)
        calls += 1
        if calls % 4 == 0:
            synchronize(device)
    synchronize(device)

    # Estimate one call to choose the repetition count.
    first, last = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    probe = config.probe
    first.record()
    for i in range(probe):
        fn(calls + i)
    last.record()
    synchronize(device)
    estimate = max(first.elapsed_time(last) / probe, 1e-3)
    reps = int(min(config.max_reps, max(config.min_reps, config.rep_ms / estimate)))

    times: list[float] = []
    block_medians = []
    for _ in range(max(1, config.repeat)):
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            starts[i].record()
            fn(i)
            ends[i].record()
        synchronize(device)
        block = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        block_medians.append(statistics.median(block))
        times.extend(block)
    timing = _summarise(times, calls + probe, rotation)
    timing.block_medians_ms = block_medians
    return timing


def measure_copy_bandwidth(device, config: TimingConfig, quick: bool = False) -> dict:
    """Achievable device-memory bandwidth: a large device-to-device copy, counting bytes
    read plus bytes written (the ceiling that memory-bound kernels are held against)."""
    import torch
    n_bytes = (16 << 20) if quick or device.type != "cuda" else (1 << 30)
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    timing = time_calls(lambda i: dst.copy_(src), device, config)
    gbps = 2 * n_bytes / (timing.median_ms * 1e-3) / 1e9
    src = dst = None  # noqa: F841 - release the buffers before the next measurement
    free_memory(device)
    return {"bytes_copied": n_bytes, "gbps": gbps, **timing.as_dict()}


# --------------------------------------------------------------------------- model shapes

def _per_stage(value: Any, stage: int) -> Any:
    """Official YAML specs give most keys per stage as lists, some as scalars."""
    if isinstance(value, (list, tuple)):
        return value[stage]
    return value


def conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    """nn.Conv2d's output size: the one definition, cvt_fast.ops.contract.output_size."""
    from cvt_fast.ops.contract import output_size
    return output_size(size, kernel, stride, padding)


def stage_geometry(spec: Mapping[str, Any], image_size: int) -> list[dict]:
    """Per-stage token grid, q/kv lengths, width and heads of a CvT spec at an image size.

    Follows the official model: each stage's ConvEmbed shrinks the grid
    ((n + 2p - k) // s + 1), the dw_bn/avg projection makes q at STRIDE_Q and k/v at
    STRIDE_KV, and the cls token (CLS_TOKEN) adds one row to every sequence.
    """
    size = image_size
    stages = []
    for i in range(int(spec["NUM_STAGES"])):
        size = conv_out(size, _per_stage(spec["PATCH_SIZE"], i), _per_stage(spec["PATCH_STRIDE"], i),
                        _per_stage(spec["PATCH_PADDING"], i))
        has_cls = int(bool(_per_stage(spec.get("CLS_TOKEN", False), i)))
        method = _per_stage(spec.get("QKV_PROJ_METHOD", "dw_bn"), i)
        kernel = _per_stage(spec.get("KERNEL_QKV", 3), i)
        stride_q, stride_kv = _per_stage(spec.get("STRIDE_Q", 1), i), _per_stage(spec.get("STRIDE_KV", 2), i)
        padding_q, padding_kv = _per_stage(spec.get("PADDING_Q", 1), i), _per_stage(spec.get("PADDING_KV", 1), i)
        if method == "linear":  # no spatial reduction at all
            grid_q = grid_kv = size
        else:
            grid_q = conv_out(size, kernel, stride_q, padding_q)
            grid_kv = conv_out(size, kernel, stride_kv, padding_kv)
        dim, heads = int(_per_stage(spec["DIM_EMBED"], i)), int(_per_stage(spec["NUM_HEADS"], i))
        stages.append({
            "stage": i + 1, "grid": size, "tokens": has_cls + size * size, "has_cls": has_cls,
            "nq": has_cls + grid_q * grid_q, "nkv": has_cls + grid_kv * grid_kv,
            "grid_q": grid_q, "grid_kv": grid_kv, "dim": dim, "heads": heads, "head_dim": dim // heads,
            "kernel": kernel, "stride_q": stride_q, "stride_kv": stride_kv,
            "padding_q": padding_q, "padding_kv": padding_kv, "method": method,
            "depth": int(_per_stage(spec["DEPTH"], i)),
        })
    return stages


def distinct_stage_shapes(pairs: Sequence[tuple[str, int]], batch_override: Optional[int], quick: bool,
                          key_fields: Sequence[str], tiny: bool = False) -> list[dict]:
    """The stage geometries of (model, image size) pairs, at the batch (--batch; --quick: 2;
    else the official config's), one entry per distinct shape (key_fields of the stage, batch,
    image size): CvT-13 and CvT-21 share their stages, so each is measured once. An entry lists
    its models and is labelled 'cvt-13/21@224 s1'. tiny: the models' common.tiny_spec."""
    specs = model_specs()
    shapes: dict[tuple, dict] = {}
    for name, image_size in pairs:
        if name not in specs:
            raise ValueError(f"unknown model {name!r}; expected one of {sorted(specs)}")
        batch = batch_override or (2 if quick else config_batch(image_size))
        spec = tiny_spec(specs[name]) if tiny else specs[name]
        for stage in stage_geometry(spec, image_size):
            key = (batch, image_size) + tuple(stage[field] for field in key_fields)
            entry = shapes.setdefault(key, {**stage, "batch": batch, "image_size": image_size, "models": []})
            entry["models"].append(name)
    for entry in shapes.values():
        short = "/".join(m.replace("cvt-", "") for m in entry["models"])
        entry["label"] = f"cvt-{short}{'(tiny)' if tiny else ''}@{entry['image_size']} s{entry['stage']}"
    return list(shapes.values())


def model_specs() -> Mapping[str, Mapping[str, Any]]:
    from cvt_fast.specs import MODEL_SPECS
    return MODEL_SPECS


def tiny_spec(base: Mapping[str, Any]) -> dict:
    """A small spec for --quick smoke runs: the structure of the base model (3 stages, cls in
    the last, dw_bn projections) with narrow stages whose head_dim (32) the fused kernels take,
    and depths of at least the stage index (Hugging Face's port indexes drop-path by stage)."""
    spec = dict(base)
    spec["DIM_EMBED"] = [32, 64, 128]
    spec["NUM_HEADS"] = [1, 2, 4]
    spec["DEPTH"] = [1, 2, 3]
    return spec


def config_batch(image_size: int) -> int:
    return CONFIG_BATCH.get(image_size, 256 if image_size <= 224 else 128)


# --------------------------------------------------------------------------- output

def default_out_path(script: str, device) -> Path:
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    return RESULTS_DIR / f"{device_slug(device)}-{date}-{script}.json"


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json_atomic(path: Path, payload: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_clean(payload), indent=1, default=_json_default) + "\n")
    os.replace(tmp, path)


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        if value == 0:
            return "0"
        magnitude = math.floor(math.log10(abs(value)))
        decimals = max(0, digits - 1 - magnitude)
        return f"{value:.{decimals}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        cells = [fmt(c).replace("|", "\\|").replace("\n", " ") for c in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pivot_table(rows: Iterable[Mapping[str, Any]], names: Sequence[str], value: str, group_header: str,
                group: Callable[[Mapping[str, Any]], str] = lambda row: row["label"]) -> str:
    """The compact view: a line per (group, mode), a column per implementation holding `value`
    (cvt_fast rows: with their speedup over the best peer), or the status of a row without one."""
    cells: dict[tuple, dict[str, str]] = {}
    for r in rows:
        if r.get("status") == "ok":
            text = fmt(r[value])
            if r["impl"].startswith("cvt_fast") and r.get("speedup_vs_best_peer"):
                text += f" ({fmt(r['speedup_vs_best_peer'])}x)"
        else:
            text = r.get("status", "?")
        cells.setdefault((group(r), r["mode"]), {})[r["impl"]] = text
    return markdown_table([group_header, "mode"] + list(names),
                          [[key, mode] + [c.get(n, "") for n in names] for (key, mode), c in cells.items()])


def status_note(row: Mapping[str, Any], limit: int = 70) -> str:
    """Short text for a table cell of a row that has no figure."""
    if row.get("status") == "ok":
        return ""
    reason = row.get("error") or row.get("reason") or ""
    reason = reason if len(reason) <= limit else reason[: limit - 3] + "..."
    return f"{row.get('status')}: {reason}"


def plot_grouped_bars(path: Path, title: str, panels: Sequence[Mapping[str, Any]]) -> None:
    """One row of bar charts. Each panel: {'title', 'ylabel', 'groups': [str],
    'series': {impl: [value or None per group]}, 'log': bool}. Missing values leave gaps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in panels if p["groups"] and p["series"]]
    if not panels:
        return
    widest = max(len(p["groups"]) * max(len(p["series"]), 1) for p in panels)
    fig, axes = plt.subplots(len(panels), 1, squeeze=False,
                             figsize=(max(8.0, 0.22 * widest + 3), 4.2 * len(panels)))
    colours = plt.get_cmap("tab20").colors
    names = sorted({name for p in panels for name in p["series"]})
    colour_of = {name: colours[i % len(colours)] for i, name in enumerate(names)}
    for ax, panel in zip(axes[:, 0], panels):
        series = panel["series"]
        n_groups, n_series = len(panel["groups"]), len(series)
        width = 0.8 / max(n_series, 1)
        for j, (name, values) in enumerate(series.items()):
            xs = [g + (j - (n_series - 1) / 2) * width for g in range(n_groups)]
            points = [(x, v) for x, v in zip(xs, values) if v is not None and math.isfinite(v) and v > 0]
            if points:
                ax.bar([x for x, _ in points], [v for _, v in points], width=width,
                       label=name, color=colour_of[name])
        ax.set_xticks(range(n_groups))
        ax.set_xticklabels(panel["groups"], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(panel.get("ylabel", ""))
        ax.set_title(panel.get("title", ""), fontsize=10)
        if panel.get("log"):
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, ncol=min(4, max(n_series, 1)))
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def mode_panels(rows: Sequence[Mapping[str, Any]], modes: Sequence[str], names: Sequence[str], value: str,
                title: Callable[[str], str], ylabel: str,
                group: Callable[[Mapping[str, Any]], str] = lambda row: row["label"]) -> list[dict]:
    """One bar-chart panel per mode: `value` of every implementation's ok row in each group
    (a shape or a model), for plot_grouped_bars."""
    panels = []
    for mode in modes:
        ok = [r for r in rows if r["mode"] == mode and r.get("status") == "ok"]
        groups = list(dict.fromkeys(group(r) for r in rows if r["mode"] == mode))
        series = {n: [next((r.get(value) for r in ok if group(r) == g and r["impl"] == n), None) for g in groups]
                  for n in names}
        panels.append({"title": title(mode), "ylabel": ylabel, "groups": groups,
                       "series": {n: v for n, v in series.items() if any(x is not None for x in v)}})
    return panels


class BenchRun:
    """One benchmark run: its settings, the implementations it considered and every row it
    measured, saved to JSON after each row."""

    def __init__(self, script: str, args: argparse.Namespace, device, settings: Mapping[str, Any],
                 conventions: Mapping[str, str]):
        self.script = script
        self.device = device
        self.out = Path(args.out) if args.out else default_out_path(script, device)
        self.no_plot = bool(args.no_plot)
        self.payload: dict[str, Any] = {
            "benchmark": script,
            "schema_version": SCHEMA_VERSION,
            "environment": capture_environment(device),
            "settings": dict(settings),
            "conventions": dict(conventions),
            "implementations": {},
            "results": [],
            "complete": False,
        }

    @property
    def rows(self) -> list[dict]:
        return self.payload["results"]

    def add_implementation(self, name: str, available: bool, reason: Optional[str], description: str,
                           peer: bool) -> None:
        self.payload["implementations"][name] = {
            "available": available, "reason": reason, "description": description, "peer": peer}

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        self.save()
        return row

    def save(self) -> None:
        write_json_atomic(self.out, self.payload)

    def finish(self, table: str, panels: Sequence[Mapping[str, Any]], plot_title: str) -> None:
        """Write the Markdown table and the plot beside the JSON, print the table."""
        md_path, png_path = self.out.with_suffix(".md"), self.out.with_suffix(".png")
        env = self.payload["environment"]
        header = (f"# {self.script} benchmark: {env['device']}\n\n"
                  f"{env['date_utc']} | torch {env['torch']} | triton {env['triton']} | CUDA {env['torch_cuda']} "
                  f"| driver {env['driver']}\n\n")
        md_path.write_text(header + table + "\n")
        self.payload["table_path"] = str(md_path)
        if not self.no_plot:
            try:
                plot_grouped_bars(png_path, f"{plot_title} - {env['device']}", panels)
                self.payload["plot_path"] = str(png_path)
            except Exception as error:  # noqa: BLE001 - a plotting failure must not lose the results
                self.payload["plot_error"] = describe_error(error)
        self.save()
        print(header + table, flush=True)
        print(f"\nresults: {self.out}", flush=True)


def add_speedups(rows: list[dict], key_fields: Sequence[str], peer_names: set[str]) -> None:
    """speedup_vs_best_peer = (fastest peer's time) / (this row's time) at the same shape and
    mode; > 1 means faster than every peer. Peers are the non-cvt_fast implementations."""
    best: dict[tuple, float] = {}
    for row in rows:
        if row.get("status") == "ok" and row["impl"] in peer_names:
            key = tuple(row.get(f) for f in key_fields)
            best[key] = min(best.get(key, math.inf), row["time_ms"])
    for row in rows:
        key = tuple(row.get(f) for f in key_fields)
        if row.get("status") == "ok" and key in best:
            row["best_peer_time_ms"] = best[key]
            row["speedup_vs_best_peer"] = best[key] / row["time_ms"]


def add_ratios_vs(rows: list[dict], key_fields: Sequence[str], baseline: str) -> None:
    """speedup_vs_<baseline> = baseline's time / this row's time, and peak_mem_vs_<baseline> =
    this row's peak memory / the baseline's, at the same key (the form the targets are stated in)."""
    base: dict[tuple, dict] = {}
    for row in rows:
        if row.get("status") == "ok" and row["impl"] == baseline:
            base[tuple(row.get(f) for f in key_fields)] = row
    for row in rows:
        ref = base.get(tuple(row.get(f) for f in key_fields))
        if row.get("status") != "ok" or ref is None:
            continue
        row[f"speedup_vs_{baseline}"] = ref["time_ms"] / row["time_ms"]
        if row.get("peak_mem_gib") and ref.get("peak_mem_gib"):
            row[f"peak_mem_vs_{baseline}"] = row["peak_mem_gib"] / ref["peak_mem_gib"]


class Latest:
    """A value kept for the latest key only (a shape's input sets, a stage's module, a built
    model): made on first use of its key, dropped, and device memory freed, when another key is
    asked for. A failure to make it is kept and raised again for the same key, so a shape that
    cannot be built fails once, not once per implementation."""

    def __init__(self, device):
        self.device = device
        self.key: Any = object()
        self.value: Any = None
        self.error: Optional[BaseException] = None

    def get(self, key: Any, make: Callable[[], Any]) -> Any:
        if key != self.key:
            self.key, self.value, self.error = key, None, None
            free_memory(self.device)
            try:
                self.value = make()
            except KeyboardInterrupt:
                raise
            except Exception as error:  # noqa: BLE001 - kept for the other steps of this key
                self.error = error.with_traceback(None)  # its frames would hold tensors
        if self.error is not None:
            raise self.error
        return self.value

    def clear(self) -> None:
        self.key, self.value, self.error = object(), None, None
        free_memory(self.device)


def run_guarded(fn: Callable[[], dict], device) -> dict:
    """Call fn; an exception becomes {'status': 'error'|'oom', 'error': ...} and the memory it
    held is released, so the next implementation starts clean."""
    try:
        return fn()
    except KeyboardInterrupt:
        raise
    except Exception as error:  # noqa: BLE001 - record, go on
        status = "oom" if is_out_of_memory(error) else "error"
        message = describe_error(error)
        if os.environ.get("CVT_BENCH_TRACEBACK"):
            traceback.print_exc()
        del error  # the traceback's frames hold tensors until the exception is dropped
    free_memory(device)
    return {"status": status, "error": message}
