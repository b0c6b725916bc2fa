"""Issue 11, fault 5: a training checkpoint damaged inside a still valid zip is detected by
the sha256 digest stored in it and skipped with a message naming it; checkpoints written
before the digest existed still load (with a note); the temporary file of a write killed
before its rename is removed when the next run starts.

Faults reproduced: 4 KiB of random bytes written over a tensor's data inside a checkpoint
(the zip stays valid, so torch.load reads it) loaded silently with corrupt weights; a child
process killed (SIGKILL) in the middle of writing a checkpoint left `.ckpt_*.tmp` behind
for good.
"""
from __future__ import annotations

import logging
import signal
import subprocess
import sys
import zipfile

import pytest
import torch

from cvt_fast.checkpoint import CHECKSUM_KEY, CheckpointError, load_checkpoint, tensor_digest
from cvt_fast.training.resume import (FORMAT, checkpoint_path, list_checkpoints, read_checkpoint,
                                      save_checkpoint)
from training_runs import copy_run, finished_run, train_in_process, wait_for
from test_train_utils import subprocess_env


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    return finished_run(tmp_path_factory.mktemp("finished"))


def flip_inside_largest_tensor(path, n: int = 4096, seed: int = 0) -> None:
    """Overwrite n bytes in the middle of the largest tensor record of a torch zip checkpoint
    with random ones; the zip's structure (and so torch.load) is unaffected."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    header = 30 + len(info.filename.encode()) + len(info.extra)  # local header: fixed part, name, extra
    start = info.header_offset + header + (info.file_size - n) // 2
    assert info.file_size > n
    raw[start:start + n] = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed),
                                         dtype=torch.uint8).numpy().tobytes()
    path.write_bytes(bytes(raw))


def test_flipped_bytes_in_a_valid_zip_are_detected_and_named(tmp_path):
    path = checkpoint_path(tmp_path, 1)
    state = {"format": FORMAT, "model": {"w": torch.randn(64, 64), "b": torch.randn(64)}, "optimizer": {},
             "scheduler": {}, "epoch": 0, "step_in_epoch": 1, "global_step": 1}
    save_checkpoint(state, path)
    assert read_checkpoint(path)[CHECKSUM_KEY]["digest"] == tensor_digest(state)
    flip_inside_largest_tensor(path)
    damaged = torch.load(path, weights_only=True)  # what the old code did: loads, silently wrong
    assert not torch.equal(damaged["model"]["w"], state["model"]["w"])
    with pytest.raises(ValueError, match=rf"checkpoint '{path}' is corrupt: its contents do not match the sha256"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match="is corrupt"):
        load_checkpoint(torch.nn.Linear(64, 64), path, strict=False)


def test_digest_sees_every_tensor_value_dtype_shape_and_place():
    base = {"a": torch.arange(6.0), "n": {"k": [torch.ones(2), 3]}}
    variants = [{"a": torch.arange(6.0).reshape(2, 3), "n": {"k": [torch.ones(2), 3]}},
                {"a": torch.arange(6.0).double(), "n": {"k": [torch.ones(2), 3]}},
                {"a": torch.arange(6.0), "n": {"k": [torch.ones(2), 4]}},
                {"a": torch.arange(6.0), "n": {"k": [torch.ones(2) * 2, 3]}},
                {"b": torch.arange(6.0), "n": {"k": [torch.ones(2), 3]}}]
    assert tensor_digest(base) == tensor_digest({"n": {"k": [torch.ones(2), 3]}, "a": torch.arange(6.0)})
    assert len({tensor_digest(v) for v in variants} | {tensor_digest(base)}) == len(variants) + 1
    strided = torch.arange(12.0).reshape(3, 4).t()
    assert tensor_digest({"x": strided}) == tensor_digest({"x": strided.contiguous()})


def test_a_checkpoint_without_a_digest_still_loads_with_a_note(tmp_path, caplog):
    from cvt_fast.checkpoint import atomic_save

    path = checkpoint_path(tmp_path, 3)
    atomic_save({"format": FORMAT, "model": {"w": torch.ones(2)}, "optimizer": {}, "scheduler": {}, "epoch": 0,
                 "step_in_epoch": 3, "global_step": 3}, path)  # as cvt_fast wrote them before
    with caplog.at_level(logging.INFO, logger="cvt_fast.train"):
        assert read_checkpoint(path)["global_step"] == 3
    assert f"checkpoint {path} has no checksum" in caplog.text and "loaded unverified" in caplog.text


def test_a_corrupt_newest_checkpoint_is_skipped_by_name_and_the_run_resumes_from_the_one_before(
        finished, tmp_path, caplog):
    run, opts = copy_run(*finished, tmp_path)
    newest = list_checkpoints(run)[0]
    flip_inside_largest_tensor(newest)
    with caplog.at_level(logging.WARNING, logger="cvt_fast.train"):
        assert train_in_process(opts) == 0
    log = (run / "train.log").read_text()
    assert f"skipping checkpoint: checkpoint '{newest}' is corrupt" in log
    assert f"=> resumed from {run / 'checkpoints' / 'ckpt_00000005.pth'}" in log
    read_checkpoint(newest)  # written again by the resumed run, intact


_WRITER = """
import sys, time, torch
from cvt_fast.training.resume import save_checkpoint

class Slow:  # pickled while the temporary file is open and half written
    def __reduce__(self):
        print("writing", flush=True)
        time.sleep(600)
        return (int, ())

save_checkpoint({"model": {"w": torch.ones(1000)}, "slow": Slow()}, sys.argv[1])
"""


def test_the_temporary_of_a_write_killed_mid_way_is_removed_at_the_next_start(finished, tmp_path):
    run, opts = copy_run(*finished, tmp_path)
    target = run / "checkpoints" / "ckpt_00000099.pth"
    child = subprocess.Popen([sys.executable, "-c", _WRITER, str(target)], cwd=tmp_path, env=subprocess_env(),
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
        wait_for(lambda: any(run.glob("checkpoints/.ckpt_00000099.pth.*.tmp")), [child])
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    (left,) = run.glob("checkpoints/.ckpt_00000099.pth.*.tmp")
    assert not target.exists()
    assert train_in_process(opts) == 0  # the run is finished: only starts and stops
    assert not left.exists()
    assert f"=> removed {left} (left by a write that was killed)" in (run / "train.log").read_text()
