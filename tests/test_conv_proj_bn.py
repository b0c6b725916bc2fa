"""conv_proj_bn: the convolutional projection with training-mode BatchNorm inside the op.

Ground truth: the official path's modules, nn.Conv2d (depthwise) then nn.BatchNorm2d in training
mode on the NCHW grid, with the cls row concatenated back (cvt_fast.model.Attention._project_official),
in float64. Each backend runs through the model's helper (cvt_fast.model._conv_proj_batch_norm),
which calls cvt_fast.ops.conv_proj_bn and updates the running statistics, so outputs, gradients
(x, conv weights, BatchNorm weights and biases), running statistics and counters are compared
after several steps. Backends: 'reference', 'triton' (the interpreter on the CPU) and 'composed'
(what the CUDA backend runs until its kernels have a BatchNorm epilogue: cvt_fast/ops/
batch_norm_composed.py around a backend's plain conv_proj, here the reference's, installed as the
'cuda' record for the test).
"""
import copy
import dataclasses
import importlib.util

import pytest
import torch
from torch import nn

import cvt_fast.ops as ops
from cvt_fast.model import Attention, _conv_proj_batch_norm, build_model
from cvt_fast.ops import backends, reference
from cvt_fast.ops.batch_norm_composed import compose
from tiny_spec import tiny_spec
from tolerances import assert_close

TRITON = pytest.param("triton", marks=pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"))
BACKENDS = ["reference", TRITON, "composed"]


@pytest.fixture
def backend_name(request, monkeypatch):
    """The backend to pass to the ops; 'composed' becomes the 'cuda' record with the composition
    around the reference's conv_proj (the CUDA loader's code path, runnable on the CPU). For 'triton'
    the interpreter's tiles shrink to 2 x 2 and programs take two images each, so that the statistics
    are merged across tiles and images at these small grids, as they are on a GPU."""
    name = request.param
    if name == "triton":
        kernels = pytest.importorskip("cvt_fast.kernels.conv_proj")
        monkeypatch.setattr(kernels, "_TILE_INTERPRET", (2, 2))
        monkeypatch.setattr(kernels, "_BWD_TARGET_PROGRAMS", 2)
    if name != "composed":
        return name

    def load(op):
        plain = backends.Implementation(reference.conv_proj_reference, reference.conv_proj_backward_reference)
        return backends.Implementation(*compose(plain.forward, plain.backward))

    record = dataclasses.replace(backends.TABLE["cuda"], probe=lambda op, device: None, load=load,
                                 dtypes=backends.FLOAT_DTYPES, kernel_rule=None)
    monkeypatch.setitem(backends.TABLE, "cuda", record)
    return "cuda"


def projections(channels, momentum=0.1, kernel=3, stride_q=1, stride_kv=2, padding=1, **bn_options):
    """Three dw_bn projections as the model builds them, with non-trivial BatchNorm parameters."""
    convs = tuple(Attention._projection(channels, kernel, padding, stride, "dw_bn")
                  for stride in (stride_q, stride_kv, stride_kv))
    for c in convs:
        c.bn = nn.BatchNorm2d(channels, momentum=momentum, **bn_options)
        if c.bn.affine:
            c.bn.weight.data.uniform_(0.5, 1.5)
            c.bn.bias.data.uniform_(-0.5, 0.5)
    return convs


def official_projection(convs, x, height, width, has_cls):
    """The official code's projection: NCHW grid, Conv2d + BatchNorm2d, tokens, cls row in front."""
    cls = x[:, :1] if has_cls else None
    grid = x[:, int(has_cls):].transpose(1, 2).reshape(x.shape[0], x.shape[2], height, width)
    outs = []
    for proj in convs:
        t = proj(grid).flatten(2).transpose(1, 2)
        outs.append(torch.cat((cls, t), dim=1) if has_cls else t)
    return outs


def leaves(convs):
    return [p for c in convs for p in (c.conv.weight, c.bn.weight, c.bn.bias) if p is not None]


def run_steps(convs, fused, steps, batch, height, width, has_cls, geometry, backend, dtype=torch.float64):
    """`steps` training steps of both, on fresh inputs; returns the last step's outputs and gradients."""
    for _ in range(steps):
        x = torch.randn(batch, int(has_cls) + height * width, convs[0].conv.weight.shape[0], dtype=dtype) * 2 + 0.5
        x_official = x.clone().requires_grad_()
        x_fused = x.clone().requires_grad_()
        expected = official_projection(convs, x_official, height, width, has_cls)
        actual = _conv_proj_batch_norm(x_fused, fused, height, width, has_cls, *geometry, backend)
        grads = [torch.randn_like(t) for t in expected]
        expected_grads = torch.autograd.grad(expected, [x_official, *leaves(convs)], grads)
        actual_grads = torch.autograd.grad(actual, [x_fused, *leaves(fused)], grads)
    return expected, actual, expected_grads, actual_grads


# (height, width, channels, has_cls, stride_q, stride_kv, padding_q=padding_kv, steps): the fused
# kernels' strides with a cls row and a partial channel block, running statistics after 3 steps; no
# cls and the generic kernels' strides, after 1 step (the interpreter is slow on those kernels).
CASES = [pytest.param((5, 4, 3, True, 1, 2, 1, 3), id="5x4cls-s1s2-3steps"),
         pytest.param((5, 7, 5, False, 2, 1, 1, 1), id="5x7-s2s1-1step")]


@pytest.mark.parametrize("backend_name", BACKENDS, indirect=True)
@pytest.mark.parametrize("case", CASES)
def test_conv_proj_bn_equals_conv2d_batchnorm2d_in_float64(backend_name, case):
    height, width, channels, has_cls, stride_q, stride_kv, padding, steps = case
    convs = [c.double() for c in projections(channels, stride_q=stride_q, stride_kv=stride_kv, padding=padding)]
    fused = copy.deepcopy(convs)
    geometry = (stride_q, stride_kv, padding, padding)
    expected, actual, expected_grads, actual_grads = run_steps(convs, fused, steps, 2, height, width, has_cls, geometry,
                                                               backend_name)
    for a, e in zip(actual, expected):
        assert a.is_contiguous()
        assert_close(a, e)
    names = ["x"] + [f"{branch}.{p}" for branch in "qkv" for p in ("conv.weight", "bn.weight", "bn.bias")]
    for name, a, e in zip(names, actual_grads, expected_grads):
        try:
            assert_close(a, e)
        except AssertionError as error:
            raise AssertionError(f"grad of {name}: {error}") from None
    for c_official, c_fused in zip(convs, fused):
        for name in ("running_mean", "running_var"):
            assert_close(getattr(c_fused.bn, name), getattr(c_official.bn, name))
        assert int(c_fused.bn.num_batches_tracked) == int(c_official.bn.num_batches_tracked) == steps


@pytest.mark.parametrize("backend_name", BACKENDS, indirect=True)
def test_conv_proj_bn_gradcheck_float64(backend_name):
    height, width, channels = 4, 3, 2
    x = torch.randn(2, 1 + height * width, channels, dtype=torch.float64)
    weights = [torch.randn(channels, 1, 3, 3, dtype=torch.float64) for _ in range(3)]
    gammas = [torch.empty(channels, dtype=torch.float64).uniform_(0.5, 1.5) for _ in range(3)]
    betas = [torch.randn(channels, dtype=torch.float64) for _ in range(3)]

    inputs = (x, *weights, *gammas, *betas)
    sizes = [t.numel() for t in inputs]

    def fn(flat):
        # One input vector and one output vector: fast mode then runs the op a few times, not a few times
        # per input and output tensor (the interpreter is slow).
        unpacked = [part.view_as(t) for part, t in zip(flat.split(sizes), inputs)]
        outputs = ops.conv_proj_bn(*unpacked, height, width, True, eps=[1e-5, 1e-3, 0.1], backend=backend_name)[:3]
        return torch.cat([t.flatten() for t in outputs])

    flat = torch.cat([t.detach().flatten() for t in inputs]).requires_grad_()
    # Fast mode: one random projection of the Jacobian (the float64 comparison above is element-wise).
    assert torch.autograd.gradcheck(fn, (flat,), fast_mode=True)


@pytest.mark.parametrize("backend", ["reference", TRITON])
def test_conv_proj_bn_ops_pass_opcheck(backend):
    x = torch.randn(2, 1 + 3 * 4, 2, requires_grad=True)
    weights = [torch.randn(2, 1, 3, 3, requires_grad=True) for _ in range(3)]
    gammas = [torch.rand(2, requires_grad=True) for _ in range(3)]
    betas = [torch.randn(2, requires_grad=True) for _ in range(3)]
    args = (x, *weights, *gammas, *betas, 3, 4, True, 1, 2, 1, 1, [1e-5] * 3, backend)
    results = torch.library.opcheck(torch.ops.cvt_fast.conv_proj_bn.default, args)
    assert all(v == "SUCCESS" for v in results.values()), results
    q, k, v, mean, var = torch.ops.cvt_fast.conv_proj_bn(*args)
    grads = [torch.randn_like(t) for t in (q, k, v)]
    detached = [t.detach() for t in (x, *weights, *gammas, *betas, q, k, v, mean, var)]
    results = torch.library.opcheck(torch.ops.cvt_fast.conv_proj_bn_backward.default,
                                    (*grads, *detached, 3, 4, True, 1, 2, 1, 1, [1e-5] * 3, backend))
    assert all(v == "SUCCESS" for v in results.values()), results


@pytest.mark.parametrize("backend_name", BACKENDS, indirect=True)
def test_batch_statistics_keep_float32_accuracy_when_the_mean_dwarfs_the_spread(backend_name):
    """|mean| / std ~ 1e3: sums of y and y^2 in float32 would lose the variance (y^2 ~ 1e7, its
    rounding ~1 against a variance ~10); the kernels merge per-tile centred moments instead. A ramp
    across the grid makes the tiles' means differ, so the merge's between-tile term matters too."""
    height, width, channels = 7, 6, 5
    ramp = torch.linspace(0.0, 4.0, height * width, dtype=torch.float64)[None, :, None]
    x64 = torch.randn(3, 1 + height * width, channels, dtype=torch.float64) + 1000.0
    x64[:, 1:] += ramp
    weights64 = [torch.rand(channels, 1, 3, 3, dtype=torch.float64) for _ in range(3)]
    gammas64 = [torch.rand(channels, dtype=torch.float64) + 0.5 for _ in range(3)]
    betas64 = [torch.randn(channels, dtype=torch.float64) for _ in range(3)]
    inputs64 = (x64, *weights64, *gammas64, *betas64)
    expected = ops.conv_proj_bn(*inputs64, height, width, True, backend="reference")
    actual = ops.conv_proj_bn(*(t.float() for t in inputs64), height, width, True, backend=backend_name)
    for name, a, e in zip(("q", "k", "v", "mean", "var"), actual, expected):
        try:
            assert_close(a, e, torch.float32)
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from None


@pytest.mark.parametrize("backend_name", BACKENDS, indirect=True)
def test_cls_row_passes_through_and_its_gradient_is_the_sum_of_the_three(backend_name):
    x = torch.randn(2, 1 + 5 * 4, 3, requires_grad=True)
    weights = [torch.randn(3, 1, 3, 3) for _ in range(3)]
    gammas, betas = [torch.rand(3) + 0.5 for _ in range(3)], [torch.randn(3) for _ in range(3)]
    q, k, v, _, _ = ops.conv_proj_bn(x, *weights, *gammas, *betas, 5, 4, True, backend=backend_name)
    for out in (q, k, v):
        assert torch.equal(out[:, 0], x[:, 0])
    grads = [torch.randn_like(t) for t in (q, k, v)]
    (grad_x,) = torch.autograd.grad((q, k, v), x, grads)
    assert_close(grad_x[:, 0], grads[0][:, 0] + grads[1][:, 0] + grads[2][:, 0])


@pytest.mark.parametrize("backend", ["reference", TRITON])
def test_conv_proj_bn_in_bfloat16_matches_the_reference(backend):
    x = torch.randn(2, 1 + 7 * 7, 24).bfloat16()
    weights = [torch.randn(24, 1, 3, 3).bfloat16() for _ in range(3)]
    gammas, betas = [torch.rand(24) + 0.5 for _ in range(3)], [torch.randn(24) for _ in range(3)]
    actual = ops.conv_proj_bn(x, *weights, *gammas, *betas, 7, 7, True, backend=backend)
    expected = reference.conv_proj_bn_reference(x, *weights, *gammas, *betas, 7, 7, True, 1, 2, 1, 1, [1e-5] * 3)
    for a, e in zip(actual, expected):
        assert a.dtype == e.dtype
        assert_close(a, e, torch.bfloat16)
    grads = [torch.randn_like(t) for t in actual[:3]]
    got = torch.ops.cvt_fast.conv_proj_bn_backward(*grads, x, *weights, *gammas, *betas, *actual, 7, 7, True, 1, 2,
                                                   1, 1, [1e-5] * 3, backend)
    wanted = reference.conv_proj_bn_backward_reference(*grads, x, *weights, *gammas, *betas, *expected, 7, 7, True,
                                                       1, 2, 1, 1, [1e-5] * 3)
    for a, e in zip(got, wanted):
        assert a.dtype == e.dtype
        assert_close(a, e, torch.bfloat16)


# --------------------------------------------------------------------------- the model's BatchNorm semantics

def _paired_models(**bn_changes):
    official = build_model(tiny_spec(DEPTH=[1, 1, 1]), num_classes=4, backend="official")
    for m in official.modules():
        if isinstance(m, nn.BatchNorm2d):
            for key, value in bn_changes.items():
                setattr(m, key, value)
            if not m.track_running_stats:
                m.running_mean = m.running_var = m.num_batches_tracked = None
    return official, copy.deepcopy(official).set_backend("reference")


@pytest.mark.parametrize("changes", [{"momentum": None}, {"track_running_stats": False}],
                         ids=["momentum_none", "no_running_stats"])
def test_model_batch_norm_semantics_match_the_official_path(changes):
    official, fused = _paired_models(**changes)
    for mode in ("train", "train", "eval"):
        x = torch.randn(2, 3, 32, 40)
        for model in (official, fused):
            getattr(model, mode)()
        assert_close(fused(x), official(x))
    buffers = dict(fused.named_buffers())
    assert buffers.keys() == dict(official.named_buffers()).keys()
    for name, b in official.named_buffers():
        if b.is_floating_point():
            assert_close(buffers[name], b)
        else:
            assert torch.equal(buffers[name], b), name


def test_model_under_bfloat16_autocast_matches_the_official_path():
    official, fused = _paired_models()
    x = torch.randn(2, 3, 32, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_official, out_fused = official(x), fused(x)
    assert_close(out_fused.float(), out_official.float(), torch.bfloat16, factor=3)
    out_official.float().square().sum().backward()
    out_fused.float().square().sum().backward()
    names = [n for n, p in official.named_parameters() if p.grad is not None]
    flat = lambda model: torch.cat([dict(model.named_parameters())[n].grad.flatten() for n in names])  # noqa: E731
    assert_close(flat(fused), flat(official), torch.bfloat16, factor=3)


def test_mixed_batch_norm_modes_in_one_projection_follow_each_module():
    """A frozen (eval) k BatchNorm beside training q and v ones: each keeps its own mode, as in the
    official model; the projection then runs the modules themselves."""
    official, fused = _paired_models()
    for model in (official, fused):
        model.train()
        model.stage0.blocks[0].attn.conv_proj_k.bn.eval()
    x = torch.randn(2, 3, 32, 40)
    assert_close(fused(x), official(x))
    k_bn = fused.stage0.blocks[0].attn.conv_proj_k.bn
    assert int(k_bn.num_batches_tracked) == 0
    assert int(fused.stage0.blocks[0].attn.conv_proj_q.bn.num_batches_tracked) == 1


def test_compiled_projection_with_cumulative_momentum_updates_like_eager():
    """momentum=None divides by the batch counter: a tensor op, so one graph and no host sync."""
    convs = projections(4, momentum=None)
    compiled_convs = copy.deepcopy(convs)
    torch._dynamo.reset()
    compiled = torch.compile(_conv_proj_batch_norm, backend="aot_eager", fullgraph=True)
    for _ in range(2):
        x = torch.randn(2, 1 + 5 * 4, 4)
        expected = _conv_proj_batch_norm(x, convs, 5, 4, True, 1, 2, 1, 1, "reference")
        actual = compiled(x, compiled_convs, 5, 4, True, 1, 2, 1, 1, "reference")
        for a, e in zip(actual, expected):
            assert_close(a, e)
    for c, c_compiled in zip(convs, compiled_convs):
        assert_close(c_compiled.bn.running_var, c.bn.running_var)
        assert int(c_compiled.bn.num_batches_tracked) == 2
    torch._dynamo.reset()


# --------------------------------------------------------------------------- input checks

def _bn_call(**changes):
    x = torch.randn(2, 21, 3)
    args = dict(x=x, weight_q=torch.randn(3, 1, 3, 3), weight_k=torch.randn(3, 1, 3, 3),
                weight_v=torch.randn(3, 1, 3, 3), bn_weight_q=torch.ones(3), bn_weight_k=torch.ones(3),
                bn_weight_v=torch.ones(3), bn_bias_q=torch.zeros(3), bn_bias_k=torch.zeros(3),
                bn_bias_v=torch.zeros(3), height=5, width=4, has_cls=True)
    args.update(changes)
    return args


@pytest.mark.parametrize("changes, error, message", [
    (dict(bn_weight_k=torch.ones(4)), ValueError, r"bn_weight_k must have shape \(3,\)"),
    (dict(bn_bias_v=torch.zeros(3, dtype=torch.float64)), ValueError, "BatchNorm weight and bias dtypes"),
    (dict(bn_bias_q=torch.zeros(3, device="meta")), ValueError, "devices"),
    (dict(x=torch.randn(1, 2, 3), height=1, width=1), ValueError, "more than 1 value per channel"),
    (dict(eps=-1.0), ValueError, "eps of q must be finite and >= 0"),
    (dict(eps=[1e-5, 1e-5]), TypeError, "three floats"),
    (dict(bn_weight_q=[1.0, 1.0, 1.0]), TypeError, "bn_weight_q must be a torch.Tensor"),
    (dict(height=4), ValueError, "need 17"),
])
def test_conv_proj_bn_rejects_bad_inputs(changes, error, message):
    with pytest.raises(error, match=message):
        ops.conv_proj_bn(**_bn_call(**changes), backend="reference")


def test_conv_proj_bn_backward_op_checks_the_saved_statistics():
    args = _bn_call()
    tensors = [args[k] for k in ("x", "weight_q", "weight_k", "weight_v", "bn_weight_q", "bn_weight_k", "bn_weight_v",
                                 "bn_bias_q", "bn_bias_k", "bn_bias_v")]
    q, k, v, mean, var = ops.conv_proj_bn(**args, backend="reference")
    tail = (5, 4, True, 1, 2, 1, 1, [1e-5] * 3, "reference")
    with pytest.raises(ValueError, match=r"var must be the forward's \(3, 3\) torch.float32 statistics"):
        torch.ops.cvt_fast.conv_proj_bn_backward(q, k, v, *tensors, q, k, v, mean, var.double(), *tail)
    with pytest.raises(ValueError, match="grad_k has shape"):
        torch.ops.cvt_fast.conv_proj_bn_backward(q, q, v, *tensors, q, k, v, mean, var, *tail)
