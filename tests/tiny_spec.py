"""The tiny CvT that the model-level tests build: the paper's three-stage structure (patch
sizes, strides, a cls token in the last stage, dw_bn projections) at widths 16/32/48, so a
forward pass takes milliseconds on a CPU. Tests change what they need with tiny_spec(**changes)."""
import copy

TINY_SPEC = {
    "NUM_STAGES": 3, "PATCH_SIZE": [7, 3, 3], "PATCH_STRIDE": [4, 2, 2], "PATCH_PADDING": [2, 1, 1],
    "DIM_EMBED": [16, 32, 48], "NUM_HEADS": [1, 2, 3], "DEPTH": [1, 1, 2],
    "MLP_RATIO": [4.0, 4.0, 4.0], "ATTN_DROP_RATE": [0.0, 0.0, 0.0], "DROP_RATE": [0.0, 0.0, 0.0],
    "DROP_PATH_RATE": [0.0, 0.0, 0.0], "QKV_BIAS": [True, True, True],
    "CLS_TOKEN": [False, False, True], "POS_EMBED": [False, False, False],
    "QKV_PROJ_METHOD": ["dw_bn", "dw_bn", "dw_bn"], "KERNEL_QKV": [3, 3, 3],
    "PADDING_KV": [1, 1, 1], "STRIDE_KV": [2, 2, 2], "PADDING_Q": [1, 1, 1], "STRIDE_Q": [1, 1, 1],
}


def tiny_spec(**changes) -> dict:
    """A fresh copy of TINY_SPEC with `changes` applied (MODEL.SPEC keys)."""
    spec = copy.deepcopy(TINY_SPEC)
    spec.update(copy.deepcopy(changes))
    return spec
