"""The attention backward reads `out` and `grad_out` each through its own strides.

Both are (B, Nq, H*d) with a contiguous last dim, but nothing ties their layouts together:
autograd may hand a gradient that is a column slice of a wider buffer while `out` is the
forward's contiguous result, or the other way round. Found by tools/mutation_check.py: the
delta pass reading grad_out with out's strides passed every test, because the strided test
gave both tensors the same strides.
"""
import pytest
import torch

from tolerances import assert_close

from cvt_fast.kernels import attention as attn
from cvt_fast.kernels.interpreter import float64_dot_problem
from cvt_fast.ops.reference import attention_backward_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float32 if torch.cuda.is_available() or float64_dot_problem() else torch.float64
B, NQ, NKV, H, D = 2, 37, 13, 2, 32
C = H * D


def _wide_slice(width, start):
    """A (B, NQ, C) view into a (B, NQ, width) buffer at columns [start, start + C)."""
    return torch.randn(B, NQ, width, dtype=DTYPE, device=DEVICE)[..., start:start + C]


@pytest.mark.parametrize("layout", ["grad_strided_out_contiguous", "out_strided_grad_contiguous", "both_strided_differently"])
def test_backward_reads_out_and_grad_out_through_their_own_strides(layout):
    q, k, v = (torch.randn(B, n, H, D, dtype=DTYPE, device=DEVICE) for n in (NQ, NKV, NKV))
    scale = C ** -0.5
    out, lse = attn.attention_forward(q, k, v, scale)
    grad_out = torch.randn(B, NQ, C, dtype=DTYPE, device=DEVICE)
    if layout in ("grad_strided_out_contiguous", "both_strided_differently"):
        grad_out = _wide_slice(3 * C, C).copy_(grad_out)
    if layout in ("out_strided_grad_contiguous", "both_strided_differently"):
        out = _wide_slice(2 * C, 0).copy_(out)
    assert out.stride() != grad_out.stride()

    grads = attn.attention_backward(grad_out, q, k, v, out, lse, scale)
    expected = attention_backward_reference(grad_out, q, k, v, out, lse, scale)
    for name, got, ref in zip("qkv", grads, expected):
        try:
            assert_close(got, ref)
        except AssertionError as err:
            raise AssertionError(f"grad {name}: {err}") from None
