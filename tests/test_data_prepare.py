"""`python -m cvt_fast.data prepare`: an ImageFolder re-encoded at a bounded size, once."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from cvt_fast.data import MANIFEST, bounded_size, main, prepare, target_name
from cvt_fast.training.data import scan_image_folder


def _folder(root, sizes=((64, 48), (40, 60), (20, 10))):
    from PIL import Image

    rng = np.random.RandomState(0)
    for c in range(2):
        (root / f"class_{c}").mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            img = Image.fromarray(rng.randint(0, 255, size=(h, w, 3)).astype(np.uint8))
            img.save(root / f"class_{c}" / f"{i}.JPEG", "JPEG", quality=95)
    Image.new("L", (50, 30), 128).save(root / "class_1" / "grey.png")  # not RGB, not a JPEG
    return root


def test_bounded_size_scales_the_longer_side_and_never_enlarges():
    assert bounded_size(500, 375, 320) == (320, 240)
    assert bounded_size(375, 500, 320) == (240, 320)
    assert bounded_size(100, 80, 320) == (100, 80)
    assert bounded_size(5000, 2, 100) == (100, 1)
    assert target_name("n01/a.JPEG") == "n01/a.JPEG" and target_name("n01/a.png") == "n01/a.png.jpg"


def test_prepare_keeps_classes_and_names_bounds_sizes_and_skips_done_files(tmp_path):
    from PIL import Image

    src, dst = _folder(tmp_path / "src"), tmp_path / "dst"
    summary = prepare(src, dst, max_side=32, quality=90, workers=1, progress=False)
    assert summary["images"] == summary["written"] == 7 and summary["already_done"] == 0
    classes, samples = scan_image_folder(dst)
    assert classes == ["class_0", "class_1"]
    names = sorted(os.path.relpath(p, dst) for p, _ in samples)
    assert names == sorted([f"class_{c}/{i}.JPEG" for c in range(2) for i in range(3)] + ["class_1/grey.png.jpg"])
    with Image.open(dst / "class_0" / "0.JPEG") as img:
        assert img.format == "JPEG" and img.mode == "RGB" and img.size == (32, 24)
    with Image.open(dst / "class_0" / "1.JPEG") as img:
        assert img.size == (21, 32)
    with Image.open(dst / "class_0" / "2.JPEG") as img:
        assert img.size == (20, 10)  # within the bound: same size, re-encoded
    with Image.open(dst / "class_1" / "grey.png.jpg") as img:
        assert img.mode == "RGB" and img.size == (32, 19)
    # Same labels as the source: the class folders are kept.
    assert [t for _, t in scan_image_folder(src)[1]] == [t for _, t in samples]
    assert json.loads((dst / MANIFEST).read_text())["settings"] == {"max_side": 32, "quality": 90}
    assert summary["prepared_bytes"] < summary["source_bytes"]
    assert not [p for p in dst.rglob("*") if ".tmp-" in p.name]

    # A rerun skips what is there (a killed run's temporaries are removed) and writes the rest.
    before = (dst / "class_0" / "0.JPEG").stat().st_mtime_ns
    (dst / "class_1" / "0.JPEG").unlink()
    (dst / "class_1" / ".1.JPEG.tmp-999").write_bytes(b"half a file")
    again = prepare(src, dst, max_side=32, quality=90, workers=1, progress=False)
    assert again["already_done"] == 6 and again["written"] == 1
    assert (dst / "class_0" / "0.JPEG").stat().st_mtime_ns == before
    assert (dst / "class_1" / "0.JPEG").exists() and not (dst / "class_1" / ".1.JPEG.tmp-999").exists()


def test_prepare_refuses_other_settings_into_the_same_folder_and_a_folder_inside_the_source(tmp_path):
    src, dst = _folder(tmp_path / "src"), tmp_path / "dst"
    prepare(src, dst, max_side=32, workers=1, progress=False)
    with pytest.raises(ValueError, match="was prepared with .*max_side.: 32.*another DST or the same settings"):
        prepare(src, dst, max_side=48, workers=1, progress=False)
    with pytest.raises(ValueError, match="inside SRC"):
        prepare(src, src / "small", max_side=32, workers=1, progress=False)
    with pytest.raises(ValueError, match="--max-side 4"):
        prepare(src, tmp_path / "x", max_side=4, progress=False)
    with pytest.raises(ValueError, match="does not exist"):
        prepare(tmp_path / "missing", tmp_path / "y", progress=False)


def test_prepare_cli_reports_unreadable_files_by_name_and_writes_the_rest(tmp_path, capsys):
    src, dst = _folder(tmp_path / "src"), tmp_path / "dst"
    (src / "class_0" / "broken.jpg").write_bytes(b"not a jpeg")
    assert main(["prepare", str(src), str(dst), "--max-side", "32", "--workers", "2"]) == 0
    out, err = capsys.readouterr()
    assert "8 images in 2 classes: 7 written, 0 already there" in out
    assert "unreadable, not written: " in err and "broken.jpg" in err
    assert not (dst / "class_0" / "broken.jpg").exists() and (dst / "class_0" / "0.JPEG").exists()
    assert main(["prepare", str(tmp_path / "nothing"), str(dst)]) == 2
    assert "error: dataset folder" in capsys.readouterr().err
