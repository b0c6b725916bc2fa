"""Training runs for the reliability tests (issue 11): a finished tiny run to damage, snapshots of
a run folder, the one error line of a failed command, runs of `python -m cvt_fast.train`
as child processes."""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from test_train_utils import REPO, make_dataset, subprocess_env, tiny_overrides

CFG = str(REPO / "experiments/digits/cvt-digits.yaml")
RUN = "cvt-digits"  # the run folder's name under OUTPUT_DIR


def train_in_process(opts: list[str]) -> int:
    """`python -m cvt_fast.train --cfg CFG *opts` in this process, on one thread; its exit code."""
    from cvt_fast.train import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the children run with OMP_NUM_THREADS=1 too: bit-exact comparisons
    try:
        return main(["--cfg", CFG, *opts])
    finally:
        torch.set_num_threads(threads)


def finished_run(root: Path, **extra: object) -> tuple[Path, list[str]]:
    """A tiny run of 2 epochs x 3 steps with a checkpoint after every step (the newest 3 kept):
    (its run folder, the options that made it)."""
    data = make_dataset(root / "data")
    opts = tiny_overrides(data, root / "out", TRAIN__CHECKPOINT_EVERY_STEPS=1, **extra)
    assert train_in_process(opts) == 0
    return root / "out" / RUN, opts


def copy_run(run: Path, opts: list[str], root: Path) -> tuple[Path, list[str]]:
    """The run folder copied under root/out, and the options pointing at the copy."""
    target = root / "out" / RUN
    shutil.copytree(run, target)
    at = opts.index("OUTPUT_DIR") + 1
    return target, opts[:at] + [str(root / "out")] + opts[at + 1:]


def snapshot(run: Path) -> dict[str, str]:
    """sha256 of every file of a run folder (TensorBoard and the text log excepted: appended to)."""
    digests = {}
    for path in sorted(run.rglob("*")):
        rel = path.relative_to(run).as_posix()
        if path.is_file() and not rel.startswith("tensorboard/") and rel != "train.log":
            digests[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def error_line(err: str) -> str:
    """The single `error: ...` line of a failed command's stderr (and no traceback)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def spawn_train(opts: list[str], cwd: Path, env: Optional[dict[str, str]] = None,
                step_delay: float = 0.0) -> subprocess.Popen:
    """`python -m cvt_fast.train --cfg CFG *opts` as a child process; its stderr goes to a file
    (a pipe nobody reads would block it), read back by `stderr_of`."""
    child_env = dict(env or subprocess_env())
    if step_delay:
        child_env["CVT_FAST_TEST_STEP_DELAY"] = str(step_delay)
    log = Path(cwd) / f"stderr-{time.monotonic_ns()}.txt"
    with open(log, "w") as stderr:
        child = subprocess.Popen([sys.executable, "-m", "cvt_fast.train", "--cfg", CFG, *opts], env=child_env,
                                 cwd=cwd, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    child.stderr_path = log  # type: ignore[attr-defined]
    return child


def stderr_of(child: subprocess.Popen) -> str:
    path = getattr(child, "stderr_path", None)
    return path.read_text() if path is not None else ""


def bar_reached(stderr: str, epoch: str, step: int, steps: int) -> bool:
    """Whether the progress bar of `epoch` ('epoch 2/3') in a child's stderr shows `step` of `steps` done."""
    at = stderr.find(epoch)
    return at >= 0 and f" {step}/{steps} [" in stderr[at:]


def wait_for(condition: Callable[[], bool], children: list[subprocess.Popen], timeout: float = 300) -> None:
    """Poll until `condition()`; fails early when a child exits first."""
    deadline = time.time() + timeout
    while not condition():
        finished = [c for c in children if c.poll() is not None]
        assert not finished, f"a child exited ({finished[0].returncode}) first: {stderr_of(finished[0])[-3000:]}"
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    """What torchrun gives each worker, for a gloo job on this machine."""
    env = subprocess_env()
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="")
    return env


def run_ranks(opts: list[str], cwd: Path, world: int = 2, timeout: float = 900) -> list[tuple[int, str]]:
    """A DDP job of `world` gloo processes to the end: [(exit code, stderr)] by rank."""
    port = free_port()
    children = [spawn_train(opts, cwd, rank_env(r, world, port)) for r in range(world)]
    try:
        return [(c.wait(timeout=timeout), stderr_of(c)) for c in children]
    finally:
        kill_all(children)


def kill_all(children: list[subprocess.Popen]) -> None:
    for c in children:
        if c.poll() is None:
            c.kill()
        c.wait()
