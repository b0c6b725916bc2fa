"""Every backend of the fused ops, one record each: the table that everything else reads.

A record says which ops a backend implements, for which dtypes, head sizes and kernel sizes,
why it cannot run somewhere (its availability probe), and how to load its implementation. The
'triton' record reads what the kernels take from their own declarations (kernels/supported.py,
which imports no Triton); the other records state their backend's limits here. The
backend choice (backend.py), the op registration (library.py), the entry points (__init__.py),
the model, the benchmarks and the README's backend table all derive from TABLE; nothing else
lists backend names. Nothing here imports Triton, xformers or the CUDA extension: the probes and
loaders do, when they are called.

Kinds:
- "reference": plain PyTorch, the ground truth, runs anywhere;
- "kernels": cvt_fast's own fused kernels, run inside the registered custom ops
  (torch.ops.cvt_fast.*), which call `load(op)`'s forward and backward;
- "peer": another library's attention, differentiable on its own, called directly by
  cvt_fast.ops.attention (not through the custom ops: it has no log-sum-exp to save).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import torch

from cvt_fast.kernels import _launch as triton_launch
from cvt_fast.kernels import supported as triton_supported
from cvt_fast.ops.contract import FLOAT_DTYPES, dtype_names

# The two hot paths of CvT (DESIGN §2), then the fused elementwise steps of a block around them
# (the MLP activation, alone or in fc1's product, and residual add + LayerNorm: issue 18).
HOT_OPS = ("attention", "conv_proj")
ELEMENTWISE_OPS = ("mlp_activation", "linear_activation", "residual_layer_norm")
OPS = HOT_OPS + ELEMENTWISE_OPS
KINDS = ("reference", "kernels", "peer")
# Op variants: a variant is run by every backend that implements its family op, from the same
# kernels, and is chosen with it (the backend choice and 'auto' see only the family). conv_proj_bn
# is conv_proj with training-mode BatchNorm on each output (cvt_fast/ops/__init__.py).
VARIANTS = {"conv_proj_bn": "conv_proj"}


def op_family(op: str) -> str:
    """The op of OPS that `op` is, or is a variant of."""
    return VARIANTS.get(op, op)


class Implementation(NamedTuple):
    """What `Backend.load(op)` returns (op: one of OPS or of VARIANTS). kernels/reference:
    forward(*op inputs) -> the op's outputs and backward(*backward inputs) -> gradients, as the
    custom ops' bodies call them. peer: forward(q, k, v, scale) -> out, differentiable by
    autograd; backward None."""
    forward: Callable
    backward: Optional[Callable]


@dataclass(frozen=True)
class DtypeLimit:
    """A dtype a backend does not take for one op on one device type, and why."""
    op: str
    device_type: str
    dtype: torch.dtype
    why: str


@dataclass(frozen=True)
class Backend:
    name: str
    kind: str                                  # one of KINDS
    ops: tuple[str, ...]                       # the ops it implements
    dtypes: tuple[torch.dtype, ...]
    probe: Callable[[str, str], Optional[str]]  # (op, device type) -> why it cannot run there, or None
    load: Callable[[str], Implementation]
    summary: str                               # what computes (README table)
    where: str                                 # where it runs (README table)
    head_dims: Optional[tuple[int, ...]] = None  # attention head sizes; None: any
    kernel_rule: Optional[Callable[[str, tuple[int, ...]], Optional[str]]] = None  # (name, conv_proj k_q/k_k/k_v)
    dtype_limits: tuple[DtypeLimit, ...] = field(default=())
    # The GPU tests that verify this backend on a device, as pytest argument lists (one pytest run
    # each): bench/tune.py runs them, and 'auto' takes a measured backend only where they passed.
    gpu_tests: tuple[tuple[str, ...], ...] = ()
    # How this backend runs an op variant when not from fused kernels of its own (README table).
    variant_notes: tuple[tuple[str, str], ...] = ()

    @property
    def attention_only(self) -> bool:
        return self.ops == ("attention",)


# --------------------------------------------------------------------------- probes

def module_present(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _runs_anywhere(op: str, device_type: str) -> Optional[str]:
    return None


def _triton_probe(op: str, device_type: str) -> Optional[str]:
    if not module_present("triton"):
        return "triton is not installed (pip install triton)"
    kernel_module = f"cvt_fast.kernels.{op}"
    if not module_present(kernel_module):
        return f"the Triton kernels module {kernel_module} is missing from this installation"
    if device_type == "cpu":
        if not triton_launch.interpreter_on():
            return ("the tensors are on the CPU and TRITON_INTERPRET is not 1: set TRITON_INTERPRET=1 "
                    "before importing triton to run the kernels on the CPU through the interpreter")
        from cvt_fast.kernels.interpreter import interpreter_problem

        return interpreter_problem()
    if device_type != "cuda":
        return f"Triton kernels run on CUDA tensors (or the CPU interpreter), not on {device_type!r}"
    return None


def _cuda_probe(op: str, device_type: str) -> Optional[str]:
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


# How to get the peer, said wherever it is missing: pyproject.toml's 'peers' extra pins what the
# benchmarks and tests use (tests/test_xformers_peer.py checks the two agree).
XFORMERS_INSTALL = ("pip install -e '.[peers]' (xformers 0.0.35 and the CUDA 12 runtime it links; "
                    "it needs torch >= 2.10)")


@functools.lru_cache(maxsize=1)
def xformers_import_error() -> Optional[str]:
    """Why xformers cannot run here (not installed, `import xformers.ops` fails, or its C++/CUDA
    extension did not load: xformers then imports with only a warning), or None if it can."""
    if not module_present("xformers"):
        return f"xformers is not installed: {XFORMERS_INSTALL}"
    try:
        xformers = importlib.import_module("xformers")
        importlib.import_module("xformers.ops")
    except Exception as error:  # ImportError, OSError, or whatever a broken install raises
        return _xformers_fix(f"xformers is installed but fails to import ({type(error).__name__}: {error})", error)
    if getattr(xformers, "_has_cpp_library", True):
        return None
    # The extension's loading error: xformers keeps it, and the dynamic loader's message naming
    # the missing library is at the bottom of its chain of causes.
    failure = getattr(getattr(xformers, "_cpp_lib", None), "_cpp_library_load_exception", None)
    root = failure
    while root is not None and (root.__cause__ or root.__context__) is not None:
        root = root.__cause__ or root.__context__
    detail = f" ({type(root).__name__}: {root})" if root is not None else ""
    return _xformers_fix(f"xformers imports, but its C++/CUDA extension did not load{detail}", root)


def _xformers_fix(found: str, error: Optional[BaseException]) -> str:
    """`found`, and what to install about it."""
    if "libcudart.so.12" in str(error):
        # xformers' wheel is built against CUDA 12; a CUDA 13 torch does not bring that runtime.
        return (f"{found}; the CUDA 12 runtime it links is missing: pip install "
                "'nvidia-cuda-runtime-cu12>=12.8' (part of the 'peers' extra)")
    return f"{found}; {XFORMERS_INSTALL} installs a working pair"


def _xformers_probe(op: str, device_type: str) -> Optional[str]:
    if device_type != "cuda":
        return (f"xformers has no implementation for {device_type!r} tensors (CUDA only; "
                "'sdpa' runs attention on any device)")
    return xformers_import_error()


# --------------------------------------------------------------------------- kernel-size rules

def one_kernel_size(name: str, kernel_sizes: tuple[int, ...]) -> Optional[str]:
    if len(set(kernel_sizes)) != 1:
        return (f"the fused {name!r} projection needs one kernel size for q, k and v, got "
                f"{tuple(kernel_sizes)} ('reference' takes any)")
    return None


def triton_kernel_sizes(name: str, kernel_sizes: tuple[int, ...]) -> Optional[str]:
    """What the Triton conv_proj kernels declare they need of the kernel sizes (kernels/supported.py)."""
    problem = triton_supported.conv_proj_kernel_size_problem(kernel_sizes)
    if problem is None:
        return None
    return f"the fused {name!r} projection needs {problem} ('reference' takes any)"


# --------------------------------------------------------------------------- loaders

# Function names of an op's forward and backward where they are not `<op>_forward`/`<op>_backward`
# (kernels) and `<op>_reference`/`<op>_backward_reference` (references): the fused product's
# backward is its own op, cvt_fast::activation_grad_through_linear.
_KERNEL_NAMES = {"linear_activation": ("linear_activation_forward", "activation_grad_through_linear")}
_REFERENCE_NAMES = {"linear_activation": ("linear_activation_reference",
                                          "activation_grad_through_linear_reference")}


def _load_reference(op: str) -> Implementation:
    if op in ELEMENTWISE_OPS:
        from cvt_fast.ops import elementwise_reference as reference
    else:
        from cvt_fast.ops import reference
    forward, backward = _REFERENCE_NAMES.get(op, (f"{op}_reference", f"{op}_backward_reference"))
    return Implementation(getattr(reference, forward), getattr(reference, backward))


def _load_triton(op: str) -> Implementation:
    # Imported on first use: it imports Triton and decorates the kernels, which is when
    # TRITON_INTERPRET is read. Each op's kernels are the module kernels/<op>.py (a variant's:
    # its family's).
    kernels = importlib.import_module(f"cvt_fast.kernels.{op_family(op)}")
    forward, backward = _KERNEL_NAMES.get(op, (f"{op}_forward", f"{op}_backward"))
    return Implementation(getattr(kernels, forward), getattr(kernels, backward))


def _load_cuda(op: str) -> Implementation:
    from cvt_fast.extension import extension_status, load_extension

    if load_extension() is None:
        raise RuntimeError(f"cvt_fast {op}: the CUDA extension cvt_fast._C is {extension_status()}")
    if op == "conv_proj_bn":
        # No BatchNorm epilogue in csrc/ yet: the extension's conv_proj with torch around it.
        from cvt_fast.ops.batch_norm_composed import compose

        plain = _load_cuda("conv_proj")
        return Implementation(*compose(plain.forward, plain.backward))
    return Implementation(getattr(torch.ops.cvt_fast, f"{op}_forward_cuda"),
                          getattr(torch.ops.cvt_fast, f"{op}_backward_cuda"))


def _load_peer(function_name: str) -> Callable[[str], Implementation]:
    def load(op: str) -> Implementation:
        from cvt_fast.ops import peers

        return Implementation(getattr(peers, function_name), None)
    return load


# --------------------------------------------------------------------------- the table

_RECORDS = (
    Backend("reference", "reference", OPS, FLOAT_DTYPES, _runs_anywhere, _load_reference,
            summary="plain PyTorch (conv2d; einsum, softmax, einsum)", where="any device; the ground truth"),
    Backend("triton", "kernels", OPS, triton_supported.DTYPES, _triton_probe, _load_triton,
            summary="Triton kernels (`kernels/`)", where="CUDA GPUs; CPU tensors under `TRITON_INTERPRET=1`",
            head_dims=triton_supported.ATTENTION_HEAD_DIMS, kernel_rule=triton_kernel_sizes,
            dtype_limits=tuple(DtypeLimit(op, device_type, dtype,
                                          f"{dtype_names((dtype,))} {op} is not supported by the Triton kernels "
                                          f"on the {'GPU' if device_type == 'cuda' else device_type} ({why})")
                               for (op, device_type, dtype), why in triton_supported.DTYPE_LIMITS.items()),
            gpu_tests=(("tests/test_kernels_attention.py", "tests/test_kernels_conv_proj.py", "-m", "gpu"),
                       ("tests/test_ops_registration.py", "-m", "gpu", "-k", "triton"),
                       # the fused elementwise ops' kernels (issue 18), at CvT-13's shapes
                       ("tests/test_fused_elementwise_gpu.py", "-m", "gpu"))),
    Backend("cuda", "kernels", HOT_OPS, (torch.bfloat16, torch.float16, torch.float32), _cuda_probe, _load_cuda,
            summary="CUDA C++ kernels (`csrc/`, built into `cvt_fast._C`)",
            where="CUDA GPUs, when `cvt_fast._C` is built", head_dims=(32, 64, 128), kernel_rule=one_kernel_size,
            gpu_tests=(("tests/test_cuda_extension.py", "-m", "gpu"),
                       ("tests/test_ops_registration.py", "-m", "gpu", "-k", "cuda")),
            variant_notes=(("conv_proj_bn", "BatchNorm statistics and normalisation in torch around its conv_proj "
                                            "kernels (cvt_fast/ops/batch_norm_composed.py)"),)),
    Backend("sdpa", "peer", ("attention",), FLOAT_DTYPES, _runs_anywhere, _load_peer("sdpa_attention"),
            summary="`torch.nn.functional.scaled_dot_product_attention`", where="any device",
            gpu_tests=(("tests/test_backend.py", "-m", "gpu", "-k", "sdpa"),)),
    Backend("xformers", "peer", ("attention",), (torch.bfloat16, torch.float16, torch.float32), _xformers_probe,
            _load_peer("xformers_attention"), summary="`xformers.ops.memory_efficient_attention`",
            where="CUDA, when xformers is installed",
            gpu_tests=(("tests/test_backend.py", "-m", "gpu", "-k", "xformers"),)),
)

# name -> record, in the order above. Tests swap records with monkeypatch.setitem; nothing else
# should change it at run time.
TABLE: dict[str, Backend] = {record.name: record for record in _RECORDS}
# Every name the backend choice accepts: 'auto' (chosen per call, see backend.py) and the table's.
BACKENDS: tuple[str, ...] = ("auto",) + tuple(TABLE)


def backends_for(op: str, kinds: tuple[str, ...] = KINDS) -> tuple[str, ...]:
    """Names of the backends that implement `op` (or its family op), of the given kinds, in table order."""
    return tuple(b.name for b in TABLE.values() if op_family(op) in b.ops and b.kind in kinds)


def _with_variants(op: str) -> str:
    """`op` and its variants, as the README table lists them: 'conv_proj (+ conv_proj_bn)'."""
    variants = [v for v, family in VARIANTS.items() if family == op]
    return op + (f" (+ {', '.join(variants)})" if variants else "")


def markdown_table() -> str:
    """The README's backend table, written from the records (`python -m cvt_fast.ops` prints it)."""
    lines = ["| backend | ops | implementation | dtypes | head sizes | where |", "|---|---|---|---|---|---|"]
    for b in TABLE.values():
        missing = [op for op in OPS if op not in b.ops]
        ops = ", ".join(_with_variants(op) for op in b.ops) + (f" ({', '.join(missing)}: `auto`'s choice)"
                                                               if missing else "")
        summary = "; ".join((b.summary,) + tuple(f"{op}: {note}" for op, note in b.variant_notes))
        dtypes = dtype_names(b.dtypes) + "".join(
            f"; no {dtype_names((lim.dtype,))} {lim.op} on {lim.device_type}" for lim in b.dtype_limits)
        head_dims = "any" if b.head_dims is None else ", ".join(map(str, b.head_dims))
        lines.append(f"| `{b.name}` | {ops} | {summary} | {dtypes} | {head_dims} | {b.where} |")
    return "\n".join(lines)
