"""BatchNorm of the convolutional projection on the model's fused path: running statistics (momentum
included) in training, the folded eps in eval.

In training the fused path runs BatchNorm itself, after conv_proj, on the token rows
(cvt_fast/model.py), instead of calling the nn.BatchNorm2d modules. It must update the
running statistics exactly as nn.BatchNorm2d does, also for `momentum=None`, where
BatchNorm2d keeps a cumulative average (momentum 1 / num_batches_tracked): issue 16 found
that hard-coding 0.1 there passed every test. The official path (backend 'official') calls
the nn.BatchNorm2d modules, so it is the ground truth. float32 is enough: a wrong update rule
moves the statistics by tens of percent, rounding by about 1e-6 (float64 convolutions are
slow on the CPU).
"""
import copy

import pytest
import torch
import torch.nn as nn

from tolerances import assert_close

from cvt_fast.model import build_model

# A small CvT: three stages, a cls token in the last, dw_bn projections everywhere.
SPEC = {
    "NUM_STAGES": 3, "PATCH_SIZE": [7, 3, 3], "PATCH_STRIDE": [4, 2, 2], "PATCH_PADDING": [2, 1, 1],
    "DIM_EMBED": [16, 24, 32], "NUM_HEADS": [1, 2, 2], "DEPTH": [1, 1, 1],
    "MLP_RATIO": [2.0, 2.0, 2.0], "ATTN_DROP_RATE": [0.0, 0.0, 0.0], "DROP_RATE": [0.0, 0.0, 0.0],
    "DROP_PATH_RATE": [0.0, 0.0, 0.0], "QKV_BIAS": [True, True, True],
    "CLS_TOKEN": [False, False, True], "POS_EMBED": [False, False, False],
    "QKV_PROJ_METHOD": ["dw_bn", "dw_bn", "dw_bn"], "KERNEL_QKV": [3, 3, 3],
    "PADDING_KV": [1, 1, 1], "STRIDE_KV": [2, 2, 2], "PADDING_Q": [1, 1, 1], "STRIDE_Q": [1, 1, 1],
}


def _paired_models(momentum):
    official = build_model(SPEC, num_classes=5, backend="official")
    batch_norms = [m for m in official.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(batch_norms) == 9  # q, k, v in each of the three blocks
    for bn in batch_norms:
        bn.momentum = momentum
    fused = copy.deepcopy(official).set_backend("reference")
    return official, fused


def _train_step(model, optimizer, x, target):
    optimizer.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), target).backward()
    optimizer.step()


def _batch_norm_buffers(model):
    return {name: b for name, b in model.named_buffers() if ".bn." in name}


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("momentum", [None, 0.3], ids=lambda m: f"momentum_{m}")
def test_fused_path_batch_norm_statistics_match_batchnorm2d(momentum, steps):
    official, fused = _paired_models(momentum)
    # Weights change between steps (SGD), so every step normalises a different distribution.
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (official, fused)]
    official.train()
    fused.train()
    for _ in range(steps):
        x = torch.randn(3, 3, 36, 28)
        target = torch.randint(0, 5, (3,))
        for model, optimizer in zip((official, fused), optimizers):
            _train_step(model, optimizer, x, target)

    expected = _batch_norm_buffers(official)
    actual = _batch_norm_buffers(fused)
    assert actual.keys() == expected.keys() and len(expected) == 9 * 3
    for name, buffer in expected.items():
        if name.endswith("num_batches_tracked"):
            assert int(actual[name]) == int(buffer) == steps, name
        else:
            try:
                assert_close(actual[name], buffer)
            except AssertionError as err:
                raise AssertionError(f"{name} after {steps} step(s): {err}") from None
    # The running statistics moved away from their initial (0, 1), so the comparison has teeth.
    means = [b for n, b in expected.items() if n.endswith("running_mean")]
    assert min(m.abs().max().item() for m in means) > 1e-3


def test_momentum_none_after_one_step_holds_that_batch_s_statistics():
    """A cumulative average over one batch is that batch's mean and unbiased variance."""
    official, fused = _paired_models(None)
    # The official path runs the Conv2d module, so a hook sees the convolution output that
    # the fused path normalises (the two models share their weights).
    captured = []
    handle = official.stage0.blocks[0].attn.conv_proj_k.conv.register_forward_hook(
        lambda module, args, out: captured.append(out.detach()))
    x = torch.randn(2, 3, 36, 28)
    official.train()(x)
    handle.remove()
    fused.train()(x)
    (conv_out,) = captured
    bn = fused.stage0.blocks[0].attn.conv_proj_k.bn
    assert int(bn.num_batches_tracked) == 1
    assert_close(bn.running_mean, conv_out.mean(dim=(0, 2, 3)))
    assert_close(bn.running_var, conv_out.var(dim=(0, 2, 3), unbiased=True))


def test_eval_fold_keeps_eps_where_the_running_variance_is_small():
    """In eval the fused path folds BatchNorm into conv_proj: w * gamma / sqrt(var + eps). With
    variances near eps (channels that barely vary), dropping eps changes the output by tens of
    percent; at the usual variances of order 1 it hides below float32 rounding."""
    official, fused = _paired_models(0.1)
    for bn in (m for m in official.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.01, 0.01)
        bn.running_var.uniform_(0.5e-5, 2e-5)  # eps is 1e-5
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    fused.load_state_dict(official.state_dict())
    x = torch.randn(2, 3, 36, 28)
    with torch.no_grad():
        assert_close(fused.eval()(x), official.eval()(x), factor=10)
