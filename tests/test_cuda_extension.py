"""The CUDA C++ extension cvt_fast._C (csrc/): build, op registration, Meta shapes and errors.

On the CPU: the extension imports, registers the four torch.ops.cvt_fast.*_cuda ops with
their schemas, gives the right shapes on meta and fake tensors, and refuses CPU tensors
with a clear error; and the kernels themselves, compiled by g++ from the same sources through
csrc/emulate/ (CUDA threads as fibers; mma.sync, ldmatrix and cp.async emulated lane by lane with
the PTX fragment layouts), at tiny odd sizes, with tolerances set from the kernels' own roundings.
On a GPU (tests marked `gpu`): every op against a float64 plain-PyTorch reference written here,
forward and backward (backward against autograd of the reference), for bfloat16, float16 and
float32, head_dim 32/64/128, at odd sizes (partial tiles, Nkv = 1), strided views, odd grids
with and without a cls token, the real CvT-13 stage shapes, the 16-bit attention on both the
tensor-core and the CUDA-core (CVT_FAST_CUDA_ATTENTION=simt) kernels, rows not 16-byte aligned,
and the backward's deterministic mode.
"""
import ctypes
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tolerances import RELATIVE_TOLERANCE, assert_close, relative_error

from cvt_fast.extension import extension_status, load_extension

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
HEAD_DIMS = [32, 64, 128]

EXPECTED_SCHEMAS = {
    "attention_forward_cuda":
        "cvt_fast::attention_forward_cuda(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor out, Tensor lse)",
    "attention_backward_cuda":
        "cvt_fast::attention_backward_cuda(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
        "Tensor lse, float scale) -> (Tensor dq, Tensor dk, Tensor dv)",
    "conv_proj_forward_cuda":
        "cvt_fast::conv_proj_forward_cuda(Tensor x, Tensor wq, Tensor wk, Tensor wv, Tensor? bq, Tensor? bk, "
        "Tensor? bv, int height, int width, bool has_cls, int stride_q, int stride_kv, int padding_q, "
        "int padding_kv) -> (Tensor q, Tensor k, Tensor v)",
    "conv_proj_backward_cuda":
        "cvt_fast::conv_proj_backward_cuda(Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor x, Tensor wq, "
        "Tensor wk, Tensor wv, int height, int width, bool has_cls, int stride_q, int stride_kv, int padding_q, "
        "int padding_kv) -> (Tensor grad_x, Tensor grad_wq, Tensor grad_wk, Tensor grad_wv)",
}

# The backward reads the forward's rounded output (delta = dO . O) and rounds its own
# results: one rounding more than the forward, so 16-bit gradients get twice the tolerance.
BACKWARD_FACTOR = {torch.bfloat16: 2.0, torch.float16: 2.0, torch.float32: 1.0}


@pytest.fixture(scope="module")
def ops():
    if load_extension() is None:
        pytest.skip(f"cvt_fast._C is {extension_status()}")
    return torch.ops.cvt_fast


# ---------------------------------------------------------------- references (float64)

def reference_attention(q, k, v, scale):
    """q: (B, Nq, H, d), k, v: (B, Nkv, H, d) -> out (B, Nq, H*d), lse (B, H, Nq), in float64."""
    q, k, v = (t.to(torch.float64).transpose(1, 2) for t in (q, k, v))  # (B, H, N, d)
    scores = scale * q @ k.transpose(-1, -2)
    out = torch.softmax(scores, dim=-1) @ v
    return out.transpose(1, 2).flatten(2), torch.logsumexp(scores, dim=-1)


def reference_conv_proj(x, wq, wk, wv, bq, bk, bv, height, width, has_cls, stride_q, stride_kv,
                        padding_q, padding_kv):
    """Three depthwise Conv2d of the token grid, in float64; the cls row passes through."""
    x = x.to(torch.float64)
    cls, grid = (x[:, :1], x[:, 1:]) if has_cls else (None, x)
    batch, channels = x.shape[0], x.shape[2]
    image = grid.transpose(1, 2).reshape(batch, channels, height, width)

    def conv(weight, bias, stride, padding):
        bias = None if bias is None else bias.to(torch.float64)
        y = F.conv2d(image, weight.to(torch.float64), bias, stride=stride, padding=padding, groups=channels)
        y = y.flatten(2).transpose(1, 2)
        return torch.cat([cls, y], dim=1) if has_cls else y

    return (conv(wq, bq, stride_q, padding_q), conv(wk, bk, stride_kv, padding_kv),
            conv(wv, bv, stride_kv, padding_kv))


def conv_out(size, kernel, stride, padding):
    return (size + 2 * padding - kernel) // stride + 1


# ---------------------------------------------------------------- CPU: build, schemas, shapes, errors

def test_extension_is_built_and_imports(ops):
    assert extension_status() == "built"
    assert load_extension().__name__ == "cvt_fast._C"


@pytest.mark.parametrize("name", sorted(EXPECTED_SCHEMAS))
def test_op_is_registered_with_expected_schema(ops, name):
    schema = str(getattr(ops, name).default._schema)
    assert " ".join(schema.split()) == EXPECTED_SCHEMAS[name]


@pytest.mark.parametrize("name", sorted(EXPECTED_SCHEMAS))
def test_op_has_cuda_and_meta_kernels(ops, name):
    qualname = f"cvt_fast::{name}"
    for key in ("CUDA", "Meta"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key), f"{qualname} has no {key} kernel"


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_forward_meta_shapes(ops, dtype):
    # q is a strided view, as the Linear output (B, N, 3, H, d) would give it.
    packed = torch.empty(2, 197, 3, 6, 64, device="meta", dtype=dtype)
    q = packed[:, :, 0]
    k = torch.empty(2, 50, 6, 64, device="meta", dtype=dtype)
    v = torch.empty(2, 6, 50, 64, device="meta", dtype=dtype).transpose(1, 2)
    out, lse = ops.attention_forward_cuda(q, k, v, 384 ** -0.5)
    assert out.shape == (2, 197, 384) and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == (2, 6, 197) and lse.dtype == torch.float32


def test_attention_backward_meta_shapes(ops):
    q = torch.empty(3, 37, 2, 32, device="meta", dtype=torch.bfloat16)
    k = torch.empty(3, 13, 2, 32, device="meta", dtype=torch.bfloat16)
    v = torch.empty_like(k)
    out = torch.empty(3, 37, 64, device="meta", dtype=torch.bfloat16)
    lse = torch.empty(3, 2, 37, device="meta", dtype=torch.float32)
    dq, dk, dv = ops.attention_backward_cuda(out, q, k, v, out, lse, 0.125)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    assert dq.dtype == dk.dtype == dv.dtype == torch.bfloat16


@pytest.mark.parametrize("has_cls,height,width,channels", [(False, 15, 13, 40), (True, 14, 14, 384),
                                                           (False, 56, 56, 64), (True, 1, 1, 8)])
def test_conv_proj_forward_meta_shapes(ops, has_cls, height, width, channels):
    x = torch.empty(2, has_cls + height * width, channels, device="meta", dtype=torch.float16)
    w = torch.empty(channels, 1, 3, 3, device="meta")
    q, k, v = ops.conv_proj_forward_cuda(x, w, w, w, None, None, None, height, width, has_cls, 1, 2, 1, 1)
    tokens_q = has_cls + conv_out(height, 3, 1, 1) * conv_out(width, 3, 1, 1)
    tokens_kv = has_cls + conv_out(height, 3, 2, 1) * conv_out(width, 3, 2, 1)
    assert q.shape == (2, tokens_q, channels) and q.dtype == torch.float16
    assert k.shape == v.shape == (2, tokens_kv, channels)


def test_conv_proj_backward_meta_shapes(ops):
    x = torch.empty(2, 1 + 7 * 5, 24, device="meta", dtype=torch.bfloat16)
    w = torch.empty(24, 1, 3, 3, device="meta", dtype=torch.float32)
    gq = torch.empty(2, 1 + 7 * 5, 24, device="meta", dtype=torch.bfloat16)
    gkv = torch.empty(2, 1 + 4 * 3, 24, device="meta", dtype=torch.bfloat16)
    grad_x, gwq, gwk, gwv = ops.conv_proj_backward_cuda(gq, gkv, gkv, x, w, w, w, 7, 5, True, 1, 2, 1, 1)
    assert grad_x.shape == x.shape and grad_x.dtype == torch.bfloat16
    assert gwq.shape == gwk.shape == gwv.shape == w.shape and gwq.dtype == torch.float32


def test_ops_trace_under_fake_tensors(ops):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 197, 6, 64, dtype=torch.bfloat16)
        k = torch.empty(2, 50, 6, 64, dtype=torch.bfloat16)
        out, lse = ops.attention_forward_cuda(q, k, k, 0.05)
        x = torch.empty(2, 197, 384, dtype=torch.bfloat16)
        w = torch.empty(384, 1, 3, 3)
        cq, ck, cv = ops.conv_proj_forward_cuda(x, w, w, w, None, None, None, 14, 14, True, 1, 2, 1, 1)
    assert out.shape == (2, 197, 384) and lse.shape == (2, 6, 197)
    assert cq.shape == (2, 197, 384) and ck.shape == cv.shape == (2, 50, 384)


def test_meta_rejects_wrong_token_count_and_rank(ops):
    x = torch.empty(2, 100, 16, device="meta")
    w = torch.empty(16, 1, 3, 3, device="meta")
    with pytest.raises(ValueError, match="tokens"):
        ops.conv_proj_forward_cuda(x, w, w, w, None, None, None, 9, 9, True, 1, 2, 1, 1)
    x = torch.empty(2, 1 + 4 * 6, 16, device="meta")
    w5 = torch.empty(16, 1, 5, 5, device="meta")
    with pytest.raises(ValueError, match="smaller than"):  # 4 rows, no padding for k/v: no 5 x 5 window fits
        ops.conv_proj_forward_cuda(x, w5, w5, w5, None, None, None, 4, 6, True, 1, 3, 2, 0)
    q = torch.empty(2, 10, 64, device="meta")
    with pytest.raises(ValueError, match="4-dimensional"):
        ops.attention_forward_cuda(q, q, q, 1.0)


def test_attention_on_cpu_tensors_raises_clear_error(ops):
    q = torch.randn(1, 5, 1, 64)
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        ops.attention_forward_cuda(q, q, q, 0.125)
    out = torch.randn(1, 5, 64)
    lse = torch.randn(1, 1, 5)
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        ops.attention_backward_cuda(out, q, q, q, out, lse, 0.125)


def test_conv_proj_on_cpu_tensors_raises_clear_error(ops):
    x = torch.randn(2, 1 + 5 * 5, 8)
    w = torch.randn(8, 1, 3, 3)
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        ops.conv_proj_forward_cuda(x, w, w, w, None, None, None, 5, 5, True, 1, 2, 1, 1)
    gq, gkv = torch.randn(2, 26, 8), torch.randn(2, 10, 8)
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        ops.conv_proj_backward_cuda(gq, gkv, gkv, x, w, w, w, 5, 5, True, 1, 2, 1, 1)


# ---------------------------------------------------------------- two ways to run the kernels
#
# "cuda": the registered ops on a GPU. "emulated": the same kernel source compiled by the host
# C++ compiler (csrc/emulate/), every CUDA thread a fiber, with the production grid, block and
# shared-memory shapes and the launchers' choice of kernel: it checks index math, fragment layouts,
# masks, barriers, shuffles and the cp.async pipeline on machines without a GPU (slow, so its
# shapes are tiny). Both return exactly what the ops return.

class CudaKernels:
    device = "cuda"

    def attention_forward(self, q, k, v, scale):
        return torch.ops.cvt_fast.attention_forward_cuda(q, k, v, scale)

    def attention_backward(self, grad_out, q, k, v, out, lse, scale):
        return torch.ops.cvt_fast.attention_backward_cuda(grad_out, q, k, v, out, lse, scale)

    def conv_proj_forward(self, x, wq, wk, wv, bq, bk, bv, *geometry):
        return torch.ops.cvt_fast.conv_proj_forward_cuda(x, wq, wk, wv, bq, bk, bv, *geometry)

    def conv_proj_backward(self, grad_q, grad_k, grad_v, x, wq, wk, wv, *geometry):
        return torch.ops.cvt_fast.conv_proj_backward_cuda(grad_q, grad_k, grad_v, x, wq, wk, wv, *geometry)


DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _ptr(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


class EmulatedKernels:
    """csrc/emulate/*.cpp through ctypes; inputs prepared as the C++ wrappers prepare them."""

    device = "cpu"

    def __init__(self, lib, tensor_cores=True, deterministic=False):
        self.lib = lib
        self.tensor_cores = tensor_cores  # as on sm_80+ (False: as with CVT_FAST_CUDA_ATTENTION=simt)
        self.deterministic = deterministic  # as under torch.use_deterministic_algorithms(True)
        self.ran_tensor_cores = {}  # "forward"/"backward" -> whether the last call took the tensor-core kernels

    def attention_forward(self, q, k, v, scale):
        batch, n_q, heads, head_dim = q.shape
        out = torch.full((batch, n_q, heads * head_dim), float("nan"), dtype=q.dtype)
        lse = torch.full((batch, heads, n_q), float("nan"))
        strides = (ctypes.c_int64 * 9)(*q.stride()[:3], *k.stride()[:3], *v.stride()[:3])
        self.ran_tensor_cores["forward"] = bool(self.lib.emu_attention_forward(
            DTYPE_CODE[q.dtype], head_dim, _ptr(q), _ptr(k), _ptr(v), _ptr(out), _ptr(lse), batch, n_q, k.shape[1],
            heads, strides, ctypes.c_float(scale), int(self.tensor_cores)))
        return out, lse

    def attention_backward(self, grad_out, q, k, v, out, lse, scale):
        batch, n_q, heads, head_dim = q.shape
        grad_out, out, lse = grad_out.contiguous(), out.contiguous(), lse.contiguous()
        dq, dk, dv = (torch.full(t.shape, float("nan"), dtype=t.dtype) for t in (q, k, v))
        strides = (ctypes.c_int64 * 9)(*q.stride()[:3], *k.stride()[:3], *v.stride()[:3])
        self.ran_tensor_cores["backward"] = bool(self.lib.emu_attention_backward(
            DTYPE_CODE[q.dtype], head_dim, _ptr(grad_out), _ptr(q), _ptr(k), _ptr(v), _ptr(out), _ptr(lse), _ptr(dq),
            _ptr(dk), _ptr(dv), batch, n_q, k.shape[1], heads, strides, ctypes.c_float(scale), int(self.tensor_cores),
            int(self.deterministic)))
        return dq, dk, dv

    @staticmethod
    def _tap_major(w):
        return w.reshape(w.shape[0], -1).float().t().contiguous()

    def conv_proj_forward(self, x, wq, wk, wv, bq, bk, bv, height, width, has_cls, stride_q, stride_kv,
                          padding_q, padding_kv):
        batch, _, channels = x.shape
        kernel = wq.shape[-1]
        cls = int(has_cls)
        tokens_q = cls + conv_out(height, kernel, stride_q, padding_q) * conv_out(width, kernel, stride_q, padding_q)
        tokens_kv = cls + conv_out(height, kernel, stride_kv, padding_kv) * conv_out(width, kernel, stride_kv,
                                                                                      padding_kv)
        q = torch.full((batch, tokens_q, channels), float("nan"), dtype=x.dtype)
        k = torch.full((batch, tokens_kv, channels), float("nan"), dtype=x.dtype)
        v = torch.full_like(k, float("nan"))
        w = [self._tap_major(t) for t in (wq, wk, wv)]
        b = [None if t is None else t.float().contiguous() for t in (bq, bk, bv)]
        self.lib.emu_conv_proj_forward(DTYPE_CODE[x.dtype], _ptr(x), x.stride(0), x.stride(1), *map(_ptr, w),
                                       *map(_ptr, b), _ptr(q), _ptr(k), _ptr(v), batch, channels, height, width,
                                       cls, kernel, stride_q, stride_kv, padding_q, padding_kv)
        return q, k, v

    def conv_proj_backward(self, grad_q, grad_k, grad_v, x, wq, wk, wv, height, width, has_cls, stride_q,
                           stride_kv, padding_q, padding_kv):
        batch, _, channels = x.shape
        kernel = wq.shape[-1]
        grads = [g.contiguous() for g in (grad_q, grad_k, grad_v)]
        grad_x = torch.full(x.shape, float("nan"), dtype=x.dtype)
        weight_grad = torch.full((3, kernel * kernel, channels), float("nan"))
        w = [self._tap_major(t) for t in (wq, wk, wv)]
        self.lib.emu_conv_proj_backward(DTYPE_CODE[x.dtype], *map(_ptr, grads), *map(_ptr, w), _ptr(x),
                                        x.stride(0), x.stride(1), _ptr(grad_x), _ptr(weight_grad), batch, channels,
                                        height, width, int(has_cls), kernel, stride_q, stride_kv, padding_q,
                                        padding_kv)
        return (grad_x, *(weight_grad[i].t().reshape(ref.shape).to(ref.dtype) for i, ref in enumerate((wq, wk, wv))))


EMULATION_SOURCES = ["emulate_attention_fwd.cpp", "emulate_attention_bwd.cpp", "emulate_conv_proj.cpp"]
I64, F32, INT, PTR = ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_void_p
EMULATION_SIGNATURES = {
    "emu_attention_forward": [INT, INT, PTR, PTR, PTR, PTR, PTR, INT, INT, INT, INT, ctypes.POINTER(I64), F32, INT],
    "emu_attention_backward": [INT, INT] + [PTR] * 9 + [INT] * 4 + [ctypes.POINTER(I64), F32, INT, INT],
    "emu_conv_proj_forward": [INT, PTR, I64, I64] + [PTR] * 9 + [INT] * 9,
    "emu_conv_proj_backward": [INT] + [PTR] * 7 + [I64, I64, PTR, PTR] + [INT] * 9,
    "emu_attention_backward_plan": [INT, INT] + [PTR] * 8 + [INT] * 4 + [ctypes.POINTER(I64), F32, INT, INT],
    "emu_set_dry_launches": [INT],
    "emu_launch_log": [ctypes.POINTER(ctypes.c_uint), INT, ctypes.POINTER(INT)],
}
RETURNS_INT = {"emu_attention_forward", "emu_attention_backward", "emu_attention_backward_plan", "emu_launch_log"}


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """Compile csrc/emulate/ with the host C++ compiler (about 30 s) and load it."""
    from torch.utils.cpp_extension import include_paths

    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no host C++ compiler (g++) to build the kernel emulation")
    csrc = pathlib.Path(__file__).resolve().parent.parent / "csrc"
    library = tmp_path_factory.mktemp("emulate") / "cvt_fast_emulate.so"
    # -fno-strict-aliasing: the kernels pun 16-bit pairs through 32-bit words, as GPU code does.
    command = [compiler, "-std=c++20", "-O2", "-fno-strict-aliasing", "-shared", "-fPIC", "-pthread", f"-I{csrc}",
               *(f"-I{p}" for p in include_paths()[:1]), *(str(csrc / "emulate" / s) for s in EMULATION_SOURCES),
               "-o", str(library)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"building the emulation failed:\n{' '.join(command)}\n{result.stderr[-4000:]}"
    lib = ctypes.CDLL(str(library))
    for name, argtypes in EMULATION_SIGNATURES.items():
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = ctypes.c_int if name in RETURNS_INT else None
    return EmulatedKernels(lib)


@pytest.fixture(scope="module")
def cuda_kernels(ops):
    return CudaKernels()


# ---------------------------------------------------------------- attention checks

def random_qkv(batch, n_q, n_kv, heads, head_dim, dtype, device, layout="contiguous"):
    """q, k, v in the (B, N, H, d) layout; "strided": q from a packed (B, N, 3, H, d) tensor and
    k, v transposed views of (B, H, N, d) tensors, so no stride but the last is the default."""
    if layout == "contiguous":
        q = torch.randn(batch, n_q, heads, head_dim, device=device).to(dtype)
        k = torch.randn(batch, n_kv, heads, head_dim, device=device).to(dtype)
        v = torch.randn(batch, n_kv, heads, head_dim, device=device).to(dtype)
        return q, k, v
    q = torch.randn(batch, n_q, 3, heads, head_dim, device=device).to(dtype)[:, :, 1]
    k = torch.randn(batch, heads, n_kv, head_dim, device=device).to(dtype).transpose(1, 2)
    v = torch.randn(batch, heads, n_kv + 3, head_dim, device=device).to(dtype)[:, :, 2:n_kv + 2].transpose(1, 2)
    # The strides the kernels must honour (is_contiguous() would call some of these views
    # contiguous when heads or tokens are 1, where the stride of a size-1 dimension is moot).
    assert q.stride(1) == 3 * heads * head_dim and k.stride(1) == head_dim and v.stride(2) == (n_kv + 3) * head_dim
    return q, k, v


def default_attention_limits(dtype):
    """The suite's dtype tolerances: relative errors of out, of lse (fp32), of the gradients."""
    return {"out": RELATIVE_TOLERANCE[dtype], "lse": RELATIVE_TOLERANCE[torch.float32],
            "grad": RELATIVE_TOLERANCE[dtype] * BACKWARD_FACTOR[dtype]}


# The emulation runs the kernels' fp32 arithmetic on exactly the values the float64 reference gets, so
# its only errors are the kernels' own roundings: outputs rounded to the dtype, delta = dO . O taken from
# the rounded O, and on the tensor cores P and dS rounded to 16 bits before their products
# (FlashAttention's choice). Largest errors measured over 3-20 seeds at the shapes of the tests below
# (relative, norm-wise): out bf16 2.3e-3, fp16 2.8e-4, fp32 4.1e-7; lse 1.9e-7; gradients bf16 3.4e-3,
# fp16 4.6e-4, fp32 9.4e-7. The limits are 1.3-2x that, so a key-mask error (one padded key let into
# the softmax moves out by ~1e-2 and lse by ~3e-3) fails by a wide margin: lse by four orders of
# magnitude, out by 3x (bf16) to 10^4x (fp32).
EMULATED_LIMITS = {
    torch.bfloat16: {"out": 4e-3, "lse": 5e-7, "grad": 6e-3},
    torch.float16: {"out": 5e-4, "lse": 5e-7, "grad": 8e-4},
    torch.float32: {"out": 1e-6, "lse": 5e-7, "grad": 1.5e-6},
}


def assert_within(actual, expected, limit, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what} has NaN or Inf"
    err = relative_error(actual, expected)
    assert err <= limit, f"{what}: relative error {err:.3e} > {limit:.1e}"


def check_attention(kernels, q, k, v, scale, backward=True, limits=None):
    dtype = q.dtype
    limits = limits or default_attention_limits(dtype)
    out, lse = kernels.attention_forward(q, k, v, scale)
    ref_out, ref_lse = reference_attention(q, k, v, scale)
    assert out.dtype == dtype and out.is_contiguous()
    assert_within(out, ref_out, limits["out"], "out")
    assert_within(lse, ref_lse, limits["lse"], "lse")
    if not backward:
        return
    grad_out = torch.randn_like(out)
    dq, dk, dv = kernels.attention_backward(grad_out, q, k, v, out, lse, scale)
    leaves = [t.detach().to(torch.float64).requires_grad_() for t in (q, k, v)]
    reference_attention(*leaves, scale)[0].backward(grad_out.to(torch.float64))
    for name, got, leaf in zip(("dq", "dk", "dv"), (dq, dk, dv), leaves):
        assert got.shape == leaf.shape and got.dtype == dtype, name
        if k.shape[1] == 1 and name != "dv":
            # One key: the softmax is constant, so dq = dk = 0 exactly; the kernel's is rounding noise
            # of dp - delta, which must be tiny next to the gradient that does flow (dv).
            limit = RELATIVE_TOLERANCE[dtype] * BACKWARD_FACTOR[dtype] * leaves[2].grad.abs().max().item()
            assert got.abs().max().item() <= limit, name
            continue
        assert_within(got, leaf.grad, limits["grad"], name)


# ---------------------------------------------------------------- conv_proj checks

def conv_inputs(case, dtype, device, weight_dtype=torch.float32, bias=True, strided=False):
    batch, height, width, channels, has_cls, kernel = case[:6]
    tokens = has_cls + height * width
    if strided:  # channels contiguous, token stride 2C: a slice of a wider tensor
        x = torch.randn(batch, tokens, 2 * channels, device=device).to(dtype)[:, :, channels:]
    else:
        x = torch.randn(batch, tokens, channels, device=device).to(dtype)
    weights = [torch.randn(channels, 1, kernel, kernel, device=device).to(weight_dtype) / kernel for _ in range(3)]
    biases = [torch.randn(channels, device=device) if bias else None for _ in range(3)]
    return x, weights, biases


def check_conv_proj(kernels, case, dtype, weight_dtype=torch.float32, bias=True, strided=False):
    _, height, width, _, has_cls, _, stride_q, stride_kv, padding_q, padding_kv = case
    geometry = (height, width, has_cls, stride_q, stride_kv, padding_q, padding_kv)
    x, (wq, wk, wv), (bq, bk, bv) = conv_inputs(case, dtype, kernels.device, weight_dtype, bias, strided)
    outs = kernels.conv_proj_forward(x, wq, wk, wv, bq, bk, bv, *geometry)
    refs = reference_conv_proj(x, wq, wk, wv, bq, bk, bv, *geometry)
    for got, ref in zip(outs, refs):
        assert got.dtype == dtype and got.is_contiguous()
        assert_close(got, ref, dtype)

    grads = [torch.randn_like(o) for o in outs]
    grad_x, gwq, gwk, gwv = kernels.conv_proj_backward(*grads, x, wq, wk, wv, *geometry)
    leaves = [t.detach().to(torch.float64).requires_grad_() for t in (x, wq, wk, wv)]
    torch.autograd.backward(reference_conv_proj(*leaves, bq, bk, bv, *geometry), [g.to(torch.float64) for g in grads])
    assert grad_x.is_contiguous() and grad_x.dtype == dtype
    assert_close(grad_x, leaves[0].grad, dtype, factor=BACKWARD_FACTOR[dtype])
    for got, leaf in zip((gwq, gwk, gwv), leaves[1:]):
        assert got.dtype == weight_dtype and got.shape == leaf.shape
        # fp32 sums of products of exact `dtype` values, rounded to the weight's dtype.
        assert_close(got, leaf.grad, dtype if weight_dtype == torch.float32 else weight_dtype)


CONV_CASES = [
    # batch, height, width, channels, has_cls, kernel, stride_q, stride_kv, padding_q, padding_kv
    (2, 15, 13, 40, False, 3, 1, 2, 1, 1),
    (2, 15, 13, 40, True, 3, 1, 2, 1, 1),
    (3, 7, 7, 64, True, 3, 1, 2, 1, 1),
    (2, 9, 11, 33, True, 5, 2, 3, 2, 0),
    (1, 1, 1, 16, True, 3, 1, 2, 1, 1),
    (2, 56, 56, 64, False, 3, 1, 2, 1, 1),   # CvT-13 stage 1
    (2, 28, 28, 192, False, 3, 1, 2, 1, 1),  # CvT-13 stage 2
    (2, 14, 14, 384, True, 3, 1, 2, 1, 1),   # CvT-13 stage 3
]


# ---------------------------------------------------------------- CPU: the kernels, emulated

def check_emulated_attention(kernels, q, k, v, scale, backward=True, tensor_cores=None, limits=None):
    """check_attention with the emulation's limits; tensor_cores: which kernels must have run
    (default: the tensor-core ones exactly for 16-bit inputs)."""
    check_attention(kernels, q, k, v, scale, backward=backward, limits=limits or EMULATED_LIMITS[q.dtype])
    expected = q.dtype != torch.float32 if tensor_cores is None else tensor_cores
    assert kernels.ran_tensor_cores["forward"] == expected
    if backward:
        assert kernels.ran_tensor_cores["backward"] == expected


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_emulated_attention_matches_reference_with_partial_tiles(emulated, dtype, head_dim):
    # 133 queries: a full and a partial query block of the forward (128 rows; 64 at d = 128) and three
    # query tiles of the backward (64; 32 at d = 128), so its 2-stage pipeline wraps around; 70 keys: a full
    # and a 6-key K/V tile (forward) and key block (backward: dq summed from two blocks by reductions).
    q, k, v = random_qkv(1, 133, 70, 2, head_dim, dtype, "cpu", layout="strided")
    check_emulated_attention(emulated, q, k, v, 0.7 * head_dim ** -0.5)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,n_q,n_kv", [(8, 5, 1), (8, 1, 3), (2, 13, 64), (2, 20, 150)])
def test_emulated_attention_matches_reference_at_edge_sizes(emulated, dtype, batch, n_q, n_kv):
    # One key; one query; exactly one full tile (no masked tile, dq written directly); three K/V tiles,
    # so the forward's pipeline reuses its first buffer, and three key blocks in the backward.
    q, k, v = random_qkv(batch, n_q, n_kv, 1, 64, dtype, "cpu")
    limits = EMULATED_LIMITS[dtype]
    if n_q == 1:
        # One query row: its dq and the dk are sums over 3 keys that nearly cancel (sum_j ds_j = 0), so
        # their relative error is not bounded by the roundings (it reaches 1e-2 in bf16 for some seeds).
        limits = dict(limits, grad=default_attention_limits(dtype)["grad"])
    check_emulated_attention(emulated, q, k, v, 0.3, limits=limits)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [32, 128])
def test_emulated_simt_attention_matches_reference_for_16_bit(emulated, dtype, head_dim):
    # The fp32 CUDA-core kernels that CVT_FAST_CUDA_ATTENTION=simt selects for 16-bit inputs.
    q, k, v = random_qkv(1, 70, 37, 2, head_dim, dtype, "cpu", layout="strided")
    simt = EmulatedKernels(emulated.lib, tensor_cores=False)
    check_emulated_attention(simt, q, k, v, 0.7 * head_dim ** -0.5, tensor_cores=False)


@pytest.mark.slow
@pytest.mark.parametrize("misalign", ["base", "token_stride"])
def test_emulated_attention_takes_simt_kernels_for_rows_not_16_byte_aligned(emulated, misalign):
    # cp.async moves 16-byte chunks: q at an odd element offset, or k/v rows 68 elements apart, cannot be
    # read by the tensor-core kernels, and the launchers give such inputs to the CUDA-core ones.
    q, k, v = random_qkv(1, 37, 21, 2, 64, torch.bfloat16, "cpu")
    if misalign == "base":
        q = torch.randn(q.numel() + 1).to(torch.bfloat16)[1:].view(q.shape)
    else:
        k = torch.randn(1, 21, 2, 68).to(torch.bfloat16)[..., :64]
        v = torch.randn(1, 21, 2, 68).to(torch.bfloat16)[..., 4:]
    check_emulated_attention(emulated, q, k, v, 0.125, tensor_cores=False)


@pytest.mark.slow
def test_emulated_attention_takes_simt_kernels_for_a_negative_scale(emulated):
    # The tensor-core forward scales the row max of the raw scores, which is only right for scale >= 0.
    q, k, v = random_qkv(1, 37, 21, 1, 32, torch.float16, "cpu")
    check_emulated_attention(emulated, q, k, v, -0.2, tensor_cores=False)


@pytest.mark.slow
def test_emulated_attention_backward_is_deterministic_when_asked(emulated):
    # Nkv > 64: the tensor-core backward would sum dq by reductions from two key blocks; in deterministic
    # mode the CUDA-core pair runs instead, and two runs agree bit for bit.
    q, k, v = random_qkv(1, 37, 70, 1, 32, torch.bfloat16, "cpu")
    kernels = EmulatedKernels(emulated.lib, deterministic=True)
    out, lse = kernels.attention_forward(q, k, v, 0.2)
    grad_out = torch.randn_like(out)
    first = kernels.attention_backward(grad_out, q, k, v, out, lse, 0.2)
    assert not kernels.ran_tensor_cores["backward"]
    second = kernels.attention_backward(grad_out, q, k, v, out, lse, 0.2)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    # Up to 64 keys one block writes dq directly: the tensor-core backward stays, deterministic as it is.
    q, k, v = random_qkv(1, 37, 64, 1, 32, torch.bfloat16, "cpu")
    check_emulated_attention(kernels, q, k, v, 0.2)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_attention_with_large_scores_stays_finite(emulated, dtype):
    # Scores of a hundred and more: exp overflows unless the softmax subtracts the row max.
    q, k, v = random_qkv(1, 20, 37, 1, 32, torch.float32, "cpu")
    q, k, v = (t.to(dtype) for t in (q * 4, k * 4, v))
    # Scores this large carry absolute rounding errors ~1e-5 into exp: the suite's dtype tolerances.
    check_emulated_attention(emulated, q, k, v, 1.0, backward=False, limits=default_attention_limits(dtype))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_emulated_attention_backward_with_very_negative_scores_stays_finite(emulated, dtype):
    # Every score near -200, so lse is too: a padded key (score 0) would get p = exp(200) = inf, and inf
    # times its zero k row is NaN in dq, unless the backward masks keys past Nkv.
    direction = torch.randn(32)
    direction = 14 * direction / direction.norm()
    q = (direction + 0.3 * torch.randn(1, 20, 1, 32)).to(dtype)
    k = (-direction + 0.3 * torch.randn(1, 37, 1, 32)).to(dtype)
    v = torch.randn(1, 37, 1, 32).to(dtype)
    # The keys share one large component that cancels in dq = sum_j ds_j k_j (sum_j ds_j = 0), which
    # multiplies its relative error by about 10; what this test guards is finiteness.
    limits = dict(EMULATED_LIMITS[dtype], grad=10 * EMULATED_LIMITS[dtype]["grad"])
    check_emulated_attention(emulated, q, k, v, 1.0, limits=limits)


def misaligned_like(t):
    """A contiguous copy of t that starts one element past a 16-byte boundary, as a view such as
    buf[1:].view(...) does (contiguous, so .contiguous() leaves it where it is)."""
    storage = torch.empty(t.numel() + 8, dtype=t.dtype)
    offset = next(i for i in range(1, 9) if (storage.data_ptr() + i * t.element_size()) % 16)
    view = storage[offset:offset + t.numel()].view(t.shape)
    view.copy_(t)
    assert view.is_contiguous() and view.data_ptr() % 16
    return view


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("misaligned", ["grad_out", "out", "both"])
def test_emulated_attention_backward_takes_misaligned_grad_out_and_out(emulated, dtype, misaligned):
    # The tensor-core backward reads grad_out by 16-byte cp.async and grad_out and out by 16-byte loads.
    # A contiguous view at an odd element offset used to reach them (only q, k, v were checked): on a GPU
    # a sticky "misaligned address"; in the emulation an abort. The launcher now copies such a tensor to
    # an aligned buffer and keeps the tensor-core kernels.
    q, k, v = random_qkv(1, 37, 21, 2, 64, dtype, "cpu")
    out, lse = emulated.attention_forward(q, k, v, 0.125)
    grad_out = torch.randn_like(out)
    ref = [t.detach().to(torch.float64).requires_grad_() for t in (q, k, v)]
    reference_attention(*ref, 0.125)[0].backward(grad_out.to(torch.float64))
    if misaligned in ("grad_out", "both"):
        grad_out = misaligned_like(grad_out)
    if misaligned in ("out", "both"):
        out = misaligned_like(out)
    grads = emulated.attention_backward(grad_out, q, k, v, out, lse, 0.125)
    assert emulated.ran_tensor_cores["backward"]
    for name, got, leaf in zip(("dq", "dk", "dv"), grads, ref):
        assert_within(got, leaf.grad, EMULATED_LIMITS[dtype]["grad"], name)


def backward_plan(lib, q, k, v, grad_out, out, dq, dk, dv, tensor_cores=True, deterministic=False, scale=0.125):
    """(tensor cores, grad_out copied, out copied): the launcher's choice (plan_attention_backward)."""
    strides = (ctypes.c_int64 * 9)(*q.stride()[:3], *k.stride()[:3], *v.stride()[:3])
    bits = lib.emu_attention_backward_plan(DTYPE_CODE[q.dtype], q.shape[3], *map(_ptr, (grad_out, q, k, v, out, dq, dk,
                                                                                          dv)),
                                           q.shape[0], q.shape[1], k.shape[1], q.shape[2], strides,
                                           ctypes.c_float(scale), int(tensor_cores), int(deterministic))
    return bool(bits & 1), bool(bits & 2), bool(bits & 4)


@pytest.mark.parametrize("misaligned,expected", [
    (None, (True, False, False)),
    ("grad_out", (True, True, False)),
    ("out", (True, False, True)),
    ("q", (False, False, False)),
    ("v", (False, False, False)),
    ("dq", (False, False, False)),
    ("dk", (False, False, False)),
])
def test_attention_backward_plan_checks_every_16_byte_operand(emulated, misaligned, expected):
    # Every tensor the tensor-core backward moves 16 bytes at a time: inputs it reads by cp.async (q, k,
    # v) take the CUDA-core kernels when misaligned; grad_out and out are copied; the outputs are
    # allocated aligned by the launcher, and an unaligned one would also take the CUDA-core kernels.
    q, k, v = random_qkv(2, 37, 21, 2, 64, torch.bfloat16, "cpu")
    tensors = dict(q=q, k=k, v=v, grad_out=torch.randn(2, 37, 128).to(torch.bfloat16), dq=torch.empty_like(q),
                   dk=torch.empty_like(k), dv=torch.empty_like(v))
    tensors["out"] = torch.randn_like(tensors["grad_out"])
    if misaligned is not None:
        tensors[misaligned] = misaligned_like(tensors[misaligned])
    names = ("q", "k", "v", "grad_out", "out", "dq", "dk", "dv")
    assert backward_plan(emulated.lib, *(tensors[n] for n in names)) == expected
    # fp32, the simt switch, and deterministic mode with several key blocks never take the tensor cores.
    assert backward_plan(emulated.lib, *(tensors[n] for n in names), tensor_cores=False) == (False, False, False)
    k70, v70 = (torch.randn(2, 70, 2, 64).to(torch.bfloat16) for _ in range(2))
    many_keys = dict(tensors, k=k70, v=v70, dk=torch.empty_like(k70), dv=torch.empty_like(v70))
    assert backward_plan(emulated.lib, *(many_keys[n] for n in names), deterministic=True) == (False, False, False)


def launch_log(lib):
    """The grids (x, y, z) the emulation recorded since the last call, and how many exceeded CUDA's limits."""
    grids = (ctypes.c_uint * (3 * 64))()
    oversized = ctypes.c_int(0)
    n = lib.emu_launch_log(grids, 64, ctypes.byref(oversized))
    return [tuple(grids[3 * i:3 * i + 3]) for i in range(min(n, 64))], oversized.value


@pytest.mark.parametrize("geometry", [(2, 2, 1, 1), (1, 2, 1, 1)], ids=["generic", "fused"])
def test_conv_proj_grids_fit_cuda_limits_past_65535_images(emulated, geometry):
    # Evaluation at batch >= 65536: the generic kernels had the batch on gridDim.z (at most 65535), and
    # the launch failed. The launchers' plans run here without the kernels (dry launches), at 70000 images
    # of a 3 x 3 grid, and every recorded grid must be within CUDA's limits.
    batch, channels, height, width = 70_000, 8, 3, 3
    stride_q, stride_kv, padding_q, padding_kv = geometry
    lib = emulated.lib
    x = torch.zeros(batch, 1 + height * width, channels)
    w = torch.zeros(channels, 1, 3, 3)
    launch_log(lib)
    lib.emu_set_dry_launches(1)
    try:
        q, k, v = emulated.conv_proj_forward(x, w, w, w, None, None, None, height, width, True, stride_q, stride_kv,
                                             padding_q, padding_kv)
        emulated.conv_proj_backward(torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), x, w, w, w, height,
                                    width, True, stride_q, stride_kv, padding_q, padding_kv)
    finally:
        lib.emu_set_dry_launches(0)
    grids, oversized = launch_log(lib)
    assert grids, "no launch was recorded"
    assert oversized == 0, f"grids over CUDA's limits (x <= 2^31 - 1, y, z <= 65535): {grids}"


# The emulated conv_proj kernels are tested in tests/test_cuda_conv_proj_emulated.py (element-wise
# error bounds, the padding sweep, the fused kernels' item loop).


# ---------------------------------------------------------------- GPU: attention

# (133, 70): partial query block and tile, dq from two key blocks by reductions; (20, 150): the forward's
# cp.async pipeline wraps around its buffers, three key blocks.
ATTENTION_SIZES = [(197, 50), (37, 13), (37, 1), (64, 32), (1, 7), (133, 70), (20, 150)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("n_q,n_kv", ATTENTION_SIZES)
def test_attention_matches_reference_at_odd_sizes(cuda_kernels, dtype, head_dim, n_q, n_kv):
    q, k, v = random_qkv(2, n_q, n_kv, 3, head_dim, dtype, "cuda")
    check_attention(cuda_kernels, q, k, v, 0.7 * head_dim ** -0.5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_attention_matches_reference_on_strided_views(cuda_kernels, dtype, head_dim):
    q, k, v = random_qkv(2, 77, 21, 2, head_dim, dtype, "cuda", layout="strided")
    check_attention(cuda_kernels, q, k, v, head_dim ** -0.5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_q,n_kv,heads,dim", [(3136, 784, 1, 64), (784, 196, 3, 192), (197, 50, 6, 384)])
def test_attention_matches_reference_at_cvt13_stage_shapes(cuda_kernels, dtype, n_q, n_kv, heads, dim):
    q, k, v = random_qkv(2, n_q, n_kv, heads, 64, dtype, "cuda", layout="strided")
    check_attention(cuda_kernels, q, k, v, dim ** -0.5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("n_q,n_kv", [(197, 50), (37, 1)])
def test_simt_attention_matches_reference_for_16_bit(cuda_kernels, monkeypatch, dtype, head_dim, n_q, n_kv):
    # CVT_FAST_CUDA_ATTENTION=simt: the fp32 CUDA-core kernels instead of the tensor-core ones.
    monkeypatch.setenv("CVT_FAST_CUDA_ATTENTION", "simt")
    q, k, v = random_qkv(2, n_q, n_kv, 3, head_dim, dtype, "cuda", layout="strided")
    check_attention(cuda_kernels, q, k, v, head_dim ** -0.5)


@pytest.mark.gpu
@pytest.mark.parametrize("misalign", ["base", "token_stride"])
def test_attention_reads_rows_not_16_byte_aligned(cuda_kernels, misalign):
    # The tensor-core kernels read 16-byte chunks; such inputs take the CUDA-core kernels instead.
    q, k, v = random_qkv(2, 77, 21, 2, 64, torch.bfloat16, "cuda")
    if misalign == "base":
        q = torch.randn(q.numel() + 1, device="cuda").to(torch.bfloat16)[1:].view(q.shape)
    else:
        k = torch.randn(2, 21, 2, 68, device="cuda").to(torch.bfloat16)[..., :64]
    check_attention(cuda_kernels, q, k, v, 0.125)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_backward_is_reproducible_in_deterministic_mode(cuda_kernels, dtype):
    # Nkv > 64: the tensor-core backward sums dq by fp32 reductions in no fixed order; under
    # torch.use_deterministic_algorithms(True) the launcher takes the CUDA-core pair, bit for bit repeatable.
    q, k, v = random_qkv(2, 197, 150, 3, 64, dtype, "cuda", layout="strided")
    out, lse = cuda_kernels.attention_forward(q, k, v, 0.1)
    grad_out = torch.randn_like(out)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = cuda_kernels.attention_backward(grad_out, q, k, v, out, lse, 0.1)
        second = cuda_kernels.attention_backward(grad_out, q, k, v, out, lse, 0.1)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    check_attention(cuda_kernels, q, k, v, 0.1)


@pytest.mark.gpu
def test_attention_with_large_scores_stays_finite(cuda_kernels):
    # Scores of a hundred and more: exp overflows unless the online softmax subtracts the running max.
    q, k, v = random_qkv(1, 70, 45, 2, 64, torch.float32, "cuda")
    check_attention(cuda_kernels, q * 4, k * 4, v, 1.0, backward=False)
    q, k, v = (t.to(torch.bfloat16) for t in (q * 4, k * 4, v))
    check_attention(cuda_kernels, q, k, v, 1.0, backward=False)


# Each bad call runs in its own interpreter: the error path is host code, and a crash there (a
# segfault once seen on an H100, before these cases were split) must fail its own case with its
# signal, not take the test worker and the cases after it down.
BAD_CALL_PRELUDE = """
import sys, torch
from cvt_fast.extension import load_extension
assert load_extension() is not None
ops = torch.ops.cvt_fast
def qkv(head_dim, dtype=torch.float16, n_q=8, n_kv=4):
    return [torch.randn(1, n, 1, head_dim, device="cuda").to(dtype) for n in (n_q, n_kv, n_kv)]
x = torch.randn(2, 26, 8, device="cuda")
w = torch.randn(8, 1, 3, 3, device="cuda")
try:
    {call}
except Exception as error:
    print(type(error).__name__ + ": " + str(error).splitlines()[0])
    sys.exit(0)
print("no error raised")
sys.exit(3)
"""

BAD_ATTENTION_CALLS = {
    "head_dim_48": ("q, k, v = qkv(48); ops.attention_forward_cuda(q, k, v, 0.1)", "ValueError", "head_dim 48"),
    "mixed_dtypes": ("q, k, v = qkv(64); ops.attention_forward_cuda(q, k.float(), v, 0.1)", "TypeError", "dtype"),
    "strided_last_dim": ("q, k, v = qkv(64); ops.attention_forward_cuda("
                         "torch.randn(1, 8, 1, 128, device='cuda').half()[..., ::2], k, v, 0.1)",
                         "ValueError", "contiguous"),
    "float64": ("q, k, v = qkv(64, torch.float64); ops.attention_forward_cuda(q, k, v, 0.1)",
                "TypeError", "unsupported dtype"),
    "heads_mismatch": ("q, k, v = qkv(64); ops.attention_forward_cuda(q, k.expand(1, 4, 2, 64), "
                       "v.expand(1, 4, 2, 64), 0.1)", "ValueError", "must agree"),
    "k_on_cpu": ("q, k, v = qkv(64); ops.attention_forward_cuda(q, k.cpu(), v, 0.1)", "ValueError", "k is on"),
}

BAD_CONV_PROJ_CALLS = {
    "token_count": ("ops.conv_proj_forward_cuda(x, w, w, w, None, None, None, 5, 5, False, 1, 2, 1, 1)",
                    "ValueError", "tokens"),
    "channels": ("ops.conv_proj_forward_cuda(x, w[:4], w[:4], w[:4], None, None, None, 5, 5, True, 1, 2, 1, 1)",
                 "ValueError", "channels"),
    "strided_channels": ("ops.conv_proj_forward_cuda(x.transpose(0, 2).contiguous().transpose(0, 2), w, w, w, "
                         "None, None, None, 5, 5, True, 1, 2, 1, 1)", "ValueError", "contiguous"),
    "bias_size": ("ops.conv_proj_forward_cuda(x, w, w, w, torch.randn(3, device='cuda'), None, None, "
                  "5, 5, True, 1, 2, 1, 1)", "ValueError", "bq"),
}


def run_bad_call(call: str, error_type: str, message: str) -> None:
    script = BAD_CALL_PRELUDE.format(call=call)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (f"exit status {done.returncode} (negative: killed by that signal)\n"
                                  f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    first_line = done.stdout.strip().splitlines()[-1]
    assert first_line.startswith(error_type + ":") and message in first_line, first_line


@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(BAD_ATTENTION_CALLS))
def test_attention_rejects_bad_inputs_on_gpu(ops, case):
    run_bad_call(*BAD_ATTENTION_CALLS[case])


# ---------------------------------------------------------------- GPU: conv_proj

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_proj_forward_and_backward_match_reference(cuda_kernels, dtype, case):
    check_conv_proj(cuda_kernels, case, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_conv_proj_reads_strided_tokens_without_bias(cuda_kernels, dtype):
    check_conv_proj(cuda_kernels, (2, 15, 13, 40, True, 3, 1, 2, 1, 1), dtype, weight_dtype=dtype, bias=False,
                    strided=True)


@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(BAD_CONV_PROJ_CALLS))
def test_conv_proj_rejects_bad_inputs_on_gpu(ops, case):
    run_bad_call(*BAD_CONV_PROJ_CALLS[case])
