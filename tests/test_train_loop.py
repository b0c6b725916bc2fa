"""The training loop in-process on a tiny model: outputs, EMA, AMP, non-finite loss, test CLI."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn

from cvt_fast.training import distributed as dist_utils
from cvt_fast.training.loop import NonFiniteLossError, Trainer
from cvt_fast.training.resume import list_checkpoints, read_checkpoint
from test_train_utils import REPO, make_dataset, one_thread, tiny_overrides  # noqa: F401 (fixture)

CPU = dist_utils.DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One 2-epoch run through the CLI (EMA on, step checkpoints), shared by the tests below."""
    from cvt_fast.train import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("run")
    data = make_dataset(tmp / "data")
    opts = tiny_overrides(data, tmp / "out", TRAIN__EMA__ENABLED=True, TRAIN__EMA__DECAY=0.5,
                          TRAIN__CHECKPOINT_EVERY_STEPS=2)
    assert main(["--cfg", str(REPO / "experiments/digits/cvt-digits.yaml"), *opts]) == 0
    torch.set_num_threads(threads)
    return tmp, opts, tmp / "out" / "cvt-digits"


def test_run_writes_metrics_plot_log_tensorboard_and_checkpoints(tiny_run):
    _, _, run = tiny_run
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    for r in records:
        for key in ("epoch", "lr", "train_loss", "val_loss", "val_top1", "val_top5", "images_per_s", "val_top1_ema",
                    "data_wait_s", "data_wait_fraction"):
            assert key in r and math.isfinite(r[key]), key
        assert 0.0 < r["data_wait_s"] < r["epoch_seconds"] and 0.0 < r["data_wait_fraction"] < 1.0
        assert 0.0 <= r["val_top1"] <= r["val_top5"] <= 100.0
    png = run / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    log = (run / "train.log").read_text()
    assert "epoch 2/2: train loss" in log and "checkpoint" in log
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "config.yaml").exists() and (run / "model_best.pth").exists()
    assert (run / "final_state_ema.pth").exists()
    ckpts = list_checkpoints(run)
    assert ckpts and ckpts[0].name == "ckpt_00000006.pth"  # 3 steps/epoch x 2 epochs
    state = read_checkpoint(ckpts[0])
    assert state["epoch"] == 2 and state["step_in_epoch"] == 0 and state["ema"] is not None
    assert {"python", "numpy", "torch"} <= set(state["rng"][0])
    final = torch.load(run / "final_state.pth", weights_only=True)
    assert all(torch.equal(final[k], state["model"][k]) for k in final)


@pytest.mark.parametrize("kind", ["ours", "official", "hf", "training_checkpoint"])
def test_test_cli_reproduces_the_final_validation_numbers(tiny_run, kind, capsys, one_thread):
    from cvt_fast.checkpoint import atomic_save
    from cvt_fast.hf_convert import official_to_hf
    from cvt_fast.test import main

    tmp, opts, run = tiny_run
    final = torch.load(run / "final_state.pth", weights_only=True)
    path = {"ours": run / "final_state.pth", "training_checkpoint": list_checkpoints(run)[0]}.get(kind)
    if kind == "official":
        path = tmp / "official.pth"
        atomic_save({"model": "cls_cvt", "state_dict": final}, path)
    elif kind == "hf":
        path = tmp / "hf.bin"
        atomic_save(official_to_hf(final), path)
    capsys.readouterr()
    assert main(["--cfg", str(REPO / "experiments/digits/cvt-digits.yaml"), *opts, "TEST.MODEL_FILE", str(path)]) == 0
    out = capsys.readouterr().out
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert f"top-1 {last['val_top1']:.3f}%" in out and f"loss {last['val_loss']:.4f}" in out
    assert "(12 images" in out


def test_checkpoint_of_another_architecture_is_a_one_line_error(tiny_run, capsys, one_thread):
    from cvt_fast.test import main

    _, opts, run = tiny_run
    code = main(["--cfg", str(REPO / "experiments/digits/cvt-digits.yaml"), *opts,
                 "MODEL.SPEC.DIM_EMBED", "[16, 32, 64]", "MODEL.SPEC.NUM_HEADS", "[1, 2, 4]",
                 "TEST.MODEL_FILE", str(run / "final_state.pth")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)
    assert "shape" in err[-1]


class NaNAt(nn.Module):
    """Wraps a model; the `bad_call`-th training forward returns NaN logits."""

    def __init__(self, inner: nn.Module, bad_call: int):
        super().__init__()
        self.inner, self.bad_call, self.calls = inner, bad_call, 0

    def forward(self, x):
        out = self.inner(x)
        if self.training:
            self.calls += 1
            if self.calls == self.bad_call:
                out = out * float("nan")
        return out


def _nan_trainer(tmp_path, skip: bool) -> Trainer:
    from cvt_fast.config import load_config
    from cvt_fast.model import build_model_from_config

    data = make_dataset(tmp_path / "data")
    cfg = load_config(str(REPO / "experiments/digits/cvt-digits.yaml"),
                      tiny_overrides(data, tmp_path / "out", TRAIN__CHECKPOINT_EVERY_STEPS=1,
                                     TRAIN__SKIP_NONFINITE_LOSS=skip, TRAIN__END_EPOCH=1))
    return Trainer(cfg, tmp_path / "out" / "run", CPU, lambda c: NaNAt(build_model_from_config(c), bad_call=3))


def test_nonfinite_loss_stops_naming_the_step_and_leaves_weights_untouched(tmp_path, one_thread):
    trainer = _nan_trainer(tmp_path, skip=False)
    with pytest.raises(NonFiniteLossError, match=r"global step 2\)"):
        trainer.fit()
    saved = read_checkpoint(list_checkpoints(trainer.run_dir)[0])
    assert saved["global_step"] == 2
    now = trainer.model.state_dict()
    assert all(torch.equal(now[k], saved["model"][k]) for k in now)


def test_nonfinite_loss_is_skipped_when_configured(tmp_path, one_thread):
    trainer = _nan_trainer(tmp_path, skip=True)
    record = trainer.fit()
    assert record["skipped_steps"] == 1 and math.isfinite(record["train_loss"])
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert trainer.pos.global_step == 3


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_amp_steps_on_cpu_with_a_scaler_only_for_float16(tmp_path, dtype, one_thread):
    from cvt_fast.config import load_config

    data = make_dataset(tmp_path / "data")
    cfg = load_config(str(REPO / "experiments/digits/cvt-digits.yaml"),
                      tiny_overrides(data, tmp_path / "out", AMP__ENABLED=True, AMP__DTYPE=dtype,
                                     TRAIN__MAX_STEPS=1, TRAIN__CLIP_GRAD_NORM=1.0, TRAIN__CHANNELS_LAST=True))
    trainer = Trainer(cfg, tmp_path / "out" / "run", CPU)
    assert trainer.scaler.is_enabled() == (dtype == "float16")
    before = [p.detach().clone() for p in trainer.model.parameters()]
    record = trainer.fit()
    assert trainer.pos.global_step == 1 and math.isfinite(record["train_loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    # Stopped mid-epoch by TRAIN.MAX_STEPS: the checkpoint stays mid-epoch.
    state = read_checkpoint(list_checkpoints(trainer.run_dir)[0])
    assert (state["epoch"], state["step_in_epoch"]) == (0, 1)


def test_compile_channels_last_and_unsupported_official_keys_are_wired(tmp_path, monkeypatch, one_thread):
    from cvt_fast.config import load_config

    data = make_dataset(tmp_path / "data")
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiled.append(type(m).__name__) or m)
    cfg = load_config(str(REPO / "experiments/digits/cvt-digits.yaml"),
                      tiny_overrides(data, tmp_path / "out", TRAIN__COMPILE=True, AMP__MEMORY_FORMAT="nhwc"))
    trainer = Trainer(cfg, tmp_path / "out" / "run", CPU)
    assert len(compiled) == 2 and trainer.channels_last  # the training and the evaluation module
    for key, value, match in (("FINETUNE.FINETUNE", "True", "MODEL.PRETRAINED"),
                              ("DATASET.SAMPLER", "repeated_aug", "repeated_aug"),
                              ("TRAIN.OPTIMIZER", "timm", "adamw")):
        bad = load_config(str(REPO / "experiments/digits/cvt-digits.yaml"),
                          tiny_overrides(data, tmp_path / "out") + [key, value])
        with pytest.raises(ValueError, match=match):
            Trainer(bad, tmp_path / "out" / "bad", CPU)


def test_no_evaluation_before_eval_begin_epoch(tmp_path, one_thread):
    from cvt_fast.config import load_config

    data = make_dataset(tmp_path / "data")
    cfg = load_config(str(REPO / "experiments/digits/cvt-digits.yaml"),
                      tiny_overrides(data, tmp_path / "out", TRAIN__EVAL_BEGIN_EPOCH=1, TRAIN__SAVE_ALL_MODELS=True))
    trainer = Trainer(cfg, tmp_path / "out" / "run", CPU)
    trainer.fit()
    records = [json.loads(s) for s in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["val_top1"] is None and records[1]["val_top1"] is not None
    assert (trainer.run_dir / "model_0.pth").exists() and (trainer.run_dir / "model_1.pth").exists()
    assert (trainer.run_dir / "model_best.pth").exists()


def test_input_bound_training_warns_once_with_what_to_do_and_records_the_wait(tmp_path, monkeypatch, one_thread):
    """A loader far slower than the model step: the run says so once (not once per step or epoch),
    naming the remedies, and every epoch's record carries its waiting share."""
    import logging
    import time

    from cvt_fast.config import load_config
    from cvt_fast.training.data import ImageFolderDataset
    from cvt_fast.training.logs import LOGGER_NAME

    load = ImageFolderDataset._load
    monkeypatch.setattr(ImageFolderDataset, "_load", staticmethod(lambda path: time.sleep(0.04) or load(path)))
    data = make_dataset(tmp_path / "data")
    cfg = load_config(str(REPO / "experiments/digits/cvt-digits.yaml"),
                      tiny_overrides(data, tmp_path / "out", TRAIN__END_EPOCH=3))
    trainer = Trainer(cfg, tmp_path / "out" / "run", CPU)
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger(LOGGER_NAME)
    collect = Collect(logging.WARNING)
    logger.addHandler(collect)
    try:
        trainer.fit()
    finally:
        logger.removeHandler(collect)
    warnings = [m for m in messages if "input-bound" in m]
    assert len(warnings) == 1, warnings
    for remedy in ("raise WORKERS", "DATA.LOADER dali", "python -m cvt_fast.data prepare"):
        assert remedy in warnings[0]
    records = [json.loads(s) for s in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3
    # 8 images x 40 ms a batch against a tiny model's step: most of the step is waiting.
    assert all(r["data_wait_fraction"] > 0.4 and r["data_wait_s"] > 3 * 8 * 0.04 for r in records)


def test_input_wait_meter_judges_after_its_steps_above_the_threshold_only_once():
    from cvt_fast.training.input_wait import InputWaitMeter

    meter = InputWaitMeter(threshold=0.2, min_steps=3, workers=2, loader="torch")
    meter.add(0.5, 1.0)
    meter.add(0.5, 1.0)
    assert meter.warning() is None  # too few steps to judge
    meter.add(0.5, 1.0)
    message = meter.warning()
    assert message and "50%" in message and "WORKERS 2" in message and "about 4" in message
    assert meter.warning() is None  # once
    calm = InputWaitMeter(threshold=0.2, min_steps=1)
    calm.add(0.1, 1.0)
    assert calm.warning() is None and calm.fraction == pytest.approx(0.1)
    off = InputWaitMeter(threshold=0.0, min_steps=1)
    off.add(0.9, 1.0)
    assert off.warning() is None
    on_dali = InputWaitMeter(threshold=0.2, min_steps=1, workers=4, loader="dali")
    on_dali.add(0.5, 1.0)
    advice = on_dali.warning()
    assert "DATA.LOADER dali," in advice and "set DATA.LOADER dali" not in advice and "prepare" in advice
