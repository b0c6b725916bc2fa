"""cvt_fast.lean_mlp: the MLP as two fused products, keeping only x and fc1's output for the backward.

The same forward as the plain modules, the same gradients (float64 gradcheck, float32 and
bfloat16-autocast against autograd of the plain ops, on the reference and the Triton kernels),
fewer saved tensors. The whole model's saved activations: tests/test_training_memory.py.
"""
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.graph import saved_tensors_hooks

import cvt_fast
from cvt_fast.lean_mlp import lean_mlp, quick_gelu
from cvt_fast.model import Mlp

from tolerances import assert_close

ACTS = ["quick_gelu", "gelu"]
TRITON = pytest.param("triton", marks=pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"))


def plain(x, w1, b1, w2, b2, act):
    hidden = F.linear(x, w1, b1)
    return F.linear(quick_gelu(hidden) if act == "quick_gelu" else F.gelu(hidden), w2, b2)


def inputs(dtype=torch.float32, rows=(3, 7), width=10, hidden=24, bias=True):
    x = torch.randn(*rows, width, dtype=dtype, requires_grad=True)
    w1 = (torch.randn(hidden, width, dtype=dtype) / width ** 0.5).requires_grad_()
    w2 = (torch.randn(width, hidden, dtype=dtype) / hidden ** 0.5).requires_grad_()
    b1, b2 = (torch.randn(n, dtype=dtype, requires_grad=True) if bias else None for n in (hidden, width))
    return x, w1, b1, w2, b2


def grads(function, leaves, act, grad_out, **kwargs):
    present = [t for t in leaves if t is not None]
    for t in present:
        t.grad = None
    function(*leaves, act, **kwargs).backward(grad_out)
    return [t.grad.clone() for t in present]


@pytest.mark.parametrize("backend", ["reference", TRITON])
@pytest.mark.parametrize("act", ACTS)
def test_forward_and_gradients_match_the_plain_modules_in_float32(act, backend):
    leaves = inputs(rows=(4, 9), width=40, hidden=96)
    grad_out = torch.randn(4, 9, 40)
    assert_close(lean_mlp(*leaves, act, backend=backend), plain(*leaves, act))
    for got, want in zip(grads(lean_mlp, leaves, act, grad_out, backend=backend), grads(plain, leaves, act, grad_out)):
        assert_close(got, want, torch.float32, factor=2.0)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("act", ACTS)
def test_gradcheck_float64(act, bias):
    leaves = inputs(torch.float64, rows=(2, 3), width=4, hidden=5, bias=bias)
    present = tuple(t for t in leaves if t is not None)
    if bias:
        assert torch.autograd.gradcheck(lambda *t: lean_mlp(*t, act), present)
    else:
        assert torch.autograd.gradcheck(lambda x, w1, w2: lean_mlp(x, w1, None, w2, None, act), present)


@pytest.mark.parametrize("act", ACTS)
def test_bfloat16_autocast_gradients_match_autograd_of_the_plain_ops(act):
    # As in the model under AMP: the input arrives in bfloat16, the parameters are float32.
    x = torch.randn(4, 33, 40).bfloat16().requires_grad_()
    w1 = (torch.randn(96, 40) / 40 ** 0.5).requires_grad_()
    w2 = (torch.randn(40, 96) / 96 ** 0.5).requires_grad_()
    b1, b2 = torch.randn(96, requires_grad=True), torch.randn(40, requires_grad=True)
    leaves = (x, w1, b1, w2, b2)
    grad_out = torch.randn(4, 33, 40).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert_close(lean_mlp(*leaves, act).float(), plain(*leaves, act).float(), torch.bfloat16)
        got = grads(lean_mlp, leaves, act, grad_out)
        want = grads(plain, leaves, act, grad_out)
    for g, w, leaf in zip(got, want, leaves):
        assert g.dtype == w.dtype == leaf.dtype
        assert_close(g.float(), w.float(), torch.bfloat16, factor=2.0)


def test_rejects_unknown_activations_and_unchained_shapes():
    x, w1, b1, w2, b2 = inputs()
    with pytest.raises(ValueError, match="act must be one of"):
        lean_mlp(x, w1, b1, w2, b2, "relu")
    with pytest.raises(ValueError, match="shapes do not chain"):
        lean_mlp(x, w1, b1, w2.t(), b2, "gelu")


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
    mlp.backend = "reference"  # the fused path ('auto' on a CPU may take the official one)
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
