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

    python bench/conv_proj.py                 # GPU: all models; CPU: CvT-13 at batch 4, a minute or two
    python bench/conv_proj.py --full          # the published shapes on any device
    python bench/conv_proj.py --quick --device cpu   # smoke run
"""
from __future__ import annotations

import contextlib
import copy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common, plan  # noqa: E402
from cvt_fast.ops.backends import backends_for  # noqa: E402

# cvt_fast's own kernels (the backend table's), then the official path in its variants.
CVT_FAST_BACKENDS = backends_for("conv_proj", kinds=("kernels",))
IMPLEMENTATIONS = (tuple(f"cvt_fast-{b}" for b in CVT_FAST_BACKENDS)
                   + ("official", "official-nchw", "official-channels_last", "official-compile"))
MODES = ("eval-fwd", "eval-fwd+bwd", "train-fwd", "train-fwd+bwd")
# The CPU-sized plan's batch: CvT-13's stage shapes in every mode in a minute or two on two cores.
CPU_BATCH = 4

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
    interpreted: bool = False  # GPU kernels run by an interpreter here (times are the interpreter's)
    compiled: bool = False     # torch.compile: compiling is part of its first call


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
                                    make if reason is None else None,
                                    interpreted=plan.runs_interpreted(backend, device)))
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
                                make_compiled if compile_reason is None else None, compiled=True))
    return impls


def projection_shapes(pairs, batch_override: Optional[int], quick: bool) -> list[dict]:
    """Distinct stage shapes with dw_bn projections (CvT-13 and CvT-21 share theirs); --quick:
    the narrow common.tiny_spec of each model."""
    shapes = common.distinct_stage_shapes(pairs, batch_override, quick, (
        "stage", "grid", "dim", "has_cls", "kernel", "stride_q", "stride_kv"), tiny=quick)
    return [shape for shape in shapes if shape["method"] == "dw_bn"]


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
    pivot = common.pivot_table(rows, names, "time_ms", "shape")
    return (f"Measured copy bandwidth: {common.fmt(bandwidth.get('gbps'))} GB/s (read + write).\n\n"
            "## Every measurement\n\n" + detail +
            "\n\n## Median ms per implementation (cvt_fast: speedup vs best peer)\n\n" + pivot)


def plan_steps(shapes: list[dict], modes: list[str], impls: list[ProjectionImpl], left_out: dict[str, str],
               dtype_name: str, element_size: int) -> list[plan.Step]:
    """Every (shape, mode, implementation), in measuring order: the eager implementations at
    every shape first, then the compiled ones (under a time budget, compilation, seconds to
    minutes per shape and mode, must not crowd out the main figures); work = the bytes moved."""
    steps = []
    passes = [[i for i in impls if not i.compiled], [i for i in impls if i.compiled]]
    for number, group in enumerate(g for g in passes if g):
        for stage in shapes:
            for mode in modes:
                base = {key: stage[key] for key in ("label", "image_size", "stage", "batch", "grid", "tokens", "nq",
                                                    "nkv", "dim", "has_cls")}
                base.update(models=stage["models"], mode=mode, dtype=dtype_name)
                for impl in group:
                    unmeasured = (("unavailable", impl.reason) if impl.make is None
                                  else ("skipped", left_out[impl.name]) if impl.name in left_out else None)
                    steps.append(plan.Step(impl.name, {**base, "impl": impl.name},
                                           work=traffic_bytes(stage, mode, element_size), unmeasured=unmeasured,
                                           context=(impl, stage, mode, number)))
    return steps


def main(argv: Optional[list[str]] = None) -> int:
    parser = common.base_parser(__doc__.splitlines()[0])
    plan.add_plan_arguments(parser)
    common.add_shape_arguments(parser, MODES, default_modes="", modes_note=" (default: all; --quick: eval-fwd,train-fwd+bwd)")
    args = parser.parse_args(argv)
    if not args.modes:
        args.modes = "eval-fwd,train-fwd+bwd" if args.quick else ",".join(MODES)
    setup = common.prologue(args, MODES, IMPLEMENTATIONS, cpu_batch=CPU_BATCH)
    device, dtype, modes = setup.device, setup.dtype, setup.modes
    import torch

    # --quick: a narrow CvT-13 (widths 32/64/128, common.tiny_spec) on 32x32 images.
    shapes = common.select_stages(projection_shapes(setup.pairs, setup.batch, args.quick), args.stages, setup.pairs)
    impls = [i for i in build_implementations(device, dtype) if setup.wanted(i.name)]
    left_out = {i.name: reason for i in impls if i.make is not None
                and (reason := plan.left_out_reason(i.name, setup.size, device, args, interpreted=i.interpreted,
                                                    compiled=i.compiled))}
    element_size = torch.empty((), dtype=dtype).element_size()
    steps = plan_steps(shapes, modes, impls, left_out, args.dtype, element_size)
    measured = [i for i in impls if i.make is not None and i.name not in left_out]
    for line in plan.header(
            "conv_proj", "the q/k/v convolutional projection with BatchNorm (tokens -> q, k, v), "
            + ", ".join(modes), setup,
            shapes=[f"{s['label']}: B={s['batch']}, grid {s['grid']}x{s['grid']}, C={s['dim']}"
                    + (", cls row" if s["has_cls"] else "") for s in shapes],
            measured=[i.name for i in measured], left_out=left_out,
            unavailable={i.name: i.reason for i in impls if i.make is None}, steps=steps,
            calls=plan.timed_calls(setup, "the official path in float32"),
            notes=[f"{i.name} {plan.INTERPRETED_NOTE}" for i in measured if i.interpreted]
            + ["first, the device's copy bandwidth (the ceiling the GB/s column is held against)"],
            uncounted=[i.name for i in measured if i.interpreted or i.compiled]):
        print(line, flush=True)
    if args.dry_run:
        return 0
    # Each shape and mode compiles anew; the default limit (8) would fall back to eager.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)

    run = common.BenchRun("conv_proj", args, device, settings={
        "dtype": args.dtype, "models": [f"{m}@{s}" for m, s in setup.pairs], "modes": modes, "plan": setup.size,
        "quick": args.quick, "cuda_graph": setup.cuda_graph, "timing": vars(setup.timing), "shapes": shapes,
    }, conventions=CONVENTIONS)
    bandwidth = common.run_guarded(lambda: common.measure_copy_bandwidth(device, setup.timing, args.quick),
                                   device)
    run.payload["copy_bandwidth"] = bandwidth
    print(f"copy bandwidth: {common.fmt(bandwidth.get('gbps'))} GB/s {bandwidth.get('error', '')}", flush=True)
    for impl in impls:
        run.add_implementation(impl.name, impl.make is not None, impl.reason, impl.description, impl.peer)

    modules, inputs = common.Latest(device), common.Latest(device)

    def new_module(stage: dict):
        torch.manual_seed(args.seed)
        torch._dynamo.reset()  # compiled graphs of the last shape hold memory
        return projection_module(stage, device)

    def measure_step(step: plan.Step) -> dict:
        impl, stage, mode, number = step.context
        module = modules.get((number, stage["label"]), lambda: new_module(stage))

        def make() -> list[tuple]:
            count = common.rotation_count(int(traffic_bytes(stage, mode, element_size)), device)
            return make_inputs(stage, mode, device, dtype, count, args.seed)
        sets = inputs.get((number, stage["label"], mode), make)
        result = measure(impl, module, stage, mode, sets, device, dtype, setup.timing, setup.cuda_graph)
        if result.get("gbps") and bandwidth.get("gbps"):
            result["fraction_of_copy_bw"] = result["gbps"] / bandwidth["gbps"]
        return result

    def result_line(step: plan.Step, result: dict) -> str:
        impl, stage, mode, _ = step.context
        return (f"{stage['label']:>22} {mode:>13} {impl.name:>22}: "
                f"{common.fmt(result.get('time_ms'))} ms {result.get('error', '')}")

    plan.run_steps(run, steps, setup, measure_step, result_line)
    inputs.clear()
    modules.clear()

    common.add_speedups(run.rows, ("label", "mode"), {i.name for i in impls if i.peer})
    names = [i.name for i in impls]
    copy_gbps = common.fmt(bandwidth.get("gbps"))
    panels = common.mode_panels(run.rows, modes, names, "gbps",
                                lambda mode: f"conv projection {mode}, {args.dtype} (copy: {copy_gbps} GB/s)",
                                "GB/s (minimum traffic)")
    labels = [st["label"] for st in shapes]
    ordered = sorted(run.rows, key=lambda r: (labels.index(r["label"]), modes.index(r["mode"]), names.index(r["impl"])))
    run.finish(tables(ordered, names, bandwidth), panels, "CvT convolutional projection")
    return 0


if __name__ == "__main__":
    sys.exit(main())
