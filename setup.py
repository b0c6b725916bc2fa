"""Build script for cvt-fast.

The pure-Python package always installs. The CUDA extension `cvt_fast._C` (sources in
csrc/) is built only when a CUDA toolkit and a CUDA build of torch are both present;
otherwise one line says why it was skipped and the 'cuda' backend reports itself as
not built at run time.

Environment knobs:
  CVT_FAST_NO_CUDA=1        never build the extension
  CUDA_HOME                 defaults to /usr/local/cuda when nvcc lives there
  TORCH_CUDA_ARCH_LIST      defaults to "9.0" (Hopper) when no GPU is visible
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_HOME = "/usr/local/cuda"
DEFAULT_ARCH_LIST = "9.0"


BUILD_NOTE = os.path.join(ROOT, "cvt_fast", "_extension_build.txt")


def say(message: str) -> None:
    """Print the build decision and keep it beside the package: pip hides a build's output
    (always with -q), and cvt_fast.extension.extension_status() repeats this line."""
    print(f"cvt_fast setup: {message}", file=sys.stderr, flush=True)
    try:
        with open(BUILD_NOTE, "w") as note:
            note.write(message + "\n")
    except OSError:
        pass  # a read-only source tree: the printed line has to do


def find_target_torch() -> bool:
    """Make the installing environment's torch importable here.

    pip's isolated build hides the target environment's site-packages. Building
    against a freshly downloaded torch would produce an extension whose ABI does not
    match the torch it runs with, so ask the target interpreter where its torch lives
    and put that directory on sys.path instead.
    """
    try:
        import torch  # noqa: F401
        return True
    except ImportError:
        pass
    probe = "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    try:
        out = subprocess.run([sys.executable, "-s", "-c", probe], env=env, capture_output=True,
                             text=True, timeout=300, check=True)
    except (subprocess.SubprocessError, OSError):
        return False
    site_dir = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    if not site_dir or not os.path.isdir(site_dir):
        return False
    sys.path.append(site_dir)
    try:
        import torch  # noqa: F401,F811
        return True
    except ImportError:
        return False


def nvcc_release(nvcc: str):
    """The CUDA release nvcc reports ('13.0'), or None when it cannot be asked."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


def cuda_extension_or_reason():
    """Return (ext_modules, cmdclass) for the CUDA extension, or ([], {}) with a printed reason."""
    if os.environ.get("CVT_FAST_NO_CUDA", "0") == "1":
        say("skipping the CUDA extension cvt_fast._C: CVT_FAST_NO_CUDA=1")
        return [], {}
    if not find_target_torch():
        say("skipping the CUDA extension cvt_fast._C: torch is not installed "
            "(install torch first, then reinstall cvt-fast)")
        return [], {}
    import torch

    if torch.version.cuda is None:
        say(f"skipping the CUDA extension cvt_fast._C: torch {torch.__version__} is a CPU-only build")
        return [], {}
    if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ:
        # torch guesses CUDA_HOME from the nvcc on PATH; a wrapper script there makes it
        # guess /usr/local, and linking then fails on -lcudart.
        if os.path.exists(os.path.join(DEFAULT_CUDA_HOME, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = DEFAULT_CUDA_HOME
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        say("skipping the CUDA extension cvt_fast._C: no CUDA toolkit found "
            "(set CUDA_HOME to a toolkit with bin/nvcc)")
        return [], {}
    toolkit, torch_cuda = nvcc_release(nvcc), torch.version.cuda
    if toolkit is not None and toolkit.split(".")[0] != torch_cuda.split(".")[0]:
        # torch.utils.cpp_extension refuses a major-version mismatch with an exception that
        # would fail the whole install; the package works without the extension.
        say(f"skipping the CUDA extension cvt_fast._C: nvcc is CUDA {toolkit} but torch {torch.__version__} "
            f"was built for CUDA {torch_cuda}; point CUDA_HOME at a CUDA {torch_cuda.split('.')[0]}.x toolkit, "
            f"or install a torch built for CUDA {toolkit.split('.')[0]}, then reinstall")
        return [], {}
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # Without a GPU and without this, torch.utils.cpp_extension raises IndexError.
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST

    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    if not sources:
        say("skipping the CUDA extension cvt_fast._C: csrc/ holds no sources")
        return [], {}
    say(f"building cvt_fast._C from {len(sources)} sources for TORCH_CUDA_ARCH_LIST="
        f"{os.environ.get('TORCH_CUDA_ARCH_LIST', '(from the visible GPU)')} with {nvcc}")
    ext = CUDAExtension(
        name="cvt_fast._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={
            "cxx": ["-O3", "-std=c++20"],
            "nvcc": ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo",
                     "--expt-relaxed-constexpr", "-Xptxas=-v" if os.environ.get("CVT_FAST_PTXAS_VERBOSE") else "-DCVT_FAST"],
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extension_or_reason()

setup(
    # kernels/ installs as cvt_fast.kernels, never as a top-level `kernels` module.
    packages=["cvt_fast", *(f"cvt_fast.{p}" for p in find_packages("cvt_fast")), "cvt_fast.kernels"],
    package_dir={"cvt_fast": "cvt_fast", "cvt_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
