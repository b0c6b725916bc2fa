"""Registering cvt_fast's CvTs in timm's model registry without importing timm at `import cvt_fast`.

`import timm` takes seconds (it pulls in torchvision and huggingface_hub), and most users of
cvt_fast never touch timm. So `register_with_timm()` (called by cvt_fast/__init__.py) registers at
once when timm is already imported, and otherwise puts a one-shot finder on sys.meta_path that
registers right after timm's own import finishes. Either order of `import cvt_fast` and `import
timm` therefore ends with timm.create_model("cvt_13") working. Standard library only.
"""
from __future__ import annotations

import importlib
import sys
import warnings
from typing import Any, Optional, Sequence

_TIMM = "timm"
_registered = False


def register_with_timm() -> None:
    """Register the CvT models with timm now if timm is imported, else as soon as it is."""
    timm = sys.modules.get(_TIMM)
    if timm is not None:
        if hasattr(timm, "create_model"):  # fully imported (not in the middle of its own import)
            _register()
        return
    if not any(isinstance(finder, _RegisterAfterTimmImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterTimmImport())


def _register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    try:
        importlib.import_module("cvt_fast.timm_models")
    except Exception as error:  # a timm too old or too new must not break `import timm`
        warnings.warn(f"cvt_fast could not register its CvT models with timm ({type(error).__name__}: "
                      f"{error}); timm.create_model('cvt_13') will not find them", RuntimeWarning, stacklevel=2)


class _RegisterAfterTimmImport:
    """A sys.meta_path finder that finds nothing itself: asked for timm, it asks the other finders and
    wraps the loader they return so that timm's import registers the CvTs once it finishes. It stays
    on sys.meta_path until timm's module has actually run: `importlib.util.find_spec("timm")` (the
    probe transformers and others use to see whether timm is installed) asks for a spec without
    importing, and must not use it up. (Not derived from importlib.abc.MetaPathFinder: importing
    that module costs ~15 ms, the protocol is just find_spec.)"""

    def __init__(self) -> None:
        self._asking_others = False

    def find_spec(self, fullname: str, path: Optional[Sequence[str]], target: Any = None):
        if fullname != _TIMM or self._asking_others:
            return None
        self._asking_others = True  # the finders below may ask sys.meta_path again
        try:
            spec = None
            for finder in sys.meta_path:
                find_spec = getattr(finder, "find_spec", None)
                if finder is self or find_spec is None:
                    continue
                spec = find_spec(fullname, path, target)
                if spec is not None:
                    break
        finally:
            self._asking_others = False
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run_timm = loader.exec_module

        def run_timm_then_register(module: Any) -> None:
            run_timm(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)  # timm is imported: nothing left to watch for
            _register()

        loader.exec_module = run_timm_then_register  # each spec gets its own loader object
        return spec
