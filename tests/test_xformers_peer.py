"""The xformers peer: installed by pyproject's 'peers' extra (README: Install, which CI runs),
importable with its C++/CUDA extension loaded, unavailable on a CPU for a stated reason, and
refusing misuse with errors that say what is wrong and what to do.

xformers has no CPU kernels, so nothing here computes with it; its numbers are checked against
the reference on a GPU (tests/test_backend.py::test_xformers_backend_matches_reference).
"""
from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from cvt_fast import ops
from cvt_fast.ops import BackendUnavailableError, backends

REPO = Path(__file__).resolve().parents[1]
CPU_REASON = "xformers has no implementation for 'cpu' tensors (CUDA only; 'sdpa' runs attention on any device)"
installed = pytest.mark.skipif(not backends.module_present("xformers"),
                               reason=f"xformers is not installed here: {backends.XFORMERS_INSTALL}")


@pytest.fixture
def fresh_probe():
    """The import probe is cached per process: forget its answer before and after a test that
    changes what it sees."""
    backends.xformers_import_error.cache_clear()
    yield
    backends.xformers_import_error.cache_clear()


def peers_extra() -> list[str]:
    """pyproject.toml's 'peers' extra, as written (a regex: tomllib is Python >= 3.11 only)."""
    match = re.search(r"^peers\s*=\s*\[([^\]]*)\]", (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    assert match, "pyproject.toml has no 'peers' extra"
    return re.findall(r'"([^"]+)"', match.group(1))


def pip_commands(text: str) -> list[str]:
    """The `pip install` commands of a shell text, without -q and comments."""
    commands = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("pip install"):
            commands.append(" ".join(word for word in line.split() if word != "-q"))
    return commands


def qkv(dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 2, 32, generator=gen, dtype=dtype).to(device) for n in (16, 4, 4))
    return q, k, v


def test_ci_installs_exactly_the_readmes_commands_and_the_extra_pins_the_peer():
    readme = (REPO / "README.md").read_text()
    install = readme[readme.index("## Install"):readme.index("\n## ", readme.index("## Install") + 1)]
    block = install[install.index("```sh"):install.index("```", install.index("```sh") + 5)]
    assert pip_commands(block) == pip_commands((REPO / ".ci" / "run").read_text())
    assert any("peers" in command for command in pip_commands(block)), "README's install leaves the peers out"
    extra = peers_extra()
    assert "xformers==0.0.35" in extra and "nvidia-cuda-runtime-cu12>=12.8" in extra
    # What the messages tell a user to install is what the extra installs.
    assert "'.[peers]'" in backends.XFORMERS_INSTALL and "xformers 0.0.35" in backends.XFORMERS_INSTALL
    assert "'nvidia-cuda-runtime-cu12>=12.8'" in backends._xformers_fix("", OSError("libcudart.so.12"))


@installed
def test_the_installed_peer_imports_with_its_extension(fresh_probe):
    import xformers
    import xformers.ops  # noqa: F401 - the import under test

    pinned = next(r for r in peers_extra() if r.startswith("xformers=="))
    assert xformers.__version__ == pinned.split("==")[1], f"installed xformers {xformers.__version__}, extra {pinned}"
    assert backends.xformers_import_error() is None
    assert xformers._has_cpp_library, "xformers imported without its C++/CUDA extension"


@installed
def test_the_peer_really_has_no_cpu_kernels():
    """What the CPU reason claims, asked of xformers itself."""
    import xformers.ops

    with pytest.raises(NotImplementedError, match="device=cpu"):
        xformers.ops.memory_efficient_attention(*qkv(), scale=0.3)


def test_on_a_cpu_the_backend_is_unavailable_for_a_stated_reason():
    assert backends.TABLE["xformers"].probe("attention", "cpu") == CPU_REASON
    assert ops.available_backends("attention", "cpu")["xformers"] == CPU_REASON
    assert ops.available_backends("attention", "cpu", dtype=torch.bfloat16)["xformers"] == CPU_REASON


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_cpu_tensors_are_refused_naming_the_backend_the_device_and_the_way_out(dtype):
    with pytest.raises(BackendUnavailableError) as caught:
        ops.attention(*qkv(dtype), 0.3, backend="xformers")
    assert str(caught.value) == f"backend 'xformers' cannot run cvt_fast attention on cpu tensors: {CPU_REASON}"
    with pytest.raises(BackendUnavailableError, match="CUDA only"):
        ops.explain_backend("attention", *qkv(), backend="xformers")


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32])
def test_an_unsupported_dtype_is_refused_with_the_supported_ones(dtype, fresh_probe):
    """Told as CUDA tensors (none exist here), so the dtype is what is judged: with the peer
    installed the refusal names the dtype and the supported ones; without it, how to install."""
    with pytest.raises(BackendUnavailableError) as caught:
        ops.explain_backend("attention", backend="xformers", device="cuda", dtype=dtype, head_dim=64)
    message = str(caught.value)
    assert message.startswith("backend 'xformers' cannot run cvt_fast attention on cuda tensors: ")
    if backends.xformers_import_error() is None:
        assert message.endswith(f"dtype {dtype} is not supported by 'xformers' "
                                "(supported: bfloat16, float16, float32)")
    else:
        assert message.endswith(backends.xformers_import_error())
    if backends.xformers_import_error() is None:
        choice = ops.explain_backend("attention", backend="xformers", device="cuda", dtype=torch.float16)
        assert choice.backend == "xformers"


def test_a_missing_or_broken_install_says_what_to_install(monkeypatch, fresh_probe):
    monkeypatch.setattr(backends, "module_present", lambda name: False)
    assert backends.xformers_import_error() == f"xformers is not installed: {backends.XFORMERS_INSTALL}"
    assert backends.TABLE["xformers"].probe("attention", "cuda") == backends.xformers_import_error()

    monkeypatch.setattr(backends, "module_present", lambda name: True)
    for error, advice in ((ImportError("xformers needs torch>=2.10"), backends.XFORMERS_INSTALL),
                          (OSError("libcudart.so.12: cannot open shared object file"),
                           "pip install 'nvidia-cuda-runtime-cu12>=12.8'")):
        def broken(name, _error=error):
            raise _error
        monkeypatch.setattr(backends.importlib, "import_module", broken)
        backends.xformers_import_error.cache_clear()
        reason = backends.xformers_import_error()
        assert reason.startswith(f"xformers is installed but fails to import ({type(error).__name__}: {error}); ")
        assert advice in reason


@installed
def test_a_missing_cuda12_runtime_is_named_with_its_fix():
    """Without libcudart.so.12, `import xformers.ops` succeeds (xformers only warns) but its
    C++/CUDA extension is not loaded: the probe must see that. Simulated in a fresh process by
    refusing to load the library (torch preloads it through ctypes from the runtime's wheel)."""
    program = textwrap.dedent("""
        import ctypes
        class Refusing(ctypes.CDLL):
            def __init__(self, name, *args, **kwargs):
                if name and "libcudart.so.12" in str(name):
                    raise OSError(f"{name}: cannot open shared object file: No such file or directory")
                super().__init__(name, *args, **kwargs)
        ctypes.CDLL = Refusing
        from cvt_fast.ops.backends import xformers_import_error
        print("REASON:", xformers_import_error())
    """)
    done = subprocess.run([sys.executable, "-c", program], cwd=REPO, capture_output=True, text=True, timeout=300)
    reason = next((line for line in done.stdout.splitlines() if line.startswith("REASON: ")), done.stdout + done.stderr)
    assert reason.startswith("REASON: xformers imports, but its C++/CUDA extension did not load (OSError: "), reason
    assert "libcudart.so.12" in reason and reason.endswith(
        "the CUDA 12 runtime it links is missing: pip install 'nvidia-cuda-runtime-cu12>=12.8' (part of the 'peers' "
        "extra)"), reason
