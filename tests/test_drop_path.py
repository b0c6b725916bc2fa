"""Stochastic depth (cvt_fast.model.DropPath): whole samples dropped, survivors rescaled.

Training drops a residual branch per sample with probability `rate` and divides the kept ones
by 1 - rate, so the expected output equals the eval-mode output (identity); without the
rescale the trained blocks see branches 1 / (1 - rate) times weaker than at evaluation.
"""
import pytest
import torch

from cvt_fast.model import DropPath


@pytest.mark.parametrize("rate", [0.1, 0.3])
def test_drop_path_zeroes_or_rescales_whole_samples(rate):
    x = torch.randn(4000, 7, 5) + 3.0
    out = DropPath(rate).train()(x)
    flat_in, flat_out = x.flatten(1), out.flatten(1)
    dropped = (flat_out == 0).all(dim=1)
    kept = ~dropped
    torch.testing.assert_close(flat_out[kept], flat_in[kept] / (1.0 - rate), rtol=1e-6, atol=0)
    # About `rate` of the samples dropped (4000 draws: 5 standard deviations is under 0.03).
    assert abs(dropped.float().mean().item() - rate) < 0.03
    # Unbiased: the mean over samples is the input's mean.
    assert abs(out.mean().item() - x.mean().item()) < 0.1


def test_drop_path_is_the_identity_in_eval_and_at_rate_zero():
    x = torch.randn(8, 5, 3)
    assert torch.equal(DropPath(0.3).eval()(x), x)
    assert torch.equal(DropPath(0.0).train()(x), x)
