"""Eval-mode BatchNorm folding (cvt_fast/batch_norm_fold.py): computed once, reused until a
weight or running statistic changes, never baked stale into a compiled graph.

Each test checks the logits against the 'official' path on the same weights (which runs
BatchNorm2d itself, no folding), so a stale or wrong fold shows as a logits mismatch, and
counts the folds where reuse is the point.
"""
import copy

import pytest
import torch

import cvt_fast.batch_norm_fold as batch_norm_fold
from cvt_fast.model import Attention
from tiny_models import randomize_batch_norms, tiny_cvt
from tolerances import assert_close


@pytest.fixture
def fold_counter(monkeypatch):
    """Counts calls of fold_batch_norm (one per branch per fold)."""
    calls = []
    original = batch_norm_fold.fold_batch_norm

    def counting(weight, bn, dtype):
        calls.append(bn)
        return original(weight, bn, dtype)

    monkeypatch.setattr(batch_norm_fold, "fold_batch_norm", counting)
    return calls


def official_logits(model, images):
    """Logits of the same weights on the official path (BatchNorm2d, no fold)."""
    official = copy.deepcopy(model).set_backend("official").eval()
    with torch.no_grad():
        return official(images)


def branches_in(model):
    return 3 * sum(isinstance(m, Attention) for m in model.modules())


def test_fold_is_computed_once_and_reused_under_no_grad(fold_counter):
    model = tiny_cvt()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        first = model(images)
        assert len(fold_counter) == branches_in(model)
        second = model(images)
    assert len(fold_counter) == branches_in(model)  # the second call folded nothing
    assert torch.equal(first, second)
    assert_close(first, official_logits(model, images))


def test_fold_is_reused_under_inference_mode_and_later_outside_it(fold_counter):
    model = tiny_cvt()
    images = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        first = model(images)
    # A fold stored under inference_mode is a normal tensor: usable where autograd records,
    # here for an input gradient (the parameters do not require grad).
    model.requires_grad_(False)
    x = images.clone().requires_grad_()
    second = model(x)
    second.sum().backward()
    assert len(fold_counter) == branches_in(model)
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert_close(second.detach(), first)
    assert_close(first, official_logits(model, images))


def test_fold_follows_load_state_dict(fold_counter):
    model = tiny_cvt(seed=0)
    other = tiny_cvt(seed=1)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(images)
        model.load_state_dict(other.state_dict())
        logits = model(images)
    assert len(fold_counter) == 2 * branches_in(model)
    assert_close(logits, official_logits(other, images))


def test_fold_follows_in_place_changes_of_running_statistics_and_bn_parameters():
    model = tiny_cvt()
    images = torch.randn(2, 3, 32, 32)
    bn = model.stage2.blocks[1].attn.conv_proj_k.bn
    with torch.no_grad():
        model(images)
        for change in (lambda: bn.running_var.mul_(3.0), lambda: bn.running_mean.add_(0.7),
                       lambda: bn.weight.mul_(-2.0), lambda: bn.bias.add_(1.0)):
            change()
            assert_close(model(images), official_logits(model, images))


def test_fold_follows_optimizer_steps_in_train_and_in_eval_mode():
    model = tiny_cvt()
    images = torch.randn(4, 3, 32, 32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    with torch.no_grad():
        model(images)  # fills the cache
    # A training step changes the weights and the running statistics...
    model.train()
    model(images).square().mean().backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        assert_close(model(images), official_logits(model, images))
    # ...and so does a step taken in eval mode (frozen statistics, trained affine and conv weights),
    # where the gradient must reach BatchNorm's parameters through the fold.
    optimizer.zero_grad()
    model(images).square().mean().backward()
    bn = model.stage0.blocks[0].attn.conv_proj_q.bn
    assert bn.weight.grad is not None and bn.weight.grad.abs().sum() > 0
    optimizer.step()
    with torch.no_grad():
        assert_close(model(images), official_logits(model, images))


def test_grad_mode_with_trainable_parameters_never_stores_a_fold(fold_counter):
    model = tiny_cvt()
    images = torch.randn(2, 3, 32, 32)
    for _ in range(2):  # a stored fold would carry the first call's autograd graph into the second
        model(images).sum().backward()
    assert len(fold_counter) == 2 * branches_in(model)
    assert not any(m._folded_bn.is_filled for m in model.modules() if isinstance(m, Attention))


def test_fold_follows_dtype_changes_and_matches_autocast_dtype():
    model = tiny_cvt()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(images)
        model.double()
        assert_close(model(images.double()), official_logits(model, images.double()))
        model.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cached = model(images)
            attn = model.stage1.blocks[0].attn
            assert all(t.dtype == torch.bfloat16 for t in attn._folded_bn._entry.folded)
    # The stored bf16 fold gives exactly what folding in float32 and casting on every call gave.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        uncached = model(images)  # grad mode with trainable parameters: folded afresh
    assert torch.equal(cached, uncached.detach())
    # The same weights, now without autocast: the stored bf16 fold must not be reused for float32.
    with torch.no_grad():
        assert_close(model(images), official_logits(model, images))
        assert all(t.dtype == torch.float32 for t in attn._folded_bn._entry.folded)


def test_fold_follows_a_parameter_replaced_by_assignment():
    model = tiny_cvt()
    images = torch.randn(2, 3, 32, 32)
    conv = model.stage2.blocks[0].attn.conv_proj_v.conv
    with torch.no_grad():
        model(images)
        conv.weight = torch.nn.Parameter(conv.weight * 1.5)  # a new tensor, version 0
        assert_close(model(images), official_logits(model, images))


def test_fold_follows_a_new_parameter_at_the_old_ones_address_and_version():
    # What an address reused by the allocator looks like to the cache: a new tensor with the old
    # one's storage and version counter; only its identity says it is not the tensor folded before.
    model = tiny_cvt()
    images = torch.randn(2, 3, 32, 32)
    conv = model.stage2.blocks[0].attn.conv_proj_v.conv
    with torch.no_grad():
        model(images)
        old = conv.weight
        conv.weight = torch.nn.Parameter(old.detach())
        conv.weight.data.mul_(1.5)  # writes through .data bump no version counter
        assert conv.weight.data_ptr() == old.data_ptr() and conv.weight._version == old._version
        assert_close(model(images), official_logits(model, images))


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_eval_model_sees_new_weights_and_statistics(fresh_dynamo):
    model = tiny_cvt()
    images = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        model(images)  # an eager call first: its stored fold must not leak into the graph
        assert_close(compiled(images), official_logits(model, images))
        randomize_batch_norms(model, torch.Generator().manual_seed(7))
        model.stage1.blocks[0].attn.conv_proj_q.conv.weight.mul_(2.0)
        assert_close(compiled(images), official_logits(model, images))
        model.load_state_dict(tiny_cvt(seed=3).state_dict())
        assert_close(compiled(images), official_logits(model, images))
