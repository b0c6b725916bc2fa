"""Triton conv_proj kernels (kernels/conv_proj.py) against a plain-PyTorch reference.

On the CPU the kernels run under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so shapes stay small (CvT-13's stage 3 for one image at most); all
CvT-13 shapes at full batch run on a GPU.
"""
import pytest
import torch
import torch.nn.functional as F

from tolerances import assert_close

conv_proj = pytest.importorskip("cvt_fast.kernels.conv_proj")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------------------------------
# Reference: tokens -> NCHW -> depthwise conv2d -> tokens, cls row passed through.
# ------------------------------------------------------------------------------------------


def reference_conv_proj(x, weight_q, weight_k, weight_v, bias_q, bias_k, bias_v,
                        height, width, has_cls, stride_q, stride_kv, padding_q, padding_kv):
    batch, _, channels = x.shape
    cls_row, grid = (x[:, :1], x[:, 1:]) if has_cls else (None, x)
    image = grid.transpose(1, 2).reshape(batch, channels, height, width)
    outputs = []
    for weight, bias, stride, padding in ((weight_q, bias_q, stride_q, padding_q),
                                          (weight_k, bias_k, stride_kv, padding_kv),
                                          (weight_v, bias_v, stride_kv, padding_kv)):
        y = F.conv2d(image, weight, bias, stride=stride, padding=padding, groups=channels)
        tokens = y.flatten(2).transpose(1, 2)
        outputs.append(torch.cat([cls_row, tokens], dim=1) if has_cls else tokens)
    return tuple(outputs)


def make_inputs(batch, height, width, channels, has_cls, dtype, biases=True, kernel=3):
    x = torch.randn(batch, int(has_cls) + height * width, channels, dtype=torch.float64)
    weights = [torch.randn(channels, 1, kernel, kernel, dtype=torch.float64) / kernel for _ in range(3)]
    bias = [torch.randn(channels, dtype=torch.float64) if biases else None for _ in range(3)]
    to = lambda t: None if t is None else t.to(device=DEVICE, dtype=dtype)  # noqa: E731
    return to(x), [to(w) for w in weights], [to(b) for b in bias]


def reference_outputs_and_grads(x, weights, biases, grads, geometry):
    """Forward and (x, weights) gradients of the reference, in float64."""
    x64 = x.detach().double().requires_grad_(True)
    w64 = [w.detach().double().requires_grad_(True) for w in weights]
    b64 = [None if b is None else b.detach().double() for b in biases]
    outs = reference_conv_proj(x64, *w64, *b64, *geometry)
    grad_inputs = torch.autograd.grad(outs, [x64, *w64], [g.double() for g in grads])
    return outs, grad_inputs


# (height, width, channels, has_cls, stride_q, stride_kv, padding_q, padding_kv, biases)
# Odd grids and channel counts that are not multiples of the channel block exercise the masks.
CASES = [
    (7, 7, 24, True, 1, 2, 1, 1, True),     # CvT stage 3 geometry in miniature
    (15, 13, 40, False, 1, 2, 1, 1, True),  # odd, non-square, partial tiles everywhere
    (5, 9, 24, True, 1, 2, 1, 1, False),
    (1, 1, 8, True, 1, 2, 1, 1, True),      # a single pixel
    (6, 8, 16, False, 1, 2, 0, 0, True),    # no padding: outputs smaller than the grid
    (7, 5, 24, True, 1, 2, 0, 1, False),    # mixed paddings on the fused path
    (5, 9, 40, False, 2, 2, 1, 1, True),    # generic path, q and k/v share one launch
    (7, 7, 24, True, 1, 1, 1, 1, True),     # generic path, stride 1 everywhere
    (9, 6, 24, True, 2, 1, 1, 0, True),     # generic path, two launches
]
CASE_IDS = ["7x7cls", "15x13", "5x9cls_nobias", "1x1cls", "6x8pad0", "7x5pad01",
            "5x9s22", "7x7s11", "9x6s21"]

# Every geometry in fp32; the other dtypes on the geometries that cover the most masking
# (the interpreter is slow, and dtype handling does not depend on the geometry).
MATRIX = [pytest.param(case, torch.float32, id=f"float32-{name}") for case, name in zip(CASES, CASE_IDS)]
MATRIX += [pytest.param(CASES[i], dtype, id=f"{str(dtype).split('.')[-1]}-{CASE_IDS[i]}")
           for dtype, picks in ((torch.float64, (0, 1, 8)), (torch.bfloat16, (0, 6)), (torch.float16, (1, 7)))
           for i in picks]


@pytest.mark.parametrize("case, dtype", MATRIX)
def test_conv_proj_forward_and_backward_match_reference(case, dtype):
    height, width, channels, has_cls, sq, skv, pq, pkv, biases = case
    geometry = (height, width, has_cls, sq, skv, pq, pkv)
    x, weights, bias = make_inputs(2, height, width, channels, has_cls, dtype, biases)

    q, k, v = conv_proj.conv_proj_forward(x, *weights, *bias, *geometry)
    grads = [torch.randn(t.shape, dtype=torch.float64).to(device=DEVICE, dtype=dtype) for t in (q, k, v)]
    expected, expected_grads = reference_outputs_and_grads(x, weights, bias, grads, geometry)
    for actual, reference in zip((q, k, v), expected):
        assert actual.dtype == dtype and actual.is_contiguous()
        assert_close(actual, reference, dtype)

    actual_grads = conv_proj.conv_proj_backward(*grads, x, *weights, *geometry)
    for actual, reference, name in zip(actual_grads, expected_grads, ("x", "weight_q", "weight_k", "weight_v")):
        assert actual.dtype == dtype, name
        assert_close(actual, reference, dtype)


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU tests cover the real shapes at full batch")
def test_conv_proj_at_the_real_cvt13_stage3_shape_under_the_interpreter():
    # One image of CvT-13's last stage: a 14x14 grid plus the cls row, 384 channels, bf16.
    geometry = (14, 14, True, 1, 2, 1, 1)
    x, weights, bias = make_inputs(1, 14, 14, 384, True, torch.bfloat16)
    outputs = conv_proj.conv_proj_forward(x, *weights, *bias, *geometry)
    grads = [torch.randn(t.shape).to(torch.bfloat16) for t in outputs]
    expected, expected_grads = reference_outputs_and_grads(x, weights, bias, grads, geometry)
    for actual, reference in zip(outputs, expected):
        assert_close(actual, reference, torch.bfloat16)
    for actual, reference in zip(conv_proj.conv_proj_backward(*grads, x, *weights, *geometry), expected_grads):
        assert_close(actual, reference, torch.bfloat16)


@pytest.mark.parametrize("geometry", [(6, 7, True, 1, 2, 2, 2), (6, 7, False, 2, 1, 2, 1)], ids=["fused", "generic"])
def test_conv_proj_matches_reference_with_kernel_size_5(geometry):
    x, weights, bias = make_inputs(1, 6, 7, 8, geometry[2], torch.float64, kernel=5)
    outputs = conv_proj.conv_proj_forward(x, *weights, *bias, *geometry)
    grads = [torch.randn_like(t) for t in outputs]
    expected, expected_grads = reference_outputs_and_grads(x, weights, bias, grads, geometry)
    for actual, reference in zip(outputs, expected):
        assert_close(actual, reference)
    for actual, reference in zip(conv_proj.conv_proj_backward(*grads, x, *weights, *geometry), expected_grads):
        assert_close(actual, reference)


def test_conv_proj_cls_row_is_passed_through_unconvolved():
    x, weights, bias = make_inputs(2, 5, 5, 8, True, torch.float32)
    q, k, v = conv_proj.conv_proj_forward(x, *weights, *bias, 5, 5, True, 1, 2, 1, 1)
    for out in (q, k, v):
        assert torch.equal(out[:, 0], x[:, 0])
    grads = [torch.randn_like(t) for t in (q, k, v)]
    grad_x = conv_proj.conv_proj_backward(*grads, x, *weights, 5, 5, True, 1, 2, 1, 1)[0]
    assert_close(grad_x[:, 0], grads[0][:, 0] + grads[1][:, 0] + grads[2][:, 0])


def test_conv_proj_backward_treats_missing_output_grads_as_zero():
    geometry = (7, 5, True, 1, 2, 1, 1)
    x, weights, bias = make_inputs(2, 7, 5, 24, True, torch.float64)
    q, k, v = conv_proj.conv_proj_forward(x, *weights, *bias, *geometry)
    grad_v = torch.randn_like(v)
    actual = conv_proj.conv_proj_backward(None, None, grad_v, x, *weights, *geometry)
    expected = conv_proj.conv_proj_backward(torch.zeros_like(q), torch.zeros_like(k), grad_v, x, *weights, *geometry)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_conv_proj_reads_strided_token_views():
    """x may be a view with contiguous channels (e.g. a slice of a larger buffer)."""
    geometry = (5, 7, False, 1, 2, 1, 1)
    x, weights, bias = make_inputs(2, 5, 7, 16, False, torch.float64)
    wide = torch.randn(2, 35, 32, dtype=torch.float64, device=DEVICE)
    wide[..., :16] = x
    view = wide[..., :16]
    assert not view.is_contiguous()
    for actual, expected in zip(conv_proj.conv_proj_forward(view, *weights, *bias, *geometry),
                                conv_proj.conv_proj_forward(x, *weights, *bias, *geometry)):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------
# gradcheck through an autograd.Function built on the two kernels
# ------------------------------------------------------------------------------------------


class ConvProjFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight_q, weight_k, weight_v, bias_q, bias_k, bias_v, geometry):
        ctx.save_for_backward(x, weight_q, weight_k, weight_v)
        ctx.geometry = geometry
        return conv_proj.conv_proj_forward(x, weight_q, weight_k, weight_v, bias_q, bias_k, bias_v, *geometry)

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        x, weight_q, weight_k, weight_v = ctx.saved_tensors
        has_cls = ctx.geometry[2]
        grad_x, gwq, gwk, gwv = conv_proj.conv_proj_backward(grad_q, grad_k, grad_v, x, weight_q, weight_k,
                                                             weight_v, *ctx.geometry)
        # Bias gradients: sum over batch and convolved rows (the cls row has no bias).
        bias_grads = [g[:, int(has_cls):].sum(dim=(0, 1)) for g in (grad_q, grad_k, grad_v)]
        return (grad_x, gwq, gwk, gwv, *bias_grads, None)


@pytest.mark.parametrize("geometry", [(3, 4, True, 1, 2, 1, 1), (4, 3, False, 2, 1, 1, 0)],
                         ids=["fused_cls", "generic"])
def test_conv_proj_gradcheck_float64(geometry):
    height, width, has_cls = geometry[:3]
    x, weights, bias = make_inputs(1, height, width, 3, has_cls, torch.float64)
    inputs = [t.requires_grad_(True) for t in (x, *weights, *bias)]
    assert torch.autograd.gradcheck(lambda *a: ConvProjFunction.apply(*a, geometry), inputs,
                                    eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=True)


# ------------------------------------------------------------------------------------------
# Launch preconditions. The inputs themselves (shapes, dtypes, devices, the grid's fit) are
# checked by the registered op before any backend runs: tests/test_ops_registration.py.
# ------------------------------------------------------------------------------------------


def _valid_call_args():
    x, weights, bias = make_inputs(1, 4, 4, 8, True, torch.float32)
    return x, weights, bias


def test_conv_proj_needs_one_odd_kernel_size_below_the_padding():
    x, weights, bias = _valid_call_args()
    with pytest.raises(ValueError, match=r"need one kernel size for q, k and v, got \(3, 5, 3\)"):
        conv_proj.conv_proj_forward(x, weights[0], torch.randn(8, 1, 5, 5, device=DEVICE), weights[2], *bias,
                                    4, 4, True, 1, 2, 1, 1)
    w2 = [torch.randn(8, 1, 2, 2, device=DEVICE) for _ in range(3)]
    with pytest.raises(ValueError, match=r"need an odd kernel size, got 2"):
        conv_proj.conv_proj_forward(x, *w2, *bias, 4, 4, True, 1, 2, 1, 1)
    with pytest.raises(ValueError, match="padding_q must be below the kernel size 3"):
        conv_proj.conv_proj_forward(x, *weights, *bias, 4, 4, True, 1, 2, 3, 1)
    with pytest.raises(ValueError, match="padding_kv must be below"):
        conv_proj.conv_proj_backward(None, None, None, x, *weights, 4, 4, True, 1, 2, 1, 3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-without-interpreter message")
def test_conv_proj_cpu_tensors_without_interpreter_name_the_fix(monkeypatch):
    monkeypatch.setattr(conv_proj, "_INTERPRET", False)
    x, weights, bias = _valid_call_args()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        conv_proj.conv_proj_forward(x, *weights, *bias, 4, 4, True, 1, 2, 1, 1)


# ------------------------------------------------------------------------------------------
# Real CvT-13 shapes (GPU only)
# ------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("height, channels, has_cls", [(56, 64, False), (28, 192, False), (14, 384, True)],
                         ids=["stage1", "stage2", "stage3"])
def test_conv_proj_matches_reference_at_cvt13_shapes_bf16(height, channels, has_cls):
    geometry = (height, height, has_cls, 1, 2, 1, 1)
    x, weights, bias = make_inputs(8, height, height, channels, has_cls, torch.bfloat16)
    q, k, v = conv_proj.conv_proj_forward(x, *weights, *bias, *geometry)
    grads = [torch.randn_like(t) for t in (q, k, v)]
    expected, expected_grads = reference_outputs_and_grads(x, weights, bias, grads, geometry)
    for actual, reference in zip((q, k, v), expected):
        assert_close(actual, reference, torch.bfloat16)
    for actual, reference in zip(conv_proj.conv_proj_backward(*grads, x, *weights, *geometry), expected_grads):
        assert_close(actual, reference, torch.bfloat16)
