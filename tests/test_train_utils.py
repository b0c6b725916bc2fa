"""Helpers for the tests of cvt_fast.train / cvt_fast.test (imported by the other
tests/test_train_*.py files), plus tests of the helpers' own assumptions.

Everything is sized for a shared 2-core CPU: 16x16 images, a 3-stage CvT with dims
[16, 32, 48], one block per stage, a handful of steps, num_workers 0, one thread.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

TINY_SPEC = [
    "MODEL.SPEC.PATCH_SIZE", "[3, 3, 3]",
    "MODEL.SPEC.PATCH_STRIDE", "[2, 2, 2]",     # 16x16 -> 8x8 -> 4x4 -> 2x2 tokens
    "MODEL.SPEC.PATCH_PADDING", "[1, 1, 1]",
    "MODEL.SPEC.DIM_EMBED", "[16, 32, 48]",
    "MODEL.SPEC.NUM_HEADS", "[1, 2, 3]",
    "MODEL.SPEC.DEPTH", "[1, 1, 1]",
    "MODEL.SPEC.MLP_RATIO", "[2.0, 2.0, 2.0]",
    "MODEL.SPEC.DROP_PATH_RATE", "[0.0, 0.0, 0.0]",
]


def make_image_folder(root: Path, classes: int = 3, per_class: int = 8, size: int = 16, seed: int = 0) -> Path:
    """A learnable synthetic ImageFolder: class c is a bright band at a class-specific place, plus noise."""
    from PIL import Image

    rng = np.random.RandomState(seed)
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.randint(0, 60, size=(size, size, 3)).astype(np.uint8)
            band = slice(c * size // classes, (c + 1) * size // classes)
            img[band, :, c % 3] = 255
            Image.fromarray(img).save(folder / f"{i:03d}.png")
    return root


def make_dataset(root: Path, classes: int = 3, train_per_class: int = 8, val_per_class: int = 4) -> Path:
    make_image_folder(root / "train", classes, train_per_class, seed=0)
    make_image_folder(root / "val", classes, val_per_class, seed=1)
    return root


def tiny_overrides(data_root: Path, output_dir: Path, classes: int = 3, **extra: object) -> list[str]:
    """Config overrides for a tiny, deterministic CPU run on `data_root` (digits YAML as the base)."""
    opts = [
        "OUTPUT_DIR", str(output_dir),
        "DATASET.DATASET", "imagenet",
        "DATASET.ROOT", str(data_root),
        "MODEL.NUM_CLASSES", str(classes),
        "MODEL.BACKEND", "reference",
        "TRAIN.IMAGE_SIZE", "[16, 16]",
        "TEST.IMAGE_SIZE", "[16, 16]",
        "TRAIN.BATCH_SIZE_PER_GPU", "8",
        "TEST.BATCH_SIZE_PER_GPU", "8",
        "TRAIN.END_EPOCH", "2",
        "TRAIN.LR_SCHEDULER.ARGS.warmup_epochs", "1",
        "WORKERS", "0",
        *TINY_SPEC,
    ]
    for key, value in extra.items():
        opts += [key.replace("__", "."), str(value)]
    return opts


def load_tiny_config(data_root: Path, output_dir: Path, **extra: object):
    from cvt_fast.config import load_config

    return load_config(str(REPO / "experiments/digits/cvt-digits.yaml"), tiny_overrides(data_root, output_dir, **extra))


def subprocess_env() -> dict[str, str]:
    """Environment of child pythons: one thread (bit-exact comparisons), the repo importable."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


@pytest.fixture
def one_thread():
    """Deterministic, and much faster than two threads on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def state_dicts_max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    worst = 0.0
    for k in a:
        if a[k].is_floating_point():
            worst = max(worst, (a[k].double() - b[k].double()).abs().max().item())
        else:
            assert torch.equal(a[k], b[k]), k
    return worst


def test_tiny_config_builds_a_tiny_model(tmp_path):
    from cvt_fast.model import build_model_from_config

    cfg = load_tiny_config(tmp_path / "data", tmp_path / "out")
    model = build_model_from_config(cfg)
    assert sum(p.numel() for p in model.parameters()) < 60_000
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 3)


def test_synthetic_folder_has_the_requested_layout(tmp_path):
    root = make_dataset(tmp_path)
    assert sorted(p.name for p in (root / "train").iterdir()) == ["class_0", "class_1", "class_2"]
    assert len(list((root / "val" / "class_2").glob("*.png"))) == 4
    assert sys.executable
