"""Durability of the checkpoint writes: fsync the file before the rename, the folder after it.

An atomic rename alone keeps the old file on a crash, but without an fsync of the data first
the renamed file can be empty or partial after a power loss (the rename may reach the disk
before the data), and without an fsync of the folder the rename itself can be lost. Issue 16
found that removing the file's fsync passed every test. Here os.fsync and os.replace are
wrapped to record the order of the calls, and each fsync'd descriptor is identified by its
inode: the temporary file that becomes the checkpoint (with all its bytes written), then
the rename, then the checkpoint's folder.
"""
import os
import stat
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from cvt_fast.checkpoint import atomic_save, save_official_state_dict
from cvt_fast.training import resume


@pytest.fixture
def recorded(monkeypatch):
    """The sequence of fsync and rename calls, as ('fsync', is_dir, inode, size) / ('rename', src, dst)."""
    events = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd):
        info = os.fstat(fd)
        events.append(("fsync", stat.S_ISDIR(info.st_mode), info.st_ino, info.st_size))
        return real_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        events.append(("rename", Path(src), Path(dst)))
        return real_replace(src, dst, *args, **kwargs)

    def rename(src, dst, *args, **kwargs):
        events.append(("rename", Path(src), Path(dst)))
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "rename", rename)
    return events


def _save_with_torch(path):
    atomic_save({"weights": torch.randn(300, 70), "step": 7}, path)


def _save_training_checkpoint(path):
    resume.atomic_save({"format": resume.FORMAT, "model": {"w": torch.randn(50, 50)}}, path)


def _save_safetensors(path):
    save_official_state_dict(nn.Linear(40, 30), path)


def _save_small_safetensors(path):
    # A few hundred bytes stay in the file object's buffer until a flush: an fsync without
    # one would sync an empty file (large writes bypass the buffer; torch.save flushes itself).
    save_official_state_dict(nn.Linear(3, 2), path)


WRITERS = [
    pytest.param(_save_with_torch, "model.pth", id="atomic_save"),
    pytest.param(_save_training_checkpoint, "checkpoints/ckpt_00000012.pth", id="training_checkpoint"),
    pytest.param(_save_safetensors, "official.safetensors", id="safetensors"),
    pytest.param(_save_small_safetensors, "small.safetensors", id="small_safetensors"),
]


def _file_synced_before_rename(events, target):
    """Index of the rename onto `target`, after checking the file was fsync'd whole before it."""
    renames = [i for i, e in enumerate(events) if e[0] == "rename" and e[2] == target]
    assert len(renames) == 1, f"expected one rename onto {target}, got events {events}"
    at = renames[0]
    src = events[at][1]
    assert src.parent == target.parent, f"the temporary {src} must be in the target's folder (same filesystem)"
    final = os.stat(target)
    synced = [e for e in events[:at] if e[0] == "fsync" and not e[1] and e[2] == final.st_ino]
    assert synced, f"the file was not fsync'd before it was renamed onto {target}: {events}"
    assert synced[-1][3] == final.st_size, (
        f"the file was fsync'd at {synced[-1][3]} bytes of {final.st_size}: flush before fsync")
    return at


@pytest.mark.parametrize("write, name", WRITERS)
def test_checkpoint_file_is_fsynced_before_the_rename(tmp_path, recorded, write, name):
    target = tmp_path / name
    write(target)
    assert target.is_file()
    _file_synced_before_rename(recorded, target)


@pytest.mark.parametrize("write, name", WRITERS)
def test_checkpoint_folder_is_fsynced_after_the_rename(tmp_path, recorded, write, name):
    target = tmp_path / name
    write(target)
    at = _file_synced_before_rename(recorded, target)
    folder = os.stat(target.parent).st_ino
    assert any(e[0] == "fsync" and e[1] and e[2] == folder for e in recorded[at + 1:]), (
        f"the folder {target.parent} was not fsync'd after the rename (the rename itself is not durable): "
        f"{recorded}")


def test_overwriting_keeps_the_new_content_durable(tmp_path, recorded):
    """A second save over an existing file goes through the same temp-fsync-rename-fsync sequence."""
    target = tmp_path / "model.pth"
    _save_with_torch(target)
    recorded.clear()
    atomic_save({"step": 8}, target)
    _file_synced_before_rename(recorded, target)
    assert torch.load(target, weights_only=True) == {"step": 8}
    assert [p.name for p in tmp_path.iterdir()] == ["model.pth"]  # no temporary left behind
