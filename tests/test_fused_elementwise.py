"""The fused steps (cvt_fast.ops.mlp_activation, cvt_fast.ops.linear_activation and its backward
partner cvt_fast::activation_grad_through_linear, cvt_fast.ops.residual_layer_norm):
references against the official formulas, the Triton kernels (under the interpreter on the CPU)
against the references at odd shapes in every dtype, float64 gradcheck through the public
entry points, opcheck of the four registered ops, torch.compile without a graph break, the
backend choice and the input checks. The model built on them: tests/test_fused_block.py."""
import importlib.util

import pytest
import torch
import torch.nn.functional as F

import cvt_fast.ops as ops
from cvt_fast.lean_mlp import quick_gelu
from cvt_fast.ops import elementwise_reference as reference
from cvt_fast.ops.backend import BackendUnavailableError
from cvt_fast.ops.fused_elementwise import elementwise_backend
from tolerances import assert_close

TRITON = pytest.param("triton", marks=pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"))
BACKENDS = ["reference", TRITON]
ACTS = ["quick_gelu", "gelu"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
DTYPE_IDS = ["float32", "bfloat16", "float16", "float64"]


def official_activation(act, z):
    return quick_gelu(z) if act == "quick_gelu" else F.gelu(z)


def activation_inputs(dtype=torch.float32, rows=(3, 13), hidden=75, requires_grad=False):
    """Odd sizes: 39 rows and 75 channels fill no tile of the kernels exactly."""
    x = torch.randn(*rows, hidden, dtype=dtype, requires_grad=requires_grad)
    bias = torch.randn(hidden, dtype=dtype, requires_grad=requires_grad)
    return x, bias


def residual_inputs(dtype=torch.float32, shape=(3, 13, 45), requires_grad=False):
    x, branch = (torch.randn(*shape, dtype=dtype, requires_grad=requires_grad) for _ in range(2))
    weight, bias, branch_bias = (torch.randn(shape[-1], dtype=dtype, requires_grad=requires_grad) for _ in range(3))
    # Drop path: sample 0 dropped, the others kept and scaled by 1 / keep (keep = 0.8).
    scale = torch.tensor([0.0] + [1.25] * (shape[0] - 1), dtype=torch.float32)
    return x, branch, weight, bias, branch_bias, scale


# --------------------------------------------------------------------------- references

@pytest.mark.parametrize("act", ACTS)
def test_activation_reference_is_bitwise_the_official_formula_in_float32(act):
    x, bias = activation_inputs()
    assert torch.equal(reference.mlp_activation_reference(x, bias, act), official_activation(act, x + bias))


@pytest.mark.parametrize("act", ACTS)
def test_activation_backward_reference_matches_autograd_of_the_official_formula(act):
    x, bias = activation_inputs(torch.float64, requires_grad=True)
    grad = torch.randn_like(x)
    official_activation(act, x + bias).backward(grad)
    grad_x, grad_bias, recomputed = reference.mlp_activation_backward_reference(grad, x.detach(), bias.detach(),
                                                                               act, True)
    assert_close(grad_x, x.grad)
    assert_close(grad_bias, bias.grad)
    assert torch.equal(recomputed, reference.mlp_activation_reference(x.detach(), bias.detach(), act))


def test_residual_reference_matches_the_official_modules():
    x, branch, weight, bias, branch_bias, scale = residual_inputs()
    out, normed, _, _ = reference.residual_layer_norm_reference(x, branch, branch_bias, scale, weight, bias, 1e-5)
    mask = (scale > 0).to(x.dtype).view(-1, 1, 1)
    official_out = x + (branch + branch_bias) * mask / 0.8  # DropPath's formula
    assert_close(out, official_out)
    assert_close(normed, F.layer_norm(out, (x.shape[-1],), weight, bias, 1e-5))


def test_residual_backward_reference_matches_autograd_of_the_official_modules():
    x, branch, weight, bias, branch_bias, scale = residual_inputs(torch.float64, requires_grad=True)
    out = x + (branch + branch_bias) * scale.double().view(-1, 1, 1)
    normed = F.layer_norm(out, (x.shape[-1],), weight, bias, 1e-5)
    grad_out, grad_normed = torch.randn_like(out), torch.randn_like(out)
    torch.autograd.backward((out, normed), (grad_out, grad_normed))
    _, _, mean, rstd = reference.residual_layer_norm_reference(x, branch, branch_bias, scale, weight, bias, 1e-5)
    grads = reference.residual_layer_norm_backward_reference(grad_out, grad_normed, out.detach(), mean, rstd, scale,
                                                             weight.detach())
    for got, leaf in zip(grads, (x, branch, branch_bias, weight, bias)):
        assert_close(got, leaf.grad)


# --------------------------------------------------------------------------- Triton against the reference

def _compare(got, want, dtype):
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, w.shape, g.dtype, w.dtype)
        if w.numel():
            # The interpreter truncates instead of rounding at 16-bit stores: allow twice the tolerance.
            assert_close(g, w, dtype, factor=2.0)


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_triton_activation_matches_reference(dtype, act, with_bias):
    x, bias = activation_inputs(dtype)
    bias = bias if with_bias else None
    grad = torch.randn_like(x)
    _compare([torch.ops.cvt_fast.mlp_activation(x, bias, act, "triton")],
             [torch.ops.cvt_fast.mlp_activation(x, bias, act, "reference")], dtype)
    for with_activation in (True, False):
        _compare(torch.ops.cvt_fast.mlp_activation_backward(grad, x, bias, act, with_activation, "triton"),
                 torch.ops.cvt_fast.mlp_activation_backward(grad, x, bias, act, with_activation, "reference"), dtype)


def test_triton_activation_backward_loops_over_row_groups(monkeypatch):
    # Few programs: each walks several row blocks, the last group partial (300 rows, groups of 128).
    kernels = pytest.importorskip("cvt_fast.kernels.mlp_activation")
    monkeypatch.setattr(kernels, "_TARGET_PROGRAMS", 4)
    x, bias = activation_inputs(rows=(300,), hidden=40)
    grad = torch.randn_like(x)
    _compare(torch.ops.cvt_fast.mlp_activation_backward(grad, x, bias, "quick_gelu", True, "triton"),
             torch.ops.cvt_fast.mlp_activation_backward(grad, x, bias, "quick_gelu", True, "reference"), torch.float32)


@pytest.mark.parametrize("variant", ["plain", "scale", "branch_bias", "scale_and_branch_bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_triton_residual_layer_norm_matches_reference(dtype, variant):
    x, branch, weight, bias, branch_bias, scale = residual_inputs(dtype)
    weight, bias = weight.float(), bias.float()  # the model's LayerNorm parameters stay float32
    branch_bias = branch_bias if "branch_bias" in variant else None
    scale = scale if "scale" in variant else None
    outputs = {b: torch.ops.cvt_fast.residual_layer_norm(x, branch, branch_bias, scale, weight, bias, 1e-5, b)
               for b in ("triton", "reference")}
    _compare(outputs["triton"], outputs["reference"], dtype)
    out, _, mean, rstd = outputs["reference"]
    grad_out, grad_normed = torch.randn_like(x), torch.randn_like(x)
    _compare(*(torch.ops.cvt_fast.residual_layer_norm_backward(grad_out, grad_normed, out, mean, rstd, scale, weight,
                                                               b)
               for b in ("triton", "reference")), dtype)


def test_triton_residual_layer_norm_at_cvt13_stage3_width_looping_over_row_groups(monkeypatch):
    # C = 384 (BLOCK_C 512) and 2 x 67 rows; few programs, so each walks many row blocks.
    kernels = pytest.importorskip("cvt_fast.kernels.residual_layer_norm")
    monkeypatch.setattr(kernels, "_TARGET_PROGRAMS", 4)
    x, branch, weight, bias, branch_bias, scale = residual_inputs(torch.bfloat16, shape=(2, 67, 384))
    weight, bias = weight.float(), bias.float()
    outputs = {b: torch.ops.cvt_fast.residual_layer_norm(x, branch, branch_bias, scale, weight, bias, 1e-5, b)
               for b in ("triton", "reference")}
    _compare(outputs["triton"], outputs["reference"], torch.bfloat16)
    out, _, mean, rstd = outputs["reference"]
    grads = torch.randn_like(x), torch.randn_like(x)
    _compare(*(torch.ops.cvt_fast.residual_layer_norm_backward(*grads, out, mean, rstd, scale, weight, b)
               for b in ("triton", "reference")), torch.bfloat16)


def linear_inputs(dtype=torch.float32, rows=(3, 13), width=45, hidden=75, requires_grad=False):
    """Odd sizes: 39 rows, K = 45 (two K steps of the interpreter's 32) and N = 75 fill no tile."""
    x = torch.randn(*rows, width, dtype=dtype, requires_grad=requires_grad)
    weight = (torch.randn(hidden, width, dtype=dtype) / width ** 0.5).requires_grad_(requires_grad)
    bias = torch.randn(hidden, dtype=dtype, requires_grad=requires_grad)
    return x, weight, bias


@pytest.mark.parametrize("act", ACTS)
def test_linear_activation_reference_is_the_official_linear_then_activation(act):
    x, weight, bias = linear_inputs(torch.float64)
    y, hidden = reference.linear_activation_reference(x, weight, bias, act, True)
    assert_close(hidden, F.linear(x, weight))
    assert_close(y, official_activation(act, F.linear(x, weight, bias)))


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_triton_linear_activation_matches_reference(dtype, act, with_bias):
    x, weight, bias = linear_inputs(dtype)
    bias = bias if with_bias else None
    for keep_hidden in (True, False):
        _compare(*(torch.ops.cvt_fast.linear_activation(x, weight, bias, act, keep_hidden, b)
                   for b in ("triton", "reference")), dtype)
    # Its backward partner, for out = act(hidden + bias) @ fc2_weight^T with fc2_weight (40, 75).
    hidden = torch.ops.cvt_fast.linear_activation(x, weight, bias, act, True, "reference")[1]
    grad_out = torch.randn(3, 13, 40, dtype=dtype)
    fc2_weight = (torch.randn(40, 75) / 75 ** 0.5).to(dtype)
    for with_activation in (True, False):
        _compare(*(torch.ops.cvt_fast.activation_grad_through_linear(grad_out, fc2_weight, hidden, bias, act,
                                                                     with_activation, b)
                   for b in ("triton", "reference")), dtype)


# --------------------------------------------------------------------------- gradcheck and opcheck

@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_activation_gradcheck_float64(backend, act):
    x, weight, bias = linear_inputs(torch.float64, rows=(2, 3), width=4, hidden=5, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: ops.linear_activation(*t, act=act, backend=backend), (x, weight, bias),
                                    fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_activation_ops_pass_opcheck(backend):
    x, weight, bias = linear_inputs(rows=(2, 5), width=6, hidden=12, requires_grad=True)
    for keep_hidden in (True, False):
        _assert_opcheck(torch.ops.cvt_fast.linear_activation.default, (x, weight, bias, "quick_gelu", keep_hidden,
                                                                       backend))
    _assert_opcheck(torch.ops.cvt_fast.linear_activation.default, (x, weight, None, "gelu", True, backend))
    hidden = torch.randn(2, 5, 12)
    grad_out, fc2_weight = torch.randn(2, 5, 6), torch.randn(6, 12)
    for bias_or_none, with_activation in ((bias.detach(), True), (None, False)):
        _assert_opcheck(torch.ops.cvt_fast.activation_grad_through_linear.default,
                        (grad_out, fc2_weight, hidden, bias_or_none, "quick_gelu", with_activation, backend))


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_activation_gradcheck_float64(backend, act):
    x, bias = activation_inputs(torch.float64, rows=(2, 3), hidden=5, requires_grad=True)
    # Under the interpreter every evaluation is a kernel launch: the Triton case checks random
    # projections of the Jacobian (fast mode), the reference the whole of it.
    assert torch.autograd.gradcheck(lambda x, b: ops.mlp_activation(x, b, act, backend=backend), (x, bias),
                                    fast_mode=backend == "triton")


@pytest.mark.parametrize("variant", ["plain", "scale_and_branch_bias"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_layer_norm_gradcheck_float64(backend, variant):
    x, branch, weight, bias, branch_bias, scale = residual_inputs(torch.float64, shape=(2, 3, 5), requires_grad=True)
    extra = dict(branch_bias=branch_bias, scale=scale) if variant != "plain" else {}
    leaves = (x, branch, weight, bias) + ((branch_bias,) if extra else ())

    def both_outputs(x, branch, weight, bias, *maybe_bias):
        kwargs = dict(extra, branch_bias=maybe_bias[0]) if maybe_bias else {}
        return ops.residual_layer_norm(x, branch, weight, bias, 1e-5, backend=backend, **kwargs)

    assert torch.autograd.gradcheck(both_outputs, leaves, fast_mode=backend == "triton")


def _assert_opcheck(op, args):
    results = torch.library.opcheck(op, args)
    assert all(v == "SUCCESS" for v in results.values()), results


@pytest.mark.parametrize("backend", BACKENDS)
def test_activation_ops_pass_opcheck(backend):
    x, bias = activation_inputs(rows=(2, 5), hidden=12, requires_grad=True)
    _assert_opcheck(torch.ops.cvt_fast.mlp_activation.default, (x, bias, "quick_gelu", backend))
    _assert_opcheck(torch.ops.cvt_fast.mlp_activation.default, (x, None, "gelu", backend))
    grad = torch.randn(2, 5, 12)
    _assert_opcheck(torch.ops.cvt_fast.mlp_activation_backward.default,
                    (grad, x.detach(), bias.detach(), "quick_gelu", True, backend))
    _assert_opcheck(torch.ops.cvt_fast.mlp_activation_backward.default, (grad, x.detach(), None, "gelu", False, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_ops_pass_opcheck(backend):
    x, branch, weight, bias, branch_bias, scale = residual_inputs(shape=(3, 4, 8), requires_grad=True)
    _assert_opcheck(torch.ops.cvt_fast.residual_layer_norm.default,
                    (x, branch, branch_bias, scale, weight, bias, 1e-5, backend))
    _assert_opcheck(torch.ops.cvt_fast.residual_layer_norm.default, (x, branch, None, None, weight, bias, 1e-5, backend))
    out, _, mean, rstd = torch.ops.cvt_fast.residual_layer_norm(x, branch, None, None, weight, bias, 1e-5, backend)
    grads = (torch.randn(3, 4, 8), torch.randn(3, 4, 8))
    for with_scale in (True, False):
        _assert_opcheck(torch.ops.cvt_fast.residual_layer_norm_backward.default,
                        (*grads, out.detach(), mean, rstd, scale if with_scale else None, weight.detach(), backend))


# --------------------------------------------------------------------------- behaviour at the edges

def test_residual_without_scale_gives_both_inputs_the_same_gradient():
    x, branch, weight, bias, _, _ = residual_inputs(requires_grad=True)
    out, normed = ops.residual_layer_norm(x, branch, weight, bias)
    (out.sum() + normed.square().sum()).backward()
    assert torch.equal(x.grad, branch.grad)


def test_residual_unused_output_gets_a_zero_gradient():
    x, branch, weight, bias, _, _ = residual_inputs(torch.float64, requires_grad=True)
    _, normed = ops.residual_layer_norm(x, branch, weight, bias)
    normed.square().sum().backward()
    expected = torch.autograd.grad(F.layer_norm(x + branch, (x.shape[-1],), weight, bias).square().sum(), x)[0]
    assert_close(x.grad, expected)


def test_bfloat16_autocast_casts_the_bias_as_the_linear_would():
    x = torch.randn(4, 7, 16).bfloat16()
    bias = torch.randn(16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.mlp_activation(x, bias)
    want = reference.mlp_activation_reference(x, bias.bfloat16(), "quick_gelu")
    assert y.dtype == torch.bfloat16 and torch.equal(y, want)


def test_compiles_in_one_graph_with_the_eager_numbers():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    x, branch, weight, bias, branch_bias, scale = residual_inputs(requires_grad=True)
    hidden_bias = torch.randn(45, requires_grad=True)

    def step(x, branch, weight, bias, branch_bias, hidden_bias):
        out, normed = ops.residual_layer_norm(x, branch, weight, bias, branch_bias=branch_bias, scale=scale)
        return out, ops.mlp_activation(normed, hidden_bias)

    counter = CompileCounterWithBackend("aot_eager")
    leaves = (x, branch, weight, bias, branch_bias, hidden_bias)
    compiled = torch.compile(step, backend=counter, fullgraph=True)(*leaves)
    eager = step(*leaves)
    assert counter.frame_count == 1
    for got, want in zip(compiled, eager):
        assert_close(got, want)
    got_grads = torch.autograd.grad(sum(t.square().sum() for t in compiled), leaves)
    want_grads = torch.autograd.grad(sum(t.square().sum() for t in eager), leaves)
    for got, want in zip(got_grads, want_grads):
        assert_close(got, want)
    torch._dynamo.reset()


@pytest.mark.parametrize("requested, expected", [("reference", "reference"), ("auto", "reference"),
                                                 ("cuda", "reference"), ("sdpa", "reference"),
                                                 ("xformers", "reference"), (None, "reference")])
def test_backends_without_these_kernels_use_the_reference_on_the_cpu(requested, expected, monkeypatch):
    monkeypatch.delenv("CVT_FAST_BACKEND", raising=False)
    assert elementwise_backend(requested, torch.randn(2)) == expected


def test_triton_on_the_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        elementwise_backend("triton", torch.randn(2))


def test_bad_inputs_raise_clear_errors():
    x, bias = activation_inputs()
    with pytest.raises(ValueError, match="act must be one of"):
        ops.mlp_activation(x, bias, act="relu")
    with pytest.raises(ValueError, match=r"bias must have shape \(75,\)"):
        ops.mlp_activation(x, bias[:5])
    with pytest.raises(TypeError, match="dtype torch.int64"):
        ops.mlp_activation(x.long())
    with pytest.raises(ValueError, match="unknown backend"):
        ops.mlp_activation(x, backend="cudnn")
    x, weight, bias = linear_inputs()
    with pytest.raises(ValueError, match=r"weight must be \(N, 45\)"):
        ops.linear_activation(x, weight.t(), bias)
    with pytest.raises(TypeError, match="cast them to one dtype"):
        ops.linear_activation(x, weight.double(), bias)
    x, branch, weight, bias, branch_bias, scale = residual_inputs()
    with pytest.raises(ValueError, match="branch must have x's shape"):
        ops.residual_layer_norm(x, branch[:, :5], weight, bias)
    with pytest.raises(ValueError, match=r"scale must have shape \(3,\)"):
        ops.residual_layer_norm(x, branch, weight, bias, scale=scale[:2])
    with pytest.raises(ValueError, match="eps must be a positive float"):
        ops.residual_layer_norm(x, branch, weight, bias, eps=0.0)
    with pytest.raises(TypeError, match="weight and bias of the LayerNorm are required"):
        ops.residual_layer_norm(x, branch, None, bias)
