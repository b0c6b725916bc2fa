"""The first command to run on a lent GPU: finds what no CPU test can see, in at most 8 minutes.

    python tools/gpu_smoke.py                 # on the GPU machine (logs under $OUT, or --out)
    python tools/gpu_smoke.py --dry           # on the CPU: the same steps, tiny, Triton interpreted

Steps, in this order, each skipped (and reported so) when too little of --budget (480 s) is left:
  1. build       the CUDA extension for sm_90 only (ninja, MAX_JOBS = CPUs), pip install -e .
  2. memcheck    compute-sanitizer memcheck over the CUDA ops at small odd shapes, every dtype
                 (bf16, fp16, fp32) and head size (32, 64, 128): attention 133x70 (strided
                 views), 20x150, 197x50, a misaligned grad_out; conv_proj 15x13 + cls (fused),
                 k = 5, a generic geometry; conv_proj_bn; forward and backward, against float64
  3. real        the real sizes without the sanitizer, backends cuda and triton, batch 256, bf16:
                 every stage of CvT-13 at 224 and CvT-W24 at 384, attention (the Triton one-kernel
                 backward where its count picks it), conv_proj, conv_proj_bn; everything finite,
                 the last image of attention against float64 (an index overflow shows there),
                 the convolutions against float64 on the whole batch
  4. racecheck, synccheck, initcheck   on the tensor-core attention and the fused conv
  5. memcheck-triton   compute-sanitizer memcheck over every Triton kernel, autotune lists cut to
                 one config each
Each check runs in its own process (a sticky CUDA error ends only that step) and prints one line
per case; a step fails on a sanitizer error, a crash, or a result off its float64 reference by
more than the dtype's tolerance. Logs: smoke.log (every step's output) and smoke.json (the
summary: per step status, seconds, failures) under --out.

--dry (CI runs it, tests/test_gpu_smoke.py): no build, the sanitizer steps reported as skipped
(no GPU, no compute-sanitizer); every check process still runs, on the CPU at tiny shapes, the
Triton kernels under TRITON_INTERPRET=1 and the 'reference' backend standing in for 'cuda', so
the script cannot rot between GPU sessions.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

REPO = pathlib.Path(__file__).resolve().parent.parent
BUDGET_SECONDS = 480  # the "at most 8 minutes on an H100/H200"
MARGIN_SECONDS = 10  # kept back for writing the summary


# =====================================================================================================
# The runner: steps, deadlines, logs
# =====================================================================================================

@dataclass
class Step:
    name: str
    what: str
    min_seconds: int  # skipped when less than this is left
    cap_seconds: int  # at most this long (and never past the deadline)
    worker: Optional[str] = None  # the check group run in a child process
    sanitizer: Optional[str] = None  # compute-sanitizer tool, None for a plain run


STEPS = [
    Step("build", "CUDA extension for sm_90 (ninja, MAX_JOBS)", 60, 240),
    Step("memcheck", "compute-sanitizer memcheck, CUDA ops, small odd shapes", 30, 110, "cuda-small", "memcheck"),
    Step("real", "batch 256, CvT-13@224 and CvT-W24@384, cuda and triton", 30, 150, "real"),
    Step("racecheck", "compute-sanitizer racecheck, tensor-core attention and fused conv", 20, 50, "tc-fused",
         "racecheck"),
    Step("synccheck", "compute-sanitizer synccheck, tensor-core attention and fused conv", 20, 45, "tc-fused",
         "synccheck"),
    Step("initcheck", "compute-sanitizer initcheck, tensor-core attention and fused conv", 20, 45, "tc-fused",
         "initcheck"),
    Step("memcheck-triton", "compute-sanitizer memcheck, every Triton kernel, one config", 30, 90, "triton-one",
         "memcheck"),
]


@dataclass
class Result:
    name: str
    status: str  # passed, failed, skipped
    seconds: float = 0.0
    detail: str = ""
    failures: list = field(default_factory=list)


def find_sanitizer() -> Optional[str]:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = pathlib.Path(home) / "bin" / "compute-sanitizer"
    return str(candidate) if candidate.exists() else shutil.which("compute-sanitizer")


def run_logged(command: list, env: dict, timeout: float, log) -> tuple[int, str]:
    """Run command, append its output to the log, return (exit status, output); 124 on timeout."""
    log.write(f"$ {' '.join(command)}\n")
    log.flush()
    try:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        output, status = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as expired:
        # The partial output comes as bytes even with text=True.
        output = "".join(part.decode(errors="replace") if isinstance(part, bytes) else part
                         for part in (expired.stdout or "", expired.stderr or ""))
        output += f"\n== timed out after {timeout:.0f} s\n"
        status = 124
    # Sanitizer reports can be long: keep the head and the tail.
    if len(output) > 400_000:
        output = output[:200_000] + "\n== [... cut ...]\n" + output[-200_000:]
    log.write(output)
    log.write(f"== exit status {status}\n\n")
    log.flush()
    return status, output


def build(env: dict, timeout: float, log) -> tuple[int, str]:
    env = dict(env, TORCH_CUDA_ARCH_LIST="9.0", MAX_JOBS=str(os.cpu_count() or 4), CVT_FAST_PTXAS_VERBOSE="1")
    if shutil.which("ninja") is None:
        log.write("== note: no ninja on PATH; torch's build falls back to a slower serial build\n")
    return run_logged([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", "."], env,
                      timeout, log)


def failures_of(output: str) -> list:
    lines = [line for line in output.splitlines()
             if line.startswith("FAIL ") or "ERROR SUMMARY" in line and not line.rstrip().endswith(" 0 errors")
             or line.startswith("========= Invalid") or line.startswith("========= Race")]
    return lines[:40]


def run_steps(args) -> list:
    started = time.time()
    deadline = started + args.budget - MARGIN_SECONDS
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(REPO)
    env.setdefault("TRITON_CACHE_DIR", "/tmp/triton-cache")
    if args.dry:
        env["TRITON_INTERPRET"] = "1"
    sanitizer = None if args.dry else find_sanitizer()
    selected = [s for s in STEPS if not args.steps or s.name in args.steps]
    results = []
    dry_workers_run = {}  # dry: a check group shared by several sanitizer steps runs once
    with open(out / "smoke.log", "w") as log:
        log.write(f"# gpu_smoke {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} dry={args.dry} "
                  f"budget={args.budget}s python={sys.executable}\n\n")
        for step in selected:
            left = deadline - time.time()
            log.write(f"######## {step.name}: {step.what} ({left:.0f} s left)\n")
            if left < step.min_seconds:
                results.append(Result(step.name, "skipped", detail=f"deadline: {left:.0f} s left, needs "
                                                                     f"{step.min_seconds} s"))
                log.write(f"== skipped: {results[-1].detail}\n\n")
                continue
            timeout = min(step.cap_seconds, left)
            t0 = time.time()
            if step.name == "build":
                if args.dry or args.skip_build:
                    reason = "dry run (no CUDA build on the CPU)" if args.dry else "--skip-build"
                    results.append(Result(step.name, "skipped", detail=reason))
                    log.write(f"== skipped: {reason}\n\n")
                    continue
                status, output = build(env, timeout, log)
                results.append(Result(step.name, "passed" if status == 0 else "failed", time.time() - t0,
                                      f"exit status {status}", [] if status == 0 else output.splitlines()[-20:]))
                continue
            if args.dry and step.worker in dry_workers_run:
                detail = f"dry run: the same checks ran in step {dry_workers_run[step.worker]}"
                results.append(Result(step.name, "skipped", detail=detail))
                log.write(f"== skipped: {detail}\n\n")
                continue
            dry_workers_run.setdefault(step.worker, step.name)
            worker = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", step.worker,
                      "--deadline", f"{t0 + timeout - 5:.0f}"] + (["--dry"] if args.dry else [])
            detail = ""
            if step.sanitizer and sanitizer is None:
                # Still run the check process without the sanitizer in dry mode, so it cannot rot.
                detail = ("sanitizer skipped: dry run (no GPU)" if args.dry
                          else "sanitizer skipped: compute-sanitizer not found (set CUDA_HOME)")
                if not args.dry:
                    results.append(Result(step.name, "skipped", detail=detail))
                    log.write(f"== skipped: {detail}\n\n")
                    continue
                command = worker
            elif step.sanitizer:
                command = [sanitizer, "--tool", step.sanitizer, "--error-exitcode", "99", "--print-limit", "30",
                           "--target-processes", "all", *worker]
            else:
                command = worker
            step_env = dict(env)
            if step.sanitizer:
                # Without the caching allocator every tensor is its own allocation, so an access past
                # a tensor's end is outside any allocation, where the sanitizer sees it.
                step_env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"
            status, output = run_logged(command, step_env, timeout, log)
            cases = sum(line.startswith(("ok ", "FAIL ")) for line in output.splitlines())
            skipped_cases = sum(line.startswith("skip ") for line in output.splitlines())
            # A clean exit that ran no case (the sanitizer never started the checks) is no pass.
            failed = status != 0 or cases + skipped_cases == 0
            status_text = "failed" if failed else ("skipped" if detail else "passed")
            detail = "; ".join(filter(None, [detail, f"exit status {status}", f"{cases} cases",
                                             f"{skipped_cases} skipped by the deadline" if skipped_cases else ""]))
            results.append(Result(step.name, status_text, time.time() - t0, detail,
                                  failures_of(output) if failed else []))
        summary = {"dry": args.dry, "budget_s": args.budget, "seconds": round(time.time() - started, 1),
                   "steps": [vars(r) | {"seconds": round(r.seconds, 1)} for r in results]}
        log.write(json.dumps(summary, indent=1) + "\n")
    (out / "smoke.json").write_text(json.dumps(summary, indent=1) + "\n")
    for r in results:
        print(f"[gpu_smoke] {r.name:16s} {r.status:8s} {r.seconds:6.1f} s  {r.detail}")
        for line in r.failures[:10]:
            print(f"[gpu_smoke]     {line}")
    print(f"[gpu_smoke] {summary['seconds']} s in all; logs: {out / 'smoke.log'}, {out / 'smoke.json'}")
    return results


# =====================================================================================================
# The checks (run in a child process: `--worker NAME`)
# =====================================================================================================

# Relative error on norms, by dtype (tests/tolerances.py), times 2 for gradients (one rounding more).
TOLERANCE = {"torch.float64": 1e-10, "torch.float32": 1e-5, "torch.float16": 1e-3, "torch.bfloat16": 1e-2}


class Checks:
    """Cases of one check group; each prints 'ok', 'FAIL' or 'skip' (deadline) with its name."""

    def __init__(self, deadline: float, dry: bool):
        import torch

        self.torch = torch
        self.deadline = deadline
        self.dry = dry
        self.device = "cpu" if dry else "cuda"
        self.failed = 0

    def case(self, name: str, run: Callable[[], None], seconds: float = 2.0) -> None:
        if time.time() + seconds > self.deadline:
            print(f"skip {name}: deadline", flush=True)
            return
        t0 = time.time()
        try:
            run()
            if self.device == "cuda":
                self.torch.cuda.synchronize()
            print(f"ok {name} ({time.time() - t0:.2f} s)", flush=True)
        except Exception as error:  # noqa: BLE001 - report and go on with the next case
            self.failed += 1
            print(f"FAIL {name}: {type(error).__name__}: {str(error)[:500]}", flush=True)
            if self.device == "cuda" and "CUDA error" in str(error):
                raise  # a sticky error: every later case would fail too

    def backend(self, name: str) -> str:
        # Dry: the CUDA extension cannot run on the CPU; 'reference' runs the same harness code.
        return "reference" if self.dry and name == "cuda" else name

    def close(self, got, expected, dtype, what: str, factor: float = 1.0) -> None:
        torch = self.torch
        if not torch.isfinite(got).all():
            raise AssertionError(f"{what}: NaN or Inf")
        error = ((got.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()
        limit = TOLERANCE[str(dtype)] * factor
        if not error <= limit:
            raise AssertionError(f"{what}: relative error {error:.2e} > {limit:.0e}")

    # ---- attention -------------------------------------------------------------------------------
    def attention_case(self, backend: str, dtype, batch: int, n_q: int, n_kv: int, heads: int, d: int,
                       layout: str = "contiguous", check_images: Optional[slice] = None) -> None:
        """Forward and backward of cvt_fast.ops.attention against float64 autograd of the reference,
        on the images `check_images` (default all); everything computed must be finite."""
        torch = self.torch
        from cvt_fast.ops import attention

        if layout == "strided":  # q from a packed (B, N, 3, H, d) tensor, k and v transposed views
            q = torch.randn(batch, n_q, 3, heads, d, device=self.device).to(dtype)[:, :, 1]
            k = torch.randn(batch, heads, n_kv, d, device=self.device).to(dtype).transpose(1, 2)
            v = torch.randn(batch, heads, n_kv + 3, d, device=self.device).to(dtype)[:, :, 2:n_kv + 2].transpose(1, 2)
        else:
            q, k, v = (torch.randn(batch, n, heads, d, device=self.device).to(dtype) for n in (n_q, n_kv, n_kv))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        scale = (heads * d) ** -0.5
        out = attention(q, k, v, scale, backend=self.backend(backend))
        grad = torch.randn_like(out)
        if layout == "misaligned_grad":  # a contiguous grad_out one element off a 16-byte boundary
            storage = torch.empty(grad.numel() + 1, dtype=dtype, device=self.device)
            grad = storage[1:].view(grad.shape).copy_(grad)
        out.backward(grad)
        for name, t in (("out", out), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
            if not torch.isfinite(t).all():
                raise AssertionError(f"{name} has NaN or Inf")
        images = check_images or slice(None)
        leaves = [t.detach()[images].double().requires_grad_() for t in (q, k, v)]
        ref = attention(*leaves, scale, backend="reference")
        ref.backward(grad[images].double())
        self.close(out.detach()[images], ref.detach(), dtype, "out")
        for name, got, leaf in zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad), leaves):
            self.close(got[images], leaf.grad, dtype, name, factor=2.0)

    # ---- conv_proj / conv_proj_bn ------------------------------------------------------------------
    def conv_case(self, backend: str, dtype, batch: int, height: int, width: int, channels: int, has_cls: bool,
                  kernel: int = 3, strides=(1, 2), paddings=(1, 1), bn: bool = False) -> None:
        """Forward and backward of conv_proj (or conv_proj_bn) against float64 on the whole batch."""
        torch = self.torch
        from cvt_fast.ops import conv_proj, conv_proj_bn

        x = torch.randn(batch, int(has_cls) + height * width, channels, device=self.device).to(dtype)
        w = [(torch.randn(channels, 1, kernel, kernel, device=self.device) / kernel).to(dtype) for _ in range(3)]
        gamma = [1 + 0.1 * torch.randn(channels, device=self.device) for _ in range(3)]
        beta = [0.1 * torch.randn(channels, device=self.device) for _ in range(3)]
        geometry = (height, width, has_cls, *strides, *paddings)

        output_grads = []  # drawn once in the kernels' dtype; the float64 run gets the same values

        def run(name, x, w, gamma, beta):
            x, w = x.detach().requires_grad_(), [t.detach().requires_grad_() for t in w]
            if bn:
                gamma, beta = [t.detach().requires_grad_() for t in gamma], [t.detach().requires_grad_() for t in beta]
                q, k, v, _, _ = conv_proj_bn(x, *w, *gamma, *beta, *geometry, backend=name)
                leaves = [x, *w, *gamma, *beta]
            else:
                q, k, v = conv_proj(x, *w, *geometry, backend=name)
                leaves = [x, *w]
            if not output_grads:
                output_grads.extend(torch.randn(t.shape, device=t.device).to(t.dtype) for t in (q, k, v))
            torch.autograd.backward([q, k, v], [g.to(t.dtype) for g, t in zip(output_grads, (q, k, v))])
            return [q.detach(), k.detach(), v.detach()], [t.grad for t in leaves]

        outs, grads = run(self.backend(backend), x, w, gamma, beta)
        ref_outs, ref_grads = run("reference", x.double(), [t.double() for t in w], [t.double() for t in gamma],
                                  [t.double() for t in beta])
        for name, got, ref in zip(("q", "k", "v"), outs, ref_outs):
            self.close(got, ref, dtype, name)
        for i, (got, ref) in enumerate(zip(grads, ref_grads)):
            # BatchNorm's parameter gradients are float32 sums: the input dtype's tolerance still bounds them.
            self.close(got, ref, dtype, f"grad {i}", factor=2.0)


def dtypes(torch):
    return [torch.bfloat16, torch.float16, torch.float32]


def check_cuda_small(c: Checks) -> None:
    """The CUDA ops at small odd shapes, every dtype and head size (under memcheck on the GPU)."""
    torch = c.torch
    attention_shapes = [(1, 133, 70, 2, "strided"), (2, 20, 150, 1, "contiguous"), (1, 197, 50, 6, "contiguous")]
    head_dims = [32, 64, 128]
    conv_cases = [dict(height=15, width=13, channels=40, has_cls=True),
                  dict(height=9, width=11, channels=20, has_cls=True, kernel=5, paddings=(2, 2)),
                  dict(height=9, width=11, channels=20, has_cls=True, strides=(2, 3), paddings=(1, 0))]
    if c.dry:
        attention_shapes, head_dims = [(1, 13, 7, 2, "strided")], [32]
        conv_cases = [dict(height=5, width=4, channels=8, has_cls=True)]
    for dtype in dtypes(torch):
        for d in head_dims:
            for batch, n_q, n_kv, heads, layout in attention_shapes:
                c.case(f"attention cuda {dtype} d={d} {n_q}x{n_kv} {layout}",
                       lambda: c.attention_case("cuda", dtype, batch, n_q, n_kv, heads, d, layout))
        for case in conv_cases:
            c.case(f"conv_proj cuda {dtype} {case}", lambda: c.conv_case("cuda", dtype, 2, **case))
        c.case(f"conv_proj_bn cuda {dtype}", lambda: c.conv_case("cuda", dtype, 2, **conv_cases[0], bn=True))
    c.case("attention cuda bf16 misaligned grad_out",
           lambda: c.attention_case("cuda", torch.bfloat16, 1, 37, 21, 2, 64 if not c.dry else 32, "misaligned_grad"))


def check_tc_fused(c: Checks) -> None:
    """The tensor-core attention (one and several key blocks) and the fused conv, bf16."""
    torch = c.torch
    shapes = [(1, 133, 70, 2), (1, 20, 150, 1)] if not c.dry else [(1, 13, 7, 2)]
    d = 64 if not c.dry else 32
    for batch, n_q, n_kv, heads in shapes:
        c.case(f"attention cuda bf16 d={d} {n_q}x{n_kv}",
               lambda: c.attention_case("cuda", torch.bfloat16, batch, n_q, n_kv, heads, d))
    size = dict(height=15, width=13, channels=72) if not c.dry else dict(height=5, width=4, channels=8)
    c.case("conv_proj cuda bf16 fused", lambda: c.conv_case("cuda", torch.bfloat16, 2, **size, has_cls=True))


# CvT stages at their image sizes: (name, grid side, channels, heads, cls); head_dim 64 everywhere.
REAL_STAGES = [
    ("cvt-13@224 stage1", 56, 64, 1, False), ("cvt-13@224 stage2", 28, 192, 3, False),
    ("cvt-13@224 stage3", 14, 384, 6, True),
    ("cvt-w24@384 stage1", 96, 192, 3, False), ("cvt-w24@384 stage2", 48, 768, 12, False),
    ("cvt-w24@384 stage3", 24, 1024, 16, True),
]
DRY_STAGES = [("tiny stage1", 6, 32, 2, False), ("tiny stage3", 4, 32, 2, True)]


def check_real(c: Checks) -> None:
    """Batch 256 at the real stage shapes, bf16, cuda and triton: attention (last image against
    float64), conv_proj and conv_proj_bn (whole batch against float64)."""
    torch = c.torch
    batch, stages = (256, REAL_STAGES) if not c.dry else (2, DRY_STAGES)
    for name, side, channels, heads, cls in stages:
        n_q, n_kv = int(cls) + side * side, int(cls) + (side // 2) ** 2
        d = channels // heads
        for backend in ("cuda", "triton"):
            c.case(f"attention {backend} {name} B={batch} {n_q}x{n_kv} h={heads}",
                   lambda: c.attention_case(backend, torch.bfloat16, batch, n_q, n_kv, heads, d,
                                            check_images=slice(batch - 1, batch)), seconds=8)
            c.case(f"conv_proj {backend} {name} B={batch}",
                   lambda: c.conv_case(backend, torch.bfloat16, batch, side, side, channels, cls), seconds=6)
            c.case(f"conv_proj_bn {backend} {name} B={batch}",
                   lambda: c.conv_case(backend, torch.bfloat16, batch, side, side, channels, cls, bn=True), seconds=6)
        if c.device == "cuda":
            torch.cuda.empty_cache()  # the next stage's tensors are larger


def one_config_each() -> None:
    """Cut every Triton autotune list to its first config (memcheck on one config per kernel), built
    as the modules build theirs (both read _TUNED at launch time). Under the interpreter the modules'
    _TUNED are empty and stay so, but the lists are still built, so this code runs in the dry mode."""
    import triton

    from cvt_fast.kernels import attention, linear_activation

    tuned_attention = {
        (name, group): triton.autotune(configs=configs[:1], key=attention._AUTOTUNE_KEY,
                                       reset_to_zero=attention._RESET_TO_ZERO.get(name))(attention._KERNELS[name])
        for name, by_d in attention._GPU_CONFIGS.items() for group, configs in by_d.items()}
    tuned_linear = {
        kernel: triton.autotune(configs=linear_activation._GPU_CONFIGS[direction][:1],
                                key=linear_activation._AUTOTUNE_KEY)(kernel)
        for kernel, direction in ((linear_activation._linear_activation_kernel, "forward"),
                                  (linear_activation._activation_grad_kernel, "backward"))}
    assert set(tuned_attention) == set(attention._TUNED) or not attention._TUNED, "attention's autotune keys changed"
    assert set(tuned_linear) == set(linear_activation._TUNED) or not linear_activation._TUNED
    if attention._TUNED:
        attention._TUNED = tuned_attention
    if linear_activation._TUNED:
        linear_activation._TUNED = tuned_linear


def check_triton_one(c: Checks) -> None:
    """Every Triton kernel once: attention forward and its three backwards, conv_proj (s1s2 and
    generic), conv_proj_bn, and the fused elementwise ops, forward and backward."""
    torch = c.torch
    one_config_each()
    from cvt_fast.kernels import attention as attention_kernels
    from cvt_fast.ops import linear_activation, mlp_activation, residual_layer_norm

    bf16 = torch.bfloat16
    d = 64 if not c.dry else 16
    atomic_keys = attention_kernels.ATOMIC_DQ_MIN_KEYS + 8 if not c.dry else 40
    c.case("attention triton one-pass (dq stored)", lambda: c.attention_case("triton", bf16, 2, 37, 20, 2, d))
    c.case("attention triton one-pass (dq atomic)", lambda: c.attention_case("triton", bf16, 1, 37, atomic_keys, 1, d))

    def split():
        os.environ[attention_kernels.DETERMINISTIC_ENV] = "1"
        try:
            c.attention_case("triton", bf16, 2, 37, 90, 2, d)
        finally:
            del os.environ[attention_kernels.DETERMINISTIC_ENV]

    c.case("attention triton split (deterministic)", split)
    c.case("attention triton fp32", lambda: c.attention_case("triton", torch.float32, 1, 37, 90, 2, d))
    size = dict(height=9, width=7, channels=40) if not c.dry else dict(height=5, width=4, channels=8)
    c.case("conv_proj triton s1s2", lambda: c.conv_case("triton", bf16, 2, **size, has_cls=True))
    c.case("conv_proj triton generic", lambda: c.conv_case("triton", bf16, 2, **size, has_cls=True, strides=(2, 2)))
    c.case("conv_proj_bn triton", lambda: c.conv_case("triton", bf16, 2, **size, has_cls=True, bn=True))

    def elementwise():
        # fc1 with QuickGELU in its epilogue, the activation pass, residual + LayerNorm: forward and
        # backward through all three, against the same chain in float64.
        x = torch.randn(2, 9, 48, device=c.device).to(bf16)
        w1 = (torch.randn(96, 48, device=c.device) / 7).to(bf16)
        b1 = torch.randn(96, device=c.device).to(bf16)
        ln_w, ln_b = 1 + 0.1 * torch.randn(96, device=c.device), 0.1 * torch.randn(96, device=c.device)
        results = {}
        for backend, dtype in (("triton", bf16), ("reference", torch.float64)):
            leaves = [t.to(dtype).requires_grad_() for t in (x, w1, b1)]
            hidden = linear_activation(leaves[0], leaves[1], leaves[2], act="quick_gelu", backend=backend)
            act = mlp_activation(hidden, leaves[2], act="gelu", backend=backend)
            out, normed = residual_layer_norm(act, hidden, ln_w.to(dtype), ln_b.to(dtype), backend=backend)
            loss = out.double().square().sum() + (normed.double() * torch.linspace(-1, 1, 96, device=c.device,
                                                                                     dtype=torch.float64)).sum()
            results[backend] = [out.detach(), normed.detach(), *torch.autograd.grad(loss, leaves)]
        for i, (got, ref) in enumerate(zip(results["triton"], results["reference"])):
            c.close(got, ref, bf16, f"elementwise output/gradient {i}", factor=4.0)

    c.case("linear_activation, mlp_activation, residual_layer_norm triton", elementwise)


WORKERS = {"cuda-small": check_cuda_small, "tc-fused": check_tc_fused, "real": check_real,
           "triton-one": check_triton_one}


def run_worker(name: str, deadline: float, dry: bool) -> int:
    import torch

    if dry:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        print("FAIL setup: no CUDA GPU (run with --dry on the CPU)")
        return 1
    torch.manual_seed(0)
    checks = Checks(deadline, dry)
    WORKERS[name](checks)
    return 1 if checks.failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / ".gpu_out"),
                        help="folder for smoke.log and smoke.json (default $OUT)")
    parser.add_argument("--budget", type=float, default=BUDGET_SECONDS, help="seconds for all steps (default 480)")
    parser.add_argument("--dry", action="store_true", help="on the CPU: tiny shapes, Triton interpreted, no sanitizer")
    parser.add_argument("--skip-build", action="store_true", help="use the extension already built")
    parser.add_argument("--steps", nargs="*", choices=[s.name for s in STEPS], help="only these steps")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return run_worker(args.worker, args.deadline or time.time() + 600, args.dry)
    results = run_steps(args)
    return 1 if any(r.status == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
