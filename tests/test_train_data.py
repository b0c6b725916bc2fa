"""Data pipeline of the trainer: digits export, ImageFolder checks, transforms, sampler."""
from __future__ import annotations

import os

import pytest
import torch

from cvt_fast.training.data import (EpochSampler, ImageFolderDataset, build_test_transform, build_train_transform,
                                    build_train_loader, scan_image_folder)
from cvt_fast.training.digits import MANIFEST, export_digits
from test_train_utils import REPO, load_tiny_config, make_dataset, make_image_folder, one_thread  # noqa: F401


def test_digits_export_is_a_stratified_idempotent_image_folder(tmp_path):
    root = export_digits(tmp_path / "digits")
    counts = {split: {c: len(os.listdir(root / split / str(c))) for c in range(10)} for split in ("train", "val")}
    total = sum(sum(v.values()) for v in counts.values())
    assert total == 1797
    for c in range(10):  # ~20% of every class in val
        share = counts["val"][c] / (counts["val"][c] + counts["train"][c])
        assert 0.17 < share < 0.23
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folder left behind"
    png = next((root / "train" / "3").iterdir())
    before = png.stat().st_mtime_ns
    export_digits(root)  # second call: reuses, rewrites nothing
    assert png.stat().st_mtime_ns == before
    from PIL import Image
    assert Image.open(png).size == (8, 8)


def test_digits_export_refuses_a_foreign_non_empty_folder(tmp_path):
    (tmp_path / "digits").mkdir()
    (tmp_path / "digits" / "other.txt").write_text("x")
    with pytest.raises(ValueError, match=MANIFEST):
        export_digits(tmp_path / "digits")


def test_image_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        scan_image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is empty"):
        scan_image_folder(tmp_path / "empty")
    make_image_folder(tmp_path / "ds", classes=2, per_class=2)
    (tmp_path / "ds" / "class_9").mkdir()
    (tmp_path / "ds" / "class_9" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="class_9 has no images"):
        scan_image_folder(tmp_path / "ds")


def test_unreadable_images_are_reported_by_their_own_item_or_raise(tmp_path):
    make_image_folder(tmp_path, classes=2, per_class=3)
    broken = tmp_path / "class_0" / "001.png"
    broken.write_bytes(b"not a png")
    ds = ImageFolderDataset(tmp_path, transform=None, skip_unreadable=True)
    index = [p for p, _ in ds.samples].index(str(broken))
    img, target, unreadable = ds[index]
    assert unreadable == index and img.size == (16, 16) and target == 0  # the next file stands in
    assert ds[0][2] == -1
    strict = ImageFolderDataset(tmp_path, transform=None, skip_unreadable=False)
    with pytest.raises(ValueError, match="unreadable image .*001.png"):
        strict[index]


def test_test_transform_resizes_by_0_875_and_center_crops(tmp_path):
    from cvt_fast.config import load_config
    from PIL import Image

    cfg = load_config(str(REPO / "experiments/imagenet/cvt/cvt-13-224x224.yaml"),
                      ["TEST.IMAGE_SIZE", "[32, 32]"])
    t = build_test_transform(cfg)
    names = [type(s).__name__ for s in t.transforms]
    assert names[:2] == ["Resize", "CenterCrop"]
    assert t.transforms[0].size == int(32 / 0.875) and t.transforms[0].interpolation.value == "bicubic"
    out = t(Image.new("RGB", (50, 40), (200, 10, 10)))
    assert out.shape == (3, 32, 32)


def test_official_train_transform_is_timm_randaugment_ending_at_uint8():
    # Normalisation and random erasing run on the device (tests/test_train_device_input.py).
    from cvt_fast.config import load_config
    from PIL import Image

    cfg = load_config(str(REPO / "experiments/imagenet/cvt/cvt-13-224x224.yaml"), ["TRAIN.IMAGE_SIZE", "[32, 32]"])
    t = build_train_transform(cfg)
    text = repr(t)
    assert "RandAugment" in text and "MaybePILToTensor" in text and "bicubic" in text.lower()
    torch.manual_seed(0)
    out = t(Image.new("RGB", (40, 40), (20, 120, 10)))
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8


def test_epoch_sampler_order_is_a_function_of_seed_and_epoch():
    s = EpochSampler(10, shuffle=True, seed=3)
    s.set_epoch(1)
    a = list(s)
    s.set_epoch(1)
    assert list(s) == a and sorted(a) == list(range(10))
    s.set_epoch(2)
    assert list(s) != a
    s.set_epoch(1, start=4)
    assert list(s) == a[4:] and len(s) == 6


def test_epoch_sampler_shards_cover_the_epoch_like_distributed_sampler():
    full = EpochSampler(11, shuffle=True, seed=0)
    full.set_epoch(5)
    order = list(full)
    shards = []
    for rank in range(2):
        s = EpochSampler(11, shuffle=True, seed=0, rank=rank, world_size=2)
        s.set_epoch(5)
        shards.append(list(s))
    assert len(shards[0]) == len(shards[1]) == 6  # padded to a multiple of the world size
    padded = order + order[:1]
    assert shards[0] == padded[0::2] and shards[1] == padded[1::2]
    val = [list(EpochSampler(11, shuffle=False, rank=r, world_size=2, pad=False)) for r in range(2)]
    assert sorted(val[0] + val[1]) == list(range(11))


def test_batch_larger_than_dataset_is_an_error(tmp_path):
    make_dataset(tmp_path / "data", train_per_class=2)
    cfg = load_tiny_config(tmp_path / "data", tmp_path / "out", TRAIN__BATCH_SIZE_PER_GPU=16)
    with pytest.raises(ValueError, match="larger than the 6 training images"):
        build_train_loader(cfg)


# Issue 11, fault 7. Reproduced: three unreadable files in a row were counted 6 times (the
# stand-in attempts: 3 + 2 + 1), never named, and evaluation scored the neighbouring image
# that stood in for each of them.

def _break(folder, names):
    for name in names:
        (folder / name).write_bytes(b"\x89PNG broken")
    return sorted(str(folder / n) for n in names)


def test_training_counts_each_unreadable_file_once_and_names_it(tmp_path, caplog, one_thread):
    import logging

    from cvt_fast.training import distributed as dist_utils
    from cvt_fast.training.loop import Trainer

    data = make_dataset(tmp_path / "data")
    broken = _break(data / "train" / "class_0", ["000.png", "001.png", "002.png"])  # adjacent in the order
    cfg = load_tiny_config(data, tmp_path / "out", TRAIN__END_EPOCH=1, TRAIN__SHUFFLE=False)
    trainer = Trainer(cfg, tmp_path / "out" / "run", dist_utils.DistInfo(0, 1, 0, torch.device("cpu")))
    with caplog.at_level(logging.WARNING, logger="cvt_fast.train"):
        record = trainer.fit()
    assert record["skipped_images"] == 3
    (line,) = [r.getMessage() for r in caplog.records if "unreadable training image" in r.getMessage()]
    assert "3 unreadable training image(s) skipped" in line and all(path in line for path in broken)


def test_evaluation_leaves_unreadable_images_out_and_names_them(tmp_path, caplog):
    import logging
    import shutil

    from cvt_fast.model import build_model_from_config
    from cvt_fast.training.data import build_val_loader
    from cvt_fast.training.loop import evaluate

    data = make_dataset(tmp_path / "data")
    clean = tmp_path / "clean"
    shutil.copytree(data, clean)
    broken = _break(data / "val" / "class_1", ["001.png", "002.png"])
    for name in ("001.png", "002.png"):
        (clean / "val" / "class_1" / name).unlink()
    model = build_model_from_config(load_tiny_config(data, tmp_path / "out"))
    with caplog.at_level(logging.WARNING, logger="cvt_fast.train"):
        with_broken = evaluate(model, build_val_loader(load_tiny_config(data, tmp_path / "out")), torch.device("cpu"))
    without = evaluate(model, build_val_loader(load_tiny_config(clean, tmp_path / "out")), torch.device("cpu"))
    assert with_broken["images"] == without["images"] == 10 and with_broken["unreadable"] == 2
    for key in ("loss", "top1", "top5"):
        assert with_broken[key] == pytest.approx(without[key], rel=1e-6)
    assert "2 unreadable image(s) left out" in caplog.text and all(path in caplog.text for path in broken)


def test_official_randaugment_posterize_to_zero_bits_gives_black_not_an_error():
    # rand-m9-mstd0.5-inc1 draws magnitude 10 (clipped) about 2% of the time, where
    # PosterizeIncreasing keeps 0 bits; Pillow >= 12 raises there, Pillow < 12 returned black.
    from timm.data.auto_augment import AugmentOp
    from PIL import Image

    from cvt_fast.config import load_config

    cfg = load_config(str(REPO / "experiments/imagenet/cvt/cvt-13-224x224.yaml"), ["TRAIN.IMAGE_SIZE", "[32, 32]"])
    t = build_train_transform(cfg)
    ops = [op for tr in t.transforms for op in getattr(tr, "ops", ()) if isinstance(op, AugmentOp)]
    posterize = next(op for op in ops if op.name == "PosterizeIncreasing")
    img = Image.new("RGB", (8, 8), (200, 100, 30))
    assert list(posterize.aug_fn(img, 0).getdata()) == [(0, 0, 0)] * 64
    assert posterize.aug_fn(img, 1).getpixel((0, 0)) == (128, 0, 0)
    posterize.prob, posterize.magnitude, posterize.magnitude_std = 1.0, 10, 0  # always 0 bits
    assert posterize(img).getpixel((0, 0)) == (0, 0, 0)


@pytest.mark.parametrize("key,value,message", [
    ("DATA.LOADER", "ffcv", r"DATA\.LOADER='ffcv'; expected one of torch, dali"),
    ("DATA.INPUT_BOUND_WARNING", "1.5", r"DATA\.INPUT_BOUND_WARNING=1\.5; expected a share"),
])
def test_data_keys_refuse_unknown_values_naming_the_key(key, value, message):
    from cvt_fast.config import load_config

    assert load_config().DATA.LOADER == "torch"
    with pytest.raises(ValueError, match=message):
        load_config(None, [key, value])
