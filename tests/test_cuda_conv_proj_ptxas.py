"""Static targets of csrc/conv_proj.cu for sm_90, read from ptxas without a GPU: every kernel
instantiation compiles with no register spills and no stack frame (csrc/NOTES.md lists the
registers). Needs nvcc (skipped without one); about two minutes on two cores.
"""
import os
import pathlib
import re
import shutil
import subprocess
import sysconfig

import pytest

pytestmark = pytest.mark.slow

CSRC = pathlib.Path(__file__).resolve().parent.parent / "csrc"

# Every kernel of conv_proj.cu and its instantiations: fused kernels for k = 3, 5 and three
# dtypes, generic kernels for three dtypes, one second-stage reduction.
EXPECTED_KERNELS = {
    "conv_proj_fwd_fused_kernel": 6,
    "conv_proj_bwd_fused_kernel": 6,
    "conv_proj_fwd_generic_kernel": 3,
    "conv_proj_bwd_input_generic_kernel": 3,
    "conv_proj_bwd_weight_generic_kernel": 3,
    "conv_proj_wgrad_reduce_kernel": 1,
}

ENTRY = re.compile(r"Compiling entry function '(?P<name>\S+)' for 'sm_90'\n"
                   r"(?:ptxas info\s*: Function properties for \S+\n)?"
                   r"\s*(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, "
                   r"(?P<loads>\d+) bytes spill loads\n"
                   r"ptxas info\s*: Used (?P<registers>\d+) registers")


def find_nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = pathlib.Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else shutil.which("nvcc")


@pytest.fixture(scope="module")
def ptxas_report(tmp_path_factory):
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("no nvcc (set CUDA_HOME to a CUDA toolkit) to compile csrc/conv_proj.cu for sm_90")
    from torch.utils import cpp_extension

    # The flags setup.py builds the extension with (torch adds its COMMON_NVCC_FLAGS, e.g. no
    # implicit half conversions), for sm_90 only and stopping at the cubin.
    torch_flags = getattr(cpp_extension, "COMMON_NVCC_FLAGS", ["--expt-relaxed-constexpr"])
    out = tmp_path_factory.mktemp("ptxas") / "conv_proj.cubin"
    command = [nvcc, "-arch=sm_90", "-cubin", "-O3", "-std=c++20", "--use_fast_math", *torch_flags,
               "-Xptxas=-v", f"-I{CSRC}", *(f"-I{p}" for p in cpp_extension.include_paths()),
               f"-I{sysconfig.get_paths()['include']}", "-o", str(out), str(CSRC / "conv_proj.cu")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, f"nvcc failed:\n{' '.join(command)}\n{result.stderr[-4000:]}"
    return result.stdout + result.stderr


def test_conv_proj_kernels_compile_for_sm90_without_spills(ptxas_report):
    entries = [m.groupdict() for m in ENTRY.finditer(ptxas_report)]
    found = {name: sum(name in e["name"] for e in entries) for name in EXPECTED_KERNELS}
    assert found == EXPECTED_KERNELS, f"kernel instantiations found: {found}"
    spilling = [(e["name"], e["registers"], e["stack"], e["stores"], e["loads"]) for e in entries
                if int(e["stack"]) or int(e["stores"]) or int(e["loads"])]
    assert not spilling, f"(kernel, registers, stack, spill stores, spill loads): {spilling}"
