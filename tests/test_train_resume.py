"""Kill -9 a training run after a step checkpoint, resume it, and get the weights of an
uninterrupted run; a corrupt newest checkpoint is skipped with a warning."""
from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
import time

import torch

from cvt_fast.training.resume import find_resume_checkpoint, list_checkpoints
from test_train_utils import REPO, make_dataset, state_dicts_max_diff, subprocess_env, tiny_overrides

CFG = str(REPO / "experiments/digits/cvt-digits.yaml")


def _opts(data, out):
    # Random augmentation (timm crops), random erasing on the device (Python's random and the
    # device's torch generator), mixup/cutmix (numpy + torch RNG) and dropout all draw random
    # numbers, so an exact resume needs every RNG state restored.
    return tiny_overrides(data, out, classes=3, TRAIN__CHECKPOINT_EVERY_STEPS=2,
                          AUG__TIMM_AUG__RE_PROB=0.5, AUG__TIMM_AUG__RE_MODE="pixel",
                          AUG__MIXUP=0.8, AUG__MIXCUT=1.0, AUG__MIXUP_PROB=1.0,
                          MODEL__SPEC__DROP_RATE="[0.1, 0.1, 0.1]")


def _train_in_process(opts):
    from cvt_fast.train import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the killed child runs with OMP_NUM_THREADS=1 too
    try:
        assert main(["--cfg", CFG, *opts]) == 0
    finally:
        torch.set_num_threads(threads)


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path, caplog):
    data = make_dataset(tmp_path / "data", train_per_class=16)  # 48 images: 6 steps per epoch

    _train_in_process(_opts(data, tmp_path / "straight"))
    straight = torch.load(tmp_path / "straight/cvt-digits/final_state.pth", weights_only=True)

    run = tmp_path / "killed" / "cvt-digits"
    env = subprocess_env()
    env["CVT_FAST_TEST_STEP_DELAY"] = "0.3"  # keeps the child busy long enough to be killed mid-run
    child = subprocess.Popen([sys.executable, "-m", "cvt_fast.train", "--cfg", CFG, *_opts(data, tmp_path / "killed")],
                             env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = run / "checkpoints" / "ckpt_00000008.pth"  # epoch 1, 2 of its 6 steps done
    deadline = time.time() + 240
    try:
        while not target.exists() and child.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert target.exists(), "the child never wrote its step checkpoint"
        assert child.poll() is None, "the child finished before it could be killed"
        child.send_signal(signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
    assert not (run / "final_state.pth").exists()
    newest = find_resume_checkpoint(run)[1]
    assert newest["epoch"] == 1 and 0 < newest["step_in_epoch"] < 6

    # A copy whose newest checkpoint is cut short: resumed from the one before, with a warning.
    corrupt_run = tmp_path / "corrupt" / "cvt-digits"
    shutil.copytree(run, corrupt_run)
    newest_file = list_checkpoints(corrupt_run)[0]
    newest_file.write_bytes(newest_file.read_bytes()[:1000])

    _train_in_process(_opts(data, tmp_path / "killed"))
    resumed = torch.load(run / "final_state.pth", weights_only=True)
    assert state_dicts_max_diff(resumed, straight) <= 1e-6
    log = (run / "train.log").read_text()
    assert "=> resumed from" in log
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1]  # no duplicated record for the interrupted epoch

    with caplog.at_level(logging.WARNING, logger="cvt_fast.train"):
        _train_in_process(_opts(data, tmp_path / "corrupt"))
    assert "skipping checkpoint" in (corrupt_run / "train.log").read_text() or "skipping checkpoint" in caplog.text
    again = torch.load(corrupt_run / "final_state.pth", weights_only=True)
    assert state_dicts_max_diff(again, straight) <= 1e-6


def test_auto_resume_of_a_finished_run_does_nothing(tmp_path):
    data = make_dataset(tmp_path / "data")
    opts = tiny_overrides(data, tmp_path / "out", TRAIN__END_EPOCH=1)
    _train_in_process(opts)
    final = tmp_path / "out/cvt-digits/final_state.pth"
    first = torch.load(final, weights_only=True)
    _train_in_process(opts)
    assert state_dicts_max_diff(torch.load(final, weights_only=True), first) == 0.0
    assert "training already finished" in (tmp_path / "out/cvt-digits/train.log").read_text()


def test_train_checkpoint_names_the_file_to_resume_from(tmp_path):
    data = make_dataset(tmp_path / "data")
    _train_in_process(tiny_overrides(data, tmp_path / "a", TRAIN__END_EPOCH=1))
    ckpt = list_checkpoints(tmp_path / "a/cvt-digits")[0]
    _train_in_process(tiny_overrides(data, tmp_path / "b", TRAIN__CHECKPOINT=ckpt))
    log = (tmp_path / "b/cvt-digits/train.log").read_text()
    assert f"=> resumed from {ckpt} (end of epoch 1/2, global step 3)" in log
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "b/cvt-digits/metrics.jsonl").read_text().splitlines()]
    assert epochs == [1]
