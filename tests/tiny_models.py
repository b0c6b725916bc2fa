"""Small CvTs with trained-looking BatchNorm statistics, shared by the deployment tests
(BatchNorm folding, the inference path, export, timm)."""
import torch
from torch import nn

from cvt_fast.model import ConvolutionalVisionTransformer, build_model

# Three stages like CvT-13 (cls token in the last), a few channels each.
TINY_SPEC = {
    "NUM_STAGES": 3, "PATCH_SIZE": [7, 3, 3], "PATCH_STRIDE": [4, 2, 2], "PATCH_PADDING": [2, 1, 1],
    "DIM_EMBED": [16, 32, 48], "NUM_HEADS": [1, 2, 3], "DEPTH": [1, 1, 2],
    "MLP_RATIO": [2.0, 2.0, 2.0], "ATTN_DROP_RATE": [0.0, 0.0, 0.0], "DROP_RATE": [0.0, 0.0, 0.0],
    "DROP_PATH_RATE": [0.0, 0.0, 0.0], "QKV_BIAS": [True, True, True],
    "CLS_TOKEN": [False, False, True], "POS_EMBED": [False, False, False],
    "QKV_PROJ_METHOD": ["dw_bn", "dw_bn", "dw_bn"], "KERNEL_QKV": [3, 3, 3],
    "PADDING_KV": [1, 1, 1], "STRIDE_KV": [2, 2, 2], "PADDING_Q": [1, 1, 1], "STRIDE_Q": [1, 1, 1],
}


def randomize_batch_norms(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters, so a fold that ignores
    one of them changes the logits."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5, generator=generator)
                m.running_var.uniform_(0.5, 2.0, generator=generator)
                m.weight.uniform_(0.5, 1.5, generator=generator)
                m.bias.uniform_(-0.2, 0.2, generator=generator)
    return model


def tiny_cvt(num_classes: int = 5, backend: str | None = "reference", seed: int = 0) -> ConvolutionalVisionTransformer:
    """A tiny CvT in eval mode with random weights and BatchNorm statistics (seeded)."""
    torch.manual_seed(seed)
    model = build_model(TINY_SPEC, num_classes=num_classes, backend=backend)
    return randomize_batch_norms(model).eval()


def stage_outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list]:
    """model(x), and what each stage's blocks left in it: (grid (B, C, H, W), cls token or None) per
    stage (the last stage's tokens go to the final LayerNorm unsplit)."""
    outputs = []

    def hook_for(stage):
        def hook(module, inputs, tokens):
            _, height, width = inputs
            cls_token, grid = (tokens[:, :1], tokens[:, 1:]) if stage.cls_token is not None else (None, tokens)
            outputs.append((grid.transpose(1, 2).reshape(grid.shape[0], grid.shape[2], height, width), cls_token))
        return hook

    hooks = [stage.blocks.register_forward_hook(hook_for(stage)) for stage in model.stages]
    try:
        logits = model(x)
    finally:
        for h in hooks:
            h.remove()
    return logits, outputs
