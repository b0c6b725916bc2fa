"""The model on the fused steps: every backend but 'official' runs each residual add, its drop
path and the LayerNorm after it as one op (cvt_fast.ops.residual_layer_norm), and the MLP as two
products with the activation in their epilogues (cvt_fast.lean_mlp). Same logits and gradients as
the official path, with drop path drawing the same random numbers, in float32, under bfloat16
autocast, with exact GELU, and on the Triton kernels; the official path dispatches none of them."""
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cvt_fast.model import build_model
from tests.test_model import tiny_spec
from tolerances import assert_close, relative_error

DROP_PATH = dict(DEPTH=[1, 2, 3], DROP_PATH_RATE=[0.2, 0.3, 0.4])


def paired(spec, **kwargs):
    official = build_model(spec, num_classes=6, backend="official", **kwargs)
    fused = copy.deepcopy(official).set_backend("reference")
    return official, fused


def train_step(model, images, seed, autocast=False):
    torch.manual_seed(seed)  # the same drop-path draws on both paths
    model.train().zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(images)
    logits.float().square().sum().backward()
    return logits, {n: p.grad for n, p in model.named_parameters()}


def assert_same_gradients(got, want, dtype=torch.float32, factor=10.0):
    # Compared as one vector: proj_k's bias has a zero true gradient (the softmax ignores a shift
    # of all scores of a row), so its per-tensor relative error is rounding noise.
    assert got.keys() == want.keys()
    assert all(got[n] is not None for n in want if want[n] is not None)
    assert_close(torch.cat([got[n].flatten().float() for n in want]),
                 torch.cat([want[n].flatten().float() for n in want]), dtype, factor=factor)


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_fused_path_matches_the_official_path_with_drop_path_in_training(act):
    official, fused = paired(tiny_spec(**DROP_PATH), act=act)
    images = torch.randn(3, 3, 40, 32)
    logits, grads = train_step(fused, images, seed=3)
    expected, expected_grads = train_step(official, images, seed=3)
    assert_close(logits, expected)
    assert_same_gradients(grads, expected_grads)
    # Drop path really dropped something: another seed gives other logits.
    assert not torch.allclose(train_step(fused, images, seed=4)[0], logits)


def test_fused_path_under_bfloat16_autocast_is_as_close_to_float32_as_the_official_path():
    # Both bfloat16 paths are 1-2 % from the float32 model (and so from each other): each rounds
    # at other places. Averaged over two drop-path draws (one alone is noisy: either path can be
    # the closer one), the fused path must not be further from float32 than the official path.
    official, fused = paired(tiny_spec(**DROP_PATH))
    images = torch.randn(3, 3, 40, 32)
    errors = {"fused": [0.0, 0.0], "official": [0.0, 0.0]}
    for seed in (5, 6):
        exact, exact_grads = train_step(copy.deepcopy(official), images, seed=seed)
        for name, model in (("fused", fused), ("official", official)):
            logits, grads = train_step(model, images, seed=seed, autocast=True)
            assert logits.dtype == torch.bfloat16
            assert all(grads[n].dtype == p.dtype for n, p in model.named_parameters())
            errors[name][0] += relative_error(logits.float(), exact) / 2
            errors[name][1] += relative_error(torch.cat([g.flatten().float() for g in grads.values()]),
                                              torch.cat([g.flatten() for g in exact_grads.values()])) / 2
    for what, fused_error, official_error in zip(("logits", "gradients"), errors["fused"], errors["official"]):
        assert fused_error <= 1.25 * official_error + 1e-3, (what, errors)
        assert fused_error <= 3e-2, (what, errors)


def test_fused_path_matches_the_official_path_in_eval_and_in_float64():
    official, fused = paired(tiny_spec(**DROP_PATH))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(fused.eval()(images), official.eval()(images))
    official, fused = official.double(), fused.double()
    images = images.double()
    logits, grads = train_step(fused, images, seed=6)
    expected, expected_grads = train_step(official, images, seed=6)
    assert_close(logits, expected, factor=1e3)
    assert_same_gradients(grads, expected_grads, torch.float64, factor=1e3)


def test_triton_backend_trains_like_the_reference_backend():
    spec = tiny_spec(DEPTH=[1, 1, 2], DROP_PATH_RATE=[0.0, 0.0, 0.3])
    reference = build_model(spec, num_classes=6, backend="reference")
    triton = copy.deepcopy(reference).set_backend("triton")
    images = torch.randn(2, 3, 32, 32)
    logits, grads = train_step(triton, images, seed=7)
    expected, expected_grads = train_step(reference, images, seed=7)
    assert_close(logits, expected, factor=10.0)
    assert_same_gradients(grads, expected_grads)


class _OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(f"{func.namespace}::{func.overloadpacket.__name__}")
        return func(*args, **(kwargs or {}))


def ops_dispatched(model, images):
    recorder = _OpNames()
    with recorder:
        model(images).sum().backward()
    return recorder.names


def test_only_the_fused_backends_dispatch_the_fused_elementwise_ops():
    official, fused = paired(tiny_spec(**DROP_PATH))
    images = torch.randn(2, 3, 32, 32)
    fused_ops = {"cvt_fast::residual_layer_norm", "cvt_fast::residual_layer_norm_backward",
                 "cvt_fast::linear_activation", "cvt_fast::activation_grad_through_linear"}
    assert fused_ops <= ops_dispatched(fused.train(), images)
    official_ops = ops_dispatched(official.train(), images)
    assert not any(name.startswith("cvt_fast::") for name in official_ops)
    assert {"aten::sigmoid", "aten::native_layer_norm"} <= official_ops  # the official code's own ops
