"""torch.compile(fullgraph=True) through the custom ops: one graph, no break, eager numbers.

Compiles are slow on a shared CPU (inductor: ~15-30 s for a small function or this tiny model),
so there are four: a small function using both ops (inductor), the same with the Triton
backend (aot_eager: the interpreter's kernel bodies are opaque to the compiler anyway), and a
tiny CvT in training mode under aot_eager and under inductor. What they check: dynamo traces
without a break, the fake kernels give the right metadata, AOT autograd reproduces eager
gradients, and BatchNorm's running statistics are updated as in eager.
"""
import copy
import importlib.util

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import cvt_fast.ops as ops
from tiny_spec import tiny_spec
from tolerances import assert_close


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def project_and_attend(x, wq, wk, wv, bias_q, w_qkv, heads, backend):
    """conv_proj on a 5x4 grid with a cls row, a linear map to heads, attention: a CvT block's core."""
    q, k, v = ops.conv_proj(x, wq, wk, wv, 5, 4, True, bias_q=bias_q, backend=backend)
    batch = x.shape[0]
    q, k, v = ((t @ w_qkv).view(batch, t.shape[1], heads, -1) for t in (q, k, v))
    return ops.attention(q, k, v, 0.2, backend=backend)


def make_inputs(channels, head_total):
    leaves = [torch.randn(2, 21, channels), *(torch.randn(channels, 1, 3, 3) for _ in range(3)),
              torch.randn(channels), torch.randn(channels, head_total) / channels ** 0.5]
    return [t.requires_grad_() for t in leaves]


def run_and_grad(fn, leaves, *extra):
    out = fn(*leaves, *extra)
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out) + torch.arange(out.numel()).view_as(out) * 1e-3)
    return out, grads


def check_compiled_matches_eager(compile_backend, heads, head_dim, op_backend):
    leaves = make_inputs(channels=6, head_total=heads * head_dim)
    counter = CompileCounterWithBackend(compile_backend)
    compiled = torch.compile(project_and_attend, backend=counter, fullgraph=True)
    out, grads = run_and_grad(compiled, leaves, heads, op_backend)
    expected_out, expected_grads = run_and_grad(project_and_attend, leaves, heads, op_backend)
    assert counter.frame_count == 1  # one graph: fullgraph would have raised on a break
    assert_close(out, expected_out, factor=10.0)
    for got, wanted in zip(grads, expected_grads):
        assert_close(got, wanted, factor=10.0)


def test_compiled_ops_match_eager_in_one_graph_reference():
    leaves = make_inputs(channels=6, head_total=2 * 8)
    explanation = torch._dynamo.explain(project_and_attend)(*leaves, 2, "reference")
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0
    code = explanation.graphs[0].code
    assert "cvt_fast.conv_proj" in code and "cvt_fast.attention" in code  # the ops are nodes, not inlined
    torch._dynamo.reset()
    check_compiled_matches_eager("inductor", heads=2, head_dim=8, op_backend="reference")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None
                    or importlib.util.find_spec("cvt_fast.kernels.attention") is None
                    or importlib.util.find_spec("cvt_fast.kernels.conv_proj") is None,
                    reason="triton or the cvt_fast.kernels modules are not installed")
def test_compiled_ops_match_eager_in_one_graph_triton():
    check_compiled_matches_eager("aot_eager", heads=1, head_dim=32, op_backend="triton")


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_tiny_cvt_trains_like_eager(compiler):
    model_module = pytest.importorskip("cvt_fast.model")
    spec = tiny_spec(DEPTH=[1, 1, 1], MLP_RATIO=[2.0, 2.0, 2.0])
    eager = model_module.build_model(spec, num_classes=5, backend="reference").train()
    compiled_model = copy.deepcopy(eager)
    images = torch.randn(2, 3, 32, 32)

    # aot_eager exercises dynamo, the fake kernels, AOT autograd and the functionalised
    # BatchNorm buffer updates; inductor adds its code generation around the ops (about 30 s
    # for this model's forward and backward on this project's 2-core CI machine).
    counter = CompileCounterWithBackend(compiler)
    compiled = torch.compile(compiled_model, backend=counter, fullgraph=True)
    logits = compiled(images)
    expected = eager(images)
    assert counter.frame_count == 1
    assert_close(logits, expected, factor=10.0)
    logits.square().sum().backward()
    expected.square().sum().backward()
    grads, expected_grads = [], []
    for (name, p), (_, p_eager) in zip(compiled_model.named_parameters(), eager.named_parameters()):
        assert p.grad is not None, name
        grads.append(p.grad.flatten())
        expected_grads.append(p_eager.grad.flatten())
    # Compared as one vector: some gradients are zero up to rounding (proj_k's bias shifts every
    # score of a row equally, which the softmax ignores), so per-tensor relative errors are noise.
    assert_close(torch.cat(grads), torch.cat(expected_grads), factor=10.0)
    # BatchNorm's running statistics are updated by the compiled graph as in eager.
    for (name, b), (_, b_eager) in zip(compiled_model.named_buffers(), eager.named_buffers()):
        if b.is_floating_point():
            assert_close(b, b_eager, factor=10.0)
        else:
            assert torch.equal(b, b_eager), name
