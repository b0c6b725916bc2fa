"""The training input's float work on the device (issue 25): the loaders stop at uint8 CHW images;
DeviceInput converts, normalises and erases the batch where it arrives, as ToTensor + Normalize +
RandomErasing did on the CPU."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from cvt_fast.training.data import build_train_loader, build_train_transform, set_loader_epoch
from cvt_fast.training.device_input import DeviceInput, build_device_input
from test_train_utils import REPO, load_tiny_config, make_dataset, one_thread  # noqa: F401

OFFICIAL = str(REPO / "experiments/imagenet/cvt/cvt-13-224x224.yaml")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _random_images(count: int, seed: int = 0):
    from PIL import Image

    rng = np.random.RandomState(seed)
    return [Image.fromarray(rng.randint(0, 256, size=(int(rng.randint(5, 40)), int(rng.randint(5, 40)), 3))
                            .astype(np.uint8)) for _ in range(count)]


def _official_cfg(*extra: str):
    from cvt_fast.config import load_config

    return load_config(OFFICIAL, ["TRAIN.IMAGE_SIZE", "[32, 32]", *extra])


def test_official_train_transform_ends_at_uint8_chw_without_float_work():
    from PIL import Image

    t = build_train_transform(_official_cfg())
    text = repr(t)
    assert "RandAugment" in text and "MaybePILToTensor" in text
    for absent in ("ToTensor()", "Normalize", "RandomErasing"):
        assert absent not in text.replace("MaybePILToTensor()", ""), text
    random.seed(0)
    torch.manual_seed(0)
    out = t(Image.new("RGB", (40, 30), (20, 120, 10)))
    assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)


def test_torchvision_train_transform_ends_at_uint8_chw(tmp_path):
    from PIL import Image

    cfg = load_tiny_config(tmp_path / "data", tmp_path / "out", AUG__TIMM_AUG__USE_TRANSFORM=False)
    t = build_train_transform(cfg)
    assert type(t.transforms[-1]).__name__ == "PILToTensor"
    out = t(Image.new("RGB", (20, 24), (1, 2, 3)))
    assert out.dtype == torch.uint8 and out.shape == (3, 16, 16)


def test_training_loader_yields_uint8_chw_batches(tmp_path):
    data = make_dataset(tmp_path / "data")
    cfg = load_tiny_config(data, tmp_path / "out", AUG__TIMM_AUG__RE_PROB=1.0)
    loader = build_train_loader(cfg)
    set_loader_epoch(loader, 0, 0, 0)
    x, y, unreadable = next(iter(loader))
    assert x.dtype == torch.uint8 and x.shape == (8, 3, 16, 16) and x.is_contiguous()
    assert y.shape == (8,) and (unreadable == -1).all()


def test_device_normalisation_equals_to_tensor_and_normalize_to_the_bit_on_random_images():
    import torchvision.transforms as T

    old = T.Compose([T.ToTensor(), T.Normalize(mean=list(MEAN), std=list(STD))])
    new = DeviceInput(MEAN, STD, torch.device("cpu"))
    for img in _random_images(20):
        expected = old(img)
        got = new(T.PILToTensor()(img)[None])[0]
        assert got.dtype == torch.float32 and torch.equal(got, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_normalisation_on_the_gpu_equals_the_cpu_transform_to_float32_rounding():
    import torchvision.transforms as T

    old = T.Compose([T.ToTensor(), T.Normalize(mean=list(MEAN), std=list(STD))])
    new = DeviceInput(MEAN, STD, torch.device("cuda"))
    for img in _random_images(20, seed=1):
        got = new(T.PILToTensor()(img)[None])[0]
        assert got.is_cuda
        torch.testing.assert_close(got.cpu(), old(img), rtol=1e-6, atol=1e-6)


def test_device_input_refuses_float_batches_naming_the_dtype():
    with pytest.raises(TypeError, match="torch.float32 .* expected uint8"):
        DeviceInput(MEAN, STD, torch.device("cpu"))(torch.zeros(2, 3, 4, 4))


def _batch(count: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, size, size), generator=g, dtype=torch.uint8)


def _erased(x_in: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Per image, whether some pixel differs from the plain normalisation."""
    plain = DeviceInput(MEAN, STD, torch.device("cpu"))(x_in)
    return (out != plain).flatten(1).any(dim=1)


def test_erasing_probability_one_erases_every_image_and_zero_none():
    x = _batch(16)
    random.seed(0)
    always = DeviceInput(MEAN, STD, torch.device("cpu"), re_prob=1.0, re_mode="const")
    out = always(x)
    assert _erased(x, out).all()
    # const mode writes zeros: one rectangle of 2% to 1/3 of each image (its sides rounded: up to
    # 4% more at 32x32), all channels.
    share = (out == 0).all(dim=1).float().mean(dim=(1, 2))
    assert ((share >= 0.02 - 0.01) & (share <= 1 / 3 + 0.04)).all(), share
    never = DeviceInput(MEAN, STD, torch.device("cpu"), re_prob=0.0)
    assert never.erasing is None and not _erased(x, never(x)).any()


def test_erasing_hits_the_configured_share_of_images():
    x = _batch(400, size=16, seed=1)
    random.seed(1)
    out = DeviceInput(MEAN, STD, torch.device("cpu"), re_prob=0.25, re_mode="pixel")(x)
    share = _erased(x, out).float().mean().item()
    assert 0.25 - 0.08 < share < 0.25 + 0.08, share  # binomial sd 0.022


def test_pixel_erasing_draws_from_python_random_and_the_device_generator():
    x = _batch(8)
    device_input = DeviceInput(MEAN, STD, torch.device("cpu"), re_prob=0.5, re_mode="pixel")
    assert device_input.erasing.device == "cpu" and device_input.erasing.per_pixel

    def run(seed: int) -> torch.Tensor:
        random.seed(seed)
        torch.manual_seed(seed)
        return device_input(x)

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_device_input_follows_the_recipe_of_the_config(tmp_path):
    official = build_device_input(_official_cfg(), torch.device("cpu"))
    erasing = official.erasing
    assert (erasing.probability, erasing.mode, erasing.max_count) == (0.25, "pixel", 1)
    assert official.mean.flatten().tolist() == pytest.approx(MEAN)
    digits = build_device_input(load_tiny_config(tmp_path, tmp_path / "out"), torch.device("cpu"))
    assert digits.erasing is None  # RE_PROB 0
    torchvision_path = build_device_input(
        load_tiny_config(tmp_path, tmp_path / "out", AUG__TIMM_AUG__USE_TRANSFORM=False,
                         AUG__TIMM_AUG__RE_PROB=0.5), torch.device("cpu"))
    assert torchvision_path.erasing is None  # the official torchvision recipe has no erasing


def test_the_trainer_erases_on_the_device_before_the_model_sees_the_batch(tmp_path, one_thread):
    from cvt_fast.training import distributed as dist_utils
    from cvt_fast.training.loop import Trainer

    data = make_dataset(tmp_path / "data")
    cfg = load_tiny_config(data, tmp_path / "out", TRAIN__END_EPOCH=1, TRAIN__MAX_STEPS=2,
                           AUG__TIMM_AUG__RE_PROB=1.0, AUG__TIMM_AUG__RE_MODE="const")
    trainer = Trainer(cfg, tmp_path / "out" / "run", dist_utils.DistInfo(0, 1, 0, torch.device("cpu")))
    seen = []
    trainer.train_model.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone())
                                                  if module.training else None)
    trainer.fit()
    assert len(seen) == 2
    for x in seen:
        assert x.dtype == torch.float32 and x.shape == (8, 3, 16, 16)
        # every image has its rectangle of zeros (const mode), which the plain normalisation never gives
        assert (x == 0).all(dim=1).flatten(1).any(dim=1).all()
