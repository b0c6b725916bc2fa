"""Triton kernels of cvt_fast, installed as `cvt_fast.kernels`.

Importing this package does not import Triton; each kernel module does, so the rest of
cvt_fast works where Triton is missing. On CPU tensors the kernels run only under
Triton's interpreter (TRITON_INTERPRET=1, set before the first import of a kernel
module).

A leaf: nothing here imports cvt_fast. `_launch.py` holds what every launch needs (interpreter
detection, the device check, the accumulator dtype, the device guard, the grid check);
`supported.py` declares what the kernels take (dtypes, head sizes, kernel sizes), which the
backend table (cvt_fast/ops/backends.py) reads without importing Triton.

This folder is `cvt_fast.kernels` only, never a top-level module named `kernels`.
Hugging Face's `kernels` distribution has that name, and transformers imports it
(`from kernels import CUDAProperties`). Wherever the checkout's root is on sys.path
(`python -m pytest`, `python -c`, `python -m cvt_fast.train` run from the checkout),
Python finds this folder first. Leaving out this file would not be enough: a folder
without `__init__.py` still imports as a namespace package when nothing else has the
name, and setuptools' editable install cannot map `cvt_fast.kernels` onto such a
folder. So the file stays, and when it is imported under the top-level name it hands
the import to whatever else on sys.path holds `kernels`, or refuses with the reason.
(setup.py maps this folder to `cvt_fast.kernels` with package_dir.)
"""
if __name__ == "kernels":
    import importlib.util
    import os
    import sys
    from importlib.machinery import PathFinder

    def _path_entries_outside_this_checkout() -> list:
        checkout = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        return [entry for entry in sys.path if isinstance(entry, str)
                and os.path.realpath(entry or os.getcwd()) != checkout]

    _spec = PathFinder.find_spec("kernels", _path_entries_outside_this_checkout())
    if _spec is None:
        raise ModuleNotFoundError(
            "No module named 'kernels': the checkout's kernels/ folder holds cvt_fast's Triton kernels "
            "and imports only as cvt_fast.kernels (pip install -e . maps it there); for Hugging Face's "
            "kernels package, pip install kernels", name="kernels")
    # The import machinery returns whatever sys.modules holds under the name once this body ends.
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module
    _spec.loader.exec_module(_module)
