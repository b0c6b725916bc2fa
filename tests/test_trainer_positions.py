"""Where the trainer starts and how it writes: TRAIN.BEGIN_EPOCH's schedule position, the
position a resume restores, and step checkpoints that survive a crash mid-write.

Found by tools/mutation_check.py: starting the schedule one step late for BEGIN_EPOCH,
restoring the global step from the wrong field, and writing the step checkpoint with a plain
torch.save (in place) all passed every earlier test. The resume test also checks the batches
the loader yields next (a resume that replays the epoch, or skips batches counted as samples).
"""
from __future__ import annotations

import math

import pytest
import torch

from cvt_fast.config import load_config
from cvt_fast.training import distributed as dist_utils
from cvt_fast.training import loop, plots
from cvt_fast.training.data import set_loader_epoch
from cvt_fast.training.loop import Trainer
from cvt_fast.training.outputs import OutputError
from cvt_fast.training.resume import list_checkpoints, read_checkpoint
from test_train_utils import REPO, make_dataset, one_thread, tiny_overrides  # noqa: F401 (fixture)

CPU = dist_utils.DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _trainer(tmp_path, **overrides) -> Trainer:
    data = make_dataset(tmp_path / "data")
    cfg = load_config(str(REPO / "experiments/digits/cvt-digits.yaml"),
                      tiny_overrides(data, tmp_path / "out", **overrides))
    return Trainer(cfg, tmp_path / "out" / "run", CPU)


def test_begin_epoch_starts_the_schedule_where_an_uninterrupted_run_would_be(tmp_path, monkeypatch, one_thread):
    trainer = _trainer(tmp_path, TRAIN__BEGIN_EPOCH=1, TRAIN__END_EPOCH=3)
    seen = []

    def first_epoch(end_epoch, max_steps):
        seen.append((trainer.pos.epoch, trainer.pos.global_step, trainer.optimizer.param_groups[0]["lr"]))
        trainer.pos.step_in_epoch = trainer.steps_per_epoch
        return True, False  # as if TRAIN.MAX_STEPS stopped it: fit ends after this epoch

    monkeypatch.setattr(trainer, "train_epoch", first_epoch)
    monkeypatch.setattr(trainer, "end_epoch", lambda partial=False: {})
    monkeypatch.setattr(plots, "plot_metrics", lambda *args, **kwargs: None)  # no records to plot
    trainer.fit()

    steps = trainer.steps_per_epoch
    assert steps > 1
    # An uninterrupted run starts epoch 1 at the schedule's epoch 1.0, after the one warm-up
    # epoch of tiny_overrides: the first cosine value of the digits recipe (LR 2e-3, min_lr 2e-5)
    # over END_EPOCH 3, by hand: 2e-5 + (2e-3 - 2e-5) / 2 * (1 + cos(pi / 3)) = 1.505e-3.
    expected_lr = 2e-5 + 0.5 * (2e-3 - 2e-5) * (1 + math.cos(math.pi / 3))
    (epoch, global_step, lr), = seen
    assert (epoch, global_step) == (1, steps)
    assert lr == pytest.approx(expected_lr, rel=1e-12)
    assert lr == pytest.approx(1.505e-3, rel=1e-12)


def test_a_crash_while_writing_a_step_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, one_thread):
    trainer = _trainer(tmp_path)
    (trainer.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint()
    (good,) = list_checkpoints(trainer.run_dir)
    good_bytes = good.read_bytes()

    def crash_mid_write(obj, f, *args, **kwargs):
        data = b"partial checkpoint bytes"
        if hasattr(f, "write"):
            f.write(data)
        else:
            with open(f, "wb") as out:
                out.write(data)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(OutputError, match="simulated"):  # the trainer names the file and says what to do
        trainer.save_checkpoint()  # the same global step: the same file name
    monkeypatch.undo()

    assert [p.name for p in (trainer.run_dir / "checkpoints").iterdir()] == [good.name], "a partial file was left"
    assert good.read_bytes() == good_bytes
    assert read_checkpoint(good)["global_step"] == 0


def test_resume_restores_the_data_position_and_the_global_step(tmp_path, monkeypatch, one_thread):
    """The global step names the checkpoints and drives MAX_STEPS and CHECKPOINT_EVERY_STEPS: a
    resume that restarted it would write ckpt files older-numbered than the one it resumed from,
    and the next resume would go back to that one."""
    first = _trainer(tmp_path)
    first.pos.epoch, first.pos.step_in_epoch, first.pos.global_step = 1, 2, 5
    for _ in range(5):  # the schedule where five steps put it (no gradients: the weights stay)
        first.optimizer.step()
        first.scheduler.step()
    first.save_checkpoint()

    resumed = _trainer(tmp_path)
    assert resumed.restore()
    assert (resumed.pos.epoch, resumed.pos.step_in_epoch, resumed.pos.global_step) == (1, 2, 5)
    assert resumed.scheduler.last_epoch == first.scheduler.last_epoch == 5
    assert resumed.optimizer.param_groups[0]["lr"] == first.optimizer.param_groups[0]["lr"]

    # The data position: the next epoch run goes on with the third batch of epoch 1's order.
    class Started(Exception):
        pass

    calls = []

    def point_and_stop(loader, seed, epoch, rank, start_batch=0):
        calls.append((epoch, start_batch))
        set_loader_epoch(loader, seed, epoch, rank, start_batch)
        raise Started

    monkeypatch.setattr(loop, "set_loader_epoch", point_and_stop)
    with pytest.raises(Started):
        resumed.train_epoch(int(resumed.cfg.TRAIN.END_EPOCH), 0)
    assert calls == [(1, 2)]
    batch = int(resumed.cfg.TRAIN.BATCH_SIZE_PER_GPU)
    uninterrupted = first.train_loader.sampler
    set_loader_epoch(first.train_loader, int(first.cfg.SEED), 1, 0, 0)
    assert list(resumed.train_loader.sampler) == list(uninterrupted)[2 * batch:]
    assert len(list(resumed.train_loader.sampler)) > 0
