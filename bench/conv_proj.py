#!/usr/bin/env python
"""Convolutional-projection benchmark: cvt_fast's fused conv_proj against the official path.

For every stage shape of CvT-13/21/W24 (token grid, width, cls row from
cvt_fast.specs.MODEL_SPECS and the image size; batch 256 at 224, 128 at 384 unless
--batch), from the LayerNorm's token output x (B, [1+]H*W, C) to the three projected token
tensors q, k, v (before proj_q/k/v), including BatchNorm:

- cvt_fast-<backend>: the model's fused path (cvt_fast.model.Attention with that backend):
  training runs conv_proj then BatchNorm with batch statistics on the token rows; eval
  folds BatchNorm into the convolution weights and bias (the folding is timed too).
- official: the official code op for op: split the cls row, rearrange tokens to a grid
  ('b (h w) c -> b c h w', a permuted view, so its strides are channels_last), three
  Sequential(depthwise Conv2d, BatchNorm2d), rearrange back, concatenate the cls row;
  under autocast to the run dtype with float32 parameters, as its AMP training runs.
- official-nchw: the same with the grid made NCHW-contiguous first (modules NCHW).
- official-channels_last: modules converted to channels_last and the grid made
  channels_last-contiguous (a copy only when the cls row was split off).
- official-compile: torch.compile of `official` (compilation in the warm-up, not timed).

Modes: eval-fwd (no autograd), eval-fwd+bwd (frozen BatchNorm statistics), train-fwd
(autograd recording, batch statistics), train-fwd+bwd (gradients of x and of every
parameter). The device's memory bandwidth is measured in the same run with a large copy.
"""
from __future__ import annotations

import contextlib
import copy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from cvt_fast.ops.backends import backends_for  # noqa: E402

# cvt_fast's own kernels (the backend table's), then the official path in its variants.
CVT_FAST_BACKENDS = backends_for("conv_proj", kinds=("kernels",))
IMPLEMENTATIONS = (tuple(f"cvt_fast-{b}" for b in CVT_FAST_BACKENDS)
                   + ("official", "official-nchw", "official-channels_last", "official-compile"))
MODES = ("eval-fwd", "eval-fwd+bwd", "train-fwd", "train-fwd+bwd")

CONVENTIONS = {
    "bytes": "minimum device-memory traffic: fwd reads x once and writes q, k, v once; fwd+bwd adds "
             "reading dq, dk, dv and x (for the weight gradients) and writing dx once (parameters, "
             "BatchNorm statistics and weight gradients are negligible and not counted)",
    "fraction_of_copy_bw": "GB/s / the GB/s of a large device-to-device copy (read + write) measured "
                           "in the same run",
    "time": "median over repetitions, CUDA events around each call after warm-up, inputs rotated "
            "over several sets (>= 3x L2); perf_counter on the CPU",
    "speedup_vs_best_peer": "fastest peer time / this time, same shape and mode; peers are the "
                            "official-* implementations",
    "peak_mem_mib": "memory allocated by one call beyond its inputs and parameters (outputs included)",
    "rel_err": "largest ||out - ref|| / ||ref|| over q, k, v; ref = the official path in float32 on a "
               "copy of the same module in the same mode (eval: first two images)",
}


def projection_module(stage: dict, device):
    """The model's own attention module for this stage (only its conv projections are used),
    with BatchNorm parameters and running statistics drawn at random so folding is exercised."""
    import torch
    from cvt_fast.model import Attention

    module = Attention(stage["dim"], stage["dim"], stage["heads"], qkv_bias=True, attn_drop=0.0,
                       proj_drop=0.0, method="dw_bn", kernel_size=stage["kernel"],
                       stride_kv=stage["stride_kv"], stride_q=stage["stride_q"],
                       padding_kv=stage["padding_kv"], padding_q=stage["padding_q"],
                       with_cls_token=bool(stage["has_cls"]))
    with torch.no_grad():
        for conv in (module.conv_proj_q, module.conv_proj_k, module.conv_proj_v):
            conv.bn.weight.uniform_(0.5, 1.5)
            conv.bn.bias.normal_(0.0, 0.1)
            conv.bn.running_mean.normal_(0.0, 0.1)
            conv.bn.running_var.uniform_(0.5, 1.5)
    # proj_q/k/v and proj are not part of this benchmark: drop them to save memory.
    module.proj_q = module.proj_k = module.proj_v = module.proj = None
    return module.to(device)


def projection_parameters(module) -> list:
    return [p for conv in (module.conv_proj_q, module.conv_proj_k, module.conv_proj_v) for p in conv.parameters()]


def official_projection(module, x, height: int, width: int, layout: Optional[str] = None):
    """The official Attention.forward_conv for dw_bn. `layout` None keeps the rearranged view
    (as the official code), 'nchw' / 'channels_last' make the grid contiguous in that format."""
    import torch
    cls_token = None
    if module.with_cls_token:
        cls_token, x = torch.split(x, [1, height * width], 1)
    batch, _, channels = x.shape
    grid = x.view(batch, height, width, channels).permute(0, 3, 1, 2)  # 'b (h w) c -> b c h w'
    if layout == "nchw":
        grid = grid.contiguous()
    elif layout == "channels_last":
        grid = grid.contiguous(memory_format=torch.channels_last)
    outs = []
    for proj in (module.conv_proj_q, module.conv_proj_k, module.conv_proj_v):
        y = proj(grid)
        y = y.permute(0, 2, 3, 1).reshape(batch, -1, channels)  # 'b c h w -> b (h w) c'
        outs.append(torch.cat((cls_token, y), dim=1) if cls_token is not None else y)
    return outs


@dataclass
class ProjectionImpl:
    name: str
    reason: Optional[str]
    peer: bool
    description: str
    # make(module, stage, device, dtype) -> (module it runs, fn(module, x) -> (q, k, v), context factory)
    make: Optional[Callable[..., Any]] = None


def cvt_fast_implementations(device, backends) -> list[ProjectionImpl]:
    """The model's fused projection (cvt_fast.model.Attention._project_fused) with each named
    backend; a backend that cannot run here is listed with the reason."""
    try:
        from cvt_fast.model import Attention
        from cvt_fast.ops.backend import available_backends
        available = available_backends("conv_proj", device)
        fused = getattr(Attention, "_project_fused", None)
        load_error = None if fused is not None else "cvt_fast.model.Attention has no _project_fused path"
    except Exception as error:  # noqa: BLE001
        available, fused, load_error = {}, None, f"cvt_fast not importable: {common.describe_error(error)}"
    impls = []
    for backend in backends:
        reason = load_error or (available[backend] if backend in available
                                else f"not listed by available_backends('conv_proj'): {sorted(available)}")

        def make(module, stage, _backend=backend):
            module.backend = _backend
            return module, lambda m, x: fused(m, x, stage["grid"], stage["grid"]), contextlib.nullcontext
        impls.append(ProjectionImpl(f"cvt_fast-{backend}", reason, False,
                                    f"cvt_fast.model.Attention._project_fused with backend '{backend}' "
                                    "(ops.conv_proj + BatchNorm on token rows; eval: BatchNorm folded)",
                                    make if reason is None else None))
    return impls


def build_implementations(device, dtype) -> list[ProjectionImpl]:
    import torch
    impls = cvt_fast_implementations(device, CVT_FAST_BACKENDS)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype != torch.float32 \
        else contextlib.nullcontext

    def official_maker(layout):
        def make(module, stage):
            if layout == "channels_last":
                module = copy.deepcopy(module).to(memory_format=torch.channels_last)
            return module, lambda m, x: official_projection(m, x, stage["grid"], stage["grid"], layout), autocast
        return make

    impls.append(ProjectionImpl("official", None, True,
                                "official code: rearranged view (channels_last strides), Conv2d+BatchNorm2d x3, "
                                "rearrange back, cat cls; autocast", official_maker(None)))
    impls.append(ProjectionImpl("official-nchw", None, True,
                                "official path with the grid made NCHW-contiguous first; autocast",
                                official_maker("nchw")))
    impls.append(ProjectionImpl("official-channels_last", None, True,
                                "official path, modules and grid in channels_last memory format; autocast",
                                official_maker("channels_last")))

    compile_reason = None if hasattr(torch, "compile") else f"torch {torch.__version__} has no torch.compile"

    def make_compiled(module, stage):
        # dynamic=False: a static graph per shape, as a model of fixed input size gets
        # (automatic dynamic shapes would kick in at the second shape of this run).
        compiled = torch.compile(lambda m, x: official_projection(m, x, stage["grid"], stage["grid"]),
                                 dynamic=False)
        return module, compiled, autocast
    impls.append(ProjectionImpl("official-compile", compile_reason, True,
                                "torch.compile (default mode, dynamic=False) of the official path; compile time excluded",
                                make_compiled if compile_reason is None else None))
    return impls


def projection_shapes(pairs, batch_override: Optional[int], quick: bool) -> list[dict]:
    """Distinct stage shapes (CvT-13 and CvT-21 share theirs)."""
    specs = common.model_specs()
    shapes: dict[tuple, dict] = {}
    for name, image_size in pairs:
        if name not in specs:
            raise ValueError(f"unknown model {name!r}; expected one of {sorted(specs)}")
        batch = batch_override or (2 if quick else common.config_batch(image_size))
        spec = common.tiny_spec(specs[name]) if quick else specs[name]
        for st in common.stage_geometry(spec, image_size):
            if st["method"] != "dw_bn":
                continue
            key = (batch, st["grid"], st["dim"], st["has_cls"], st["kernel"], st["stride_q"], st["stride_kv"],
                   image_size, st["stage"])
            entry = shapes.setdefault(key, {**st, "batch": batch, "image_size": image_size, "models": []})
            entry["models"].append(name)
    for entry in shapes.values():
        short = "/".join(m.replace("cvt-", "") for m in entry["models"])
        tiny = "(tiny)" if quick else ""
        entry["label"] = f"cvt-{short}{tiny}@{entry['image_size']} s{entry['stage']}"
    return list(shapes.values())


def traffic_bytes(stage: dict, mode: str, element_size: int) -> float:
    b, c = stage["batch"], stage["dim"]
    x = b * stage["tokens"] * c
    q = b * stage["nq"] * c
    kv = b * stage["nkv"] * c
    fwd = x + q + 2 * kv
    total = fwd if mode.endswith("fwd") else fwd + (q + 2 * kv) + x + x
    return float(total * element_size)


def measure(impl: ProjectionImpl, base_module, stage: dict, mode: str, sets: list, device, dtype,
            timing_config: common.TimingConfig, cuda_graph: bool = False) -> dict:
    import torch
    module, fn, context = impl.make(base_module, stage)
    training, grad = mode.startswith("train"), mode.endswith("bwd")
    module.train(training)
    params = projection_parameters(module)

    def call(i: int):
        x, grads = sets[i % len(sets)]
        outs = fn(module, x)
        if grad:
            return torch.autograd.grad(outs, [x] + params, grads, allow_unused=True)
        return outs

    autograd_mode = contextlib.nullcontext() if training or grad else torch.no_grad()
    with context(), autograd_mode:
        # First call: the outputs to check, and the warm-up (compilation for official-compile).
        got = [t.detach() for t in fn(module, sets[0][0])]
        timing = common.time_calls(call, device, timing_config, rotation=len(sets),
                                   graph=cuda_graph)
        peak = common.measure_peak_memory(lambda: call(0), device)
    rel_err = compare_with_reference(base_module, stage, training, sets[0][0], got)
    n_bytes = traffic_bytes(stage, mode, torch.empty((), dtype=dtype).element_size())
    seconds = timing.median_ms * 1e-3
    return {"status": "ok", **timing.as_dict(), "gbps": n_bytes / seconds / 1e9, "bytes": n_bytes,
            "peak_mem_mib": peak, "rel_err": rel_err}


def compare_with_reference(module, stage: dict, training: bool, x, got: list) -> float:
    """Largest relative error of q, k, v against the official path in float32 on a copy of the
    module (eval: on the first two images, which the batch does not influence)."""
    import torch
    reference = copy.deepcopy(module).float().train(training)
    n = x.shape[0] if training else min(2, x.shape[0])
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        want = official_projection(reference, x[:n].detach().float(), stage["grid"], stage["grid"])
    errors = []
    for g, w in zip(got, want):
        g, w = g[:n].double(), w.double()
        errors.append(((g - w).norm() / w.norm().clamp_min(1e-30)).item())
    return max(errors)


def make_inputs(stage: dict, mode: str, device, dtype, count: int, seed: int) -> list[tuple]:
    import torch
    gen = torch.Generator(device=device).manual_seed(seed)
    b, c = stage["batch"], stage["dim"]
    grad = mode.endswith("bwd")
    sets = []
    for _ in range(count):
        x = torch.randn(b, stage["tokens"], c, device=device, dtype=dtype, generator=gen)
        x.requires_grad_(grad or mode.startswith("train"))
        grads = None
        if grad:
            grads = tuple(torch.randn(b, n, c, device=device, dtype=dtype, generator=gen)
                          for n in (stage["nq"], stage["nkv"], stage["nkv"]))
        sets.append((x, grads))
    return sets


def tables(rows: list[dict], names: list[str], bandwidth: dict) -> str:
    detail = common.markdown_table(
        ["shape", "B", "grid", "C", "cls", "mode", "implementation", "ms", "GB/s", "of copy BW",
         "vs best peer", "peak MiB", "rel err", "note"],
        [[r["label"], r["batch"], r["grid"], r["dim"], r["has_cls"], r["mode"], r["impl"], r.get("time_ms"),
          r.get("gbps"), r.get("fraction_of_copy_bw"), r.get("speedup_vs_best_peer"), r.get("peak_mem_mib"),
          r.get("rel_err"), common.status_note(r)] for r in rows])
    cells: dict[tuple, dict[str, str]] = {}
    for r in rows:
        if r.get("status") == "ok":
            text = common.fmt(r["time_ms"])
            if r["impl"].startswith("cvt_fast") and r.get("speedup_vs_best_peer"):
                text += f" ({common.fmt(r['speedup_vs_best_peer'])}x)"
        else:
            text = r.get("status", "?")
        cells.setdefault((r["label"], r["mode"]), {})[r["impl"]] = text
    pivot = common.markdown_table(["shape", "mode"] + names,
                                  [[label, mode] + [c.get(n, "") for n in names]
                                   for (label, mode), c in cells.items()])
    return (f"Measured copy bandwidth: {common.fmt(bandwidth.get('gbps'))} GB/s (read + write).\n\n"
            "## Every measurement\n\n" + detail +
            "\n\n## Median ms per implementation (cvt_fast: speedup vs best peer)\n\n" + pivot)


def main(argv: Optional[list[str]] = None) -> int:
    parser = common.base_parser(__doc__.splitlines()[0])
    common.add_shape_arguments(parser, MODES, default_modes="", modes_note=" (default: all; --quick: eval-fwd,train-fwd+bwd)")
    args = parser.parse_args(argv)
    if not args.modes:
        args.modes = "eval-fwd,train-fwd+bwd" if args.quick else ",".join(MODES)
    setup = common.prologue(args, MODES, IMPLEMENTATIONS)
    device, dtype, modes, wanted, pairs = setup.device, setup.dtype, setup.modes, setup.wanted, setup.pairs
    timing_config, deadline, cuda_graph = setup.timing, setup.deadline, setup.cuda_graph
    import torch

    # --quick: a narrow CvT-13 (widths 32/64/128, common.tiny_spec) on 32x32 images.
    shapes = common.select_stages(projection_shapes(pairs, args.batch, args.quick), args.stages, pairs)
    # Each shape and mode compiles anew; the default limit (8) would fall back to eager.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)

    run = common.BenchRun("conv_proj", args, device, settings={
        "dtype": args.dtype, "models": [f"{m}@{s}" for m, s in pairs], "modes": modes, "quick": args.quick,
        "cuda_graph": cuda_graph, "timing": vars(timing_config), "shapes": shapes,
    }, conventions=CONVENTIONS)
    bandwidth = common.run_guarded(lambda: common.measure_copy_bandwidth(device, timing_config, args.quick),
                                   device)
    run.payload["copy_bandwidth"] = bandwidth
    print(f"copy bandwidth: {common.fmt(bandwidth.get('gbps'))} GB/s {bandwidth.get('error', '')}", flush=True)

    impls = [i for i in build_implementations(device, dtype) if wanted(i.name)]
    for impl in impls:
        run.add_implementation(impl.name, impl.make is not None, impl.reason, impl.description, impl.peer)
    peers = {i.name for i in impls if i.peer}
    element_size = torch.empty((), dtype=dtype).element_size()

    # Eager implementations first at every shape, then the compiled ones: under a time budget,
    # compilation (seconds to minutes per shape and mode) must not crowd out the main figures.
    passes = [[i for i in impls if "compile" not in i.name], [i for i in impls if "compile" in i.name]]
    try:
        for group in (g for g in passes if g):
            for stage in shapes:
                torch.manual_seed(args.seed)
                torch._dynamo.reset()  # compiled graphs of the last shape hold memory
                module = common.run_guarded(lambda: {"module": projection_module(stage, device)}, device)
                for mode in modes:
                    base = {key: stage[key] for key in ("label", "image_size", "stage", "batch", "grid", "tokens", "nq",
                                                        "nkv", "dim", "has_cls")}
                    base.update(models=stage["models"], mode=mode, dtype=args.dtype)
                    sets = None
                    for impl in group:
                        row = {**base, "impl": impl.name}
                        if impl.make is None:
                            run.add({**row, "status": "unavailable", "reason": impl.reason})
                            continue
                        skip = common.quick_skip_reason(impl.name, args)
                        if skip:
                            run.add({**row, "status": "skipped", "reason": skip})
                            continue
                        if "module" not in module:
                            run.add({**row, **module})
                            continue
                        if deadline.skip_reason():
                            run.add({**row, "status": "skipped", "reason": deadline.skip_reason()})
                            continue
                        if sets is None:
                            count = common.rotation_count(int(traffic_bytes(stage, mode, element_size)), device)
                            made = common.run_guarded(lambda: {"sets": make_inputs(
                                stage, mode, device, dtype, count, args.seed)}, device)
                            if "sets" not in made:
                                run.add({**row, **made})
                                continue
                            sets = made["sets"]
                        result = common.run_guarded(lambda: measure(
                            impl, module["module"], stage, mode, sets, device, dtype, timing_config, cuda_graph),
                            device)
                        if result.get("gbps") and bandwidth.get("gbps"):
                            result["fraction_of_copy_bw"] = result["gbps"] / bandwidth["gbps"]
                        deadline.note(run.add({**row, **result}))
                        print(f"{stage['label']:>22} {mode:>13} {impl.name:>22}: "
                              f"{common.fmt(result.get('time_ms'))} ms {result.get('error', '')}", flush=True)
                    sets = None
                    common.free_memory(device)
                module = None
                common.free_memory(device)
        run.payload["complete"] = True
    except KeyboardInterrupt:
        run.payload["interrupted"] = True
        print("interrupted: writing what was measured", flush=True)

    common.add_speedups(run.rows, ("label", "mode"), peers)
    names = [i.name for i in impls]
    panels = []
    for mode in modes:
        ok = [r for r in run.rows if r["mode"] == mode]
        groups = list(dict.fromkeys(r["label"] for r in ok))
        series = {n: [next((r.get("gbps") for r in ok if r["label"] == g and r["impl"] == n
                            and r.get("status") == "ok"), None) for g in groups] for n in names}
        panels.append({"title": f"conv projection {mode}, {args.dtype} (copy: {common.fmt(bandwidth.get('gbps'))} GB/s)",
                       "ylabel": "GB/s (minimum traffic)", "groups": groups,
                       "series": {n: v for n, v in series.items() if any(x is not None for x in v)}})
    labels = [st["label"] for st in shapes]
    ordered = sorted(run.rows, key=lambda r: (labels.index(r["label"]), modes.index(r["mode"]), names.index(r["impl"])))
    run.finish(tables(ordered, names, bandwidth), panels, "CvT convolutional projection")
    return 0


if __name__ == "__main__":
    sys.exit(main())
