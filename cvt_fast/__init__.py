"""cvt_fast: a fast, faithful CvT (Convolutional vision Transformers) for PyTorch.

`import cvt_fast` registers the custom ops (`torch.ops.cvt_fast.*`), so a program saved
with torch.export.save loads in a process that only imported cvt_fast. Registration
declares schemas, fake kernels and autograd formulas; the Triton kernels and the CUDA
extension are imported only when a backend that needs them runs.

Public API (imported lazily):

    build_model(spec, num_classes=1000, act="quick_gelu", backend="auto")
    create_model(name, num_classes=1000, **kw)        # 'cvt-13', 'cvt-21', 'cvt-w24'
    load_config(path, overrides=())                   # yacs node in the official schema
    load_checkpoint(model, path_or_state_dict, strict=True, ...)
    set_backend(name) / get_backend()                 # global default for the fused ops
    count_flops(model, image_size) / count_params(model)
    inference_model(model, example_input=None, cuda_graphs=None)   # eval, BatchNorm folded, CUDA graphs
    export_program(model, image_size=224) / export_onnx(model, path, image_size=224)
    (and timm.create_model("cvt_13"), ...: registered once timm is imported; cvt_fast/timm_hook.py)
"""
from __future__ import annotations

import importlib
from typing import Any

from cvt_fast import ops  # noqa: F401  (registers torch.ops.cvt_fast.*)
from cvt_fast.timm_hook import register_with_timm as _register_with_timm

__version__ = "0.1.0"

_LAZY = {
    "build_model": "cvt_fast.model",
    "create_model": "cvt_fast.model",
    "ConvolutionalVisionTransformer": "cvt_fast.model",
    "MODEL_SPECS": "cvt_fast.specs",
    "load_config": "cvt_fast.config",
    "get_default_config": "cvt_fast.config",
    "load_checkpoint": "cvt_fast.checkpoint",
    "CheckpointError": "cvt_fast.checkpoint",
    "set_backend": "cvt_fast.ops.backend",
    "get_backend": "cvt_fast.ops.backend",
    "BackendUnavailableError": "cvt_fast.ops.backend",
    "count_flops": "cvt_fast.flops",
    "count_params": "cvt_fast.flops",
    "inference_model": "cvt_fast.inference",
    "InferenceModel": "cvt_fast.inference",
    "export_program": "cvt_fast.export",
    "export_onnx": "cvt_fast.export",
}

__all__ = sorted(_LAZY) + ["__version__"]


_register_with_timm()


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cvt_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
