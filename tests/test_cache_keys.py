"""Issue 26: every input to a cached computation is in its cache key, each tested alone.

Two caches serve eval: the inference path's CUDA graphs (cvt_fast/inference.py, one per
`graph_key`) and the BatchNorm fold (cvt_fast/batch_norm_fold.py, one per attention module).
A key that misses an input replays a stale result when only that input changes; each test
here changes exactly one input and checks that the key (or the logits) follows.
"""
from __future__ import annotations

import copy

import pytest
import torch

import cvt_fast.ops as ops
from cvt_fast.inference import graph_key
from tiny_models import randomize_batch_norms, tiny_cvt
from tolerances import assert_close

# --------------------------------------------------------------------------- CUDA-graph key


@pytest.fixture
def default_backend():
    before = ops.get_backend()
    ops.set_backend(None)
    yield
    ops.set_backend(None if before == "auto" else before)


def _key(x, autocast_dtype=None, backend=None):
    if backend is not None:
        ops.set_backend(backend)
    try:
        if autocast_dtype is None:
            return graph_key(x)
        with torch.autocast("cpu", dtype=autocast_dtype):
            return graph_key(x)
    finally:
        ops.set_backend(None)


def test_the_graph_key_is_the_same_for_equal_calls_whatever_the_values_and_strides(default_backend):
    x = torch.randn(2, 3, 8, 8)
    assert _key(x) == _key(torch.randn(2, 3, 8, 8))
    assert _key(x) == _key(x.contiguous(memory_format=torch.channels_last))  # the graph reads a contiguous copy
    assert _key(x, torch.bfloat16) == _key(x.clone(), torch.bfloat16)


# The device is in the key too, but a CPU has one device only (and autocast knows no 'meta'):
# InferenceModel refuses an input on another device than the model's before the key is asked.
@pytest.mark.parametrize("change", ["batch", "height", "width", "channels", "dtype",
                                    "autocast_on", "autocast_dtype", "backend"])
def test_the_graph_key_changes_when_one_input_of_the_forward_changes(change, default_backend):
    x = torch.randn(2, 3, 8, 8)
    base = _key(x, torch.bfloat16) if change == "autocast_dtype" else _key(x)
    changed = {
        "batch": lambda: _key(torch.randn(3, 3, 8, 8)),
        "height": lambda: _key(torch.randn(2, 3, 9, 8)),
        "width": lambda: _key(torch.randn(2, 3, 8, 9)),
        "channels": lambda: _key(torch.randn(2, 1, 8, 8)),
        "dtype": lambda: _key(x.double()),
        "autocast_on": lambda: _key(x, torch.bfloat16),
        "autocast_dtype": lambda: _key(x, torch.float16),
        "backend": lambda: _key(x, backend="reference"),
    }[change]()
    assert changed != base, f"changing the {change} alone left the graph key {base} unchanged"


def test_the_graph_key_names_what_it_holds(default_backend):
    x = torch.randn(2, 3, 8, 8)
    key = _key(x, torch.bfloat16, backend="sdpa")
    assert key.shape == (2, 3, 8, 8) and key.dtype == torch.float32 and key.device == x.device
    assert key.autocast_dtype == torch.bfloat16 and key.backend == "sdpa"
    assert _key(x).autocast_dtype is None


# --------------------------------------------------------------------------- BatchNorm fold

def _official_logits(model, images):
    official = copy.deepcopy(model).set_backend("official").eval()
    with torch.no_grad():
        return official(images)


SOURCES = {
    "conv_weight": lambda branch: branch.conv.weight,
    "bn_weight": lambda branch: branch.bn.weight,
    "bn_bias": lambda branch: branch.bn.bias,
    "running_mean": lambda branch: branch.bn.running_mean,
    "running_var": lambda branch: branch.bn.running_var,
}


@pytest.fixture(scope="module")
def eval_model():
    torch.manual_seed(1)
    model = tiny_cvt()
    randomize_batch_norms(model)
    return model.eval()


@pytest.mark.parametrize("source", list(SOURCES))
@pytest.mark.parametrize("branch", ["q", "k", "v"])
def test_the_fold_follows_an_in_place_change_of_each_source_of_each_branch(eval_model, branch, source):
    model = copy.deepcopy(eval_model)
    images = torch.randn(2, 3, 32, 32)
    attention = model.stage2.blocks[0].attn
    with torch.no_grad():
        model(images)
        assert attention._folded_bn.is_filled
        tensor = SOURCES[source](getattr(attention, f"conv_proj_{branch}"))
        tensor.mul_(1.5).add_(0.25)  # running_var stays positive
        assert_close(model(images), _official_logits(model, images))


@pytest.mark.parametrize("branch", ["q", "k", "v"])
def test_the_fold_follows_a_change_of_eps_alone(eval_model, branch):
    model = copy.deepcopy(eval_model)
    images = torch.randn(2, 3, 32, 32)
    bn = getattr(model.stage2.blocks[0].attn, f"conv_proj_{branch}").bn
    with torch.no_grad():
        before = model(images)
        bn.eps = 0.5  # changes the normalisation a lot; no tensor changes
        after = model(images)
    assert not torch.equal(before, after)
    assert_close(after, _official_logits(model, images))


def test_the_fold_follows_the_dtype_it_is_asked_for_alone(eval_model):
    """The same weights asked for in bfloat16 (autocast) and then in float32: one stored fold must
    not serve the other."""
    model = copy.deepcopy(eval_model)
    images = torch.randn(2, 3, 32, 32)
    attention = model.stage2.blocks[0].attn
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(images)
        assert attention._folded_bn.stored[0].dtype == torch.bfloat16
        assert_close(model(images), _official_logits(model, images))
        assert attention._folded_bn.stored[0].dtype == torch.float32
