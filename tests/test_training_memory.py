"""Training memory without a GPU: the bytes autograd keeps for the backward of one training
forward, counted with saved-tensor hooks (each storage once, parameters excluded; autocast's
16-bit weight copies included, as they are real memory on a GPU too). This depends on shapes and
dtypes only, so it is exact and device-free; GPU peak memory is bench/model.py's to measure.

Measured on this project's CPU machine, CvT-13 at 224x224, batch 2:
  float32:          official 244.9 MiB, the fused backends 137.9 MiB (0.563x)
  bfloat16 autocast: official 170.9 MiB, the fused backends  82.8 MiB (0.485x)
What makes the difference: attention without the score matrix, conv_proj without NCHW copies
(cvt_fast.ops), the MLP recomputing its activation (cvt_fast.lean_mlp), and LayerNorm keeping
16-bit inputs rather than float32 copies (cvt_fast.lean_layer_norm and, fused with the residual
adds, cvt_fast.ops.residual_layer_norm). The bound is issue 7's
training-memory target: at most 0.6x the official code.
"""
import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

import cvt_fast


def saved_activation_bytes(model: torch.nn.Module, images: torch.Tensor, autocast: bool) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        model(images)
    return sum(saved.values())


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bfloat16_autocast"])
def test_cvt13_keeps_at_most_0_6x_the_official_activations(autocast):
    torch.manual_seed(0)
    images = torch.randn(2, 3, 224, 224)
    totals = {backend: saved_activation_bytes(
        cvt_fast.create_model("cvt-13", num_classes=10, backend=backend).train(), images, autocast)
        for backend in ("official", "reference")}
    assert totals["reference"] <= 0.6 * totals["official"], {k: v / 2**20 for k, v in totals.items()}
