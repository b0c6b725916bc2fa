"""The fused elementwise ops' Triton kernels on a GPU, at CvT-13's shapes (marked gpu: skipped without one).

On the CPU these kernels run under Triton's interpreter at small odd shapes
(tests/test_fused_elementwise.py). Here they run compiled, on CUDA tensors, at the shapes the model
gives them: batch 8, the three stages of CvT-13 at 224 (3136, 784 and 197 tokens; C = 64, 192,
384; the MLP's hidden width 4C), in every dtype 'auto' sends to them on CUDA (bf16, fp16, fp32,
and fp64, which Triton also takes). Each op's forward and backward (`torch.ops.cvt_fast.*` with
backend 'triton') is compared with the same op on backend 'reference' on the same device, with
the tolerances of tests/tolerances.py; the six registered ops pass opcheck on CUDA tensors; the
lean MLP, which is how the model uses the fused products, matches the reference end to end
through autograd. The Triton record's `gpu_tests` (cvt_fast/ops/backends.py) names this file, so
bench/tune.py's "GPU tests passed" covers these kernels.

As tests/test_kernels_attention.py does, the kernel modules are imported here; conftest.py sets
TRITON_INTERPRET=1 only where there is no GPU, so on a GPU they are compiled kernels, and every
test checks that (a GPU run under the interpreter would pass without testing them).
"""
import pytest
import torch

from tolerances import assert_close

pytest.importorskip("triton")
from triton.runtime.jit import JITFunction  # noqa: E402

from cvt_fast.kernels import linear_activation, mlp_activation, residual_layer_norm  # noqa: E402
from cvt_fast.lean_mlp import lean_mlp  # noqa: E402
from cvt_fast.ops.fused_elementwise import elementwise_backend  # noqa: E402

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
BATCH = 8
# (tokens, C) of CvT-13 at 224: 56x56, 28x28, 14x14 + the cls token.
STAGES = [pytest.param(3136, 64, id="stage1"), pytest.param(784, 192, id="stage2"),
          pytest.param(197, 384, id="stage3")]
STAGE3 = (197, 384)
DTYPES = [pytest.param(d, id=str(d).replace("torch.", ""))
          for d in (torch.bfloat16, torch.float16, torch.float32, torch.float64)]
KERNEL_MODULES = (linear_activation, mlp_activation, residual_layer_norm)


@pytest.fixture(autouse=True)
def _compiled_kernels_on_cuda():
    interpreted = [m.__name__ for m in KERNEL_MODULES
                   for name, value in vars(m).items() if name.endswith("_kernel") and not isinstance(value, JITFunction)]
    assert not interpreted, (f"{interpreted} are not compiled GPU kernels (TRITON_INTERPRET=1 in the environment?): "
                             "unset TRITON_INTERPRET to test the kernels themselves")
    yield


def _randn(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, device=DEVICE, dtype=torch.float64) * scale).to(dtype)


def _compare(got, want, dtype):
    """Output by output: same shape and dtype, within the input dtype's tolerance."""
    assert len(got) == len(want)
    for index, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.dtype == w.dtype, (index, g.shape, w.shape, g.dtype, w.dtype)
        assert g.device.type == DEVICE, index
        if w.numel():
            assert_close(g, w, dtype)


def _both(op, *args):
    """op(*args, backend) for 'triton' and 'reference'."""
    return [op(*args, backend) for backend in ("triton", "reference")]


def _stages_and_acts():
    """QuickGELU (the official CvT) at every stage, exact GELU (Hugging Face's port) at stage 3."""
    return [pytest.param(*p.values, "quick_gelu", id=f"{p.id}-quick_gelu") for p in STAGES] + [
        pytest.param(*STAGE3, "gelu", id="stage3-gelu")]


# --------------------------------------------------------------------------- against the reference

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens, channels, act", _stages_and_acts())
def test_gpu_mlp_activation_matches_reference(tokens, channels, act, dtype):
    hidden = 4 * channels
    x, bias = _randn(BATCH, tokens, hidden, dtype=dtype), _randn(hidden, dtype=dtype)
    grad = _randn(BATCH, tokens, hidden, dtype=dtype)
    _compare(*([y] for y in _both(torch.ops.cvt_fast.mlp_activation, x, bias, act)), dtype)
    for with_activation in (True, False):
        _compare(*_both(torch.ops.cvt_fast.mlp_activation_backward, grad, x, bias, act, with_activation), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens, channels, act", _stages_and_acts())
def test_gpu_linear_activation_and_its_backward_match_reference(tokens, channels, act, dtype):
    hidden_width = 4 * channels
    x = _randn(BATCH, tokens, channels, dtype=dtype)
    fc1_weight = _randn(hidden_width, channels, dtype=dtype, scale=channels ** -0.5)
    fc1_bias = _randn(hidden_width, dtype=dtype)
    for keep_hidden in (True, False):  # training keeps fc1's output for the backward, eval does not
        _compare(*_both(torch.ops.cvt_fast.linear_activation, x, fc1_weight, fc1_bias, act, keep_hidden), dtype)
    # The backward's product: fc2's input gradient with the activation's backward in its epilogue.
    hidden = torch.ops.cvt_fast.linear_activation(x, fc1_weight, fc1_bias, act, True, "reference")[1]
    fc2_weight = _randn(channels, hidden_width, dtype=dtype, scale=hidden_width ** -0.5)
    grad_out = _randn(BATCH, tokens, channels, dtype=dtype)
    for with_activation in (True, False):
        _compare(*_both(torch.ops.cvt_fast.activation_grad_through_linear, grad_out, fc2_weight, hidden, fc1_bias,
                        act, with_activation), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ["plain", "scale_and_branch_bias"])
@pytest.mark.parametrize("tokens, channels", STAGES)
def test_gpu_residual_layer_norm_matches_reference(tokens, channels, variant, dtype):
    x, branch = _randn(BATCH, tokens, channels, dtype=dtype), _randn(BATCH, tokens, channels, dtype=dtype)
    # The model's LayerNorm parameters stay float32 (float64 for a float64 model).
    parameter_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    weight, bias = _randn(channels, dtype=parameter_dtype), _randn(channels, dtype=parameter_dtype)
    branch_bias, scale = None, None
    if variant == "scale_and_branch_bias":
        branch_bias = _randn(channels, dtype=dtype)
        # Drop path at rate 0.1: samples 0 and 5 dropped, the others scaled by 1 / 0.9.
        scale = torch.full((BATCH,), 1 / 0.9, device=DEVICE)
        scale[[0, 5]] = 0.0
    outputs = _both(torch.ops.cvt_fast.residual_layer_norm, x, branch, branch_bias, scale, weight, bias, 1e-5)
    _compare(*outputs, dtype)
    # Both backwards from the same saved tensors, so each is compared on its own.
    out, _, mean, rstd = outputs[1]
    grad_out, grad_normed = _randn(BATCH, tokens, channels, dtype=dtype), _randn(BATCH, tokens, channels, dtype=dtype)
    _compare(*_both(torch.ops.cvt_fast.residual_layer_norm_backward, grad_out, grad_normed, out, mean, rstd, scale,
                    weight), dtype)


@pytest.mark.parametrize("dtype", DTYPES[:3])
@pytest.mark.parametrize("tokens, channels", STAGES)
def test_gpu_lean_mlp_matches_reference_through_autograd(tokens, channels, dtype):
    """The model's MLP: fc1 + activation forward, fc2's input gradient + activation backward."""
    hidden_width = 4 * channels
    x = _randn(BATCH, tokens, channels, dtype=dtype).requires_grad_()
    parameters = [_randn(hidden_width, channels, dtype=dtype, scale=channels ** -0.5), _randn(hidden_width, dtype=dtype),
                  _randn(channels, hidden_width, dtype=dtype, scale=hidden_width ** -0.5), _randn(channels, dtype=dtype)]
    leaves = [x] + [p.requires_grad_() for p in parameters]
    grad = _randn(BATCH, tokens, channels, dtype=dtype)

    def output_and_grads(backend):
        out = lean_mlp(*leaves, act="quick_gelu", backend=backend)
        return (out, *torch.autograd.grad(out, leaves, grad))

    _compare(output_and_grads("triton"), output_and_grads("reference"), dtype)


# --------------------------------------------------------------------------- registration on CUDA

def _assert_opcheck(op, args):
    results = torch.library.opcheck(op, args)
    assert all(v == "SUCCESS" for v in results.values()), results


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_gpu_fused_elementwise_ops_pass_opcheck(dtype):
    # CvT-13's stage-3 token count at batch 2 and a narrower width: opcheck runs each op many times.
    tokens, channels = 197, 64
    hidden_width = 4 * channels
    x = _randn(2, tokens, channels, dtype=dtype).requires_grad_()
    fc1_weight = _randn(hidden_width, channels, dtype=dtype, scale=channels ** -0.5).requires_grad_()
    fc1_bias = _randn(hidden_width, dtype=dtype).requires_grad_()
    _assert_opcheck(torch.ops.cvt_fast.linear_activation.default, (x, fc1_weight, fc1_bias, "quick_gelu", True, "triton"))
    hidden = _randn(2, tokens, hidden_width, dtype=dtype)
    grad_out, fc2_weight = _randn(2, tokens, channels, dtype=dtype), _randn(channels, hidden_width, dtype=dtype)
    _assert_opcheck(torch.ops.cvt_fast.activation_grad_through_linear.default,
                    (grad_out, fc2_weight, hidden, fc1_bias.detach(), "gelu", True, "triton"))
    _assert_opcheck(torch.ops.cvt_fast.mlp_activation.default,
                    (hidden.clone().requires_grad_(), fc1_bias, "quick_gelu", "triton"))
    _assert_opcheck(torch.ops.cvt_fast.mlp_activation_backward.default,
                    (_randn(2, tokens, hidden_width, dtype=dtype), hidden, fc1_bias.detach(), "gelu", True, "triton"))
    branch = _randn(2, tokens, channels, dtype=dtype).requires_grad_()
    weight, bias = (_randn(channels, dtype=torch.float32).requires_grad_() for _ in range(2))
    branch_bias = _randn(channels, dtype=dtype).requires_grad_()
    scale = torch.tensor([0.0, 1.25], device=DEVICE)
    _assert_opcheck(torch.ops.cvt_fast.residual_layer_norm.default,
                    (x, branch, branch_bias, scale, weight, bias, 1e-5, "triton"))
    out, _, mean, rstd = torch.ops.cvt_fast.residual_layer_norm(x, branch, branch_bias, scale, weight, bias, 1e-5,
                                                                "triton")
    grads = (_randn(2, tokens, channels, dtype=dtype), _randn(2, tokens, channels, dtype=dtype))
    for scale_or_none in (scale, None):
        _assert_opcheck(torch.ops.cvt_fast.residual_layer_norm_backward.default,
                        (*grads, out.detach(), mean, rstd, scale_or_none, weight.detach(), "triton"))


@pytest.mark.parametrize("op", ["mlp_activation", "linear_activation", "residual_layer_norm"])
def test_gpu_auto_takes_the_triton_kernels_tested_here(op):
    # Only 'reference' and 'triton' implement these ops: on CUDA 'auto' is Triton, in every dtype.
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        assert elementwise_backend("auto", torch.empty(2, 8, device=DEVICE, dtype=dtype), op) == "triton", dtype
