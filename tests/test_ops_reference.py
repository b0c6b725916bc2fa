"""The plain-PyTorch references against independent float64 formulations.

Attention is checked against einsum + softmax, the depthwise projection against an
unfold-based convolution, average pooling against an explicit loop; backward passes
against autograd through those formulations.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from cvt_fast.ops import reference
from tolerances import assert_close

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


# --------------------------------------------------------------------------- independent formulations

def attention_f64(q, k, v, scale):
    """einsum -> softmax -> einsum in float64; returns (out (B,Nq,H*d), lse (B,H,Nq))."""
    q, k, v = (t.double() for t in (q, k, v))
    scores = scale * torch.einsum("bihd,bjhd->bhij", q, k)
    out = torch.einsum("bhij,bjhd->bihd", scores.softmax(dim=-1), v)
    row_max = scores.amax(dim=-1, keepdim=True)
    lse = (row_max + (scores - row_max).exp().sum(dim=-1, keepdim=True).log()).squeeze(-1)
    return out.flatten(2), lse


def depthwise_conv_unfold(grid, weight, bias, stride, padding):
    """Depthwise convolution of an NCHW grid through unfold: every output is the sum of its
    k x k patch times that channel's kernel."""
    batch, channels, height, width = grid.shape
    kernel = weight.shape[-1]
    patches = F.unfold(grid, kernel, padding=padding, stride=stride)      # (B, C*k*k, L)
    patches = patches.view(batch, channels, kernel * kernel, -1)
    out = (patches * weight.reshape(channels, kernel * kernel, 1)).sum(dim=2)  # (B, C, L)
    if bias is not None:
        out = out + bias.view(1, channels, 1)
    return out.transpose(1, 2)                                             # tokens (B, L, C)


def conv_proj_f64(x, weights, biases, height, width, has_cls, strides, paddings):
    x = x.double()
    cls, tokens = x[:, :int(has_cls)], x[:, int(has_cls):]
    grid = tokens.transpose(1, 2).reshape(x.shape[0], x.shape[2], height, width)
    return tuple(torch.cat([cls, depthwise_conv_unfold(grid, w.double(), None if b is None else b.double(), s, p)],
                           dim=1)
                 for w, b, s, p in zip(weights, biases, strides, paddings))


def avg_pool_ceil_loop(grid, kernel, stride, padding):
    """nn.AvgPool2d(kernel, stride, padding, ceil_mode=True, count_include_pad=True), written
    out: the divisor counts padding but not the part of a window past the padded edge."""
    batch, channels, height, width = grid.shape

    def out_size(n):
        size = math.ceil((n + 2 * padding - kernel) / stride) + 1
        # A last window that would start in the right padding only is dropped.
        return size - 1 if (size - 1) * stride >= n + padding else size

    out = grid.new_zeros(batch, channels, out_size(height), out_size(width))
    for i in range(out.shape[2]):
        for j in range(out.shape[3]):
            h0, w0 = i * stride - padding, j * stride - padding
            h1, w1 = min(h0 + kernel, height + padding), min(w0 + kernel, width + padding)
            divisor = (h1 - h0) * (w1 - w0)
            window = grid[:, :, max(h0, 0):min(h1, height), max(w0, 0):min(w1, width)]
            out[:, :, i, j] = window.sum(dim=(2, 3)) / divisor
    return out


def linear_outputs(batch, tokens, heads, head_dim, dtype):
    """q/k/v as the model makes them: a (B, N, H*d) Linear output viewed as (B, N, H, d)."""
    return torch.randn(batch, tokens, heads * head_dim, dtype=dtype).view(batch, tokens, heads, head_dim)


# --------------------------------------------------------------------------- attention

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 9, 4, 3, 8), (1, 17, 17, 1, 24), (2, 5, 11, 2, 32)],
                         ids=["nkv_shorter", "square", "nkv_longer"])
def test_attention_reference_matches_float64_einsum(dtype, shape):
    batch, n_q, n_kv, heads, head_dim = shape
    q = linear_outputs(batch, n_q, heads, head_dim, dtype)
    k = linear_outputs(batch, n_kv, heads, head_dim, dtype)
    v = linear_outputs(batch, n_kv, heads, head_dim, dtype)
    scale = (heads * head_dim) ** -0.5
    out, lse = reference.attention_reference(q, k, v, scale)
    expected_out, expected_lse = attention_f64(q, k, v, scale)
    assert out.dtype == dtype and out.is_contiguous() and out.shape == (batch, n_q, heads * head_dim)
    assert lse.dtype == torch.float32 and lse.shape == (batch, heads, n_q)
    assert_close(out, expected_out, dtype)
    assert_close(lse, expected_lse, torch.float32 if dtype == torch.float64 else dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_backward_reference_matches_autograd_of_float64_einsum(dtype):
    batch, n_q, n_kv, heads, head_dim = 2, 10, 3, 2, 16
    q, k, v = (linear_outputs(batch, n, heads, head_dim, dtype) for n in (n_q, n_kv, n_kv))
    grad_out = torch.randn(batch, n_q, heads * head_dim, dtype=dtype)
    scale = 0.37
    out, lse = reference.attention_reference(q, k, v, scale)
    dq, dk, dv = reference.attention_backward_reference(grad_out, q, k, v, out, lse, scale)

    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected_out, _ = attention_f64(*leaves, scale)
    expected = torch.autograd.grad(expected_out, leaves, grad_out.double())
    for actual, wanted, like in zip((dq, dk, dv), expected, (q, k, v)):
        assert actual.dtype == dtype and actual.shape == like.shape
        assert_close(actual, wanted, dtype, factor=2.0)


# --------------------------------------------------------------------------- conv projection

CONV_CASES = [
    # (has_cls, height, width, kernel, stride_q, stride_kv, padding_q, padding_kv)
    pytest.param(False, 5, 7, 3, 1, 2, 1, 1, id="cvt_default_odd_grid"),
    pytest.param(True, 6, 4, 3, 1, 2, 1, 1, id="cvt_default_cls"),
    pytest.param(True, 7, 5, 3, 2, 3, 0, 2, id="strided_q_unpadded"),
    pytest.param(False, 6, 6, 5, 1, 2, 2, 1, id="kernel5"),
    pytest.param(False, 3, 4, 1, 1, 2, 0, 0, id="kernel1"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("has_cls,height,width,kernel,stride_q,stride_kv,padding_q,padding_kv", CONV_CASES)
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_conv_proj_reference_matches_unfold(dtype, has_cls, height, width, kernel, stride_q, stride_kv, padding_q,
                                            padding_kv, with_bias):
    batch, channels = 2, 5
    x = torch.randn(batch, int(has_cls) + height * width, channels, dtype=dtype)
    weights = [torch.randn(channels, 1, kernel, kernel, dtype=dtype) for _ in range(3)]
    biases = [torch.randn(channels, dtype=dtype) if with_bias else None for _ in range(3)]
    strides, paddings = (stride_q, stride_kv, stride_kv), (padding_q, padding_kv, padding_kv)
    outputs = reference.conv_proj_reference(x, *weights, *biases, height, width, has_cls, stride_q, stride_kv,
                                            padding_q, padding_kv)
    expected = conv_proj_f64(x, weights, biases, height, width, has_cls, strides, paddings)
    for actual, wanted in zip(outputs, expected):
        assert actual.dtype == dtype and actual.is_contiguous()
        assert_close(actual, wanted, dtype)
        if has_cls:  # the cls row is passed through untouched, bias and all
            assert torch.equal(actual[:, 0], x[:, 0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("has_cls,height,width,kernel,stride_q,stride_kv,padding_q,padding_kv", CONV_CASES[:3])
def test_conv_proj_backward_reference_matches_autograd_of_unfold(dtype, has_cls, height, width, kernel, stride_q,
                                                                 stride_kv, padding_q, padding_kv):
    batch, channels = 2, 4
    x = torch.randn(batch, int(has_cls) + height * width, channels, dtype=dtype)
    weights = [torch.randn(channels, 1, kernel, kernel, dtype=dtype) for _ in range(3)]
    strides, paddings = (stride_q, stride_kv, stride_kv), (padding_q, padding_kv, padding_kv)
    geometry = (height, width, has_cls, stride_q, stride_kv, padding_q, padding_kv)
    outputs = reference.conv_proj_reference(x, *weights, None, None, None, *geometry)
    grads = [torch.randn_like(o) for o in outputs]
    actual = reference.conv_proj_backward_reference(*grads, x, *weights, *geometry)

    leaves = [t.double().requires_grad_() for t in (x, *weights)]
    expected_outputs = conv_proj_f64(leaves[0], leaves[1:], [None] * 3, height, width, has_cls, strides, paddings)
    expected = torch.autograd.grad(expected_outputs, leaves, [g.double() for g in grads])
    for got, wanted, like in zip(actual, expected, (x, *weights)):
        assert got.dtype == dtype and got.shape == like.shape
        assert_close(got, wanted, dtype, factor=2.0)


def test_output_size_matches_conv2d():
    for size, kernel, stride, padding in [(7, 3, 2, 1), (8, 3, 2, 1), (5, 5, 1, 2), (4, 1, 2, 0)]:
        conv = F.conv2d(torch.randn(1, 1, size, size), torch.randn(1, 1, kernel, kernel), stride=stride,
                        padding=padding)
        assert reference.output_size(size, kernel, stride, padding) == conv.shape[-1]


# --------------------------------------------------------------------------- avg and linear projections

@pytest.mark.parametrize("has_cls", [False, True])
@pytest.mark.parametrize("height,width,kernel,stride,padding", [(5, 7, 3, 2, 1), (6, 6, 3, 2, 1), (7, 4, 2, 3, 0)])
def test_avg_proj_reference_matches_ceil_mode_pooling_loop(has_cls, height, width, kernel, stride, padding):
    batch, channels = 2, 3
    x = torch.randn(batch, int(has_cls) + height * width, channels, dtype=torch.float64)
    q, k, v = reference.avg_proj_reference(x, height, width, has_cls, kernel, stride, padding)
    assert torch.equal(q, x)  # q is the token grid itself (the official 'linear' q projection)
    grid = x[:, int(has_cls):].transpose(1, 2).reshape(batch, channels, height, width)
    pooled = avg_pool_ceil_loop(grid, kernel, stride, padding)
    expected = torch.cat([x[:, :int(has_cls)], pooled.flatten(2).transpose(1, 2)], dim=1)
    assert_close(k, expected)
    assert torch.equal(v, k)


def test_linear_proj_reference_is_identity():
    x = torch.randn(2, 5, 4)
    assert all(t is x for t in reference.linear_proj_reference(x))
