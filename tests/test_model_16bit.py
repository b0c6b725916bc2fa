"""A 16-bit model (model.to(torch.bfloat16), as timm's train.py --model-dtype does; not autocast) runs
forward and backward on every backend this machine runs: the LayerNorms widen their 16-bit
parameters to float32 as they widen the input, and the fused ops take 16-bit weights."""
import pytest
import torch

from cvt_fast.model import MODEL_BACKENDS, build_model
from cvt_fast.ops.backends import TABLE
from tiny_models import randomize_batch_norms
from tiny_spec import tiny_spec


def _runs_on_cpu(backend):
    if backend in ("official", "auto"):
        return True
    record = TABLE[backend]
    return all(record.probe(op, "cpu") is None and torch.bfloat16 in record.dtypes for op in record.ops)


CPU_BACKENDS = [None if b == "auto" else b for b in MODEL_BACKENDS if _runs_on_cpu(b)]
# Relative, logits of a bfloat16 model against float32 arithmetic on its weights: every op rounds to
# 8 bits (~4e-3) through a dozen layers, and training-mode BatchNorm over a tiny batch amplifies it
# (measured 0.007 to 0.036 across backends and input sizes, no backend systematically worse).
BF16_TOLERANCE = 5e-2


def relative_error(got, expected):
    return ((got.double() - expected.double()).norm() / expected.double().norm()).item()


def float32_and_bfloat16_models(backend):
    torch.manual_seed(0)
    spec = tiny_spec(DROP_PATH_RATE=[0.0, 0.1, 0.2])
    model = randomize_batch_norms(build_model(spec, num_classes=5, backend=backend)).to(torch.bfloat16)
    # The float32 twin holds the very bfloat16-rounded weights: what differs is the arithmetic only.
    wide = build_model(spec, num_classes=5, backend=backend)
    wide.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()})
    return wide, model


@pytest.mark.parametrize("backend", CPU_BACKENDS, ids=str)
def test_bfloat16_model_trains_forward_and_backward(backend):
    wide, model = float32_and_bfloat16_models(backend)
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    logits = model.train()(x.to(torch.bfloat16))
    torch.manual_seed(1)  # the same drop-path masks
    expected = wide.train()(x)
    assert logits.dtype == torch.bfloat16 and relative_error(logits, expected) < BF16_TOLERANCE
    logits.float().square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all(), name
    # BatchNorm's statistics moved in the model's dtype.
    assert model.stage0.blocks[0].attn.conv_proj_q.bn.running_mean.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", CPU_BACKENDS, ids=str)
def test_bfloat16_model_evaluates_without_grad(backend):
    wide, model = float32_and_bfloat16_models(backend)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits = model.eval()(x.to(torch.bfloat16))
        expected = wide.eval()(x)
    assert logits.dtype == torch.bfloat16 and relative_error(logits, expected) < BF16_TOLERANCE


def test_float32_image_into_a_bfloat16_model_is_refused_with_the_fix():
    _, model = float32_and_bfloat16_models("reference")
    with pytest.raises(TypeError, match=r"x.to\(torch.bfloat16\)"):
        model(torch.randn(1, 3, 32, 32))


def test_a_new_head_takes_the_models_dtype():
    _, model = float32_and_bfloat16_models("reference")
    model.reset_classifier(3)
    assert model.head.weight.dtype == torch.bfloat16
    assert model.eval()(torch.randn(1, 3, 32, 32, dtype=torch.bfloat16)).shape == (1, 3)
