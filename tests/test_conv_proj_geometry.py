"""conv_proj on the fused path (stride_q=1, stride_kv=2) at every padding pair, in float64.

The fused Triton kernels derive their loop ranges from both paddings at once: the forward
loads the x rows 2a+r for r in [min(-padding_q, -padding_kv), max(k - padding_q,
k - 1 - padding_kv)], so a range that is one row short is wrong only where one padding
exceeds the other by two or more (issue 16: `k - 2 - padding_kv` passed every earlier test,
because its only such geometry used stride_kv 3, another path). Here every (padding_q,
padding_kv) in [0, k)^2 for k = 3 and 5 is run, and each result is compared with a ground
truth computed independently: F.conv2d on the NCHW image, and autograd through it.

Both the Triton kernels (under the interpreter on the CPU) and the plain-PyTorch reference
are checked against that ground truth, since every other test trusts the reference.

The backward's q and k/v loops are separate, each ranging over its own padding only, so
beyond the full k = 3 sweep, k = 5 pairs each padding value of q with a different one of k/v
(every value of each is covered) to keep the interpreter time small.
"""
import pytest
import torch
import torch.nn.functional as F

from tolerances import assert_close

from cvt_fast.ops.reference import conv_proj_backward_reference, conv_proj_reference

conv_proj = pytest.importorskip("cvt_fast.kernels.conv_proj")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CHANNELS = 3  # not a power of two: the channel mask is partial
# Odd, non-square grids (partial tiles, odd q parities) just large enough that the k x k
# kernel without padding still leaves a k/v output.
GRID = {3: (5, 7), 5: (7, 9)}


def ground_truth(x, weights, biases, height, width, has_cls, padding_q, padding_kv, grads):
    """q, k, v and the gradients of x and the weights, from F.conv2d on the NCHW image."""
    x = x.detach().clone().requires_grad_(True)
    weights = [w.detach().clone().requires_grad_(True) for w in weights]
    n_cls = int(has_cls)
    image = x[:, n_cls:].transpose(1, 2).reshape(x.shape[0], CHANNELS, height, width)
    outputs = []
    for w, b, stride, padding in zip(weights, biases, (1, 2, 2), (padding_q, padding_kv, padding_kv)):
        tokens = F.conv2d(image, w, b, stride=stride, padding=padding, groups=CHANNELS).flatten(2).transpose(1, 2)
        outputs.append(torch.cat([x[:, :n_cls], tokens], dim=1))
    grad_inputs = torch.autograd.grad(outputs, [x, *weights], grads)
    return [o.detach() for o in outputs], grad_inputs


def check(actual, truth, what):
    """assert_close, naming which output failed."""
    assert actual.shape == truth.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(truth.shape)}"
    try:
        assert_close(actual, truth)
    except AssertionError as err:
        raise AssertionError(f"{what}: {err}") from None


def random_case(kernel, has_cls, with_bias=True):
    height, width = GRID[kernel]
    x = torch.randn(1, int(has_cls) + height * width, CHANNELS, dtype=torch.float64, device=DEVICE)
    weights = [torch.randn(CHANNELS, 1, kernel, kernel, dtype=torch.float64, device=DEVICE) for _ in range(3)]
    biases = [torch.randn(CHANNELS, dtype=torch.float64, device=DEVICE) if with_bias else None for _ in range(3)]
    return height, width, x, weights, biases


def output_grads(x, kernel, height, width, has_cls, padding_q, padding_kv):
    def tokens(stride, padding):
        ho = (height + 2 * padding - kernel) // stride + 1
        wo = (width + 2 * padding - kernel) // stride + 1
        return int(has_cls) + ho * wo
    return [torch.randn(1, tokens(s, p), CHANNELS, dtype=x.dtype, device=x.device)
            for s, p in ((1, padding_q), (2, padding_kv), (2, padding_kv))]


ALL_PAIRS = [(k, pq, pkv) for k in (3, 5) for pq in range(k) for pkv in range(k)]
BACKWARD_PAIRS = [(3, pq, pkv) for pq in range(3) for pkv in range(3)]
BACKWARD_PAIRS += [(5, pq, (pq + 3) % 5) for pq in range(5)] + [(5, 4, 4), (5, 0, 0)]


def _id(case):
    return "k{}_pq{}_pkv{}".format(*case)


@pytest.mark.parametrize("case", ALL_PAIRS, ids=_id)
def test_fused_forward_matches_conv2d_at_every_padding_pair(case):
    kernel, padding_q, padding_kv = case
    has_cls = (padding_q + padding_kv) % 2 == 0  # both layouts, spread over the sweep
    height, width, x, weights, biases = random_case(kernel, has_cls)
    geometry = (height, width, has_cls, 1, 2, padding_q, padding_kv)
    expected, _ = ground_truth(x, weights, biases, height, width, has_cls, padding_q, padding_kv,
                               output_grads(x, kernel, height, width, has_cls, padding_q, padding_kv))

    reference = conv_proj_reference(x, *weights, *biases, *geometry)
    triton_out = conv_proj.conv_proj_forward(x, *weights, *biases, *geometry)
    for name, ref, tri, truth in zip("qkv", reference, triton_out, expected):
        check(ref, truth, f"reference {name}")
        check(tri, truth, f"triton {name}")


@pytest.mark.parametrize("case", BACKWARD_PAIRS, ids=_id)
def test_fused_backward_matches_conv2d_autograd(case):
    kernel, padding_q, padding_kv = case
    has_cls = (padding_q + padding_kv) % 2 == 1
    height, width, x, weights, _ = random_case(kernel, has_cls, with_bias=False)
    geometry = (height, width, has_cls, 1, 2, padding_q, padding_kv)
    grads = output_grads(x, kernel, height, width, has_cls, padding_q, padding_kv)
    _, expected = ground_truth(x, weights, [None] * 3, height, width, has_cls, padding_q, padding_kv, grads)

    reference = conv_proj_backward_reference(*grads, x, *weights, *geometry)
    triton_grads = conv_proj.conv_proj_backward(*grads, x, *weights, *geometry)
    for name, ref, tri, truth in zip(("x", "weight_q", "weight_k", "weight_v"), reference, triton_grads, expected):
        check(ref, truth, f"reference grad {name}")
        check(tri, truth, f"triton grad {name}")
