#!/usr/bin/env python
"""Attention benchmark: every implementation at the attention shapes of CvT-13/21/W24.

Shapes come from cvt_fast.specs.MODEL_SPECS and the image size (stage grids, K/V at
STRIDE_KV, a cls row in the last stage, scale = dim ** -0.5 as the official model);
batch from the official configs (256 at 224, 128 at 384) unless --batch. Inputs are
q, k, v of shape (B, N, heads, head_dim), the layout a Linear output viewed per head
has; outputs are (B, Nq, heads * head_dim), the layout the output projection reads.
Every implementation is timed from that input to that output, so transposes a peer
needs (SDPA works on (B, heads, N, head_dim)) are inside its time.

    python bench/attn.py                      # GPU: all models, all implementations; CPU: CvT-13
                                              # at batch 8, a couple of minutes
    python bench/attn.py --full               # the published shapes on any device
    python bench/attn.py --only 'cvt_fast-*,sdpa-flash' --models cvt-13@224
    python bench/attn.py --quick --device cpu # smoke run
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common, plan  # noqa: E402
from cvt_fast.ops.backends import backends_for  # noqa: E402

# cvt_fast's own kernels, one row each (cvt_fast-<backend> from the backend table); the peers by
# the library's kernel family.
CVT_FAST_BACKENDS = backends_for("attention", kinds=("kernels",))
SDPA_KERNELS = (("flash", "FLASH_ATTENTION"), ("efficient", "EFFICIENT_ATTENTION"), ("cudnn", "CUDNN_ATTENTION"),
                ("math", "MATH"))
IMPLEMENTATIONS = (tuple(f"cvt_fast-{b}" for b in CVT_FAST_BACKENDS) + tuple(f"sdpa-{k}" for k, _ in SDPA_KERNELS)
                   + ("xformers", "official"))
MODES = ("fwd", "fwd+bwd")
# The CPU-sized plan's batch: CvT-13's stage shapes in about a minute on two cores.
CPU_BATCH = 8

CONVENTIONS = {
    "flops": "fwd = 4*B*H*Nq*Nkv*d (QK^T and PV, 2 FLOPs per multiply-add); fwd+bwd = 3.5 x fwd "
             "(backward = 2.5 x fwd: recomputed QK^T, dV, dP, dQ, dK, as flash attention counts); "
             "the same count for every implementation, whatever it really executes",
    "bytes": "minimum device-memory traffic: fwd reads q, k, v and writes out once; fwd+bwd adds "
             "reading q, k, v, out, dout and writing dq, dk, dv once (log-sum-exp and softmax "
             "statistics not counted)",
    "time": "median over repetitions, CUDA events around each call after warm-up, inputs rotated "
            "over several sets (>= 3x L2); perf_counter on the CPU",
    "speedup_vs_best_peer": "fastest peer time / this time, same shape and mode; peers are all "
                            "implementations that are not cvt_fast-*",
    "peak_mem_mib": "memory allocated by one call beyond its inputs (its outputs included)",
    "rel_err": "||out - ref|| / ||ref|| on the first two batch elements, ref = float32 einsum-softmax; "
               "fwd+bwd: the largest of the errors of dq, dk, dv",
    "official": "the official code's einsum-softmax-einsum under autocast to the run dtype, as "
                "its AMP training runs it (softmax in float32, scores materialised)",
}


@dataclass
class AttentionImpl:
    name: str
    fn: Optional[Callable[..., Any]]
    reason: Optional[str]
    peer: bool
    description: str
    context: Callable[[], ContextManager] = field(default=contextlib.nullcontext)
    interpreted: bool = False  # GPU kernels run by an interpreter here (times are the interpreter's)


def official_attention(q, k, v, scale: float):
    """The official Attention.forward after the projections: heads split by rearrange
    (a permuted view), einsum scores, softmax, einsum, heads merged by rearrange (a copy)."""
    import torch
    batch, nq, heads, head_dim = q.shape
    qh, kh, vh = (t.permute(0, 2, 1, 3) for t in (q, k, v))  # 'b t (h d) -> b h t d'
    scores = torch.einsum("bhlk,bhtk->bhlt", qh, kh) * scale
    attn = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhlt,bhtv->bhlv", attn, vh)
    return out.permute(0, 2, 1, 3).reshape(batch, nq, heads * head_dim)  # 'b h t d -> b t (h d)'


def reference_attention(q, k, v, scale: float):
    """float32 ground truth for the error column."""
    import torch
    batch, nq, heads, head_dim = q.shape
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v.float())
    return out.reshape(batch, nq, heads * head_dim)


def cvt_fast_implementations(device, backends) -> list[AttentionImpl]:
    """cvt_fast.ops.attention with each named backend, exactly as the model calls it; a backend
    that cannot run here is listed with the reason."""
    try:
        from cvt_fast import ops
        available = ops.available_backends("attention", device)
        load_error = None
    except Exception as error:  # noqa: BLE001 - report why, keep the peers
        ops, available, load_error = None, {}, f"cvt_fast.ops not importable: {common.describe_error(error)}"
    impls = []
    for backend in backends:
        reason = load_error or (available[backend] if backend in available
                                else f"not listed by available_backends('attention'): {sorted(available)}")

        def run(q, k, v, scale, _backend=backend):
            return ops.attention(q, k, v, scale, backend=_backend)
        impls.append(AttentionImpl(f"cvt_fast-{backend}", run if reason is None else None, reason, False,
                                   f"cvt_fast.ops.attention(backend='{backend}'), reads (B,N,H,d) in place",
                                   interpreted=plan.runs_interpreted(backend, device)))
    return impls


def build_implementations(device, dtype) -> list[AttentionImpl]:
    import torch
    from cvt_fast.ops import peers
    from cvt_fast.ops.backends import TABLE

    impls = cvt_fast_implementations(device, CVT_FAST_BACKENDS)

    # PyTorch SDPA (through cvt_fast's peer, which does the transposes), one kernel family at a time.
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        sdpa_error = None
    except ImportError as error:
        SDPBackend = sdpa_kernel = None
        sdpa_error = f"torch.nn.attention.sdpa_kernel missing in torch {torch.__version__}: {error}"
    for short, member in SDPA_KERNELS:
        reason = sdpa_error
        if reason is None and not hasattr(SDPBackend, member):
            reason = f"SDPBackend.{member} missing in torch {torch.__version__}"
        if reason is None and device.type != "cuda" and short in ("efficient", "cudnn"):
            reason = f"SDPA's {short} kernel is CUDA-only"
        backend_enum = getattr(SDPBackend, member, None) if reason is None else None
        impls.append(AttentionImpl(
            f"sdpa-{short}", peers.sdpa_attention if reason is None else None, reason, True,
            f"F.scaled_dot_product_attention under sdpa_kernel(SDPBackend.{member}), with the transposes "
            f"to (B,H,N,d) and back", context=(lambda b=backend_enum: sdpa_kernel(b)) if reason is None
            else contextlib.nullcontext))

    # xformers (not installed on every machine; no CPU kernels): the 'xformers' record's probe.
    reason = TABLE["xformers"].probe("attention", device.type)
    impls.append(AttentionImpl("xformers", peers.xformers_attention if reason is None else None, reason, True,
                               "xformers.ops.memory_efficient_attention on (B,N,H,d)"))

    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype != torch.float32 \
        else contextlib.nullcontext
    impls.append(AttentionImpl("official", official_attention, None, True,
                               "official einsum-softmax-einsum with rearranges, under autocast",
                               context=autocast))
    return impls


def attention_shapes(pairs, batch_override: Optional[int], quick: bool) -> list[dict]:
    """Distinct attention shapes of the (model, image size) pairs; CvT-13 and CvT-21 share
    theirs (same widths and heads, different depths), so they are measured once."""
    shapes = common.distinct_stage_shapes(pairs, batch_override, quick, ("stage", "nq", "nkv", "heads", "head_dim"))
    for shape in shapes:
        shape["scale"] = shape["dim"] ** -0.5  # the official model's scale: the whole width
    return shapes


def make_inputs(shape: dict, mode: str, device, dtype, count: int, seed: int) -> list[tuple]:
    import torch
    gen = torch.Generator(device=device).manual_seed(seed)
    b, nq, nkv, h, d = shape["batch"], shape["nq"], shape["nkv"], shape["heads"], shape["head_dim"]
    grad = mode == "fwd+bwd"
    sets = []
    for _ in range(count):
        q = torch.randn(b, nq, h, d, device=device, dtype=dtype, generator=gen).requires_grad_(grad)
        k = torch.randn(b, nkv, h, d, device=device, dtype=dtype, generator=gen).requires_grad_(grad)
        v = torch.randn(b, nkv, h, d, device=device, dtype=dtype, generator=gen).requires_grad_(grad)
        dout = torch.randn(b, nq, h * d, device=device, dtype=dtype, generator=gen) if grad else None
        sets.append((q, k, v, dout))
    return sets


def flops_and_bytes(shape: dict, mode: str, element_size: int) -> tuple[float, float]:
    b, nq, nkv, h, d = shape["batch"], shape["nq"], shape["nkv"], shape["heads"], shape["head_dim"]
    fwd_flops = 4.0 * b * h * nq * nkv * d
    fwd_bytes = element_size * b * h * d * (2 * nq + 2 * nkv)
    if mode == "fwd":
        return fwd_flops, fwd_bytes
    return 3.5 * fwd_flops, fwd_bytes + element_size * b * h * d * 4 * (nq + nkv)


def measure(impl: AttentionImpl, shape: dict, mode: str, sets: list[tuple], device, dtype,
            timing_config: common.TimingConfig, cuda_graph: bool = False) -> dict:
    import torch
    scale = shape["scale"]
    grad = mode == "fwd+bwd"

    def call(i: int):
        q, k, v, dout = sets[i % len(sets)]
        out = impl.fn(q, k, v, scale)
        if grad:
            return torch.autograd.grad(out, (q, k, v), dout)
        return out

    grad_mode = contextlib.nullcontext() if grad else torch.no_grad()
    with impl.context(), grad_mode:
        # The check runs first: it is also the first (warm-up) call of the implementation.
        rel_err = check_against_reference(impl, sets[0], scale, grad)
        timing = common.time_calls(call, device, timing_config, rotation=len(sets),
                                   graph=cuda_graph)
        peak = common.measure_peak_memory(lambda: call(0), device)
    flops, n_bytes = flops_and_bytes(shape, mode, torch.empty((), dtype=dtype).element_size())
    seconds = timing.median_ms * 1e-3
    return {"status": "ok", **timing.as_dict(), "tflops": flops / seconds / 1e12,
            "gbps": n_bytes / seconds / 1e9, "peak_mem_mib": peak, "rel_err": rel_err,
            "flops": flops, "bytes": n_bytes}


def check_against_reference(impl: AttentionImpl, inputs: tuple, scale: float, grad: bool) -> float:
    """Relative error on the first two batch elements (cheap at any batch size)."""
    import torch
    q, k, v, dout = inputs
    n = min(2, q.shape[0])
    with torch.enable_grad() if grad else torch.no_grad():
        mine = [t[:n].detach().clone().requires_grad_(grad) for t in (q, k, v)]
        ours = [t[:n].detach().float().requires_grad_(grad) for t in (q, k, v)]
        out = impl.fn(*mine, scale)
        with torch.autocast(q.device.type, enabled=False):  # the official impl runs under autocast
            ref = reference_attention(*ours, scale)
        if not grad:
            return _rel(out, ref)
        got = torch.autograd.grad(out, mine, dout[:n])
        want = torch.autograd.grad(ref, ours, dout[:n].float())
        return max(_rel(g, w) for g, w in zip(got, want))


def _rel(actual, expected) -> float:
    a, e = actual.detach().double(), expected.detach().double()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


def tables(rows: list[dict], impl_names: list[str]) -> str:
    detail = common.markdown_table(
        ["shape", "B", "Nq", "Nkv", "H", "d", "mode", "implementation", "ms", "TFLOP/s", "GB/s",
         "vs best peer", "peak MiB", "rel err", "note"],
        [[r["label"], r["batch"], r["nq"], r["nkv"], r["heads"], r["head_dim"], r["mode"], r["impl"],
          r.get("time_ms"), r.get("tflops"), r.get("gbps"), r.get("speedup_vs_best_peer"),
          r.get("peak_mem_mib"), r.get("rel_err"), common.status_note(r)] for r in rows])
    pivot = common.pivot_table(rows, impl_names, "time_ms", "shape")
    return ("## Every measurement\n\n" + detail + "\n\n## Median ms per implementation "
            "(cvt_fast: speedup vs best peer)\n\n" + pivot)


def plan_steps(shapes: list[dict], modes: list[str], impls: list[AttentionImpl], left_out: dict[str, str],
               dtype_name: str, element_size: int) -> list[plan.Step]:
    """Every (shape, mode, implementation), in measuring order; work = the FLOP count."""
    steps = []
    for shape in shapes:
        for mode in modes:
            base = {key: shape[key] for key in ("label", "image_size", "stage", "batch", "nq", "nkv",
                                                "heads", "head_dim", "scale")}
            base.update(models=shape["models"], mode=mode, dtype=dtype_name)
            flops, _ = flops_and_bytes(shape, mode, element_size)
            for impl in impls:
                unmeasured = (("unavailable", impl.reason) if impl.fn is None
                              else ("skipped", left_out[impl.name]) if impl.name in left_out else None)
                steps.append(plan.Step(impl.name, {**base, "impl": impl.name}, work=flops, unmeasured=unmeasured,
                                       context=(impl, shape, mode)))
    return steps


def main(argv: Optional[list[str]] = None) -> int:
    parser = common.base_parser(__doc__.splitlines()[0])
    plan.add_plan_arguments(parser)
    common.add_shape_arguments(parser, MODES)
    args = parser.parse_args(argv)
    setup = common.prologue(args, MODES, IMPLEMENTATIONS, cpu_batch=CPU_BATCH)
    device, dtype, modes = setup.device, setup.dtype, setup.modes
    import torch

    shapes = common.select_stages(attention_shapes(setup.pairs, setup.batch, args.quick), args.stages, setup.pairs)
    impls = [i for i in build_implementations(device, dtype) if setup.wanted(i.name)]
    left_out = {i.name: reason for i in impls if i.fn is not None
                and (reason := plan.left_out_reason(i.name, setup.size, device, args, interpreted=i.interpreted))}
    element_size = torch.empty((), dtype=dtype).element_size()
    steps = plan_steps(shapes, modes, impls, left_out, args.dtype, element_size)
    measured = [i for i in impls if i.fn is not None and i.name not in left_out]
    for line in plan.header(
            "attn", "attention (q, k, v in (B, N, heads, d) -> out), " + " and ".join(modes), setup,
            shapes=[f"{s['label']}: B={s['batch']}, Nq={s['nq']}, Nkv={s['nkv']}, H={s['heads']}, d={s['head_dim']}"
                    for s in shapes],
            measured=[i.name for i in measured], left_out=left_out,
            unavailable={i.name: i.reason for i in impls if i.fn is None}, steps=steps,
            calls=plan.timed_calls(setup, "a float32 reference"),
            notes=[f"{i.name} {plan.INTERPRETED_NOTE}" for i in measured if i.interpreted],
            uncounted=[i.name for i in measured if i.interpreted]):
        print(line, flush=True)
    if args.dry_run:
        return 0

    run = common.BenchRun("attn", args, device, settings={
        "dtype": args.dtype, "models": [f"{m}@{s}" for m, s in setup.pairs], "modes": modes, "plan": setup.size,
        "quick": args.quick, "cuda_graph": setup.cuda_graph, "timing": vars(setup.timing), "shapes": shapes,
    }, conventions=CONVENTIONS)
    for impl in impls:
        run.add_implementation(impl.name, impl.fn is not None, impl.reason, impl.description, impl.peer)

    inputs = common.Latest(device)

    def measure_step(step: plan.Step) -> dict:
        impl, shape, mode = step.context

        def make() -> list[tuple]:
            count = common.rotation_count(int(flops_and_bytes(shape, mode, element_size)[1]), device)
            return make_inputs(shape, mode, device, dtype, count, args.seed)
        sets = inputs.get((shape["label"], mode), make)
        return measure(impl, shape, mode, sets, device, dtype, setup.timing, setup.cuda_graph)

    def result_line(step: plan.Step, result: dict) -> str:
        impl, shape, mode = step.context
        return (f"{shape['label']:>22} {mode:>7} {impl.name:>16}: "
                f"{common.fmt(result.get('time_ms'))} ms {result.get('error', '')}")

    plan.run_steps(run, steps, setup, measure_step, result_line)
    inputs.clear()

    common.add_speedups(run.rows, ("label", "mode"), {i.name for i in impls if i.peer})
    names = [i.name for i in impls]
    panels = common.mode_panels(run.rows, modes, names, "tflops", lambda mode: f"attention {mode}, {args.dtype}",
                                "TFLOP/s")
    run.finish(tables(run.rows, names), panels, "CvT attention")
    return 0


if __name__ == "__main__":
    sys.exit(main())
