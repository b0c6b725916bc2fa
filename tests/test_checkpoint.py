"""Checkpoint loading and saving: every accepted layout, every failure message, atomic writes."""
import copy
import os

import pytest
import torch
from torch import nn

from cvt_fast.checkpoint import (
    CheckpointError,
    atomic_save,
    describe_architecture,
    load_checkpoint,
    official_state_dict,
    save_official_state_dict,
)
from cvt_fast.model import build_model, create_model
from tests.tiny_spec import tiny_spec
from tests.tolerances import assert_close

SMALL = tiny_spec(DROP_PATH_RATE=[0.0, 0.0, 0.1])


def small_model(num_classes=10, **changes):
    spec = copy.deepcopy(SMALL)
    spec.update(changes)
    return build_model(spec, num_classes, backend="official")


def trained_like(model):
    """Seeded non-trivial values everywhere, so a wrongly loaded tensor shows up."""
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                tensor.fill_(123)
            elif name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
            else:
                tensor.normal_(0.0, 0.3)
    return model.eval()


@pytest.fixture
def source():
    return trained_like(small_model())


def assert_same_weights(model, reference):
    got, want = model.state_dict(), reference.state_dict()
    assert list(got) == list(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key


def assert_same_logits(model, reference, size=(40, 40)):
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        assert_close(model.eval()(x), reference.eval()(x))


# ----------------------------------------------------------------------------- layouts


def wrap(state_dict, layout):
    if layout == "bare":
        return state_dict
    if layout == "official_trainer":  # lib/utils/utils.py of the official code
        return {"epoch": 3, "model": "cls_cvt", "state_dict": state_dict, "perf": 81.2,
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]}}
    if layout == "cvt_fast_training":
        ema = {k: v + 1 if v.is_floating_point() else v for k, v in state_dict.items()}
        return {"model": state_dict, "ema": ema, "optimizer": {"state": {}, "param_groups": []},
                "scheduler": {"last_epoch": 3}, "epoch": 3, "step": 1000, "scaler": {"scale": 1024.0}}
    if layout == "ddp":
        return {"module." + k: v for k, v in state_dict.items()}
    if layout == "ddp_under_state_dict":
        return {"state_dict": {"module." + k: v for k, v in state_dict.items()}}
    if layout == "compiled_ddp":
        return {"model": {"module._orig_mod." + k: v for k, v in state_dict.items()}}
    raise AssertionError(layout)


LAYOUTS = ["bare", "official_trainer", "cvt_fast_training", "ddp", "ddp_under_state_dict", "compiled_ddp"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_official_and_training_layout_loads_strictly_from_a_file(tmp_path, source, layout):
    path = tmp_path / "ckpt.pth"
    torch.save(wrap(source.state_dict(), layout), path)
    model = small_model()
    report = load_checkpoint(model, path)
    assert_same_weights(model, source)
    assert_same_logits(model, source)
    assert report.format == "official" and not report.missing and not report.unexpected
    assert str(path) in report.source
    assert report.wrapper == {"bare": None, "ddp": None, "official_trainer": "state_dict",
                              "ddp_under_state_dict": "state_dict"}.get(layout, "model")


def test_in_memory_state_dict_loads_and_the_report_says_what_happened(source):
    model = small_model()
    report = load_checkpoint(model, source.state_dict())
    assert_same_weights(model, source)
    assert len(report.loaded) == len(source.state_dict())
    assert "loaded" in str(report) and "<state dict>" in str(report)


def test_training_checkpoint_loads_the_model_weights_not_the_ema(source):
    model = small_model()
    load_checkpoint(model, wrap(source.state_dict(), "cvt_fast_training"))
    assert_same_weights(model, source)


def test_missing_num_batches_tracked_is_accepted(source):
    state_dict = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    model = small_model()
    load_checkpoint(model, state_dict)
    assert_same_logits(model, source)


def test_fp16_checkpoint_loads_into_an_fp32_model(source):
    model = small_model()
    load_checkpoint(model, {k: v.half() if v.is_floating_point() else v for k, v in source.state_dict().items()})
    assert model.head.weight.dtype == torch.float32
    assert_close(model.head.weight, source.head.weight, dtype=torch.float16)


def test_loading_into_a_ddp_style_wrapper_loads_the_inner_model(source):
    class Wrapper(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    wrapped = Wrapper(small_model())
    load_checkpoint(wrapped, source.state_dict())
    assert_same_weights(wrapped.module, source)


# ------------------------------------------------------------------ mismatch messages


def test_strict_mismatch_names_missing_unexpected_and_wrongly_shaped_keys(source):
    state_dict = dict(source.state_dict())
    del state_dict["stage1.blocks.0.mlp.fc1.bias"]
    state_dict["stage1.blocks.0.attn.qkv.weight"] = torch.randn(3, 3)
    state_dict["stage2.blocks.1.attn.proj_k.weight"] = torch.randn(48, 40)
    model = small_model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(model, state_dict)
    message = str(info.value)
    assert "<state dict>" in message and "strict=True" in message
    assert "1 missing key(s)" in message and "stage1.blocks.0.mlp.fc1.bias" in message
    assert "1 unexpected key(s)" in message and "stage1.blocks.0.attn.qkv.weight" in message
    assert "1 key(s) with another shape" in message
    assert "stage2.blocks.1.attn.proj_k.weight: file (48, 40) vs model (48, 48)" in message
    # Nothing was loaded: a failed load leaves the model as it was.
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_long_key_lists_are_cut_to_ten_with_a_count(source):
    state_dict = {k: v for k, v in source.state_dict().items() if ".blocks." not in k}
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(small_model(), state_dict)
    message = str(info.value)
    missing = [k for k in source.state_dict() if ".blocks." in k and not k.endswith("num_batches_tracked")]
    assert f"{len(missing)} missing key(s)" in message
    assert f"({len(missing) - 10} more)" in message
    assert missing[10] not in message


def test_non_strict_loads_the_matching_keys_and_reports_the_rest(source):
    state_dict = dict(source.state_dict())
    del state_dict["norm.weight"]
    state_dict["extra.weight"] = torch.randn(2)
    model = small_model()
    report = load_checkpoint(model, state_dict, strict=False)
    assert report.missing == ["norm.weight"] and report.unexpected == ["extra.weight"]
    assert torch.equal(model.head.weight, source.head.weight)
    assert "1 missing" in str(report) and "1 unexpected" in str(report)


def test_non_strict_still_refuses_wrong_shapes(source):
    state_dict = dict(source.state_dict())
    state_dict["norm.weight"] = torch.randn(47)
    with pytest.raises(CheckpointError, match=r"norm.weight: file \(47,\) vs model \(48,\)"):
        load_checkpoint(small_model(), state_dict, strict=False)


def test_a_state_dict_of_another_network_is_named_as_not_cvt():
    other = {"conv1.weight": torch.randn(8, 3, 3, 3), "fc.weight": torch.randn(10, 8)}
    with pytest.raises(CheckpointError, match="not a CvT checkpoint"):
        load_checkpoint(small_model(), other, strict=False)


def test_another_architecture_is_named_in_the_error(monkeypatch):
    # Only key names and shapes matter here: skip the slow random initialisation.
    monkeypatch.setattr(nn.init, "trunc_normal_", lambda tensor, *args, **kwargs: tensor)
    cvt21 = create_model("cvt-21")
    cvt13 = create_model("cvt-13")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(cvt13, cvt21.state_dict())
    message = str(info.value)
    assert "looks like cvt-21 (DIM_EMBED [64, 192, 384], DEPTH [1, 4, 16])" in message
    assert "the model is cvt-13 (DIM_EMBED [64, 192, 384], DEPTH [1, 2, 10])" in message
    assert "unexpected key(s)" in message and "stage2.blocks.15.mlp.fc2.weight" not in message.split("\n")[0]


def test_a_wider_architecture_fails_even_when_not_strict(source):
    wide = small_model(DIM_EMBED=[24, 48, 72], NUM_HEADS=[1, 2, 3])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(small_model(), wide.state_dict(), strict=False)
    assert "DIM_EMBED [24, 48, 72]" in str(info.value) and "with another shape" in str(info.value)


def test_describe_architecture_reads_widths_depths_and_classes(source):
    arch = describe_architecture(source.state_dict())
    assert arch == {"DIM_EMBED": [16, 32, 48], "DEPTH": [1, 1, 2], "num_classes": 10}


# ------------------------------------------------------------------------ fine-tuning


def test_other_head_size_fails_with_a_hint_and_loads_with_reset_head(source):
    model = small_model(num_classes=5)
    with pytest.raises(CheckpointError, match="reset_head=True") as info:
        load_checkpoint(model, source.state_dict())
    assert "head.weight: file (10, 48) vs model (5, 48)" in str(info.value)

    report = load_checkpoint(model, source.state_dict(), reset_head=True)
    assert report.head_reset and sorted(report.skipped) == ["head.bias", "head.weight"]
    assert model.head.weight.shape == (5, 48) and model.num_classes == 5
    # The head is freshly initialised (trunc normal, std 0.02; zero bias), everything else loaded.
    assert model.head.weight.std() < 0.05 and torch.count_nonzero(model.head.bias) == 0
    got = model.state_dict()
    for key, value in source.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(got[key], value), key
    assert model(torch.randn(2, 3, 40, 40)).shape == (2, 5)


def test_reset_head_keeps_a_head_of_the_right_shape(source):
    model = small_model(num_classes=10)
    report = load_checkpoint(model, source.state_dict(), reset_head=True)
    assert not report.head_reset and not report.skipped
    assert_same_weights(model, source)


def test_reset_head_on_a_headless_file_initialises_the_head(source):
    state_dict = {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}
    model = small_model(num_classes=3)
    report = load_checkpoint(model, state_dict, reset_head=True)
    assert report.head_reset and model.head.weight.shape == (3, 48)


def test_a_224_checkpoint_loads_and_runs_at_384(tmp_path, source):
    path = tmp_path / "cvt-224.pth"
    save_official_state_dict(source, path)
    model = small_model().eval()
    load_checkpoint(model, path)
    x = torch.randn(1, 3, 384, 384)
    with torch.no_grad():
        logits = model(x)
        expected = source(x)
    assert logits.shape == (1, 10)
    assert_close(logits, expected)


# ------------------------------------------------------------------------- bad files


def test_truncated_file_is_a_checkpoint_error_naming_the_file(tmp_path, source):
    path = tmp_path / "truncated.pth"
    torch.save(source.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(small_model(), path)
    assert str(path) in str(info.value) and "truncated or corrupt" in str(info.value)


def test_truncated_legacy_pickle_file_is_a_checkpoint_error(tmp_path, source):
    path = tmp_path / "legacy.pth"
    torch.save(source.state_dict(), path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="damaged pickle checkpoint") as info:
        load_checkpoint(small_model(), path)
    assert str(path) in str(info.value)


def test_hf_keys_mixed_with_foreign_keys_are_named(source):
    from cvt_fast.hf_convert import official_to_hf

    state_dict = official_to_hf(source.state_dict())
    state_dict["cvt.encoder.stages.0.adapter.weight"] = torch.randn(2)
    with pytest.raises(CheckpointError, match="Hugging Face CvT keys.*'cvt.encoder.stages.0.adapter.weight'"):
        load_checkpoint(small_model(), state_dict)


def test_truncated_safetensors_file_is_a_checkpoint_error(tmp_path, source):
    path = tmp_path / "model.safetensors"
    save_official_state_dict(source, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="not a valid safetensors file") as info:
        load_checkpoint(small_model(), path)
    assert str(path) in str(info.value)


def test_random_bytes_are_not_a_checkpoint(tmp_path):
    path = tmp_path / "noise.pth"
    path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(small_model(), path)
    assert str(path) in str(info.value)
    assert "not a PyTorch or safetensors checkpoint" in str(info.value) or "corrupt" in str(info.value)


def test_empty_missing_and_directory_paths(tmp_path):
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="is empty"):
        load_checkpoint(small_model(), empty)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(small_model(), tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="holds none of"):
        load_checkpoint(small_model(), tmp_path)


@pytest.mark.parametrize("content, message", [
    ([1, 2, 3], "holds a list, not a state dict"),
    ({"epoch": 3, "lr": 0.1}, "holds no state dict: its entries are 'epoch', 'lr'"),
    ({"a.weight": torch.zeros(2), "b": 3}, "entry 'b' is a int, not a tensor"),
])
def test_files_without_a_state_dict_say_what_they_hold(tmp_path, content, message):
    path = tmp_path / "thing.pth"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(small_model(), path)


class PickledConfig:
    """A custom object in a checkpoint, which weights_only loading refuses."""

    def __init__(self):
        self.lr = 0.1


def test_unsafe_pickles_are_refused_unless_trusted(tmp_path, source):
    path = tmp_path / "with_object.pth"
    torch.save({"model": source.state_dict(), "config": PickledConfig()}, path)
    with pytest.raises(CheckpointError, match="weights_only=False") as info:
        load_checkpoint(small_model(), path)
    assert "PickledConfig" in str(info.value)
    model = small_model()
    load_checkpoint(model, path, weights_only=False)
    assert_same_weights(model, source)


def test_bad_argument_types_raise_type_error(source):
    with pytest.raises(TypeError, match="expected a file path or a state dict"):
        load_checkpoint(small_model(), 42)
    with pytest.raises(TypeError, match="expected a torch.nn.Module"):
        load_checkpoint(source.state_dict(), "x.pth")


# ---------------------------------------------------------------------------- saving


def test_atomic_save_writes_the_file_and_leaves_no_temporary(tmp_path, source):
    path = tmp_path / "ckpt.pth"
    atomic_save({"model": source.state_dict(), "epoch": 1}, path)
    assert os.listdir(tmp_path) == ["ckpt.pth"]
    loaded = torch.load(path, weights_only=True)
    assert loaded["epoch"] == 1
    model = small_model()
    load_checkpoint(model, path)
    assert_same_weights(model, source)


def test_atomic_save_survives_a_crash_before_the_rename(tmp_path, monkeypatch, source):
    path = tmp_path / "ckpt.pth"
    atomic_save({"epoch": 1}, path)
    old_bytes = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("simulated crash during rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        atomic_save({"epoch": 2, "model": source.state_dict()}, path)
    assert path.read_bytes() == old_bytes
    assert os.listdir(tmp_path) == ["ckpt.pth"]


def test_atomic_save_survives_a_failure_while_writing(tmp_path):
    path = tmp_path / "ckpt.pth"
    atomic_save({"epoch": 1}, path)
    old_bytes = path.read_bytes()

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot serialise this")

    with pytest.raises(RuntimeError, match="cannot serialise"):
        atomic_save({"epoch": 2, "bad": Unpicklable()}, path)
    assert path.read_bytes() == old_bytes
    assert os.listdir(tmp_path) == ["ckpt.pth"]


def test_atomic_save_creates_the_folder_and_uses_normal_permissions(tmp_path):
    path = tmp_path / "a" / "b" / "ckpt.pth"
    atomic_save({"x": torch.ones(2)}, path)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("name", ["official.pth", "official.safetensors"])
def test_save_official_state_dict_writes_a_bare_official_file(tmp_path, source, name):
    class Compiled(nn.Module):  # torch.compile's wrapper keeps the model as _orig_mod
        def __init__(self, module):
            super().__init__()
            self._orig_mod = module

    path = tmp_path / name
    save_official_state_dict(Compiled(source), path)
    if name.endswith(".pth"):
        raw = torch.load(path, weights_only=True)
        assert list(raw) == list(source.state_dict())
    model = small_model()
    report = load_checkpoint(model, path)
    assert report.wrapper is None
    assert_same_weights(model, source)
    assert list(official_state_dict(Compiled(source))) == list(source.state_dict())
