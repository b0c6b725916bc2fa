"""One-time preparation of an image dataset for fast loading.

    python -m cvt_fast.data prepare SRC DST [--max-side 320] [--quality 90] [--workers N]

re-encodes the ImageFolder SRC (one sub-folder per class) into DST with the same class
folders and file names, each image at most --max-side pixels on its longer side (JPEG at
--quality). Decoding cost follows the stored size (FFCV's lesson): a 500x375 ImageNet JPEG
decodes about twice as slowly as the same picture at 320x240. Images already within the bound
are re-encoded too (one format, one quality: the loader's cost is then predictable).

What the training recipe loses: RandomResizedCrop then samples its crop (8% to 100% of the
area) from the smaller picture, so more crops are upsampled to the training size instead of
downsampled (see README, "Is my training input-bound?"). Evaluation should read the original
validation set (its resize + center crop is cheap).

Safe to interrupt and rerun: every file is written to a temporary name and renamed into place,
files already in DST are skipped, and DST/prepare.json records the settings, so a rerun with
other settings into the same DST is refused instead of mixing two sizes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

DEFAULT_MAX_SIDE = 320
DEFAULT_QUALITY = 90
MANIFEST = "prepare.json"
_JPEG_SUFFIXES = (".jpg", ".jpeg")


def target_name(relative: str) -> str:
    """DST path of a SRC file (relative to the roots): a JPEG keeps its name, another format
    gets '.jpg' appended ('a.png' -> 'a.png.jpg'), so two sources never share a target."""
    return relative if relative.lower().endswith(_JPEG_SUFFIXES) else relative + ".jpg"


def bounded_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) scaled so that the longer side is at most max_side (never enlarged)."""
    longer = max(width, height)
    if longer <= max_side:
        return width, height
    scale = max_side / longer
    return max(1, round(width * scale)), max(1, round(height * scale))


def reencode(src: str | os.PathLike, dst: str | os.PathLike, max_side: int, quality: int) -> int:
    """Write SRC as an RGB JPEG at most max_side on its longer side to DST, atomically;
    returns the bytes written. Raises whatever PIL raises for an unreadable file."""
    from PIL import Image

    dst = Path(dst)
    with Image.open(src) as img:
        size = bounded_size(img.width, img.height, max_side)
        # JPEG draft mode decodes at 1/2, 1/4 or 1/8 scale in the DCT domain when the target
        # allows it: several times faster on large sources, and the Lanczos resize below
        # still sets the exact size.
        img.draft("RGB", size)
        img = img.convert("RGB")
        if img.size != size:
            img = img.resize(size, Image.LANCZOS)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        img.save(tmp, "JPEG", quality=quality)
        written = tmp.stat().st_size
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()
    return written


def _work(job: tuple[str, str, int, int]) -> tuple[str, int, Optional[str]]:
    src, dst, max_side, quality = job
    try:
        return src, reencode(src, dst, max_side, quality), None
    except Exception as err:  # noqa: BLE001 - PIL raises many types for broken files; reported by name
        return src, 0, f"{type(err).__name__}: {err}"


def _check_manifest(dst: Path, settings: dict) -> None:
    path = dst / MANIFEST
    if not path.exists():
        return
    try:
        earlier = json.loads(path.read_text())["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(f"{path} is unreadable; remove it (or DST) and run again") from None
    if earlier != settings:
        raise ValueError(f"{dst} was prepared with {earlier}, not {settings}: choose another DST or the same "
                         "settings (a dataset of mixed sizes would train on two recipes)")


def prepare(src: str | os.PathLike, dst: str | os.PathLike, max_side: int = DEFAULT_MAX_SIDE,
            quality: int = DEFAULT_QUALITY, workers: int = 1, progress: bool = True) -> dict:
    """Re-encode the ImageFolder SRC into DST (see the module docstring); returns the summary
    also written to DST/prepare.json."""
    from tqdm import tqdm

    from cvt_fast.training.data import scan_image_folder

    if max_side < 16:
        raise ValueError(f"--max-side {max_side}; expected >= 16 (the longer side of a stored image, in pixels)")
    if not 1 <= quality <= 100:
        raise ValueError(f"--quality {quality}; expected 1..100 (JPEG quality)")
    if workers < 1:
        raise ValueError(f"--workers {workers}; expected >= 1")
    src, dst = Path(src).resolve(), Path(dst).resolve()
    if dst == src or src in dst.parents:
        raise ValueError(f"DST {dst} is inside SRC {src}: the prepared files would be read as classes of SRC; "
                         "choose a DST outside it")
    classes, samples = scan_image_folder(src)
    settings = {"max_side": int(max_side), "quality": int(quality)}
    _check_manifest(dst, settings)
    jobs, skipped = [], 0
    for path, _ in samples:
        target = dst / target_name(os.path.relpath(path, src))
        if target.exists():
            skipped += 1  # written by an earlier run (atomically, so complete)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        jobs.append((path, str(target), int(max_side), int(quality)))
    for leftover in dst.rglob(".*.tmp-*"):  # a killed run's temporaries
        leftover.unlink()
    source_bytes = sum(os.path.getsize(p) for p, _ in samples)
    # The settings first: a run killed part-way still tells the next one what DST holds.
    _write_manifest(dst, {"source": str(src), "settings": settings, "complete": False})
    written = 0
    failed: list[tuple[str, str]] = []
    bar = tqdm(total=len(samples), initial=skipped, desc=f"prepare {src.name} -> {dst.name}", unit="img",
               disable=not progress, dynamic_ncols=True)
    with bar:
        if workers == 1:
            results = map(_work, jobs)
            pool = None
        else:
            import multiprocessing

            pool = multiprocessing.Pool(workers)
            results = pool.imap_unordered(_work, jobs, chunksize=16)
        try:
            for path, size, error in results:
                written += size
                if error:
                    failed.append((path, error))
                bar.update(1)
        finally:
            if pool is not None:
                pool.close()
                pool.join()
    prepared_bytes = sum(os.path.getsize(dst / target_name(os.path.relpath(p, src))) for p, _ in samples
                         if (dst / target_name(os.path.relpath(p, src))).exists())
    summary = {"source": str(src), "settings": settings, "classes": len(classes), "images": len(samples),
               "written": len(jobs) - len(failed), "already_done": skipped,
               "unreadable": [{"path": p, "error": e} for p, e in failed],
               "source_bytes": source_bytes, "prepared_bytes": prepared_bytes}
    _write_manifest(dst, {**summary, "complete": True})
    return summary


def _write_manifest(dst: Path, content: dict) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    tmp = dst / f".{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(content, indent=1) + "\n")
    os.replace(tmp, dst / MANIFEST)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cvt_fast.data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="re-encode an ImageFolder at a bounded size (one time)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("src", help="ImageFolder to read (one sub-folder per class), e.g. imagenet/train")
    p.add_argument("dst", help="where to write the same tree, re-encoded")
    p.add_argument("--max-side", type=int, default=DEFAULT_MAX_SIDE, help="longer side of a stored image, pixels")
    p.add_argument("--quality", type=int, default=DEFAULT_QUALITY, help="JPEG quality of the stored images")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes re-encoding in parallel")
    args = parser.parse_args(argv)
    try:
        summary = prepare(args.src, args.dst, args.max_side, args.quality, args.workers)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    ratio = summary["prepared_bytes"] / summary["source_bytes"] if summary["source_bytes"] else 0.0
    print(f"{summary['images']} images in {summary['classes']} classes: {summary['written']} written, "
          f"{summary['already_done']} already there; {summary['source_bytes'] / 2**20:.1f} MiB -> "
          f"{summary['prepared_bytes'] / 2**20:.1f} MiB ({ratio:.0%}); settings in {Path(args.dst) / MANIFEST}")
    for item in summary["unreadable"]:
        print(f"warning: unreadable, not written: {item['path']} ({item['error']})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
