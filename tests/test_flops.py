"""Parameter and multiply-accumulate counts: the paper's numbers, and an independent hook count."""
import copy

import pytest
import torch
from torch import nn

from cvt_fast.flops import count_flops, count_params, flops_by_part
from cvt_fast.model import Attention, build_model, create_model
from cvt_fast.specs import get_spec
from tests.tiny_spec import tiny_spec

SMALL = tiny_spec(DEPTH=[1, 2, 2], DROP_PATH_RATE=[0.0, 0.0, 0.1])

VARIANTS = {
    "default": {},
    "avg": {"QKV_PROJ_METHOD": ["avg", "avg", "avg"]},
    "linear": {"QKV_PROJ_METHOD": ["linear", "linear", "linear"]},
    "mixed_methods": {"QKV_PROJ_METHOD": ["dw_bn", "avg", "linear"]},
    "no_cls": {"CLS_TOKEN": [False, False, False]},
    "cls_everywhere": {"CLS_TOKEN": [True, True, True]},
    "stride_kv_3_kernel_5": {"STRIDE_KV": [3, 3, 3], "KERNEL_QKV": [5, 5, 5], "PADDING_KV": [2, 2, 2],
                             "PADDING_Q": [2, 2, 2]},
    "no_qkv_bias_mlp_2": {"QKV_BIAS": [False, False, False], "MLP_RATIO": [2.0, 2.0, 3.0]},
}

# The paper's Table 3 (seed README): params in millions, GMACs ("GFLOPs") per image.
PAPER = [
    ("cvt-13", 224, 20.0, 4.5),
    ("cvt-13", 384, 20.0, 16.3),
    ("cvt-21", 224, 32.0, 7.1),
    ("cvt-21", 384, 32.0, 24.9),
    ("cvt-w24", 384, 277.0, 193.2),
]


@pytest.mark.parametrize("name, size, params_m, gmacs", PAPER)
def test_macs_match_the_paper_within_three_percent(name, size, params_m, gmacs):
    # Counted from the spec: nothing is built or run, so CvT-W24 costs nothing either.
    macs = count_flops(get_spec(name), size)
    assert abs(macs / 1e9 - gmacs) <= 0.03 * gmacs, f"{name} at {size}: {macs / 1e9:.2f} GMACs vs {gmacs}"


@pytest.mark.parametrize("name, params_m", [("cvt-13", 20.0), ("cvt-21", 32.0), ("cvt-w24", 277.0)])
def test_params_match_the_paper_within_one_percent(name, params_m, monkeypatch):
    # The paper rounds CvT-13 (19.997 M) and CvT-21 (31.62 M) to whole millions.
    # The values do not matter for a count: skip the (slow) random initialisation. The
    # model cannot be built on the meta device yet (its drop-path linspace calls .item()).
    monkeypatch.setattr(nn.init, "trunc_normal_", lambda tensor, *args, **kwargs: tensor)
    model = create_model(name)
    params = count_params(model)
    del model
    rounding = 0.5e6 if params_m < 100 else 0.0
    assert abs(params - params_m * 1e6) <= 0.01 * params_m * 1e6 + rounding, f"{name}: {params / 1e6:.2f} M"


def test_count_from_the_model_equals_count_from_its_spec():
    model = build_model(SMALL, num_classes=100)
    assert count_flops(model, 224) == count_flops(SMALL, (224, 224), num_classes=100)
    assert count_flops(model, (224, 224)) != count_flops(SMALL, 224)  # 1000 classes there


def test_parts_sum_to_the_total_and_attention_grows_fastest():
    spec = get_spec("cvt-13")
    parts_224 = flops_by_part(spec, 224)
    parts_384 = flops_by_part(spec, 384)
    assert sum(parts_224.values()) == count_flops(spec, 224)
    assert set(parts_224) == {f"stage{i}.{p}" for i in range(3) for p in ("patch_embed", "attn", "mlp", "norm")} | {
        "head"}
    # Attention is quadratic in the token count: it grows more than the (linear) MLP.
    assert parts_384["stage0.attn"] / parts_224["stage0.attn"] > parts_384["stage0.mlp"] / parts_224["stage0.mlp"]


def test_count_params_trainable_only():
    model = build_model(SMALL, 10)
    total = count_params(model)
    model.head.requires_grad_(False)
    assert count_params(model, trainable_only=True) == total - 48 * 10 - 10
    with pytest.raises(TypeError, match="nn.Module"):
        count_params(SMALL)


@pytest.mark.parametrize("size", [0, (224,), (224, 224, 3), "224", (224.0, 224.0)])
def test_bad_image_sizes_raise_value_error(size):
    with pytest.raises(ValueError, match="image_size"):
        count_flops(get_spec("cvt-13"), size)


def test_too_small_image_raises_value_error():
    with pytest.raises(ValueError, match="too small"):
        count_flops(get_spec("cvt-13"), 2)


def test_bad_model_argument_raises_type_error():
    with pytest.raises(TypeError, match="MODEL.SPEC"):
        count_flops(nn.Linear(2, 2), 224)
    with pytest.raises(TypeError, match="MODEL.SPEC"):
        count_flops([1, 2], 224)


# --------------------------------------------------- independent count by forward hooks


def macs_by_hooks(model: nn.Module, x: torch.Tensor) -> int:
    """Count one forward pass with hooks on the layers that actually run (per image).

    Conv2d and Linear: parameters per output position; LayerNorm: 2 per element;
    attention: q @ k^T and attn @ v from the token counts the projections really produced.
    """
    total = 0
    handles = []
    batch = x.shape[0]

    def weighted(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            positions = output.shape[-2] * output.shape[-1]
        else:
            positions = output[0].numel() // output.shape[-1]  # tokens of one image
        total += sum(p.numel() for p in module.parameters(recurse=False)) * positions

    def layer_norm(module, inputs, output):
        nonlocal total
        if module is model.norm and model.num_prefix_tokens:
            # The official code normalises the cls token alone; cvt_fast's final LayerNorm runs over
            # every token (forward_features returns them normalised, timm's convention), which the
            # official count does not include: count what the official code computes.
            total += 2 * inputs[0].shape[-1]
            return
        total += 2 * inputs[0].numel() // batch

    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            handles.append(module.register_forward_hook(weighted))
        elif isinstance(module, nn.LayerNorm):
            handles.append(module.register_forward_hook(layer_norm))
        elif isinstance(module, Attention):
            tokens: dict[str, int] = {}  # one dict per attention module

            def remember(name, tokens=tokens):
                def hook(module, inputs, output):
                    tokens[name] = output.shape[1]
                return hook

            def attention(module, inputs, output, tokens=tokens):
                nonlocal total
                total += 2 * tokens["q"] * tokens["k"] * module.dim

            handles.append(module.proj_q.register_forward_hook(remember("q")))
            handles.append(module.proj_k.register_forward_hook(remember("k")))
            handles.append(module.register_forward_hook(attention))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return total


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("size", [(64, 64), (75, 49)])
def test_analytic_count_equals_a_hook_count_of_a_real_forward(variant, size):
    spec = copy.deepcopy(SMALL)
    spec.update(VARIANTS[variant])
    model = build_model(spec, num_classes=7, backend="official").eval()
    x = torch.randn(1, 3, *size)
    assert count_flops(model, size) == macs_by_hooks(model, x)


def test_cvt13_analytic_count_equals_a_hook_count():
    model = create_model("cvt-13", backend="official").eval()
    size = (112, 96)  # small image, real widths and depths
    assert count_flops(model, size) == macs_by_hooks(model, torch.randn(1, 3, *size))
