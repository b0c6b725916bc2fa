"""Backend choice: the backend table, precedence, 'auto' by evidence (the tuning file), clear
errors for backends that cannot run, the peers."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch

import cvt_fast
import cvt_fast.ops as ops
from cvt_fast.ops import backend as backend_module
from cvt_fast.ops import backends as backends_module
from cvt_fast.ops import tuning
from cvt_fast.ops.backend import BackendUnavailableError, choose_auto, resolve_backend
from tolerances import assert_close

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(autouse=True)
def _clean_backend_state(monkeypatch):
    """No global choice, no CVT_FAST_BACKEND and the packaged tuning file unless a test sets them."""
    monkeypatch.delenv("CVT_FAST_BACKEND", raising=False)
    monkeypatch.delenv(tuning.ENV_VAR, raising=False)
    ops.set_backend(None)
    yield
    ops.set_backend(None)


def qkv(head_dim=32, dtype=torch.float32, n_q=6, n_kv=3):
    return (torch.randn(2, n_q, 2, head_dim, dtype=dtype), torch.randn(2, n_kv, 2, head_dim, dtype=dtype),
            torch.randn(2, n_kv, 2, head_dim, dtype=dtype))


def pretend_triton_ready(monkeypatch):
    """Triton and its kernel modules importable, interpreter on: only shape/dtype rules remain."""
    monkeypatch.setattr(backends_module, "module_present", lambda name: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def pretend_runnable(monkeypatch, *names):
    """The named backends' probes say they can run anywhere (their dtype/shape rules remain)."""
    for name in names:
        record = backends_module.TABLE[name]
        monkeypatch.setitem(backends_module.TABLE, name, dataclasses.replace(record, probe=lambda op, device: None))


def pretend_unavailable(monkeypatch, *names):
    for name in names:
        record = backends_module.TABLE[name]
        monkeypatch.setitem(backends_module.TABLE, name,
                            dataclasses.replace(record, probe=lambda op, device: "pretended unavailable"))


# --------------------------------------------------------------------------- the table

def test_every_backend_name_comes_from_the_table():
    from cvt_fast.model import MODEL_BACKENDS

    assert ops.BACKENDS == ("auto",) + tuple(backends_module.TABLE)
    assert MODEL_BACKENDS == ("official",) + ops.BACKENDS
    for name, record in backends_module.TABLE.items():
        assert record.name == name and record.kind in backends_module.KINDS
        assert set(record.ops) <= set(backends_module.OPS) and record.dtypes
    assert backends_module.backends_for("conv_proj") == ("reference", "triton", "cuda")
    assert [n for n, r in backends_module.TABLE.items() if r.attention_only] == ["sdpa", "xformers"]


def test_readme_backend_table_is_the_one_printed_from_the_records():
    assert backends_module.markdown_table() in README.read_text(), \
        "README's Backends table is stale: paste `python -m cvt_fast.ops` into it"


def test_a_new_record_is_a_backend_everywhere(monkeypatch):
    """Adding a backend is one record: the choice, errors and availability follow from it."""
    record = dataclasses.replace(backends_module.TABLE["reference"], name="fake", kind="kernels",
                                 head_dims=(64,), dtypes=(torch.float32,))
    monkeypatch.setitem(backends_module.TABLE, "fake", record)
    monkeypatch.setattr(backend_module, "BACKENDS", backend_module.BACKENDS + ("fake",))
    q = qkv(head_dim=64)[0]
    assert resolve_backend("attention", "fake", q) == "fake"
    with pytest.raises(BackendUnavailableError, match="head_dim 32 .*supported: 64"):
        resolve_backend("attention", "fake", qkv(head_dim=32)[0])
    assert ops.available_backends("attention", "cpu", dtype=torch.float16)["fake"].startswith("dtype torch.float16")
    # The op runs it through the record's loader.
    inputs = qkv(head_dim=64)
    assert_close(ops.attention(*inputs, 0.5, backend="fake"), ops.attention(*inputs, 0.5, backend="reference"))


# --------------------------------------------------------------------------- precedence

def test_default_is_auto_and_auto_on_cpu_without_evidence_is_reference(monkeypatch, tmp_path):
    # No entry for this CPU: the model runs the official path, a direct call of an op the reference
    # (tests/test_cpu_auto.py: the choice with an entry).
    monkeypatch.setenv(tuning.ENV_VAR, str(tmp_path / "none.json"))
    assert ops.get_backend() == "auto"
    q, _, _ = qkv()
    assert resolve_backend("attention", None, q) == "reference"
    assert resolve_backend("conv_proj", "auto", torch.randn(2, 5, 3)) == "reference"


def test_environment_variable_sets_the_default(monkeypatch):
    monkeypatch.setenv("CVT_FAST_BACKEND", "sdpa")
    assert ops.get_backend() == "sdpa"
    assert resolve_backend("attention", None, qkv()[0]) == "sdpa"


def test_set_backend_beats_environment_and_argument_beats_both(monkeypatch):
    monkeypatch.setenv("CVT_FAST_BACKEND", "sdpa")
    ops.set_backend("reference")
    q = qkv()[0]
    assert ops.get_backend() == "reference"
    assert resolve_backend("attention", None, q) == "reference"
    assert resolve_backend("attention", "sdpa", q) == "sdpa"
    ops.set_backend(None)
    assert resolve_backend("attention", None, q) == "sdpa"


def test_entry_point_follows_precedence(monkeypatch):
    """The chosen backend really answers: an unrunnable global choice fails, the argument overrides it."""
    q, k, v = qkv()
    ops.set_backend("xformers")
    with pytest.raises(BackendUnavailableError, match="xformers"):
        ops.attention(q, k, v, 0.5)
    assert ops.attention(q, k, v, 0.5, backend="reference").shape == (2, 6, 64)


def test_api_is_reexported():
    assert cvt_fast.set_backend is ops.set_backend and cvt_fast.get_backend is ops.get_backend
    assert cvt_fast.BackendUnavailableError is BackendUnavailableError
    assert issubclass(BackendUnavailableError, RuntimeError)


# --------------------------------------------------------------------------- unknown names

def test_unknown_backend_names_raise_value_error_listing_valid_ones(monkeypatch):
    with pytest.raises(ValueError, match="'fast'.*auto, reference, triton, cuda, sdpa, xformers"):
        resolve_backend("attention", "fast", qkv()[0])
    with pytest.raises(ValueError, match="'Triton'"):
        ops.set_backend("Triton")
    monkeypatch.setenv("CVT_FAST_BACKEND", "flash")
    with pytest.raises(ValueError, match="CVT_FAST_BACKEND"):
        ops.get_backend()
    with pytest.raises(ValueError, match="'matmul'"):
        resolve_backend("matmul", "reference", qkv()[0])


# --------------------------------------------------------------------------- unavailable backends

def test_cuda_backend_on_cpu_tensors_says_why():
    with pytest.raises(BackendUnavailableError, match="CUDA tensors") as info:
        resolve_backend("attention", "cuda", qkv()[0])
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in str(info.value)


def test_cuda_backend_reports_extension_status_when_not_built(monkeypatch):
    import cvt_fast.extension as extension

    monkeypatch.setattr(extension, "load_extension", lambda: None)
    monkeypatch.setattr(extension, "extension_status", lambda: "not built; build it with pip install -e .")
    with pytest.raises(BackendUnavailableError, match="cvt_fast._C is not built; build it"):
        resolve_backend("conv_proj", "cuda", torch.randn(1, 4, 2))


def test_triton_not_installed(monkeypatch):
    monkeypatch.setattr(backends_module, "module_present", lambda name: name != "triton")
    with pytest.raises(BackendUnavailableError, match="triton is not installed"):
        resolve_backend("attention", "triton", qkv()[0])


def test_triton_on_cpu_without_interpreter_says_how_to_enable_it(monkeypatch):
    monkeypatch.setattr(backends_module, "module_present", lambda name: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailableError, match="set TRITON_INTERPRET=1 before importing triton"):
        resolve_backend("conv_proj", "triton", torch.randn(1, 4, 2))


@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_fused_backends_reject_unsupported_head_dim(monkeypatch, name):
    pretend_triton_ready(monkeypatch)
    pretend_runnable(monkeypatch, "cuda")
    with pytest.raises(BackendUnavailableError, match="head_dim 48 .*32, 64, 128"):
        resolve_backend("attention", name, qkv(head_dim=48)[0])
    assert resolve_backend("attention", name, qkv(head_dim=64)[0]) == name
    # The projection has no head size.
    assert resolve_backend("conv_proj", name, torch.randn(1, 4, 48)) == name


def test_cuda_backend_rejects_float64(monkeypatch):
    pretend_runnable(monkeypatch, "cuda")
    with pytest.raises(BackendUnavailableError, match="dtype torch.float64"):
        resolve_backend("attention", "cuda", qkv(dtype=torch.float64)[0])


@pytest.mark.parametrize("name", ["sdpa", "xformers"])
def test_attention_only_backends_refuse_conv_proj(name):
    with pytest.raises(BackendUnavailableError, match="attention only"):
        resolve_backend("conv_proj", name, torch.randn(1, 4, 2))


@pytest.mark.parametrize("how", ["set_backend", "environment"])
def test_default_attention_only_backend_leaves_conv_proj_on_auto(monkeypatch, how):
    if how == "set_backend":
        ops.set_backend("sdpa")
    else:
        monkeypatch.setenv("CVT_FAST_BACKEND", "xformers")
    assert resolve_backend("conv_proj", None, torch.randn(1, 4, 2)) == "reference"


def test_xformers_has_no_cpu_implementation():
    with pytest.raises(BackendUnavailableError, match="CUDA only"):
        resolve_backend("attention", "xformers", qkv()[0])


def test_available_backends_on_cpu():
    table = ops.available_backends("attention", "cpu")
    assert set(table) == set(ops.BACKENDS)
    assert table["auto"] is None and table["reference"] is None and table["sdpa"] is None
    assert isinstance(table["cuda"], str) and isinstance(table["xformers"], str)
    conv_table = ops.available_backends("conv_proj", torch.device("cpu"), dtype=torch.float32)
    assert "attention only" in conv_table["sdpa"]
    assert ops.available_backends("attention", "cpu", head_dim=24)["reference"] is None


# --------------------------------------------------------------------------- 'auto' on CUDA

H100 = "NVIDIA H100 80GB HBM3"


def test_auto_on_cuda_without_evidence_is_triton_even_where_the_extension_is_built(monkeypatch):
    pretend_triton_ready(monkeypatch)
    pretend_runnable(monkeypatch, "cuda")
    for op in ("attention", "conv_proj"):
        choice = choose_auto(op, "cuda", torch.bfloat16, 64, (3, 3, 3), device_name=H100)
        assert choice.backend == "triton"
        assert f"no tuning entry for {H100!r}" in choice.reason


@pytest.mark.parametrize("unavailable,attention_choice,conv_choice", [
    ((), "triton", "triton"),
    (("triton",), "sdpa", "reference"),
    (("triton", "sdpa"), "reference", "reference"),
])
def test_auto_on_cuda_leaves_triton_only_when_it_cannot_run(monkeypatch, unavailable, attention_choice,
                                                            conv_choice):
    pretend_runnable(monkeypatch, "triton", "cuda")
    pretend_unavailable(monkeypatch, *unavailable)
    attention = choose_auto("attention", "cuda", torch.float16, 64, device_name=H100)
    assert attention.backend == attention_choice
    assert choose_auto("conv_proj", "cuda", torch.float16, None, device_name=H100).backend == conv_choice
    if unavailable:
        assert "'triton' cannot run: pretended unavailable" in attention.reason


def test_auto_passes_over_triton_for_what_it_cannot_take(monkeypatch):
    pretend_triton_ready(monkeypatch)
    pretend_runnable(monkeypatch, "cuda")
    assert choose_auto("attention", "cuda", torch.float16, 80, device_name=H100).backend == "sdpa"
    # fp64: Triton's GPU attention does not take it; its projection does.
    assert choose_auto("attention", "cuda", torch.float64, 64, device_name=H100).backend == "sdpa"
    assert choose_auto("conv_proj", "cuda", torch.float64, None, device_name=H100).backend == "triton"
    # resolve_backend's path: the device name is read from the tensors' device.
    monkeypatch.setattr(backend_module, "cuda_device_name", lambda index: H100)
    assert backend_module._auto("attention", "cuda", 0, torch.float16, 64) == "triton"


@pytest.fixture
def tuning_file(tmp_path, monkeypatch):
    path = tmp_path / "tuning.json"
    monkeypatch.setenv(tuning.ENV_VAR, str(path))
    return path


def write_tuning(path, op, dtype, total_ms, passed=("triton", "cuda", "sdpa"), device=H100):
    """A tuning file in bench/tune.py's format with one device, one op and one dtype."""
    entry = {"measured_utc": "2026-12-01T00:00:00+00:00", "environment": {"torch": "2.11.0", "triton": "3.6.0"},
             "tests": {name: {"passed": name in passed, "summary": "3 passed" if name in passed else "1 failed"}
                       for name in ("triton", "cuda", "sdpa", "xformers")},
             "timings": {op: {dtype: {"criterion": "fwd+bwd ms summed over 3 shapes",
                                      "shapes": ["cvt-13@224 s1", "cvt-13@224 s2", "cvt-13@224 s3"],
                                      "total_ms": total_ms}}}}
    path.write_text(json.dumps({"schema": tuning.SCHEMA, "devices": {device: entry}}))


def test_auto_takes_the_measured_fastest_backend_for_that_device_op_and_dtype(monkeypatch, tuning_file):
    pretend_triton_ready(monkeypatch)
    pretend_runnable(monkeypatch, "cuda")
    write_tuning(tuning_file, "attention", "bfloat16", {"triton": 3.0, "cuda": 2.5, "sdpa": 4.0})
    choice = choose_auto("attention", "cuda", torch.bfloat16, 64, device_name=H100)
    assert choice.backend == "cuda"
    assert str(tuning_file) in choice.reason and "cuda 2.5 ms" in choice.reason
    # The evidence is per op, dtype and device name: elsewhere the default holds.
    assert choose_auto("attention", "cuda", torch.float16, 64, device_name=H100).backend == "triton"
    assert choose_auto("conv_proj", "cuda", torch.bfloat16, None, device_name=H100).backend == "triton"
    assert choose_auto("attention", "cuda", torch.bfloat16, 64, device_name="NVIDIA A100-SXM4-80GB").backend \
        == "triton"
    monkeypatch.setattr(backend_module, "cuda_device_name", lambda index: H100)
    assert backend_module._auto("attention", "cuda", 0, torch.bfloat16, 64) == "cuda"


def test_auto_ignores_a_faster_backend_whose_gpu_tests_did_not_pass(monkeypatch, tuning_file):
    pretend_triton_ready(monkeypatch)
    pretend_runnable(monkeypatch, "cuda")
    write_tuning(tuning_file, "attention", "bfloat16", {"triton": 3.0, "cuda": 2.5, "sdpa": 2.0},
                 passed=("triton",))
    choice = choose_auto("attention", "cuda", torch.bfloat16, 64, device_name=H100)
    assert choice.backend == "triton"
    assert "cuda (2.5 ms; its GPU tests did not pass there)" in choice.reason


def test_auto_passes_over_a_measured_backend_that_cannot_run_these_tensors(monkeypatch, tuning_file):
    pretend_triton_ready(monkeypatch)
    pretend_runnable(monkeypatch, "cuda")
    write_tuning(tuning_file, "attention", "bfloat16", {"triton": 3.0, "cuda": 2.5})
    choice = choose_auto("attention", "cuda", torch.bfloat16, 16, device_name=H100)  # no d=16 in csrc/
    assert choice.backend == "triton" and "head_dim 16" in choice.reason


def test_auto_without_a_verified_measured_backend_takes_the_default(monkeypatch, tuning_file):
    pretend_triton_ready(monkeypatch)
    write_tuning(tuning_file, "conv_proj", "bfloat16", {"triton": 3.0, "cuda": 2.5}, passed=())
    choice = choose_auto("conv_proj", "cuda", torch.bfloat16, None, device_name=H100)
    assert choice.backend == "triton" and "can be taken" in choice.reason


def test_a_broken_tuning_file_is_an_error_that_names_it(tuning_file):
    tuning_file.write_text("{not json")
    with pytest.raises(tuning.TuningFileError, match="cannot be read"):
        choose_auto("attention", "cuda", torch.bfloat16, 64, device_name=H100)
    tuning_file.write_text(json.dumps({"schema": 99, "devices": {}}))
    with pytest.raises(tuning.TuningFileError, match="schema-1"):
        choose_auto("attention", "cuda", torch.bfloat16, 64, device_name=H100)


def test_the_packaged_tuning_file_ships_with_the_package_and_invents_nothing():
    assert tuning.PACKAGED_FILE.is_file() and tuning.tuning_path() == tuning.PACKAGED_FILE
    pyproject = (README.parent / "pyproject.toml").read_text()
    assert '"cvt_fast.ops" = ["tuning.json"]' in pyproject
    for name, entry in tuning.load_tuning()["devices"].items():
        # Every entry is a measurement with its evidence, written by bench/tune.py.
        assert entry["environment"] and entry["tests"] and entry["timings"] and entry["measured_utc"], name


def test_explain_backend_says_which_backend_a_call_takes_and_why(monkeypatch, tmp_path):
    monkeypatch.setenv(tuning.ENV_VAR, str(tmp_path / "none.json"))  # no evidence for this CPU
    q = qkv()[0]
    choice = ops.explain_backend("attention", q)
    assert choice.backend == "reference" and "on this CPU" in choice.reason and "no CPU entry" in choice.reason
    assert ops.explain_backend("attention", q, backend="sdpa").reason == "requested by the call's backend argument"
    ops.set_backend("sdpa")
    assert "cvt_fast.set_backend" in ops.explain_backend("attention", q).reason
    conv = ops.explain_backend("conv_proj", torch.randn(1, 4, 2))
    assert conv.backend == "reference" and "'sdpa', which implements attention only" in conv.reason
    ops.set_backend(None)
    with pytest.raises(BackendUnavailableError, match="CUDA tensors"):
        ops.explain_backend("attention", q, backend="cuda")
    # Described rather than given: a GPU call without evidence.
    pretend_triton_ready(monkeypatch)
    monkeypatch.setattr(backend_module, "cuda_device_name", lambda index: H100)
    gpu = ops.explain_backend("attention", device="cuda", dtype=torch.bfloat16, head_dim=64)
    assert gpu.backend == "triton" and "no tuning entry" in gpu.reason and str(gpu).startswith("triton: ")


def test_fused_projection_needs_one_odd_kernel_size(monkeypatch):
    pretend_triton_ready(monkeypatch)
    pretend_runnable(monkeypatch, "cuda")
    x = torch.randn(1, 4, 2)
    w3, w5, w2 = (torch.randn(2, 1, k, k) for k in (3, 5, 2))
    with pytest.raises(BackendUnavailableError, match=r"one kernel size .*\(3, 5, 3\)"):
        resolve_backend("conv_proj", "triton", x, w3, w5, w3)
    with pytest.raises(BackendUnavailableError, match="odd kernel size, got 2"):
        resolve_backend("conv_proj", "triton", x, w2, w2, w2)
    assert resolve_backend("conv_proj", "cuda", x, w2, w2, w2) == "cuda"
    assert choose_auto("conv_proj", "cuda", torch.float32, None, (3, 5, 3), device_name=H100).backend == "reference"


# --------------------------------------------------------------------------- peers

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sdpa_backend_matches_reference_with_gradients(dtype):
    q, k, v = (t.requires_grad_() for t in qkv(head_dim=16, dtype=dtype, n_q=7, n_kv=4))
    grad = torch.randn(2, 7, 32, dtype=dtype)
    results = {}
    for name in ("reference", "sdpa"):
        out = ops.attention(q, k, v, 0.3, backend=name)
        results[name] = (out, *torch.autograd.grad(out, (q, k, v), grad))
    for actual, expected in zip(results["sdpa"], results["reference"]):
        assert_close(actual, expected, factor=10.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sdpa_backend_matches_reference_on_gpu(dtype):
    """The GPU test of the 'sdpa' record (bench/tune.py runs it before timing the backend)."""
    q, k, v = (t.cuda().requires_grad_() for t in qkv(head_dim=64, dtype=dtype, n_q=197, n_kv=50))
    grad = torch.randn(2, 197, 128, dtype=dtype, device="cuda")
    results = {}
    for name in ("reference", "sdpa"):
        out = ops.attention(q, k, v, 0.125, backend=name)
        results[name] = (out, *torch.autograd.grad(out, (q, k, v), grad))
    for actual, expected in zip(results["sdpa"], results["reference"]):
        assert_close(actual, expected, dtype, factor=2.0)


def test_every_backend_but_the_reference_names_its_gpu_tests():
    for name, record in backends_module.TABLE.items():
        assert bool(record.gpu_tests) == (record.kind != "reference"), name


@pytest.mark.skipif(backends_module.xformers_import_error() is not None or not torch.cuda.is_available(),
                    reason="xformers is not importable here or there is no CUDA GPU")
@pytest.mark.gpu
def test_xformers_backend_matches_reference():
    q, k, v = (t.cuda() for t in qkv(head_dim=64, dtype=torch.float16))
    assert_close(ops.attention(q, k, v, 0.3, backend="xformers"), ops.attention(q, k, v, 0.3, backend="reference"))
