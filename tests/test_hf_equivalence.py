"""Equivalence with Hugging Face's independent port, `transformers.CvtForImageClassification`.

A randomly initialised Hugging Face model is converted with `cvt_fast.hf_convert` and
must give the same logits as our model built with act="gelu" (Hugging Face uses exact
GELU), in eval mode and in train mode (batch-statistics BatchNorm, whose running
statistics must then match too). Drop rates stay 0: Hugging Face indexes its drop-path
rate by the stage instead of the block (DESIGN.md), and dropout would not be
reproducible across two implementations anyway.
"""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import CvtForImageClassification  # noqa: E402

from cvt_fast.checkpoint import load_checkpoint  # noqa: E402
from cvt_fast.hf_convert import hf_config_from_spec, hf_to_official, official_to_hf  # noqa: E402
from cvt_fast.model import build_model  # noqa: E402
from cvt_fast.specs import get_spec  # noqa: E402
from tests.tiny_spec import tiny_spec  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

# Hugging Face builds stage i with drop_path_rates[i], a list of DEPTH[i] entries, so
# every stage needs DEPTH[i] > i or its constructor raises IndexError.
SMALL = tiny_spec(DEPTH=[1, 2, 3])
NUM_CLASSES = 10
BACKENDS = ["official", "reference"]


def small_spec(**changes):
    spec = copy.deepcopy(SMALL)
    spec.update(changes)
    return spec


def randomize_(module: torch.nn.Module) -> None:
    """Give every parameter and BatchNorm statistic a non-trivial seeded value.

    Fresh models have unit LayerNorm/BatchNorm weights, zero biases and zero/one running
    statistics, which would hide a swapped weight/bias or mean/var in the key mapping.
    """
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if name.endswith("num_batches_tracked"):
                tensor.fill_(7)
            elif name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
            elif tensor.is_floating_point():
                tensor.normal_(0.0, 0.2 if tensor.dim() > 1 else 0.5)


def make_hf(spec, num_classes=NUM_CLASSES):
    hf = CvtForImageClassification(hf_config_from_spec(spec, num_classes, act="gelu"))
    randomize_(hf)
    return hf


def make_ours_from(hf, spec, backend, num_classes=NUM_CLASSES):
    ours = build_model(spec, num_classes, act="gelu", backend=backend)
    load_checkpoint(ours, hf_to_official(hf.state_dict()), strict=True)
    return ours


def hf_logits(hf, x):
    return hf(pixel_values=x).logits


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["default", "cls_everywhere", "no_qkv_bias", "kernel_5_stride_kv_1"])
def test_converted_hf_model_gives_the_same_logits_in_eval(variant, backend):
    changes = {
        "default": {},
        "cls_everywhere": {"CLS_TOKEN": [True, True, True]},
        # (No "without cls token" variant: the Hugging Face port fails without one in the last stage.)
        "kernel_5_stride_kv_1": {"KERNEL_QKV": [5, 3, 5], "PADDING_Q": [2, 1, 2], "PADDING_KV": [2, 1, 1],
                                 "STRIDE_KV": [1, 2, 2]},
        "no_qkv_bias": {"QKV_BIAS": [False, False, False]},
    }[variant]
    if variant == "cls_everywhere":
        # Hugging Face sizes every cls token with embed_dim[-1]: only equal widths can carry one per stage.
        changes["DIM_EMBED"] = [24, 24, 24]
    spec = small_spec(**changes)
    hf = make_hf(spec).eval()
    ours = make_ours_from(hf, spec, backend).eval()
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        assert_close(ours(x), hf_logits(hf, x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_converted_hf_model_matches_in_train_mode_including_batchnorm_statistics(backend):
    spec = small_spec()
    hf = make_hf(spec).train()
    ours = make_ours_from(hf, spec, backend).train()
    before = {k: v.clone() for k, v in hf_to_official(hf.state_dict()).items()}
    x = torch.randn(3, 3, 56, 56)
    ours_logits, theirs = ours(x), hf_logits(hf, x)
    assert_close(ours_logits, theirs)
    # The gradients agree too, parameter by parameter (matched through the key mapping).
    target = torch.randn_like(theirs)
    (ours_logits * target).sum().backward()
    (theirs * target).sum().backward()
    hf_params = dict(hf.named_parameters())
    scale = max(p.grad.norm().item() for p in hf.parameters())
    for name, param in ours.named_parameters():
        expected = hf_params[official_to_hf({name: None}).popitem()[0]].grad
        if expected.norm() < 1e-5 * scale:
            # Exactly zero in exact arithmetic (a key bias shifts every score of a row alike,
            # which softmax ignores): both sides hold rounding noise only.
            assert param.grad.norm() < 1e-5 * scale, name
        else:
            # Gradients sum over many more terms than logits (measured worst: 1.1e-5).
            assert_close(param.grad, expected, factor=10)
    ours_sd = ours.state_dict()
    converted = hf_to_official(hf.state_dict())
    bn_keys = [k for k in ours_sd if ".bn.running_" in k]
    assert len(bn_keys) == 2 * 3 * sum(SMALL["DEPTH"])
    for key in bn_keys:
        # The forward updated the statistics (batch statistics were used) identically in both.
        assert not torch.equal(ours_sd[key], before[key])
        assert_close(ours_sd[key], converted[key])
    for key in (k for k in ours_sd if k.endswith("num_batches_tracked")):
        assert ours_sd[key].item() == converted[key].item() == 8


def test_cvt13_converted_from_hf_gives_the_same_logits():
    spec = get_spec("cvt-13")
    spec["DROP_PATH_RATE"] = [0.0, 0.0, 0.0]
    hf = make_hf(spec, num_classes=1000).eval()
    ours = make_ours_from(hf, spec, "official", num_classes=1000).eval()
    # The full-size weights are the point here; a 112 x 112 image keeps the CPU time small.
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        assert_close(ours(x), hf_logits(hf, x))


def test_key_round_trip_is_exact_both_ways():
    spec = small_spec()
    hf_sd = make_hf(spec).state_dict()
    official = hf_to_official(hf_sd)
    ours_keys = list(build_model(spec, NUM_CLASSES, act="gelu").state_dict())
    assert sorted(official) == sorted(ours_keys)
    back = official_to_hf(official)
    assert list(back) == list(hf_sd)
    assert all(back[k] is hf_sd[k] for k in hf_sd)
    ours_sd = build_model(spec, NUM_CLASSES).state_dict()
    assert official_to_hf(ours_sd).keys() == hf_sd.keys()
    again = hf_to_official(official_to_hf(ours_sd))
    assert list(again) == list(ours_sd)
    assert all(again[k] is ours_sd[k] for k in ours_sd)


def test_unknown_keys_are_named_in_the_conversion_error():
    with pytest.raises(ValueError, match="'stage0.blocks.0.attn.qkv.weight'"):
        official_to_hf({"stage0.blocks.0.attn.qkv.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="'cvt.encoder.stages.0.pooler.weight'"):
        hf_to_official({"cvt.encoder.stages.0.pooler.weight": torch.zeros(1)})


def test_hf_config_refuses_what_the_hf_port_cannot_run():
    with pytest.raises(ValueError, match="quick_gelu"):
        hf_config_from_spec(small_spec(), act="quick_gelu")
    with pytest.raises(ValueError, match="'avg'"):
        hf_config_from_spec(small_spec(QKV_PROJ_METHOD=["dw_bn", "avg", "dw_bn"]))
    with pytest.raises(ValueError, match="DEPTH"):
        hf_config_from_spec(small_spec(DEPTH=[1, 2]))


def test_hf_config_carries_every_spec_field():
    spec = small_spec(KERNEL_QKV=[5, 3, 3], PADDING_Q=[2, 1, 1], PADDING_KV=[2, 1, 1], STRIDE_KV=[1, 2, 2],
                      ATTN_DROP_RATE=[0.0, 0.1, 0.0], DROP_RATE=[0.0, 0.0, 0.2],
                      DROP_PATH_RATE=[0.0, 0.0, 0.3], MLP_RATIO=[4.0, 2.0, 3.0])
    config = hf_config_from_spec(spec, 7)
    assert list(config.patch_sizes) == [7, 3, 3] and list(config.patch_stride) == [4, 2, 2]
    assert list(config.patch_padding) == [2, 1, 1] and list(config.embed_dim) == [16, 32, 48]
    assert list(config.num_heads) == [1, 2, 3] and list(config.depth) == [1, 2, 3]
    assert list(config.mlp_ratio) == [4.0, 2.0, 3.0]
    assert list(config.attention_drop_rate) == [0.0, 0.1, 0.0] and list(config.drop_rate) == [0.0, 0.0, 0.2]
    assert list(config.drop_path_rate) == [0.0, 0.0, 0.3]
    assert list(config.kernel_qkv) == [5, 3, 3] and list(config.padding_q) == [2, 1, 1]
    assert list(config.padding_kv) == [2, 1, 1] and list(config.stride_kv) == [1, 2, 2]
    assert list(config.stride_q) == [1, 1, 1] and list(config.cls_token) == [False, False, True]
    assert list(config.qkv_bias) == [True, True, True] and config.num_labels == 7
    assert config.num_channels == 3 and config.layer_norm_eps == 1e-5


@pytest.mark.parametrize("file_name", ["pytorch_model.bin", "model.safetensors", "weights.pth"])
def test_hf_files_load_through_load_checkpoint(tmp_path, file_name):
    spec = small_spec()
    hf = make_hf(spec).eval()
    path = tmp_path / file_name
    if file_name.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(hf.state_dict(), str(path))
    else:
        torch.save(hf.state_dict(), path)
    ours = build_model(spec, NUM_CLASSES, act="gelu").eval()
    report = load_checkpoint(ours, path)
    assert report.format == "huggingface"
    assert not report.missing and not report.unexpected
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        assert_close(ours(x), hf_logits(hf, x))


def test_hf_model_directory_from_save_pretrained_loads(tmp_path):
    spec = small_spec()
    hf = make_hf(spec).eval()
    hf.save_pretrained(tmp_path / "cvt-small")
    ours = build_model(spec, NUM_CLASSES, act="gelu").eval()
    load_checkpoint(ours, tmp_path / "cvt-small")
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        assert_close(ours(x), hf_logits(hf, x))


def test_our_weights_converted_to_hf_give_the_same_logits():
    spec = small_spec()
    ours = build_model(spec, NUM_CLASSES, act="gelu", backend="official")
    randomize_(ours)
    ours.eval()
    hf = CvtForImageClassification(hf_config_from_spec(spec, NUM_CLASSES)).eval()
    hf.load_state_dict(official_to_hf(ours.state_dict()), strict=True)
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        assert_close(hf_logits(hf, x), ours(x))
