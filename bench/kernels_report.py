#!/usr/bin/env python
"""Kernel resource report without a GPU: what every kernel compiles to for Hopper (sm_90).

Triton: the host functions of every kernel module (kernels/attention.py, conv_proj.py,
linear_activation.py, mlp_activation.py, residual_layer_norm.py) are run on meta tensors at CvT
shapes with their launches recording instead of running (`_run` where a module has that one
launch point, else its @triton.jit kernels swapped for recorders; autotuned kernels in `_TUNED`),
so every kernel is compiled with the arguments, specialisations and constexprs that a real call
passes; an autotuned kernel is compiled in every config of its list (the autotuner may pick any
of them, and 'auto' is Triton on CUDA). Each is compiled ahead of time with
`triton.compile(..., target=GPUTarget("cuda", 90, 32))`.
CUDA C++: the built extension cvt_fast/_C*.so, read with cuobjdump (resource usage, ELF
attributes for the launch bounds, SASS).

Per kernel and config: registers per thread, spill stores/loads in bytes (ptxas -v, run with
Triton's own flags on the PTX; the CUDA extension: its stack frame and local-memory
instructions, ptxas's byte counts are not kept in a binary), shared memory (static + dynamic),
threads, CTAs per SM (limited by registers, shared memory, threads and the 32-CTA cap of an
sm_90 SM: 64K registers, 228 KiB shared, 2048 threads), and SASS instruction counts: HGMMA
(wgmma), HMMA (mma.sync), LDGSTS (cp.async), UTMALDG (TMA), LDG (global loads) and of those
LDG.E.128 (16-byte loads), STL/LDL (local memory: spills or stack arrays).

Checks (`--check` exits 1 on a violation; tests/test_kernels_report.py runs the CI subset):
every Triton config spills nothing, and every 16-bit config with matrix products (attention,
the MLP's fused products) runs all of them on wgmma (HGMMA and no HMMA). The CUDA extension is
reported, not checked.

    python bench/kernels_report.py                  # everything: ~400 compiles, about an hour on 2 shared cores
    python bench/kernels_report.py --subset ci --check --no-cuda-extension
    python bench/kernels_report.py --only '^(linear|mlp)_activation' --merge --no-cuda-extension  # one family
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "kernels-sm90.json"

# One sm_90 (H100) SM.
SM90 = {"registers": 65536, "shared_bytes": 228 * 1024, "shared_reserved_per_cta": 1024, "threads": 2048,
        "ctas": 32, "register_unit": 256}

SASS_FEATURES = {
    "wgmma": r"\bHGMMA\b",
    "mma_sync": r"\bHMMA\b",
    "cp_async": r"\bLDGSTS\b",
    "tma": r"\bUTMALDG\b",
    "ldg128": r"\bLDG\.E\.128\b|\bLDG\.E\.[A-Z0-9.]*128\b",
    "local": r"\b(?:STL|LDL)\b",
    "ldg": r"\bLDG\b",
}


# --------------------------------------------------------------------------- tools

def tool(name: str) -> str:
    """Triton's bundled CUDA tool (ptxas, cuobjdump), else the one on the PATH."""
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if bundled.exists():
        return str(bundled)
    found = shutil.which(name) or shutil.which(name, path="/usr/local/cuda/bin")
    if found is None:
        raise FileNotFoundError(f"{name} not found: neither Triton's nvidia/bin nor the PATH has it")
    return found


def _run_tool(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:2])} failed ({done.returncode}): {done.stderr.strip()[:500]}")
    return done.stdout + done.stderr


def sass_counts(sass: str) -> dict[str, int]:
    return {feature: len(re.findall(pattern, sass)) for feature, pattern in SASS_FEATURES.items()}


def ctas_per_sm(registers: int, shared_bytes: int, threads: int) -> tuple[int, str]:
    """Resident CTAs per sm_90 SM and what limits them (registers, shared, threads or ctas)."""
    warps = -(-threads // 32)
    unit = SM90["register_unit"]
    regs_per_warp = -(-max(registers, 1) * 32 // unit) * unit
    limits = {  # on a tie the first is named
        "ctas": SM90["ctas"],
        "registers": (SM90["registers"] // regs_per_warp) // warps,
        "shared": (SM90["shared_bytes"] // (shared_bytes + SM90["shared_reserved_per_cta"])
                   if shared_bytes else SM90["ctas"]),
        "threads": SM90["threads"] // (warps * 32),
    }
    limiter = min(limits, key=limits.get)
    return limits[limiter], limiter


# --------------------------------------------------------------------------- Triton: recording launches

@dataclass
class Launch:
    """One kernel launch as the host code makes it: the @triton.jit function, its positional
    arguments and its keyword meta-parameters (constexprs, num_warps, num_stages)."""
    kernel: Any
    args: tuple
    meta: dict
    case: str
    autotuned: bool = False


class _Recorder:
    """Stands in for an autotuned kernel: kernel[grid](*args, **constexprs) records one launch
    per config of its list."""

    def __init__(self, autotuner, sink: Callable[[Launch], None], case: Callable[[], str]):
        self.autotuner, self.sink, self.case = autotuner, sink, case

    def __getitem__(self, grid):
        def record(*args, **constexprs):
            for cfg in self.autotuner.configs:
                meta = {**constexprs, **cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
                self.sink(Launch(self.autotuner.fn, args, meta, self.case(), autotuned=True))
        return record


class _LaunchRecorder:
    """Stands in for a @triton.jit kernel that host code launches directly (kernel[grid](*args,
    **meta)): records the launch."""

    def __init__(self, fn, sink: Callable[[Launch], None], case: Callable[[], str]):
        self.fn, self.sink, self.case = fn, sink, case

    def __getitem__(self, grid):
        def record(*args, **meta):
            self.sink(Launch(self.fn, args, meta, self.case()))
        return record


@contextlib.contextmanager
def recording_launches(module, case: Callable[[], str]):
    """Run `module`'s host functions on meta tensors with every launch recorded, not run.

    Two ways a kernel module launches: through one seam, `_run(kernel, grid, args, **meta)`
    (attention, conv_proj), or directly, `kernel[grid](...)` (the fused elementwise modules); for
    those every @triton.jit function of the module is swapped for a recorder while the host code
    runs (helpers called only from kernels are never launched, so a recorder in their place is
    never used; the compiles happen after the originals are back). Autotuned kernels (`_TUNED`)
    record one launch per config; the device check (kernels/_launch.py's `check_device`) is skipped,
    meta tensors standing for CUDA ones."""
    from triton.runtime.jit import JITFunction

    from cvt_fast.kernels import _launch

    launches: list[Launch] = []
    seams = ("_run", "_TUNED")
    saved = {name: getattr(module, name) for name in seams if hasattr(module, name)}
    direct = {} if "_run" in saved else {name: value for name, value in vars(module).items()
                                         if isinstance(value, JITFunction)}
    saved.update(direct)
    check_device = _launch.check_device
    _launch.check_device = lambda *args, **kwargs: None
    if "_run" in saved:
        module._run = lambda kernel, grid, args, **meta: launches.append(Launch(kernel, args, meta, case()))
    recorders = {value: _LaunchRecorder(value, launches.append, case) for value in direct.values()}
    for name, value in direct.items():
        setattr(module, name, recorders[value])
    if "_TUNED" in saved:  # keyed by names (attention) or by the kernels themselves (linear_activation)
        module._TUNED = {recorders.get(key, key): _Recorder(tuner, launches.append, case)
                         for key, tuner in saved["_TUNED"].items()}
    try:
        yield launches
    finally:
        _launch.check_device = check_device
        for name, value in saved.items():
            setattr(module, name, value)


KERNEL_MODULES = ("attention", "conv_proj", "mlp_activation", "linear_activation", "residual_layer_norm")


def _use_gpu_kernels() -> None:
    """The kernels must be decorated as GPU kernels, not interpreted: Triton reads the variable
    when a kernel module is imported (the first *_launches call)."""
    for name in KERNEL_MODULES:
        module = sys.modules.get(f"cvt_fast.kernels.{name}")
        if module is not None and any(type(value).__name__ == "InterpretedFunction" for value in vars(module).values()):
            raise RuntimeError("the kernels were imported under TRITON_INTERPRET=1: run this report in a "
                               "process of its own (python bench/kernels_report.py)")
    os.environ["TRITON_INTERPRET"] = "0"


def _meta(shape: tuple, dtype) -> "Any":
    import torch
    return torch.empty(shape, dtype=dtype, device="meta")


@contextlib.contextmanager
def _env(name: str, value: str):
    """Environment variable `name` set to `value` for the block, then restored."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            del os.environ[name]
        else:
            os.environ[name] = previous


def attention_launches(subset: str) -> list[Launch]:
    """Forward and backward launches (the one-pass backward and the split one) of the Triton
    attention at a CvT stage-3-like shape (B=8, Nq=197, Nkv=50, 6 heads), and the one-pass
    backward with atomic dQ at CvT-13's stage-1 shape (Nq=3136, Nkv=784, 1 head), for every head size
    and dtype the kernels take on a GPU."""
    _use_gpu_kernels()
    import torch
    from cvt_fast.kernels import attention

    head_dims = (64, 128) if subset == "ci" else attention.SUPPORTED_HEAD_DIMS
    dtypes = (torch.bfloat16,) if subset == "ci" else (torch.bfloat16, torch.float16, torch.float32)
    current = {"case": ""}
    launches: list[Launch] = []
    with recording_launches(attention, lambda: current["case"]) as recorded:
        for dtype in dtypes:
            for d in head_dims:
                batch, n_q, n_kv, heads = 8, 197, 50, 6
                current["case"] = f"attention d={d} {_dtype(dtype)}"
                # As the model passes them: per-head views of (B, N, H*d) Linear outputs.
                q = _meta((batch, n_q, heads * d), dtype).view(batch, n_q, heads, d)
                k = _meta((batch, n_kv, heads * d), dtype).view(batch, n_kv, heads, d)
                v = _meta((batch, n_kv, heads * d), dtype).view(batch, n_kv, heads, d)
                out, lse = attention.attention_forward(q, k, v, 0.05)
                attention.attention_backward(torch.empty_like(out), q, k, v, out, lse, 0.05)
                # The split backward (dK/dV + dQ kernels), which the deterministic mode runs.
                with _env(attention.DETERMINISTIC_ENV, "1"):
                    attention.attention_backward(torch.empty_like(out), q, k, v, out, lse, 0.05)
                # Nkv=50 fits one K/V tile, where the one-pass backward stores dQ; at CvT-13
                # stage 1's Nkv=784 it adds dQ atomically from several tiles (another compile).
                current["case"] = f"attention atomic-dq d={d} {_dtype(dtype)}"
                n_q, n_kv, heads = 3136, 784, 1
                q = _meta((batch, n_q, heads * d), dtype).view(batch, n_q, heads, d)
                k = _meta((batch, n_kv, heads * d), dtype).view(batch, n_kv, heads, d)
                v = _meta((batch, n_kv, heads * d), dtype).view(batch, n_kv, heads, d)
                out = _meta((batch, n_q, heads * d), dtype)
                lse = _meta((batch, heads, n_q), torch.float32)
                attention.attention_backward(torch.empty_like(out), q, k, v, out, lse, 0.05)
        launches.extend(recorded)
    return launches


# (label, height, width, channels, has_cls, stride_q, stride_kv): CvT-13 at 224, stages 1 and 3,
# and the generic kernels' geometries (equal strides; unequal strides other than 1/2).
CONV_PROJ_SHAPES = [
    ("s1s2 56x56 C=64", 56, 56, 64, False, 1, 2),
    ("s1s2 14x14+cls C=384", 14, 14, 384, True, 1, 2),
    ("generic 14x14+cls C=384 s1/1", 14, 14, 384, True, 1, 1),
    ("generic 14x14+cls C=384 s1/3", 14, 14, 384, True, 1, 3),
]


def conv_proj_launches(subset: str) -> list[Launch]:
    """Eval forward (BatchNorm folded into biases), training forward (no biases) and backward, and
    training with BatchNorm (conv_proj_bn: statistics, normalising forward, backward)."""
    _use_gpu_kernels()
    import torch
    from cvt_fast.kernels import conv_proj

    shapes = CONV_PROJ_SHAPES[:2] if subset == "ci" else CONV_PROJ_SHAPES
    dtypes = (torch.bfloat16,) if subset == "ci" else (torch.bfloat16, torch.float16, torch.float32)
    current = {"case": ""}
    launches: list[Launch] = []
    with recording_launches(conv_proj, lambda: current["case"]) as recorded:
        for dtype in dtypes:
            for label, height, width, channels, has_cls, stride_q, stride_kv in shapes:
                batch = 8
                x = _meta((batch, int(has_cls) + height * width, channels), dtype)
                weights = [_meta((channels, 1, 3, 3), dtype) for _ in range(3)]
                biases = [_meta((channels,), dtype) for _ in range(3)]
                geometry = (height, width, has_cls, stride_q, stride_kv, 1, 1)
                current["case"] = f"conv_proj eval-fwd {label} {_dtype(dtype)}"
                q, k, v = conv_proj.conv_proj_forward(x, *weights, *biases, *geometry)
                current["case"] = f"conv_proj train-fwd {label} {_dtype(dtype)}"
                conv_proj.conv_proj_forward(x, *weights, None, None, None, *geometry)
                current["case"] = f"conv_proj bwd {label} {_dtype(dtype)}"
                conv_proj.conv_proj_backward(torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), x,
                                             *weights, *geometry)
                # Training with BatchNorm (cvt_fast::conv_proj_bn): statistics kernel, then the
                # normalising forward; the backward with BatchNorm's reductions. BatchNorm's own
                # parameters stay float32 (as under autocast).
                gammas = [_meta((channels,), torch.float32) for _ in range(3)]
                betas = [_meta((channels,), torch.float32) for _ in range(3)]
                eps = [1e-5] * 3
                current["case"] = f"conv_proj bn-fwd {label} {_dtype(dtype)}"
                q, k, v, mean, var = conv_proj.conv_proj_bn_forward(x, *weights, *gammas, *betas, *geometry, eps)
                current["case"] = f"conv_proj bn-bwd {label} {_dtype(dtype)}"
                conv_proj.conv_proj_bn_backward(torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), x,
                                                *weights, *gammas, *betas, q, k, v, mean, var, *geometry, eps)
        launches.extend(recorded)
    return launches


# The fused elementwise ops (issue 18) at CvT-13 at 224, batch 8: (label, tokens, C). The MLP's
# products and activation run at the hidden width 4C. Stages 1 and 3: in the products the stage
# changes only the row count's specialisation (M = 8 * 3136 is a multiple of 16, 8 * 197 is not),
# in the activation the rows per backward program; the LayerNorm's tile shape follows C, so it also
# runs at stage 2 and at CvT-W24's widest stage (C = 1024 at 384: the largest row in registers).
MLP_SHAPES = [("s1 3136 tok C=64", 3136, 64), ("s3 197 tok C=384", 197, 384)]
RESIDUAL_SHAPES = MLP_SHAPES[:1] + [("s2 784 tok C=192", 784, 192)] + MLP_SHAPES[1:] + [
    ("W24-s3 577 tok C=1024", 577, 1024)]
# 'auto' takes Triton for these ops on CUDA in every float dtype (the table limits only fp64 attention).
ELEMENTWISE_DTYPES = ("bfloat16", "float16", "float32", "float64")
ACTIVATIONS = ("quick_gelu", "gelu")
FUSED_BATCH = 8


def _dtypes(names) -> tuple:
    import torch
    return tuple(getattr(torch, name) for name in names)


def _family_launches(module_name: str, run: Callable[[Any, Callable[[str], None]], None]) -> list[Launch]:
    """The launches that `run(module, set_case)` makes through module cvt_fast.kernels.<module_name>."""
    _use_gpu_kernels()
    import importlib
    module = importlib.import_module(f"cvt_fast.kernels.{module_name}")
    current = {"case": ""}
    with recording_launches(module, lambda: current["case"]) as recorded:
        run(module, lambda case: current.update(case=case))
        return list(recorded)


def linear_activation_launches(subset: str) -> list[Launch]:
    """fc1's product with the activation in its epilogue (forward, keeping fc1's output for the
    backward or not) and fc2's input-gradient product with the activation's backward in its
    epilogue (writing the recomputed activation or not), each with fc1's bias as the model has it;
    16-bit: every config of the autotune lists. 'ci': bf16, exact GELU (the heavier epilogue),
    stage 3, the training variants."""
    shapes = MLP_SHAPES[1:] if subset == "ci" else MLP_SHAPES
    dtypes = _dtypes(("bfloat16",) if subset == "ci" else ELEMENTWISE_DTYPES)
    acts = ("gelu",) if subset == "ci" else ACTIVATIONS
    flags = (True,) if subset == "ci" else (True, False)

    def run(kernels, set_case):
        for dtype in dtypes:
            for label, tokens, channels in shapes:
                hidden_width = 4 * channels
                x = _meta((FUSED_BATCH, tokens, channels), dtype)
                fc1_weight, fc1_bias = _meta((hidden_width, channels), dtype), _meta((hidden_width,), dtype)
                fc2_weight = _meta((channels, hidden_width), dtype)
                hidden = _meta((FUSED_BATCH, tokens, hidden_width), dtype)
                for act in acts:
                    for flag in flags:
                        set_case(f"linear_activation fwd {label} {act}{'' if flag else ' eval'} {_dtype(dtype)}")
                        kernels.linear_activation_forward(x, fc1_weight, fc1_bias, act, keep_hidden=flag)
                        set_case(f"linear_activation bwd {label} {act}{'' if flag else ' no-act'} {_dtype(dtype)}")
                        kernels.activation_grad_through_linear(x, fc2_weight, hidden, fc1_bias, act,
                                                               with_activation=flag)
    return _family_launches("linear_activation", run)


def mlp_activation_launches(subset: str) -> list[Launch]:
    """The MLP's bias + activation alone at the hidden width, forward and backward (with the
    recomputed activation, as the lean MLP asks for it). 'ci': bf16, exact GELU, stage 3."""
    shapes = MLP_SHAPES[1:] if subset == "ci" else MLP_SHAPES
    dtypes = _dtypes(("bfloat16",) if subset == "ci" else ELEMENTWISE_DTYPES)
    acts = ("gelu",) if subset == "ci" else ACTIVATIONS

    def run(kernels, set_case):
        for dtype in dtypes:
            for label, tokens, channels in shapes:
                x = _meta((FUSED_BATCH, tokens, 4 * channels), dtype)
                bias = _meta((4 * channels,), dtype)
                for act in acts:
                    set_case(f"mlp_activation fwd {label} {act} {_dtype(dtype)}")
                    kernels.mlp_activation_forward(x, bias, act)
                    set_case(f"mlp_activation bwd {label} {act} {_dtype(dtype)}")
                    kernels.mlp_activation_backward(x, x, bias, act, True)
    return _family_launches("mlp_activation", run)


def residual_layer_norm_launches(subset: str) -> list[Launch]:
    """Residual add + drop path + LayerNorm, forward and backward, with and without the drop-path
    scale and the branch's bias (the model uses all four: drop path only where its rate is above
    0, the bias only after the MLP). LayerNorm parameters in fp32, as the model keeps them.
    'ci': bf16, scale and bias, CvT-13's stage 3 and CvT-W24's widest stage."""
    import torch
    shapes = RESIDUAL_SHAPES[2:] if subset == "ci" else RESIDUAL_SHAPES
    dtypes = _dtypes(("bfloat16",) if subset == "ci" else ELEMENTWISE_DTYPES)
    variants = ((True, True),) if subset == "ci" else ((True, True), (True, False), (False, True), (False, False))

    def run(kernels, set_case):
        for dtype in dtypes:
            for label, tokens, channels in shapes:
                x = _meta((FUSED_BATCH, tokens, channels), dtype)
                stats = _meta((FUSED_BATCH, tokens), torch.float64 if dtype == torch.float64 else torch.float32)
                weight = _meta((channels,), torch.float32)
                scale = _meta((FUSED_BATCH,), torch.float32)
                for with_scale, with_bias in variants:
                    flags = "".join((" scale" if with_scale else "", " branch-bias" if with_bias else ""))
                    set_case(f"residual_layer_norm fwd {label}{flags} {_dtype(dtype)}")
                    kernels.residual_layer_norm_forward(x, x, _meta((channels,), dtype) if with_bias else None,
                                                        scale if with_scale else None, weight, weight, 1e-5)
                    if with_bias:  # the backward has no branch-bias flag: one launch per scale flag
                        set_case(f"residual_layer_norm bwd {label}{' scale' if with_scale else ''} {_dtype(dtype)}")
                        kernels.residual_layer_norm_backward(x, x, x, stats, stats, scale if with_scale else None,
                                                             weight)
    return _family_launches("residual_layer_norm", run)


# Every kernel family of the package: its module under kernels/ and what records its launches.
FAMILIES = {
    "attention": attention_launches,
    "conv_proj": conv_proj_launches,
    "linear_activation": linear_activation_launches,
    "mlp_activation": mlp_activation_launches,
    "residual_layer_norm": residual_layer_norm_launches,
}


def _dtype(dtype) -> str:
    return str(dtype).replace("torch.", "")


# --------------------------------------------------------------------------- Triton: compiling

def _target():
    from triton.backends.compiler import GPUTarget
    return GPUTarget("cuda", 90, 32)


def specialise(launch: Launch, target) -> tuple:
    """(signature, constexprs, attrs, options) exactly as Triton's runtime derives them for this
    launch (its own binder and argument packing; internals of triton.runtime.jit, Triton 3.x)."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    backend = make_backend(target)
    try:
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, options = binder(*launch.args, **launch.meta)
        options, signature, constexprs, attrs = fn._pack_args(backend, launch.meta, bound, specialization, options)
    except (AttributeError, TypeError) as error:
        import triton
        raise RuntimeError(f"this report reads Triton's launch specialisation through triton.runtime.jit "
                           f"internals, which differ in Triton {triton.__version__}: {error}") from error
    return signature, constexprs, attrs, options


def _config_label(meta: dict) -> str:
    keys = [k for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_C", "TILE_H", "TILE_W", "ROWS_PER_PROGRAM")
            if k in meta]
    parts = [f"{k}={meta[k]}" for k in keys]
    parts += [f"warps={meta.get('num_warps', 4)}", f"stages={meta.get('num_stages', 3)}"]
    flags = [k for k in ("HAS_BQ", "HAS_BK", "HAS_BV", "HAS_B0", "HAS_CLS", "HAS_BIAS", "KEEP_HIDDEN",
                         "WITH_ACTIVATION", "HAS_SCALE", "HAS_BRANCH_BIAS") if meta.get(k)]
    if flags:
        parts.append("+" + "+".join(flags))
    return " ".join(parts)


def ptxas_usage(ptx: str, arch: str, fp_fusion: bool = True) -> dict:
    """Registers, spills and stack of one PTX kernel, from ptxas -v with Triton's own flags."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        cmd = [tool("ptxas"), "-lineinfo", *([] if fp_fusion else ["--fmad=false"]), "-v", "--regAllocOptLevel=2",
               f"--gpu-name={arch}", str(src), "-o", str(Path(tmp) / "kernel.cubin")]
        log = _run_tool(cmd)
    stack = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    regs = re.search(r"Used (\d+) registers", log)
    return {"registers_ptxas": int(regs.group(1)) if regs else None,
            "stack_bytes": int(stack.group(1)) if stack else None,
            "spill_store_bytes": int(stack.group(2)) if stack else None,
            "spill_load_bytes": int(stack.group(3)) if stack else None}


def cubin_usage(cubin: bytes) -> tuple[dict, str]:
    """(cuobjdump resource usage of the one kernel in a cubin, its SASS)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        usage = _run_tool([tool("cuobjdump"), "--dump-resource-usage", str(path)])
        sass = _run_tool([tool("cuobjdump"), "-sass", str(path)])
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    return {k.lower(): int(v) for k, v in fields.items()}, sass


@dataclass
class Row:
    source: str
    kernel: str
    case: str
    config: str
    registers: Optional[int] = None
    spill_store_bytes: Optional[int] = None
    spill_load_bytes: Optional[int] = None
    stack_bytes: Optional[int] = None
    shared_bytes: Optional[int] = None
    threads: Optional[int] = None
    ctas_per_sm: Optional[int] = None
    occupancy_limit: Optional[str] = None
    sass: dict = field(default_factory=dict)
    has_dot: bool = False
    sixteen_bit: bool = False
    checked: bool = False
    violations: list = field(default_factory=list)
    note: str = ""
    compile_s: Optional[float] = None


def analyse_triton(launch: Launch, target, cache: dict) -> Row:
    signature, constexprs, attrs, options = specialise(launch, target)
    key = (launch.kernel.cache_key, repr(sorted(signature.items())), repr(sorted(constexprs.items(), key=str)),
           repr(sorted(attrs.items(), key=str)), repr(sorted(options.__dict__.items(), key=str)))
    row = Row("triton", launch.kernel.__name__, launch.case, _config_label(launch.meta))
    if key in cache:
        return cache[key]
    import triton
    from triton.compiler import ASTSource

    start = time.perf_counter()
    compiled = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=target,
                              options=options.__dict__)
    row.compile_s = round(time.perf_counter() - start, 2)
    usage, sass = cubin_usage(compiled.asm["cubin"])
    spills = ptxas_usage(compiled.asm["ptx"], f"sm_{target.arch}a", options.enable_fp_fusion)
    row.registers = usage.get("reg")
    row.stack_bytes, row.spill_store_bytes, row.spill_load_bytes = (
        spills["stack_bytes"], spills["spill_store_bytes"], spills["spill_load_bytes"])
    row.shared_bytes = int(compiled.metadata.shared) + usage.get("shared", 0)
    row.threads = int(compiled.metadata.num_warps) * 32
    row.ctas_per_sm, row.occupancy_limit = ctas_per_sm(row.registers or 0, row.shared_bytes, row.threads)
    row.sass = sass_counts(sass)
    ttgir = compiled.asm.get("ttgir", "")
    row.has_dot = "tt.dot" in ttgir or "warp_group_dot" in ttgir or "ttng.warp_group_dot" in ttgir
    dtype = signature.get(launch.kernel.arg_names[0], "")
    row.sixteen_bit = dtype in ("*bf16", "*fp16")
    row.checked = True
    row.violations = triton_violations(row)
    cache[key] = row
    return row


def triton_violations(row: Row) -> list[str]:
    """What a config that 'auto' can pick must not do: spill, or (16-bit, with matrix products:
    attention, the MLP's fused products) run any of its products off wgmma. fp32 and fp64 are
    the accuracy paths (input_precision="ieee": FMA units by design); the elementwise and
    convolution kernels have no matrix products."""
    problems = []
    if (row.spill_store_bytes or 0) or (row.spill_load_bytes or 0):
        problems.append(f"spills ({row.spill_store_bytes} B stored, {row.spill_load_bytes} B loaded)")
    if row.has_dot and row.sixteen_bit:
        if not row.sass.get("wgmma"):
            problems.append("16-bit matrix products are not on wgmma (no HGMMA)")
        elif row.sass.get("mma_sync"):
            problems.append(f"part of the matrix products fell back from wgmma to mma.sync "
                            f"({row.sass['mma_sync']} HMMA)")
    return problems


# --------------------------------------------------------------------------- CUDA extension

def extension_path() -> Optional[Path]:
    found = sorted((REPO_ROOT / "cvt_fast").glob("_C*.so"))
    return found[0] if found else None


def _demangle(names: Iterable[str]) -> dict[str, str]:
    names = list(names)
    filt = shutil.which("c++filt") or shutil.which("cu++filt", path="/usr/local/cuda/bin")
    if not filt or not names:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def _short_cuda_name(demangled: str) -> tuple[str, str]:
    """('attention_bwd_dkdv_tc_kernel', 'c10::BFloat16, 128') from a demangled kernel name."""
    match = re.search(r"(\w+)<(.*)>\(", demangled)
    if match:
        return match.group(1), match.group(2).replace("c10::", "")
    return demangled.split("(")[0].split("::")[-1], ""


def analyse_extension(path: Path) -> list[Row]:
    usage = _run_tool([tool("cuobjdump"), "--dump-resource-usage", str(path)])
    elf = _run_tool([tool("cuobjdump"), "-elf", str(path)])
    sass = _run_tool([tool("cuobjdump"), "-sass", str(path)])
    resources = {m.group(1): {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", m.group(2))}
                 for m in re.finditer(r"Function (\S+):\n(.*)", usage)}
    max_threads: dict[str, int] = {}
    current = None
    lines = elf.splitlines()
    for i, line in enumerate(lines):
        header = re.match(r"^\.nv\.info\.(\S+)", line)
        if header:
            current = header.group(1)
        elif current and "EIATTR_MAX_THREADS" in line:
            values = re.findall(r"0x[0-9a-f]+", " ".join(lines[i + 1:i + 3]))
            if values:
                max_threads[current] = int(values[0], 16)
    sass_by_function = {}
    for block in re.split(r"\n\s*Function : ", sass)[1:]:
        name, _, body = block.partition("\n")
        sass_by_function[name.strip()] = body
    names = _demangle(resources)
    rows = []
    for mangled, res in resources.items():
        kernel, params = _short_cuda_name(names[mangled])
        row = Row("cuda", kernel, "csrc (built extension)", params, registers=res.get("reg"),
                  stack_bytes=res.get("stack"), shared_bytes=res.get("shared"), threads=max_threads.get(mangled))
        row.sass = sass_counts(sass_by_function.get(mangled, ""))
        if row.threads:
            row.ctas_per_sm, row.occupancy_limit = ctas_per_sm(row.registers or 0, row.shared_bytes or 0, row.threads)
        local = row.sass.get("local", 0)
        if (row.stack_bytes or 0) or local:
            row.note = (f"uses local memory: {row.stack_bytes} B stack frame, {local} STL/LDL instructions "
                        "(spills or stack arrays; ptxas -v of csrc/ gives the bytes)")
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- output

def markdown(rows: list[Row]) -> str:
    head = ["source", "kernel", "case", "config", "regs", "spill st/ld B", "stack B", "smem KiB", "threads",
            "CTAs/SM (limit)", "HGMMA", "HMMA", "LDGSTS", "TMA", "LDG (.128)", "STL/LDL", "violations / note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        spill = "-" if r.spill_store_bytes is None else f"{r.spill_store_bytes}/{r.spill_load_bytes}"
        smem = "-" if r.shared_bytes is None else f"{r.shared_bytes / 1024:.1f}"
        ctas = "-" if r.ctas_per_sm is None else f"{r.ctas_per_sm} ({r.occupancy_limit})"
        cells = [r.source, r.kernel, r.case, r.config, r.registers, spill, r.stack_bytes, smem, r.threads, ctas,
                 *(r.sass.get(k) for k in ("wgmma", "mma_sync", "cp_async", "tma")),
                 f"{r.sass.get('ldg')} ({r.sass.get('ldg128')})", r.sass.get("local"),
                 "; ".join(r.violations) or r.note]
        lines.append("| " + " | ".join("-" if c is None else str(c) for c in cells) + " |")
    return "\n".join(lines)


def environment() -> dict:
    import torch
    import triton
    env = {"torch": torch.__version__, "triton": triton.__version__, "target": "cuda sm_90 (GPUTarget('cuda', 90, 32))"}
    try:
        env["ptxas"] = _run_tool([tool("ptxas"), "--version"]).strip().splitlines()[-1]
    except (OSError, RuntimeError) as error:
        env["ptxas"] = f"unavailable: {error}"
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO_ROOT).stdout.strip()
    env["git_commit"] = commit or None
    return env


def _family(row: dict) -> str:
    """'cuda' for the extension's rows, else the Triton case's first word (attention, conv_proj, ...)."""
    return row["source"] if row["source"] != "triton" else row["case"].split()[0]


def merged_rows(previous: list[dict], fresh: list[dict]) -> list[dict]:
    """A previous report's rows with the re-run ones replaced: a previous row goes when the fresh
    rows have its case (Triton) or any row of the extension (cuda); the fresh rows of a family take
    the place of the first row of it that went; those of new families follow the Triton rows (or,
    for the extension, the end)."""
    fresh_cases = {r["case"] for r in fresh if r["source"] == "triton"}
    fresh_extension = any(r["source"] == "cuda" for r in fresh)
    placed: set[str] = set()
    out: list[dict] = []
    for row in previous:
        gone = row["case"] in fresh_cases if row["source"] == "triton" else fresh_extension
        if not gone:
            out.append(row)
        elif _family(row) not in placed:
            placed.add(_family(row))
            out.extend(r for r in fresh if _family(r) == _family(row))
    new_families = [r for r in fresh if _family(r) not in placed]
    after_triton = max((i + 1 for i, r in enumerate(out) if r["source"] == "triton"), default=0)
    return out[:after_triton] + [r for r in new_families if r["source"] == "triton"] + out[after_triton:] + [
        r for r in new_families if r["source"] != "triton"]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--subset", choices=["all", "ci"], default="all",
                        help="'ci': bf16 only, attention d=64 and 128, conv_proj at CvT-13 stages 1 and 3, "
                             "the fused elementwise kernels at CvT-13's stage 3 (and CvT-W24's for the LayerNorm)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON path (a .md table is written beside it)")
    parser.add_argument("--no-cuda-extension", action="store_true", help="skip the CUDA extension's report")
    parser.add_argument("--extension", type=Path, default=None, help="the extension .so (default: cvt_fast/_C*.so)")
    parser.add_argument("--only", default=None, help="regular expression: only the Triton cases it finds "
                                                       "(e.g. 'conv_proj eval', 'd=64 bfloat16' or '^linear_activation')")
    parser.add_argument("--merge", action="store_true",
                        help="update --out in place: the rows of the cases run now replace their old rows, the "
                             "others are kept (with --only, to regenerate one family of a full report)")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when a Triton config spills or a 16-bit matrix product leaves wgmma")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    target = _target()
    cache: dict = {}
    rows: list[Row] = []
    for family, launches_of in FAMILIES.items():
        for launch in launches_of(args.subset):
            if args.only and not re.search(args.only, launch.case):
                continue
            row = analyse_triton(launch, target, cache)
            if row.case != launch.case:  # the same compiled kernel reached from another case
                row = Row(**{**row.__dict__, "case": launch.case, "compile_s": 0.0})
            rows.append(row)
            print(f"{row.kernel:>32} {row.case:<52} {row.config:<64} regs={row.registers} "
                  f"spill={row.spill_store_bytes}/{row.spill_load_bytes} {'; '.join(row.violations)}", flush=True)
    if not args.no_cuda_extension:
        path = args.extension or extension_path()
        if path is None:
            print("no CUDA extension built (cvt_fast/_C*.so): its report is skipped", flush=True)
        else:
            rows.extend(analyse_extension(path))

    seconds = round(time.perf_counter() - started, 1)
    payload = {"report": "kernels", "environment": environment(), "subset": args.subset, "seconds": seconds,
               "rules": ["every Triton config: no spills (ptxas -v spill stores/loads 0)",
                         "16-bit Triton configs with matrix products (attention, the MLP's fused products): all "
                         "of them on wgmma (HGMMA, no HMMA)",
                         "the CUDA extension is reported, not checked"]}
    row_dicts = [r.__dict__ for r in rows]
    if args.merge and args.out.exists():
        previous = json.loads(args.out.read_text())
        row_dicts = merged_rows(previous.get("rows", []), row_dicts)
        payload["subset"] = previous.get("subset", args.subset)
        payload["seconds"] = previous.get("seconds")
        payload["updates"] = previous.get("updates", []) + [
            {"only": args.only, "subset": args.subset, "rows": len(rows), "seconds": seconds,
             "git_commit": payload["environment"]["git_commit"]}]
    violations = [f"{r['kernel']} [{r['case']}; {r['config']}]: {v}"
                  for r in row_dicts if r["source"] == "triton" for v in r["violations"]]
    payload.update(violations=violations, rows=row_dicts)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    table = markdown([Row(**r) for r in row_dicts])
    args.out.with_suffix(".md").write_text(f"# Kernel resources for sm_90 ({payload['environment']['triton']} "
                                           f"Triton, subset {payload['subset']})\n\n{table}\n")
    print("\n" + table)
    print(f"\n{len(rows)} kernels/configs in {seconds} s; violations: {len(violations)}")
    for line in violations:
        print("  " + line)
    print(f"results: {args.out}")
    return 1 if args.check and violations else 0


if __name__ == "__main__":
    sys.exit(main())
