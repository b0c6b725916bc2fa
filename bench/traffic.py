#!/usr/bin/env python
"""Memory traffic of one CvT training step and one inference forward, op by op, without a device.

CvT's training step is memory-bound, so the bytes it moves are the measuring stick of every
fusion. This counts them exactly and device-free: the model runs on PyTorch's `meta` device
(shapes, no data, no arithmetic) under a TorchDispatchMode that sees every dispatched op and
adds up the tensors it reads and writes.

Conventions (also written into the JSON):
- one op = one kernel: it reads every tensor argument and writes every output. A cvt_fast
  custom op is one kernel whatever its body does (its inputs + outputs). View and metadata ops
  (views, `_unsafe_view`, `empty*`) move nothing and are free.
- bf16-equivalent: every floating-point element counts 2 bytes (the model runs in float32 so
  that the count is the 16-bit AMP step's without autocast's weight casts; fp32 statistics such
  as LayerNorm's per-row mean count 2 bytes too, a negligible error). Integer tensors count their
  real size.
- per image, at batch 2 by default (the parameters are read, and their gradients written, once
  per step, so their bytes are amortised over the batch); `--no-weights` adds the large-batch
  limit (the batch-2 count minus the batch-1 count: activations only).
- training step: forward in train mode, cross-entropy against integer labels, backward; the
  optimizer step is not counted (it is the same for every path). Inference: eval mode, no grad.
- the fused backends (reference, triton, cuda) dispatch the same ops, the backend being an
  argument of each custom op, so the `reference` count is every fused backend's count.
- the meta device lays convolution outputs out as CUDA does (NCHW, as their input); the CPU's
  depthwise convolution returns channels-last tensors at batch > 1, which spares the official
  path a few copies that a GPU makes (about 6 MB of CvT-13's 750 per image).

Usage: python bench/traffic.py [--models cvt-13@224] [--batch 2] [--backends official,reference]
       [--no-weights] [--by-site]
Writes bench/results/traffic-<model>-<size>.json and .md (or --out PATH.json) and prints the table.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import datetime as _dt
import re
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

from bench import common  # noqa: E402

MODES = ("train", "infer")
DEFAULT_BACKENDS = ("official", "reference")
BF16_BYTES = 2
MB = 1e6

# Ops that move no data: they make views or allocate without writing (views are found by schema).
FREE_OPS = {"_unsafe_view", "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided",
            "lift_fresh", "set_", "resize_"}
# In-place ops that overwrite their first argument without reading it.
WRITE_ONLY_INPLACE = {"fill_", "zero_", "copy_", "bernoulli_", "uniform_", "normal_", "random_"}

CONVENTIONS = {
    "bytes": "every tensor argument of a dispatched op is read, every output written; custom ops "
             "(cvt_fast::*) count as one kernel; views, _unsafe_view and empty* are free",
    "element_size": "bf16-equivalent: 2 bytes per floating-point element, integer tensors at their size",
    "per_image": "bytes / batch (parameters and their gradients are amortised over the batch)",
    "weights_excluded": "count at the batch minus the count at batch 1, per image: the large-batch "
                        "limit where parameter traffic vanishes",
    "train": "train-mode forward, cross-entropy, backward (no optimizer step)",
    "infer": "eval-mode forward under torch.no_grad()",
    "device": "meta (shapes only); fused backends share one count, taken with 'reference'",
}


@dataclass
class OpTraffic:
    calls: int = 0
    read: int = 0
    written: int = 0

    @property
    def total(self) -> int:
        return self.read + self.written


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * (BF16_BYTES if t.is_floating_point() else t.element_size())


def op_name(func: Any) -> str:
    """'addmm' for aten ops, 'cvt_fast::attention' for the package's custom ops."""
    name = func.overloadpacket.__name__
    return name if func.namespace == "aten" else f"{func.namespace}::{name}"


class TrafficCounter(TorchDispatchMode):
    """Adds up, per op name, the calls and the bytes read and written by every dispatched op;
    with a SiteTracker, also per (model site, forward or backward, op)."""

    def __init__(self, sites: Optional["SiteTracker"] = None) -> None:
        super().__init__()
        self.ops: dict[str, OpTraffic] = defaultdict(OpTraffic)
        self.sites = sites
        self.by_site: dict[tuple[str, str, str], OpTraffic] = defaultdict(OpTraffic)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = op_name(func)
        if func.is_view or name in FREE_OPS or not any(
                isinstance(t, torch.Tensor) for t in tree_flatten((args, kwargs, out))[0]):
            return out
        skip_first = func.overloadpacket.__name__ in WRITE_ONLY_INPLACE
        inputs = [a for i, a in enumerate(args) if not (skip_first and i == 0)]
        inputs += [v for k, v in kwargs.items() if k != "out"]
        read = sum(_tensor_bytes(t) for t in tree_flatten(inputs)[0] if isinstance(t, torch.Tensor))
        written = sum(_tensor_bytes(t) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        records = [self.ops[name]]
        if self.sites is not None:
            records.append(self.by_site[self.sites.current() + (name,)])
        for record in records:
            record.calls += 1
            record.read += read
            record.written += written
        return out


class SiteTracker:
    """Names the code each op comes from, as (site, 'forward' or 'backward').

    The site is the innermost function of cvt_fast's model code (cvt_fast/*.py: model.py,
    lean_mlp.py, lean_layer_norm.py; not the ops layer or torch) on the Python stack: the live
    stack in the forward and in Python backward functions, else the stack recorded when the
    autograd node being run was created (anomaly mode records it), e.g. 'Block.forward_chained'
    for the residual steps, '_batch_norm_tokens' for the training BatchNorm, 'Mlp._forward'."""

    def __init__(self) -> None:
        import cvt_fast

        self.package_dir = Path(cvt_fast.__file__).resolve().parent
        self._functions: dict[str, list[tuple[int, int, str]]] = {}
        self._anomaly = torch.autograd.set_detect_anomaly(True, check_nan=False)

    def __enter__(self) -> "SiteTracker":
        self._anomaly.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._anomaly.__exit__(*exc)

    def current(self) -> tuple[str, str]:
        node = torch._C._current_autograd_node()
        phase = "forward" if node is None else "backward"
        frame = sys._getframe(1)
        while frame is not None:
            site = self._site(frame.f_code.co_filename, frame.f_lineno)
            if site:
                return site, phase
            frame = frame.f_back
        for line in reversed(node.metadata.get("traceback_", []) if node is not None else []):
            match = re.match(r'\s*File "(.+)", line (\d+), in ', line)
            site = match and self._site(match.group(1), int(match.group(2)))
            if site:
                return site, phase
        return "loss", phase

    def _site(self, filename: str, line: int) -> Optional[str]:
        path = Path(filename)
        if path.parent != self.package_dir or path.suffix != ".py":
            return None
        if filename not in self._functions:
            self._functions[filename] = _function_spans(path)
        inside = [(start, name) for start, end, name in self._functions[filename] if start <= line <= end]
        return max(inside)[1] if inside else path.stem


def _function_spans(path: Path) -> list[tuple[int, int, str]]:
    """(first line, last line, qualified name) of every function defined in a Python file."""
    spans = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + child.name
                if not isinstance(child, ast.ClassDef):
                    spans.append((child.lineno, child.end_lineno, name))
                visit(child, name + ".")

    visit(ast.parse(path.read_text()), "")
    return spans


@contextlib.contextmanager
def _autocast_off_on_meta() -> Iterator[None]:
    """cvt_fast's ops ask `torch.is_autocast_enabled(device_type)`, which raises for 'meta';
    autocast is never on here, so answer False for it while counting."""
    original = torch.is_autocast_enabled

    def is_autocast_enabled(*args: Any) -> bool:
        if args and args[0] == "meta":
            return False
        return original(*args)

    torch.is_autocast_enabled = is_autocast_enabled
    try:
        yield
    finally:
        torch.is_autocast_enabled = original


def build_meta_model(model: str, backend: str, num_classes: int = 1000, **kwargs: Any) -> torch.nn.Module:
    """The named CvT (or a MODEL.SPEC mapping) with its parameters on the meta device."""
    import cvt_fast

    with torch.device("meta"):
        if isinstance(model, str):
            return cvt_fast.create_model(model, num_classes=num_classes, backend=backend, **kwargs)
        return cvt_fast.build_model(model, num_classes=num_classes, backend=backend, **kwargs)


def count_step(model: torch.nn.Module, image_size: int, batch: int, mode: str,
               counter: Optional[TrafficCounter] = None) -> dict[str, OpTraffic]:
    """Per-op traffic (whole batch) of one training step or inference forward of a meta-device model."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    images = torch.empty(batch, model.in_chans, image_size, image_size, device="meta")
    counter = counter or TrafficCounter()
    model.train(mode == "train")
    with _autocast_off_on_meta():
        if mode == "train":
            labels = torch.zeros(batch, dtype=torch.long, device="meta")
            with counter:
                loss = torch.nn.functional.cross_entropy(model(images), labels)
                loss.backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad(), counter:
                model(images)
    return dict(counter.ops)


def measure(model: str, image_size: int, batch: int, backend: str, mode: str,
            weights_excluded: bool = False, by_site: bool = False, **model_kwargs: Any) -> dict:
    """One row: per-image bytes by op (MB) and in total, for one model, backend and mode; with
    by_site, also by (site, phase, op)."""
    net = build_meta_model(model, backend, **model_kwargs)
    started = time.perf_counter()
    sites = SiteTracker() if by_site else None
    counter = TrafficCounter(sites)
    with sites or contextlib.nullcontext():
        ops = count_step(net, image_size, batch, mode, counter)
    row = {
        "model": model if isinstance(model, str) else "spec", "image_size": image_size, "batch": batch,
        "backend": backend, "mode": mode,
        "total_mb_per_image": sum(r.total for r in ops.values()) / batch / MB,
        "calls_per_step": sum(r.calls for r in ops.values()),
        "ops": {name: {"calls": r.calls, "read_mb_per_image": r.read / batch / MB,
                       "written_mb_per_image": r.written / batch / MB, "mb_per_image": r.total / batch / MB}
                for name, r in sorted(ops.items(), key=lambda kv: -kv[1].total)},
    }
    if by_site:
        row["sites"] = [{"site": site, "phase": phase, "op": name, "calls": r.calls, "mb_per_image": r.total / batch / MB}
                        for (site, phase, name), r in sorted(counter.by_site.items(), key=lambda kv: -kv[1].total)]
    if weights_excluded and batch > 1:
        single = count_step(net, image_size, 1, mode)
        row["weights_excluded_mb_per_image"] = (sum(r.total for r in ops.values())
                                                - sum(r.total for r in single.values())) / (batch - 1) / MB
    row["count_s"] = time.perf_counter() - started
    return row


def add_ratios(rows: list[dict], baseline: str = "official") -> None:
    """bytes_vs_<baseline>: this row's total / the baseline backend's, same model, size, batch and mode."""
    base = {(r["model"], r["image_size"], r["batch"], r["mode"]): r for r in rows if r["backend"] == baseline}
    for row in rows:
        ref = base.get((row["model"], row["image_size"], row["batch"], row["mode"]))
        if ref is None:
            continue
        row[f"bytes_vs_{baseline}"] = row["total_mb_per_image"] / ref["total_mb_per_image"]
        if "weights_excluded_mb_per_image" in row and "weights_excluded_mb_per_image" in ref:
            row[f"weights_excluded_vs_{baseline}"] = (row["weights_excluded_mb_per_image"]
                                                      / ref["weights_excluded_mb_per_image"])


def markdown(rows: list[dict], backends: Sequence[str]) -> str:
    """Per-op table (MB per image) for each model and mode, backends side by side, largest first."""
    sections = []
    for key in dict.fromkeys((r["model"], r["image_size"], r["batch"], r["mode"]) for r in rows):
        model, size, batch, mode = key
        by_backend = {r["backend"]: r for r in rows if (r["model"], r["image_size"], r["batch"], r["mode"]) == key}
        present = [b for b in backends if b in by_backend]
        names = sorted({n for r in by_backend.values() for n in r["ops"]},
                       key=lambda n: -max(r["ops"].get(n, {}).get("mb_per_image", 0.0) for r in by_backend.values()))
        table = [[name] + [by_backend[b]["ops"].get(name, {}).get("mb_per_image") for b in present] for name in names]
        table.append(["**total**"] + [by_backend[b]["total_mb_per_image"] for b in present])
        if all("bytes_vs_official" in by_backend[b] for b in present):
            table.append(["**vs official**"] + [by_backend[b]["bytes_vs_official"] for b in present])
        if all("weights_excluded_mb_per_image" in by_backend[b] for b in present):
            table.append(["total, weights excluded (large batch)"]
                         + [by_backend[b]["weights_excluded_mb_per_image"] for b in present])
            if all("weights_excluded_vs_official" in by_backend[b] for b in present):
                table.append(["vs official, weights excluded"]
                             + [by_backend[b]["weights_excluded_vs_official"] for b in present])
        table.append(["ops dispatched (whole step)"] + [by_backend[b]["calls_per_step"] for b in present])
        what = "training step (forward + backward)" if mode == "train" else "inference forward"
        sections.append(f"## {model} at {size}x{size}, {what}: MB per image, batch {batch}\n\n"
                        + common.markdown_table(["op"] + list(present), table))
        for backend in present:
            if "sites" in by_backend[backend]:
                sections.append(f"### where the bytes go, backend {backend} ({what}; MB per image, largest "
                                f"first, entries under {SITE_TABLE_FLOOR_MB} MB left out)\n\n"
                                + site_table(by_backend[backend]["sites"]))
    return "\n\n".join(sections)


SITE_TABLE_FLOOR_MB = 0.5


def site_table(sites: list[dict]) -> str:
    rows = [[s["site"], s["phase"], s["op"], s["calls"], s["mb_per_image"]]
            for s in sites if s["mb_per_image"] >= SITE_TABLE_FLOOR_MB]
    return common.markdown_table(["site", "phase", "op", "calls", "MB"], rows)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", default="cvt-13@224", help="NAME@IMAGE_SIZE, comma-separated")
    parser.add_argument("--batch", type=int, default=2, help="images per step (bytes are reported per image)")
    parser.add_argument("--backends", default=",".join(DEFAULT_BACKENDS),
                        help="model backends to count: official, reference (= every fused backend), sdpa")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of train,infer")
    parser.add_argument("--no-weights", action="store_true",
                        help="also count at batch 1 and report the large-batch limit (activations only)")
    parser.add_argument("--by-site", action="store_true",
                        help="also attribute the bytes to the model code that issued each op, forward and backward")
    parser.add_argument("--out", type=Path, default=None,
                        help="results JSON (default bench/results/traffic-<model>-<size>.json; .md beside it)")
    args = parser.parse_args(argv)
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"--modes takes {MODES}, got {mode!r}")
    pairs = common.parse_model_sizes(args.models, [("cvt-13", 224)])
    rows = []
    for model, size in pairs:
        for mode in modes:
            for backend in backends:
                rows.append(measure(model, size, args.batch, backend, mode, weights_excluded=args.no_weights,
                                    by_site=args.by_site))
    add_ratios(rows)
    out = args.out or common.RESULTS_DIR / ("traffic-" + "_".join(f"{m}-{s}" for m, s in pairs) + ".json")
    payload = {
        "benchmark": "traffic", "schema_version": common.SCHEMA_VERSION,
        "environment": {"date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                        "torch": torch.__version__, "command": [sys.executable] + sys.argv},
        "settings": {"models": args.models, "batch": args.batch, "backends": backends, "modes": modes},
        "conventions": CONVENTIONS, "results": rows,
    }
    common.write_json_atomic(out, payload)
    table = markdown(rows, backends)
    out.with_suffix(".md").write_text("# Memory traffic by op (bench/traffic.py)\n\n" + table + "\n")
    print(table)
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
