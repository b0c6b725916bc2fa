"""csrc/conv_proj.cu on the CPU: the CUDA kernels compiled by g++ through csrc/emulate/ (every CUDA
thread a fiber; cp.async copies NaN until the issuing thread's own wait lands them), against the plain-PyTorch
reference of cvt_fast/ops/reference.py evaluated in float64.

Tolerances are error bounds, element by element, not norms: an fp32 sum of n products is within
n * 2^-24 * (the same sum over absolute values) of the exact one, and a result rounded to its
dtype is within one unit of that dtype's epsilon times its size more. A dropped, doubled or
misplaced tap, row or column moves some element by a whole product, orders of magnitude past
that bound (the margins are written in csrc/NOTES.md). The emulation runs the wrapper's plans
and grid shapes; the number of CTAs per channel chunk (on a GPU, one resident wave, so every CTA
walks many (image, tile) items) is set here so that the item loop, its double buffer and a
partial last round all run.
"""
import ctypes
import pathlib
import shutil
import subprocess

import pytest
import torch

from cvt_fast.ops.reference import conv_proj_backward_reference, conv_proj_reference, output_size

pytestmark = pytest.mark.slow

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
UNIT_ROUNDOFF_FP32 = 2.0 ** -24

I64, INT, PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
SIGNATURES = {
    "emu_conv_proj_forward_ex": ([INT, PTR, I64, I64] + [PTR] * 9 + [INT] * 9 + [INT, INT, PTR], None),
    "emu_conv_proj_backward_ex": ([INT] + [PTR] * 7 + [I64, I64, PTR, PTR] + [INT] * 9 + [INT, INT, PTR], None),
    "emu_conv_proj_misaligned_pairs": ([], INT),
}


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    """csrc/emulate/emulate_conv_proj.cpp compiled with the host C++ compiler (about 40 s) and loaded."""
    from torch.utils.cpp_extension import include_paths

    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no host C++ compiler (g++) to build the kernel emulation")
    csrc = pathlib.Path(__file__).resolve().parent.parent / "csrc"
    library = tmp_path_factory.mktemp("emulate_conv_proj") / "conv_proj_emulate.so"
    command = [compiler, "-std=c++20", "-O2", "-fno-strict-aliasing", "-shared", "-fPIC", "-pthread", f"-I{csrc}",
               *(f"-I{p}" for p in include_paths()[:1]), str(csrc / "emulate" / "emulate_conv_proj.cpp"),
               "-o", str(library)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"building the emulation failed:\n{' '.join(command)}\n{result.stderr[-4000:]}"
    loaded = ctypes.CDLL(str(library))
    for name, (argtypes, restype) in SIGNATURES.items():
        getattr(loaded, name).argtypes = argtypes
        getattr(loaded, name).restype = restype
    return loaded


def _ptr(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _tap_major(w):
    """(C, 1, k, k) -> (k*k, C) fp32, as the CUDA wrapper hands the weights to the kernels."""
    return w.reshape(w.shape[0], -1).float().t().contiguous()


class Geometry:
    def __init__(self, batch, height, width, channels, has_cls, kernel, stride_q, stride_kv, padding_q, padding_kv):
        self.batch, self.height, self.width, self.channels = batch, height, width, channels
        self.has_cls, self.kernel = has_cls, kernel
        self.stride_q, self.stride_kv, self.padding_q, self.padding_kv = stride_q, stride_kv, padding_q, padding_kv

    def args(self):
        """The (height, width, has_cls, strides, paddings) tail of the reference's arguments."""
        return (self.height, self.width, self.has_cls, self.stride_q, self.stride_kv, self.padding_q, self.padding_kv)

    def tokens(self, stride, padding):
        k = self.kernel
        return self.has_cls + output_size(self.height, k, stride, padding) * output_size(self.width, k, stride, padding)

    def ints(self):
        return (self.batch, self.channels, self.height, self.width, int(self.has_cls), self.kernel, self.stride_q,
                self.stride_kv, self.padding_q, self.padding_kv)

    def __repr__(self):
        return (f"B{self.batch} {self.height}x{self.width} C{self.channels} cls={int(self.has_cls)} k{self.kernel} "
                f"s{self.stride_q}/{self.stride_kv} p{self.padding_q}/{self.padding_kv}")


def emulated_forward(lib, g, x, weights, biases, ctas_per_chunk=0, vector_copies=True):
    """q, k, v from the emulated kernels (outputs start as NaN: an element never written fails), and
    whether the fused kernels ran."""
    q = torch.full((g.batch, g.tokens(g.stride_q, g.padding_q), g.channels), float("nan"), dtype=x.dtype)
    k = torch.full((g.batch, g.tokens(g.stride_kv, g.padding_kv), g.channels), float("nan"), dtype=x.dtype)
    v = torch.full_like(k, float("nan"))
    w = [_tap_major(t) for t in weights]
    b = [None if t is None else t.float().contiguous() for t in biases]
    path = ctypes.c_int(-1)
    lib.emu_conv_proj_forward_ex(DTYPE_CODE[x.dtype], _ptr(x), x.stride(0), x.stride(1), *map(_ptr, w), *map(_ptr, b),
                                 _ptr(q), _ptr(k), _ptr(v), *g.ints(), int(vector_copies), ctas_per_chunk,
                                 ctypes.byref(path))
    assert lib.emu_conv_proj_misaligned_pairs() == 0, "a two-channel load or store was misaligned"
    return (q, k, v), path.value == 1


def emulated_backward(lib, g, grads, x, weights, ctas_per_chunk=0, vector_copies=True):
    """grad_x (x's dtype) and the three weight gradients in fp32, (C, 1, k, k), before any cast."""
    grads = [t.contiguous() for t in grads]
    grad_x = torch.full(x.shape, float("nan"), dtype=x.dtype)
    weight_grad = torch.full((3, g.channels, g.kernel * g.kernel), float("nan"))
    w = [_tap_major(t) for t in weights]
    path = ctypes.c_int(-1)
    lib.emu_conv_proj_backward_ex(DTYPE_CODE[x.dtype], *map(_ptr, grads), *map(_ptr, w), _ptr(x), x.stride(0),
                                  x.stride(1), _ptr(grad_x), _ptr(weight_grad), *g.ints(), int(vector_copies),
                                  ctas_per_chunk, ctypes.byref(path))
    assert lib.emu_conv_proj_misaligned_pairs() == 0, "a two-channel load or store was misaligned"
    shape = (g.channels, 1, g.kernel, g.kernel)
    return (grad_x, *(weight_grad[i].reshape(shape) for i in range(3))), path.value == 1


def random_inputs(g, dtype, bias=True, token_stride=None, offset=0):
    """x (B, T, C) in `dtype` (optionally a view with a wider token stride, or starting `offset`
    elements into its storage), weights and biases rounded to `dtype` as the Python layer casts
    them, kept in float32 for the kernels."""
    tokens = g.has_cls + g.height * g.width
    row = token_stride or g.channels
    storage = torch.randn(g.batch * tokens * row + offset).to(dtype)
    x = storage[offset:].view(g.batch, tokens, row)[:, :, :g.channels]
    weights = [(torch.randn(g.channels, 1, g.kernel, g.kernel) / g.kernel).to(dtype).float() for _ in range(3)]
    biases = [torch.randn(g.channels).to(dtype).float() if bias else None for _ in range(3)]
    return x, weights, biases


def _f64(tensors):
    return [None if t is None else t.to(torch.float64) for t in tensors]


def _abs(tensors):
    return [None if t is None else t.abs() for t in tensors]


def bound_ratio(got, exact, magnitude, dtype, terms):
    """max over elements of |got - exact| / bound, bound = 2 * terms * 2^-24 * magnitude (the fp32
    accumulation, counted twice for the rounding before the last store) + eps(dtype) * |exact|."""
    assert got.shape == exact.shape, f"shape {tuple(got.shape)} != {tuple(exact.shape)}"
    assert torch.isfinite(got).all(), "result has NaN or Inf (an element never written, or garbage)"
    eps = torch.finfo(dtype).eps if dtype != torch.float32 else 0.0
    bound = 2 * terms * UNIT_ROUNDOFF_FP32 * magnitude + eps * exact.abs() + 1e-30
    return ((got.to(torch.float64) - exact).abs() / bound).max().item()


def check_forward(lib, g, dtype, ctas_per_chunk=0, vector_copies=True, expect_fused=None, **input_options):
    x, weights, biases = random_inputs(g, dtype, **input_options)
    outs, fused = emulated_forward(lib, g, x, weights, biases, ctas_per_chunk, vector_copies)
    if expect_fused is not None:
        assert fused == expect_fused, f"{g}: fused path {fused}, expected {expect_fused}"
    exact = conv_proj_reference(*_f64([x, *weights, *biases]), *g.args())
    magnitude = conv_proj_reference(*_abs(_f64([x, *weights, *biases])), *g.args())
    ratios = [bound_ratio(o, e, m, dtype, g.kernel ** 2 + 1) for o, e, m in zip(outs, exact, magnitude)]
    assert max(ratios) <= 1.0, f"{g} {dtype}: q, k, v errors at {ratios} of their bounds"
    for o in outs:
        assert o.dtype == dtype and o.is_contiguous()
    return x, weights, outs, max(ratios)


def check_backward(lib, g, dtype, x, weights, ctas_per_chunk=0, vector_copies=True):
    grads = [torch.randn(g.batch, g.tokens(s, p), g.channels).to(dtype)
             for s, p in ((g.stride_q, g.padding_q), (g.stride_kv, g.padding_kv), (g.stride_kv, g.padding_kv))]
    got, fused = emulated_backward(lib, g, grads, x, weights, ctas_per_chunk, vector_copies)
    exact = conv_proj_backward_reference(*_f64([*grads, x, *weights]), *g.args())
    magnitude = conv_proj_backward_reference(*_abs(_f64([*grads, x, *weights])), *g.args())
    positions = g.batch * max(g.tokens(g.stride_q, g.padding_q), g.tokens(g.stride_kv, g.padding_kv))
    ratios = [bound_ratio(got[0], exact[0], magnitude[0], dtype, 3 * g.kernel ** 2 + 3)]
    ratios += [bound_ratio(o, e, m, torch.float32, positions + 64) for o, e, m in zip(got[1:], exact[1:], magnitude[1:])]
    assert max(ratios) <= 1.0, f"{g} {dtype}: grad_x, grad_wq/k/v errors at {ratios} of their bounds"
    assert got[0].dtype == dtype and got[0].is_contiguous()
    return got, fused, max(ratios)


# batch, height, width, channels, has_cls, kernel, stride_q, stride_kv, padding_q, padding_kv; fused?
CASES = [
    # Fused path (k = 3: two channels per lane, 64 per CTA; k = 5: one per lane, 32 per CTA).
    # 15 x 13 anchors span 2 x 1 tiles of 4 x 8; C = 72 is a full 64-channel chunk and a partial
    # one; C = 33 takes the scalar copies and element stores (the last lane holds one channel);
    # C = 18 the scalar copies with paired stores; 9 x 19 with k = 5 crosses a tile column edge.
    ((2, 15, 13, 72, False, 3, 1, 2, 1, 1), True),
    ((2, 15, 13, 40, True, 3, 1, 2, 1, 1), True),
    ((1, 6, 5, 33, True, 3, 1, 2, 1, 1), True),
    ((1, 7, 9, 18, True, 3, 1, 2, 1, 1), True),
    ((2, 9, 19, 40, True, 5, 1, 2, 2, 2), True),
    ((2, 1, 1, 3, True, 3, 1, 2, 1, 1), True),
    # 16 x 16: the backward's x-position anchors (shifted by padding_kv) need one more tile row and
    # column than the outputs do, as at CvT-13 stage 1 (56 x 56).
    ((1, 16, 16, 24, False, 3, 1, 2, 1, 1), True),
    # Generic path: other strides, even and unit kernels, one shared geometry, paddings >= k.
    ((2, 9, 11, 20, True, 5, 2, 3, 2, 0), False),
    ((2, 8, 9, 8, True, 4, 1, 2, 1, 2), False),
    ((1, 7, 6, 12, False, 3, 2, 2, 1, 1), False),
    ((1, 5, 7, 33, True, 1, 1, 2, 0, 0), False),
    ((1, 4, 5, 8, False, 3, 1, 2, 3, 1), False),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case,fused", CASES, ids=[str(Geometry(*c)) for c, _ in CASES])
def test_emulated_conv_proj_matches_reference(lib, dtype, case, fused):
    g = Geometry(*case)
    x, weights, _, _ = check_forward(lib, g, dtype, expect_fused=fused)
    _, backward_fused, _ = check_backward(lib, g, dtype, x, weights)
    assert backward_fused == fused


@pytest.mark.parametrize("kernel", [3, 5])
def test_emulated_fused_path_sweeps_every_padding_pair(lib, kernel):
    # Every (padding_q, padding_kv) in [0, k)^2 on the fused path (issue 16): the x box, the
    # grad_q box and the anchor range all depend on the pair; 11 x 19 spans 2 x 2 tiles.
    for padding_q in range(kernel):
        for padding_kv in range(kernel):
            g = Geometry(1, 11, 19, 12, bool(padding_q % 2), kernel, 1, 2, padding_q, padding_kv)
            x, weights, _, _ = check_forward(lib, g, torch.float32, ctas_per_chunk=1, expect_fused=True)
            check_backward(lib, g, torch.float32, x, weights, ctas_per_chunk=1)


@pytest.mark.parametrize("ctas_per_chunk", [1, 5, 1000])
def test_emulated_fused_item_loop_matches_reference(lib, ctas_per_chunk):
    # 3 images x 2 x 2 tiles = 12 items per chunk: one CTA walks them all; five walk 3, 3, 2, 2, 2
    # (a partial last round); or one item per CTA (the count is clamped to the items).
    g = Geometry(3, 15, 19, 72, True, 3, 1, 2, 1, 1)
    x, weights, _, _ = check_forward(lib, g, torch.bfloat16, ctas_per_chunk=ctas_per_chunk, expect_fused=True)
    check_backward(lib, g, torch.bfloat16, x, weights, ctas_per_chunk=ctas_per_chunk)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_emulated_scalar_copies_match_vector_copies_bit_for_bit(lib, dtype):
    g = Geometry(2, 9, 11, 40, True, 3, 1, 2, 1, 1)
    x, weights, biases = random_inputs(g, dtype)
    vector, _ = emulated_forward(lib, g, x, weights, biases, vector_copies=True)
    scalar, _ = emulated_forward(lib, g, x, weights, biases, vector_copies=False)
    for a, b in zip(vector, scalar):
        assert torch.equal(a, b)
    grads = [torch.randn_like(o) for o in vector]
    vector_grads, _ = emulated_backward(lib, g, grads, x, weights, vector_copies=True)
    scalar_grads, _ = emulated_backward(lib, g, grads, x, weights, vector_copies=False)
    for a, b in zip(vector_grads, scalar_grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("layout", ["token_stride", "misaligned", "no_bias"])
def test_emulated_conv_proj_reads_x_views(lib, layout):
    # A wider token stride (a slice of a wider tensor: still 16-byte copies) and a base 2 bytes past
    # a 16-byte boundary (scalar copies) must give the reference's results.
    g = Geometry(2, 7, 9, 16, True, 3, 1, 2, 1, 1)
    options = {"token_stride": {"token_stride": 40}, "misaligned": {"offset": 1}, "no_bias": {"bias": False}}[layout]
    x, weights, _, _ = check_forward(lib, g, torch.bfloat16, expect_fused=True, **options)
    check_backward(lib, g, torch.bfloat16, x, weights)


def test_emulated_conv_proj_at_cvt13_stage3_shape(lib):
    # The real stage-3 geometry (14 x 14 + cls, C = 384: 12 channel chunks), one image, bf16.
    g = Geometry(1, 14, 14, 384, True, 3, 1, 2, 1, 1)
    x, weights, _, _ = check_forward(lib, g, torch.bfloat16, expect_fused=True)
    check_backward(lib, g, torch.bfloat16, x, weights)
