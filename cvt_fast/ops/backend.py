"""Which implementation answers an op: the one piece of global state of cvt_fast.

Precedence, first that is set wins: the `backend` argument of the call (the model passes
its own), `set_backend(name)`, the environment variable CVT_FAST_BACKEND, then 'auto'.

'auto', per call:
- CPU tensors: per op family of the model (CPU_FAMILIES), the path the tuning file measured
  fastest on this CPU (its name from /proc/cpuinfo; `python bench/tune.py --device cpu` writes
  the entry) for training (grad enabled) or inference: the model's official eager path, 'reference'
  or 'sdpa' (attention). The model runs the official path itself (cvt_fast/model.py asks
  `auto_cpu_path`); an op called directly where that path is the official one takes 'reference'.
  Without an entry for this CPU: the official path (measured fastest on this project's CPU).
- Other non-CUDA devices: 'reference'.
- CUDA tensors: the backend that the tuning file (cvt_fast/ops/tuning.py, written by
  `python bench/tune.py` on that GPU) measured fastest for this op and dtype on this device
  name, among those whose GPU tests passed there and that can run these tensors. Without
  such evidence: 'triton' (the backend whose GPU tests have passed on an H100), else for
  attention 'sdpa', else 'reference', each only when the one before cannot run (the reason
  is in `explain_backend`).
An explicit request that cannot run raises BackendUnavailableError saying why; nothing falls
back silently. What each backend can run comes from the table in backends.py.
"""
from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from typing import Optional

import torch

from cvt_fast.ops import tuning
from cvt_fast.ops.backends import BACKENDS, OPS, TABLE, backends_for, op_family, xformers_import_error  # noqa: F401
from cvt_fast.ops.contract import FLOAT_DTYPES, dtype_names

ENV_VAR = "CVT_FAST_BACKEND"
# 'auto' on CUDA without a measurement: Triton first (its GPU tests passed on an H100; the CUDA
# extension's tensor-core backward has never run on a GPU), then the first of these that can run.
DEFAULT_CUDA_ORDER = ("triton", "sdpa", "reference")

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


def constant_at_trace_time(fn):
    """Mark `fn` as torch.compiler.assume_constant_result does, without importing torch._dynamo.

    That decorator imports torch._dynamo (and through it Triton), which costs seconds at
    `import cvt_fast` and breaks the promise that Triton stays unimported until a Triton
    kernel is used. Its whole effect is this attribute (torch 2.6 to 2.14);
    tests/test_ops_on_import.py checks that it still is.
    """
    fn._dynamo_marked_constant = True
    return fn


def _check_op(op: str) -> None:
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {', '.join(OPS)}")


# --------------------------------------------------------------------------- what a backend can run

# torch.compile runs this at trace time and bakes the answer into the graph: the probes
# (imports, the extension's loading) are not traceable, and their answers do not change.
@constant_at_trace_time
def unavailable_reason(op: str, name: str, device_type: str, dtype: Optional[torch.dtype] = None,
                       head_dim: Optional[int] = None, kernel_sizes: Optional[tuple] = None) -> Optional[str]:
    """Why backend `name` (not 'auto') cannot run `op` on such tensors, or None if it can.

    head_dim: attention's d; kernel_sizes: conv_proj's (k_q, k_k, k_v). Either may be None
    (unknown: not checked).
    """
    record = TABLE[name]
    if op not in record.ops:
        able = ", ".join(repr(n) for n in backends_for(op))
        return f"{name!r} implements {' and '.join(record.ops)} only; {op} runs on {able} (or 'auto')"
    reason = record.probe(op, device_type)
    if reason is not None:
        return reason
    if dtype is not None and dtype not in record.dtypes:
        return f"dtype {dtype} is not supported by {name!r} (supported: {dtype_names(record.dtypes)})"
    for limit in record.dtype_limits:
        if (limit.op, limit.device_type, limit.dtype) == (op, device_type, dtype):
            return limit.why
    if op == "attention" and head_dim is not None and record.head_dims is not None \
            and head_dim not in record.head_dims:
        any_size = " and ".join(repr(b.name) for b in TABLE.values() if "attention" in b.ops and b.head_dims is None)
        return (f"head_dim {head_dim} is not supported by the fused {name!r} kernels "
                f"(supported: {', '.join(map(str, record.head_dims))}; {any_size} take any)")
    if op == "conv_proj" and kernel_sizes is not None and record.kernel_rule is not None:
        return record.kernel_rule(name, tuple(kernel_sizes))
    return None


def available_backends(op: str, device: "torch.device | str" = "cpu", dtype: Optional[torch.dtype] = None,
                       head_dim: Optional[int] = None) -> dict[str, Optional[str]]:
    """For every backend name: None if it can run `op` on `device` (and dtype/head_dim when
    given), else the reason it cannot. 'auto' is always available."""
    _check_op(op)
    device_type = torch.device(device).type
    result: dict[str, Optional[str]] = {"auto": None}
    for name in TABLE:
        result[name] = unavailable_reason(op, name, device_type, dtype, head_dim)
    return result


# --------------------------------------------------------------------------- 'auto'

@dataclass(frozen=True)
class BackendChoice:
    """The backend an op call takes, and why (what `explain_backend` returns)."""
    backend: str
    reason: str

    def __str__(self) -> str:
        return f"{self.backend}: {self.reason}"


@functools.lru_cache(maxsize=None)
def cuda_device_name(index: Optional[int]) -> str:
    return torch.cuda.get_device_name(index)


def _dtype_name(dtype: Optional[torch.dtype]) -> str:
    return str(dtype).replace("torch.", "") if dtype is not None else "unknown dtype"


# --------------------------------------------------------------------------- 'auto' on the CPU

# The model's op families that 'auto' chooses a path for on the CPU, each with its candidates:
# 'official' is the model's own eager path (the official code's ops), the others backends of
# the fused ops. 'mlp' is the MLP's fused activation (linear_activation, mlp_activation).
CPU_FAMILIES = {
    "attention": ("official", "reference", "sdpa"),
    "conv_proj": ("official", "reference"),
    "mlp": ("official", "reference"),
    "residual_layer_norm": ("official", "reference"),
}
_OP_CPU_FAMILY = {"attention": "attention", "conv_proj": "conv_proj", "mlp_activation": "mlp",
                  "linear_activation": "mlp", "residual_layer_norm": "residual_layer_norm"}
# Without evidence for this CPU: the official path, measured fastest for every family on this
# project's CPU (the entry in cvt_fast/ops/tuning.json), and by definition never slower than it.
CPU_DEFAULT_PATH = "official"


@functools.lru_cache(maxsize=1)
def cpu_name() -> str:
    """This CPU's name, the key of its entry in the tuning file: /proc/cpuinfo's "model name",
    else platform.processor(), else "unknown CPU"."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor().strip() or "unknown CPU"


def cpu_choice(family: str, training: bool, name: Optional[str] = None) -> BackendChoice:
    """The path ('official', 'reference' or 'sdpa') that 'auto' takes for op family `family` on
    the CPU named `name` (default: this one), for training (grad enabled) or inference, and why."""
    if family not in CPU_FAMILIES:
        raise ValueError(f"unknown CPU op family {family!r}; expected one of {', '.join(CPU_FAMILIES)}")
    evidence = tuning.cpu_choice(family, "train" if training else "eval", name or cpu_name(),
                                 CPU_FAMILIES[family])
    if evidence.backend is not None:
        return BackendChoice(evidence.backend, evidence.reason)
    return BackendChoice(CPU_DEFAULT_PATH, f"{evidence.reason}; without it 'auto' takes the official path on the "
                                           "CPU (measured fastest for every op family on this project's CPU)")


@constant_at_trace_time
def cpu_path(family: str, training: bool) -> str:
    """cpu_choice's path; constant under torch.compile, fx and export tracing."""
    return cpu_choice(family, training).backend


@constant_at_trace_time
def auto_cpu_path(family: str, requested: Optional[str], device_type: str, training: bool) -> Optional[str]:
    """The path of op family `family` for a model module whose backend is `requested`: when that
    resolves to 'auto' (None and no process default, or an attention-only backend for another
    family) and the tensors are on the CPU, cpu_path's; else None (the module's backend decides)."""
    if device_type != "cpu":
        return None
    if isinstance(requested, str) and requested in TABLE and family != "attention" and TABLE[requested].attention_only:
        requested = None  # an attention-only backend leaves the other ops to the default
    if requested is None:
        requested = _requested("linear_activation" if family == "mlp" else family, None)[0]
    if requested != "auto":
        return None
    return cpu_path(family, training)


def choose_auto(op: str, device_type: str, dtype: Optional[torch.dtype], head_dim: Optional[int] = None,
                kernel_sizes: Optional[tuple] = None, device_name: Optional[str] = None) -> BackendChoice:
    """What 'auto' takes for `op` on such tensors, and why. device_name: the CUDA device's name
    (torch.cuda.get_device_name), the key into the tuning file."""
    family = _OP_CPU_FAMILY.get(op_family(op))
    if device_type == "cpu" and family is not None:
        choice = cpu_choice(family, torch.is_grad_enabled())
        if choice.backend != "official":
            return BackendChoice(choice.backend, f"on this CPU ({cpu_name()}): {choice.reason}")
        return BackendChoice("reference", f"on this CPU ({cpu_name()}) 'auto' runs the model's official path for "
                                          f"{family} ({choice.reason}); a direct call of the op takes 'reference'")
    if device_type != "cuda":
        return BackendChoice("reference", f"{device_type} tensors: 'auto' is 'reference' off CUDA devices "
                                          "(the fused kernels are for NVIDIA GPUs)")

    def why_not(name: str) -> Optional[str]:
        return unavailable_reason(op, name, device_type, dtype, head_dim, kernel_sizes)

    evidence = tuning.tuned_choice(op, _dtype_name(dtype), device_name or "unknown CUDA device", why_not)
    if evidence.backend is not None:
        return BackendChoice(evidence.backend, evidence.reason)
    passed_over = []
    for name in DEFAULT_CUDA_ORDER:
        if op not in TABLE[name].ops:
            continue
        reason = why_not(name)
        if reason is None:
            skipped = "".join(f"; {n!r} cannot run: {r}" for n, r in passed_over)
            return BackendChoice(name, f"{evidence.reason}; without a measurement 'auto' takes the first of "
                                       f"{', '.join(DEFAULT_CUDA_ORDER)} that can run{skipped}")
        passed_over.append((name, reason))
    raise BackendUnavailableError(f"no backend can run cvt_fast {op} here: "
                                  + "; ".join(f"{n!r}: {r}" for n, r in passed_over))


# The tuning file and the device name are read outside the graph, like the probes.
@constant_at_trace_time
def _auto(op: str, device_type: str, device_index: Optional[int], dtype: Optional[torch.dtype],
          head_dim: Optional[int], kernel_sizes: Optional[tuple] = None) -> str:
    name = cuda_device_name(device_index) if device_type == "cuda" else None
    return choose_auto(op, device_type, dtype, head_dim, kernel_sizes, name).backend


# --------------------------------------------------------------------------- resolving a call

def _tensor_facts(op: str, tensors: tuple) -> tuple:
    """(device type, device index, dtype, head_dim, kernel_sizes) of an op's inputs, as far as
    they are given and well formed: attention (q, k, v) gives q's head size, conv_proj (x, wq,
    wk, wv) the kernel sizes. Ill-formed inputs leave a fact unknown (None); the op's own
    checks then name the problem."""
    if not tensors or not isinstance(tensors[0], torch.Tensor):
        return "cpu", None, None, None, None
    first = tensors[0]
    dtype = first.dtype if first.dtype in FLOAT_DTYPES else None
    head_dim = int(first.shape[-1]) if op == "attention" and first.dim() == 4 else None
    kernel_sizes = None
    if op == "conv_proj" and len(tensors) >= 4 and all(isinstance(w, torch.Tensor) and w.dim() == 4
                                                        for w in tensors[1:4]):
        kernel_sizes = tuple(int(w.shape[-1]) for w in tensors[1:4])
    return first.device.type, first.device.index, dtype, head_dim, kernel_sizes


def _requested(op: str, requested: Optional[str]) -> tuple[str, str]:
    """(backend name, where it came from) before 'auto' is resolved."""
    if requested is not None:
        return _check_name(requested, "backend argument"), "the call's backend argument"
    name = get_backend()
    source = ("cvt_fast.set_backend" if _global_backend is not None
              else f"the environment variable {ENV_VAR}" if os.environ.get(ENV_VAR) else "the default")
    if name != "auto" and op not in TABLE[name].ops:
        # A process-wide attention-only choice ('sdpa', 'xformers') means "that library for
        # attention"; the other op then takes 'auto'. Passed explicitly for conv_proj, it is an error.
        return "auto", f"{source} names {name!r}, which implements {' and '.join(TABLE[name].ops)} only"
    return name, source


def resolve_backend(op: str, requested: Optional[str], *tensors: torch.Tensor) -> str:
    """The concrete backend (never 'auto') that runs `op` on `tensors`.

    `requested` is the call's argument (None: the default from get_backend(); a default that
    does not implement `op`, such as 'sdpa' for conv_proj, means 'auto'). The first tensor
    decides the device and dtype; attention's q gives the head size, conv_proj's (x, wq, wk,
    wv) the kernel sizes. Raises ValueError for unknown names and BackendUnavailableError when
    the backend cannot run here.
    """
    _check_op(op)
    name, _ = _requested(op, requested)
    device_type, device_index, dtype, head_dim, kernel_sizes = _tensor_facts(op, tensors)
    if name == "auto":
        return _auto(op, device_type, device_index, dtype, head_dim, kernel_sizes)
    reason = unavailable_reason(op, name, device_type, dtype, head_dim, kernel_sizes)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} cannot run cvt_fast {op} on {device_type} "
                                      f"tensors: {reason}")
    return name


def explain_backend(op: str, *tensors: torch.Tensor, backend: Optional[str] = None,
                    device: "torch.device | str | None" = None, dtype: Optional[torch.dtype] = None,
                    head_dim: Optional[int] = None, kernel_size: Optional[int] = None) -> BackendChoice:
    """Which backend a call of `op` takes, and why.

    Give the op's tensors (as to resolve_backend), or describe them: device, dtype, head_dim
    (attention), kernel_size (conv_proj); keywords override what the tensors say. `backend` is
    the call's argument (None: the process default). Raises what the call would raise.
    """
    _check_op(op)
    name, source = _requested(op, backend)
    device_type, device_index, facts_dtype, facts_head_dim, kernel_sizes = _tensor_facts(op, tensors)
    if device is not None:
        device = torch.device(device)
        device_type, device_index = device.type, device.index
    dtype = dtype if dtype is not None else facts_dtype
    head_dim = head_dim if head_dim is not None else facts_head_dim
    kernel_sizes = (kernel_size,) * 3 if kernel_size is not None else kernel_sizes
    if name != "auto":
        reason = unavailable_reason(op, name, device_type, dtype, head_dim, kernel_sizes)
        if reason is not None:
            raise BackendUnavailableError(f"backend {name!r} cannot run cvt_fast {op} on {device_type} "
                                          f"tensors: {reason}")
        return BackendChoice(name, f"requested by {source}")
    device_name = cuda_device_name(device_index) if device_type == "cuda" else None
    choice = choose_auto(op, device_type, dtype, head_dim, kernel_sizes, device_name)
    return BackendChoice(choice.backend, f"'auto' ({source}): {choice.reason}")
