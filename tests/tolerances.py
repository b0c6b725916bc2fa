"""Comparison tolerances by dtype, stated once for the whole suite (relative, on norms)."""
import torch

RELATIVE_TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 1e-2,
}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, computed in float64."""
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = None, factor: float = 1.0):
    """Assert the relative error is within the dtype's tolerance (times `factor`); NaN never passes."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), "result has NaN or Inf"
    dtype = dtype or actual.dtype
    limit = RELATIVE_TOLERANCE[dtype] * factor
    err = relative_error(actual, expected)
    assert err <= limit, f"relative error {err:.3e} > {limit:.1e} for {dtype}"
