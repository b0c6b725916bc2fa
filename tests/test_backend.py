"""Backend choice: precedence, 'auto', clear errors for backends that cannot run, the peers."""
import pytest
import torch

import cvt_fast
import cvt_fast.ops as ops
from cvt_fast.ops import backend as backend_module
from cvt_fast.ops.backend import BackendUnavailableError, resolve_backend
from tolerances import assert_close


@pytest.fixture(autouse=True)
def _clean_backend_state(monkeypatch):
    """No global choice and no CVT_FAST_BACKEND unless a test sets them."""
    monkeypatch.delenv("CVT_FAST_BACKEND", raising=False)
    ops.set_backend(None)
    yield
    ops.set_backend(None)


def qkv(head_dim=32, dtype=torch.float32, n_q=6, n_kv=3):
    return (torch.randn(2, n_q, 2, head_dim, dtype=dtype), torch.randn(2, n_kv, 2, head_dim, dtype=dtype),
            torch.randn(2, n_kv, 2, head_dim, dtype=dtype))


def pretend_triton_ready(monkeypatch):
    """Triton and its kernel modules importable, interpreter on: only shape/dtype rules remain."""
    monkeypatch.setattr(backend_module, "_module_present", lambda name: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")


# --------------------------------------------------------------------------- precedence

def test_default_is_auto_and_auto_on_cpu_is_reference():
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
    monkeypatch.setattr(backend_module, "_module_present", lambda name: name != "triton")
    with pytest.raises(BackendUnavailableError, match="triton is not installed"):
        resolve_backend("attention", "triton", qkv()[0])


def test_triton_on_cpu_without_interpreter_says_how_to_enable_it(monkeypatch):
    monkeypatch.setattr(backend_module, "_module_present", lambda name: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailableError, match="set TRITON_INTERPRET=1 before importing triton"):
        resolve_backend("conv_proj", "triton", torch.randn(1, 4, 2))


@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_fused_backends_reject_unsupported_head_dim(monkeypatch, name):
    pretend_triton_ready(monkeypatch)
    monkeypatch.setattr(backend_module, "_cuda_reason", lambda op, device_type: None)
    with pytest.raises(BackendUnavailableError, match="head_dim 48 .*32, 64, 128"):
        resolve_backend("attention", name, qkv(head_dim=48)[0])
    assert resolve_backend("attention", name, qkv(head_dim=64)[0]) == name
    # The projection has no head size.
    assert resolve_backend("conv_proj", name, torch.randn(1, 4, 48)) == name


def test_cuda_backend_rejects_float64(monkeypatch):
    monkeypatch.setattr(backend_module, "_cuda_reason", lambda op, device_type: None)
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

@pytest.mark.parametrize("unavailable,attention_choice,conv_choice", [
    ((), "cuda", "cuda"),
    (("cuda",), "triton", "triton"),
    (("cuda", "triton"), "sdpa", "reference"),
])
def test_auto_on_cuda_prefers_cuda_then_triton_then_sdpa(monkeypatch, unavailable, attention_choice, conv_choice):
    def fake_reason(op, name, device_type, dtype=None, head_dim=None, kernel_sizes=None):
        return "pretended unavailable" if name in unavailable else None

    monkeypatch.setattr(backend_module, "unavailable_reason", fake_reason)
    assert backend_module._auto("attention", "cuda", torch.float16, 64) == attention_choice
    assert backend_module._auto("conv_proj", "cuda", torch.float16, None) == conv_choice


def test_auto_skips_a_fused_backend_that_cannot_take_the_head_dim(monkeypatch):
    pretend_triton_ready(monkeypatch)
    monkeypatch.setattr(backend_module, "_cuda_reason", lambda op, device_type: None)
    assert backend_module._auto("attention", "cuda", torch.float16, 64) == "cuda"
    assert backend_module._auto("attention", "cuda", torch.float16, 80) == "sdpa"
    # fp64: neither CUDA C++ nor Triton's GPU attention takes it; the projection has Triton fp64.
    assert backend_module._auto("attention", "cuda", torch.float64, 64) == "sdpa"
    assert backend_module._auto("conv_proj", "cuda", torch.float64, None) == "triton"


def test_fused_projection_needs_one_odd_kernel_size(monkeypatch):
    pretend_triton_ready(monkeypatch)
    monkeypatch.setattr(backend_module, "_cuda_reason", lambda op, device_type: None)
    x = torch.randn(1, 4, 2)
    w3, w5, w2 = (torch.randn(2, 1, k, k) for k in (3, 5, 2))
    with pytest.raises(BackendUnavailableError, match=r"one kernel size .*\(3, 5, 3\)"):
        resolve_backend("conv_proj", "triton", x, w3, w5, w3)
    with pytest.raises(BackendUnavailableError, match="odd kernel size, got 2"):
        resolve_backend("conv_proj", "triton", x, w2, w2, w2)
    assert resolve_backend("conv_proj", "cuda", x, w2, w2, w2) == "cuda"
    assert backend_module._auto("conv_proj", "cuda", torch.float32, None, (3, 5, 3)) == "reference"


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


@pytest.mark.skipif(backend_module.xformers_import_error() is not None or not torch.cuda.is_available(),
                    reason="xformers is not importable here or there is no CUDA GPU")
@pytest.mark.gpu
def test_xformers_backend_matches_reference():
    q, k, v = (t.cuda() for t in qkv(head_dim=64, dtype=torch.float16))
    assert_close(ops.attention(q, k, v, 0.3, backend="xformers"), ops.attention(q, k, v, 0.3, backend="reference"))
