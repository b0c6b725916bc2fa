"""Issue 11, fault 4: an output folder that cannot be written (read-only, full, a path through
a file) ends the run with one line naming the path and what to do, exit code 2, and no
earlier file lost or cut.

Faults reproduced: the old trainer ended such runs with a traceback and exit code 1
(`OSError: [Errno 30]`, or torch's `RuntimeError: ... unexpected pos` for a full disk).
How each fault is produced is said in each test: the tests run as root, where a chmod'ed
folder stays writable, so a read-only folder is simulated at os.mkdir; a full disk is
simulated at the checkpoint file's writes, and also produced for real by a file size limit
(RLIMIT_FSIZE) in a child process, where the kernel refuses the write (EFBIG).
"""
from __future__ import annotations

import errno
import io
import json
import os
import resource
import subprocess
import sys

import pytest

from cvt_fast.training.logs import MetricsWriter, read_metrics
from cvt_fast.training.resume import list_checkpoints, read_checkpoint
from training_runs import CFG, copy_run, error_line, finished_run, snapshot, train_in_process
from test_train_utils import make_dataset, subprocess_env, tiny_overrides


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    return finished_run(tmp_path_factory.mktemp("finished"))


def _no_temporaries(run) -> bool:
    return not [p for p in run.rglob("*.tmp")]


def test_output_dir_under_a_file_is_one_line_naming_the_path(tmp_path, capsys):
    # Real: the kernel answers ENOTDIR for a folder asked for below a regular file.
    (tmp_path / "a_file").write_text("not a folder")
    data = make_dataset(tmp_path / "data")
    code = train_in_process(tiny_overrides(data, tmp_path / "a_file" / "out"))
    line = error_line(capsys.readouterr().err)
    assert code == 2
    assert f"cannot write {tmp_path / 'a_file' / 'out'}" in line and "(ENOTDIR)" in line and "set OUTPUT_DIR" in line


def test_read_only_output_dir_is_one_line_naming_the_path(tmp_path, capsys, monkeypatch):
    # Simulated: os.mkdir below `read_only` fails with EROFS, as on a read-only mount (as root,
    # chmod 0555 would not stop the write).
    read_only = tmp_path / "read_only"
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
        if str(path).startswith(str(read_only)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)

    data = make_dataset(tmp_path / "data")
    monkeypatch.setattr(os, "mkdir", mkdir)
    code = train_in_process(tiny_overrides(data, read_only))
    line = error_line(capsys.readouterr().err)
    assert code == 2 and "Read-only file system (EROFS)" in line and str(read_only) in line
    assert "make that folder writable, or set OUTPUT_DIR" in line
    assert not read_only.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a chmod 0555 folder anyway")
def test_read_only_output_dir_for_real(finished, tmp_path, capsys):
    run, opts = copy_run(*finished, tmp_path)
    os.chmod(run, 0o555)
    try:
        code = train_in_process([*opts, "TRAIN.END_EPOCH", "3"])
    finally:
        os.chmod(run, 0o755)
    line = error_line(capsys.readouterr().err)
    assert code == 2 and str(run) in line and "(EACCES)" in line


class _FullDisk(io.RawIOBase):
    """A file that takes `room` bytes, then fails every write with ENOSPC, as a full disk does."""

    def __init__(self, file, room: int):
        self.file, self.room = file, room

    def writable(self):
        return True

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def fileno(self):
        return self.file.fileno()

    def close(self):
        self.file.close()
        super().close()


def test_full_disk_while_writing_a_checkpoint_loses_nothing(finished, tmp_path, capsys, monkeypatch):
    # Simulated at the file: the temporary checkpoint file takes 4 KiB, then ENOSPC. torch.save
    # reports that as "unexpected pos"; the CLI must name the cause and the file.
    run, opts = copy_run(*finished, tmp_path)
    before = snapshot(run)
    real_fdopen = os.fdopen

    def fdopen(fd, *args, **kwargs):
        f = real_fdopen(fd, *args, **kwargs)
        if "/checkpoints/.ckpt_" in os.readlink(f"/proc/self/fd/{fd}"):
            return _FullDisk(f, 4096)
        return f

    monkeypatch.setattr(os, "fdopen", fdopen)
    code = train_in_process([*opts, "TRAIN.END_EPOCH", "3"])
    line = error_line(capsys.readouterr().err)
    assert code == 2
    assert f"cannot write {run / 'checkpoints' / 'ckpt_00000007.pth'}: No space left on device (ENOSPC)" in line
    assert "unexpected pos" not in line and "free space there" in line
    after = snapshot(run)
    del before["config.yaml"], after["config.yaml"]  # rewritten for this invocation before training
    assert after == before and _no_temporaries(run)
    read_checkpoint(list_checkpoints(run)[0])


@pytest.mark.slow
def test_file_size_limit_hit_by_a_checkpoint_write_for_real(finished, tmp_path):
    # Real: the child's writes past 200 kB fail in the kernel (RLIMIT_FSIZE, EFBIG; Python
    # ignores SIGXFSZ). The checkpoints (about 750 kB) cannot be written; nothing else is that big.
    run, opts = copy_run(*finished, tmp_path)
    before = snapshot(run)

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    proc = subprocess.run([sys.executable, "-m", "cvt_fast.train", "--cfg", CFG, *opts, "TRAIN.END_EPOCH", "3"],
                          cwd=tmp_path, env=subprocess_env(), preexec_fn=limit, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == error_line(proc.stderr)
    assert f"cannot write {run / 'checkpoints' / 'ckpt_00000007.pth'}: File too large (EFBIG)" in error_line(proc.stderr)
    after = snapshot(run)
    del before["config.yaml"], after["config.yaml"]
    assert after == before and _no_temporaries(run)


def test_a_metrics_record_that_cannot_be_written_leaves_no_half_line(tmp_path, monkeypatch):
    # Simulated at os.write: half the record goes to disk, then ENOSPC.
    writer = MetricsWriter(tmp_path)
    writer.append({"epoch": 0, "val_top1": 50.0})
    before = writer.path.read_bytes()
    real_write = os.write

    def half_then_full(fd, data):
        real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(OSError, match="No space left"):
        writer.append({"epoch": 1, "val_top1": 60.0})
    monkeypatch.setattr(os, "write", real_write)
    assert writer.path.read_bytes() == before
    writer.append({"epoch": 1, "val_top1": 70.0})
    assert [r["val_top1"] for r in read_metrics(writer.path)] == [50.0, 70.0]
    assert all(json.loads(line) for line in writer.path.read_text().splitlines())
