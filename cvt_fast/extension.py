"""Loading the optional CUDA extension cvt_fast._C (built from csrc/ by setup.py).

The package works without it; only the 'cuda' backend needs it, and asking for that
backend when the extension is missing raises an error that carries `extension_status()`.
"""
from __future__ import annotations

import functools
import importlib
from pathlib import Path

BUILD_HINT = ("build it with a CUDA toolkit and a CUDA build of torch present: "
              "`pip install -e . --no-build-isolation` (see README: Install)")
# setup.py writes its last decision about the extension here (pip hides the build's output).
BUILD_NOTE = Path(__file__).with_name("_extension_build.txt")


@functools.lru_cache(maxsize=1)
def _load():
    """Import cvt_fast._C once; return (module or None, reason it is missing or '')."""
    import torch  # noqa: F401  (the extension links against libtorch: load it first)

    try:
        module = importlib.import_module("cvt_fast._C")
    except ImportError as error:
        missing = "No module named 'cvt_fast._C'" in str(error)
        reason = "not built" if missing else f"failed to load ({error})"
        return None, reason
    return module, ""


def load_extension():
    """The extension module (its import registers the torch.ops.cvt_fast.*_cuda ops), or None."""
    return _load()[0]


def extension_status() -> str:
    """One line for logs and error messages: 'built' or why it is unavailable."""
    module, reason = _load()
    if module is not None:
        return "built"
    try:
        said = BUILD_NOTE.read_text().strip()
    except OSError:
        said = ""
    setup_said = f" (setup.py: {said})" if said else ""
    return f"{reason}{setup_said}; {BUILD_HINT}"
