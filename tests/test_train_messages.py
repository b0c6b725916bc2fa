"""Issue 11, fault 9: what the trainer and the model say.

Reproduced, one test each: log lines written mid-epoch were glued onto the progress bar's
line; the bar counted epochs from 1 where the log counted from 0; `TRAIN.LR 0.1 --cfg x`
was refused as "unknown config key --cfg"; the non-finite-loss error pointed to "the newest
checkpoint" when none existed; a garbage checkpoint's warning repeated torch's advice that
weights_only=False "will likely succeed"; an empty batch, a float16 batch into a float32
model and num_classes=-1 gave raw torch errors or a model without a head. (MODEL.BACKEND,
AMP.DTYPE and TRAIN.LR_SCHEDULER.ARGS are in test_config.py.)
"""
from __future__ import annotations

import os
import re

import pytest
import torch

from cvt_fast.training import distributed as dist_utils
from cvt_fast.training.cli import parse_args
from cvt_fast.training.loop import NonFiniteLossError, Trainer
from cvt_fast.training.resume import read_checkpoint
from training_runs import RUN, train_in_process
from test_train_utils import load_tiny_config, make_dataset, one_thread, tiny_overrides  # noqa: F401

CPU = dist_utils.DistInfo(0, 1, 0, torch.device("cpu"))
STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (INFO|WARNING|ERROR) ")


def as_on_a_terminal(text: str) -> list[str]:
    """The lines a terminal shows for `text`: a carriage return moves back to the start of the
    line, and what follows overwrites what was there."""
    shown = []
    for raw in text.split("\n"):
        line = ""
        for part in raw.split("\r"):
            line = part + line[len(part):]
        shown.append(line.rstrip())
    return shown


def test_log_lines_never_share_a_line_with_the_progress_bar_and_count_epochs_like_it(tmp_path, capsys):
    data = make_dataset(tmp_path / "data")
    opts = tiny_overrides(data, tmp_path / "out", PRINT_FREQ=1, TRAIN__CHECKPOINT_EVERY_STEPS=1)
    assert train_in_process(opts) == 0
    lines = as_on_a_terminal(capsys.readouterr().err)
    logged = [line for line in lines if " INFO " in line or " WARNING " in line]
    assert len(logged) > 10
    assert all(STAMP.match(line) for line in logged), [line for line in logged if not STAMP.match(line)]
    bars = [line for line in lines if line.startswith("epoch ") and "|" in line]
    assert {line.split(":")[0] for line in bars} == {"epoch 1/2", "epoch 2/2"}
    # What the log says during the bar's "epoch 1/2" counts the same way.
    checkpoints = [line for line in logged if "ckpt_00000001.pth" in line or "ckpt_00000002.pth" in line]
    assert len(checkpoints) == 2 and all("(epoch 1/2, step " in line for line in checkpoints), checkpoints
    steps = [line.split(" INFO ")[1].split(" step")[0] for line in logged if " step 1/3 " in line]
    assert steps == ["epoch 1/2", "epoch 2/2"]
    assert any("=> epoch 1/2: train loss" in line for line in logged)


def test_cfg_may_come_after_the_overrides():
    args = parse_args("train", "", ["TRAIN.LR", "0.1", "--cfg", "x.yaml", "TRAIN.WD", "0"])
    assert args.cfg == "x.yaml" and args.opts == ["TRAIN.LR", "0.1", "TRAIN.WD", "0"]
    args = parse_args("train", "", ["TRAIN.LR", "0.1", "--cfg=y.yaml"])
    assert args.cfg == "y.yaml" and args.opts == ["TRAIN.LR", "0.1"]
    with pytest.raises(SystemExit):
        parse_args("train", "", ["--cfg", "a.yaml", "TRAIN.LR", "0.1", "--cfg", "b.yaml"])


class NaNFirst(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) * float("nan")


def test_nonfinite_loss_before_any_checkpoint_says_there_is_none(tmp_path, one_thread):
    from cvt_fast.model import build_model_from_config

    cfg = load_tiny_config(make_dataset(tmp_path / "data"), tmp_path / "out")
    trainer = Trainer(cfg, tmp_path / "out" / RUN, CPU, lambda c: NaNFirst(build_model_from_config(c)))
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit()
    message = str(info.value)
    assert "no checkpoint has been written yet" in message and "newest checkpoint" not in message


@pytest.mark.parametrize("head", [b"\x80\x02", b"PK\x03\x04"])
def test_a_garbage_checkpoint_is_called_damaged_without_torchs_weights_only_advice(tmp_path, head):
    path = tmp_path / "ckpt_00000001.pth"
    path.write_bytes(head + os.urandom(3000))
    with pytest.raises(ValueError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "damaged" in message
    assert "weights_only" not in message and "likely succeed" not in message and "\n" not in message


def _tiny_model(num_classes=3):
    from cvt_fast.model import build_model
    from cvt_fast.specs import MODEL_SPECS

    spec = dict(MODEL_SPECS["cvt-13"], PATCH_SIZE=[3, 3, 3], PATCH_STRIDE=[2, 2, 2], PATCH_PADDING=[1, 1, 1],
                DIM_EMBED=[16, 32, 48], NUM_HEADS=[1, 2, 3], DEPTH=[1, 1, 1])
    return build_model(spec, num_classes=num_classes, backend="reference")


def test_model_input_errors_name_the_problem():
    model = _tiny_model().eval()
    with pytest.raises(ValueError, match=r"empty batch \(shape \(0, 3, 16, 16\)\)"):
        model(torch.empty(0, 3, 16, 16))
    with pytest.raises(TypeError, match=r"torch\.float16 but the model's weights are torch\.float32.*autocast"):
        model(torch.randn(2, 3, 16, 16).half())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts for the model: allowed
        assert model(torch.randn(2, 3, 16, 16).bfloat16()).shape == (2, 3)
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match=rf"num_classes must be an int >= 0.*got {bad!r}"):
            _tiny_model(bad)
    with pytest.raises(ValueError, match="num_classes must be an int >= 0"):
        model.reset_classifier(-1)
    assert _tiny_model(0).eval()(torch.randn(1, 3, 16, 16)).shape == (1, 48)  # 0: features, as documented
