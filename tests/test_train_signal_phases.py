"""Issue 26: SIGTERM in every phase of a run stops where the README says, with the checkpoint it promises.

The README's promise: the step in progress finishes, a checkpoint is written there, the run
says `stopped: ...` naming it and exits with code 75, and resuming equals the run that was
never stopped. tests/test_train_signals.py sends the signal during a training step; here it
comes during the end-of-epoch evaluation and during a checkpoint write (the epoch-end one and
a periodic mid-epoch one). In each phase the work in progress completes (the evaluation is
recorded, the checkpoint being written is whole and verifies), the run stops at the next
point where it can write a checkpoint, and the resumed run equals the uninterrupted one.
"""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch
import torch.nn as nn

import cvt_fast.training.loop as loop
from cvt_fast.training.resume import list_checkpoints, read_checkpoint
from cvt_fast.training.stop import StopRequest, TrainingStopped
from test_train_signals import _opts
from test_train_utils import make_dataset, one_thread, state_dicts_max_diff  # noqa: F401
from training_runs import CFG, RUN


class SignalInEval(nn.Module):
    """Wraps a model; its `at`-th evaluation forward sends SIGTERM to this process."""

    def __init__(self, inner: nn.Module, at: int):
        super().__init__()
        self.inner, self.at, self.eval_calls = inner, at, 0

    def forward(self, x):
        if not self.training:
            self.eval_calls += 1
            if self.eval_calls == self.at:
                os.kill(os.getpid(), signal.SIGTERM)
        return self.inner(x)


def _trainer(data, out, stop, eval_signal_at=0, **overrides):  # 0: never (the same model in every run)
    from cvt_fast.config import load_config
    from cvt_fast.model import build_model_from_config
    from cvt_fast.training import distributed as dist_utils

    opts = dict(TRAIN__CHECKPOINT_EVERY_STEPS=0)
    opts.update(overrides)
    cfg = load_config(CFG, _opts(data, out, **opts))
    info = dist_utils.DistInfo(0, 1, 0, torch.device("cpu"))
    return loop.Trainer(cfg, out / RUN, info, lambda c: SignalInEval(build_model_from_config(c), eval_signal_at),
                        stop=stop)


@pytest.fixture
def straight_run(tmp_path, one_thread):
    data = make_dataset(tmp_path / "data")  # 3 steps per epoch, 2 epochs
    trainer = _trainer(data, tmp_path / "straight", StopRequest())
    trainer.fit()
    return data, trainer.model.state_dict()


def _fit_expecting_a_stop(trainer, stop, message):
    with stop.handling_signals():
        with pytest.raises(TrainingStopped, match=message):
            trainer.fit()
    assert stop.signal_name == "SIGTERM"


def _resume_equals(data, out, straight_state):
    resumed = _trainer(data, out, StopRequest())
    resumed.fit()
    assert state_dicts_max_diff(resumed.model.state_dict(), straight_state) == 0.0


def _metric_epochs(run_dir):
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sigterm_during_the_end_of_epoch_evaluation_finishes_and_records_it_then_stops(straight_run, tmp_path):
    data, straight_state = straight_run
    stop = StopRequest()
    trainer = _trainer(data, tmp_path / "stopped", stop, eval_signal_at=1)
    _fit_expecting_a_stop(trainer, stop, r"SIGTERM received: checkpoint .*ckpt_00000003\.pth written "
                                         r"\(end of epoch 1/2")
    # The evaluation that the signal interrupted ran to its end and was recorded, once.
    assert _metric_epochs(trainer.run_dir) == [0]
    (newest,) = list_checkpoints(trainer.run_dir)
    state = read_checkpoint(newest)
    assert state["epoch"] == 1 and state["step_in_epoch"] == 0 and state["global_step"] == 3
    _resume_equals(data, tmp_path / "stopped", straight_state)


@pytest.fixture
def signal_in_the_first_checkpoint_write(monkeypatch):
    """Sends SIGTERM to this process in the middle of the first checkpoint write (after the state
    is gathered, before the file is written)."""
    original = loop.save_checkpoint
    writes = []

    def save_with_a_signal_inside(state, path):
        writes.append(path)
        if len(writes) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(state, path)

    monkeypatch.setattr(loop, "save_checkpoint", save_with_a_signal_inside)
    return writes


def test_sigterm_during_the_end_of_epoch_checkpoint_write_completes_it_and_stops_there(
        straight_run, tmp_path, signal_in_the_first_checkpoint_write):
    data, straight_state = straight_run
    stop = StopRequest()
    trainer = _trainer(data, tmp_path / "stopped", stop)
    _fit_expecting_a_stop(trainer, stop, r"checkpoint .*ckpt_00000003\.pth written \(end of epoch 1/2")
    assert [p.name for p in signal_in_the_first_checkpoint_write] == ["ckpt_00000003.pth"]
    (newest,) = list_checkpoints(trainer.run_dir)
    assert read_checkpoint(newest)["global_step"] == 3  # whole, and its digest verifies
    _resume_equals(data, tmp_path / "stopped", straight_state)


def test_sigterm_during_a_periodic_mid_epoch_checkpoint_write_completes_it_and_stops_at_the_next_step(
        straight_run, tmp_path, signal_in_the_first_checkpoint_write):
    data, straight_state = straight_run
    stop = StopRequest()
    trainer = _trainer(data, tmp_path / "stopped", stop, TRAIN__CHECKPOINT_EVERY_STEPS=1)
    # The periodic write after step 1 takes the signal; step 2 (the one in progress at the next
    # check) finishes and writes the stop's checkpoint.
    _fit_expecting_a_stop(trainer, stop, r"checkpoint .*ckpt_00000002\.pth written \(epoch 1/2, step 2 of 3 done")
    names = [p.name for p in signal_in_the_first_checkpoint_write]
    assert names[0] == "ckpt_00000001.pth" and names[-1] == "ckpt_00000002.pth"
    assert read_checkpoint(trainer.run_dir / loop.CKPT_DIR / "ckpt_00000001.pth")["global_step"] == 1
    assert read_checkpoint(list_checkpoints(trainer.run_dir)[0])["global_step"] == 2
    _resume_equals(data, tmp_path / "stopped", straight_state)
