"""Issue 11, fault 3: SIGTERM (a scheduler's preemption notice) and SIGINT stop training at
the next step boundary with a checkpoint, a message and exit code 75; resuming from that
checkpoint gives the weights of an uninterrupted run, bit for bit.

Fault reproduced: the old trainer died on SIGTERM silently with code 143 and no checkpoint,
losing up to CHECKPOINT_EVERY_STEPS steps. The signals here are real: sent with os.kill to
a child process, or raised in this process from inside a training step.
"""
from __future__ import annotations

import os
import signal

import pytest
import torch
import torch.nn as nn

from cvt_fast.training.resume import list_checkpoints, read_checkpoint
from cvt_fast.training.stop import EXIT_STOPPED, StopRequest, TrainingStopped
from training_runs import RUN, bar_reached, kill_all, spawn_train, stderr_of, train_in_process, wait_for
from test_train_utils import make_dataset, one_thread, state_dicts_max_diff, tiny_overrides  # noqa: F401


def _opts(data, out, **extra):
    # Augmentation, mixup/cutmix and dropout all draw random numbers: an exact resume needs
    # every RNG state back. No step checkpoints: only the stop writes one mid-epoch.
    return tiny_overrides(data, out, AUG__MIXUP=0.8, AUG__MIXCUT=1.0, AUG__MIXUP_PROB=1.0,
                          MODEL__SPEC__DROP_RATE="[0.1, 0.1, 0.1]", **extra)


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_at_the_next_step_and_resuming_it_equals_an_uninterrupted_run(tmp_path):
    data = make_dataset(tmp_path / "data", train_per_class=16)  # 48 images: 6 steps per epoch
    assert train_in_process(_opts(data, tmp_path / "straight")) == 0
    straight = torch.load(tmp_path / "straight" / RUN / "final_state.pth", weights_only=True)

    run = tmp_path / "stopped" / RUN
    child = spawn_train(_opts(data, tmp_path / "stopped"), tmp_path, step_delay=0.3)
    try:
        # Into the second epoch: its bar shows a step done.
        wait_for(lambda: bar_reached(stderr_of(child), "epoch 2/2", 1, 6), [child])
        child.send_signal(signal.SIGTERM)
        code = child.wait(timeout=300)
    finally:
        kill_all([child])
    err = stderr_of(child)
    assert code == EXIT_STOPPED, err[-3000:]
    assert "Traceback" not in err
    (stopped_line,) = [line for line in err.splitlines() if line.startswith("stopped: ")]
    newest = list_checkpoints(run)[0]
    assert f"SIGTERM received: checkpoint {newest} written (epoch 2/2, step " in stopped_line
    assert "run the same command again" in stopped_line
    state = read_checkpoint(newest)
    assert state["epoch"] == 1 and 0 < state["step_in_epoch"] < 6  # mid-epoch: no regular checkpoint there
    assert not (run / "final_state.pth").exists()

    assert train_in_process(_opts(data, tmp_path / "stopped")) == 0
    resumed = torch.load(run / "final_state.pth", weights_only=True)
    assert state_dicts_max_diff(resumed, straight) == 0.0


class SignalAt(nn.Module):
    """Wraps a model; its `at`-th training forward sends `signum` to this process."""

    def __init__(self, inner: nn.Module, at: int, signum: int):
        super().__init__()
        self.inner, self.at, self.signum, self.calls = inner, at, signum, 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                os.kill(os.getpid(), self.signum)
        return self.inner(x)


def _trainer(data, out, stop, signal_at=(0, signal.SIGINT)):  # at=0: never (the same model for every run)
    from cvt_fast.config import load_config
    from cvt_fast.model import build_model_from_config
    from cvt_fast.training import distributed as dist_utils
    from cvt_fast.training.loop import Trainer
    from training_runs import CFG

    cfg = load_config(CFG, _opts(data, out, TRAIN__CHECKPOINT_EVERY_STEPS=0))
    info = dist_utils.DistInfo(0, 1, 0, torch.device("cpu"))
    return Trainer(cfg, out / RUN, info, lambda c: SignalAt(build_model_from_config(c), *signal_at), stop=stop)


def test_sigint_stops_after_the_step_it_came_in_and_the_checkpoint_resumes_exactly(tmp_path, one_thread):
    data = make_dataset(tmp_path / "data")  # 3 steps per epoch
    straight = _trainer(data, tmp_path / "straight", StopRequest())
    straight.fit()

    stop = StopRequest()
    trainer = _trainer(data, tmp_path / "stopped", stop, signal_at=(5, signal.SIGINT))  # in epoch 2, step 2
    # Python's default, or SIG_IGN when the suite runs as a background job of a shell.
    handler_before = signal.getsignal(signal.SIGINT)
    with stop.handling_signals():
        with pytest.raises(TrainingStopped, match=r"SIGINT received: checkpoint .*ckpt_00000005\.pth written "
                                                  r"\(epoch 2/2, step 2 of 3 done, global step 5\)"):
            trainer.fit()
    assert stop.signal_name == "SIGINT" and signal.getsignal(signal.SIGINT) is handler_before
    assert read_checkpoint(list_checkpoints(trainer.run_dir)[0])["global_step"] == 5

    resumed = _trainer(data, tmp_path / "stopped", StopRequest())
    resumed.fit()
    assert state_dicts_max_diff(resumed.model.state_dict(), straight.model.state_dict()) == 0.0


def test_a_stop_on_the_last_step_of_an_epoch_finishes_that_epoch_first(tmp_path, one_thread):
    data = make_dataset(tmp_path / "data")
    stop = StopRequest()
    trainer = _trainer(data, tmp_path / "out", stop, signal_at=(3, signal.SIGTERM))
    with stop.handling_signals():
        with pytest.raises(TrainingStopped, match=r"ckpt_00000003\.pth written \(end of epoch 1/2"):
            trainer.fit()
    assert [r.name for r in list_checkpoints(trainer.run_dir)] == ["ckpt_00000003.pth"]
    assert (trainer.run_dir / "metrics.jsonl").read_text().count("\n") == 1  # the epoch was evaluated and recorded


def test_a_second_signal_acts_at_once():
    stop = StopRequest()
    handler_before = signal.getsignal(signal.SIGINT)
    with stop.handling_signals():
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is handler_before
