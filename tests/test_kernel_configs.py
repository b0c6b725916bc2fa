"""The launch parameters the kernels choose on a GPU at real sizes, run on the CPU.

Under the interpreter the kernels would otherwise always take their CPU choices: conv_proj's
8 x 8 tiles and one image per backward program (`images_per_program` grows only with
batch * tiles / _BWD_TARGET_PROGRAMS, about 49 at CvT-13 stage 1 and batch 256), and
attention's single `_INTERPRETER_CONFIGS` entry per kernel. Issue 16 found the multi-image
loop of the backward checked nowhere (indexing the image as `pid_g + i` passed every test).
Here the module constants are monkeypatched so that every GPU tile, every autotune config
of `_GPU_CONFIGS` (and the fixed fp32 one) and a multi-image backward with a partial last
group run under the interpreter at small odd shapes, compared with the reference. A spy on
each launch checks that the patched parameter really reached the kernel, so a host-code
change that bypasses these constants fails here instead of silently testing the defaults.
(The interpreter ignores num_warps and num_stages; only the block shapes matter on the CPU.)
"""
import pytest
import torch

from tolerances import assert_close

from cvt_fast.ops.reference import (attention_backward_reference, attention_reference,
                                    conv_proj_backward_reference, conv_proj_reference)

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="forces GPU launch parameters through the CPU interpreter")

conv_proj = pytest.importorskip("cvt_fast.kernels.conv_proj")
from cvt_fast.kernels import attention as attn  # noqa: E402
from cvt_fast.kernels.interpreter import float64_dot_problem  # noqa: E402

# float64 makes any indexing error stand out; Triton's interpreter has fp64 tl.dot from 3.8.
ATTENTION_DTYPE = torch.float32 if float64_dot_problem() else torch.float64


def assert_named_grads_close(names, actual_grads, expected_grads):
    """assert_close per gradient, the failure naming which one."""
    for what, actual, expected in zip(names, actual_grads, expected_grads):
        try:
            assert_close(actual, expected)
        except AssertionError as err:
            raise AssertionError(f"grad {what}: {err}") from None


class LaunchSpy:
    """Stands in for a Triton kernel: records every launch's grid and named arguments, then runs it."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            named = dict(zip(self.kernel.arg_names, args), **kwargs)
            self.launches.append((grid, named))
            return self.kernel[grid](*args, **kwargs)
        return launch


# ------------------------------------------------------------------------------------------
# conv_proj: GPU tiles and several images per backward program
# ------------------------------------------------------------------------------------------

# (name, height, width, has_cls, stride_q, stride_kv, padding_q, padding_kv, backward kernel)
FUSED = ("fused", 7, 9, True, 1, 2, 1, 1, "_bwd_s1s2_kernel")
GENERIC = ("generic", 5, 7, False, 2, 1, 1, 0, "_bwd_generic_kernel")
# (case, GPU tiles?, batch, _BWD_TARGET_PROGRAMS): each gives 2 images per program and a last
# group of one image (images_per_program = batch * tiles * channel blocks // target).
MULTI_IMAGE_CASES = [
    pytest.param(FUSED, True, 3, 3, id="fused-gpu_tiles"),         # 2 tiles per image
    pytest.param(GENERIC, True, 3, 6, id="generic-gpu_tiles"),     # 4 tiles per image
    pytest.param(FUSED, False, 5, 2, id="fused-interpreter_tiles"),  # 1 tile per image
    pytest.param(GENERIC, False, 5, 2, id="generic-interpreter_tiles"),  # 1 tile per image
]


def _conv_inputs(batch, height, width, has_cls, channels=3):
    x = torch.randn(batch, int(has_cls) + height * width, channels, dtype=torch.float64)
    weights = [torch.randn(channels, 1, 3, 3, dtype=torch.float64) for _ in range(3)]
    biases = [torch.randn(channels, dtype=torch.float64) for _ in range(3)]
    return x, weights, biases


@pytest.mark.parametrize("case, gpu_tiles, batch, target", MULTI_IMAGE_CASES)
def test_conv_proj_backward_with_several_images_per_program_and_a_partial_last_group(
        case, gpu_tiles, batch, target, monkeypatch):
    name, height, width, has_cls, sq, skv, pq, pkv, kernel_name = case
    gpu_tile = conv_proj._TILE_S1S2 if name == "fused" else conv_proj._TILE_GENERIC
    if gpu_tiles:
        # conv_proj._tile picks _TILE_INTERPRET whenever the kernels are interpreted.
        monkeypatch.setattr(conv_proj, "_TILE_INTERPRET", gpu_tile)
    monkeypatch.setattr(conv_proj, "_BWD_TARGET_PROGRAMS", target)
    spy = LaunchSpy(getattr(conv_proj, kernel_name))
    monkeypatch.setattr(conv_proj, kernel_name, spy)

    geometry = (height, width, has_cls, sq, skv, pq, pkv)
    x, weights, biases = _conv_inputs(batch, height, width, has_cls)
    outputs = conv_proj.conv_proj_forward(x, *weights, *biases, *geometry)
    for actual, expected in zip(outputs, conv_proj_reference(x, *weights, *biases, *geometry)):
        assert_close(actual, expected)
    grads = [torch.randn_like(t) for t in outputs]
    actual_grads = conv_proj.conv_proj_backward(*grads, x, *weights, *geometry)

    (grid, args), = spy.launches
    per_program = args["images_per_program"]
    assert per_program >= 2 and batch % per_program != 0, (
        f"images_per_program={per_program} for batch {batch} (grid {grid}): the test no longer reaches "
        f"a multi-image backward with a partial last group; retune its _BWD_TARGET_PROGRAMS")
    if gpu_tiles:
        assert (args["TILE_H"], args["TILE_W"]) == gpu_tile
    expected_grads = conv_proj_backward_reference(*grads, x, *weights, *geometry)
    assert_named_grads_close(("x", "weight_q", "weight_k", "weight_v"), actual_grads, expected_grads)


# (kernel, padding_q, padding_kv, height, width): q is much larger than k/v (or the reverse),
# so the half-resolution grid the fused forward walks is set by q in one case and by k/v in
# the other. With the interpreter's 8 x 8 tiles one tile covers these grids whatever its
# size; with the GPU's 4 x 4 tiles a grid sized by k/v alone leaves q rows unwritten.
EXTREME_PADDINGS = [(3, 2, 0, 9, 11), (5, 4, 0, 7, 9), (5, 0, 4, 7, 9)]


@pytest.mark.parametrize("kernel, padding_q, padding_kv, height, width", EXTREME_PADDINGS,
                         ids=lambda v: str(v))
def test_conv_proj_fused_forward_with_gpu_tiles_at_unequal_paddings(kernel, padding_q, padding_kv, height,
                                                                   width, monkeypatch):
    monkeypatch.setattr(conv_proj, "_TILE_INTERPRET", conv_proj._TILE_S1S2)
    spy = LaunchSpy(conv_proj._fwd_s1s2_kernel)
    monkeypatch.setattr(conv_proj, "_fwd_s1s2_kernel", spy)
    geometry = (height, width, True, 1, 2, padding_q, padding_kv)
    x = torch.randn(1, 1 + height * width, 3, dtype=torch.float64)
    weights = [torch.randn(3, 1, kernel, kernel, dtype=torch.float64) for _ in range(3)]
    outputs = conv_proj.conv_proj_forward(x, *weights, None, None, None, *geometry)
    (_, args), = spy.launches
    assert (args["TILE_H"], args["TILE_W"]) == conv_proj._TILE_S1S2
    for name, actual, expected in zip("qkv", outputs, conv_proj_reference(x, *weights, None, None, None, *geometry)):
        try:
            assert_close(actual, expected)
        except AssertionError as err:
            raise AssertionError(f"{name}: {err}") from None


# ------------------------------------------------------------------------------------------
# attention: every GPU autotune config, and the fixed fp32 one
# ------------------------------------------------------------------------------------------

def _gpu_configs():
    params = []
    for kernel, by_head_dim in attn._GPU_CONFIGS.items():
        for head_dim, configs in by_head_dim.items():
            for i, cfg in enumerate(configs):
                blocks = "{BLOCK_M}x{BLOCK_N}".format(**cfg.kwargs)
                params.append(pytest.param(kernel, head_dim, cfg, id=f"{kernel}-d{head_dim}-{i}-{blocks}"))
    for kernel in attn._KERNELS:
        params.append(pytest.param(kernel, 64, attn._GPU_FP32_CONFIG, id=f"{kernel}-fp32_config"))
    for (kernel, head_dim), cfg in attn._GPU_FP32_CONFIG_BY_GROUP.items():
        params.append(pytest.param(kernel, head_dim, cfg, id=f"{kernel}-d{head_dim}-fp32_config"))
    return params


# Nq and Nkv leave partial tiles and at least two tiles for every block size in the lists
# (16..128), so the masks and the online softmax across tiles run with each config (and the
# one-pass backward adds dQ atomically from several K/V tiles).
NQ, NKV, HEADS = 133, 70, 2


def _select_backward(kernel, monkeypatch):
    # "dkdv" and "dq" run only in the split (deterministic) backward; "fused" is the default.
    if kernel in ("dkdv", "dq"):
        monkeypatch.setenv(attn.DETERMINISTIC_ENV, "1")
    else:
        monkeypatch.delenv(attn.DETERMINISTIC_ENV, raising=False)


@pytest.mark.parametrize("kernel, head_dim, config", _gpu_configs())
def test_attention_with_each_gpu_config_matches_reference(kernel, head_dim, config, monkeypatch):
    _select_backward(kernel, monkeypatch)
    monkeypatch.setitem(attn._INTERPRETER_CONFIGS, kernel, config)
    spy = LaunchSpy(attn._KERNELS[kernel])
    monkeypatch.setitem(attn._KERNELS, kernel, spy)

    dtype = ATTENTION_DTYPE
    q = torch.randn(1, NQ, HEADS, head_dim, dtype=dtype)
    k = torch.randn(1, NKV, HEADS, head_dim, dtype=dtype)
    v = torch.randn(1, NKV, HEADS, head_dim, dtype=dtype)
    scale = (HEADS * head_dim) ** -0.5  # CvT's scale: the whole width
    out, lse = attn.attention_forward(q, k, v, scale)
    expected_out, expected_lse = attention_reference(q, k, v, scale)
    assert_close(out, expected_out)
    assert_close(lse, expected_lse, torch.float32)  # lse is float32 by contract
    if kernel != "fwd":
        grad_out = torch.randn_like(out)
        grads = attn.attention_backward(grad_out, q, k, v, out, lse, scale)
        expected = attention_backward_reference(grad_out, q, k, v, out, lse, scale)
        assert_named_grads_close(("q", "k", "v"), grads, expected)

    assert spy.launches, f"the {kernel} kernel was not launched"
    for _, args in spy.launches:
        assert (args["BLOCK_M"], args["BLOCK_N"]) == (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"])
        if kernel == "fused":  # dQ added from several K/V tiles, or stored from the only one
            assert args["DQ_ATOMIC"] == (NKV > config.kwargs["BLOCK_N"])


def _fused_configs():
    return [pytest.param(head_dim, cfg, id=f"d{head_dim}-{i}-{cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']}")
            for head_dim, configs in attn._GPU_CONFIGS["fused"].items() for i, cfg in enumerate(configs)]


@pytest.mark.parametrize("head_dim, config", _fused_configs())
def test_fused_backward_stores_dq_when_one_kv_tile_covers_the_keys(head_dim, config, monkeypatch):
    """CvT-13 stage 3's Nkv=50 fits every fused config's K/V tile: dQ is stored, not added."""
    _select_backward("fused", monkeypatch)
    monkeypatch.setitem(attn._INTERPRETER_CONFIGS, "fused", config)
    spy = LaunchSpy(attn._KERNELS["fused"])
    monkeypatch.setitem(attn._KERNELS, "fused", spy)
    dtype = ATTENTION_DTYPE
    q, k, v = (torch.randn(2, n, HEADS, head_dim, dtype=dtype) for n in (37, 50, 50))
    scale = (HEADS * head_dim) ** -0.5
    out, lse = attn.attention_forward(q, k, v, scale)
    grad_out = torch.randn_like(out)
    grads = attn.attention_backward(grad_out, q, k, v, out, lse, scale)
    expected = attention_backward_reference(grad_out, q, k, v, out, lse, scale)
    assert_named_grads_close(("q", "k", "v"), grads, expected)
    (grid, args), = spy.launches
    # One program per (b, h) pair on the one-axis grid (tiles x B*H): a single K/V tile each.
    assert grid == (2 * HEADS,) and args["DQ_ATOMIC"] is False and args["DQ"] is grads[0]
