"""The host emulation catches a missing cp.async wait in one warp (csrc/emulate/cuda_on_host.h).

cp.async is emulated per emulated thread: the destination is NaN from issue until a wait_group of
the issuing thread retires its group. The queues used to be `thread_local`, and since every thread
of a block is a fiber on one OS thread, one queue served the whole block: a warp that skipped its
wait had its copies landed by another warp's wait, and the run passed. Here a bug is planted in a
copy of csrc/conv_proj.cu (warp 3 of a fused kernel skips its `cp_async_wait<1>()`), the emulation
is compiled from that copy, and the run must fail (NaN in the outputs). One build serves every case:
a switch set through ctypes picks the kernel whose wait is skipped (forward, backward), or none, and
with none the same build must pass, so the failure is the bug's.
"""
import ctypes
import pathlib
import shutil
import subprocess

import pytest
import torch

from cvt_fast.ops.reference import conv_proj_backward_reference, conv_proj_reference, output_size

pytestmark = pytest.mark.slow

CSRC = pathlib.Path(__file__).resolve().parent.parent / "csrc"
WAIT = "cp_async_wait<1>();"
# In the kernel chosen by the switch (1: the fused forward, 2: the fused backward), warp 3 (threads
# 96..127 of 256) skips the wait; every other warp still waits, then all meet at the __syncthreads()
# that follows and read the whole box, warp 3's rows included.
SKIPS_IN = "if (!(g_planted_skip_wait == {kernel} && threadIdx.x / 32 == 3)) cp_async_wait<1>();"
SWITCH = """
// Planted by tests/test_cuda_emulation_cp_async.py: which fused kernel's warp 3 skips its wait.
namespace cvt_fast {
inline int g_planted_skip_wait = 0;
}
"""
SETTER = """
extern "C" void emu_plant_skip_wait(int kernel) { cvt_fast::g_planted_skip_wait = kernel; }
"""

I64, INT, PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
SIGNATURES = {
    "emu_conv_proj_forward_ex": [INT, PTR, I64, I64] + [PTR] * 9 + [INT] * 9 + [INT, INT, PTR],
    "emu_conv_proj_backward_ex": [INT] + [PTR] * 7 + [I64, I64, PTR, PTR] + [INT] * 9 + [INT, INT, PTR],
}
# batch, channels, height, width, cls, k, stride_q, stride_kv, padding_q, padding_kv (the emulation
# entry points' order): the fused path with 15 x 13 anchors, 2 x 1 tiles per image, 4 items over
# ctas_per_chunk=2 CTAs, so the double buffer's wait in the item loop runs for both buffers.
GEOMETRY = (2, 40, 15, 13, 1, 3, 1, 2, 1, 1)
CTAS_PER_CHUNK = 2


def build(tmp: pathlib.Path) -> ctypes.CDLL:
    """The conv_proj emulation compiled from a copy of csrc/ in which each fused kernel's
    `cp_async_wait<1>();` is skipped by warp 3 when emu_plant_skip_wait selects that kernel."""
    from torch.utils.cpp_extension import include_paths

    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no host C++ compiler (g++) to build the kernel emulation")
    copy = tmp / "csrc"
    shutil.copytree(CSRC, copy)
    source = (copy / "conv_proj.cu").read_text()
    assert source.count(WAIT) == 2, "expected one cp_async_wait<1>() in each fused kernel of conv_proj.cu"
    forward, backward = source.index(WAIT), source.rindex(WAIT)
    anchor = "namespace cvt_fast {\nnamespace {\n"
    assert anchor in source and source.index(anchor) < forward  # the kernels' namespace, before them
    source = (source[:forward] + SKIPS_IN.format(kernel=1) + source[forward + len(WAIT):backward]
              + SKIPS_IN.format(kernel=2) + source[backward + len(WAIT):])
    source = source.replace(anchor, SWITCH + anchor, 1)
    (copy / "conv_proj.cu").write_text(source)
    with open(copy / "emulate" / "emulate_conv_proj.cpp", "a") as entry_points:
        entry_points.write(SETTER)
    library = tmp / "conv_proj_emulate.so"
    command = [compiler, "-std=c++20", "-O2", "-fno-strict-aliasing", "-shared", "-fPIC", "-pthread", f"-I{copy}",
               *(f"-I{p}" for p in include_paths()[:1]), str(copy / "emulate" / "emulate_conv_proj.cpp"),
               "-o", str(library)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"building the emulation failed:\n{' '.join(command)}\n{result.stderr[-4000:]}"
    lib = ctypes.CDLL(str(library))
    for name, argtypes in {**SIGNATURES, "emu_plant_skip_wait": [INT]}.items():
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = None
    return lib


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    lib = build(tmp_path_factory.mktemp("planted"))
    yield lib
    lib.emu_plant_skip_wait(0)


def _ptr(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _tap_major(w):
    return w.reshape(w.shape[0], -1).float().t().contiguous()


def run_forward_and_backward(lib):
    """(q, k, v, grad_x, grad_wq, grad_wk, grad_wv) from the emulation and the float64 reference, float32."""
    batch, channels, height, width, cls, kernel, sq, skv, pq, pkv = GEOMETRY
    args = (height, width, bool(cls), sq, skv, pq, pkv)
    tokens = lambda s, p: cls + output_size(height, kernel, s, p) * output_size(width, kernel, s, p)  # noqa: E731
    x = torch.randn(batch, cls + height * width, channels)
    weights = [torch.randn(channels, 1, kernel, kernel) / kernel for _ in range(3)]
    biases = [torch.randn(channels) for _ in range(3)]
    outs = [torch.full((batch, tokens(s, p), channels), float("nan")) for s, p in ((sq, pq), (skv, pkv), (skv, pkv))]
    tap_major = [_tap_major(w) for w in weights]  # kept alive: the kernels read them through raw pointers
    path = ctypes.c_int(-1)
    lib.emu_conv_proj_forward_ex(0, _ptr(x), x.stride(0), x.stride(1), *map(_ptr, tap_major),
                                 *map(_ptr, biases), *map(_ptr, outs), *GEOMETRY, 1, CTAS_PER_CHUNK, ctypes.byref(path))
    assert path.value == 1, "the geometry must take the fused kernels"
    grads = [torch.randn(o.shape) for o in outs]
    grad_x = torch.full(x.shape, float("nan"))
    weight_grad = torch.full((3, channels, kernel * kernel), float("nan"))
    lib.emu_conv_proj_backward_ex(0, *map(_ptr, grads), *map(_ptr, tap_major), _ptr(x),
                                  x.stride(0), x.stride(1), _ptr(grad_x), _ptr(weight_grad), *GEOMETRY, 1,
                                  CTAS_PER_CHUNK, ctypes.byref(path))
    got = [*outs, grad_x, *(weight_grad[i].reshape(weights[i].shape) for i in range(3))]
    f64 = lambda ts: [t.double() for t in ts]  # noqa: E731
    exact = [*conv_proj_reference(*f64([x, *weights, *biases]), *args),
             *conv_proj_backward_reference(*f64([*grads, x, *weights]), *args)]
    return got, exact


def max_error(got, exact):
    """Largest |got - exact| over all outputs, inf where an output holds NaN."""
    worst = 0.0
    for g, e in zip(got, exact):
        if not torch.isfinite(g).all():
            return float("inf")
        worst = max(worst, (g.double() - e).abs().max().item())
    return worst


# fp32 sums of at most 3 * 9 + 3 terms (grad_x) or B * Ho * Wo products (weights) of O(1) values.
TOLERANCE = 1e-3


def test_emulated_conv_proj_passes_with_every_wait(planted):
    planted.emu_plant_skip_wait(0)
    got, exact = run_forward_and_backward(planted)
    assert max_error(got, exact) < TOLERANCE


@pytest.mark.parametrize("kernel", [1, 2], ids=["forward", "backward"])
def test_emulation_fails_when_one_warp_skips_its_cp_async_wait(planted, kernel):
    planted.emu_plant_skip_wait(kernel)
    got, exact = run_forward_and_backward(planted)
    assert max_error(got, exact) > 1.0, (
        "warp 3 read its shared-memory box without waiting for its own cp.async copies, and the emulated "
        "run still matched the reference: the emulation landed them through another warp's wait")
