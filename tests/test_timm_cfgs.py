"""Issue 26: every timm pretrained tag's data config reproduces the official test transform of its config.

A timm user evaluates with `timm.data.resolve_data_config(model=...)` + `create_transform`
(validate.py does); the official code evaluates with its yaml's TEST section (resize to
size / 0.875 and center crop at 224, a plain resize to 384x384 at 384; bicubic; ImageNet
mean/std). For each tag, both transforms are applied to the same images, square and not,
and must give the same tensors: a wrong input size, crop, crop mode, interpolation, mean or
std in any tag shows as a difference.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm")
from PIL import Image  # noqa: E402

import cvt_fast.timm_models  # noqa: E402,F401  (registers the cvt models with timm)
from cvt_fast.config import load_config  # noqa: E402
from cvt_fast.training.data import build_test_transform  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "experiments" / "imagenet" / "cvt"

# Each tag and the official config whose TEST section its weights were evaluated with.
OFFICIAL_CONFIG_OF_TAG = {
    "cvt_13.ms_in1k": "cvt-13-224x224.yaml",
    "cvt_13_384.ms_in1k": "cvt-13-384x384.yaml",
    "cvt_13_384.ms_in22k_ft_in1k": "cvt-13-384x384.yaml",
    "cvt_21.ms_in1k": "cvt-21-224x224.yaml",
    "cvt_21_384.ms_in1k": "cvt-21-384x384.yaml",
    "cvt_21_384.ms_in22k_ft_in1k": "cvt-21-384x384.yaml",
    "cvt_w24_384.ms_in22k_ft_in1k": "cvt-w24-384x384.yaml",
}


def test_every_registered_tag_is_checked_here():
    tags = set(timm.list_models("cvt_*", pretrained=True))  # 'arch.tag' for every pretrained tag
    assert tags == set(OFFICIAL_CONFIG_OF_TAG)


def _images() -> list:
    rng = np.random.default_rng(0)
    # Landscape, portrait, square and odd sizes: a squash and a centre crop differ on all but squares.
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in
            ((375, 500), (500, 333), (300, 300), (211, 397))]


@pytest.mark.parametrize("tag", sorted(OFFICIAL_CONFIG_OF_TAG))
def test_the_tags_timm_eval_transform_equals_the_official_test_transform(tag):
    pretrained_cfg = timm.models.get_pretrained_cfg(tag).to_dict()
    data_config = timm.data.resolve_data_config({}, pretrained_cfg=pretrained_cfg)
    timm_transform = timm.data.create_transform(**data_config, is_training=False)
    official = build_test_transform(load_config(str(CONFIGS / OFFICIAL_CONFIG_OF_TAG[tag])))
    for image in _images():
        expected = official(image)
        got = timm_transform(image)
        assert got.shape == expected.shape, f"{tag}: timm gives {tuple(got.shape)}, the official {tuple(expected.shape)}"
        assert torch.allclose(got, expected, atol=1e-5), (
            f"{tag} on a {image.size} image: max difference {(got - expected).abs().max():.3g} "
            f"(timm data config {data_config})")
