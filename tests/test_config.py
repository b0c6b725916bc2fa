"""Configs: the official schema loads unchanged; typos are errors that name the key."""
import glob
import os

import pytest

import cvt_fast
from cvt_fast.config import get_default_config, load_config
from cvt_fast.specs import MODEL_SPECS

CONFIGS = sorted(glob.glob("experiments/imagenet/cvt/*.yaml"))


def test_all_five_official_configs_are_present():
    names = {p.split("/")[-1] for p in CONFIGS}
    assert names == {"cvt-13-224x224.yaml", "cvt-13-384x384.yaml", "cvt-21-224x224.yaml",
                     "cvt-21-384x384.yaml", "cvt-w24-384x384.yaml"}


@pytest.mark.parametrize("path", CONFIGS)
def test_official_config_loads_with_the_official_values(path):
    cfg = load_config(path)
    variant = "-".join(path.split("/")[-1].split("-")[:2])
    for key, value in MODEL_SPECS[variant].items():
        assert list(cfg.MODEL.SPEC[key]) == list(value) if isinstance(value, list) else cfg.MODEL.SPEC[key] == value
    size = int(path.split("x")[-1].split(".")[0])
    assert list(cfg.TRAIN.IMAGE_SIZE) == [size, size] and list(cfg.TEST.IMAGE_SIZE) == [size, size]
    assert cfg.TRAIN.OPTIMIZER == "adamW" and list(cfg.TRAIN.WITHOUT_WD_LIST) == ["bn", "bias", "ln"]
    assert cfg.TRAIN.WD == (0.1 if "w24" in path else 0.05)
    assert cfg.TRAIN.LR * 256 / cfg.TRAIN.BATCH_SIZE_PER_GPU == pytest.approx(2.5e-4)
    args = cfg.TRAIN.LR_SCHEDULER.ARGS
    assert (args.sched, args.warmup_epochs, args.warmup_lr, args.min_lr, args.cooldown_epochs) == (
        "cosine", 5, 1e-6, 1e-5, 10)
    assert cfg.LOSS.LABEL_SMOOTHING == 0.1 and cfg.AUG.MIXUP == 0.8 and cfg.AUG.MIXCUT == 1.0
    assert cfg.AUG.TIMM_AUG.AUTO_AUGMENT == "rand-m9-mstd0.5-inc1" and cfg.AUG.TIMM_AUG.RE_PROB == 0.25
    assert cfg.is_frozen()


def test_command_line_overrides_apply_and_typos_are_named():
    cfg = load_config(CONFIGS[0], ["TRAIN.LR", "0.01", "MODEL.SPEC.DEPTH", "[1, 1, 1]"])
    assert cfg.TRAIN.LR == 0.01 and list(cfg.MODEL.SPEC.DEPTH) == [1, 1, 1]
    with pytest.raises(ValueError, match=r"TRAIN\.BATCH_SIZE_PER_GUP.*did you mean TRAIN\.BATCH_SIZE_PER_GPU"):
        load_config(CONFIGS[0], ["TRAIN.BATCH_SIZE_PER_GUP", "8"])
    with pytest.raises(ValueError, match="pairs"):
        load_config(CONFIGS[0], ["TRAIN.LR"])


def test_scheduler_args_take_the_keys_the_trainer_reads_and_name_any_other():
    cfg = load_config(None, ["TRAIN.LR_SCHEDULER.ARGS.warmup_epochs", "3"])  # not in the defaults: still accepted
    assert cfg.TRAIN.LR_SCHEDULER.ARGS.warmup_epochs == 3
    with pytest.raises(ValueError, match=r"unknown key TRAIN\.LR_SCHEDULER\.ARGS\.t_in_epochs;.* the cosine "
                                         r"schedule reads sched, epochs, warmup_epochs"):
        load_config(CONFIGS[0], ["TRAIN.LR_SCHEDULER.ARGS.t_in_epochs", "False"])


@pytest.mark.parametrize("key,value,message", [
    ("MODEL.BACKEND", "bogus", r"MODEL\.BACKEND='bogus'; expected one of official, auto, reference"),
    ("MODEL.ACT", "relu", r"MODEL\.ACT='relu'; expected one of quick_gelu, gelu"),
    ("AMP.DTYPE", "fp8", r"AMP\.DTYPE='fp8'; expected one of bfloat16"),  # with AMP.ENABLED False too
])
def test_bad_values_are_named_by_their_key_even_when_the_feature_is_off(key, value, message):
    assert load_config(CONFIGS[0], ["AMP.ENABLED", "False"]).AMP.ENABLED is False
    with pytest.raises(ValueError, match=message):
        load_config(CONFIGS[0], ["AMP.ENABLED", "False", key, value])


def test_typo_in_a_yaml_file_names_the_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("MODEL:\n  SPEC:\n    DEPHT: [1, 2, 10]\n")
    with pytest.raises(ValueError, match=r"MODEL\.SPEC\.DEPHT in .*bad\.yaml.*did you mean MODEL\.SPEC\.DEPTH"):
        load_config(str(bad))


def test_base_inheritance_and_missing_file(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text(f"BASE: ['{os.path.abspath(CONFIGS[0])}']\nTRAIN:\n  LR: 0.5\n")
    cfg = load_config(str(child))
    assert cfg.TRAIN.LR == 0.5 and cfg.TRAIN.BATCH_SIZE_PER_GPU == 256
    with pytest.raises(FileNotFoundError, match="nowhere.yaml"):
        load_config(str(tmp_path / "nowhere.yaml"))


def test_not_yaml_is_an_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("MODEL: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(str(bad))


def test_defaults_hold_the_cvt_fast_keys():
    cfg = get_default_config()
    assert cfg.MODEL.BACKEND == "auto" and cfg.MODEL.ACT == "quick_gelu" and cfg.AMP.DTYPE == "bfloat16"
    assert cvt_fast.get_default_config().TRAIN.EMA.ENABLED is False
