#!/usr/bin/env python
"""Input-pipeline benchmark: images/s of each training loader alone, per CPU core and with N workers.

What one training image costs a loader worker before the model sees it: read, decode, the CPU
part of the official ImageNet training transform (RandomResizedCrop bicubic, flip, RandAugment
rand-m9-mstd0.5-inc1, to a uint8 CHW tensor, through timm as the trainer builds it from
experiments/imagenet/cvt/cvt-13-224x224.yaml). The rest of the recipe (float conversion,
normalisation, random erasing 0.25) runs on the training device, on the batch, in the trainer
(cvt_fast/training/device_input.py), and is not measured here. Loaders:

- decode: PIL open + RGB conversion only, the floor of every PIL loader (not a loader);
- torch: the trainer's own path (ImageFolderDataset + build_train_transform), DATA.LOADER torch;
- torch-prepared-<N>: the same on the images re-encoded by `python -m cvt_fast.data prepare
  --max-side N` (done here once, into the cache, for the files measured);
- dali-cpu: the DATA.LOADER dali pipeline on the CPU (device_id=None), when nvidia-dali is installed
  (it ends at uint8 CHW too);
- dali-gpu: the same on the GPU (nvjpeg decoding fused with the crop, augmentation on the device),
  when the run's device is a CUDA GPU: its per-core figure is per host thread feeding the GPU.

Modes: per-core (this process, one thread, images one by one: images/s per core) and workers
(a torch DataLoader with --workers processes, batches of --batch; DALI: that many threads).
When a bench/model.py result of the same device exists (or --model-result names one), each
loader's row says how many cores per GPU keep CvT-13's training step at 224 fed.

The images: --data DIR (an ImageFolder; --images files spread over its classes), or a synthetic
ImageNet-like set written once into --data-cache: JPEGs of 500x375 (and 375x500, 500x333,
500x400) at quality 92 with texture, about 100 KB each, the size of ImageNet's average training
image. Files are read from the page cache after the first pass: this measures decoding and
augmentation, not the disk.

    python bench/data.py                      # synthetic set; a few minutes on a 2-core CPU
    python bench/data.py --data /imagenet/train --workers 16
    python bench/data.py --quick              # CI smoke run: a dozen small JPEGs, seconds
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common, plan  # noqa: E402

MODES = ("per-core", "workers")
CONFIG = common.REPO_ROOT / "experiments" / "imagenet" / "cvt" / "cvt-13-224x224.yaml"
SYNTHETIC_VERSION = 1
# ImageNet's training images: mostly 500 pixels on the longer side, landscape 4:3 the most
# common, about 110 KB on average. Weighted list of (width, height) for the synthetic set.
SYNTHETIC_SIZES = ((500, 375),) * 6 + ((375, 500),) * 2 + ((500, 333), (500, 400))
QUICK_SIZES = ((160, 120), (120, 160))
SYNTHETIC_QUALITY = 92
SYNTHETIC_CLASSES = 10
# Per plan size: images measured, passes over them in the workers mode, default prepared sides.
# Rounds: every loader is measured once per round, the rounds one after the other, and the best
# round counts: on a shared machine the load changes within seconds, and interleaving gives every
# loader the same chances (a ratio of two loaders measured minutes apart would measure the load).
PLANS = {"quick": {"images": 12, "passes": 1, "sides": "96", "rounds": 1},
         "cpu": {"images": 128, "passes": 2, "sides": "256,320,384", "rounds": 3},
         "full": {"images": 512, "passes": 2, "sides": "256,320,384", "rounds": 3}}
# Relative cost of an image per loader, for the first time estimate (torch = 1).
RELATIVE_COST = {"decode": 0.3, "torch": 1.0, "dali-cpu": 1.2, "dali-gpu": 0.1}
MODEL_TRAIN_TARGET = ("cvt-13", 224)

CONVENTIONS = {
    "images_per_s": "images delivered / wall seconds; per-core: one process, one thread, after 2 warm-up images; "
                    "workers: from creating the DataLoader iterator (worker start included) to the last batch",
    "summary": "per loader and mode, the best of the rounds (every loader measured once per round, rounds in "
               "sequence: the least disturbed figure on a shared machine); per-core rows of the PIL loaders: "
               "per image, the fastest of its rounds (each image draws the same random ops in every round and for "
               "every loader: seed_image), summed; 'results' keeps every round",
    "images_per_s_per_core": "per-core: = images_per_s; workers: images_per_s / workers",
    "dali-cpu": "DALI's CPU mode with 1 (per-core) or --workers threads, batches of --batch (per-core: at most "
                "--images); timed after its first batch, which includes defining the pipeline (once per run)",
    "speedup_vs_torch": "this loader's images/s / the torch loader's, same mode",
    "cores_per_gpu": "the model's training images/s (best implementation of the bench/model.py result, "
                     "cvt-13@224) / this loader's images/s per core",
    "mean_kb": "mean stored file size of the images measured, KB",
    "transform": "what a loader worker does: decode and the augmentation up to a uint8 CHW tensor; the float "
                 "conversion, normalisation and random erasing run in the trainer on the device (not measured)",
}


# --------------------------------------------------------------------------- the images

def synthetic_image(rng, width: int, height: int):
    """A picture with ImageNet-like JPEG statistics: smooth colour regions (a bicubic blow-up of a
    few random colours), mid-frequency structure and grain. Noise alone would be far larger than a
    photograph at the same quality, flat colour far smaller."""
    import numpy as np
    from PIL import Image

    base = rng.randint(0, 256, size=(rng.randint(3, 7), rng.randint(3, 7), 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(base).resize((width, height), Image.BICUBIC), dtype=np.float32)
    mid = rng.randint(0, 256, size=(max(height // 6, 2), max(width // 6, 2), 3)).astype(np.uint8)
    img += (np.asarray(Image.fromarray(mid).resize((width, height), Image.BILINEAR), dtype=np.float32) - 128) * 0.8
    img += rng.normal(0, 8.0, size=(height, width, 1)).astype(np.float32)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def write_synthetic_set(root: Path, count: int, seed: int, quick: bool) -> Path:
    """count JPEGs in SYNTHETIC_CLASSES class folders under root, written once: into a temporary
    sibling, renamed into place when complete (an interrupted run leaves nothing half-written)."""
    import numpy as np
    from tqdm import tqdm

    if (root / "synthetic.json").exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    sizes = QUICK_SIZES if quick else SYNTHETIC_SIZES
    try:
        rng = np.random.RandomState(seed)
        for i in tqdm(range(count), desc="writing the synthetic JPEG set (once)", unit="img", file=sys.stderr,
                      dynamic_ncols=True, leave=False):
            folder = tmp / f"class_{i % SYNTHETIC_CLASSES:02d}"
            folder.mkdir(exist_ok=True)
            width, height = sizes[rng.randint(len(sizes))]
            synthetic_image(rng, width, height).save(folder / f"{i:05d}.jpg", "JPEG", quality=SYNTHETIC_QUALITY)
        (tmp / "synthetic.json").write_text(json.dumps(
            {"version": SYNTHETIC_VERSION, "images": count, "seed": seed, "sizes": sizes,
             "quality": SYNTHETIC_QUALITY}, indent=1) + "\n")
        try:
            os.replace(tmp, root)
        except OSError:
            if not (root / "synthetic.json").exists():  # another run won the race only if it finished
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def pick_files(root: Path, count: int) -> list[tuple[str, int]]:
    """Up to `count` (path, class index) of an ImageFolder, spread over its classes (round robin,
    files sorted), without listing more of a large set than needed."""
    from cvt_fast.training.data import IMG_EXTENSIONS

    if not root.is_dir():
        raise ValueError(f"--data {root} is not a folder; expected an ImageFolder (one sub-folder per class)")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"--data {root} has no class folders; expected an ImageFolder (one sub-folder per class)")
    classes = classes[:count]
    per_class = -(-count // len(classes))
    lists = []
    for name in classes:
        files = sorted(f for f in os.listdir(root / name) if f.lower().endswith(IMG_EXTENSIONS))
        lists.append([str(root / name / f) for f in files[:per_class]])
    picked: list[tuple[str, int]] = []
    for depth in range(per_class):
        for index, files in enumerate(lists):
            if depth < len(files) and len(picked) < count:
                picked.append((files[depth], index))
    if not picked:
        raise ValueError(f"--data {root}: no images found in its class folders")
    return picked


def prepared_copy(files: Sequence[tuple[str, int]], cache: Path, side: int, quality: int) -> list[tuple[str, int]]:
    """The files re-encoded by cvt_fast.data.reencode at max side `side`, into a cache folder
    named by the files and settings (reused on the next run)."""
    from cvt_fast.data import reencode, target_name

    key = hashlib.sha1(json.dumps([side, quality, [p for p, _ in files]]).encode()).hexdigest()[:12]
    folder = cache / f"prepared-{side}-q{quality}-{key}"
    out = []
    for path, label in files:
        target = folder / f"{label:04d}" / target_name(os.path.basename(path))
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            reencode(path, target, side, quality)
        out.append((str(target), label))
    return out


def mean_kb(files: Sequence[tuple[str, int]]) -> float:
    return sum(os.path.getsize(p) for p, _ in files) / len(files) / 1e3


# --------------------------------------------------------------------------- the loaders

def _decode_only(img) -> Any:
    import torch
    return torch.zeros(1)  # the decoded picture is dropped: batches collate


def file_dataset(files: Sequence[tuple[str, int]], transform):
    """The trainer's ImageFolderDataset (the same reading and error handling) over a given file list."""
    from cvt_fast.training.data import ImageFolderDataset

    ds = ImageFolderDataset.__new__(ImageFolderDataset)
    ds.root = os.path.commonpath([p for p, _ in files])
    ds.samples = list(files)
    ds.targets = [t for _, t in files]
    ds.classes = [str(i) for i in range(max(ds.targets) + 1)]
    ds.class_to_idx = {c: i for i, c in enumerate(ds.classes)}
    ds.transform = transform
    ds.skip_unreadable = False
    return ds


def train_config(image_size: Optional[int]):
    from cvt_fast.config import load_config

    overrides = ["TRAIN.IMAGE_SIZE", f"[{image_size}, {image_size}]"] if image_size else []
    return load_config(str(CONFIG), overrides)


def dali_reason() -> Optional[str]:
    try:
        from cvt_fast.training import dali_loader  # noqa: F401
    except ImportError as err:
        return f"{err} (pip install 'cvt-fast[dali]')"
    return dali_loader.unavailable_reason()


def seed_image(seed: int, index: int) -> None:
    """The random state of image `index`: every loader and every round draws the same crop, flip
    and RandAugment ops for it (timm's transforms use Python's random, numpy's and torch's)."""
    import random

    import numpy as np
    import torch

    value = seed * 1_000_003 + index
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)


def measure_per_core(ds, count: int, seed: int) -> dict:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times = []
    try:
        for i in range(min(2, len(ds))):
            ds[i]
        for i in range(count):
            seed_image(seed, i)
            start = time.perf_counter()
            ds[i % len(ds)]
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    seconds = sum(times)
    rate = count / seconds
    return {"status": "ok", "images": count, "workers": 1, "seconds": seconds, "images_per_s": rate,
            "images_per_s_per_core": rate, "image_ms": [round(t * 1e3, 4) for t in times]}


def measure_workers(ds, count: int, workers: int, batch: int) -> dict:
    from torch.utils.data import DataLoader

    order = [i % len(ds) for i in range(count)]
    loader = DataLoader(ds, batch_size=batch, sampler=order, num_workers=workers, drop_last=False)
    start = time.perf_counter()
    first = None
    seen = 0
    for x, y, _ in loader:
        seen += y.shape[0]
        if first is None:
            first = time.perf_counter() - start
    seconds = time.perf_counter() - start
    rate = seen / seconds
    return {"status": "ok", "images": seen, "workers": workers, "batch": batch, "seconds": seconds,
            "first_batch_s": first, "images_per_s": rate, "images_per_s_per_core": rate / workers}


def measure_dali(files, cfg, count: int, threads: int, batch: int, seed: int, loaders: dict, device) -> dict:
    from cvt_fast.training.dali_loader import file_list_loader

    # One loader per device and thread count, kept over the rounds: a training run defines its
    # pipeline once.
    key = (str(device), threads)
    if key not in loaders:
        loaders[key] = file_list_loader(files, cfg, batch, threads, device=device, seed=seed)
    loader = loaders[key]
    start = time.perf_counter()
    first, first_images, seen = None, 0, 0
    for x, y, _ in loader.iterate_all(count + batch):
        seen += y.shape[0]
        if first is None:
            # The first batch includes defining the pipeline (seconds: RandAugment's graph), once
            # per training run: the rate is taken after it.
            first, first_images = time.perf_counter() - start, seen
    common.synchronize(device)  # the GPU's work queued for the last batch counts
    seconds = time.perf_counter() - start
    rate = (seen - first_images) / max(seconds - first, 1e-9)
    return {"status": "ok", "images": seen - first_images, "workers": threads, "batch": batch,
            "seconds": seconds - first, "first_batch_s": first, "images_per_s": rate,
            "images_per_s_per_core": rate / threads}


# --------------------------------------------------------------------------- cores per GPU

def find_model_result(device, explicit: Optional[Path]) -> Optional[Path]:
    """--model-result, else the newest bench/model.py result of this device in bench/results."""
    if explicit is not None:
        if not explicit.exists():
            raise ValueError(f"--model-result {explicit} does not exist")
        return explicit
    found = sorted(glob.glob(str(common.RESULTS_DIR / f"{common.device_slug(device)}-*-model.json")))
    return Path(found[-1]) if found else None


def model_train_rate(path: Path) -> Optional[dict]:
    """The best training images/s of CvT-13 at 224 in a bench/model.py result (any batch)."""
    payload = json.loads(path.read_text())
    name, size = MODEL_TRAIN_TARGET
    rows = [r for r in payload.get("results", []) if r.get("mode") == "train" and r.get("status") == "ok"
            and r.get("model") == name and r.get("image_size") == size and r.get("images_per_s")]
    if not rows:
        return None
    best = max(rows, key=lambda r: r["images_per_s"])
    return {"path": str(path), "impl": best["impl"], "batch": best.get("batch"), "images_per_s": best["images_per_s"],
            "device": payload.get("environment", {}).get("device"), "dtype": payload.get("settings", {}).get("dtype")}


# --------------------------------------------------------------------------- the run

def table(rows: list[dict], model: Optional[dict], workers: int) -> str:
    by = {}
    for r in rows:
        by.setdefault(r["impl"], {})[r["mode"]] = r
    headers = ["loader", "mean KB", "per core img/s", f"{workers} workers img/s", "per core (workers)",
               "vs torch (per core)"]
    if model:
        headers.append("cores per GPU")
    lines = []
    for name, modes in by.items():
        one, many = modes.get("per-core", {}), modes.get("workers", {})
        cells = [name, one.get("mean_kb") or many.get("mean_kb"),
                 one.get("images_per_s") if one.get("status") == "ok" else common.status_note(one) or None,
                 many.get("images_per_s") if many.get("status") == "ok" else common.status_note(many) or None,
                 many.get("images_per_s_per_core"), one.get("speedup_vs_torch")]
        if model:
            cells.append(one.get("cores_per_gpu") or many.get("cores_per_gpu"))
        lines.append(cells)
    text = common.markdown_table(headers, lines)
    if model:
        text += (f"\n\ncores per GPU: {common.fmt(model['images_per_s'])} training images/s of {model['impl']} "
                 f"(cvt-13@224, batch {model['batch']}, {model['dtype']}, {model['device']}; {model['path']}) / "
                 "the loader's images/s per core (per-core mode)")
    return text


def main(argv: Optional[list[str]] = None) -> int:
    parser = common.base_parser(__doc__.splitlines()[0])
    plan.add_plan_arguments(parser)
    parser.set_defaults(models=None)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--data", type=Path, default=None,
                        help="an ImageFolder to read (default: a synthetic ImageNet-like JPEG set, written once)")
    parser.add_argument("--images", type=int, default=None,
                        help="images measured per loader and round (default: 128; --quick 12; --full 512)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds over all loaders; the best round counts (default 3; --quick 1)")
    parser.add_argument("--workers", type=int, default=None,
                        help="DataLoader workers (DALI threads) of the workers mode (default: the usable cores)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="training crop (default: the config's 224; --quick 64)")
    parser.add_argument("--prepared-sides", default=None,
                        help="comma-separated --max-side values of the torch-prepared loaders ('' for none; "
                             "default 256,320,384; --quick 96)")
    parser.add_argument("--prepared-quality", type=int, default=None, help="JPEG quality of the prepared copies "
                        "(default: cvt_fast.data's)")
    parser.add_argument("--data-cache", type=Path, default=None,
                        help="where the synthetic set and prepared copies are kept (default: "
                             "$XDG_CACHE_HOME/cvt_fast/bench-data or ~/.cache/cvt_fast/bench-data)")
    parser.add_argument("--model-result", type=Path, default=None,
                        help="a bench/model.py results JSON for the cores-per-GPU figure (default: the newest "
                             "of this device in bench/results)")
    args = parser.parse_args(argv)

    from cvt_fast.data import DEFAULT_QUALITY

    setup = common.prologue(args, MODES, implementations=None)
    device, size = setup.device, setup.size
    defaults = PLANS[size]
    count = args.images or defaults["images"]
    if count < 2:
        raise ValueError(f"--images {count}; expected >= 2")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = args.workers or (1 if args.quick else cores)
    batch = args.batch or (4 if args.quick else 32)
    image_size = args.image_size or (64 if args.quick else None)
    quality = args.prepared_quality or DEFAULT_QUALITY
    sides_text = defaults["sides"] if args.prepared_sides is None else args.prepared_sides
    sides = [int(s) for s in sides_text.split(",") if s.strip()]
    cache = args.data_cache or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cvt_fast" / "bench-data"

    names = ["decode", "torch"] + [f"torch-prepared-{s}" for s in sides] + ["dali-cpu", "dali-gpu"]
    common.check_only_patterns(args.only, names)
    wanted = setup.wanted
    unavailable = {"dali-cpu": r, "dali-gpu": r} if (r := dali_reason()) else {}
    if device.type != "cuda":
        unavailable.setdefault("dali-gpu", "needs a CUDA GPU: run with --device cuda on a GPU machine")
    cfg = train_config(image_size)
    crop = int(cfg.TRAIN.IMAGE_SIZE[0])
    passes = defaults["passes"]
    rounds = args.rounds or defaults["rounds"]
    if rounds < 1:
        raise ValueError(f"--rounds {rounds}; expected >= 1")

    steps: list[plan.Step] = []
    for round_ in range(rounds):
        for name in names:
            if not wanted(name) or (round_ and name in unavailable):
                continue
            cost = RELATIVE_COST.get(name, 0.7)
            for mode in setup.modes:
                images = count if mode == "per-core" else count * passes
                row = {"impl": name, "mode": mode, "round": round_,
                       "dataset": "synthetic" if args.data is None else str(args.data)}
                per_core_work = images * cost / (1 if mode == "per-core" else workers)
                steps.append(plan.Step(name, row, work=per_core_work, context=(name, mode, images),
                                       unmeasured=("unavailable", unavailable[name]) if name in unavailable else None))
    model_path = find_model_result(device, args.model_result)
    model = model_train_rate(model_path) if model_path else None
    source = (f"--data {args.data}: {count} images spread over its classes" if args.data is not None else
              f"synthetic ImageNet-like JPEGs: {count} images of "
              f"{'160x120' if args.quick else '500x375 (and 375x500, 500x333, 500x400)'}, quality {SYNTHETIC_QUALITY}")
    notes = [f"transform: {CONFIG.relative_to(common.REPO_ROOT)}'s training recipe at {crop}x{crop}, its CPU part "
             "(timm: RandomResizedCrop bicubic, flip, rand-m9-mstd0.5-inc1, to uint8 CHW); normalisation and "
             "random erasing 0.25 run on the training device (DeviceInput), not here",
             f"per-core: one process at one thread; workers: {workers} DataLoader workers, batch {batch}, "
             f"{passes} pass(es) over the images; this machine has {cores} usable cores",
             f"{rounds} round(s) over all loaders, in sequence; the best round of each loader counts; "
             "the images are read from the page cache after the first pass: decoding and augmentation, not the disk"]
    notes.append(f"cores per GPU: against {model['impl']} {common.fmt(model['images_per_s'])} img/s training "
                 f"cvt-13@224 on {model['device']} ({model['path']})" if model else
                 "cores per GPU: no bench/model.py result of this device in bench/results (--model-result PATH)")
    for line in plan.header(
            "data", "input pipeline alone, images/s per CPU core and with workers", setup,
            shapes=[source] + [f"torch-prepared-{s}: the same images re-encoded at --max-side {s}, quality {quality}"
                               for s in sides if wanted(f"torch-prepared-{s}")],
            measured=[n for n in names if wanted(n) and n not in unavailable], left_out={},
            unavailable={n: r for n, r in unavailable.items() if wanted(n)}, steps=steps,
            calls="the images one by one (per-core) or through the loader (workers); images/s",
            notes=notes, plans={"cpu": f"CPU-sized ({count} images; --full: {PLANS['full']['images']})",
                                "full": f"full ({count} images)"}):
        print(line, flush=True)
    if args.dry_run:
        return 0

    import torch
    if args.data is None:
        root = write_synthetic_set(cache / f"imagenet-like-v{SYNTHETIC_VERSION}-{count}-s{args.seed}"
                                   f"{'-quick' if args.quick else ''}", count, args.seed, args.quick)
        files = pick_files(root, count)
    else:
        files = pick_files(args.data, count)
    from cvt_fast.training.data import build_train_transform

    run = common.BenchRun("data", args, device, settings={
        "images": len(files), "passes": passes, "rounds": rounds, "workers": workers, "batch": batch, "crop": crop,
        "config": str(CONFIG.relative_to(common.REPO_ROOT)), "data": str(args.data) if args.data else "synthetic",
        "prepared_sides": sides, "prepared_quality": quality, "cores": cores, "plan": size, "quick": args.quick,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "model_result": model,
    }, conventions=CONVENTIONS)
    descriptions = {"decode": "PIL open + convert('RGB') only", "torch": "ImageFolderDataset + build_train_transform",
                    "dali-cpu": "cvt_fast.training.dali_loader on the CPU (device_id=None)",
                    "dali-gpu": "cvt_fast.training.dali_loader on the GPU ('mixed' nvjpeg decoder, GPU ops)"}
    for name in names:
        run.add_implementation(name, name not in unavailable, unavailable.get(name),
                               descriptions.get(name, f"torch on copies prepared at --max-side {name.rsplit('-', 1)[-1]}"),
                               peer=False)

    file_sets: dict[str, list] = {}
    dali_loaders: dict[tuple, Any] = {}

    def files_of(name: str) -> list:
        if name not in file_sets:
            if name.startswith("torch-prepared-"):
                file_sets[name] = prepared_copy(files, cache, int(name.rsplit("-", 1)[-1]), quality)
            else:
                file_sets[name] = files
        return file_sets[name]

    def measure(step: plan.Step) -> dict:
        name, mode, images = step.context
        these = files_of(name)
        extra = {"mean_kb": mean_kb(these)}
        torch.manual_seed(args.seed)
        if name.startswith("dali-"):
            on = device if name == "dali-gpu" else torch.device("cpu")
            result = measure_dali(these, cfg, images, 1 if mode == "per-core" else workers,
                                  min(batch, len(these)), args.seed, dali_loaders, on)
            if mode == "per-core":
                result["images_per_s_per_core"] = result["images_per_s"]
            return {**extra, **result}
        transform = _decode_only if name == "decode" else build_train_transform(cfg)
        ds = file_dataset(these, transform)
        if mode == "per-core":
            return {**extra, **measure_per_core(ds, images, args.seed)}
        return {**extra, **measure_workers(ds, images, workers, batch)}

    def line(step: plan.Step, row: dict) -> str:
        name, mode, _ = step.context
        if row.get("status") != "ok":
            return f"{name:>22} {mode:>9}: {row.get('status')} {row.get('error', '')}"
        return (f"{name:>22} {mode:>9}: {common.fmt(row['images_per_s'])} img/s "
                f"({common.fmt(row['images_per_s_per_core'])} per core)")

    plan.run_steps(run, steps, setup, measure, line)
    summary: dict[tuple, dict] = {}
    for r in run.rows:
        key = (r["impl"], r["mode"])
        best = summary.get(key)
        if best is None or (r.get("status") == "ok" and (best.get("status") != "ok"
                                                          or r["images_per_s"] > best["images_per_s"])):
            summary[key] = dict(r)
    ok = [r for r in summary.values() if r.get("status") == "ok"]
    for r in ok:
        rounds = [x for x in run.rows if (x["impl"], x["mode"]) == (r["impl"], r["mode"]) and x.get("status") == "ok"]
        r["rounds_images_per_s"] = [x["images_per_s"] for x in rounds]
        if all("image_ms" in x for x in rounds):
            # Per image, its least disturbed round (same random ops in every round): the cost of
            # the work itself, without the other processes' bursts.
            best_ms = [min(times) for times in zip(*(x["image_ms"] for x in rounds))]
            r["images_per_s"] = r["images_per_s_per_core"] = 1e3 * len(best_ms) / sum(best_ms)
            r["seconds"] = sum(best_ms) / 1e3
            r.pop("image_ms", None)
            r["per_image_best_of_rounds"] = True
    run.payload["summary"] = list(summary.values())
    for mode in setup.modes:
        base = next((r for r in ok if r["impl"] == "torch" and r["mode"] == mode), None)
        for r in ok:
            if base is not None and r["mode"] == mode:
                r["speedup_vs_torch"] = r["images_per_s"] / base["images_per_s"]
            if model and r["impl"] != "decode":
                r["cores_per_gpu"] = model["images_per_s"] / r["images_per_s_per_core"]
    panels = common.mode_panels(run.payload["summary"], setup.modes, names, "images_per_s_per_core",
                                lambda mode: f"{mode}: images/s per core", "images/s per core",
                                group=lambda r: r["dataset"])
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    run.finish(table(run.payload["summary"], model, workers) + f"\n\n{len(files)} images, crop {crop}, OMP_NUM_THREADS={threads}, "
               f"{cores} usable cores.", panels, "input pipeline")
    return 0


if __name__ == "__main__":
    sys.exit(main())
