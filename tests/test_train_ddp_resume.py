"""Issue 11, faults 3 (under DDP) and 6: two gloo ranks on the CPU.

- A SIGTERM to one rank only stops both at the same step boundary (the flag travels in the
  all-reduce every step already does), with one checkpoint and exit code 75 on both.
- Resuming from it gives the uninterrupted run's weights bit for bit, and its metrics: the
  interrupted epoch's running loss sums are summed over ranks before they are saved (the old
  trainer saved rank 0's and gave them to every rank: train_loss 1.1345 against 1.1133).
- BatchNorm running statistics are averaged over ranks for evaluation and in what is saved,
  so the logged val_loss is that of the saved weights (the old trainer evaluated each rank
  with its own statistics: 0.8071 logged, 0.8065 for the saved weights).
"""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch
import torch.multiprocessing as mp

from cvt_fast.training.resume import list_checkpoints, read_checkpoint
from cvt_fast.training.stop import EXIT_STOPPED
from training_runs import RUN, bar_reached, free_port, kill_all, rank_env, run_ranks, spawn_train, stderr_of, wait_for
from test_train_utils import make_dataset, state_dicts_max_diff, tiny_overrides


def _opts(data, out):
    # BatchNorm in every projection (dw_bn, the default), EMA on, random augmentation, mixup and
    # dropout: every piece of per-rank state that an exact resume needs. 6 steps per epoch.
    return tiny_overrides(data, out, TRAIN__END_EPOCH=3, TRAIN__SCALE_LR=False, TRAIN__EMA__ENABLED=True,
                          TRAIN__EMA__DECAY=0.5, AUG__MIXUP=0.8, AUG__MIXCUT=1.0, AUG__MIXUP_PROB=1.0,
                          MODEL__SPEC__DROP_RATE="[0.1, 0.1, 0.1]")


def _records(run):
    return [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_both_and_the_resumed_run_equals_an_uninterrupted_one(tmp_path):
    data = make_dataset(tmp_path / "data", train_per_class=32, val_per_class=5)  # 96 train, 15 val (odd)
    straight_run, stopped_run = tmp_path / "straight" / RUN, tmp_path / "stopped" / RUN
    results = run_ranks(_opts(data, tmp_path / "straight"), tmp_path)
    assert [code for code, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]

    port = free_port()
    ranks = [spawn_train(_opts(data, tmp_path / "stopped"), tmp_path, rank_env(r, 2, port), step_delay=0.3)
             for r in range(2)]
    try:
        wait_for(lambda: bar_reached(stderr_of(ranks[0]), "epoch 2/3", 1, 6), ranks)  # step 7 is done
        ranks[1].send_signal(signal.SIGTERM)  # rank 1 only
        codes = [r.wait(timeout=300) for r in ranks]
    finally:
        kill_all(ranks)
    err0 = stderr_of(ranks[0])
    assert codes == [EXIT_STOPPED, EXIT_STOPPED], err0[-3000:]
    (line,) = [s for s in err0.splitlines() if s.startswith("stopped: ")]
    newest = list_checkpoints(stopped_run)[0]
    assert line.startswith(f"stopped: stop requested on another rank: checkpoint {newest} written")
    state = read_checkpoint(newest)
    assert 6 < state["global_step"] < 12 and len(state["rank_statistics"]) == 2  # mid-epoch 2
    assert not (stopped_run / "final_state.pth").exists()

    results = run_ranks(_opts(data, tmp_path / "stopped"), tmp_path)
    assert [code for code, _ in results] == [0, 0], results[0][1][-3000:]
    for name in ("final_state.pth", "final_state_ema.pth"):
        a, b = (torch.load(run / name, weights_only=True) for run in (straight_run, stopped_run))
        assert state_dicts_max_diff(a, b) == 0.0, name
    straight, resumed = _records(straight_run), _records(stopped_run)
    assert [r["epoch"] for r in resumed] == [0, 1, 2]
    for a, b in zip(straight, resumed):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-12, abs=0)
        assert b["val_loss"] == a["val_loss"] and b["val_top1"] == a["val_top1"]
        assert b["val_loss_ema"] == a["val_loss_ema"]

    # The logged validation loss is that of the saved weights, evaluated in one process.
    from cvt_fast.test import evaluate_config
    from cvt_fast.config import load_config
    from training_runs import CFG

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = evaluate_config(load_config(CFG, _opts(data, tmp_path / "stopped")),
                                 str(stopped_run / "final_state.pth"))
    finally:
        torch.set_num_threads(threads)
    assert result["loss"] == pytest.approx(resumed[-1]["val_loss"], rel=1e-6)
    assert result["top1"] == resumed[-1]["val_top1"]


def _average_in_two_ranks(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from cvt_fast.training.distributed import averaged_batch_norm

        bn = torch.nn.BatchNorm2d(3)
        bn.running_mean.fill_(float(rank + 1))  # 1 and 2
        bn.running_var.fill_(float(4 * rank + 2))  # 2 and 6
        with averaged_batch_norm(torch.nn.Sequential(bn)):
            inside = (bn.running_mean.clone(), bn.running_var.clone())
        torch.save({"inside": inside, "after": (bn.running_mean.clone(), bn.running_var.clone())},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_batch_norm_statistics_are_averaged_inside_and_each_ranks_own_after(tmp_path):
    mp.spawn(_average_in_two_ranks, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        seen = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.equal(seen["inside"][0], torch.full((3,), 1.5)) and torch.equal(seen["inside"][1], torch.full((3,), 4.0))
        assert torch.equal(seen["after"][0], torch.full((3,), float(rank + 1)))
        assert torch.equal(seen["after"][1], torch.full((3,), float(4 * rank + 2)))
