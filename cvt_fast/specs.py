"""The MODEL.SPEC of each CvT variant of the paper, with the official YAML's upper-case keys."""
from __future__ import annotations

import copy
from typing import Any

_COMMON: dict[str, Any] = {
    "INIT": "trunc_norm",
    "NUM_STAGES": 3,
    "PATCH_SIZE": [7, 3, 3],
    "PATCH_STRIDE": [4, 2, 2],
    "PATCH_PADDING": [2, 1, 1],
    "MLP_RATIO": [4.0, 4.0, 4.0],
    "ATTN_DROP_RATE": [0.0, 0.0, 0.0],
    "DROP_RATE": [0.0, 0.0, 0.0],
    "QKV_BIAS": [True, True, True],
    "CLS_TOKEN": [False, False, True],
    "POS_EMBED": [False, False, False],
    "QKV_PROJ_METHOD": ["dw_bn", "dw_bn", "dw_bn"],
    "KERNEL_QKV": [3, 3, 3],
    "PADDING_KV": [1, 1, 1],
    "STRIDE_KV": [2, 2, 2],
    "PADDING_Q": [1, 1, 1],
    "STRIDE_Q": [1, 1, 1],
}

MODEL_SPECS: dict[str, dict[str, Any]] = {
    "cvt-13": {**_COMMON, "DIM_EMBED": [64, 192, 384], "NUM_HEADS": [1, 3, 6],
               "DEPTH": [1, 2, 10], "DROP_PATH_RATE": [0.0, 0.0, 0.1]},
    "cvt-21": {**_COMMON, "DIM_EMBED": [64, 192, 384], "NUM_HEADS": [1, 3, 6],
               "DEPTH": [1, 4, 16], "DROP_PATH_RATE": [0.0, 0.0, 0.1]},
    "cvt-w24": {**_COMMON, "DIM_EMBED": [192, 768, 1024], "NUM_HEADS": [3, 12, 16],
                "DEPTH": [2, 2, 20], "DROP_PATH_RATE": [0.0, 0.0, 0.3]},
}


def get_spec(name: str) -> dict[str, Any]:
    """A fresh copy of the named variant's spec ('cvt-13', 'cvt-21' or 'cvt-w24')."""
    key = name.lower().replace("_", "-")
    if key not in MODEL_SPECS:
        raise ValueError(f"unknown CvT variant {name!r}; expected one of {sorted(MODEL_SPECS)}")
    return copy.deepcopy(MODEL_SPECS[key])
