"""The measurement plan of a benchmark run: said before it starts, followed while it runs.

A run is a list of steps, each one implementation at one shape (or model) and mode. Before
measuring, a script says what it will measure on this device, with which implementations,
which it leaves out or cannot run and why, how many measurements that makes and how long
they should take (`header`). While measuring, a tqdm bar counts the steps and shows the time
left, and each result is printed as it lands (tqdm.write: a line of its own above the bar).
`run_steps` is that loop, shared by every script.

Plans by size (`plan_size`): 'quick' (--quick: tiny shapes, the CI smoke run), 'cpu' (the
default without a GPU: the real CvT-13 stage shapes at a small batch, a couple of minutes on
two cores) and 'full' (--full, and the default on a GPU: every model at the official batch).

The time left is estimated from measurements, not guessed (`TimeEstimate`): each step
carries a relative cost (its `work`: FLOPs, bytes, ...), and each implementation's seconds per
unit of work is learnt from the wall time its measured steps took, overheads included (input
creation, the correctness check); an implementation not measured yet is taken to be as slow as
the slowest measured so far. So the first estimate comes from the first measurement and is refined as
results land. On a CPU a step makes a fixed number of calls, so its time follows its work; on a
GPU each measurement is time-boxed (warm-up and repetitions by duration), so steps there weigh
the same.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from bench.common import plan_size  # noqa: F401  (the plans' sizes are decided with the common options)

PLAN_SIZES = ("quick", "cpu", "full")


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """--full (the plan's size; --quick is common.base_parser's), --include-interpreted, --dry-run."""
    parser.add_argument("--full", action="store_true",
                        help="the published plan: every model at the official batch sizes (the default on a "
                             "GPU; hours on a CPU). Without it or --quick, a CPU runs a CPU-sized plan")
    parser.add_argument("--include-interpreted", action="store_true",
                        help="on a CPU, also time cvt_fast's GPU kernels through Triton's interpreter (left out "
                             "by default: that times the interpreter, not the kernels)")
    parser.add_argument("--dry-run", action="store_true",
                        help="say what would be measured, then stop without measuring")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU: intra-op threads (default: 1 for the CPU-sized plan and --quick, where a "
                             "second thread on a shared machine mostly waits; torch's default for --full)")


# --------------------------------------------------------------------------- what is left out

def runs_interpreted(backend: str, device) -> bool:
    """cvt_fast's own kernels (the table's 'kernels' kind) are GPU kernels: on any other device the
    backend table lets them run only through an interpreter (Triton's, TRITON_INTERPRET=1)."""
    from cvt_fast.ops.backends import TABLE

    record = TABLE.get(backend)
    return record is not None and record.kind == "kernels" and device.type != "cuda"


INTERPRETED_NOTE = ("runs through Triton's interpreter on this CPU: its times are the interpreter's, "
                    "not the kernels'")


def left_out_reason(name: str, size: str, device, args: argparse.Namespace, *, interpreted: bool = False,
                    compiled: bool = False) -> Optional[str]:
    """Why this run does not measure an implementation that could run here, or None. --only
    naming it (a name or a pattern that matches it) always brings it back."""
    from bench.common import selector

    if args.only and selector(args.only)(name):
        return None
    if interpreted and size != "quick" and not getattr(args, "include_interpreted", False):
        return (f"on the CPU its kernels would run through Triton's interpreter, which times the interpreter, "
                f"not the kernels (--include-interpreted or --only {name} runs it anyway)")
    if compiled and device.type != "cuda" and size != "full":
        more = "" if size == "quick" else "--full or "
        return f"torch.compile takes minutes on a CPU ({more}--only {name} runs it)"
    return None


# --------------------------------------------------------------------------- steps

@dataclass
class Step:
    """One measurement of the plan: an implementation at a shape (or model) and mode."""
    impl: str                                     # steps of one implementation share a speed
    row: dict                                     # the leading fields of its result row
    work: float = 1.0                             # relative cost among the steps of `impl`
    unmeasured: Optional[tuple[str, str]] = None  # (status, reason): recorded without measuring
    context: Any = None                           # what the script's measure function needs

    def __post_init__(self) -> None:
        if not self.work > 0:
            raise ValueError(f"a step's work must be > 0, got {self.work!r} for {self.impl}")


def step_weight(work: float, device) -> float:
    """A step's weight for the estimate: its work on a CPU (a fixed number of calls), 1 on a GPU
    (each measurement is time-boxed)."""
    return work if device.type != "cuda" else 1.0


class TimeEstimate:
    """Seconds left in a plan, from the wall time of its finished steps.

    Each implementation's seconds per unit of work is the total time of its finished steps
    over their total work; an implementation with none finished yet is taken to be as slow as
    the slowest one measured. Before the first step finishes there is no estimate (None).
    """

    def __init__(self, steps: Sequence[tuple[str, float]]):
        """steps: (implementation, work) for every step to measure, in plan order."""
        self.steps = list(steps)
        for impl, work in self.steps:
            if not work > 0:
                raise ValueError(f"work must be > 0, got {work!r} for {impl}")
        self.done: dict[int, float] = {}      # step index -> seconds it took
        self.passed: set[int] = set()         # steps that will not run (budget spent)

    def finished(self, index: int, seconds: float) -> None:
        self.done[index] = max(0.0, seconds)

    def skipped(self, index: int) -> None:
        self.passed.add(index)

    def rate(self, impl: str) -> Optional[float]:
        """Seconds per unit of work of `impl`'s finished steps, or None before one finished."""
        seconds = work = 0.0
        for index, took in self.done.items():
            name, size = self.steps[index]
            if name == impl:
                seconds, work = seconds + took, work + size
        return seconds / work if work > 0 else None

    def seconds_left(self) -> Optional[float]:
        rates = {impl: self.rate(impl) for impl in dict.fromkeys(name for name, _ in self.steps)}
        known = [rate for rate in rates.values() if rate is not None]
        if not known:
            return None
        # An implementation not measured yet is taken to be as slow as the slowest measured one:
        # the first estimate then errs long rather than short.
        slowest = max(known)
        left = 0.0
        for index, (impl, work) in enumerate(self.steps):
            if index in self.done or index in self.passed:
                continue
            left += work * (rates[impl] if rates[impl] is not None else slowest)
        return left

    def seconds_spent(self) -> float:
        return sum(self.done.values())


def format_duration(seconds: Optional[float]) -> str:
    """'about 40 s', 'about 2.5 min', 'about 1.3 h'."""
    if seconds is None:
        return "unknown"
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class Progress:
    """The bar over the steps to measure, with the time left from a TimeEstimate, and the
    results printed above it as they land. Use as a context manager: the bar is closed on
    errors too, so nothing is printed after it on its line."""

    def __init__(self, steps: Sequence[Step], device, deadline=None, file=None):
        from tqdm import tqdm

        self.index = {id(step): i for i, step in enumerate(steps)}
        self.estimate = TimeEstimate([(s.impl, step_weight(s.work, device)) for s in steps])
        self.deadline = deadline
        self.out = file or sys.stdout
        self.bar = tqdm(total=len(steps), desc="measuring", unit="measurements", dynamic_ncols=True,
                        bar_format="{desc}: {n_fmt}/{total_fmt} |{bar}| {elapsed} elapsed{postfix}",
                        file=sys.stderr, leave=True)
        self.bar.set_postfix_str("time left: after the first measurement")
        self.last = time.perf_counter()
        self.first = True

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()

    def write(self, line: str) -> None:
        from tqdm import tqdm

        tqdm.write(line, file=self.out)
        self.out.flush()

    def landed(self, step: Step, line: str) -> None:
        """A measured step's result: its wall time (since the previous step ended, so input
        creation and checks count) goes into the estimate, its line above the bar."""
        now = time.perf_counter()
        self.estimate.finished(self.index[id(step)], now - self.last)
        self.last = now
        self.write(line)
        if self.first:
            self.first = False
            left = self._left()
            self.write(f"time: about {format_duration(self.estimate.seconds_spent() + (left or 0.0))} in all "
                       f"(from the first measurement, {format_duration(self.estimate.seconds_spent())}; "
                       "the bar's time left is refined as results land)")
        self._advance()

    def skipped(self, step: Step) -> None:
        """A step that will not run (time budget spent, or the device lost)."""
        self.estimate.skipped(self.index[id(step)])
        self.last = time.perf_counter()
        self._advance()

    def _left(self) -> Optional[float]:
        left = self.estimate.seconds_left()
        if left is not None and self.deadline is not None and self.deadline.end is not None:
            left = min(left, max(0.0, self.deadline.end - time.monotonic()))
        return left

    def _advance(self) -> None:
        left = self._left()
        if self.bar.n + 1 >= self.bar.total:
            postfix = "done"
        else:
            postfix = f"about {format_duration(left)} left" if left is not None else ""
        self.bar.set_postfix_str(postfix, refresh=False)
        self.bar.update(1)


# --------------------------------------------------------------------------- the first estimate

# Before anything is measured, a run's length is judged from its steps' work at the speed of a
# reference machine: seconds per unit of work (attn: FLOPs, conv_proj: bytes moved, model:
# multiply-accumulates), whole steps counted (input creation, the checked first call, the timed
# calls). Measured by bare CPU-sized runs (float32, one thread) on a 2-core AMD EPYC shared with
# other work, 2026-12-02: attn 8.2e10 FLOPs in 12 s, conv_proj 3.5e8 bytes in 12 s, model
# 1.1e11 MACs in 26 s (the README's Benchmarks section shows those runs). Another CPU can be
# faster or slower by a few times; the bar's estimate then follows this run's own measurements.
REFERENCE_CPU_SECONDS_PER_WORK = {"attn": 1.5e-10, "conv_proj": 3.4e-8, "model": 2.4e-10,
                                  # data: seconds per unit (an image of the torch loader on one core),
                                  # whole run included (the synthetic set and the prepared copies written
                                  # once, DALI's pipeline defined): the bare CPU plan, 3.5e3 units in 85 s
                                  # on the same machine under load, 2026-12-08
                                  "data": 2.4e-2}
# Scripts whose steps are not time-boxed on a GPU either (the input pipeline runs on the host's
# cores): their first estimate follows their work everywhere.
WORK_TIMED_EVERYWHERE = frozenset({"data"})
# Whatever its work, a step costs Python, allocation and the check: the floor of a tiny step
# (the --quick plan's, on the same machine).
MIN_STEP_SECONDS = 0.2
# On a GPU a measurement is time-boxed (warm-up and timed calls by duration); on top of that box
# come the first, checked call and the inputs' creation.
GPU_STEP_OVERHEAD_SECONDS = 1.0


def expected_seconds(script: str, steps: Sequence[Step], setup, uncounted: Iterable[str] = ()) -> Optional[float]:
    """How long the steps to measure should take, judged before measuring (None: no basis).
    `uncounted`: implementations whose steps are left out of the sum (the interpreted and the
    compiled ones on a CPU, whose time has nothing to do with their work)."""
    skip = set(uncounted)
    todo = [s for s in steps if s.unmeasured is None and s.impl not in skip]
    if setup.device.type == "cuda" and script not in WORK_TIMED_EVERYWHERE:
        timing = setup.timing
        box = (timing.warmup_ms + timing.rep_ms * max(1, timing.repeat)) / 1e3
        return len(todo) * (box + GPU_STEP_OVERHEAD_SECONDS)
    rate = REFERENCE_CPU_SECONDS_PER_WORK.get(script)
    if rate is None:
        return None
    return sum(max(rate * step.work, MIN_STEP_SECONDS) for step in todo)


def time_line(script: str, steps: Sequence[Step], setup, uncounted: Sequence[str] = ()) -> str:
    """The header's 'time:' line: the estimate judged before measuring, and what it is based on."""
    seconds = expected_seconds(script, steps, setup, uncounted)
    if seconds is None:
        line = "  time: estimated from the first measurement, then refined on the progress bar as results land"
    else:
        if setup.device.type == "cuda" and script not in WORK_TIMED_EVERYWHERE:
            basis = "each measurement time-boxed by --warmup-ms and --rep-ms, plus its first call"
        else:
            basis = "judged from the speed of a 2-core reference CPU at one thread"
        line = (f"  time: about {format_duration(seconds)} ({basis}; the bar's estimate then follows this "
                "run's own measurements)")
        if uncounted:
            line += (f"; not counted: {', '.join(uncounted)} (compilation or Triton's interpreter sets their time, "
                     "not their work)")
    if setup.deadline.end is not None:
        line += f"; no measurement starts after --time-budget {setup.time_budget:g} s"
    return line


# --------------------------------------------------------------------------- the header

def header(script: str, what: str, setup, shapes: Sequence[str], measured: Sequence[str],
           left_out: Mapping[str, str], unavailable: Mapping[str, str], steps: Sequence[Step],
           calls: str, notes: Iterable[str] = (), uncounted: Sequence[str] = (),
           plans: Optional[Mapping[str, str]] = None) -> list[str]:
    """The lines a run starts with: what it measures on this device, with which implementations
    (and why any are not), how many measurements, how each is taken and how long it will take
    (`uncounted`: measured implementations whose time the first estimate cannot judge; `plans`: the
    script's own words for its plan sizes, where the model-shape wording does not fit)."""
    from bench.common import DEFAULT_MODEL_SIZES, device_name

    sizes = {"quick": "--quick, a smoke run (tiny shapes; the timings mean nothing)",
             "cpu": "CPU-sized (--full: " + ", ".join(f"{m}@{s}" for m, s in DEFAULT_MODEL_SIZES)
                    + " at the official batch sizes, hours on a CPU)",
             "full": "full (the published shapes)"}
    sizes.update(plans or {})
    threads = ""
    if setup.device.type == "cpu":
        import torch
        count = torch.get_num_threads()
        threads = f", {count} thread{'s' if count > 1 else ''}" + (" (--threads N for more)" if count == 1 else "")
    lines = [f"bench/{script}.py: {what}",
             f"  on {device_name(setup.device)}{threads}, {setup.dtype_name}; plan: {sizes[setup.size]}"]
    lines += ["  shapes:"] + [f"    {shape}" for shape in shapes]
    lines.append(f"  measuring: {', '.join(measured) if measured else 'nothing (see below)'}")
    lines += [f"  left out: {name}: {reason}" for name, reason in left_out.items()]
    lines += [f"  unavailable: {name}: {reason}" for name, reason in unavailable.items()]
    lines += [f"  note: {note}" for note in notes]
    todo = [s for s in steps if s.unmeasured is None]
    lines.append(f"  {len(todo)} measurements; each: {calls}")
    lines.append(time_line(script, steps, setup, uncounted))
    return lines


def timed_calls(setup, check: str) -> str:
    """How each kernel measurement is taken, for the header (`check`: what the first call is
    checked against)."""
    timing = setup.timing
    if setup.device.type == "cuda":
        return (f"a first call (checked against {check}), a warm-up of {timing.warmup_ms:g} ms, then about "
                f"{timing.rep_ms:g} ms of timed calls (at least {timing.min_reps}); the median is reported")
    warmup = f", {timing.cpu_warmup} warm-up call" if timing.cpu_warmup else ""
    return (f"a first call (checked against {check}){warmup}, then {timing.cpu_reps} timed calls; "
            "the median is reported")


# --------------------------------------------------------------------------- the loop

def run_steps(run, steps: Sequence[Step], setup, measure: Callable[[Step], dict],
              line: Callable[[Step, dict], str]) -> None:
    """Measure every step that is to be measured (the others are recorded with their reason),
    saving each row as it lands and printing its line above the progress bar. No step starts
    once the deadline says so (time budget spent, CUDA context lost); Ctrl-C stops the run and
    keeps what was measured."""
    from bench.common import run_guarded

    todo = [s for s in steps if s.unmeasured is None]
    deadline = setup.deadline
    with Progress(todo, setup.device, deadline) as progress:
        try:
            for step in steps:
                if step.unmeasured is not None:
                    status, reason = step.unmeasured
                    run.add({**step.row, "status": status, "reason": reason})
                    continue
                reason = deadline.skip_reason()
                if reason:
                    run.add({**step.row, "status": "skipped", "reason": reason})
                    progress.skipped(step)
                    continue
                result = run_guarded(lambda: measure(step), setup.device)
                deadline.note(run.add({**step.row, **result}))
                progress.landed(step, line(step, result))
            run.payload["complete"] = True
        except KeyboardInterrupt:
            run.payload["interrupted"] = True
            progress.write("interrupted: writing what was measured")
