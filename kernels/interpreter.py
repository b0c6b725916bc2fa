"""What Triton's CPU interpreter can do in this environment, measured rather than assumed.

The kernels themselves compile for GPUs with any Triton that torch >= 2.6 brings (3.2 on).
The interpreter (TRITON_INTERPRET=1, how the kernels run on CPU tensors) has two limits that
depend on versions, found by running this project's kernel tests under torch 2.6 with Triton
3.2 to 3.8 and NumPy 2.3 / 2.4:
- Triton < 3.7 with NumPy >= 2.4: every kernel with a loop bound taken from an argument fails
  inside the interpreter (it converts a one-element array to an int, which NumPy 2.4 refuses).
- Triton < 3.8: tl.dot has no float64 path in the interpreter, so float64 attention (used for
  gradcheck) fails there.
Each function returns None when all is well, else a sentence that names the fix. The
answers are cached: the backend choice asks on every op call, and versions do not change
within a process.
"""
from __future__ import annotations

import functools
import re
from typing import Optional

INTERPRETER_WITH_NUMPY_2_4 = (3, 7)
INTERPRETER_FLOAT64_DOT = (3, 8)


def version_tuple(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as '3.2.0', '3.8.0+git1a2b' or '2.4.6'."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def _triton_version() -> tuple[int, int]:
    import triton

    return version_tuple(triton.__version__)


@functools.lru_cache(maxsize=1)
def interpreter_problem() -> Optional[str]:
    """Why the interpreter cannot run the kernels here, or None."""
    import numpy
    import triton

    if version_tuple(numpy.__version__) >= (2, 4) and _triton_version() < INTERPRETER_WITH_NUMPY_2_4:
        return (f"Triton {triton.__version__}'s interpreter fails with NumPy {numpy.__version__} "
                f"(NumPy >= 2.4 refuses a conversion it relies on): install 'numpy<2.4', or "
                f"triton >= {'.'.join(map(str, INTERPRETER_WITH_NUMPY_2_4))}")
    return None


@functools.lru_cache(maxsize=1)
def float64_dot_problem() -> Optional[str]:
    """Why float64 matrix products cannot run under the interpreter here, or None."""
    import triton

    if _triton_version() < INTERPRETER_FLOAT64_DOT:
        return (f"float64 attention under the Triton interpreter needs triton >= "
                f"{'.'.join(map(str, INTERPRETER_FLOAT64_DOT))} (tl.dot has no float64 path in "
                f"Triton {triton.__version__}'s interpreter); use the reference backend for float64")
    return None
