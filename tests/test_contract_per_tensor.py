"""Issue 26: the op contract holds for each tensor, not only for some.

Every property (rank, head size, batch, dtype, device, last-dim stride) is broken in one tensor
at a time, with the others valid, at both doors a caller can use: the registered op
(`torch.ops.cvt_fast.*`, which a torch.compile trace or a saved program calls) and the public
entry point (`cvt_fast.ops.*`). Each must refuse with a ValueError or TypeError that names the
tensor, before any kernel runs (a kernel handed such a tensor reads out of bounds on a GPU, or
mixes dtypes silently on the CPU).
"""
from __future__ import annotations

import pytest
import torch

import cvt_fast.ops as ops

B, NQ, NKV, H, D = 2, 9, 4, 2, 8
SCALE = (H * D) ** -0.5


def _valid_qkv() -> dict[str, torch.Tensor]:
    return {"q": torch.randn(B, NQ, H, D), "k": torch.randn(B, NKV, H, D), "v": torch.randn(B, NKV, H, D)}


def _broken(t: torch.Tensor, defect: str) -> torch.Tensor:
    if defect == "rank":
        return t.flatten(2)                                    # (B, N, H*d): heads not split
    if defect == "extra_dim":
        return t.unsqueeze(-1)                                 # (B, N, H, d, 1): every size compared still fits
    if defect == "batch":
        return torch.cat([t, t[:1]])                           # one image more
    if defect == "heads":
        return torch.cat([t, t[:, :, :1]], dim=2)              # one head more
    if defect == "head_size":
        return torch.cat([t, t[..., :1]], dim=-1)              # d + 1
    if defect == "dtype":
        return t.double()                                      # a valid dtype, unlike the others'
    if defect == "integer_dtype":
        return t.to(torch.int32)
    if defect == "device":
        return t.to("meta")
    if defect == "stride":
        return t.transpose(1, 3).contiguous().transpose(1, 3)  # same shape, last dim strided
    raise AssertionError(defect)


DEFECTS = ("rank", "extra_dim", "batch", "heads", "head_size", "dtype", "integer_dtype", "device", "stride")


def _registered_attention(q, k, v):
    return torch.ops.cvt_fast.attention(q, k, v, SCALE, "reference")


def _public_attention(q, k, v):
    return ops.attention(q, k, v, SCALE)


@pytest.mark.parametrize("door", [_registered_attention, _public_attention], ids=["registered_op", "cvt_fast.ops"])
@pytest.mark.parametrize("defect", DEFECTS)
@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_attention_refuses_each_broken_tensor_by_name(name, defect, door):
    tensors = _valid_qkv()
    door(**tensors)  # the valid call runs
    tensors[name] = _broken(tensors[name], defect)
    with pytest.raises((ValueError, TypeError)) as error:
        door(**tensors)
    message = str(error.value)
    assert f"{name}:" in message or f"{name} " in message or f"({name}" in message, message


@pytest.mark.parametrize("name", ["k", "v"])
def test_attention_refuses_a_key_or_value_length_of_its_own(name):
    tensors = _valid_qkv()
    tensors[name] = torch.cat([tensors[name], tensors[name][:, :1]], dim=1)
    for door in (_registered_attention, _public_attention):
        with pytest.raises(ValueError, match="key and value lengths"):
            door(**tensors)


def _valid_backward_inputs() -> dict[str, torch.Tensor]:
    qkv = {name: t.requires_grad_(False) for name, t in _valid_qkv().items()}
    out, lse = torch.ops.cvt_fast.attention(qkv["q"], qkv["k"], qkv["v"], SCALE, "reference")
    return {"grad_out": torch.randn_like(out), **qkv, "out": out, "lse": lse}


@pytest.mark.parametrize("defect", ["shape", "dtype", "device"])
@pytest.mark.parametrize("name", ["grad_out", "out", "lse"])
def test_attention_backward_refuses_each_broken_saved_tensor(name, defect):
    inputs = _valid_backward_inputs()
    torch.ops.cvt_fast.attention_backward(*inputs.values(), SCALE, "reference")
    t = inputs[name]
    inputs[name] = {"shape": lambda: t[:, :-1], "dtype": lambda: t.double(), "device": lambda: t.to("meta")}[defect]()
    with pytest.raises((ValueError, TypeError), match=name):
        torch.ops.cvt_fast.attention_backward(*inputs.values(), SCALE, "reference")


# --------------------------------------------------------------------------- conv_proj

C, HEIGHT, WIDTH = 4, 5, 3


def _conv_inputs() -> dict:
    return {"x": torch.randn(B, 1 + HEIGHT * WIDTH, C),
            "weight_q": torch.randn(C, 1, 3, 3), "weight_k": torch.randn(C, 1, 3, 3), "weight_v": torch.randn(C, 1, 3, 3),
            "bias_q": torch.randn(C), "bias_k": torch.randn(C), "bias_v": torch.randn(C)}


def _registered_conv_proj(x, weight_q, weight_k, weight_v, bias_q, bias_k, bias_v):
    return torch.ops.cvt_fast.conv_proj(x, weight_q, weight_k, weight_v, bias_q, bias_k, bias_v, HEIGHT, WIDTH, True,
                                        1, 2, 1, 1, "reference")


def _public_conv_proj(x, weight_q, weight_k, weight_v, bias_q, bias_k, bias_v):
    return ops.conv_proj(x, weight_q, weight_k, weight_v, HEIGHT, WIDTH, True, bias_q=bias_q, bias_k=bias_k,
                         bias_v=bias_v)


def _broken_conv_tensor(t: torch.Tensor, defect: str) -> torch.Tensor:
    if defect == "channels":
        return torch.cat([t, t[:1]])
    if defect == "dtype":
        return t.double()
    if defect == "device":
        return t.to("meta")
    raise AssertionError(defect)


@pytest.mark.parametrize("door", [_registered_conv_proj, _public_conv_proj], ids=["registered_op", "cvt_fast.ops"])
@pytest.mark.parametrize("defect", ["channels", "dtype", "device"])
@pytest.mark.parametrize("name", ["weight_q", "weight_k", "weight_v", "bias_q", "bias_k", "bias_v"])
def test_conv_proj_refuses_each_broken_weight_or_bias_by_name(name, defect, door):
    inputs = _conv_inputs()
    door(**inputs)
    inputs[name] = _broken_conv_tensor(inputs[name], defect)
    if door is _public_conv_proj and defect == "dtype":
        # The entry point casts weights and biases to x's dtype on purpose (documented): the op
        # itself must refuse, which the registered door checks.
        door(**inputs)
        return
    with pytest.raises((ValueError, TypeError)) as error:
        door(**inputs)
    assert name in str(error.value) or "devices" in str(error.value), str(error.value)


@pytest.mark.parametrize("door", [_registered_conv_proj, _public_conv_proj], ids=["registered_op", "cvt_fast.ops"])
def test_conv_proj_refuses_x_with_a_strided_channel_dimension(door):
    inputs = _conv_inputs()
    inputs["x"] = inputs["x"].transpose(1, 2).contiguous().transpose(1, 2)
    with pytest.raises(ValueError, match="x must have a contiguous last dimension"):
        door(**inputs)
