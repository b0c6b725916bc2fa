"""CvT in timm's model registry, so timm users reach cvt_fast through timm's own API.

    import cvt_fast, timm
    model = timm.create_model("cvt_13", pretrained=False, checkpoint_path="CvT-13-224x224-IN-1k.pth")
    config = timm.data.resolve_data_config({}, model=model)      # 224, bicubic, crop 0.875, ImageNet mean/std
    transform = timm.data.create_transform(**config)

Importing cvt_fast registers these names once timm is imported (cvt_fast/timm_hook.py); this
module itself imports timm. The names and pretrained tags follow the official model zoo (seed
README): ImageNet-1k at 224 and 384, ImageNet-22k pre-trained and fine-tuned on 1k at 384.

    model name      pretrained tags                    input, test crop
    cvt_13          ms_in1k                            224, resize 256 + center crop (crop_pct 0.875)
    cvt_13_384      ms_in1k, ms_in22k_ft_in1k          384, resize to 384x384 (crop_pct 1, 'squash')
    cvt_21          ms_in1k                            224, as cvt_13
    cvt_21_384      ms_in1k, ms_in22k_ft_in1k          384, as cvt_13_384
    cvt_w24_384     ms_in22k_ft_in1k                   384, as cvt_13_384

The test crops are the official test transform's (TEST.CENTER_CROP true at 224, false at 384;
bicubic; ImageNet mean/std). `pretrained=True` fetches the Hugging Face hub's converted zoo weights
(microsoft/cvt-*); any local file works through `checkpoint_path=` or
`pretrained_cfg_overlay=dict(file=...)`. Official zoo files and Hugging Face files are both
accepted: `checkpoint_filter_fn` (timm's pretrained path) and a load_state_dict pre-hook on the
model (timm's checkpoint_path path, which calls model.load_state_dict directly) rename Hugging
Face keys with cvt_fast.hf_convert.

timm's keyword arguments map onto the official spec: drop_rate sets every stage's DROP_RATE (CvT
has no separate head dropout), drop_path_rate the last stage's DROP_PATH_RATE (the official
configs drop paths in the last stage only); global_pool is 'token' (the default: the official
classifier reads the cls token), 'avg' (mean of the grid tokens) or '' (no pooling). act and
backend pass through to cvt_fast's model. features_only=True (with out_indices) gives timm's
FeatureGetterNet over forward_intermediates: the three stages' NCHW maps.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import register_notrace_module
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from cvt_fast import hf_convert
from cvt_fast.checkpoint import _extract_state_dict
from cvt_fast.model import Blocks, ConvolutionalVisionTransformer, LayerNorm
from cvt_fast.specs import get_spec

__all__ = ["TimmCvT", "checkpoint_filter_fn"]


class TimmCvT(ConvolutionalVisionTransformer):
    """cvt_fast's CvT with timm's constructor arguments (the head, pooling, feature and checkpointing
    methods timm expects are the model's own: cvt_fast/model.py)."""

    def __init__(self, spec_name: str, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0,
                 drop_path_rate: Optional[float] = None, global_pool: Optional[str] = None,
                 act: str = "quick_gelu", backend: Optional[str] = None):
        spec = get_spec(spec_name)
        stages = int(spec["NUM_STAGES"])
        if drop_rate:
            spec["DROP_RATE"] = [float(drop_rate)] * stages
        if drop_path_rate is not None:
            spec["DROP_PATH_RATE"] = [0.0] * (stages - 1) + [float(drop_path_rate)]
        super().__init__(spec, num_classes=num_classes, act=act, backend=backend, in_chans=in_chans,
                         global_pool=global_pool)
        self.register_load_state_dict_pre_hook(_accept_hugging_face_keys)


# timm's fx feature extraction (create_feature_extractor, FeatureGraphNet, get_graph_node_names) traces
# the model symbolically. These stay leaves: a stage's blocks hand the grid's height and width to the
# fused ops as ints, and the LayerNorm chooses its path by the input's dtype, neither of which a
# symbolic trace has.
register_notrace_module(Blocks)
register_notrace_module(LayerNorm)


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    """timm's pretrained filter: official or Hugging Face CvT weights (bare or wrapped) -> official keys."""
    weights, _ = _extract_state_dict(state_dict, "<timm pretrained weights>")
    if hf_convert.is_hf_state_dict(weights):
        weights = hf_convert.hf_to_official(weights)
    return weights


def _accept_hugging_face_keys(module: nn.Module, state_dict: dict, prefix: str, *unused: Any) -> None:
    # load_state_dict pre-hook: rename Hugging Face keys in place, so model.load_state_dict (which
    # timm's checkpoint_path and validate.py --checkpoint call) takes Hugging Face files as they are.
    keys = [k for k in state_dict if k.startswith(prefix)]
    own = {k[len(prefix):]: state_dict[k] for k in keys}
    if not hf_convert.is_hf_state_dict(own):
        return
    converted = hf_convert.hf_to_official(own)
    for key in keys:
        del state_dict[key]
    state_dict.update({prefix + k: v for k, v in converted.items()})


def _cfg(hf_hub_id: str, image_size: int = 224) -> dict[str, Any]:
    at_224 = image_size == 224
    return {
        "hf_hub_id": hf_hub_id,
        "num_classes": 1000,
        "input_size": (3, image_size, image_size),
        "fixed_input_size": False,  # no position embedding: any input size runs
        "interpolation": "bicubic",
        # The official test transform: resize to size / 0.875 and center crop at 224; at 384 a plain
        # resize to 384x384 (TEST.CENTER_CROP false), which timm calls crop_mode 'squash'.
        "crop_pct": 0.875 if at_224 else 1.0,
        "crop_mode": "center" if at_224 else "squash",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        # The last stage's grid at the default input size (stride 16); forward_features' tokens are
        # the cls token and that grid, flattened.
        "pool_size": (image_size // 16, image_size // 16),
        "first_conv": "stage0.patch_embed.proj",
        "classifier": "head",
        "license": "mit",
        "paper_ids": "arXiv:2103.15808",
        "paper_name": "CvT: Introducing Convolutions to Vision Transformers",
        "origin_url": "https://github.com/microsoft/CvT",
    }


default_cfgs = generate_default_cfgs({
    "cvt_13.ms_in1k": _cfg("microsoft/cvt-13"),
    "cvt_13_384.ms_in1k": _cfg("microsoft/cvt-13-384", 384),
    "cvt_13_384.ms_in22k_ft_in1k": _cfg("microsoft/cvt-13-384-22k", 384),
    "cvt_21.ms_in1k": _cfg("microsoft/cvt-21"),
    "cvt_21_384.ms_in1k": _cfg("microsoft/cvt-21-384", 384),
    "cvt_21_384.ms_in22k_ft_in1k": _cfg("microsoft/cvt-21-384-22k", 384),
    "cvt_w24_384.ms_in22k_ft_in1k": _cfg("microsoft/cvt-w24-384-22k", 384),
})


def _create(name: str, spec_name: str, pretrained: bool, **kwargs: Any) -> TimmCvT:
    # features_only=True: timm wraps the model in its FeatureGetterNet, which prunes the stages after
    # the last of out_indices and returns forward_intermediates' NCHW stage maps (all three by default).
    return build_model_with_cfg(TimmCvT, name, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2)),
                                spec_name=spec_name, **kwargs)


@register_model
def cvt_13(pretrained: bool = False, **kwargs: Any) -> TimmCvT:
    """CvT-13 (20M parameters), ImageNet-1k at 224x224."""
    return _create("cvt_13", "cvt-13", pretrained, **kwargs)


@register_model
def cvt_13_384(pretrained: bool = False, **kwargs: Any) -> TimmCvT:
    """CvT-13 (20M parameters) at 384x384: ImageNet-1k, or ImageNet-22k fine-tuned on 1k."""
    return _create("cvt_13_384", "cvt-13", pretrained, **kwargs)


@register_model
def cvt_21(pretrained: bool = False, **kwargs: Any) -> TimmCvT:
    """CvT-21 (32M parameters), ImageNet-1k at 224x224."""
    return _create("cvt_21", "cvt-21", pretrained, **kwargs)


@register_model
def cvt_21_384(pretrained: bool = False, **kwargs: Any) -> TimmCvT:
    """CvT-21 (32M parameters) at 384x384: ImageNet-1k, or ImageNet-22k fine-tuned on 1k."""
    return _create("cvt_21_384", "cvt-21", pretrained, **kwargs)


@register_model
def cvt_w24_384(pretrained: bool = False, **kwargs: Any) -> TimmCvT:
    """CvT-W24 (277M parameters) at 384x384, ImageNet-22k fine-tuned on 1k."""
    return _create("cvt_w24_384", "cvt-w24", pretrained, **kwargs)
