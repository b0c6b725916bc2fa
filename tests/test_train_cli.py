"""The command lines: the built-in default run, and one-line errors with exit code 2."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from cvt_fast.test import main as evaluate_main
from cvt_fast.train import main as train_main
from test_train_utils import REPO, make_dataset, make_image_folder, one_thread, subprocess_env, tiny_overrides  # noqa: F401

CFG = str(REPO / "experiments/digits/cvt-digits.yaml")


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_default_run_is_the_digits_experiment_and_writes_every_output(tmp_path, capsys, one_thread):
    opts = ["OUTPUT_DIR", str(tmp_path / "out"), "DATASET.ROOT", str(tmp_path / "digits"),
            "TRAIN.END_EPOCH", "1", "TRAIN.MAX_STEPS", "3"]
    assert train_main(opts) == 0  # no --cfg: experiments/digits/cvt-digits.yaml
    run = tmp_path / "out" / "cvt-digits"
    assert "outputs in " + str(run) in capsys.readouterr().out
    assert len(list((tmp_path / "digits" / "val").rglob("*.png"))) == 359
    record = json.loads((run / "metrics.jsonl").read_text())
    assert {"epoch", "lr", "train_loss", "val_loss", "val_top1", "val_top5", "images_per_s"} <= set(record)
    assert record["global_step"] == 3 and 0 <= record["val_top1"] <= 100
    for name in ("curves.png", "train.log", "final_state.pth", "config.yaml", "checkpoints/ckpt_00000003.pth"):
        assert (run / name).exists(), name
    # The evaluator finds the run's final weights by itself.
    assert evaluate_main(opts) == 0
    assert f"top-1 {record['val_top1']:.3f}%" in capsys.readouterr().out


@pytest.mark.slow
def test_default_digits_run_reaches_95_percent(tmp_path):
    """The full built-in experiment, as a user runs it (about 3 minutes on 2 free cores)."""
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "cvt_fast.train", "OUTPUT_DIR", str(tmp_path / "out"),
                           "DATASET.ROOT", str(tmp_path / "digits")],
                          cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(s) for s in (tmp_path / "out/cvt-digits/metrics.jsonl").read_text().splitlines()]
    print(f"digits: val top-1 {records[-1]['val_top1']:.2f}% after {len(records)} epochs, "
          f"{time.time() - started:.0f} s")
    assert records[-1]["val_top1"] >= 95.0


@pytest.mark.parametrize("case,expected", [
    ("missing", "does not exist"),
    ("empty", "is empty"),
    ("class_without_images", "class_1 has no images"),
    ("typo", "unknown config key TRAIN.LRR"),
    ("batch", "larger than the 6 training images"),
    ("unreadable", "unreadable image .*001.png.*SKIP_UNREADABLE"),
    ("unreadable_in_worker", "unreadable image .*001.png.*SKIP_UNREADABLE"),
    ("no_config_file", "config file not found"),
])
def test_bad_input_is_a_one_line_error_with_exit_code_2(tmp_path, capsys, case, expected, one_thread):
    import re

    data = tmp_path / "data"
    extra: dict = {}
    if case == "empty":
        (data / "train").mkdir(parents=True)
    elif case == "class_without_images":
        make_image_folder(data / "train", classes=2, per_class=4)
        for png in (data / "train" / "class_1").iterdir():
            png.unlink()
    elif case != "missing":
        make_dataset(data, train_per_class=2)
    if case in ("unreadable", "unreadable_in_worker"):
        make_dataset(data, train_per_class=8)
        (data / "train" / "class_0" / "001.png").write_bytes(b"\x89PNG broken")
        extra = dict(DATASET__SKIP_UNREADABLE=False, TRAIN__BATCH_SIZE_PER_GPU=24, TRAIN__SHUFFLE=False)
        if case == "unreadable_in_worker":
            extra["WORKERS"] = 1
    opts = tiny_overrides(data, tmp_path / "out", **extra)
    if case == "typo":
        opts += ["TRAIN.LRR", "0.1"]
    if case == "batch":
        opts += ["TRAIN.BATCH_SIZE_PER_GPU", "16"]
    cfg = str(tmp_path / "nope.yaml") if case == "no_config_file" else CFG
    assert train_main(["--cfg", cfg, *opts]) == 2
    assert re.search(expected, _error_line(capsys))


def test_resuming_a_checkpoint_of_another_architecture_is_an_error(tmp_path, capsys, one_thread):
    data = make_dataset(tmp_path / "data")
    opts = tiny_overrides(data, tmp_path / "out", TRAIN__MAX_STEPS=1)
    assert train_main(["--cfg", CFG, *opts]) == 0
    code = train_main(["--cfg", CFG, *opts, "MODEL.SPEC.DEPTH", "[1, 1, 2]"])
    line = _error_line(capsys)
    assert code == 2 and "does not match this model" in line and "missing: stage2.blocks.1." in line


def test_pretrained_weights_of_another_architecture_are_an_error(tmp_path, capsys, one_thread):
    from cvt_fast.checkpoint import atomic_save

    data = make_dataset(tmp_path / "data")
    atomic_save({"stage0.patch_embed.proj.weight": torch.zeros(3, 3, 3, 3)}, tmp_path / "other.pth")
    code = train_main(["--cfg", CFG, *tiny_overrides(data, tmp_path / "out"),
                       "MODEL.PRETRAINED", str(tmp_path / "other.pth")])
    assert code == 2 and "other.pth" in _error_line(capsys)


def test_cli_process_exits_2_with_a_single_error_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cvt_fast.train", "--cfg", CFG, "TRAIN.LRR", "1"],
                          cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: unknown config key TRAIN.LRR on the command line; did you mean TRAIN.LR?"]
