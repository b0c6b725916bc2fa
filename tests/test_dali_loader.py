"""DATA.LOADER dali in DALI's CPU mode (device_id=None): the batches the trainer gets.

A tiny JPEG set whose every image is one flat grey that encodes its index lets a test read back
which file each output came from (a random crop and a resize of a flat picture keep its value):
the order, the label alignment, the DDP shards and a mid-epoch resume are checked file by file
against the EpochSampler. The digits data checks determinism for a seed on real pictures; the
official ImageNet recipe (RandAugment m9, then the trainer's random erasing on the batch) runs once
on textured JPEGs. The loader yields uint8 CHW images, as the torch loader does.
Everything here skips where nvidia-dali is not installed.
"""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from cvt_fast.training import dali_loader
from cvt_fast.training.data import EpochSampler, build_train_loader, set_loader_epoch
from cvt_fast.training.device_input import build_device_input
from test_train_utils import REPO, load_tiny_config, make_dataset, one_thread  # noqa: F401 (fixture)

needs_dali = pytest.mark.skipif(dali_loader.unavailable_reason() is not None,
                                reason=str(dali_loader.unavailable_reason()))
GREY0, GREY_STEP = 20, 8


def _grey_set(root, classes=3, per_class=5, size=(24, 18)):
    """class_c/NNN.jpg, each one flat grey GREY0 + GREY_STEP * (its index in the scan order)."""
    from PIL import Image

    index = 0
    for c in range(classes):
        (root / "train" / f"class_{c}").mkdir(parents=True)
        for i in range(per_class):
            grey = GREY0 + GREY_STEP * index
            Image.new("RGB", size, (grey, grey, grey)).save(root / "train" / f"class_{c}" / f"{i:03d}.jpg",
                                                            quality=95)
            index += 1
    make_dataset(root / "unused")  # a val set for the config's sake
    (root / "unused" / "val").rename(root / "val")
    return root


def _file_index(x: torch.Tensor, cfg) -> list[int]:
    """Which grey file each (uint8) image of a batch is."""
    grey = x.float().mean(dim=(1, 2, 3))
    return [round((g - GREY0) / GREY_STEP) for g in grey.tolist()]


def _grey_config(tmp_path, **extra):
    data = _grey_set(tmp_path / "data")
    return load_tiny_config(data, tmp_path / "out", **{"DATA__LOADER": "dali", "TRAIN__BATCH_SIZE_PER_GPU": 4,
                                                       "WORKERS": 1, **extra})


@needs_dali
def test_dali_cpu_batches_are_the_samplers_files_with_their_labels(tmp_path):
    cfg = _grey_config(tmp_path)
    loader = build_train_loader(cfg)
    assert isinstance(loader, dali_loader.DaliTrainLoader) and len(loader) == 3  # 15 images, batches of 4
    set_loader_epoch(loader, int(cfg.SEED), 1, 0)
    order = list(loader.sampler)
    seen, labels = [], []
    for x, y, unreadable in loader:
        assert x.shape == (4, 3, 16, 16) and x.dtype == torch.uint8 and y.dtype == torch.int64
        assert torch.equal(unreadable, torch.full((4,), -1))
        seen += _file_index(x, cfg)
        labels += y.tolist()
    assert seen == order[:12]  # the last partial batch is dropped, as the torch loader does
    assert labels == [loader.dataset.targets[i] for i in seen]
    # The next epoch: another permutation, the same pipeline.
    set_loader_epoch(loader, int(cfg.SEED), 2, 0)
    again = [i for x, _, _ in loader for i in _file_index(x, cfg)]
    assert again == list(loader.sampler)[:12] and again != seen


@needs_dali
def test_dali_cpu_ranks_read_their_shards_and_a_resume_reads_the_rest_of_the_epoch(tmp_path):
    cfg = _grey_config(tmp_path, TRAIN__BATCH_SIZE_PER_GPU=2)
    shards = []
    for rank in range(2):
        loader = build_train_loader(cfg, rank, 2)
        set_loader_epoch(loader, int(cfg.SEED), 3, rank)
        shards.append([i for x, _, _ in loader for i in _file_index(x, cfg)])
    full = EpochSampler(15, shuffle=True, seed=int(cfg.SEED))
    full.set_epoch(3)
    padded = list(full) + list(full)[:1]
    assert shards[0] == padded[0::2] and shards[1] == padded[1::2]  # 8 each: padded like DistributedSampler
    # Resume at batch 1 of rank 1: exactly the files the uninterrupted rank read from there.
    resumed = build_train_loader(cfg, 1, 2)
    set_loader_epoch(resumed, int(cfg.SEED), 3, 1, start_batch=1)
    assert len(resumed) == 4 - 1
    assert [i for x, _, _ in resumed for i in _file_index(x, cfg)] == shards[1][2:]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from cvt_fast.training.digits import export_digits

    return export_digits(tmp_path_factory.mktemp("digits") / "digits")


@needs_dali
def test_dali_cpu_on_digits_is_deterministic_for_a_seed(digits, tmp_path):
    from cvt_fast.config import load_config

    def first_batches(seed: int) -> list[torch.Tensor]:
        cfg = load_config(str(REPO / "experiments/digits/cvt-digits.yaml"),
                          ["DATASET.ROOT", str(digits), "DATA.LOADER", "dali", "SEED", str(seed), "WORKERS", "2"])
        loader = build_train_loader(cfg)
        set_loader_epoch(loader, seed, 0, 0)
        batches = []
        for x, y, _ in loader:
            assert x.shape == (64, 3, 32, 32) and y.shape == (64,)
            assert torch.equal(y, torch.tensor([loader.dataset.targets[i] for i in
                                                list(loader.sampler)[64 * len(batches):64 * (len(batches) + 1)]]))
            batches.append(x)
            if len(batches) == 3:
                break
        return batches

    a, b, c = first_batches(0), first_batches(0), first_batches(1)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not torch.equal(a[0], c[0])


@needs_dali
def test_dali_cpu_runs_the_official_recipe_randaugment_and_erasing(tmp_path):
    import sys

    from cvt_fast.config import load_config

    sys.path.insert(0, str(REPO))
    from bench.data import synthetic_image

    from PIL import Image

    rng = np.random.RandomState(0)
    for c in range(2):
        (tmp_path / "train" / f"c{c}").mkdir(parents=True)
        for i in range(4):
            synthetic_image(rng, 64, 48).save(tmp_path / "train" / f"c{c}" / f"{i}.jpg", quality=92)
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "c0" / "x.png")
    official = str(REPO / "experiments/imagenet/cvt/cvt-13-224x224.yaml")
    common = ["DATASET.ROOT", str(tmp_path), "TRAIN.IMAGE_SIZE", "[32, 32]", "TRAIN.BATCH_SIZE_PER_GPU", "8",
              "DATA.LOADER", "dali", "WORKERS", "1"]
    cfg = load_config(official, common + ["AUG.TIMM_AUG.RE_PROB", "1.0"])
    assert cfg.AUG.TIMM_AUG.AUTO_AUGMENT == "rand-m9-mstd0.5-inc1"
    loader = build_train_loader(cfg)
    assert loader.recipe.magnitude == 9
    set_loader_epoch(loader, 0, 0, 0)
    (x, y, _), = list(loader)
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.uint8 and x.is_contiguous()
    assert y.tolist() == [loader.dataset.targets[i] for i in list(loader.sampler)[:8]]
    # The trainer's step on the device: normalised, then erased (probability 1 here), one
    # rectangle of 2% to 1/3 of each image (timm's range, its sides rounded: up to 4% more at
    # 32x32; an image where 10 tries found no rectangle that fits stays whole).
    device_input = build_device_input(cfg, torch.device("cpu"))
    plain = build_device_input(load_config(official, common + ["AUG.TIMM_AUG.RE_PROB", "0.0"]),
                               torch.device("cpu"))(x)
    random.seed(0)
    out = device_input(x)
    assert torch.isfinite(out).all()
    changed = (out != plain).any(dim=1).float().mean(dim=(1, 2))
    assert all(0.0 <= share <= 1 / 3 + 0.04 for share in changed.tolist()), changed
    assert sum(0.02 - 0.005 <= share for share in changed.tolist()) >= 5, changed


@needs_dali
def test_training_runs_on_the_dali_loader(tmp_path, one_thread):
    from cvt_fast.training import distributed as dist_utils
    from cvt_fast.training.loop import Trainer

    data = make_dataset(tmp_path / "data")
    cfg = load_tiny_config(data, tmp_path / "out", DATA__LOADER="dali", TRAIN__END_EPOCH=1, WORKERS=1)
    trainer = Trainer(cfg, tmp_path / "out" / "run", dist_utils.DistInfo(0, 1, 0, torch.device("cpu")))
    assert isinstance(trainer.train_loader, dali_loader.DaliTrainLoader)
    record = trainer.fit()
    assert trainer.pos.global_step == 3 and math.isfinite(record["train_loss"])
    assert 0.0 <= record["data_wait_fraction"] < 1.0


@pytest.mark.parametrize("key,value,match", [
    ("AUG.TIMM_AUG.AUTO_AUGMENT", "original", "increasing RandAugment only"),
    ("AUG.TIMM_AUG.VFLIP", "0.5", "VFLIP"),
])
def test_dali_recipe_refuses_what_it_does_not_implement(tmp_path, key, value, match):
    from cvt_fast.config import load_config

    cfg = load_config(str(REPO / "experiments/imagenet/cvt/cvt-13-224x224.yaml"), [key, value])
    with pytest.raises(ValueError, match=match):
        dali_loader._Recipe(cfg)


def test_rand_augment_strings_and_a_missing_dali_are_clear_errors(tmp_path, monkeypatch):
    assert dali_loader.parse_rand_augment("rand-m9-mstd0.5-inc1") == 9
    assert dali_loader.parse_rand_augment("rand-m7-inc1") == 7
    with pytest.raises(ValueError, match="magnitude"):
        dali_loader.parse_rand_augment("rand-m12-inc1")
    with pytest.raises(ValueError, match="applies 2 ops"):
        dali_loader.parse_rand_augment("rand-n3-m9-inc1")
    monkeypatch.setattr(dali_loader, "unavailable_reason", lambda: "NVIDIA DALI is not installed (test)")
    data = make_dataset(tmp_path / "data")
    cfg = load_tiny_config(data, tmp_path / "out", DATA__LOADER="dali")
    with pytest.raises(ValueError, match=r"DATA.LOADER dali: NVIDIA DALI is not installed .*DATA.LOADER torch"):
        build_train_loader(cfg)
