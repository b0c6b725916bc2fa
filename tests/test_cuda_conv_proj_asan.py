"""The conv_proj launchers under AddressSanitizer: no host array is read past its end.

csrc/conv_proj.cu's generic forward launches once per distinct (stride, padding); for k and v it
used to pass `weights + 1`, `biases + 1`, `outs + 1` to a lambda that read element [2] of each, so
element [3] of 3-element host arrays: undefined behaviour that worked by luck. The emulation entry
point shares the launch plan (generic_forward_launches, generic_slot) with the CUDA wrapper; here it
is compiled with -fsanitize=address and run in a subprocess (libasan preloaded into Python), over
the generic path with q and k/v on different geometries, forward and backward. Any out-of-bounds
access aborts that run with an AddressSanitizer report.
"""
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

CSRC = pathlib.Path(__file__).resolve().parent.parent / "csrc"

RUN = textwrap.dedent("""
    import ctypes, sys, torch
    lib = ctypes.CDLL(sys.argv[1])
    I64, INT, PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.emu_conv_proj_forward.argtypes = [INT, PTR, I64, I64] + [PTR] * 9 + [INT] * 9
    lib.emu_conv_proj_backward.argtypes = [INT] + [PTR] * 7 + [I64, I64, PTR, PTR] + [INT] * 9
    batch, channels, height, width, kernel = 2, 8, 5, 6, 3
    out = lambda s, p: ((height + 2 * p - kernel) // s + 1) * ((width + 2 * p - kernel) // s + 1)
    p = lambda t: None if t is None else ctypes.c_void_p(t.data_ptr())
    # q: stride 2, padding 1; k, v: stride 1, padding 0 (two launches, the second for k and v);
    # then q and k/v on one geometry (one launch for all three), with and without biases.
    for sq, skv, pq, pkv, bias in ((2, 1, 1, 0, True), (2, 1, 1, 0, False), (2, 2, 1, 1, True)):
        tq, tkv = out(sq, pq), out(skv, pkv)
        x = torch.randn(batch, height * width, channels)
        w = [torch.randn(kernel * kernel, channels) for _ in range(3)]
        b = [torch.randn(channels) if bias else None for _ in range(3)]
        q, k, v = torch.empty(batch, tq, channels), torch.empty(batch, tkv, channels), torch.empty(batch, tkv, channels)
        geometry = (batch, channels, height, width, 0, kernel, sq, skv, pq, pkv)
        lib.emu_conv_proj_forward(0, p(x), x.stride(0), x.stride(1), *map(p, w), *map(p, b), p(q), p(k), p(v),
                                  *geometry)
        grad_x, weight_grad = torch.empty_like(x), torch.empty(3, kernel * kernel, channels)
        grads = [torch.randn_like(t) for t in (q, k, v)]
        lib.emu_conv_proj_backward(0, *map(p, grads), *map(p, w), p(x), x.stride(0), x.stride(1), p(grad_x),
                                   p(weight_grad), *geometry)
        assert torch.isfinite(q).all() and torch.isfinite(k).all() and torch.isfinite(grad_x).all()
    print("clean")
""")


def test_conv_proj_generic_launchers_stay_inside_their_host_arrays(tmp_path):
    from torch.utils.cpp_extension import include_paths

    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("no g++ to build the kernel emulation with AddressSanitizer")
    libasan = subprocess.run([compiler, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not pathlib.Path(libasan).is_absolute():
        pytest.skip("g++ has no AddressSanitizer runtime (libasan.so)")
    library = tmp_path / "conv_proj_asan.so"
    command = [compiler, "-std=c++20", "-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer",
               "-fno-strict-aliasing", "-shared", "-fPIC", "-pthread", f"-I{CSRC}",
               *(f"-I{p}" for p in include_paths()[:1]), str(CSRC / "emulate" / "emulate_conv_proj.cpp"),
               "-o", str(library)]
    built = subprocess.run(command, capture_output=True, text=True)
    assert built.returncode == 0, f"building the emulation failed:\n{' '.join(command)}\n{built.stderr[-4000:]}"
    # detect_leaks=0: Python itself "leaks" at exit. The fibers' stack switches draw one ASan warning
    # ("doesn't fully support makecontext/swapcontext"); the host arrays live on the real stack.
    env = dict(os.environ, LD_PRELOAD=libasan, ASAN_OPTIONS="detect_leaks=0")
    run = subprocess.run([sys.executable, "-c", RUN, str(library)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0 and "ERROR: AddressSanitizer" not in run.stderr, run.stderr[-6000:]
    assert "clean" in run.stdout
