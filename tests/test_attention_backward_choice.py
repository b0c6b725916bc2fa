"""Issue 26: the Triton attention backward's choices made by counting, exactly at their thresholds.

Two thresholds pick the backward (kernels/attention.py's docstring has the count):
- one K/V tile covers Nkv (Nkv <= BLOCK_N): one kernel, dQ stored (no atomics);
  one key more and dQ is summed over tiles (atomically);
- 16-bit inputs over several tiles: the one-kernel backward from ATOMIC_DQ_MIN_KEYS keys,
  the split (dK/dV kernel + dQ kernel) below; float32 always one kernel.
Each side of each threshold is run, the kernels launched are recorded, and the gradients are
held to the reference: a threshold off by one either launches the other path or, for the
stored dQ, loses a tile's share.
"""
from __future__ import annotations

import pytest
import torch

from cvt_fast.kernels import attention as attn
from test_kernels_attention import GPU, KernelSpy, random_qkv, reference_gradients
from tolerances import assert_close

pytestmark = pytest.mark.skipif(GPU, reason="interpreter launch configs; the GPU tests cover the real ones")


def _run_backward(Nkv: int, dtype: torch.dtype, monkeypatch, Nq: int = 5, d: int = 16):
    with monkeypatch.context() as patch:  # the spies of one run only
        patch.delenv(attn.DETERMINISTIC_ENV, raising=False)
        spies = {name: KernelSpy(patch, name) for name in ("fused", "dkdv", "dq")}
        q, k, v = random_qkv(1, Nq, Nkv, 1, d, dtype)
        scale = d ** -0.5
        out, lse = attn.attention_forward(q, k, v, scale)
        grad_out = torch.randn_like(out)
        grads = attn.attention_backward(grad_out, q, k, v, out, lse, scale)
    for what, got, ref in zip("qkv", grads, reference_gradients(q, k, v, grad_out, scale)):
        try:
            assert_close(got, ref, dtype=dtype)
        except AssertionError as err:
            raise AssertionError(f"grad {what} at Nkv={Nkv} ({dtype}): {err}") from None
    return {name: spy.launches for name, spy in spies.items()}


def _one_kv_tile(monkeypatch) -> int:
    """The K/V tile of the one-kernel backward in force here, read off a launch."""
    launches = _run_backward(3, torch.float32, monkeypatch)
    (args,) = launches["fused"]
    return args["BLOCK_N"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dq_is_stored_up_to_one_full_kv_tile_and_summed_from_one_key_more(dtype, monkeypatch):
    tile = _one_kv_tile(monkeypatch)
    at_tile = _run_backward(tile, dtype, monkeypatch)
    (args,) = at_tile["fused"]
    assert not args["DQ_ATOMIC"] and not at_tile["dkdv"] and not at_tile["dq"]
    past_tile = _run_backward(tile + 1, dtype, monkeypatch)
    if dtype == torch.float32:
        (args,) = past_tile["fused"]
        assert args["DQ_ATOMIC"] and not past_tile["dq"]
    else:  # two tiles, far below ATOMIC_DQ_MIN_KEYS: the split
        assert not past_tile["fused"] and past_tile["dkdv"] and past_tile["dq"]


def test_sixteen_bit_inputs_take_the_one_kernel_backward_exactly_from_atomic_dq_min_keys(monkeypatch):
    threshold = attn.ATOMIC_DQ_MIN_KEYS
    below = _run_backward(threshold - 1, torch.bfloat16, monkeypatch, Nq=3)
    assert not below["fused"] and below["dkdv"] and below["dq"], "one key below the threshold: the split"
    at = _run_backward(threshold, torch.bfloat16, monkeypatch, Nq=3)
    (args,) = at["fused"]
    assert args["DQ_ATOMIC"] and args["DQ"].dtype == torch.float32 and not at["dq"]


def test_float32_takes_the_one_kernel_backward_at_any_number_of_tiles(monkeypatch):
    tile = _one_kv_tile(monkeypatch)
    launches = _run_backward(3 * tile + 1, torch.float32, monkeypatch)
    (args,) = launches["fused"]
    assert args["DQ_ATOMIC"] and args["DQ"].dtype == torch.float32 and not launches["dq"]
