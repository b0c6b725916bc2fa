"""Exporting a CvT: torch.export (the fused custom ops kept) and ONNX (the ops lowered to standard operators).

    program = cvt_fast.export_program(model, image_size=224)        # torch.export.ExportedProgram
    path = cvt_fast.export_onnx(model, "cvt13.onnx", image_size=224)
    python -m cvt_fast.export --model cvt-13 --image-size 224 --out cvt13.onnx [--checkpoint FILE] [--check]

The standard routes work on the model as it is: torch.onnx.export (dynamo=True or False),
torch.jit.trace and timm's onnx_export. While they record it (torch.jit.is_tracing(),
torch.onnx.is_in_onnx_export()) the model takes its official path, plain aten operators for the
same function (cvt_fast.model.standard_ops_only); torch.export keeps the fused ops as below.

torch.export traces the eval model with the batch dimension dynamic; the custom ops
`cvt_fast::conv_proj`, `cvt_fast::attention` and the fused elementwise ops of the block
(`linear_activation`, `mlp_activation`, `residual_layer_norm`) stay single nodes (their fake kernels give the
shapes), with the backend that resolved for the example input's device baked in as a string. The
BatchNorm fold is traced as graph operations on the parameters and running statistics (the eval
cache is bypassed while tracing), so the program carries no stale folded constants.

ONNX has no CvT operators, so `export_onnx` first lowers every cvt_fast forward op through its
plain-PyTorch reference implementation (`reference_decompositions`, given to ExportedProgram.run_decompositions):
depthwise Conv (group = channels), Concat for the cls row, MatMul/Softmax-style attention,
MatMul + Sigmoid for fc1 with its activation, the residual add and LayerNorm as plain arithmetic. The result
is standard ONNX that onnxruntime runs on the CPU; `check_onnx` compares its logits with PyTorch's.
Height and width are fixed at export (the ops take them as ints); export once per image size.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from cvt_fast.ops import elementwise_reference, reference

__all__ = ["export_program", "export_onnx", "lower_custom_ops", "reference_decompositions", "check_onnx", "main"]

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
BATCH_DIM_NAME = "batch"


def _without_backend(reference_fn: Callable) -> Callable:
    """The decomposition of a cvt_fast forward op: its reference called with the op's arguments
    less the last, `backend` (every backend computes the reference's numbers)."""
    def decomposition(*args, **kwargs):
        if kwargs.pop("backend", None) is None:
            args = args[:-1]
        return reference_fn(*args, **kwargs)
    return decomposition


def reference_decompositions() -> dict[torch._ops.OpOverload, Callable]:
    """Decomposition table: each cvt_fast forward op -> its plain-PyTorch reference implementation.
    (Backward ops never reach an exported inference program; conv_proj_bn only a training-mode one,
    since eval folds BatchNorm into conv_proj.)"""
    import cvt_fast.ops  # noqa: F401  (registers torch.ops.cvt_fast.*)

    ops = torch.ops.cvt_fast
    return {op.default: _without_backend(fn) for op, fn in (
        (ops.conv_proj, reference.conv_proj_reference),
        (ops.conv_proj_bn, reference.conv_proj_bn_reference),
        (ops.attention, reference.attention_reference),
        (ops.mlp_activation, elementwise_reference.mlp_activation_reference),
        (ops.linear_activation, elementwise_reference.linear_activation_reference),
        (ops.residual_layer_norm, elementwise_reference.residual_layer_norm_reference))}


def _example_input(model: nn.Module, image_size: int, batch_size: int, example_input: Optional[Tensor]) -> Tensor:
    if example_input is not None:
        if not isinstance(example_input, Tensor) or example_input.dim() != 4:
            raise ValueError("example_input must be an image batch tensor (B, C, H, W), got "
                             f"{getattr(example_input, 'shape', type(example_input).__name__)}")
        return example_input
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if batch_size < 2:
        # torch.export specialises a dimension of size 0 or 1 to a constant; 2 keeps it symbolic.
        raise ValueError(f"batch_size of the example must be >= 2 for a dynamic batch, got {batch_size}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    in_chans = getattr(model, "in_chans", 3)
    return torch.randn(batch_size, in_chans, image_size, image_size, device=device, dtype=dtype)


def export_program(model: nn.Module, example_input: Optional[Tensor] = None, *, image_size: int = 224,
                   batch_size: int = 2, dynamic_batch: bool = True) -> torch.export.ExportedProgram:
    """torch.export of the model in eval mode (the model is switched to eval), the batch dimension dynamic.

    example_input: an image batch (B >= 2 for a dynamic batch); by default a random one of
    (batch_size, in_chans, image_size, image_size) on the model's device and dtype.
    The custom ops stay nodes of the program; run it with program.module()(images).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a cvt_fast CvT), got {type(model).__name__}")
    x = _example_input(model, image_size, batch_size, example_input)
    dynamic_shapes = None
    if dynamic_batch:
        if x.shape[0] < 2:
            raise ValueError(f"example_input has batch size {x.shape[0]}; use >= 2 for a dynamic batch "
                             "(torch.export turns sizes 0 and 1 into constants)")
        dynamic_shapes = ({0: torch.export.Dim(BATCH_DIM_NAME, min=1)},)
    model.eval()
    with torch.no_grad():
        return torch.export.export(model, (x,), dynamic_shapes=dynamic_shapes)


def lower_custom_ops(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """The program with every cvt_fast op replaced by its reference implementation (standard aten ops)."""
    return program.run_decompositions(reference_decompositions())


def export_onnx(model: nn.Module, path: Union[str, os.PathLike], *, image_size: int = 224,
                example_input: Optional[Tensor] = None, batch_size: int = 2, dynamic_batch: bool = True,
                opset_version: Optional[int] = None) -> Path:
    """Write the model (eval mode, custom ops lowered to standard operators) as an ONNX file; return its path.

    The input is named 'images' (batch, in_chans, image_size, image_size), the output 'logits'
    (batch, num_classes); the batch dimension is dynamic unless dynamic_batch=False.
    """
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"the ONNX file name must end in .onnx, got {str(path)!r}")
    if not path.parent.exists():
        raise ValueError(f"the folder {str(path.parent)!r} of the ONNX file does not exist")
    example = _example_input(model, image_size, batch_size, example_input)
    program = lower_custom_ops(export_program(model, example, dynamic_batch=dynamic_batch))
    # A string name for the dynamic dimension makes the exporter call it 'batch' in the file.
    names = ({0: BATCH_DIM_NAME},) if dynamic_batch else None
    onnx_program = torch.onnx.export(program, (example,), dynamo=True, input_names=[INPUT_NAME],
                                     output_names=[OUTPUT_NAME], dynamic_shapes=names,
                                     opset_version=opset_version, verbose=False)
    onnx_program.save(str(path))
    return path


def check_onnx(path: Union[str, os.PathLike], model: nn.Module, images: Union[Tensor, Sequence[Tensor]]) -> float:
    """Run the ONNX file in onnxruntime (CPU) on one or more image batches; return the largest
    ||ort - torch|| / ||torch|| of the logits against the eval model's (float32)."""
    import numpy as np
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model.eval()
    worst = 0.0
    for batch in [images] if isinstance(images, Tensor) else list(images):
        (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: batch.detach().cpu().float().numpy()})
        with torch.no_grad():
            expected = model(batch).float().cpu().numpy()
        if got.shape != expected.shape:
            raise ValueError(f"onnxruntime gave logits of shape {got.shape}, PyTorch {expected.shape}")
        error = np.linalg.norm(got.astype(np.float64) - expected) / max(np.linalg.norm(expected), 1e-30)
        worst = max(worst, float(error))
    return worst


# --------------------------------------------------------------------------- command line

# timm's train.py stores its command line as an argparse.Namespace under 'args' in every checkpoint.
# torch's safe unpickler (weights_only) is told to accept that class too: a Namespace is a plain
# attribute holder, and what it holds must still be of the safe unpickler's types (str, numbers,
# tuples, lists, dicts, None), so no code runs from the file.
TRUSTED_CHECKPOINT_CLASSES = (argparse.Namespace,)


def _parser() -> argparse.ArgumentParser:
    from cvt_fast.specs import MODEL_SPECS

    parser = argparse.ArgumentParser(prog="python -m cvt_fast.export",
                                     description="Export a CvT to ONNX (or a torch.export program, .pt2).")
    parser.add_argument("--model", required=True, choices=sorted(MODEL_SPECS), help="the CvT variant")
    parser.add_argument("--image-size", type=int, default=224, help="input height and width (default 224)")
    parser.add_argument("--out", required=True, help="output file: .onnx for ONNX, .pt2 for torch.export.save")
    parser.add_argument("--checkpoint", default=None,
                        help="weights to load (official, Hugging Face, cvt_fast or timm training files; "
                             "default: random init)")
    parser.add_argument("--num-classes", type=int, default=1000, help="classifier size (default 1000)")
    parser.add_argument("--check", action="store_true",
                        help="run the .onnx in onnxruntime on a random batch and print the relative error")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    from cvt_fast.checkpoint import CheckpointError, load_checkpoint
    from cvt_fast.model import create_model

    out = Path(args.out)
    if out.suffix not in (".onnx", ".pt2"):
        print(f"error: --out must end in .onnx or .pt2, got {args.out!r}", file=sys.stderr)
        return 2
    model = create_model(args.model, num_classes=args.num_classes).eval()
    if args.checkpoint:
        try:
            with torch.serialization.safe_globals(list(TRUSTED_CHECKPOINT_CLASSES)):
                print(load_checkpoint(model, args.checkpoint, strict=True))
        except CheckpointError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    try:
        if out.suffix == ".pt2":
            torch.export.save(export_program(model, image_size=args.image_size), str(out))
        else:
            export_onnx(model, out, image_size=args.image_size)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    size_mb = out.stat().st_size / 2**20
    print(f"wrote {out.resolve()} ({size_mb:.1f} MiB): input '{INPUT_NAME}' (batch, {model.in_chans}, "
          f"{args.image_size}, {args.image_size}) float32 -> '{OUTPUT_NAME}' (batch, {args.num_classes}); "
          "batch is dynamic")
    if args.check and out.suffix == ".onnx":
        batches = [torch.randn(b, model.in_chans, args.image_size, args.image_size) for b in (1, 3)]
        print(f"onnxruntime vs PyTorch logits, random batches of 1 and 3: relative error "
              f"{check_onnx(out, model, batches):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
