"""kernels/interpreter.py: the version limits of Triton's CPU interpreter, and the messages
that name the fix (checked with faked versions; the real ones are whatever is installed)."""
import types

import pytest

pytest.importorskip("triton")
from cvt_fast.kernels import interpreter  # noqa: E402


@pytest.mark.parametrize("text, expected", [("3.2.0", (3, 2)), ("3.8.0+git1a2b3c", (3, 8)), ("2.4.6", (2, 4)),
                                            ("10.11", (10, 11)), ("nightly", (0, 0))])
def test_version_tuple(text, expected):
    assert interpreter.version_tuple(text) == expected


@pytest.fixture(autouse=True)
def _fresh_answers():
    """The answers are cached per process; faked versions need them asked again."""
    interpreter.interpreter_problem.cache_clear()
    interpreter.float64_dot_problem.cache_clear()
    yield
    interpreter.interpreter_problem.cache_clear()
    interpreter.float64_dot_problem.cache_clear()


def fake_versions(monkeypatch, triton_version, numpy_version):
    import sys
    monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(__version__=triton_version))
    monkeypatch.setitem(sys.modules, "numpy", types.SimpleNamespace(__version__=numpy_version))


@pytest.mark.parametrize("triton_version, numpy_version, broken", [
    ("3.2.0", "2.4.6", True), ("3.6.0", "2.4.0", True), ("3.6.0", "2.3.5", False), ("3.7.0", "2.4.6", False),
    ("3.8.0", "2.4.6", False), ("3.2.0", "1.26.4", False)])
def test_interpreter_problem_names_the_fix(monkeypatch, triton_version, numpy_version, broken):
    fake_versions(monkeypatch, triton_version, numpy_version)
    problem = interpreter.interpreter_problem()
    if broken:
        assert f"Triton {triton_version}" in problem and "numpy<2.4" in problem and "triton >= 3.7" in problem
    else:
        assert problem is None


@pytest.mark.parametrize("triton_version, unsupported", [("3.2.0", True), ("3.7.1", True), ("3.8.0", False),
                                                         ("3.9.0", False)])
def test_float64_dot_problem(monkeypatch, triton_version, unsupported):
    fake_versions(monkeypatch, triton_version, "2.4.6")
    problem = interpreter.float64_dot_problem()
    assert (problem is not None) == unsupported
    if unsupported:
        assert "triton >= 3.8" in problem and "reference backend" in problem


def test_backend_choice_reports_a_broken_interpreter(monkeypatch):
    import torch

    from cvt_fast.ops.backend import BackendUnavailableError, available_backends, resolve_backend

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(interpreter, "interpreter_problem", lambda: "Triton 3.2.0's interpreter fails with NumPy")
    assert "fails with NumPy" in available_backends("attention", "cpu")["triton"]
    with pytest.raises(BackendUnavailableError, match="fails with NumPy"):
        resolve_backend("attention", "triton", torch.randn(1, 4, 1, 32))
