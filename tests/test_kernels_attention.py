"""Triton attention kernels (kernels/attention.py) against a plain-PyTorch reference.

On the CPU the kernels run under Triton's interpreter (conftest.py sets TRITON_INTERPRET=1
before this module imports them), so the CPU shapes are tiny but odd: they leave partial
query and key tiles (the interpreter blocks are 32 x 16) and cover Nkv=1; CvT-13's stage-3
shape runs there for one image. All CvT-13 stage shapes at full batch run on a GPU.
"""
import pytest
import torch

from tolerances import assert_close

from cvt_fast.kernels import attention as attn
from cvt_fast.kernels.interpreter import float64_dot_problem

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
# float64 runs only under the interpreter (tl.dot has no fp64 path on the GPU), and there only
# with a recent enough Triton; where a test needs exact arithmetic it uses PRECISE, else float32.
NO_FLOAT64 = "float64 runs only under the interpreter" if GPU else float64_dot_problem()
PRECISE = torch.float32 if NO_FLOAT64 else torch.float64
fp64 = pytest.param(torch.float64, marks=pytest.mark.skipif(bool(NO_FLOAT64), reason=str(NO_FLOAT64)))
ALL_DTYPES = [torch.float32, fp64, torch.float16, torch.bfloat16]


def reference_attention(q, k, v, scale):
    """softmax(scale * q k^T) v per (batch, head), in float64.

    q: (B, Nq, H, d), k, v: (B, Nkv, H, d). Returns out (B, Nq, H*d) and lse (B, H, Nq).
    """
    q, k, v = (t.to(torch.float64).transpose(1, 2) for t in (q, k, v))  # (B, H, N, d)
    scores = scale * q @ k.transpose(-1, -2)
    out = torch.softmax(scores, dim=-1) @ v
    return out.transpose(1, 2).flatten(2), torch.logsumexp(scores, dim=-1)


def random_qkv(B, Nq, Nkv, H, d, dtype, device=DEVICE):
    q = torch.randn(B, Nq, H, d, device=device).to(dtype)
    k = torch.randn(B, Nkv, H, d, device=device).to(dtype)
    v = torch.randn(B, Nkv, H, d, device=device).to(dtype)
    return q, k, v


class TritonAttention(torch.autograd.Function):
    """Just enough autograd around the two entry points for gradcheck."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        out, lse = attn.attention_forward(q, k, v, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attn.attention_backward(grad_out, q, k, v, out, lse, ctx.scale)
        return dq, dk, dv, None


def lse_dtype_for(dtype):
    # lse is stored in float32 whatever the input dtype.
    return torch.float32 if dtype == torch.float64 else dtype


# (B, Nq, Nkv, H, d): partial tiles on both axes, several K/V tiles (online softmax across
# tiles), Nkv=1, Nq=1, and the one d=128 case.
SHAPES = [
    (2, 37, 13, 2, 32),
    (1, 70, 50, 2, 64),
    (2, 37, 1, 1, 32),
    (1, 1, 19, 2, 32),
    (1, 33, 17, 1, 128),
]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_Nq{}_Nkv{}_H{}_d{}".format(*s))
def test_forward_matches_reference_at_odd_shapes(shape, dtype):
    B, Nq, Nkv, H, d = shape
    q, k, v = random_qkv(B, Nq, Nkv, H, d, dtype)
    scale = (H * d) ** -0.5  # CvT's scale: the whole embedding width
    out, lse = attn.attention_forward(q, k, v, scale)
    ref_out, ref_lse = reference_attention(q, k, v, scale)
    assert out.dtype == dtype and out.is_contiguous() and out.shape == (B, Nq, H * d)
    assert lse.dtype == torch.float32 and lse.shape == (B, H, Nq)
    assert_close(out, ref_out, dtype=dtype)
    assert_close(lse, ref_lse, dtype=lse_dtype_for(dtype))


def test_forward_is_stable_with_large_scores():
    # Scores of several hundred would overflow a naive exp; the running max must absorb them.
    q, k, v = random_qkv(1, 37, 21, 1, 32, torch.float32)
    scale = 10.0
    out, lse = attn.attention_forward(q, k, v, scale)
    ref_out, ref_lse = reference_attention(q, k, v, scale)
    assert ref_lse.abs().max() > 100
    assert_close(out, ref_out, dtype=torch.float32)
    assert_close(lse, ref_lse, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_reads_strided_linear_outputs_in_place(dtype):
    B, Nq, Nkv, H, d = 2, 37, 13, 2, 32
    C = H * d
    # q: one third of a packed (B, N, 3, H, d) qkv Linear output; k, v: halves of a (B, N, 2C) one.
    q = torch.randn(B, Nq, 3, H, d, device=DEVICE).to(dtype)[:, :, 1]
    kv = torch.randn(B, Nkv, 2 * C, device=DEVICE).to(dtype)
    k = kv[..., :C].view(B, Nkv, H, d)
    v = kv[..., C:].view(B, Nkv, H, d)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    out, lse = attn.attention_forward(q, k, v, 0.17)
    ref_out, ref_lse = reference_attention(q, k, v, 0.17)
    assert_close(out, ref_out, dtype=dtype)
    assert_close(lse, ref_lse, dtype=lse_dtype_for(dtype))


def test_forward_reads_head_major_layout():
    # (B, H, N, d) tensors transposed to (B, N, H, d): head stride larger than token stride.
    q = torch.randn(1, 2, 37, 32, device=DEVICE).transpose(1, 2)
    k = torch.randn(1, 2, 13, 32, device=DEVICE).transpose(1, 2)
    v = torch.randn(1, 2, 13, 32, device=DEVICE).transpose(1, 2)
    out, lse = attn.attention_forward(q, k, v, 0.2)
    ref_out, ref_lse = reference_attention(q, k, v, 0.2)
    assert_close(out, ref_out, dtype=torch.float32)
    assert_close(lse, ref_lse, dtype=torch.float32)


def test_empty_batch_and_empty_query_give_empty_results():
    q, k, v = random_qkv(2, 0, 5, 1, 32, torch.float32)
    out, lse = attn.attention_forward(q, k, v, 0.1)
    assert out.shape == (2, 0, 32) and lse.shape == (2, 1, 0)
    dq, dk, dv = attn.attention_backward(out, q, k, v, out, lse, 0.1)
    assert dq.shape == q.shape and torch.equal(dk, torch.zeros_like(k)) and torch.equal(dv, torch.zeros_like(v))


def reference_gradients(q, k, v, grad_out, scale):
    leaves = [t.detach().to(torch.float64).requires_grad_() for t in (q, k, v)]
    out, _ = reference_attention(*leaves, scale)
    out.backward(grad_out.to(torch.float64))
    return [t.grad for t in leaves]


BACKWARD_SHAPES = [
    (2, 37, 13, 2, 32),
    (1, 45, 50, 1, 64),
    (1, 21, 2, 2, 32),
]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", BACKWARD_SHAPES, ids=lambda s: "B{}_Nq{}_Nkv{}_H{}_d{}".format(*s))
def test_backward_matches_autograd_of_reference(shape, dtype):
    B, Nq, Nkv, H, d = shape
    q, k, v = random_qkv(B, Nq, Nkv, H, d, dtype)
    scale = 0.3
    out, lse = attn.attention_forward(q, k, v, scale)
    grad_out = torch.randn(B, Nq, H * d, device=DEVICE).to(dtype)
    dq, dk, dv = attn.attention_backward(grad_out, q, k, v, out, lse, scale)
    ref_dq, ref_dk, ref_dv = reference_gradients(q, k, v, grad_out, scale)
    # On the GPU, P and dS are rounded to fp16/bf16 before the tensor-core products (the
    # interpreter keeps them in fp32), which costs a few units of the dtype's tolerance.
    factor = 3.0 if GPU and dtype in (torch.float16, torch.bfloat16) else 1.0
    for got, ref, t in ((dq, ref_dq, q), (dk, ref_dk, k), (dv, ref_dv, v)):
        assert got.shape == t.shape and got.dtype == dtype
        assert_close(got, ref, dtype=dtype, factor=factor)


@pytest.mark.skipif(GPU, reason="the GPU tests cover the real shapes at full batch")
def test_forward_and_backward_at_the_real_cvt13_stage3_shape_under_the_interpreter():
    # One image of CvT-13's last stage (197 queries, 50 keys, 6 heads of 64, the model's bf16):
    # many partial and full tiles at the real sizes, within seconds of interpreter time.
    q, k, v = random_qkv(1, 197, 50, 6, 64, torch.bfloat16)
    scale = 384 ** -0.5
    out, lse = attn.attention_forward(q, k, v, scale)
    ref_out, ref_lse = reference_attention(q, k, v, scale)
    assert_close(out, ref_out, dtype=torch.bfloat16)
    assert_close(lse, ref_lse, dtype=torch.bfloat16)
    grad_out = torch.randn_like(out)
    for got, ref in zip(attn.attention_backward(grad_out, q, k, v, out, lse, scale),
                        reference_gradients(q, k, v, grad_out, scale)):
        assert_close(got, ref, dtype=torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_with_a_single_key(dtype):
    # softmax over one key is constantly 1: dq and dk vanish (up to rounding), dv = sum of dO.
    q, k, v = random_qkv(2, 21, 1, 2, 32, dtype)
    out, lse = attn.attention_forward(q, k, v, 0.3)
    grad_out = torch.randn_like(out)
    dq, dk, dv = attn.attention_backward(grad_out, q, k, v, out, lse, 0.3)
    _, _, ref_dv = reference_gradients(q, k, v, grad_out, 0.3)
    assert_close(dv, ref_dv, dtype=dtype)
    # Rounding of out and of P * (dP - delta) only: bounded by the tolerance times |dO| |v| |q or k|.
    bound = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype] * grad_out.float().norm() * v.float().norm()
    assert dq.float().norm() <= bound * k.float().norm()
    assert dk.float().norm() <= bound * q.float().norm()


def test_backward_at_d128():
    q, k, v = random_qkv(1, 19, 17, 1, 128, torch.float32)
    out, lse = attn.attention_forward(q, k, v, 0.1)
    grad_out = torch.randn_like(out)
    grads = attn.attention_backward(grad_out, q, k, v, out, lse, 0.1)
    for got, ref in zip(grads, reference_gradients(q, k, v, grad_out, 0.1)):
        assert_close(got, ref, dtype=torch.float32)


def test_backward_reads_strided_inputs_and_gradients():
    B, Nq, Nkv, H, d = 1, 37, 13, 2, 32
    C = H * d
    q = torch.randn(B, Nq, 3, H, d, dtype=PRECISE, device=DEVICE)[:, :, 2]
    kv = torch.randn(B, Nkv, 2 * C, dtype=PRECISE, device=DEVICE)
    k = kv[..., :C].view(B, Nkv, H, d)
    v = kv[..., C:].view(B, Nkv, H, d)
    out, lse = attn.attention_forward(q, k, v, 0.25)
    # grad_out: a column slice of a wider tensor (row stride 2C); out: a strided copy.
    grad_out = torch.randn(B, Nq, 2 * C, dtype=PRECISE, device=DEVICE)[..., C:]
    out_strided = torch.empty(B, Nq, 2 * C, dtype=PRECISE, device=DEVICE)[..., :C].copy_(out)
    grads = attn.attention_backward(grad_out, q, k, v, out_strided, lse, 0.25)
    for got, ref in zip(grads, reference_gradients(q, k, v, grad_out, 0.25)):
        assert got.is_contiguous()
        assert_close(got, ref, dtype=PRECISE)


def test_backward_accepts_expanded_gradient():
    # out.sum().backward() hands the backward a gradient with all strides 0.
    q, k, v = (t.requires_grad_() for t in random_qkv(1, 20, 9, 1, 32, PRECISE))
    TritonAttention.apply(q, k, v, 0.2).sum().backward()
    refs = reference_gradients(q, k, v, torch.ones(1, 20, 32, dtype=PRECISE, device=DEVICE), 0.2)
    for t, ref in zip((q, k, v), refs):
        assert_close(t.grad, ref, dtype=PRECISE)


@pytest.mark.skipif(bool(NO_FLOAT64), reason=str(NO_FLOAT64))
def test_gradcheck_float64():
    # Tiny on purpose: every input element costs two interpreted forward passes.
    B, Nq, Nkv, H, d = 1, 5, 3, 1, 16
    q, k, v = (t.requires_grad_() for t in random_qkv(B, Nq, Nkv, H, d, torch.float64))
    assert torch.autograd.gradcheck(lambda q, k, v: TritonAttention.apply(q, k, v, 0.4), (q, k, v),
                                    eps=1e-6, atol=1e-8, rtol=1e-6)


# ----------------------------------------------------------------------------- one-pass vs split backward
# The default backward is one kernel (dK/dV per K/V tile, dQ added from every K/V tile); the
# split (dK/dV kernel + dQ kernel) is kept for bit-reproducible dQ. Both against the reference
# and each other: B=2, 3 heads, Nq=37 (not a multiple of any query tile), Nkv=45 (two K/V
# tiles of the interpreter's 32, the second masked: dQ is added atomically) and Nkv=13 (one
# masked K/V tile: dQ is stored directly).
@pytest.fixture(params=["one_pass", "split"])
def backward_mode(request, monkeypatch):
    if request.param == "split":
        monkeypatch.setenv(attn.DETERMINISTIC_ENV, "1")
    else:
        monkeypatch.delenv(attn.DETERMINISTIC_ENV, raising=False)
    return request.param


class KernelSpy:
    """Records the launches of one attention kernel (by its _KERNELS name), then runs them."""

    def __init__(self, monkeypatch, name):
        self.kernel, self.launches = attn._KERNELS[name], []
        monkeypatch.setitem(attn._KERNELS, name, self)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(dict(zip(self.kernel.arg_names, args), **kwargs))
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.skipif(GPU, reason="interpreter shapes; the GPU tests cover the real ones")
@pytest.mark.parametrize("dtype", [torch.float32, fp64], ids=str)
@pytest.mark.parametrize("Nkv", [45, 13])
def test_backward_modes_match_reference_with_several_heads_and_masked_tails(backward_mode, Nkv, dtype,
                                                                            monkeypatch):
    spies = {name: KernelSpy(monkeypatch, name) for name in ("fused", "dkdv", "dq")}
    B, Nq, H, d = 2, 37, 3, 32
    q, k, v = random_qkv(B, Nq, Nkv, H, d, dtype)
    scale = (H * d) ** -0.5
    out, lse = attn.attention_forward(q, k, v, scale)
    grad_out = torch.randn_like(out)
    grads = attn.attention_backward(grad_out, q, k, v, out, lse, scale)
    for what, got, ref, t in zip("qkv", grads, reference_gradients(q, k, v, grad_out, scale), (q, k, v)):
        assert got.shape == t.shape and got.dtype == dtype and got.is_contiguous()
        try:
            assert_close(got, ref, dtype=dtype)
        except AssertionError as err:
            raise AssertionError(f"grad {what}: {err}") from None
    launched = {name for name, spy in spies.items() if spy.launches}
    if backward_mode == "split":
        assert launched == {"dkdv", "dq"}
    else:
        (args,) = spies["fused"].launches
        assert launched == {"fused"}
        assert args["DQ_ATOMIC"] == (Nkv > args["BLOCK_N"])


@pytest.mark.skipif(GPU, reason="the flag is read on any device; checked once on the CPU")
def test_deterministic_algorithms_select_the_split_backward(monkeypatch):
    monkeypatch.delenv(attn.DETERMINISTIC_ENV, raising=False)
    spies = {name: KernelSpy(monkeypatch, name) for name in ("fused", "dkdv", "dq")}
    q, k, v = random_qkv(1, 9, 40, 1, 16, torch.float32)
    out, lse = attn.attention_forward(q, k, v, 0.25)
    grad_out = torch.randn_like(out)
    one_pass = attn.attention_backward(grad_out, q, k, v, out, lse, 0.25)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        split = attn.attention_backward(grad_out, q, k, v, out, lse, 0.25)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert [len(spies[n].launches) for n in ("fused", "dkdv", "dq")] == [1, 1, 1]
    for a, b in zip(one_pass, split):
        assert_close(a, b, dtype=torch.float32)


@pytest.mark.skipif(GPU, reason="interpreter shapes; the GPU tests cover the real ones")
@pytest.mark.parametrize("min_keys, path", [(0, "atomic"), (10**6, "split")])
def test_bf16_backward_adds_dq_in_an_fp32_buffer_from_enough_keys(min_keys, path, monkeypatch):
    # 16-bit inputs with several K/V tiles: one pass (dQ summed in fp32, then cast) from
    # ATOMIC_DQ_MIN_KEYS keys, the split below (where it moves fewer bytes).
    monkeypatch.delenv(attn.DETERMINISTIC_ENV, raising=False)
    monkeypatch.setattr(attn, "ATOMIC_DQ_MIN_KEYS", min_keys)
    spies = {name: KernelSpy(monkeypatch, name) for name in ("fused", "dkdv", "dq")}
    q, k, v = random_qkv(2, 37, 45, 3, 32, torch.bfloat16)
    scale = 96 ** -0.5
    out, lse = attn.attention_forward(q, k, v, scale)
    grad_out = torch.randn_like(out)
    grads = attn.attention_backward(grad_out, q, k, v, out, lse, scale)
    for what, got, ref in zip("qkv", grads, reference_gradients(q, k, v, grad_out, scale)):
        assert got.dtype == torch.bfloat16
        try:
            assert_close(got, ref, dtype=torch.bfloat16)
        except AssertionError as err:
            raise AssertionError(f"grad {what}: {err}") from None
    if path == "atomic":
        (args,) = spies["fused"].launches
        assert args["DQ_ATOMIC"] and args["DQ"].dtype == torch.float32
    else:
        assert not spies["fused"].launches and spies["dkdv"].launches and spies["dq"].launches


@pytest.mark.skipif(bool(NO_FLOAT64), reason=str(NO_FLOAT64))
def test_gradcheck_float64_of_dq_added_from_two_kv_tiles(monkeypatch):
    # Nkv=37 spans two of the interpreter's 32-key tiles, so dQ is summed by atomic adds; only
    # q requires grad, which keeps the interpreted passes few (dq is what the atomics make).
    monkeypatch.delenv(attn.DETERMINISTIC_ENV, raising=False)
    spy = KernelSpy(monkeypatch, "fused")
    q, k, v = random_qkv(1, 3, 37, 1, 16, torch.float64)
    q.requires_grad_()
    assert torch.autograd.gradcheck(lambda q: TritonAttention.apply(q, k, v, 0.4), (q,),
                                    eps=1e-6, atol=1e-8, rtol=1e-6)
    assert spy.launches and all(args["DQ_ATOMIC"] for args in spy.launches)


# ----------------------------------------------------------------------------- launch preconditions
# The inputs themselves (shapes, dtypes, devices, strides, scale) are checked by the registered
# op before any backend runs: tests/test_ops_registration.py. The launchers check only what the
# kernels need to launch.
def _good(dtype=torch.float32):
    return random_qkv(1, 5, 3, 2, 32, dtype)


@pytest.mark.parametrize("d", [48, 8, 256])
def test_forward_rejects_unsupported_head_dim(d):
    q, k, v = random_qkv(1, 5, 3, 1, d, torch.float32)
    with pytest.raises(ValueError, match=rf"d={d}.*supported: 16, 32, 64, 128"):
        attn.attention_forward(q, k, v, 0.1)


def test_cpu_tensors_without_interpreter_are_rejected(monkeypatch):
    monkeypatch.setattr(attn, "_INTERPRET", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        attn.attention_forward(*(t.cpu() for t in _good()), 0.1)


# ----------------------------------------------------------------------------- GPU only
CVT13_STAGES = [(3136, 784, 1), (784, 196, 3), (197, 50, 6)]  # (Nq, Nkv, heads), d = 64


@pytest.mark.gpu
@pytest.mark.parametrize("Nq, Nkv, H", CVT13_STAGES, ids=["stage1", "stage2", "stage3"])
def test_gpu_cvt13_stage_shapes_bf16(Nq, Nkv, H):
    B, d = 8, 64
    C = H * d
    scale = C ** -0.5
    # As the model has them: q from a (B, Nq, C) Linear, k/v from (B, Nkv, C) Linears.
    q = torch.randn(B, Nq, C, device="cuda", dtype=torch.bfloat16).view(B, Nq, H, d)
    kv = torch.randn(B, Nkv, 2 * C, device="cuda", dtype=torch.bfloat16)
    k, v = kv[..., :C].view(B, Nkv, H, d), kv[..., C:].view(B, Nkv, H, d)
    out, lse = attn.attention_forward(q, k, v, scale)
    ref_out, ref_lse = reference_attention(q, k, v, scale)
    assert_close(out, ref_out, dtype=torch.bfloat16)
    assert_close(lse, ref_lse, dtype=torch.bfloat16)
    grad_out = torch.randn_like(out)
    grads = attn.attention_backward(grad_out, q, k, v, out, lse, scale)
    # bf16 P and dS feed the tensor cores in the backward: allow twice the bf16 tolerance.
    for got, ref in zip(grads, reference_gradients(q, k, v, grad_out, scale)):
        assert_close(got, ref, dtype=torch.bfloat16, factor=2.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("d", [32, 64, 128])
def test_gpu_forward_backward_other_dtypes(dtype, d):
    B, Nq, Nkv, H = 2, 197, 50, 3
    q, k, v = random_qkv(B, Nq, Nkv, H, d, dtype, device="cuda")
    out, lse = attn.attention_forward(q, k, v, 0.125)
    ref_out, ref_lse = reference_attention(q, k, v, 0.125)
    assert_close(out, ref_out, dtype=dtype)
    assert_close(lse, ref_lse, dtype=lse_dtype_for(dtype))
    grad_out = torch.randn_like(out)
    grads = attn.attention_backward(grad_out, q, k, v, out, lse, 0.125)
    # fp16 P and dS are rounded before the tensor-core products.
    factor = 3.0 if dtype == torch.float16 else 1.0
    for got, ref in zip(grads, reference_gradients(q, k, v, grad_out, 0.125)):
        assert_close(got, ref, dtype=dtype, factor=factor)


@pytest.mark.gpu
def test_gpu_rejects_float64():
    q, k, v = random_qkv(1, 5, 3, 1, 32, torch.float64, device="cuda")
    with pytest.raises(TypeError, match="float64"):
        attn.attention_forward(q, k, v, 0.1)
