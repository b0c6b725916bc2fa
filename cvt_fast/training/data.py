"""ImageFolder data for training and evaluation, with the official CvT transforms.

Train transforms: timm's create_transform (RandomResizedCrop, flip, RandAugment, colour jitter,
bicubic) when AUG.TIMM_AUG.USE_TRANSFORM or USE_LOADER is set, else the official
torchvision path (RandomResizedCrop, flip, optional colour jitter). They end at a uint8 CHW
tensor (timm's prefetcher transform): the float conversion, normalisation and random erasing
run on the training device, on the batch (device_input.py). Test transforms: resize to
IMAGE_SIZE / 0.875 and center crop when TEST.CENTER_CROP, else plain resize, then ToTensor and
Normalize on the CPU (float batches, as before).

The training order is a pure function of (seed, epoch): EpochSampler draws the
permutation from its own generator, shards it over ranks like DistributedSampler,
and can start part-way through an epoch, which is how a resumed run skips the
batches it already trained on.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def interpolation_mode(value: Any):
    """torchvision InterpolationMode from a PIL integer code (official configs: 2, 3) or a name."""
    from torchvision.transforms import InterpolationMode

    by_int = {0: InterpolationMode.NEAREST, 1: InterpolationMode.LANCZOS, 2: InterpolationMode.BILINEAR,
              3: InterpolationMode.BICUBIC, 4: InterpolationMode.BOX, 5: InterpolationMode.HAMMING}
    if isinstance(value, bool):
        raise TypeError(f"interpolation {value!r}; expected an int PIL code or a name like 'bicubic'")
    if isinstance(value, int):
        if value not in by_int:
            raise ValueError(f"interpolation code {value}; expected one of {sorted(by_int)}")
        return by_int[value]
    try:
        return InterpolationMode(str(value).lower())
    except ValueError:
        raise ValueError(f"interpolation {value!r}; expected one of "
                         f"{[m.value for m in InterpolationMode]}") from None


def interpolation_name(value: Any) -> str:
    return interpolation_mode(value).value


def _size_hw(image_size: Any) -> tuple[int, int]:
    # Official configs write IMAGE_SIZE as [width, height].
    size = list(image_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"IMAGE_SIZE={size}; expected [width, height] of positive ints")
    return int(size[1]), int(size[0])


def _timm_get(node: Any, key: str, default: Any) -> Any:
    return node[key] if key in node else default


def _posterize(img, bits_to_keep, **kwargs):
    """timm's posterize, with 0 bits kept giving a black image as Pillow < 12 did.

    RandAugment's PosterizeIncreasing keeps 4 - int(4 * level / 10) bits: at the top level (a
    magnitude drawn from N(9, 0.5) and clipped at 10, about 2% of its draws) that is 0 bits.
    Pillow 12+ refuses 0 (ValueError: bits must be between or equal to 1 and 8) where Pillow
    < 12, which the official recipe ran on, masked every bit away. Without this, about one
    image in a thousand raises and stops the training run."""
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    from timm.data.auto_augment import posterize

    return posterize(img, bits_to_keep, **kwargs)


def _allow_posterize_to_zero_bits(transform: Any) -> None:
    from timm.data.auto_augment import AugmentOp, posterize

    for t in getattr(transform, "transforms", ()):
        for op in getattr(t, "ops", ()):
            if isinstance(op, AugmentOp) and op.aug_fn is posterize:
                op.aug_fn = _posterize


def uses_timm_transform(cfg: Any) -> bool:
    timm_cfg = cfg.AUG.TIMM_AUG
    return bool(_timm_get(timm_cfg, "USE_TRANSFORM", False) or _timm_get(timm_cfg, "USE_LOADER", False))


def erasing_settings(cfg: Any) -> tuple[float, str, int]:
    """(probability, mode, count) of the recipe's random erasing: AUG.TIMM_AUG's RE_* on the timm
    recipe, none on the torchvision one."""
    if not uses_timm_transform(cfg):
        return 0.0, "const", 1
    timm_cfg = cfg.AUG.TIMM_AUG
    return (float(_timm_get(timm_cfg, "RE_PROB", 0.0)), str(_timm_get(timm_cfg, "RE_MODE", "const")),
            int(_timm_get(timm_cfg, "RE_COUNT", 1)))


def build_train_transform(cfg: Any) -> Callable:
    """PIL image -> the augmented uint8 (3, H, W) tensor; the rest of the recipe (float, normalise,
    random erasing) is DeviceInput's, on the batch."""
    import torchvision.transforms as T

    h, w = _size_hw(cfg.TRAIN.IMAGE_SIZE)
    aug = cfg.AUG
    timm_cfg = aug.TIMM_AUG
    if uses_timm_transform(cfg):
        from timm.data import create_transform

        auto_augment = _timm_get(timm_cfg, "AUTO_AUGMENT", None)
        transform = create_transform(
            input_size=h if h == w else (3, h, w),
            is_training=True,
            scale=tuple(aug.SCALE), ratio=tuple(aug.RATIO),
            hflip=float(_timm_get(timm_cfg, "HFLIP", 0.5)),
            vflip=float(_timm_get(timm_cfg, "VFLIP", 0.0)),
            color_jitter=_timm_get(timm_cfg, "COLOR_JITTER", 0.4),
            auto_augment=str(auto_augment) if auto_augment not in (None, "", "none") else None,
            interpolation=interpolation_name(_timm_get(timm_cfg, "INTERPOLATION", "bicubic")),
            # The mean still matters here: RandAugment's geometric ops fill with it.
            mean=tuple(cfg.INPUT.MEAN), std=tuple(cfg.INPUT.STD),
            # Ends at MaybePILToTensor (uint8 CHW): no ToTensor, Normalize or RandomErasing here.
            use_prefetcher=True,
        )
        _allow_posterize_to_zero_bits(transform)
        return transform
    ts = [T.RandomResizedCrop((h, w), scale=tuple(aug.SCALE), ratio=tuple(aug.RATIO),
                              interpolation=interpolation_mode(aug.INTERPOLATION)),
          T.RandomHorizontalFlip()]
    cj = list(aug.COLOR_JITTER)
    if cj and cj[-1] > 0.0:
        ts.append(T.RandomApply([T.ColorJitter(*cj[:-1])], p=cj[-1]))
    if float(aug.GRAY_SCALE) > 0.0:
        ts.append(T.RandomGrayscale(float(aug.GRAY_SCALE)))
    ts.append(T.PILToTensor())
    return T.Compose(ts)


def build_test_transform(cfg: Any) -> Callable:
    import torchvision.transforms as T

    h, w = _size_hw(cfg.TEST.IMAGE_SIZE)
    interp = interpolation_mode(cfg.TEST.INTERPOLATION)
    if cfg.TEST.CENTER_CROP:
        # The official resize: shorter side to size / 0.875, then a center crop.
        ts = [T.Resize(int(w / 0.875), interpolation=interp), T.CenterCrop((h, w))]
    else:
        ts = [T.Resize((h, w), interpolation=interp)]
    return T.Compose(ts + [T.ToTensor(), T.Normalize(mean=list(cfg.INPUT.MEAN), std=list(cfg.INPUT.STD))])


def scan_image_folder(root: str | os.PathLike) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes (sorted folder names) and (path, class index) samples of an ImageFolder tree.

    Raises ValueError naming the problem: missing folder, no class folders, a class
    folder without images.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"dataset folder {root} does not exist (check DATASET.ROOT and "
                         "DATASET.TRAIN_SET / DATASET.TEST_SET)")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"dataset folder {root} is empty: expected one sub-folder of images per class")
    samples: list[tuple[str, int]] = []
    for index, name in enumerate(classes):
        found = []
        for dirpath, _, files in sorted(os.walk(root / name, followlinks=True)):
            found += [os.path.join(dirpath, f) for f in sorted(files) if f.lower().endswith(IMG_EXTENSIONS)]
        if not found:
            raise ValueError(f"class folder {root / name} has no images (extensions {', '.join(IMG_EXTENSIONS)})")
        samples += [(p, index) for p in found]
    return classes, samples


class ImageFolderDataset(Dataset):
    """An ImageFolder that names unreadable files, and can step over them.

    Items are (image, target, unreadable) where `unreadable` is the item's own index when its
    file could not be read (-1 otherwise). Such an item carries the next readable image and
    its target in its place, so a batch keeps its size (and every DDP rank its step count);
    training counts and names the unreadable files from these indices, evaluation leaves the
    items out. Files tried only as stand-ins are not reported here: each is reported by its
    own item.
    """

    def __init__(self, root: str | os.PathLike, transform: Optional[Callable] = None,
                 skip_unreadable: bool = True):
        self.root = str(root)
        self.classes, self.samples = scan_image_folder(root)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.targets = [t for _, t in self.samples]
        self.transform = transform
        self.skip_unreadable = skip_unreadable

    def __len__(self) -> int:
        return len(self.samples)

    @staticmethod
    def _load(path: str):
        from PIL import Image

        with Image.open(path) as img:
            return img.convert("RGB")

    def __getitem__(self, index: int):
        unreadable = -1
        for attempt in range(len(self.samples)):
            path, target = self.samples[(index + attempt) % len(self.samples)]
            try:
                img = self._load(path)
            except Exception as err:  # PIL raises many types for broken files
                if not self.skip_unreadable:
                    raise ValueError(f"unreadable image {path} ({type(err).__name__}); "
                                     "set DATASET.SKIP_UNREADABLE True to skip such files") from None
                if attempt == 0:
                    unreadable = index
                continue
            if self.transform is not None:
                img = self.transform(img)
            return img, target, unreadable
        raise ValueError(f"no readable image in {self.root}")


def name_files(dataset: Dataset, indices: Iterable[int], limit: int = 5) -> str:
    """'a.png, b.png (+3 more)' for sample indices of an ImageFolderDataset."""
    paths = sorted(dataset.samples[i][0] for i in indices)
    more = f" (+{len(paths) - limit} more)" if len(paths) > limit else ""
    return ", ".join(paths[:limit]) + more


class EpochSampler(Sampler[int]):
    """Indices of one rank for one epoch: a permutation drawn from (seed + epoch), padded
    to a multiple of the world size (pad=True, training) and sharded rank::world_size;
    `start` skips that many of this rank's indices (mid-epoch resume)."""

    def __init__(self, num_items: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1,
                 pad: bool = True):
        if num_items < 1:
            raise ValueError(f"num_items={num_items}; expected >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} with world_size={world_size}; expected 0 <= rank < world_size")
        self.num_items, self.shuffle, self.seed = num_items, shuffle, seed
        self.rank, self.world_size, self.pad = rank, world_size, pad
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def _rank_indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_items, generator=g).tolist()
        else:
            order = list(range(self.num_items))
        if self.pad:
            total = math.ceil(self.num_items / self.world_size) * self.world_size
            order += order[: total - len(order)]
        return order[self.rank::self.world_size]

    @property
    def per_rank(self) -> int:
        if self.pad:
            return math.ceil(self.num_items / self.world_size)
        return len(range(self.rank, self.num_items, self.world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self._rank_indices()[self.start:])

    def __len__(self) -> int:
        return max(self.per_rank - self.start, 0)


def _loader(dataset: Dataset, sampler: EpochSampler, batch_size: int, workers: int, drop_last: bool,
            seed: int, pin_memory: bool) -> DataLoader:
    # An explicit generator: the worker seeds never draw from the global RNG, so the
    # global RNG stream (saved in checkpoints) is the same whether workers are used or not.
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=pin_memory and torch.cuda.is_available(), drop_last=drop_last, generator=g,
                      persistent_workers=False)


def build_train_loader(cfg: Any, rank: int = 0, world_size: int = 1, device: Optional[torch.device] = None):
    """The training loader of DATA.LOADER: a torch DataLoader ('torch'), or a DaliTrainLoader ('dali',
    decoding and augmentation on `device`, the same sampler). Both yield (uint8 (B, 3, H, W) images,
    targets, unreadable indices); the trainer's DeviceInput finishes the images on the device."""
    root = os.path.join(cfg.DATASET.ROOT, cfg.DATASET.TRAIN_SET)
    loader_kind = str(cfg.DATA.LOADER)
    if loader_kind not in ("torch", "dali"):
        raise ValueError(f"DATA.LOADER={loader_kind!r}; expected one of torch, dali")
    transform = build_train_transform(cfg) if loader_kind == "torch" else None
    dataset = ImageFolderDataset(root, transform, bool(cfg.DATASET.SKIP_UNREADABLE))
    batch = int(cfg.TRAIN.BATCH_SIZE_PER_GPU)
    if batch < 1:
        raise ValueError(f"TRAIN.BATCH_SIZE_PER_GPU={batch}; expected >= 1")
    sampler = EpochSampler(len(dataset), bool(cfg.TRAIN.SHUFFLE), int(cfg.SEED), rank, world_size, pad=True)
    if sampler.per_rank < batch:
        raise ValueError(
            f"batch size {batch} per process x {world_size} process(es) is larger than the "
            f"{len(dataset)} training images in {root}; lower TRAIN.BATCH_SIZE_PER_GPU")
    if loader_kind == "dali":
        from .dali_loader import build_dali_train_loader

        return build_dali_train_loader(cfg, dataset, sampler, batch, device, int(cfg.SEED) * 1000 + rank)
    return _loader(dataset, sampler, batch, int(cfg.WORKERS), True, int(cfg.SEED) * 1000 + rank,
                   bool(cfg.PIN_MEMORY))


def build_val_loader(cfg: Any, rank: int = 0, world_size: int = 1) -> DataLoader:
    root = os.path.join(cfg.DATASET.ROOT, cfg.DATASET.TEST_SET)
    dataset = ImageFolderDataset(root, build_test_transform(cfg), bool(cfg.DATASET.SKIP_UNREADABLE))
    batch = int(cfg.TEST.BATCH_SIZE_PER_GPU)
    if batch < 1:
        raise ValueError(f"TEST.BATCH_SIZE_PER_GPU={batch}; expected >= 1")
    if len(dataset) < world_size:
        raise ValueError(f"{len(dataset)} validation images in {root} for {world_size} processes")
    # No padding: every image counted exactly once; metrics are summed over ranks.
    sampler = EpochSampler(len(dataset), False, 0, rank, world_size, pad=False)
    return _loader(dataset, sampler, batch, int(cfg.WORKERS), False, rank, bool(cfg.PIN_MEMORY))


def set_loader_epoch(loader: DataLoader, seed: int, epoch: int, rank: int, start_batch: int = 0) -> None:
    """Point the loader at `epoch`, skipping its first `start_batch` batches."""
    loader.sampler.set_epoch(epoch, start_batch * loader.batch_size)
    # Worker seeds per (seed, epoch, rank): reproducible augmentation with workers too.
    loader.generator.manual_seed((seed * 1_000_003 + epoch) * 1009 + rank)
