"""cvt_fast.lean_mlp: the MLP's activation + fc2 keeping only its input for the backward.

Same forward as the plain modules (bit for bit), the same gradients (float64 gradcheck, float32
and bfloat16-autocast against autograd of the plain ops), fewer saved tensors. The whole
model's saved activations: tests/test_training_memory.py.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.autograd.graph import saved_tensors_hooks

import cvt_fast
from cvt_fast.lean_mlp import act_then_linear, quick_gelu
from cvt_fast.model import Mlp

from tolerances import assert_close

ACTS = ["quick_gelu", "gelu"]


def plain(x, weight, bias, act):
    return F.linear(quick_gelu(x) if act == "quick_gelu" else F.gelu(x), weight, bias)


def inputs(dtype=torch.float32, rows=(3, 7), hidden=24, out=10, bias=True):
    x = torch.randn(*rows, hidden, dtype=dtype, requires_grad=True)
    weight = (torch.randn(out, hidden, dtype=dtype) / hidden ** 0.5).requires_grad_()
    b = torch.randn(out, dtype=dtype, requires_grad=True) if bias else None
    return x, weight, b


def grads(function, x, weight, bias, act, grad_out):
    leaves = [t for t in (x, weight, bias) if t is not None]
    for t in leaves:
        t.grad = None
    function(x, weight, bias, act).backward(grad_out)
    return [t.grad.clone() for t in leaves]


@pytest.mark.parametrize("act", ACTS)
def test_forward_is_bitwise_the_plain_forward(act):
    x, weight, bias = inputs()
    assert torch.equal(act_then_linear(x, weight, bias, act), plain(x, weight, bias, act))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("act", ACTS)
def test_gradcheck_float64(act, bias):
    x, weight, b = inputs(torch.float64, rows=(2, 3), hidden=5, out=4, bias=bias)
    assert torch.autograd.gradcheck(lambda *t: act_then_linear(*t, act), (x, weight, b))


@pytest.mark.parametrize("act", ACTS)
def test_float32_gradients_match_autograd_of_the_plain_ops(act):
    x, weight, bias = inputs(rows=(4, 33), hidden=96, out=40)
    grad_out = torch.randn(4, 33, 40)
    for got, want in zip(grads(act_then_linear, x, weight, bias, act, grad_out),
                         grads(plain, x, weight, bias, act, grad_out)):
        assert_close(got, want, torch.float32)


@pytest.mark.parametrize("act", ACTS)
def test_bfloat16_autocast_gradients_match_autograd_of_the_plain_ops(act):
    # As in the model under AMP: fc1's output arrives in bfloat16, the parameters are float32.
    x = torch.randn(4, 33, 96).bfloat16().requires_grad_()
    weight = (torch.randn(40, 96) / 96 ** 0.5).requires_grad_()
    bias = torch.randn(40, requires_grad=True)
    grad_out = torch.randn(4, 33, 40).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = grads(act_then_linear, x, weight, bias, act, grad_out)
        want = grads(plain, x, weight, bias, act, grad_out)
    for g, w, leaf in zip(got, want, (x, weight, bias)):
        assert g.dtype == w.dtype == leaf.dtype
        assert_close(g.float(), w.float(), torch.bfloat16, factor=2.0)


def saved_storages(function):
    """(storage bytes, shape) of every tensor autograd keeps for the backward of function()."""
    saved = {}

    def pack(t):
        saved.setdefault(t.untyped_storage().data_ptr(), (t.untyped_storage().nbytes(), tuple(t.shape)))
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        function()
    return list(saved.values())


@pytest.mark.parametrize("act", ACTS)
def test_the_mlp_keeps_one_hidden_width_tensor_instead_of_two_or_three(act):
    mlp = Mlp(dim=16, hidden=64, act=act, drop=0.0).train()
    x = torch.randn(2, 9, 16)

    def hidden_width_saved():
        return [shape for _, shape in saved_storages(lambda: mlp(x)) if shape in ((2, 9, 64), (18, 64))]

    lean = hidden_width_saved()
    mlp.recompute_activation = False
    official = hidden_width_saved()
    assert len(lean) == 1  # fc1's output
    assert len(official) == (3 if act == "quick_gelu" else 2), official


def test_mlp_with_dropout_in_training_keeps_the_plain_path():
    mlp = Mlp(dim=16, hidden=64, act="quick_gelu", drop=0.1).train()
    x = torch.randn(2, 9, 16)
    saved = [shape for _, shape in saved_storages(lambda: mlp(x)) if shape in ((2, 9, 64), (18, 64))]
    assert len(saved) > 1  # the dropout between the activation and fc2 needs its own tensors


def test_the_official_backend_keeps_what_the_official_code_keeps():
    model = cvt_fast.create_model("cvt-13", num_classes=10, backend="official")
    assert not any(m.recompute_activation for m in model.modules() if isinstance(m, Mlp))
    model.set_backend("reference")
    assert all(m.recompute_activation for m in model.modules() if isinstance(m, Mlp))
