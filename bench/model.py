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
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from cvt_fast.ops.backends import TABLE  # noqa: E402

# Every backend of the fused ops but the reference (the backend table's): kernels and peers.
FUSED_BACKENDS = tuple(name for name, record in TABLE.items() if record.kind != "reference")
# The default set (others: cvt_fast-reference/-auto and hf-compile, through --only).
IMPLEMENTATIONS = (("official", "hf") + tuple(f"cvt_fast-{b}" for b in FUSED_BACKENDS)
                   + ("official-compile",) + tuple(f"cvt_fast-{b}-compile" for b in FUSED_BACKENDS))
MODES = ("train", "infer")

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


def measure_model(impl: ModelImpl, name: str, image_size: int, spec: dict, batch: int, modes: list[str],
                  device, dtype, timing_config, args, reference_logits: dict) -> list[dict]:
    """Rows for one (model, implementation): train and/or infer, then max-batch searches."""
    import torch
    rows = []
    built = common.run_guarded(lambda: dict(zip(("module", "forward"),
                                                build_model(impl, spec, device, args.seed))), device)
    if "module" not in built:
        return [{"mode": m, **built} for m in modes]
    module, forward = built["module"], built["forward"]
    batches = make_batches(batch, image_size, device, 2, args.seed)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, weight_decay=0.05) if "train" in modes else None

    # Logits against the official model with the same weights, on the first images of the
    # first batch (eval mode: each image's logits are independent of the others), before any
    # training step changes the weights: inference runs first, and its first call is checked.
    want = reference_logits.get("logits") if impl.kind == "cvt_fast" else None
    check: dict = {}

    def record_check(logits) -> None:
        got = logits[: want.shape[0]].float().cpu()
        check["logits_rel_err_vs_official"] = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()

    if want is not None and "infer" not in modes:
        def eval_forward() -> dict:
            record_check(infer_step_fn(module, forward, batches, device, dtype)(0))
            return {}
        failed = common.run_guarded(eval_forward, device)
        if "error" in failed:
            check["logits_check_error"] = failed["error"]

    for mode in sorted(modes, key=("infer", "train").index):
        def run_mode() -> dict:
            step = (train_step_fn(module, forward, optimizer, batches, device, dtype) if mode == "train"
                    else infer_step_fn(module, forward, batches, device, dtype))
            result, first_s = first_call(step, device)
            if not torch.isfinite(result.float()).all():
                raise FloatingPointError(f"{mode} step produced a non-finite "
                                         f"{'loss' if mode == 'train' else 'output'}")
            if mode == "infer" and want is not None:
                record_check(result)
            return {**timed(step, device, timing_config, batch, rotation=len(batches)), "first_step_s": first_s}
        rows.append({"mode": mode, **common.run_guarded(run_mode, device)})
    for row in rows:
        row.update(check)

    if args.find_max_batch:
        for mode in modes:
            def fits(b: int) -> bool:
                def attempt() -> dict:
                    trial = make_batches(b, image_size, device, 1, args.seed)
                    step = (train_step_fn(module, forward, optimizer, trial, device, dtype) if mode == "train"
                            else infer_step_fn(module, forward, trial, device, dtype))
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
            found = common.run_guarded(lambda: dict(zip(("max_batch", "probes"), search_max_batch(
                fits, batch, args.max_batch_limit, args.max_batch_granularity))), device)
            row = {"mode": f"{mode}-max-batch", "status": "ok" if "max_batch" in found else found["status"],
                   **found}
            if row.get("max_batch") is not None and row["max_batch"] >= args.max_batch_limit:
                row["note"] = f"reached --max-batch-limit {args.max_batch_limit}"
            rows.append(row)

    return rows


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
    cells: dict[tuple, dict[str, str]] = {}
    for r in rows:
        if r["mode"] not in MODES:
            continue
        if r.get("status") == "ok":
            text = common.fmt(r["images_per_s"])
            if r["impl"].startswith("cvt_fast") and r.get("speedup_vs_best_peer"):
                text += f" ({common.fmt(r['speedup_vs_best_peer'])}x)"
        else:
            text = r.get("status", "?")
        cells.setdefault((f"{r['model']}@{r['image_size']} B={r['batch']}", r["mode"]), {})[r["impl"]] = text
    pivot = common.markdown_table(["model", "mode"] + names,
                                  [[m, mode] + [c.get(n, "") for n in names] for (m, mode), c in cells.items()])
    return ("## Every measurement\n\n" + detail + "\n\n## Images/s per implementation "
            "(cvt_fast: speedup vs best peer)\n\n" + pivot)


def main(argv: Optional[list[str]] = None) -> int:
    parser = common.base_parser(__doc__.splitlines()[0])
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
    setup = common.prologue(args, MODES, implementations=None)
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
    deadline = setup.deadline
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)

    run = common.BenchRun("model", args, device, settings={
        "dtype": args.dtype, "autocast": args.dtype != "float32",
        "models": [f"{m}@{s}" for m, s in pairs], "modes": modes, "quick": args.quick,
        "spec_note": "--quick uses common.tiny_spec of the named model" if args.quick else "cvt_fast.specs.MODEL_SPECS",
        "optimizer": "torch.optim.AdamW(lr=1e-4, weight_decay=0.05), default implementation for the device",
        "timing": vars(timing_config), "find_max_batch": args.find_max_batch,
        "max_batch_limit": args.max_batch_limit, "max_batch_granularity": args.max_batch_granularity,
    }, conventions=CONVENTIONS)

    impls = [i for i in all_impls if wanted(i.name)]
    for impl in impls:
        run.add_implementation(impl.name, impl.reason is None, impl.reason, impl.description, impl.peer)
    peers = {i.name for i in impls if i.peer}

    # Eager implementations first for every model, then the compiled ones: under a time budget,
    # compilation (a minute or more per model) must not crowd out the main figures.
    passes = [[i for i in impls if not i.compile], [i for i in impls if i.compile]]
    try:
        for group in (g for g in passes if g):
            for name, image_size in pairs:
                spec = model_spec(name, args.quick)
                batch = args.batch or (2 if args.quick else common.config_batch(image_size))
                base = {"model": name + ("(tiny)" if args.quick else ""), "image_size": image_size, "batch": batch,
                        "dtype": args.dtype}
                reference = None  # official logits for the check, computed when first needed
                for impl in group:
                    rows_of = {"impl": impl.name, **base}
                    skip = (None if impl.reason is None else ("unavailable", impl.reason))
                    if skip is None and common.quick_skip_reason(impl.name, args):
                        skip = ("skipped", common.quick_skip_reason(impl.name, args))
                    if skip is None and deadline.skip_reason():
                        skip = ("skipped", deadline.skip_reason())
                    if skip is not None:
                        for mode in modes:
                            run.add({**rows_of, "mode": mode, "status": skip[0], "reason": skip[1]})
                        continue
                    torch._dynamo.reset()
                    if reference is None:
                        reference = common.run_guarded(lambda: reference_logits_for(
                            spec, image_size, batch, device, dtype, args.seed, min(batch, 8)), device)
                        if "error" in reference:
                            run.payload.setdefault("reference_errors", []).append({**base, **reference})
                    for row in measure_model(impl, name, image_size, spec, batch, modes, device, dtype,
                                             timing_config, args, reference):
                        deadline.note(run.add({**rows_of, **row}))
                        print(f"{name}@{image_size} {row['mode']:>16} {impl.name:>24}: "
                              f"{common.fmt(row.get('images_per_s'))} img/s {row.get('error', '')}", flush=True)
                    common.free_memory(device)
                reference = None
                common.free_memory(device)
        run.payload["complete"] = True
    except KeyboardInterrupt:
        run.payload["interrupted"] = True
        print("interrupted: writing what was measured", flush=True)

    # Throughput speedups: best peer time / time (same model and mode) = images/s ratio.
    common.add_speedups([r for r in run.rows if r["mode"] in MODES], ("model", "image_size", "batch", "mode"), peers)
    common.add_ratios_vs([r for r in run.rows if r["mode"] in MODES], ("model", "image_size", "batch", "mode"),
                         "official")
    names = [i.name for i in impls]
    panels = []
    for mode in modes:
        ok = [r for r in run.rows if r["mode"] == mode]
        groups = list(dict.fromkeys(f"{r['model']}@{r['image_size']}" for r in ok))
        # Relative to the fastest peer, so models of very different speeds share one linear axis
        # (absolute images/s are in the table).
        series = {n: [next((r.get("speedup_vs_best_peer") for r in ok if f"{r['model']}@{r['image_size']}" == g
                            and r["impl"] == n and r.get("status") == "ok"), None) for g in groups] for n in names}
        precision = f"{args.dtype} autocast" if args.dtype != "float32" else "float32"
        panels.append({"title": f"{mode}: images/s relative to the fastest peer ({precision})",
                       "ylabel": "x fastest peer (official, official-compile, hf)", "groups": groups,
                       "series": {n: v for n, v in series.items() if any(x is not None for x in v)}})
    models = list(dict.fromkeys(r["model"] + str(r["image_size"]) for r in run.rows))
    mode_order = modes + [f"{m}-max-batch" for m in modes]
    ordered = sorted(run.rows, key=lambda r: (models.index(r["model"] + str(r["image_size"])),
                                              mode_order.index(r["mode"]), names.index(r["impl"])))
    run.finish(tables(ordered, names), panels, "CvT whole model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
