"""timm's head conventions on cvt_fast's CvT (cvt_fast/model.py): forward_features unpooled,
forward_head pooling by global_pool, reset_classifier, head_hidden_size / num_prefix_tokens,
group_matcher for layer decay, set_grad_checkpointing (really recomputing the blocks), and the
pretrained cfgs' pool_size. The official logits must not change by a bit."""
import pytest
import torch
import torch.utils.checkpoint
from torch.autograd.graph import saved_tensors_hooks

from cvt_fast.model import build_model
from tiny_models import randomize_batch_norms, stage_outputs
from tiny_spec import tiny_spec

CPU_BACKENDS = ["official", "reference"]


def tiny(cls_token=True, **kwargs):
    torch.manual_seed(0)
    return randomize_batch_norms(build_model(tiny_spec(CLS_TOKEN=[False, False, cls_token]), num_classes=5, **kwargs))



@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_default_pooling_gives_the_official_logits_bit_for_bit(backend):
    x = torch.randn(3, 3, 61, 47)
    with torch.no_grad():
        model = tiny(backend=backend).eval()
        logits, stages = stage_outputs(model, x)
        grid, cls_token = stages[-1]
        # The official classifier: final LayerNorm of the cls token alone, then the head.
        assert torch.equal(logits, model.head(model.norm(cls_token)[:, 0]))
        no_cls = tiny(cls_token=False, backend=backend).eval()
        logits, stages = stage_outputs(no_cls, x)
        grid, _ = stages[-1]
        # Without a cls token the official code averages the normalised tokens.
        assert torch.equal(logits, no_cls.head(no_cls.norm(grid.flatten(2).transpose(1, 2)).mean(dim=1)))


def test_forward_features_is_the_normalised_unpooled_tokens_and_forward_head_pools_them():
    model = tiny(backend="reference").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _, stages = stage_outputs(model, x)
        grid, cls_token = stages[-1]
        features = model.forward_features(x)
        assert model.num_prefix_tokens == 1 and model.head_hidden_size == model.num_features == 48
        assert features.shape == (2, 1 + 4 * 4, 48)
        tokens = torch.cat((cls_token, grid.flatten(2).transpose(1, 2)), dim=1)
        assert torch.equal(features, model.norm(tokens))
        assert model.global_pool == "token"
        assert torch.equal(model.forward_head(features, pre_logits=True), features[:, 0])
        model.reset_classifier(5, "avg")
        assert torch.equal(model.forward_head(features, pre_logits=True), features[:, 1:].mean(dim=1))
        assert torch.equal(model(x), model.head(features[:, 1:].mean(dim=1)))
        model.reset_classifier(0)  # pooling kept: pooled features out
        assert model.global_pool == "avg" and torch.equal(model(x), features[:, 1:].mean(dim=1))
        model.reset_classifier(0, "")  # no pooling, no head: forward is forward_features
        assert torch.equal(model(x), features)
        model.reset_classifier(7, "token")
        assert model(x).shape == (2, 7) and model.head.in_features == model.head_hidden_size


def test_pooling_choices_are_checked():
    model = tiny(backend="reference")
    with pytest.raises(ValueError, match="global_pool must be one of"):
        model.reset_classifier(3, "max")
    no_cls = tiny(cls_token=False)
    assert no_cls.global_pool == "avg" and no_cls.num_prefix_tokens == 0
    with pytest.raises(ValueError, match="needs a cls token.*use 'avg'"):
        no_cls.reset_classifier(3, "token")
    with pytest.raises(ValueError, match="needs a cls token"):
        build_model(tiny_spec(CLS_TOKEN=[False, False, False]), global_pool="token")


def test_group_matcher_orders_parameters_by_depth_for_layer_decay():
    timm = pytest.importorskip("timm")
    from timm.models import group_parameters

    model = build_model(tiny_spec(DEPTH=[1, 2, 2]), num_classes=5)
    layer_of = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    names = [n for n, _ in model.named_parameters()]
    assert set(layer_of) == set(names)
    assert layer_of["stage0.patch_embed.proj.weight"] == 0  # the stem
    order = ["stage0.blocks.0.norm1.weight", "stage1.patch_embed.proj.weight", "stage1.blocks.0.attn.proj.weight",
             "stage1.blocks.1.mlp.fc1.weight", "stage2.patch_embed.norm.weight", "stage2.blocks.0.norm2.bias",
             "stage2.blocks.1.attn.proj_q.weight"]
    ids = [layer_of[n] for n in order]
    assert ids == sorted(ids) and len(set(ids)) == len(ids), dict(zip(order, ids))
    # A stage's cls token and patch embedding share the group just before its first block; the
    # final LayerNorm joins the last block's group (timm's convention), the head comes after all.
    assert layer_of["stage2.cls_token"] == layer_of["stage2.patch_embed.proj.weight"]
    assert layer_of["norm.weight"] == layer_of["stage2.blocks.1.mlp.fc2.bias"] < layer_of["head.weight"]
    coarse = group_parameters(model, model.group_matcher(coarse=True), reverse=True)
    assert [coarse[f"stage{i}.blocks.0.norm1.weight"] for i in range(3)] == [1, 2, 3]
    assert coarse["stage0.patch_embed.proj.bias"] == 0 and coarse["norm.bias"] == 3
    # timm's layer-decay optimizer groups read it (no fallback to its heuristic).
    from timm.optim import param_groups_layer_decay
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.5)
    scales = sorted({g["lr_scale"] for g in groups})
    assert len(scales) == max(layer_of.values()) + 1


def activation_bytes(model, x):
    """Bytes of the tensors the backward keeps (parameters and the image excluded): those saved for
    autograd outside checkpointed blocks, plus the inputs each checkpoint keeps to recompute its block
    (inside a checkpoint, its own saved-tensor hooks replace ours and keep nothing)."""
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()} | {x.untyped_storage().data_ptr()}
    kept = {}

    def keep(t):
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in skip:
            kept.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    original = torch.utils.checkpoint.checkpoint

    def counting_checkpoint(function, *args, **kwargs):
        for arg in args:
            keep(arg)
        return original(function, *args, **kwargs)

    torch.utils.checkpoint.checkpoint = counting_checkpoint
    try:
        with saved_tensors_hooks(keep, lambda t: t):
            out = model(x)
    finally:
        torch.utils.checkpoint.checkpoint = original
    return sum(kept.values()), out


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_grad_checkpointing_recomputes_blocks_with_the_same_gradients_and_statistics(backend):
    spec = tiny_spec(DEPTH=[1, 2, 3], DROP_PATH_RATE=[0.0, 0.2, 0.3])  # drop path: the RNG must replay
    x = torch.randn(2, 3, 64, 64)
    runs = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_model(spec, num_classes=5, backend=backend).train()
        model.set_grad_checkpointing(checkpointing)
        assert model.grad_checkpointing == checkpointing
        torch.manual_seed(1)
        saved, logits = activation_bytes(model, x)
        logits.square().sum().backward()
        runs[checkpointing] = saved, logits, model
    (plain_bytes, plain_logits, plain), (ckpt_bytes, ckpt_logits, ckpt) = runs[False], runs[True]
    assert torch.equal(plain_logits, ckpt_logits)
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7, msg=name)
    # BatchNorm's running statistics and counter moved once, not again in the recomputation.
    for (name, b), c in zip(plain.named_buffers(), ckpt.buffers()):
        assert torch.equal(b, c), name
    assert ckpt_bytes < 0.5 * plain_bytes, (ckpt_bytes, plain_bytes)


def test_grad_checkpointing_is_inert_without_grad():
    model = tiny(backend="reference").train()
    model.set_grad_checkpointing()
    calls = []
    original = torch.utils.checkpoint.checkpoint
    torch.utils.checkpoint.checkpoint = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        with torch.no_grad():
            model(torch.randn(2, 3, 32, 32))
        assert not calls
        model(torch.randn(2, 3, 32, 32))
        assert len(calls) == sum(len(s.blocks) for s in model.stages)
    finally:
        torch.utils.checkpoint.checkpoint = original


def test_timm_models_take_global_pool_and_carry_pool_size():
    timm = pytest.importorskip("timm")
    for name, size in (("cvt_13", 224), ("cvt_13_384", 384), ("cvt_w24_384", 384)):
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.pool_size == (size // 16, size // 16)
    with torch.device("meta"):  # structure only
        model = timm.create_model("cvt_13", global_pool="avg", num_classes=3)
    assert model.global_pool == "avg" and model.head_hidden_size == 384
    # pool_size is the last stage's grid at the default input size: forward_features' tokens less the cls.
    model = timm.create_model("cvt_13", num_classes=0).eval()
    with torch.no_grad():
        tokens = model.forward_features(torch.randn(1, 3, 224, 224))
    assert tokens.shape == (1, model.num_prefix_tokens + 14 * 14, model.num_features)
    assert model.pretrained_cfg["pool_size"] == (14, 14)
    # timm's default-cfg checks: the cfg's classifier and first conv name real weights.
    weights = timm.create_model("cvt_13").state_dict()
    for name in (model.pretrained_cfg["classifier"], model.pretrained_cfg["first_conv"]):
        assert f"{name}.weight" in weights, name
