"""CvT in timm's registry (cvt_fast/timm_models.py, timm_hook.py, timm_run.py), used the way a timm
user would: list_models, create_model with timm's keyword arguments, resolve_data_config and
create_transform, checkpoint_path with official and Hugging Face files, pretrained files through
the filter, timm's optimizer factory, and a timm-style script run through cvt_fast.timm_run."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import cvt_fast
from cvt_fast.hf_convert import official_to_hf
from cvt_fast.model import ConvolutionalVisionTransformer, DropPath
from tiny_models import randomize_batch_norms

timm = pytest.importorskip("timm")

NAMES = ["cvt_13", "cvt_13_384", "cvt_21", "cvt_21_384", "cvt_w24_384"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def timm_cvt13():
    """timm.create_model("cvt_13"): built once (initialising CvT-13 takes seconds on a small CPU)."""
    return timm.create_model("cvt_13")


@pytest.fixture(scope="module")
def cvt13_weights():
    """A CvT-13 state dict with random weights and BatchNorm statistics (official keys)."""
    torch.manual_seed(1)
    return randomize_batch_norms(cvt_fast.create_model("cvt-13")).state_dict()


def assert_same_weights(model, state_dict):
    loaded = model.state_dict()
    assert loaded.keys() == state_dict.keys()
    for key, value in state_dict.items():
        assert torch.equal(loaded[key], value), key


def test_timm_lists_the_cvt_models_and_their_pretrained_tags():
    assert timm.list_models("cvt*") == NAMES
    assert timm.list_models("cvt*", pretrained=True) == [
        "cvt_13.ms_in1k", "cvt_13_384.ms_in1k", "cvt_13_384.ms_in22k_ft_in1k", "cvt_21.ms_in1k",
        "cvt_21_384.ms_in1k", "cvt_21_384.ms_in22k_ft_in1k", "cvt_w24_384.ms_in22k_ft_in1k"]
    cfg = timm.models.get_pretrained_cfg("cvt_w24_384.ms_in22k_ft_in1k")
    assert cfg.input_size == (3, 384, 384) and cfg.hf_hub_id == "microsoft/cvt-w24-384-22k"


def test_create_model_takes_timms_arguments():
    # The call timm's train.py makes (None values are dropped by create_model).
    model = timm.create_model("cvt_13", pretrained=False, in_chans=1, num_classes=10, drop_rate=0.0,
                              drop_path_rate=0.2, drop_block_rate=None, global_pool=None, bn_momentum=None,
                              bn_eps=None, scriptable=False, checkpoint_path=None)
    assert isinstance(model, ConvolutionalVisionTransformer) and model.num_classes == 10
    assert model.stage0.patch_embed.proj.in_channels == 1 and model.pretrained_cfg["crop_pct"] == 0.875
    assert model.get_classifier() is model.head and model.head.out_features == 10
    rates = [m.rate for m in model.modules() if isinstance(m, DropPath)]
    assert rates and max(rates) == pytest.approx(0.2) and all(not isinstance(m, DropPath)
                                                              for m in model.stage0.modules())
    model.eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 1, 64, 64))
        assert logits.shape == (2, 10)
        features = model.forward_features(torch.zeros(1, 1, 64, 64))  # cls token + 4x4 grid, unpooled
        assert features.shape == (1, 1 + 16, 384)
        assert torch.equal(model.forward_head(features, pre_logits=True), features[:, 0])
    model.reset_classifier(4)
    assert model.head.out_features == 4
    with pytest.raises(ValueError, match="global_pool must be one of"):
        timm.create_model("cvt_13", global_pool="max")


@pytest.mark.parametrize("name, official_yaml", [("cvt_13", "cvt-13-224x224.yaml"), ("cvt_21_384", "cvt-21-384x384.yaml")])
def test_timm_data_config_reproduces_the_official_test_transform(name, official_yaml, timm_cvt13):
    from cvt_fast.config import load_config
    from cvt_fast.training.data import build_test_transform

    if name == "cvt_13":
        config = timm.data.resolve_data_config({}, model=timm_cvt13)
    else:  # the registry's config, without building CvT-21
        config = timm.data.resolve_data_config({}, pretrained_cfg=timm.models.get_pretrained_cfg(name).to_dict())
    if name == "cvt_13" and hasattr(timm.data, "resolve_input_data_config"):  # validate.py's resolver
        assert timm.data.resolve_input_data_config(timm_cvt13, {}, use_test_size=True) == config
    size = 224 if name == "cvt_13" else 384
    assert config["input_size"] == (3, size, size) and config["interpolation"] == "bicubic"
    assert config["mean"] == (0.485, 0.456, 0.406) and config["std"] == (0.229, 0.224, 0.225)
    timm_transform = timm.data.create_transform(**config)
    official_transform = build_test_transform(load_config(os.path.join(REPO, "experiments/imagenet/cvt", official_yaml)))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (333, 500, 3), dtype=np.uint8))
    assert torch.equal(timm_transform(image), official_transform(image))


def test_checkpoint_path_loads_official_zoo_and_hugging_face_files(tmp_path, cvt13_weights):
    from safetensors.torch import save_file

    official = tmp_path / "CvT-13-224x224-IN-1k.pth"
    # The official trainer's layout: {'model': name, 'state_dict': weights}, DDP prefixes on the keys.
    torch.save({"model": "cls_cvt", "state_dict": {f"module.{k}": v for k, v in cvt13_weights.items()}}, official)
    hugging_face = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in official_to_hf(cvt13_weights).items()}, str(hugging_face))
    for path in (official, hugging_face):
        model = timm.create_model("cvt_13", pretrained=False, checkpoint_path=str(path))
        assert_same_weights(model, cvt13_weights)
    # validate.py's --checkpoint: timm's load_checkpoint into an existing model.
    with torch.no_grad():
        for t in model.state_dict().values():
            t.zero_()
    for path in (official, hugging_face):
        timm.models.load_checkpoint(model, str(path))
        assert_same_weights(model, cvt13_weights)


def test_pretrained_file_goes_through_the_filter_and_a_new_head(tmp_path, cvt13_weights):
    hugging_face = tmp_path / "pytorch_model.bin"
    torch.save(official_to_hf(cvt13_weights), hugging_face)
    model = timm.create_model("cvt_13", pretrained=True, pretrained_cfg_overlay=dict(file=str(hugging_face)))
    assert_same_weights(model, cvt13_weights)
    finetune = timm.create_model("cvt_13", pretrained=True, num_classes=7,
                                 pretrained_cfg_overlay=dict(file=str(hugging_face)))
    assert finetune.head.out_features == 7
    backbone = {k: v for k, v in cvt13_weights.items() if not k.startswith("head.")}
    assert all(torch.equal(finetune.state_dict()[k], v) for k, v in backbone.items())


def test_timm_optimizer_factory_leaves_norms_biases_and_cls_token_undecayed(timm_cvt13):
    import timm.optim

    model = timm_cvt13
    optimizer = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    undecayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0.0 for p in g["params"]}
    assert "stage2.cls_token" in undecayed
    assert {"stage2.blocks.0.attn.conv_proj_q.bn.weight", "stage2.blocks.0.norm1.weight", "head.bias"} <= undecayed
    assert {"stage2.blocks.0.attn.conv_proj_q.conv.weight", "stage2.blocks.0.mlp.fc1.weight", "head.weight"} <= decayed
    assert decayed.isdisjoint(undecayed) and len(decayed | undecayed) == len(names)


def test_timm_run_executes_a_timm_style_script_with_the_cvt_names(tmp_path, capsys, cvt13_weights):
    from cvt_fast.timm_run import main

    checkpoint = tmp_path / "cvt13.pth"
    torch.save(cvt13_weights, checkpoint)
    script = tmp_path / "validate_like.py"
    # What timm's validate.py does with the model, in a few lines.
    script.write_text(textwrap.dedent("""
        import argparse, torch, timm
        parser = argparse.ArgumentParser()
        parser.add_argument("--model"); parser.add_argument("--checkpoint")
        args = parser.parse_args()
        model = timm.create_model(args.model, pretrained=False)
        timm.models.load_checkpoint(model, args.checkpoint)
        config = timm.data.resolve_data_config({}, model=model)
        with torch.no_grad():
            logits = model.eval()(torch.zeros(1, *config["input_size"]))
        print("ran", args.model, tuple(logits.shape), config["crop_pct"])
    """))
    assert main([str(script), "--model", "cvt_13", "--checkpoint", str(checkpoint)]) == 0
    assert "ran cvt_13 (1, 1000) 0.875" in capsys.readouterr().out
    assert main([str(tmp_path / "missing.py")]) == 2


def test_registration_works_in_either_import_order_and_import_cvt_fast_leaves_timm_alone():
    # "probed first": transformers (and others) ask importlib.util.find_spec("timm") whether timm is
    # installed, without importing it; that must not use up the hook (it did, and CI's timm tests
    # found an empty registry).
    code = {"cvt_fast first": "import sys, cvt_fast; light = 'timm' not in sys.modules; import timm",
            "timm first": "import timm, cvt_fast; light = True",
            "probed first": "import sys, importlib.util, cvt_fast; importlib.util.find_spec('timm'); "
                            "importlib.util.find_spec('timm'); light = 'timm' not in sys.modules; import timm"}
    check = "; print(light, timm.is_model('cvt_13'), timm.models.model_entrypoint('cvt_13').__module__)"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for order, imports in code.items():
        out = subprocess.run([sys.executable, "-c", imports + check], env=env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["True", "True", "cvt_fast.timm_models"], (order, out.stdout, out.stderr)
