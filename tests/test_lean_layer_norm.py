"""cvt_fast.lean_layer_norm: the official float32 LayerNorm of 16-bit inputs, keeping the
16-bit input for the backward. Forward and gradients must be bit for bit the official
module's (the backward sees the same float32 input, since widening is exact); what differs
is only what autograd keeps."""
import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

import cvt_fast
from cvt_fast.lean_layer_norm import layer_norm_16bit
from cvt_fast.model import LayerNorm

DTYPES = [torch.bfloat16, torch.float16]


def trained_norm(channels: int) -> LayerNorm:
    norm = LayerNorm(channels)
    with torch.no_grad():  # not the identity initialisation, so weight and bias matter
        norm.weight.copy_(1 + 0.3 * torch.randn(channels))
        norm.bias.copy_(0.2 * torch.randn(channels))
    return norm


def forward_and_grads(norm: LayerNorm, x: torch.Tensor, grad_out: torch.Tensor, lean: bool, autocast: bool):
    norm.keep_16bit_input = lean
    leaf = x.detach().clone().requires_grad_()
    norm.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = norm(leaf)
    out.backward(grad_out)
    return out.detach(), leaf.grad, norm.weight.grad.clone(), norm.bias.grad.clone()


@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "autocast"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_and_gradients_are_bitwise_the_official_modules(dtype, autocast):
    norm = trained_norm(48)
    x = (3 * torch.randn(2, 37, 48) + 1).to(dtype)
    grad_out = torch.randn(2, 37, 48).to(dtype)
    lean = forward_and_grads(norm, x, grad_out, lean=True, autocast=autocast)
    official = forward_and_grads(norm, x, grad_out, lean=False, autocast=autocast)
    for name, got, want in zip(("out", "grad_x", "grad_weight", "grad_bias"), lean, official):
        assert got.dtype == want.dtype and torch.equal(got, want), name


@pytest.mark.parametrize("dtype", DTYPES)
def test_keeps_the_16bit_input_and_no_float32_copy(dtype):
    norm = trained_norm(48)
    x = torch.randn(2, 37, 48).to(dtype).requires_grad_()
    for lean in (True, False):
        norm.keep_16bit_input = lean
        saved = []
        with saved_tensors_hooks(lambda t: saved.append((tuple(t.shape), t.dtype)) or t, lambda t: t):
            norm(x)
        big = [(shape, dt) for shape, dt in saved if shape == (2, 37, 48)]
        assert big == ([((2, 37, 48), dtype)] if lean else [((2, 37, 48), torch.float32)]), (lean, saved)


def test_rejects_wider_inputs():
    with pytest.raises(TypeError, match="bfloat16 or float16"):
        layer_norm_16bit(torch.randn(2, 4), None, None, 1e-5)


def test_float32_and_no_grad_take_the_plain_path():
    norm = trained_norm(8)
    x = torch.randn(3, 8, requires_grad=True)
    assert torch.equal(norm(x), torch.nn.functional.layer_norm(x, (8,), norm.weight, norm.bias, norm.eps))
    with torch.no_grad():
        assert norm(x.bfloat16()).dtype == torch.bfloat16


def test_compiles_without_a_graph_break():
    norm = trained_norm(16)
    x = torch.randn(4, 5, 16).bfloat16().requires_grad_()
    compiled = torch.compile(norm, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    out.float().square().sum().backward()
    grad_x = x.grad.clone()
    x.grad = None
    want = norm(x)
    want.float().square().sum().backward()
    assert torch.equal(out, want) and torch.equal(grad_x, x.grad)


def test_model_backends_switch_it():
    model = cvt_fast.create_model("cvt-13", num_classes=10, backend="official")
    norms = [m for m in model.modules() if isinstance(m, LayerNorm)]
    assert norms and not any(n.keep_16bit_input for n in norms)
    model.set_backend("reference")
    assert all(n.keep_16bit_input for n in norms)
