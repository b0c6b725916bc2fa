#!/usr/bin/env python
"""Whole-model benchmark: training and inference images/s of CvT-13/21/W24, every implementation.

Training step = forward under autocast, cross-entropy, backward, AdamW step, zero_grad (the
official recipe's loop without data loading: images and labels are random tensors already on
the device). Inference = forward under autocast in inference mode. Batch = the official
configs' (256 at 224, 128 at 384) unless --batch. Implementations:

- official / official-compile: cvt_fast's model with backend 'official' (the official code's
  eager ops: einsum attention, Conv2d + BatchNorm2d with rearranges), and torch.compile of it;
- hf: Hugging Face transformers CvtForImageClassification, random init, CvtConfig from the spec;
- cvt_fast-<backend> / cvt_fast-<backend>-compile: the same model with its conv projection and
  attention through cvt_fast.ops (triton, cuda, sdpa, xformers), eager and under torch.compile.

Peak memory is the largest allocation over the timed steps (parameters, gradients, optimizer
state and activations). --find-max-batch also searches the largest batch that fits.

    python bench/model.py                     # GPU: CvT-13/21/W24; CPU: CvT-13 at 224, batch 2, a couple of minutes
    python bench/model.py --full              # the published plan on any device
    python bench/model.py --quick --device cpu   # smoke run (a narrow CvT-13 on 32x32 images)
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common, plan  # noqa: E402
from cvt_fast.ops.backends import TABLE  # noqa: E402

# Every backend of the fused ops but the reference (the backend table's): kernels and peers.
FUSED_BACKENDS = tuple(name for name, record in TABLE.items() if record.kind != "reference")
# The default set (others: cvt_fast-reference/-auto and hf-compile, through --only).
IMPLEMENTATIONS = (("official", "hf") + tuple(f"cvt_fast-{b}" for b in FUSED_BACKENDS)
                   + ("official-compile",) + tuple(f"cvt_fast-{b}-compile" for b in FUSED_BACKENDS))
MODES = ("train", "infer")
# The CPU-sized plan: CvT-13 at 224 (real shapes) at this batch, two timed steps per mode.
CPU_BATCH = 2
CPU_TIMED_STEPS = 2

CONVENTIONS = {
    "images_per_s": "batch / median step time; steps timed with CUDA events after warm-up steps "
                    "(perf_counter on the CPU)",
    "first_step_s": "wall time of the first step of the mode (includes compilation for *-compile)",
    "peak_mem_gib": "largest allocated memory during the timed steps (parameters, gradients, "
                    "optimizer state, activations)",
    "speedup_vs_best_peer": "this images/s / the fastest peer's (official, official-compile, hf) at the "
                            "same model and mode",
    "speedup_vs_official": "the official eager model's step time / this one's, same model, mode and batch",
    "peak_mem_vs_official": "this peak_mem_gib / the official eager model's, same model, mode and batch",
    "logits_rel_err_vs_official": "||logits - official logits|| / ||official logits||, eval mode, same "
                                  "weights, first 8 images of the first batch, from the first inference "
                                  "call (before any training step); not for hf (other weights)",
    "max_batch": "largest batch for which two steps ran without running out of memory; the search "
                 "doubles from the config batch, then bisects to --max-batch-granularity",
}


@dataclass
class ModelImpl:
    name: str
    reason: Optional[str]
    peer: bool
    description: str
    kind: str                 # 'cvt_fast' | 'hf'
    backend: Optional[str]    # model backend for kind 'cvt_fast'
    compile: bool


def build_implementations(device) -> list[ModelImpl]:
    import torch
    compile_reason = None if hasattr(torch, "compile") else f"torch {torch.__version__} has no torch.compile"
    impls = [
        ModelImpl("official", None, True, "cvt_fast model, backend 'official' (official eager ops)",
                  "cvt_fast", "official", False),
        ModelImpl("official-compile", compile_reason, True, "torch.compile of the official-backend model",
                  "cvt_fast", "official", True),
    ]
    try:
        import transformers
        transformers.CvtForImageClassification  # noqa: B018 - fails here if this version lacks CvT
        hf_reason = None
        hf_version = transformers.__version__
    except Exception as error:  # noqa: BLE001
        hf_reason, hf_version = f"transformers not usable: {common.describe_error(error)}", None
    impls.append(ModelImpl("hf", hf_reason, True, f"transformers {hf_version} CvtForImageClassification, random init",
                           "hf", None, False))
    impls.append(ModelImpl("hf-compile", hf_reason or compile_reason, True,
                           "torch.compile of the Hugging Face model", "hf", None, True))

    try:
        from cvt_fast.ops.backend import available_backends
        attention = available_backends("attention", device)
        projection = available_backends("conv_proj", device)
        load_error = None
    except Exception as error:  # noqa: BLE001
        attention, projection = {}, {}
        load_error = f"cvt_fast.ops not importable: {common.describe_error(error)}"
    for backend in ("reference", "auto") + FUSED_BACKENDS:
        reason = load_error
        if reason is None:
            reasons = [_reason(attention, backend, "attention")]
            # An attention-only backend (sdpa, xformers) leaves the model's projection to 'auto'.
            if backend == "auto" or "conv_proj" in TABLE[backend].ops:
                reasons.append(_reason(projection, backend, "conv_proj"))
            reason = "; ".join(r for r in reasons if r) or None
        for compiled in (False, True):
            impls.append(ModelImpl(
                f"cvt_fast-{backend}{'-compile' if compiled else ''}", reason or (compile_reason if compiled else None),
                False, f"cvt_fast model, backend '{backend}'" + (", torch.compile" if compiled else ""),
                "cvt_fast", backend, compiled))
    return impls


def _reason(table: dict, backend: str, op: str) -> Optional[str]:
    if backend not in table:
        return f"{op}: backend {backend!r} is unknown to cvt_fast.ops.backend ({sorted(table)})"
    return None if table[backend] is None else f"{op}: {table[backend]}"


def model_spec(name: str, quick: bool) -> dict:
    spec = common.model_specs()[name]
    return common.tiny_spec(spec) if quick else dict(spec)


def build_model(impl: ModelImpl, spec: dict, device, seed: int):
    """(module, forward(x) -> logits); same seed, so every cvt_fast variant has the same weights."""
    import torch
    torch.manual_seed(seed)
    if impl.kind == "hf":
        from transformers import CvtForImageClassification
        try:
            from cvt_fast.hf_convert import hf_config_from_spec
            config = hf_config_from_spec(spec, num_classes=1000)
        except ImportError:
            config = _hf_config(spec)
        module = CvtForImageClassification(config).to(device)

        def forward(x):
            return module(pixel_values=x).logits
    else:
        from cvt_fast.model import build_model as build
        module = build(spec, num_classes=1000, backend=impl.backend).to(device)
        forward = module
    if impl.compile:
        # dynamic=False: static graphs, as a run at one image size gets (automatic dynamic
        # shapes would otherwise start at the second model or batch size of this process).
        compiled = torch.compile(module, dynamic=False)
        forward = (lambda x: compiled(pixel_values=x).logits) if impl.kind == "hf" else compiled
    return module, forward


def _hf_config(spec: dict):
    """CvtConfig from an official spec, for a cvt_fast without hf_convert."""
    from transformers import CvtConfig
    n = int(spec["NUM_STAGES"])
    keys = {"patch_sizes": "PATCH_SIZE", "patch_stride": "PATCH_STRIDE", "patch_padding": "PATCH_PADDING",
            "embed_dim": "DIM_EMBED", "num_heads": "NUM_HEADS", "depth": "DEPTH", "mlp_ratio": "MLP_RATIO",
            "attention_drop_rate": "ATTN_DROP_RATE", "drop_rate": "DROP_RATE", "drop_path_rate": "DROP_PATH_RATE",
            "qkv_bias": "QKV_BIAS", "cls_token": "CLS_TOKEN", "qkv_projection_method": "QKV_PROJ_METHOD",
            "kernel_qkv": "KERNEL_QKV", "padding_q": "PADDING_Q", "padding_kv": "PADDING_KV",
            "stride_q": "STRIDE_Q", "stride_kv": "STRIDE_KV"}
    values = {hf: [common._per_stage(spec[key], i) for i in range(n)] for hf, key in keys.items() if key in spec}
    return CvtConfig(num_channels=3, layer_norm_eps=1e-5, num_labels=1000, **values)


def make_batches(batch: int, image_size: int, device, count: int, seed: int) -> list[tuple]:
    import torch
    gen = torch.Generator(device=device).manual_seed(seed)
    return [(torch.randn(batch, 3, image_size, image_size, device=device, generator=gen),
             torch.randint(0, 1000, (batch,), device=device, generator=gen)) for _ in range(count)]


def autocast_for(device, dtype):
    import torch
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def train_step_fn(module, forward, optimizer, batches, device, dtype) -> Callable[[int], Any]:
    import torch.nn.functional as F
    module.train()

    def step(i: int):
        images, labels = batches[i % len(batches)]
        with autocast_for(device, dtype):
            logits = forward(images)
            loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def infer_step_fn(module, forward, batches, device, dtype) -> Callable[[int], Any]:
    import torch
    module.eval()

    def step(i: int):
        images, _ = batches[i % len(batches)]
        with torch.inference_mode(), autocast_for(device, dtype):
            return forward(images)
    return step


def first_call(step: Callable[[int], Any], device) -> tuple[Any, float]:
    common.synchronize(device)
    start = time.perf_counter()
    result = step(0)
    common.synchronize(device)
    return result, time.perf_counter() - start


def timed(step, device, timing_config, batch: int, rotation: int) -> dict:
    import torch
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timing = common.time_calls(step, device, timing_config, rotation=rotation)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"status": "ok", **timing.as_dict(), "images_per_s": batch / (timing.median_ms * 1e-3),
            "peak_mem_gib": peak}


def search_max_batch(fits: Callable[[int], bool], start: int, limit: int, granularity: int) -> tuple[int, list]:
    """Largest batch b <= limit with fits(b), assuming fitting is monotone in b. Doubles from
    `start` until a failure (or the limit), halves when `start` already fails, then bisects
    until the gap between fitting and failing is at most `granularity`. Returns (best, probes);
    best is 0 when not even batch 1 fits."""
    if start < 1 or limit < 1 or granularity < 1:
        raise ValueError(f"start, limit and granularity must be >= 1, got {start}, {limit}, {granularity}")
    probes: list[tuple[int, bool]] = []

    def probe(b: int) -> bool:
        ok = fits(b)
        probes.append((b, ok))
        return ok

    best, failed = 0, None
    b = min(start, limit)
    while True:
        if probe(b):
            best = b
            if b >= limit:
                return best, probes
            b = min(2 * b, limit)
        else:
            failed = b
            break
    while best == 0 and failed > 1:
        b = failed // 2
        if probe(b):
            best = b
        else:
            failed = b
    if best == 0:
        return 0, probes
    while failed - best > granularity:
        mid = (best + failed) // 2
        if probe(mid):
            best = mid
        else:
            failed = mid
    return best, probes


@dataclass
class ModelUnderTest:
    """One implementation's model, built once for all its modes at one model and image size."""
    module: Any
    forward: Callable
    batches: list
    optimizer: Any
    want: Any                 # the official model's logits to check against (cvt_fast models), or None
    check: dict               # logits_rel_err_vs_official (or the check's error), added to every row

    def record_check(self, logits) -> None:
        got = logits[: self.want.shape[0]].float().cpu()
        self.check["logits_rel_err_vs_official"] = ((got - self.want).norm()
                                                    / self.want.norm().clamp_min(1e-30)).item()


def prepare_model(impl: ModelImpl, image_size: int, spec: dict, batch: int, modes: list[str], device, dtype,
                  seed: int, want) -> ModelUnderTest:
    """Build the model, its batches and optimizer. The logits check runs before any training step
    changes the weights: inference runs first and its first call is checked; without inference,
    an eval-mode forward here is."""
    import torch
    module, forward = build_model(impl, spec, device, seed)
    batches = make_batches(batch, image_size, device, 2, seed)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, weight_decay=0.05) if "train" in modes else None
    state = ModelUnderTest(module, forward, batches, optimizer, want if impl.kind == "cvt_fast" else None, {})
    if state.want is not None and "infer" not in modes:
        failed = common.run_guarded(
            lambda: state.record_check(infer_step_fn(module, forward, batches, device, dtype)(0)) or {}, device)
        if "error" in failed:
            state.check["logits_check_error"] = failed["error"]
    return state


def measure_mode(state: ModelUnderTest, mode: str, batch: int, device, dtype, timing_config) -> dict:
    """One mode's row: the first step alone (compilation shows there), then the timed steps."""
    import torch
    step = (train_step_fn(state.module, state.forward, state.optimizer, state.batches, device, dtype)
            if mode == "train" else infer_step_fn(state.module, state.forward, state.batches, device, dtype))
    result, first_s = first_call(step, device)
    if not torch.isfinite(result.float()).all():
        raise FloatingPointError(f"{mode} step produced a non-finite {'loss' if mode == 'train' else 'output'}")
    if mode == "infer" and state.want is not None:
        state.record_check(result)
    return {**timed(step, device, timing_config, batch, rotation=len(state.batches)), "first_step_s": first_s,
            **state.check}


def measure_max_batch(state: ModelUnderTest, mode: str, image_size: int, batch: int, device, dtype,
                      args) -> dict:
    """The largest batch for which two steps run without running out of memory."""
    def fits(b: int) -> bool:
        def attempt() -> dict:
            trial = make_batches(b, image_size, device, 1, args.seed)
            step = (train_step_fn(state.module, state.forward, state.optimizer, trial, device, dtype)
                    if mode == "train" else infer_step_fn(state.module, state.forward, trial, device, dtype))
            step(0)
            step(1)
            common.synchronize(device)
            return {"status": "ok"}
        outcome = common.run_guarded(attempt, device)
        if outcome["status"] == "ok":
            return True
        if outcome["status"] == "oom":
            return False
        raise RuntimeError(outcome["error"])
    best, probes = search_max_batch(fits, batch, args.max_batch_limit, args.max_batch_granularity)
    row = {"status": "ok", "max_batch": best, "probes": probes}
    if best >= args.max_batch_limit:
        row["note"] = f"reached --max-batch-limit {args.max_batch_limit}"
    return row


def reference_logits_for(spec: dict, image_size: int, batch: int, device, dtype, seed: int, n: int) -> dict:
    """Eval-mode logits of the official-backend model on the first n images of the first
    benchmark batch (make_batches with the same seed draws the same images)."""
    import torch
    official = ModelImpl("official", None, True, "", "cvt_fast", "official", False)
    module, forward = build_model(official, spec, device, seed)
    images = make_batches(batch, image_size, device, 1, seed)[0][0][:n]
    module.eval()
    with torch.inference_mode(), autocast_for(device, dtype):
        logits = forward(images).float().cpu()
    return {"logits": logits}


def tables(rows: list[dict], names: list[str]) -> str:
    detail = common.markdown_table(
        ["model", "image", "B", "mode", "implementation", "images/s", "ms/step", "vs best peer", "vs official",
         "peak GiB", "mem vs official", "first step s", "logits err", "max batch", "note"],
        [[r["model"], r["image_size"], r["batch"], r["mode"], r["impl"], r.get("images_per_s"), r.get("time_ms"),
          r.get("speedup_vs_best_peer"), r.get("speedup_vs_official"), r.get("peak_mem_gib"),
          r.get("peak_mem_vs_official"), r.get("first_step_s"),
          r.get("logits_rel_err_vs_official"), r.get("max_batch"), common.status_note(r) or r.get("note", "")]
         for r in rows])
    pivot = common.pivot_table([r for r in rows if r["mode"] in MODES], names, "images_per_s", "model",
                               group=lambda r: f"{r['model']}@{r['image_size']} B={r['batch']}")
    return ("## Every measurement\n\n" + detail + "\n\n## Images/s per implementation "
            "(cvt_fast: speedup vs best peer)\n\n" + pivot)


def plan_steps(pairs, impls: list[ModelImpl], modes: list[str], left_out: dict[str, str], args,
               batch_for: Callable[[int], int]) -> list[plan.Step]:
    """Every (model, implementation, mode), in measuring order: the eager implementations for
    every model first, then the compiled ones (under a time budget, compilation, a minute or
    more per model, must not crowd out the main figures); inference before training (the logits
    check needs the untrained weights), then the max-batch searches. work = the step's
    multiply-accumulates (training: 3x inference)."""
    from cvt_fast.flops import count_flops

    timed_modes = sorted(modes, key=("infer", "train").index)
    searches = [f"{m}-max-batch" for m in modes] if args.find_max_batch else []
    steps = []
    for group in ([i for i in impls if not i.compile], [i for i in impls if i.compile]):
        for name, image_size in pairs:
            spec = model_spec(name, args.quick)
            batch = batch_for(image_size)
            macs = float(count_flops(spec, image_size)) * batch
            base = {"model": name + ("(tiny)" if args.quick else ""), "image_size": image_size, "batch": batch,
                    "dtype": args.dtype}
            for impl in group:
                unmeasured = (("unavailable", impl.reason) if impl.reason is not None
                              else ("skipped", left_out[impl.name]) if impl.name in left_out else None)
                for mode in timed_modes + searches:
                    work = macs * (3.0 if mode.startswith("train") else 1.0) * (4.0 if "max-batch" in mode else 1.0)
                    steps.append(plan.Step(impl.name, {"impl": impl.name, **base, "mode": mode}, work=work,
                                           unmeasured=unmeasured, context=(impl, name, image_size, spec, batch, mode)))
    return steps


def main(argv: Optional[list[str]] = None) -> int:
    parser = common.base_parser(__doc__.splitlines()[0])
    plan.add_plan_arguments(parser)
    common.add_shape_arguments(parser, MODES, stages=False,
                               models_note="; --only also takes NAME (its default sizes) or NAME@IMAGE_SIZE entries")
    parser.add_argument("--find-max-batch", action="store_true",
                        help="also search the largest batch that fits, per model, implementation and mode")
    parser.add_argument("--max-batch-limit", type=int, default=None,
                        help="upper end of the max-batch search (default 4096; --quick: 8)")
    parser.add_argument("--max-batch-granularity", type=int, default=None,
                        help="stop bisecting when fitting and failing batches are this close (default 8; --quick: 1)")
    args = parser.parse_args(argv)
    if args.max_batch_limit is None:
        args.max_batch_limit = 8 if args.quick else 4096
    if args.max_batch_granularity is None:
        args.max_batch_granularity = 1 if args.quick else 8

    # --only is checked below: it may also name models.
    # --quick: a narrow CvT-13 (widths 32/64/128, depths 1/2/3, common.tiny_spec) on 32x32 images.
    setup = common.prologue(args, MODES, implementations=None, cpu_batch=CPU_BATCH)
    device, dtype, modes, pairs = setup.device, setup.dtype, setup.modes, setup.pairs
    import torch

    all_impls = build_implementations(device)
    # --only may also name models ('cvt-w24' or 'cvt-13@384'), as a shorthand for --models.
    specs = common.model_specs()
    only_models = [t.strip() for t in (args.only or "").split(",")
                   if t.strip() and (t.strip() in specs or "@" in t)]
    args.only = ",".join(t.strip() for t in (args.only or "").split(",")
                         if t.strip() and t.strip() not in only_models) or None
    common.check_only_patterns(args.only, [i.name for i in all_impls])
    # The others (cvt_fast-reference/-auto, hf-compile) run only when --only names them.
    wanted = common.selector(args.only) if args.only else (lambda name: name in IMPLEMENTATIONS)
    if only_models:
        sized = common.parse_model_sizes(",".join(m for m in only_models if "@" in m), [])
        pairs = [p for p in pairs if p[0] in only_models] + sized
        pairs = list(dict.fromkeys(pairs))
        if not pairs:
            raise ValueError(f"--only names models {only_models}, but none of them is among the models to run")
    for name, _ in pairs:
        if name not in specs:
            raise ValueError(f"unknown model {name!r}; expected one of {sorted(specs)}")

    timing_config = setup.timing
    # A step is long (up to seconds for CvT-W24): fewer repetitions than for kernels, at least
    # 6 timed steps on a GPU after the first step and 2 + 2 warm-up steps.
    timing_config.min_warmup, timing_config.probe, timing_config.min_reps, timing_config.max_reps = 2, 2, 6, 50
    timing_config.rep_ms = args.rep_ms if args.rep_ms is not None else (20.0 if args.quick else 2000.0)
    if args.quick:
        timing_config.cpu_reps = 1  # a smoke run: the first (checked) step plus one timed step
    elif setup.size == "cpu":
        timing_config.cpu_reps = CPU_TIMED_STEPS  # after the first step, which warms up
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)

    def batch_for(image_size: int) -> int:
        return setup.batch or (2 if args.quick else common.config_batch(image_size))

    impls = [i for i in all_impls if wanted(i.name)]
    left_out = {i.name: reason for i in impls if i.reason is None
                and (reason := plan.left_out_reason(
                    i.name, setup.size, device, args, compiled=i.compile,
                    interpreted=i.kind == "cvt_fast" and plan.runs_interpreted(i.backend, device)))}
    steps = plan_steps(pairs, impls, modes, left_out, args, batch_for)
    measured = [i for i in impls if i.reason is None and i.name not in left_out]
    if device.type == "cuda":
        calls = (f"a first step (timed alone: compilation shows there), a warm-up of {timing_config.warmup_ms:g} ms, "
                 f"then about {timing_config.rep_ms:g} ms of timed steps (at least {timing_config.min_reps}); median")
    else:
        calls = (f"a first step (timed alone: compilation shows there), then {timing_config.cpu_warmup + timing_config.cpu_reps} "
                 f"more{f', {timing_config.cpu_warmup} of them warm-up' if timing_config.cpu_warmup else ''}, timed; median")
    interpreted = [i.name for i in measured if i.kind == "cvt_fast" and plan.runs_interpreted(i.backend, device)]
    for line in plan.header(
            "model", "whole-model " + " and ".join(
                {"train": "training steps (forward, cross-entropy, backward, AdamW)",
                 "infer": "inference"}[m] for m in modes), setup,
            shapes=[f"{name}@{size}: batch {batch_for(size)}" + (" (a narrow CvT-13, common.tiny_spec)" if args.quick else "")
                    for name, size in pairs],
            measured=[i.name for i in measured], left_out=left_out,
            unavailable={i.name: i.reason for i in impls if i.reason is not None}, steps=steps, calls=calls,
            notes=[f"{name} {plan.INTERPRETED_NOTE}" for name in interpreted]
            + ["cvt_fast logits are checked against the official model's (same weights) on the first batch"],
            uncounted=interpreted + [i.name for i in measured if i.compile and i.name not in interpreted]):
        print(line, flush=True)
    if args.dry_run:
        return 0

    run = common.BenchRun("model", args, device, settings={
        "dtype": args.dtype, "autocast": args.dtype != "float32",
        "models": [f"{m}@{s}" for m, s in pairs], "modes": modes, "plan": setup.size, "quick": args.quick,
        "spec_note": "--quick uses common.tiny_spec of the named model" if args.quick else "cvt_fast.specs.MODEL_SPECS",
        "optimizer": "torch.optim.AdamW(lr=1e-4, weight_decay=0.05), default implementation for the device",
        "timing": vars(timing_config), "find_max_batch": args.find_max_batch,
        "max_batch_limit": args.max_batch_limit, "max_batch_granularity": args.max_batch_granularity,
    }, conventions=CONVENTIONS)
    for impl in impls:
        run.add_implementation(impl.name, impl.reason is None, impl.reason, impl.description, impl.peer)

    models, references = common.Latest(device), common.Latest(device)

    def official_logits(name: str, spec: dict, image_size: int, batch: int):
        """The official model's logits for the check, once per model (None if they failed)."""
        def make():
            reference = common.run_guarded(lambda: reference_logits_for(
                spec, image_size, batch, device, dtype, args.seed, min(batch, 8)), device)
            if "error" in reference:
                run.payload.setdefault("reference_errors", []).append(
                    {"model": name, "image_size": image_size, "batch": batch, **reference})
            return reference.get("logits")
        return references.get((name, image_size, batch), make)

    def measure_step(step: plan.Step) -> dict:
        impl, name, image_size, spec, batch, mode = step.context

        def make() -> ModelUnderTest:
            torch._dynamo.reset()
            want = official_logits(name, spec, image_size, batch) if impl.kind == "cvt_fast" else None
            return prepare_model(impl, image_size, spec, batch, modes, device, dtype, args.seed, want)
        state = models.get((impl.name, name, image_size), make)
        if mode.endswith("-max-batch"):
            return measure_max_batch(state, mode[: -len("-max-batch")], image_size, batch, device, dtype, args)
        return measure_mode(state, mode, batch, device, dtype, timing_config)

    def result_line(step: plan.Step, row: dict) -> str:
        impl, name, image_size, _, _, mode = step.context
        figure = (f"max batch {row['max_batch']}" if "max_batch" in row
                  else f"{common.fmt(row.get('images_per_s'))} img/s")
        return f"{name}@{image_size} {mode:>16} {impl.name:>24}: {figure} {row.get('error', '')}"

    plan.run_steps(run, steps, setup, measure_step, result_line)
    models.clear()
    references.clear()

    # Throughput speedups: best peer time / time (same model and mode) = images/s ratio.
    peers = {i.name for i in impls if i.peer}
    common.add_speedups([r for r in run.rows if r["mode"] in MODES], ("model", "image_size", "batch", "mode"), peers)
    common.add_ratios_vs([r for r in run.rows if r["mode"] in MODES], ("model", "image_size", "batch", "mode"),
                         "official")
    names = [i.name for i in impls]
    # Relative to the fastest peer, so models of very different speeds share one linear axis
    # (absolute images/s are in the table).
    precision = f"{args.dtype} autocast" if args.dtype != "float32" else "float32"
    panels = common.mode_panels(run.rows, modes, names, "speedup_vs_best_peer",
                                lambda mode: f"{mode}: images/s relative to the fastest peer ({precision})",
                                "x fastest peer (official, official-compile, hf)",
                                group=lambda r: f"{r['model']}@{r['image_size']}")
    models_seen = list(dict.fromkeys(r["model"] + str(r["image_size"]) for r in run.rows))
    mode_order = modes + [f"{m}-max-batch" for m in modes]
    ordered = sorted(run.rows, key=lambda r: (models_seen.index(r["model"] + str(r["image_size"])),
                                              mode_order.index(r["mode"]), names.index(r["impl"])))
    run.finish(tables(ordered, names), panels, "CvT whole model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
