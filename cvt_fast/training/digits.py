"""scikit-learn's 8x8 handwritten digits, written once as an ImageFolder of PNGs.

The built-in experiment (experiments/digits/cvt-digits.yaml) trains on these files
through exactly the same ImageFolder path as ImageNet, so the default run exercises
the real data pipeline. The export is:
  - deterministic: a fixed stratified ~80/20 split (seeded), stable file names;
  - idempotent: an existing complete export is reused, nothing is rewritten;
  - atomic: written into a temporary sibling folder, then renamed into place, so an
    interrupted export never leaves a half-written dataset behind.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

SPLIT_SEED = 0
VAL_FRACTION = 0.2
# Written last inside the temporary folder: its presence marks a complete export.
MANIFEST = "digits_manifest.json"


def _stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class, a seeded shuffle; the first round(n * val_fraction) go to validation."""
    rng = np.random.RandomState(seed)
    train_idx, val_idx = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction))
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(val_idx))


def _to_uint8(image: np.ndarray) -> np.ndarray:
    # load_digits pixels are integers 0..16 (ink intensity); scale to 0..255 grey.
    return np.clip(np.rint(image * (255.0 / 16.0)), 0, 255).astype(np.uint8)


def is_complete(root: str | os.PathLike) -> bool:
    """True when `root` holds a finished export (its manifest exists and parses)."""
    manifest = Path(root) / MANIFEST
    try:
        json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    return True


def export_digits(root: str | os.PathLike) -> Path:
    """Write load_digits() as root/{train,val}/{0..9}/*.png once; return root.

    A complete export already at `root` is left untouched. Safe against concurrent
    callers (e.g. several ranks): each writes its own temporary folder and the first
    rename wins; the others discard theirs.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    root = Path(root)
    if is_complete(root):
        return root
    if root.exists() and any(root.iterdir()):
        raise ValueError(
            f"{root} exists but is not a complete digits export (no {MANIFEST}); "
            "remove it or point DATASET.ROOT elsewhere")
    root.parent.mkdir(parents=True, exist_ok=True)

    digits = load_digits()
    images, labels = digits.images, digits.target.astype(np.int64)
    train_idx, val_idx = _stratified_split(labels, VAL_FRACTION, SPLIT_SEED)

    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        for split, indices in (("train", train_idx), ("val", val_idx)):
            for c in range(10):
                (tmp / split / str(c)).mkdir(parents=True)
            for i in indices:
                # RGB so the same 3-channel model/normalisation as ImageNet applies.
                img = Image.fromarray(_to_uint8(images[i]), mode="L").convert("RGB")
                img.save(tmp / split / str(labels[i]) / f"{i:04d}.png")
        manifest = {"source": "sklearn.datasets.load_digits", "split_seed": SPLIT_SEED,
                    "val_fraction": VAL_FRACTION, "train": int(len(train_idx)),
                    "val": int(len(val_idx)), "classes": 10}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if root.exists():
            root.rmdir()  # empty (checked above); os.replace cannot overwrite a folder
        try:
            os.replace(tmp, root)
        except OSError:
            if not is_complete(root):  # someone else won the race only if it is complete
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root
