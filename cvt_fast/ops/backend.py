"""Which implementation answers an op: the one piece of global state of cvt_fast.

Precedence, first that is set wins: the `backend` argument of the call (the model passes
its own), `set_backend(name)`, the environment variable CVT_FAST_BACKEND, then 'auto'.

'auto' picks the fastest implementation that can run on the tensors: on the CPU the
reference; on CUDA the CUDA extension when built and it supports the dtype and head
size, else Triton, else (attention only) PyTorch SDPA, else the reference. An explicit
request that cannot run raises BackendUnavailableError saying why; nothing falls back
silently. Nothing here imports Triton, xformers or the extension unless it is asked for.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Optional

import torch

BACKENDS = ("auto", "reference", "triton", "cuda", "sdpa", "xformers")
OPS = ("attention", "conv_proj")
ENV_VAR = "CVT_FAST_BACKEND"

# Head sizes the fused attention kernels are instantiated for (kernels/attention.py,
# csrc/attention_fwd.cu); the reference and the peers take any.
FUSED_HEAD_DIMS = {"triton": (16, 32, 64, 128), "cuda": (32, 64, 128)}
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
# What each fused backend computes in; the CUDA kernels are not instantiated for float64.
SUPPORTED_DTYPES = {
    "reference": FLOAT_DTYPES,
    "triton": FLOAT_DTYPES,
    "cuda": (torch.bfloat16, torch.float16, torch.float32),
    "sdpa": FLOAT_DTYPES,
    "xformers": (torch.bfloat16, torch.float16, torch.float32),
}
# Backends that only implement attention.
ATTENTION_ONLY = ("sdpa", "xformers")

_global_backend: Optional[str] = None


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this op on these tensors."""


def _check_name(name: str, where: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r} ({where}); expected one of {', '.join(BACKENDS)}")
    return name


def set_backend(name: Optional[str]) -> None:
    """Set the process-wide default backend; None clears it (back to CVT_FAST_BACKEND or 'auto')."""
    global _global_backend
    _global_backend = None if name is None else _check_name(name, "set_backend")


def get_backend() -> str:
    """The default backend when a call passes none: set_backend's, else CVT_FAST_BACKEND's, else 'auto'."""
    if _global_backend is not None:
        return _global_backend
    env = os.environ.get(ENV_VAR)
    if env:
        return _check_name(env, f"environment variable {ENV_VAR}")
    return "auto"


# --------------------------------------------------------------------------- availability probes

def _module_present(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _triton_reason(op: str, device_type: str) -> Optional[str]:
    if not _module_present("triton"):
        return "triton is not installed (pip install triton)"
    kernel_module = f"cvt_fast.kernels.{op}"
    if not _module_present(kernel_module):
        return f"the Triton kernels module {kernel_module} is missing from this installation"
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return ("the tensors are on the CPU and TRITON_INTERPRET is not 1: set TRITON_INTERPRET=1 "
                "before importing triton to run the kernels on the CPU through the interpreter")
    if device_type == "cpu":
        from cvt_fast.kernels.interpreter import interpreter_problem

        problem = interpreter_problem()
        if problem:
            return problem
    if device_type not in ("cpu", "cuda"):
        return f"Triton kernels run on CUDA tensors (or the CPU interpreter), not on {device_type!r}"
    return None


def _cuda_reason(op: str, device_type: str) -> Optional[str]:
    reasons = []
    if device_type != "cuda":
        reasons.append(f"the CUDA kernels need CUDA tensors, got {device_type!r} tensors")
        if not torch.cuda.is_available():
            reasons.append("no CUDA GPU is available (torch.cuda.is_available() is False)")
    from cvt_fast.extension import extension_status, load_extension

    if load_extension() is None:
        reasons.append(f"the CUDA extension cvt_fast._C is {extension_status()}")
    elif not hasattr(torch.ops.cvt_fast, f"{op}_forward_cuda"):
        reasons.append(f"the CUDA extension is built but registers no cvt_fast::{op}_forward_cuda "
                       "(rebuild it from this version's csrc/)")
    return "; ".join(reasons) or None


@functools.lru_cache(maxsize=1)
def xformers_import_error() -> Optional[str]:
    """Why `import xformers.ops` fails (it needs a matching CUDA runtime), or None if it works."""
    if not _module_present("xformers"):
        return "xformers is not installed"
    try:
        importlib.import_module("xformers.ops")
    except Exception as error:  # ImportError, or OSError for a missing libcudart
        return f"xformers is installed but fails to import ({type(error).__name__}: {error})"
    return None


def _xformers_reason(device_type: str) -> Optional[str]:
    if device_type != "cuda":
        return f"xformers has no implementation for {device_type!r} tensors (CUDA only)"
    return xformers_import_error()


# torch.compile runs this at trace time and bakes the answer into the graph: the probes
# (imports, the extension's loading) are not traceable, and their answers do not change.
@torch.compiler.assume_constant_result
def unavailable_reason(op: str, name: str, device_type: str, dtype: Optional[torch.dtype] = None,
                       head_dim: Optional[int] = None, kernel_sizes: Optional[tuple] = None) -> Optional[str]:
    """Why concrete backend `name` cannot run `op` on such tensors, or None if it can.

    head_dim: attention's d; kernel_sizes: conv_proj's (k_q, k_k, k_v). Either may be None
    (unknown: not checked).
    """
    if name in ATTENTION_ONLY and op != "attention":
        return (f"{name!r} implements attention only; {op} runs on 'reference', 'triton' or 'cuda' "
                "(or 'auto')")
    if name == "reference" or name == "sdpa":
        reason = None
    elif name == "triton":
        reason = _triton_reason(op, device_type)
    elif name == "cuda":
        reason = _cuda_reason(op, device_type)
    else:
        reason = _xformers_reason(device_type)
    if reason is not None:
        return reason
    if dtype is not None and dtype not in SUPPORTED_DTYPES[name]:
        supported = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES[name])
        return f"dtype {dtype} is not supported by {name!r} (supported: {supported})"
    if name == "triton" and op == "attention" and device_type == "cuda" and dtype == torch.float64:
        return "float64 attention is not supported by the Triton kernels on the GPU (tl.dot has no fp64 path)"
    if (op == "attention" and head_dim is not None and name in FUSED_HEAD_DIMS
            and head_dim not in FUSED_HEAD_DIMS[name]):
        return (f"head_dim {head_dim} is not supported by the fused {name!r} kernels "
                f"(supported: {', '.join(map(str, FUSED_HEAD_DIMS[name]))}; 'reference' and 'sdpa' take any)")
    if op == "conv_proj" and kernel_sizes is not None and name in ("triton", "cuda"):
        if len(set(kernel_sizes)) != 1:
            return (f"the fused {name!r} projection needs one kernel size for q, k and v, got "
                    f"{tuple(kernel_sizes)} ('reference' takes any)")
        if name == "triton" and kernel_sizes[0] % 2 != 1:
            return f"the Triton projection needs an odd kernel size, got {kernel_sizes[0]} ('reference' takes any)"
    return None


def _auto(op: str, device_type: str, dtype: torch.dtype, head_dim: Optional[int],
          kernel_sizes: Optional[tuple] = None) -> str:
    if device_type != "cuda":
        return "reference"
    candidates = ("cuda", "triton", "sdpa") if op == "attention" else ("cuda", "triton")
    for name in candidates:
        if unavailable_reason(op, name, device_type, dtype, head_dim, kernel_sizes) is None:
            return name
    return "reference"


def _tensor_facts(op: str, tensors: tuple) -> tuple:
    """(device type, dtype, head_dim, kernel_sizes) of an op's inputs, as far as they are given:
    attention (q, k, v) gives q's head size, conv_proj (x, wq, wk, wv) the kernel sizes."""
    if not tensors:
        return "cpu", None, None, None
    first = tensors[0]
    head_dim = int(first.shape[-1]) if op == "attention" and first.dim() > 0 else None
    kernel_sizes = None
    if op == "conv_proj" and len(tensors) >= 4 and all(w.dim() == 4 for w in tensors[1:4]):
        kernel_sizes = tuple(int(w.shape[-1]) for w in tensors[1:4])
    return first.device.type, first.dtype, head_dim, kernel_sizes


def resolve_backend(op: str, requested: Optional[str], *tensors: torch.Tensor) -> str:
    """The concrete backend (never 'auto') that runs `op` on `tensors`.

    `requested` is the call's argument (None: the default from get_backend(); a default of
    'sdpa' or 'xformers' means 'auto' for conv_proj). The first
    tensor decides the device and dtype; attention's q gives the head size, conv_proj's
    (x, wq, wk, wv) the kernel sizes. Raises ValueError for
    unknown names and BackendUnavailableError when the backend cannot run here.
    """
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {', '.join(OPS)}")
    name = get_backend() if requested is None else _check_name(requested, "backend argument")
    if requested is None and name in ATTENTION_ONLY and op != "attention":
        # A process-wide 'sdpa'/'xformers' means "that library for attention"; the other op
        # then takes the best of its own. Passed explicitly for conv_proj, it is an error.
        name = "auto"
    device_type, dtype, head_dim, kernel_sizes = _tensor_facts(op, tensors)
    if name == "auto":
        return _auto(op, device_type, dtype, head_dim, kernel_sizes)
    reason = unavailable_reason(op, name, device_type, dtype, head_dim, kernel_sizes)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} cannot run cvt_fast {op} on {device_type} "
                                      f"tensors: {reason}")
    return name


def available_backends(op: str, device: "torch.device | str" = "cpu", dtype: Optional[torch.dtype] = None,
                       head_dim: Optional[int] = None) -> dict[str, Optional[str]]:
    """For every backend name: None if it can run `op` on `device` (and dtype/head_dim when
    given), else the reason it cannot. 'auto' is always available."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {', '.join(OPS)}")
    device_type = torch.device(device).type
    result: dict[str, Optional[str]] = {"auto": None}
    for name in BACKENDS[1:]:
        result[name] = unavailable_reason(op, name, device_type, dtype, head_dim)
    return result
