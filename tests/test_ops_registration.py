"""The custom ops as PyTorch sees them: opcheck (schema, fake tensors, autograd registration,
AOT dispatch), float64 gradcheck through the public entry points, None gradients, autocast,
and the input checks, which the registered ops make themselves (a direct torch.ops.cvt_fast.*
call and a fake-tensor trace raise what cvt_fast.ops.* raises). Parametrised over the op
backends that run here."""
import importlib.util

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import cvt_fast.ops as ops
from cvt_fast.ops import reference
from cvt_fast.ops.backend import BackendUnavailableError
from tolerances import assert_close


def _triton_kernels_present(op):
    try:
        return importlib.util.find_spec("triton") is not None and \
            importlib.util.find_spec(f"cvt_fast.kernels.{op}") is not None
    except ImportError:
        return False


def backends(op):
    """'reference' always; 'triton' (through the interpreter on the CPU) once its kernels exist."""
    triton = pytest.param("triton", marks=pytest.mark.skipif(
        not _triton_kernels_present(op), reason=f"triton or cvt_fast.kernels.{op} is not installed"))
    return ["reference", triton]


def qkv(batch=1, n_q=5, n_kv=3, heads=2, head_dim=32, dtype=torch.float32, requires_grad=False):
    """Strided (B, N, H, d) views of (B, N, H*d) tensors, as the model's Linear outputs are."""
    return tuple(torch.randn(batch, n, heads * head_dim, dtype=dtype).view(batch, n, heads, head_dim)
                 .requires_grad_(requires_grad) for n in (n_q, n_kv, n_kv))


def conv_inputs(has_cls=True, height=5, width=4, channels=3, kernel=3, dtype=torch.float32, requires_grad=False,
                batch=2):
    x = torch.randn(batch, int(has_cls) + height * width, channels, dtype=dtype, requires_grad=requires_grad)
    weights = [torch.randn(channels, 1, kernel, kernel, dtype=dtype, requires_grad=requires_grad)
               for _ in range(3)]
    biases = [torch.randn(channels, dtype=dtype, requires_grad=requires_grad) for _ in range(3)]
    return x, weights, biases


GEOMETRY = dict(stride_q=1, stride_kv=2, padding_q=1, padding_kv=1)


def assert_opcheck_passes(op, args):
    results = torch.library.opcheck(op, args)
    assert all(v == "SUCCESS" for v in results.values()), results


# --------------------------------------------------------------------------- opcheck

@pytest.mark.parametrize("backend", backends("attention"))
def test_attention_ops_pass_opcheck(backend):
    q, k, v = qkv(requires_grad=True)
    assert_opcheck_passes(torch.ops.cvt_fast.attention.default, (q, k, v, 0.25, backend))
    out, lse = torch.ops.cvt_fast.attention(q, k, v, 0.25, backend)
    grad_out = torch.randn_like(out)
    detached = [t.detach() for t in (q, k, v, out, lse)]
    assert_opcheck_passes(torch.ops.cvt_fast.attention_backward.default, (grad_out, *detached, 0.25, backend))


# Under the interpreter one opcheck of the projection takes ~10 s: triton gets the cls case only.
@pytest.mark.parametrize("backend,has_cls", [("reference", False), ("reference", True),
                                             *[pytest.param(*p.values, True, marks=p.marks)
                                               for p in backends("conv_proj")[1:]]])
def test_conv_proj_ops_pass_opcheck(backend, has_cls):
    x, weights, biases = conv_inputs(has_cls=has_cls, height=3, width=4, channels=2, batch=1, requires_grad=True)
    geometry = (3, 4, has_cls, 1, 2, 1, 1)
    # One bias missing: the optional arguments are exercised both ways.
    args = (x, *weights, biases[0], None, biases[2], *geometry, backend)
    assert_opcheck_passes(torch.ops.cvt_fast.conv_proj.default, args)
    outputs = torch.ops.cvt_fast.conv_proj(*args)
    grads = [torch.randn_like(o) for o in outputs]
    assert_opcheck_passes(torch.ops.cvt_fast.conv_proj_backward.default,
                          (*grads, x.detach(), *(w.detach() for w in weights), *geometry, backend))


# --------------------------------------------------------------------------- gradcheck through the entry points

def _float64_attention_backends():
    """backends('attention'), with triton skipped where its interpreter has no float64 dot."""
    problem = None
    if _triton_kernels_present("attention") and not torch.cuda.is_available():
        from cvt_fast.kernels.interpreter import float64_dot_problem
        problem = float64_dot_problem()
    return [p if p == "reference" or not problem else
            pytest.param(*p.values, marks=[*p.marks, pytest.mark.skip(reason=problem)])
            for p in backends("attention")]


@pytest.mark.parametrize("backend", _float64_attention_backends())
def test_attention_gradcheck_float64(backend):
    q, k, v = qkv(n_q=4, n_kv=3, heads=2, head_dim=16, dtype=torch.float64, requires_grad=True)
    # The interpreter is slow: fast mode checks one random projection of the Jacobian.
    assert torch.autograd.gradcheck(lambda a, b, c: ops.attention(a, b, c, 0.3, backend=backend), (q, k, v),
                                    fast_mode=backend != "reference")


@pytest.mark.parametrize("backend", backends("conv_proj"))
def test_conv_proj_gradcheck_float64_with_biases(backend):
    x, weights, biases = conv_inputs(has_cls=True, height=4, width=3, channels=2, dtype=torch.float64,
                                     requires_grad=True, batch=1)

    def fn(x, wq, wk, wv, bq, bv):
        return ops.conv_proj(x, wq, wk, wv, 4, 3, True, bias_q=bq, bias_v=bv, backend=backend, **GEOMETRY)

    # ~80 inputs: fast mode (one random projection of the Jacobian) keeps this to a few calls.
    assert torch.autograd.gradcheck(fn, (x, *weights, biases[0], biases[2]), fast_mode=True)


# --------------------------------------------------------------------------- autograd details

@pytest.mark.parametrize("backend", backends("conv_proj"))
def test_conv_proj_backward_with_unused_outputs_gives_zero_grads(backend):
    x, weights, biases = conv_inputs(has_cls=True)
    x.requires_grad_()
    for t in (*weights, *biases):
        t.requires_grad_()
    q, _, _ = ops.conv_proj(x, *weights, 5, 4, True, bias_q=biases[0], bias_k=biases[1], backend=backend,
                            **GEOMETRY)
    grad_q = torch.randn_like(q)
    q.backward(grad_q)
    assert torch.count_nonzero(weights[1].grad) == 0 and torch.count_nonzero(weights[2].grad) == 0
    assert torch.count_nonzero(biases[1].grad) == 0
    assert biases[2].grad is None  # not an input of the op at all
    # The bias gradient is the sum of the convolved (non-cls) rows; the cls row reaches x[:, 0] alone.
    assert_close(biases[0].grad, grad_q[:, 1:].sum(dim=(0, 1)))
    assert torch.equal(x.grad[:, 0], grad_q[:, 0])


@pytest.mark.parametrize("backend", backends("attention"))
def test_attention_accepts_expanded_grad_and_marks_lse_non_differentiable(backend):
    q, k, v = qkv(requires_grad=True)
    out, lse = torch.ops.cvt_fast.attention(q, k, v, 0.25, backend)
    assert out.requires_grad and not lse.requires_grad
    out.sum().backward()  # the incoming gradient is a stride-0 expand of a scalar
    expected = reference.attention_backward_reference(torch.ones_like(out), q, k, v, out, lse, 0.25)
    for actual, wanted in zip((q.grad, k.grad, v.grad), expected):
        assert_close(actual, wanted, factor=10.0)


# --------------------------------------------------------------------------- dtypes

def test_conv_proj_casts_weights_to_the_activation_dtype():
    x, weights, biases = conv_inputs()
    x = x.to(torch.bfloat16)
    for t in (*weights, biases[0]):
        t.requires_grad_()
    q, k, v = ops.conv_proj(x, *weights, 5, 4, True, bias_q=biases[0], backend="reference")
    assert q.dtype == k.dtype == v.dtype == torch.bfloat16
    (q.float().sum() + k.float().sum()).backward()
    assert weights[0].grad.dtype == torch.float32 and biases[0].grad.dtype == torch.float32


def test_autocast_runs_the_ops_in_the_autocast_dtype_with_float32_math():
    q, k, v = qkv(head_dim=16)
    x, weights, _ = conv_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.attention(q, k, v, 0.25, backend="reference")
        projected = ops.conv_proj(x, *weights, 5, 4, True, backend="reference")
    assert out.dtype == torch.bfloat16 and all(t.dtype == torch.bfloat16 for t in projected)
    # Same as the reference on bf16-rounded inputs, which computes in float32.
    expected, _ = reference.attention_reference(*(t.to(torch.bfloat16) for t in (q, k, v)), 0.25)
    assert torch.equal(out, expected)
    expected_q = reference.conv_proj_reference(x.bfloat16(), *(w.bfloat16() for w in weights), None, None, None,
                                               5, 4, True, 1, 2, 1, 1)[0]
    assert torch.equal(projected[0], expected_q)


# --------------------------------------------------------------------------- input checks of the entry points

# Each case: (change of valid inputs, error, words of the message). The *_PYTHON_TYPES cases
# concern the Python types of arguments, which the ops' schemas reject before any check of ours:
# only the entry points (plain Python functions) see them.
ATTENTION_BAD_INPUTS = [
    (lambda q, k, v: (q, k[:, :, :1], v[:, :, :1]), ValueError, "numbers of heads"),
    (lambda q, k, v: (q, k[..., :16], v[..., :16]), ValueError, "head sizes"),
    (lambda q, k, v: (q, k[:1], v), ValueError, "batch sizes"),
    (lambda q, k, v: (q, k, v[:, :2]), ValueError, "key and value lengths"),
    (lambda q, k, v: (q, k.double(), v), ValueError, "dtypes"),
    (lambda q, k, v: (q, k.to("meta"), v), ValueError, "devices"),
    (lambda q, k, v: (q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3)), ValueError, "contiguous last"),
    (lambda q, k, v: (q.int(), k.int(), v.int()), TypeError, "dtype torch.int32"),
    (lambda q, k, v: (q[0], k, v), ValueError, "4-D"),
    (lambda q, k, v: (q, k[:, :0], v[:, :0]), ValueError, "at least one"),
]
ATTENTION_BAD_PYTHON_TYPES = [(lambda q, k, v: (q.tolist(), k, v), TypeError, "torch.Tensor")]


@pytest.mark.parametrize("change,error,message", ATTENTION_BAD_INPUTS + ATTENTION_BAD_PYTHON_TYPES)
def test_attention_rejects_bad_inputs(change, error, message):
    q, k, v = change(*qkv(batch=2, head_dim=32))
    with pytest.raises(error, match=message):
        ops.attention(q, k, v, 0.25, backend="reference")


def _call(op, args, trace: bool):
    """op(*args), or with the tensors as fake tensors (what torch.compile and opcheck trace with)."""
    if not trace:
        return op(*args)
    with FakeTensorMode() as mode:
        return op(*(mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in args))


@pytest.mark.parametrize("trace", [False, True], ids=["eager", "fake"])
@pytest.mark.parametrize("change,error,message", ATTENTION_BAD_INPUTS)
def test_attention_op_checks_its_inputs_when_called_directly_or_traced(change, error, message, trace):
    q, k, v = change(*qkv(batch=2, head_dim=32))
    with pytest.raises(error, match=message):
        _call(torch.ops.cvt_fast.attention, (q, k, v, 0.25, "reference"), trace)


def test_attention_rejects_non_float_or_non_finite_scale():
    with pytest.raises(TypeError, match="scale"):
        ops.attention(*qkv(), torch.tensor(0.25))
    with pytest.raises(ValueError, match="scale must be finite"):
        ops.attention(*qkv(), float("nan"))
    with pytest.raises(ValueError, match="scale must be finite"):
        torch.ops.cvt_fast.attention(*qkv(), float("inf"), "reference")


@pytest.mark.parametrize("trace", [False, True], ids=["eager", "fake"])
def test_attention_backward_op_checks_its_inputs(trace):
    q, k, v = qkv()
    out, lse = torch.ops.cvt_fast.attention(q, k, v, 0.25, "reference")
    every_other = torch.empty(*out.shape, 2)[..., 0].copy_(out)
    cases = [((out[:, :3], q, k, v, out, lse), ValueError, "grad_out has shape"),
             ((out, q, k, v, out.double(), lse), TypeError, "out has dtype"),
             ((out, q, k, v, out, lse.double()), TypeError, "lse has dtype"),
             ((out, q, k, v, out, lse[:, :1]), ValueError, "lse has shape"),
             ((out, q, k[..., :16], v, out, lse), ValueError, "head sizes")]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            _call(torch.ops.cvt_fast.attention_backward, (*args, 0.25, "reference"), trace)


def test_attention_backward_takes_the_layout_a_compiler_chose():
    """Autograd hands the backward its saved tensors, laid out as a compiler chose (inductor put a
    recomputed q's token dimension innermost): any strides give the dense inputs' gradients."""
    q, k, v = qkv()
    out, lse = torch.ops.cvt_fast.attention(q, k, v, 0.25, "reference")
    grad = torch.randn_like(out)
    expected = torch.ops.cvt_fast.attention_backward(grad, q, k, v, out, lse, 0.25, "reference")
    every_other = torch.empty(*out.shape, 2)[..., 0].copy_(out)
    tokens_innermost = q.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    assert every_other.stride(-1) == 2 and tokens_innermost.stride(1) == 1
    strided = torch.ops.cvt_fast.attention_backward(grad, tokens_innermost, k, v, every_other, lse, 0.25, "reference")
    for got, want in zip(strided, expected):
        assert torch.equal(got, want)


CONV_PROJ_BAD_INPUTS = [
    (dict(height=4), ValueError, "21 tokens but has_cls=True, height=4, width=4 need 17"),
    (dict(has_cls=False), ValueError, "need 20"),
    (dict(stride_kv=0), ValueError, "stride_kv must be >= 1"),
    (dict(padding_q=-1), ValueError, "padding_q must be >= 0"),
    (dict(weight_k=torch.randn(3, 3, 3)), ValueError, "weight_k must be 4-D"),
    (dict(weight_v=torch.randn(4, 1, 3, 3)), ValueError, r"weight_v must be a depthwise weight of shape \(3, 1, k, k\)"),
    (dict(weight_q=torch.randn(3, 1, 3, 2)), ValueError, "weight_q must be a depthwise"),
    (dict(weight_q=torch.randn(3, 1, 9, 9), padding_q=0), ValueError, "does not fit"),
    (dict(bias_k=torch.randn(4)), ValueError, r"bias_k must have shape \(3,\)"),
    (dict(bias_q=torch.randn(3, device="meta")), ValueError, "devices"),
    (dict(x=torch.randn(2, 21, 6)[..., ::2]), ValueError, "contiguous last"),
    (dict(x=torch.randint(0, 3, (2, 21, 3))), TypeError, "dtype torch.int64"),
]
CONV_PROJ_BAD_PYTHON_TYPES = [(dict(has_cls=1), TypeError, "has_cls must be a bool"),
                              (dict(height=5.0), TypeError, "height must be an int"),
                              (dict(bias_v=[1.0, 2.0, 3.0]), TypeError, "bias_v must be a torch.Tensor")]


def _conv_call(**changes):
    x, weights, _ = conv_inputs()
    args = dict(x=x, weight_q=weights[0], weight_k=weights[1], weight_v=weights[2], height=5, width=4, has_cls=True)
    args.update(changes)
    return args


@pytest.mark.parametrize("kwargs,error,message", CONV_PROJ_BAD_INPUTS + CONV_PROJ_BAD_PYTHON_TYPES)
def test_conv_proj_rejects_bad_inputs(kwargs, error, message):
    with pytest.raises(error, match=message):
        ops.conv_proj(**_conv_call(**kwargs), backend="reference")


@pytest.mark.parametrize("trace", [False, True], ids=["eager", "fake"])
@pytest.mark.parametrize("kwargs,error,message", CONV_PROJ_BAD_INPUTS)
def test_conv_proj_op_checks_its_inputs_when_called_directly_or_traced(kwargs, error, message, trace):
    a = _conv_call(**kwargs)
    args = [a["x"], a["weight_q"], a["weight_k"], a["weight_v"], a.get("bias_q"), a.get("bias_k"), a.get("bias_v"),
            a["height"], a["width"], a["has_cls"], a.get("stride_q", 1), a.get("stride_kv", 2), a.get("padding_q", 1),
            a.get("padding_kv", 1), "reference"]
    with pytest.raises(error, match=message):
        _call(torch.ops.cvt_fast.conv_proj, args, trace)


def test_conv_proj_op_wants_weights_in_the_dtype_of_x():
    """The entry point casts; a direct call must cast itself, and is told so."""
    x, weights, _ = conv_inputs()
    with pytest.raises(TypeError, match="weight_k has dtype torch.float64 but x has torch.float32"):
        torch.ops.cvt_fast.conv_proj(x, weights[0], weights[1].double(), weights[2], None, None, None, 5, 4, True,
                                     1, 2, 1, 1, "reference")


@pytest.mark.parametrize("trace", [False, True], ids=["eager", "fake"])
def test_conv_proj_backward_op_checks_its_inputs(trace):
    x, weights, _ = conv_inputs()
    q, k, v = torch.ops.cvt_fast.conv_proj(x, *weights, None, None, None, 5, 4, True, 1, 2, 1, 1, "reference")
    cases = [((q, q, v), ValueError, "grad_k has shape"), ((q.double(), k, v), TypeError, "grad_q has dtype"),
             ((q, k, v[:1]), ValueError, "grad_v has shape")]
    for grads, error, message in cases:
        with pytest.raises(error, match=message):
            _call(torch.ops.cvt_fast.conv_proj_backward, (*grads, x, *weights, 5, 4, True, 1, 2, 1, 1, "reference"),
                  trace)


def test_unavailable_backend_raises_through_the_entry_points():
    x, weights, _ = conv_inputs()
    with pytest.raises(BackendUnavailableError, match="'cuda'"):
        ops.conv_proj(x, *weights, 5, 4, True, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="attention only"):
        ops.conv_proj(x, *weights, 5, 4, True, backend="sdpa")
    with pytest.raises(ValueError, match="unknown backend"):
        ops.attention(*qkv(), 0.25, backend="flash")


# --------------------------------------------------------------------------- on a GPU (skipped without one)

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_backends_pass_opcheck_and_match_reference(backend, dtype):
    reason = ops.available_backends("attention", "cuda", dtype=dtype, head_dim=64)[backend]
    if reason is not None:
        pytest.skip(reason)
    q, k, v = (t.cuda().requires_grad_() for t in qkv(batch=2, n_q=37, n_kv=10, heads=2, head_dim=64, dtype=dtype))
    assert_opcheck_passes(torch.ops.cvt_fast.attention.default, (q, k, v, 0.125, backend))
    x, weights, biases = conv_inputs(height=7, width=5, channels=40, dtype=dtype)
    x, weights, biases = x.cuda().requires_grad_(), [w.cuda() for w in weights], [b.cuda() for b in biases]
    assert_opcheck_passes(torch.ops.cvt_fast.conv_proj.default,
                          (x, *weights, biases[0], None, biases[2], 7, 5, True, 1, 2, 1, 1, backend))

    def outputs_and_grads(name):
        out = ops.attention(q, k, v, 0.125, backend=name)
        projected = ops.conv_proj(x, *weights, 7, 5, True, bias_q=biases[0], backend=name)
        leaves = (q, k, v, x)
        loss = out.float().square().sum() + sum(t.float().square().sum() for t in projected)
        return (out, *projected, *torch.autograd.grad(loss, leaves))

    for actual, expected in zip(outputs_and_grads(backend), outputs_and_grads("reference")):
        assert_close(actual, expected, dtype, factor=2.0)


@pytest.mark.gpu
def test_auto_on_gpu_takes_what_explain_backend_says():
    q = qkv(head_dim=64, dtype=torch.float16)[0].cuda()
    x = torch.randn(2, 5, 8, device="cuda")
    for op, tensors in (("attention", (q,)), ("conv_proj", (x,))):
        choice = ops.explain_backend(op, *tensors)
        assert ops.resolve_backend(op, "auto", *tensors) == choice.backend, choice
        if "no tuning entry" in choice.reason:  # no measurement for this GPU: Triton
            assert choice.backend == "triton", choice
