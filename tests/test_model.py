"""The model: official structure and keys, every spec variant, input handling, errors.

The fused-path tests compare backend 'reference' (cvt_fast.ops) against backend
'official' (plain eager, op for op like the official code) on the same weights.
"""
import copy

import pytest
import torch

import cvt_fast
from cvt_fast.model import QuickGELU, build_model
from tests.tiny_spec import tiny_spec
from tests.tolerances import assert_close

TINY = tiny_spec()


VARIANTS = {
    "default": {},
    "avg": {"QKV_PROJ_METHOD": ["avg", "avg", "avg"]},
    "linear": {"QKV_PROJ_METHOD": ["linear", "linear", "linear"]},
    "mixed_methods": {"QKV_PROJ_METHOD": ["dw_bn", "avg", "linear"]},
    "no_cls": {"CLS_TOKEN": [False, False, False]},
    "cls_everywhere": {"CLS_TOKEN": [True, True, True]},
    "stride_kv_1": {"STRIDE_KV": [1, 1, 1]},
    "stride_kv_3": {"STRIDE_KV": [3, 3, 3]},
    "kernel_5_pad_2": {"KERNEL_QKV": [5, 5, 5], "PADDING_KV": [2, 2, 2], "PADDING_Q": [2, 2, 2]},
    "pad_kv_0": {"PADDING_KV": [0, 0, 0]},
    "no_qkv_bias": {"QKV_BIAS": [False, False, False]},
    "two_stages": {"NUM_STAGES": 2, **{k: v[:2] for k, v in TINY.items() if isinstance(v, list)}},
}


def test_cvt13_has_the_official_state_dict_keys_and_size():
    model = cvt_fast.create_model("cvt-13")
    keys = set(model.state_dict())
    block = "stage2.blocks.9"
    expected = {
        "stage0.patch_embed.proj.weight", "stage0.patch_embed.proj.bias",
        "stage0.patch_embed.norm.weight", "stage0.patch_embed.norm.bias", "stage2.cls_token",
        f"{block}.norm1.weight", f"{block}.attn.conv_proj_q.conv.weight",
        f"{block}.attn.conv_proj_k.bn.running_mean", f"{block}.attn.conv_proj_v.bn.num_batches_tracked",
        f"{block}.attn.proj_q.weight", f"{block}.attn.proj_k.bias", f"{block}.attn.proj.weight",
        f"{block}.norm2.bias", f"{block}.mlp.fc1.weight", f"{block}.mlp.fc2.bias",
        "norm.weight", "norm.bias", "head.weight", "head.bias",
    }
    assert expected <= keys
    assert not any(k.startswith("stage0.cls_token") or k.startswith("stage1.cls_token") for k in keys)
    assert "stage2.blocks.10.norm1.weight" not in keys
    # Every key is one of the official families (no extra modules of ours leak in).
    families = ("patch_embed.", "cls_token", "norm1.", "norm2.", "attn.conv_proj_", "attn.proj_",
                "attn.proj.", "mlp.fc1.", "mlp.fc2.")
    for k in keys:
        assert k.startswith(("norm.", "head.")) or any(f in k for f in families), k
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(20.0e6, rel=0.01)


def test_quirks_scale_drop_path_and_activation():
    model = cvt_fast.create_model("cvt-13")
    attn = model.stage2.blocks[0].attn
    assert attn.scale == 384 ** -0.5  # the whole width, not the head width
    rates = [getattr(b.drop_path, "rate", 0.0) for b in model.stage2.blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.1, 10).tolist())
    assert isinstance(model.stage0.blocks[0].mlp.act, QuickGELU)
    x = torch.randn(100)
    assert_close(QuickGELU()(x), x * torch.sigmoid(1.702 * x))
    gelu_model = cvt_fast.create_model("cvt-13", act="gelu")
    assert isinstance(gelu_model.stage0.blocks[0].mlp.act, torch.nn.GELU)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_spec_variant_runs_forward_and_backward(variant):
    model = build_model(tiny_spec(**VARIANTS[variant]), num_classes=7, backend="official")
    x = torch.randn(2, 3, 64, 48)
    logits = model(x)
    assert logits.shape == (2, 7)
    logits.square().sum().backward()
    # With a cls-token classifier, the last block's grid queries cannot reach the logits
    # (only the cls query row does, and it is never convolved), in the official model too.
    last = f"stage{model.num_stages - 1}.blocks.{len(model.stages[-1].blocks) - 1}.attn.conv_proj_q."
    dead = last if model.use_cls_token else None
    missing = [n for n, p in model.named_parameters()
               if (p.grad is None or not p.grad.abs().sum() > 0) and not (dead and n.startswith(dead))]
    assert not missing, f"parameters without gradient: {missing}"


@pytest.mark.parametrize("size", [(33, 33), (61, 97), (224, 160), (17, 29)])
def test_odd_and_rectangular_inputs(size):
    model = build_model(TINY, num_classes=5, backend="official").eval()
    assert model(torch.randn(1, 3, *size)).shape == (1, 5)


def test_batch_size_one_keeps_the_batch_dimension():
    model = build_model(TINY, num_classes=4, backend="official").eval()
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 4)
    # timm's convention: forward_features is unpooled (cls token + 4x4 grid), forward_head pools
    features = model.forward_features(torch.randn(1, 3, 64, 64))
    assert features.shape == (1, 1 + 16, 48) and model.forward_head(features, pre_logits=True).shape == (1, 48)


def test_eval_is_deterministic_and_batch_independent():
    model = build_model(TINY, num_classes=4, backend="official").eval()
    x = torch.randn(3, 3, 64, 64)
    full = model(x)
    assert_close(model(x[1:2]), full[1:2])


def test_create_model_names_and_unknown_name():
    for name, dim in (("cvt-13", 384), ("cvt-21", 384), ("cvt-w24", 1024)):
        with torch.device("meta"):  # structure only: no memory, no initialisation time
            model = cvt_fast.create_model(name, num_classes=10, backend="official")
        assert model.num_features == dim and model.head.out_features == 10
    with pytest.raises(ValueError, match="cvt-13"):
        cvt_fast.create_model("cvt-99")


def test_no_weight_decay_names_the_cls_tokens():
    model = cvt_fast.create_model("cvt-13")
    names = dict(model.named_parameters())
    assert model.no_weight_decay() == {"stage2.cls_token"}
    assert all(n in names for n in model.no_weight_decay())


def test_reset_classifier_gives_a_fresh_head():
    model = build_model(TINY, num_classes=4, backend="official")
    model.reset_classifier(9)
    assert model.head.out_features == 9 and model(torch.randn(2, 3, 32, 32)).shape == (2, 9)


@pytest.mark.parametrize("bad, error, message", [
    (torch.randn(2, 1, 64, 64), ValueError, "3 input channels"),
    (torch.randn(64, 64), ValueError, "4-D"),
    (torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8), TypeError, "floating-point"),
    (torch.randn(2, 3, 2, 2), ValueError, "too small"),
])
def test_bad_inputs_raise_clear_errors(bad, error, message):
    model = build_model(TINY, num_classes=4, backend="official")
    with pytest.raises(error, match=message):
        model(bad)


@pytest.mark.parametrize("changes, message", [
    ({"DIM_EMBD": [1, 2, 3]}, "DIM_EMBD.*did you mean DIM_EMBED"),
    ({"DEPTH": [1, 1]}, "DEPTH has 2 entries"),
    ({"POS_EMBED": [True, False, False]}, "POS_EMBED"),
    ({"NUM_HEADS": [3, 2, 3]}, "not divisible"),
    ({"QKV_PROJ_METHOD": ["dw", "dw_bn", "dw_bn"]}, "QKV_PROJ_METHOD"),
])
def test_bad_specs_raise_clear_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        build_model(tiny_spec(**changes))


def test_bad_act_and_backend_raise():
    with pytest.raises(ValueError, match="act"):
        build_model(TINY, act="relu")
    with pytest.raises(ValueError, match="backend"):
        build_model(TINY, backend="fastest")


def test_model_from_every_config_file_builds():
    import glob

    from cvt_fast.model import build_model_from_config
    for path in sorted(glob.glob("experiments/imagenet/cvt/*.yaml")):
        cfg = cvt_fast.load_config(path)
        with torch.device("meta"):
            model = build_model_from_config(cfg)
        assert model.spec["DEPTH"] == list(cfg.MODEL.SPEC.DEPTH)


# -- the fused path (cvt_fast.ops, backend 'reference') equals the official path -------

def _assert_same_gradients(fused, official):
    fused_params = dict(fused.named_parameters())
    names = [n for n, p in official.named_parameters() if p.grad is not None]
    assert all(fused_params[n].grad is not None for n in names)
    flat = lambda model_params: torch.cat([model_params[n].grad.flatten() for n in names])  # noqa: E731
    assert_close(flat(fused_params), flat(dict(official.named_parameters())), factor=10)
    # Per parameter too, except those whose gradient is zero up to rounding (the bias of
    # k, for one: softmax is invariant to it), where a relative error means nothing.
    total = flat(dict(official.named_parameters())).norm()
    for name, p in official.named_parameters():
        if p.grad is not None and p.grad.norm() > 1e-4 * total:
            assert_close(fused_params[name].grad, p.grad, factor=10)


def _paired_models(spec, **kw):
    official = build_model(spec, num_classes=6, backend="official", **kw)
    fused = copy.deepcopy(official).set_backend("reference")
    return official, fused


@pytest.mark.parametrize("variant", ["default", "no_cls", "cls_everywhere", "stride_kv_1", "pad_kv_0", "avg", "linear"])
def test_reference_backend_equals_official_path_in_train_mode(variant):
    official, fused = _paired_models(tiny_spec(**VARIANTS[variant]))
    x = torch.randn(3, 3, 48, 40)
    out_official, out_fused = official(x), fused(x)
    assert_close(out_fused, out_official)
    out_official.square().sum().backward()
    out_fused.square().sum().backward()
    _assert_same_gradients(fused, official)
    fused_buffers = dict(fused.named_buffers())
    for name, b in official.named_buffers():  # BatchNorm running statistics and counters
        if b.is_floating_point():
            assert_close(fused_buffers[name], b)
        else:
            assert torch.equal(fused_buffers[name], b), name


def test_reference_backend_equals_official_path_in_eval_mode_with_trained_statistics():
    official, fused = _paired_models(TINY)
    for m in official.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial statistics to fold
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    fused.load_state_dict(official.state_dict())
    x = torch.randn(2, 3, 56, 72)
    assert_close(fused.eval()(x), official.eval()(x))


def test_reference_backend_equals_official_path_in_float64():
    official, fused = _paired_models(TINY)
    official, fused = official.double(), fused.double()
    x = torch.randn(2, 3, 40, 40, dtype=torch.float64)
    assert_close(fused(x), official(x), factor=1e3)
