"""Issue 11, faults 1 and 2: pruning and unreadable checkpoints never cost good data, and a
refused invocation changes nothing in the run folder.

Faults reproduced: (1) every checkpoint of a run truncated to 1000 bytes; the old trainer
started from scratch with only warnings, overwrote model_best.pth, cut metrics.jsonl and,
as its pruning kept the three highest step numbers, deleted the fresh good checkpoints and
kept the corrupt ones. (2) A refused invocation (another MODEL.SPEC) rewrote config.yaml.
"""
from __future__ import annotations

import json

import pytest
import torch

from cvt_fast.training.resume import (FORMAT, checkpoint_path, list_checkpoints, prune_checkpoints, read_checkpoint,
                                      save_checkpoint)
from training_runs import copy_run, error_line, finished_run, snapshot, train_in_process


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    return finished_run(tmp_path_factory.mktemp("finished"))


def test_all_checkpoints_unreadable_stops_with_an_error_and_changes_nothing(finished, tmp_path, capsys):
    run, opts = copy_run(*finished, tmp_path)
    assert [p.name for p in list_checkpoints(run)] == ["ckpt_00000006.pth", "ckpt_00000005.pth", "ckpt_00000004.pth"]
    for path in list_checkpoints(run):
        path.write_bytes(path.read_bytes()[:1000])
    before = snapshot(run)
    # Another learning rate: config.yaml would change if the run got as far as writing it.
    code = train_in_process([*opts, "TRAIN.END_EPOCH", "3", "TRAIN.LR", "0.001"])
    line = error_line(capsys.readouterr().err)
    assert code == 2
    assert "none of the 3 checkpoint(s)" in line and "ckpt_00000006.pth" in line and "TRAIN.START_OVER True" in line
    assert snapshot(run) == before  # config.yaml, metrics.jsonl, model_best.pth, checkpoints: all as they were


def test_start_over_moves_the_unreadable_run_aside_and_trains_from_the_beginning(finished, tmp_path):
    run, opts = copy_run(*finished, tmp_path)
    for path in list_checkpoints(run):
        path.write_bytes(path.read_bytes()[:1000])
    before = snapshot(run)
    assert train_in_process([*opts, "TRAIN.END_EPOCH", "1", "TRAIN.START_OVER", "True"]) == 0
    (previous,) = run.glob("previous-*")
    moved = {f"{previous.name}/{name}": digest for name, digest in before.items()
             if name.startswith("checkpoints/") or name in ("metrics.jsonl", "model_best.pth", "final_state.pth")}
    now = snapshot(run)
    assert {name: now.get(name) for name in moved} == moved  # every earlier file kept, byte for byte
    records = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0]
    assert [p.name for p in list_checkpoints(run)] == ["ckpt_00000003.pth", "ckpt_00000002.pth", "ckpt_00000001.pth"]
    for path in list_checkpoints(run):
        read_checkpoint(path)  # all readable
    assert "moved to" in (run / "train.log").read_text()


def test_refused_invocation_leaves_config_metrics_and_weights_untouched(finished, tmp_path, capsys):
    run, opts = copy_run(*finished, tmp_path)
    before = snapshot(run)
    code = train_in_process([*opts, "TRAIN.END_EPOCH", "3", "MODEL.SPEC.DIM_EMBED", "[24, 32, 48]"])
    line = error_line(capsys.readouterr().err)
    assert code == 2 and "does not match this model" in line
    assert snapshot(run) == before


def _fake_checkpoint(run, step: int, corrupt: bool = False):
    path = checkpoint_path(run, step)
    save_checkpoint({"format": FORMAT, "model": {"w": torch.full((256,), float(step))}, "optimizer": {},
                     "scheduler": {}, "epoch": 0, "step_in_epoch": step, "global_step": step}, path)
    if corrupt:
        path.write_bytes(path.read_bytes()[:600])
    return path


def test_pruning_keeps_the_newest_readable_ones_the_resumed_one_and_never_judges_newer_files(tmp_path):
    resumed = _fake_checkpoint(tmp_path, 2)
    _fake_checkpoint(tmp_path, 1)
    unreadable_old = _fake_checkpoint(tmp_path, 3, corrupt=True)
    higher = _fake_checkpoint(tmp_path, 60, corrupt=True)  # e.g. of an earlier, longer run
    readable: set = {resumed}
    for step in (4, 5, 6, 7):
        newest = _fake_checkpoint(tmp_path, step)
        readable.add(newest)
        prune_checkpoints(tmp_path, 3, newest, readable, protect=resumed)
        names = {p.name for p in list_checkpoints(tmp_path)}
        assert newest.name in names and resumed.name in names and higher.name in names
        assert unreadable_old.name not in names  # older than a readable one and unreadable: gone
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "ckpt_00000060.pth", "ckpt_00000007.pth", "ckpt_00000006.pth", "ckpt_00000005.pth", "ckpt_00000002.pth"]


def test_pruning_counts_only_readable_checkpoints_among_those_it_keeps(tmp_path):
    good = [_fake_checkpoint(tmp_path, s) for s in (1, 2)]
    _fake_checkpoint(tmp_path, 3, corrupt=True)
    _fake_checkpoint(tmp_path, 4, corrupt=True)
    newest = _fake_checkpoint(tmp_path, 5)
    removed = prune_checkpoints(tmp_path, 3, newest, {newest})
    assert sorted(p.name for p in removed) == ["ckpt_00000003.pth", "ckpt_00000004.pth"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_00000005.pth", good[1].name, good[0].name]
