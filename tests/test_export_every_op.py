"""Issue 26: the export lowering covers every cvt_fast forward op, in training and in eval mode.

`cvt_fast.export.lower_custom_ops` replaces each cvt_fast op of an exported program with its
reference (what ONNX needs). Eval programs hold conv_proj (BatchNorm folded), training ones
conv_proj_bn (batch statistics); attention, residual_layer_norm and linear_activation hold in
both; mlp_activation runs only in the MLP's backward (the lean MLP recomputes its
activation), so it is exported on its own. For each: the op is in the program before, no
cvt_fast op is left after, and the lowered program computes what the original one does.
"""
from __future__ import annotations

import collections

import pytest
import torch

from cvt_fast.export import lower_custom_ops, reference_decompositions
from tiny_models import tiny_cvt
from tolerances import assert_close


def _cvt_fast_ops(program: torch.export.ExportedProgram) -> collections.Counter:
    return collections.Counter(node.target.name() for node in program.graph.nodes
                               if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
                               and node.target.namespace == "cvt_fast")


def _run(program: torch.export.ExportedProgram, *args):
    torch.manual_seed(0)  # drop path and the like draw the same numbers in both programs
    return program.module()(*args)


EXPECTED_IN_MODE = {
    "eval": {"cvt_fast::conv_proj", "cvt_fast::attention", "cvt_fast::residual_layer_norm",
             "cvt_fast::linear_activation"},
    "train": {"cvt_fast::conv_proj_bn", "cvt_fast::attention", "cvt_fast::residual_layer_norm",
              "cvt_fast::linear_activation"},
}


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_lowering_a_model_program_leaves_no_cvt_fast_op_and_keeps_its_logits(mode):
    model = tiny_cvt(backend="reference").train(mode == "train")
    images = torch.randn(2, 3, 32, 32)
    program = torch.export.export(model, (images,))
    assert set(_cvt_fast_ops(program)) == EXPECTED_IN_MODE[mode]
    lowered = lower_custom_ops(program)
    assert not _cvt_fast_ops(lowered), f"left after lowering: {dict(_cvt_fast_ops(lowered))}"
    expected = _run(program, images)
    assert_close(_run(lowered, images), expected)
    if mode == "eval":
        with torch.no_grad():
            assert_close(expected, model(images))


class _MlpActivation(torch.nn.Module):
    def __init__(self, act: str):
        super().__init__()
        self.act = act
        self.bias = torch.nn.Parameter(torch.randn(24))

    def forward(self, hidden):
        return torch.ops.cvt_fast.mlp_activation(hidden, self.bias, self.act, "reference")


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_lowering_the_mlp_activation_of_the_backward_leaves_standard_operators(act):
    hidden = torch.randn(2, 5, 24)
    program = torch.export.export(_MlpActivation(act), (hidden,))
    assert set(_cvt_fast_ops(program)) == {"cvt_fast::mlp_activation"}
    lowered = lower_custom_ops(program)
    assert not _cvt_fast_ops(lowered)
    assert_close(_run(lowered, hidden), _run(program, hidden))


def test_the_decomposition_table_covers_every_registered_forward_op():
    """Every cvt_fast op that is not a backward (nor a CUDA extension's kernel) has a decomposition."""
    table = {op.name() for op in reference_decompositions()}
    registered = {f"cvt_fast::{name}" for name in dir(torch.ops.cvt_fast)
                  if isinstance(getattr(torch.ops.cvt_fast, name, None), torch._ops.OpOverloadPacket)}
    forward = {name for name in registered if "backward" not in name and "grad" not in name
               and not name.endswith("_cuda")}
    assert forward and forward <= table, f"no decomposition for: {sorted(forward - table)}"
