"""DATA.LOADER dali: the training input on NVIDIA DALI, decoding and augmentation on the GPU.

The official recipe's CPU transform runs at one to two hundred images/s per core (bench/data.py),
far below what one GPU trains CvT-13 at; DALI decodes with nvjpeg (the 'mixed' decoder, fused
with the random crop) and augments on the GPU. Its CPU mode (device_id=None) runs the same
pipeline on the host, which is how CI tests it.

What stays the trainer's own: the order. The file list is fed through an `external_source` from
the project's EpochSampler (the permutation of (seed, epoch), the DDP shard rank::world_size, the
start offset of a mid-epoch resume), not from DALI's reader, so a resumed run and every rank read
exactly the files the torch loader would. The random draws of the augmentations come from DALI's
generators, seeded per (SEED, epoch, rank, first batch): reproducible for a seed, but a resumed
run draws other augmentations for the rest of its epoch than the uninterrupted run (as torch
DataLoader workers do).

The pipeline, against the official recipe (timm's create_transform for the CvT configs):
  decoders.image_random_crop (AUG.SCALE, AUG.RATIO, 10 attempts)  = RandomResizedCrop's sampling
  resize to TRAIN.IMAGE_SIZE, cubic with antialiasing             ~ PIL bicubic
  RandAugment, n=2, 'rand-mM-...-inc1' (see randaugment_suite)   ~ timm's (differences below)
  crop_mirror_normalize: flip (HFLIP), CHW uint8 (the torch loader's output)
  float, INPUT.MEAN/STD, random erasing (RE_PROB, RE_MODE, RE_COUNT), mixup/cutmix: the training
  loop's, on the device, the same code for both loaders (device_input.py, loop.py)
Differences, by how much:
- RandAugment's magnitude is fixed at M (timm draws it from N(M, mstd) per op: 0.5 of 10
  levels); timm's level 10 posterize (0 bits, black) is 1 bit in DALI (it remaps 0 bits to 1).
- Geometric ops fill with 128 grey (timm: the dataset mean, (124, 116, 104)) and interpolate
  bilinearly (timm: bilinear or bicubic at random); equalize follows OpenCV's formula (PIL's
  differs by rounding); sharpness uses DALI's kernel.
- A crop that finds no window in 10 attempts falls back to the whole image (torchvision: a
  center crop at the nearest allowed aspect ratio): rare at the official scale (0.08, 1).
- JPEG decoding by nvjpeg / libjpeg-turbo vs PIL: pixel values can differ by a few levels.
Evaluation keeps the torch loader (resize + center crop is cheap).
"""
from __future__ import annotations

import re
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

INSTALL_HINT = "pip install 'cvt-fast[dali]' (nvidia-dali-cuda130)"
# timm's RandAugment levels run 0..10 (_LEVEL_DENOM): with 11 bins, bin M is M/10 of each op's
# range, as timm's level M is; DALI's default (31 bins, torchvision's) would make m9 a third as strong.
NUM_MAGNITUDE_BINS = 11
RANDAUGMENT_LAYERS = 2


def unavailable_reason() -> Optional[str]:
    """Why DATA.LOADER dali cannot run here, or None."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as err:
        return f"NVIDIA DALI is not installed ({err}); {INSTALL_HINT}"
    return None


def parse_rand_augment(spec: str) -> int:
    """The magnitude M of a timm RandAugment string this pipeline reproduces ('rand-m9-mstd0.5-inc1')."""
    parts = spec.split("-")
    if parts[0] != "rand" or "inc1" not in parts:
        raise ValueError(f"AUG.TIMM_AUG.AUTO_AUGMENT={spec!r}: DATA.LOADER dali implements timm's increasing "
                         "RandAugment only ('rand-mM[-mstdS]-inc1', as the official configs); use DATA.LOADER torch")
    magnitude = None
    for part in parts[1:]:
        if re.fullmatch(r"m\d+", part):
            magnitude = int(part[1:])
        elif re.fullmatch(r"n\d+", part) and int(part[1:]) != RANDAUGMENT_LAYERS:
            raise ValueError(f"AUG.TIMM_AUG.AUTO_AUGMENT={spec!r}: DATA.LOADER dali applies {RANDAUGMENT_LAYERS} ops")
    if magnitude is None or not 0 <= magnitude < NUM_MAGNITUDE_BINS:
        raise ValueError(f"AUG.TIMM_AUG.AUTO_AUGMENT={spec!r}: expected a magnitude mM with M in 0..10")
    return magnitude


def randaugment_suite(max_translate_rel: float = 0.45) -> list:
    """timm's 'inc1' RandAugment ops in DALI: the same 15 operations and ranges (at bin M of
    NUM_MAGNITUDE_BINS, M/10 of each). timm applies each chosen op with probability 0.5: the
    pipeline draws that coin per layer around the choice."""
    from nvidia.dali.auto_aug import augmentations as a

    ops = [
        a.translate_x.augmentation((0, max_translate_rel), True),
        a.translate_y.augmentation((0, max_translate_rel), True),
        a.shear_x.augmentation((0, 0.3), True),
        a.shear_y.augmentation((0, 0.3), True),
        a.rotate.augmentation((0, 30), True),
        a.brightness.augmentation((0, 0.9), True, a.shift_enhance_range),
        a.contrast.augmentation((0, 0.9), True, a.shift_enhance_range),
        a.color.augmentation((0, 0.9), True, a.shift_enhance_range),
        a.sharpness.augmentation((0, 0.9), True, a.sharpness_kernel),
        a.posterize.augmentation((4, 0), False, a.poster_mask_uint8),  # bits kept: 4 down to 0 (DALI: 1)
        a.solarize.augmentation((256, 0)),                             # threshold 256 down to 0
        a.solarize_add.augmentation((0, 110)),
        a.invert,
        a.equalize,
        a.auto_contrast,
    ]
    return ops


class _Recipe:
    """The training recipe of a config, as this pipeline runs it (ValueError for what it cannot)."""

    def __init__(self, cfg: Any):
        from .data import _size_hw, _timm_get, interpolation_name, uses_timm_transform

        self.height, self.width = _size_hw(cfg.TRAIN.IMAGE_SIZE)
        aug, timm_cfg = cfg.AUG, cfg.AUG.TIMM_AUG
        self.scale = [float(v) for v in aug.SCALE]
        self.ratio = [float(v) for v in aug.RATIO]
        self.magnitude: Optional[int] = None
        if uses_timm_transform(cfg):
            if float(_timm_get(timm_cfg, "VFLIP", 0.0)) > 0:
                raise ValueError("AUG.TIMM_AUG.VFLIP > 0 is not implemented by DATA.LOADER dali; use DATA.LOADER torch")
            self.hflip = float(_timm_get(timm_cfg, "HFLIP", 0.5))
            auto_augment = _timm_get(timm_cfg, "AUTO_AUGMENT", None)
            if auto_augment not in (None, "", "none"):
                self.magnitude = parse_rand_augment(str(auto_augment))
            elif float(_timm_get(timm_cfg, "COLOR_JITTER", 0.0) or 0.0) > 0:
                # timm applies colour jitter only without auto-augment.
                raise ValueError("AUG.TIMM_AUG.COLOR_JITTER > 0 without AUTO_AUGMENT is not implemented by "
                                 "DATA.LOADER dali; set it 0 or use DATA.LOADER torch")
            self.interpolation = interpolation_name(_timm_get(timm_cfg, "INTERPOLATION", "bicubic"))
        else:
            cj = list(aug.COLOR_JITTER)
            if (cj and cj[-1] > 0.0) or float(aug.GRAY_SCALE) > 0.0:
                raise ValueError("AUG.COLOR_JITTER / AUG.GRAY_SCALE are not implemented by DATA.LOADER dali; set "
                                 "their probabilities to 0 or use DATA.LOADER torch")
            self.hflip = 0.5
            self.interpolation = interpolation_name(aug.INTERPOLATION)
        if self.interpolation not in ("bicubic", "bilinear", "nearest"):
            raise ValueError(f"interpolation {self.interpolation!r} is not implemented by DATA.LOADER dali; "
                             "expected bicubic, bilinear or nearest")


def _pipeline(recipe: _Recipe, source, batch_size: int, threads: int, device_id: Optional[int], seed: int):
    import warnings

    with warnings.catch_warnings():
        # DALI's own RandAugment still calls operators it has deprecated (experimental.equalize ...).
        warnings.simplefilter("ignore")
        return _define(recipe, source, batch_size, threads, device_id, seed)


def _define(recipe: _Recipe, source, batch_size: int, threads: int, device_id: Optional[int], seed: int):
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.auto_aug.rand_augment import apply_rand_augment

    gpu = device_id is not None
    interp = {"bicubic": types.INTERP_CUBIC, "bilinear": types.INTERP_LINEAR,
              "nearest": types.INTERP_NN}[recipe.interpolation]

    @pipeline_def(enable_conditionals=True)
    def train():
        jpegs, labels = fn.external_source(source=source, num_outputs=2, batch=True,
                                           dtype=[types.UINT8, types.INT64])
        images = fn.decoders.image_random_crop(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                               random_area=recipe.scale, random_aspect_ratio=recipe.ratio,
                                               num_attempts=10)
        images = fn.resize(images, resize_x=recipe.width, resize_y=recipe.height, interp_type=interp,
                           antialias=True)
        if recipe.magnitude is not None:
            suite = randaugment_suite()
            for _ in range(RANDAUGMENT_LAYERS):  # timm: n ops drawn with replacement, each applied with p 0.5
                if fn.random.coin_flip(probability=0.5):
                    images = apply_rand_augment(suite, images, n=1, m=recipe.magnitude,
                                                num_magnitude_bins=NUM_MAGNITUDE_BINS,
                                                shape=(recipe.height, recipe.width), fill_value=128)
        mirror = fn.random.coin_flip(probability=recipe.hflip) if recipe.hflip > 0 else 0
        # uint8 CHW, as the torch loader's: normalisation and erasing are the trainer's (DeviceInput).
        images = fn.crop_mirror_normalize(images, dtype=types.UINT8, output_layout="CHW", mirror=mirror)
        return images, labels

    pipe = train(batch_size=batch_size, num_threads=max(1, threads), device_id=device_id, seed=seed,
                 prefetch_queue_depth=2, exec_dynamic=True)
    pipe.build()
    return pipe


def _to_torch(tensor_list, device: torch.device) -> torch.Tensor:
    """A dense DALI batch as a torch tensor: on `device` from the GPU, on the host from the CPU.
    One copy routine for both (DALI's feed_ndarray), so the CPU tests run the GPU path's code."""
    from nvidia.dali.backend import TensorListGPU
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    dense = tensor_list.as_tensor()
    gpu = isinstance(tensor_list, TensorListGPU)
    out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=device if gpu else "cpu")
    # On the GPU, torch's current stream: later torch work on `out` is ordered after the copy.
    feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device) if gpu else None)
    return out


class DaliTrainLoader:
    """Batches (uint8 (B, 3, H, W) images, labels, unreadable) like the torch training loader, from a
    DALI pipeline.

    Duck-types what the trainer uses of a DataLoader: `dataset` (classes, samples),
    `sampler` (the EpochSampler: order, shard, resume offset), `batch_size`, `generator` (reseeded
    per epoch by set_loader_epoch), `len()` in batches (the last partial batch dropped).
    """

    def __init__(self, dataset, sampler, cfg: Any, batch_size: int, threads: int, device: torch.device,
                 seed: int = 0):
        reason = unavailable_reason()
        if reason:
            raise ValueError(f"DATA.LOADER dali: {reason}; or set DATA.LOADER torch")
        self.dataset, self.sampler, self.batch_size = dataset, sampler, int(batch_size)
        self.recipe = _Recipe(cfg)
        self.threads = int(threads)
        self.device = device
        self.device_id = (device.index if device.index is not None else torch.cuda.current_device()) \
            if device.type == "cuda" else None
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)
        self._pipe = None
        self._drained = False
        self._pending: list[list[int]] = []
        self._batches_it: Iterator = iter(())

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    @staticmethod
    def _read(path: str) -> np.ndarray:
        with open(path, "rb") as f:
            return np.frombuffer(f.read(), dtype=np.uint8)

    def _batches(self) -> Iterator[tuple[list[int], list[np.ndarray], np.ndarray]]:
        from concurrent.futures import ThreadPoolExecutor

        order = list(self.sampler)
        # DALI calls the source from the thread that runs the pipeline: the files of a batch are
        # read by a few threads at once (reads release the GIL), not one after the other.
        with ThreadPoolExecutor(max(self.threads, 1)) as pool:
            for start in range(0, len(self) * self.batch_size, self.batch_size):
                indices = order[start:start + self.batch_size]
                files = list(pool.map(self._read, [self.dataset.samples[i][0] for i in indices]))
                yield indices, files, np.array([self.dataset.samples[i][1] for i in indices], dtype=np.int64)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        # The pipeline is defined once (RandAugment's graph takes seconds to trace) and fed a new
        # pass of the sampler each time; its generators continue from pass to pass. Its seed comes
        # from the generator (set per (SEED, epoch, rank) by set_loader_epoch) and the start offset
        # of the first pass: a run is reproducible from its start or from a given resume point.
        # A pass left part-way (TRAIN.MAX_STEPS) leaves batches in flight: the next pass rebuilds.
        self._batches_it = self._batches()
        if self._pipe is None or not self._drained:
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator)) ^ (self.sampler.start * 7919)
            self._pipe = _pipeline(self.recipe, self._source, self.batch_size, self.threads, self.device_id,
                                   seed % (2**31 - 1))
        else:
            self._pipe.reset()
        self._drained = False
        for _ in range(len(self)):
            try:
                images, labels = self._pipe.run()
            except StopIteration:
                break
            except RuntimeError as err:
                names = ", ".join(self.dataset.samples[i][0] for i in (self._pending[0] if self._pending else []))
                self._pipe = None
                raise ValueError(f"DATA.LOADER dali could not read a batch ({str(err).splitlines()[0][:200]}); its "
                                 f"files: {names}. DATASET.SKIP_UNREADABLE does not apply to DALI: remove the broken "
                                 "file, or re-encode the set with python -m cvt_fast.data prepare (which names and "
                                 "leaves out unreadable files)") from None
            if self._pending:
                self._pending.pop(0)
            x = _to_torch(images, self.device)
            y = _to_torch(labels, self.device).reshape(-1)
            yield x, y, torch.full((y.shape[0],), -1, dtype=torch.int64)
        try:  # the source is exhausted: this run ends the pass, so the pipeline can be reset
            self._pipe.run()
        except StopIteration:
            self._drained = True
        self._pending.clear()

    def _source(self):
        indices, files, labels = next(self._batches_it)
        self._pending.append(indices)
        return files, labels

    def iterate_all(self, count: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """`count` images' worth of batches, passing over the files as often as needed (bench/data.py)."""
        seen = 0
        while seen < count:
            for batch in self:
                yield batch
                seen += batch[1].shape[0]
                if seen >= count:
                    return


def build_dali_train_loader(cfg: Any, dataset, sampler, batch_size: int, device: Optional[torch.device],
                            seed: int) -> DaliTrainLoader:
    device = device or torch.device("cpu")
    return DaliTrainLoader(dataset, sampler, cfg, batch_size, max(int(cfg.WORKERS), 1), device, seed)


def file_list_loader(files: Sequence[tuple[str, int]], cfg: Any, batch_size: int, threads: int,
                     device: Optional[torch.device] = None, seed: int = 0) -> DaliTrainLoader:
    """A DALI training loader over a list of (path, class index): a shuffled order of `files`
    (EpochSampler, epoch 0), every file once per pass (bench/data.py and tests)."""
    from .data import EpochSampler

    class _Files:
        samples = list(files)
        classes = [str(i) for i in range(max(t for _, t in files) + 1)]

    sampler = EpochSampler(len(files), shuffle=True, seed=seed, pad=False)
    batch = min(batch_size, len(files))
    return DaliTrainLoader(_Files(), sampler, cfg, batch, threads, device or torch.device("cpu"), seed)
