"""The MODEL.SPEC of each CvT variant of the paper, with the official YAML's upper-case keys,
and the validation that turns any MODEL.SPEC mapping into one dict of scalars per stage."""
from __future__ import annotations

import copy
import difflib
from typing import Any, Mapping

PROJECTION_METHODS = ("dw_bn", "avg", "linear")

_REQUIRED_SPEC_KEYS = ("NUM_STAGES", "PATCH_SIZE", "PATCH_STRIDE", "PATCH_PADDING",
                       "DIM_EMBED", "NUM_HEADS", "DEPTH")
# Per-stage keys that may be omitted, with the official code's meaning of "absent".
_OPTIONAL_STAGE_KEYS = {
    "MLP_RATIO": 4.0, "ATTN_DROP_RATE": 0.0, "DROP_RATE": 0.0, "DROP_PATH_RATE": 0.0,
    "QKV_BIAS": True, "CLS_TOKEN": False, "POS_EMBED": False, "QKV_PROJ_METHOD": "dw_bn",
    "KERNEL_QKV": 3, "PADDING_KV": 1, "STRIDE_KV": 2, "PADDING_Q": 1, "STRIDE_Q": 1,
}
_KNOWN_SPEC_KEYS = set(_REQUIRED_SPEC_KEYS) | set(_OPTIONAL_STAGE_KEYS) | {"INIT"}

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


def normalize_spec(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Validate a MODEL.SPEC mapping and return one dict of scalars per stage."""
    if not isinstance(spec, Mapping):
        raise TypeError(f"spec must be a mapping of MODEL.SPEC keys, got {type(spec).__name__}")
    unknown = sorted(set(spec) - _KNOWN_SPEC_KEYS)
    if unknown:
        hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, _KNOWN_SPEC_KEYS, n=1))
                 else k for k in unknown]
        raise ValueError(f"unknown MODEL.SPEC key(s): {', '.join(hints)}")
    missing = [k for k in _REQUIRED_SPEC_KEYS if k not in spec]
    if missing:
        raise ValueError(f"MODEL.SPEC is missing required key(s): {', '.join(missing)}")
    num_stages = int(spec["NUM_STAGES"])
    if num_stages < 1:
        raise ValueError(f"MODEL.SPEC.NUM_STAGES must be >= 1, got {num_stages}")
    stages: list[dict[str, Any]] = [{} for _ in range(num_stages)]
    for key in list(_REQUIRED_SPEC_KEYS[1:]) + list(_OPTIONAL_STAGE_KEYS):
        values = spec.get(key, [_OPTIONAL_STAGE_KEYS.get(key)] * num_stages)
        if isinstance(values, (str, int, float, bool)):
            raise ValueError(f"MODEL.SPEC.{key} must be a list with one entry per stage "
                             f"({num_stages}), got {values!r}")
        values = list(values)
        if len(values) != num_stages:
            raise ValueError(f"MODEL.SPEC.{key} has {len(values)} entries, expected "
                             f"NUM_STAGES = {num_stages}: {values}")
        for stage, value in zip(stages, values):
            stage[key] = value
    for i, stage in enumerate(stages):
        if stage["DIM_EMBED"] % stage["NUM_HEADS"]:
            raise ValueError(f"stage {i}: DIM_EMBED {stage['DIM_EMBED']} is not divisible by "
                             f"NUM_HEADS {stage['NUM_HEADS']}")
        if stage["QKV_PROJ_METHOD"] not in PROJECTION_METHODS:
            raise ValueError(f"stage {i}: QKV_PROJ_METHOD must be one of {PROJECTION_METHODS}, "
                             f"got {stage['QKV_PROJ_METHOD']!r}")
        if stage["POS_EMBED"]:
            raise ValueError(f"stage {i}: POS_EMBED=True is not supported: the official CvT has no "
                             "position embedding (its code never reads this key); set it to False")
        if stage["DEPTH"] < 0 or stage["NUM_HEADS"] < 1:
            raise ValueError(f"stage {i}: DEPTH must be >= 0 and NUM_HEADS >= 1, got "
                             f"{stage['DEPTH']} and {stage['NUM_HEADS']}")
    return stages
