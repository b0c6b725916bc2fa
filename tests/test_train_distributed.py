"""Two CPU processes (gloo, DistributedDataParallel) train exactly like one process on the
same global batch; both ranks end with identical weights (and EMA weights); metrics are
summed over ranks."""
from __future__ import annotations

import json
import os
import socket

import torch
import torch.multiprocessing as mp

from test_train_utils import REPO, make_dataset, state_dicts_max_diff, tiny_overrides

CFG = str(REPO / "experiments/digits/cvt-digits.yaml")


def _deterministic_opts(data, out, batch: int) -> list[str]:
    # No randomness outside the initialisation: full-image crops (scale = ratio = 1), no flips,
    # no mixup, no dropout; 'linear' q/k/v projections so no BatchNorm statistics depend on
    # how the global batch is split.
    return tiny_overrides(data, out, TRAIN__BATCH_SIZE_PER_GPU=batch, AUG__SCALE="[1.0, 1.0]",
                          AUG__RATIO="[1.0, 1.0]", TRAIN__SCALE_LR=False,
                          TRAIN__EMA__ENABLED=True, TRAIN__EMA__DECAY=0.5,
                          MODEL__SPEC__QKV_PROJ_METHOD="['linear', 'linear', 'linear']")


def _rank_main(rank: int, world: int, port: int, opts: list[str], dump_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from cvt_fast.config import load_config
    from cvt_fast.training import distributed as dist_utils
    from cvt_fast.training.loop import Trainer

    cfg = load_config(CFG, opts)
    info = dist_utils.init_distributed(device="cpu")
    try:
        assert torch.distributed.get_backend() == "gloo"
        trainer = Trainer(cfg, os.path.join(cfg.OUTPUT_DIR, "ddp"), info)
        trainer.fit()
        torch.save({"model": trainer.model.state_dict(), "ema": trainer.ema.module.state_dict()},
                   os.path.join(dump_dir, f"rank{rank}.pt"))
    finally:
        dist_utils.cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_match_one_process_on_the_same_global_batch(tmp_path):
    from cvt_fast.config import load_config
    from cvt_fast.training import distributed as dist_utils
    from cvt_fast.training.loop import Trainer

    data = make_dataset(tmp_path / "data", train_per_class=16, val_per_class=5)  # 48 train, 15 val (odd)
    mp.spawn(_rank_main, args=(2, _free_port(), _deterministic_opts(data, tmp_path / "two", 8), str(tmp_path)),
             nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert state_dicts_max_diff(rank0["model"], rank1["model"]) == 0.0
    assert state_dicts_max_diff(rank0["ema"], rank1["ema"]) == 0.0

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_config(CFG, _deterministic_opts(data, tmp_path / "one", 16))
        single = Trainer(cfg, tmp_path / "one" / "ddp", dist_utils.DistInfo(0, 1, 0, torch.device("cpu")))
        initial = {k: v.clone() for k, v in single.model.state_dict().items()}
        single.fit()
    finally:
        torch.set_num_threads(threads)
    # Equal up to rounding (splitting the batch reorders the gradient sums), except proj_k's
    # bias: it shifts every score of a row by the same amount, which the softmax ignores, so its
    # true gradient is zero and AdamW turns the rounding noise in it into steps of up to lr.
    # Those are bounded only by how far training moved the weights at all.
    moved = state_dicts_max_diff(initial, single.model.state_dict())
    for name, two_ranks, one in (("model", rank0["model"], single.model.state_dict()),
                                 ("ema", rank0["ema"], single.ema.module.state_dict())):
        noise_only = [k for k in one if k.endswith("attn.proj_k.bias")]
        assert noise_only, "the model has no proj_k biases: update this test"
        rest = [k for k in one if k not in noise_only]
        assert state_dicts_max_diff(*({k: sd[k] for k in rest} for sd in (two_ranks, one))) <= 1e-5, name
        assert state_dicts_max_diff(*({k: sd[k] for k in noise_only} for sd in (two_ranks, one))) <= moved, name
    # Only rank 0 wrote files, and its metrics are those of the whole global batch / val set.
    two = [json.loads(s) for s in (tmp_path / "two/ddp/metrics.jsonl").read_text().splitlines()]
    one = [json.loads(s) for s in (tmp_path / "one/ddp/metrics.jsonl").read_text().splitlines()]
    assert len(two) == len(one) == 2
    for a, b in zip(two, one):
        assert abs(a["train_loss"] - b["train_loss"]) <= 1e-5 * max(1.0, abs(b["train_loss"]))
        assert abs(a["val_loss"] - b["val_loss"]) <= 1e-5 * max(1.0, abs(b["val_loss"]))
        assert a["val_top1"] == b["val_top1"] and a["val_top5"] == b["val_top5"]
