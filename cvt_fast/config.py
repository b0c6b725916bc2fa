"""Configuration: the official CvT yacs schema, plus the keys cvt_fast adds.

A YAML file written for the official code (microsoft/CvT, lib/config/default.py) loads
unchanged. Unlike the official loader, an unknown or misspelt key is an error that names
the key and the closest valid one, instead of being accepted or silently ignored.
Overrides come from the command line as `KEY VALUE` pairs, e.g. `TRAIN.LR 0.001`.
"""
from __future__ import annotations

import difflib
import os
from typing import Iterable, Sequence

import yaml
from yacs.config import CfgNode as CN


from cvt_fast.specs import MODEL_SPECS

# Sections whose keys are not fixed by the schema (the official code passes them on as
# keyword arguments); check_values says which keys this trainer reads there.
_OPEN_SECTIONS = ("TRAIN.LR_SCHEDULER.ARGS", "TRAIN.OPTIMIZER_ARGS")
# The TRAIN.LR_SCHEDULER.ARGS keys of METHOD 'timm' that the trainer reads (the official
# configs set all but 'epochs', which the official code sets from TRAIN.END_EPOCH).
SCHEDULER_ARGS = ("sched", "epochs", "warmup_epochs", "warmup_lr", "min_lr", "cooldown_epochs", "decay_rate")
AMP_DTYPES = ("bfloat16", "bf16", "float16", "fp16")
# DATA.LOADER: 'torch' (the official recipe on the CPU, torch DataLoader workers) or 'dali'
# (NVIDIA DALI: decoding and augmentation on the GPU; cvt_fast.training.dali_loader).
DATA_LOADERS = ("torch", "dali")


def _official_defaults() -> CN:
    """The schema of the official code, with its default values."""
    c = CN()
    c.BASE = [""]
    c.NAME = ""
    c.DATA_DIR = ""
    c.DIST_BACKEND = "nccl"
    c.GPUS = (0,)
    c.MULTIPROCESSING_DISTRIBUTED = True
    c.OUTPUT_DIR = "OUTPUT/"
    c.LOG_DIR = ""
    c.WORKERS = 4
    c.PRINT_FREQ = 20
    c.PIN_MEMORY = True
    c.RANK = 0
    c.VERBOSE = True
    c.DDP_FIND_UNUSED_PARAMETERS = False
    c.MODEL_SUMMARY = False

    c.CUDNN = CN()
    c.CUDNN.BENCHMARK = True
    c.CUDNN.DETERMINISTIC = False
    c.CUDNN.ENABLED = True

    c.MODEL = CN()
    c.MODEL.NAME = "cls_cvt"
    c.MODEL.INIT_WEIGHTS = True
    c.MODEL.PRETRAINED = ""
    c.MODEL.PRETRAINED_LAYERS = ["*"]
    c.MODEL.NUM_CLASSES = 1000
    c.MODEL.SPEC = CN(dict(MODEL_SPECS["cvt-13"]))

    c.LOSS = CN()
    c.LOSS.LABEL_SMOOTHING = 0.0
    c.LOSS.LOSS = "softmax"

    c.DATASET = CN()
    c.DATASET.DATASET = "imagenet"
    c.DATASET.ROOT = ""
    c.DATASET.TRAIN_SET = "train"
    c.DATASET.TEST_SET = "val"
    c.DATASET.DATA_FORMAT = "jpg"
    c.DATASET.LABELMAP = ""
    c.DATASET.TRAIN_TSV_LIST = []
    c.DATASET.TEST_TSV_LIST = []
    c.DATASET.SAMPLER = "default"
    c.DATASET.TARGET_SIZE = -1

    c.INPUT = CN()
    c.INPUT.MEAN = [0.485, 0.456, 0.406]
    c.INPUT.STD = [0.229, 0.224, 0.225]

    c.AUG = CN()
    c.AUG.SCALE = (0.08, 1.0)
    c.AUG.RATIO = (3.0 / 4.0, 4.0 / 3.0)
    c.AUG.COLOR_JITTER = [0.4, 0.4, 0.4, 0.1, 0.0]
    c.AUG.GRAY_SCALE = 0.0
    c.AUG.GAUSSIAN_BLUR = 0.0
    c.AUG.DROPBLOCK_LAYERS = [3, 4]
    c.AUG.DROPBLOCK_KEEP_PROB = 1.0
    c.AUG.DROPBLOCK_BLOCK_SIZE = 7
    c.AUG.MIXUP_PROB = 0.0
    c.AUG.MIXUP = 0.0
    c.AUG.MIXCUT = 0.0
    c.AUG.MIXCUT_MINMAX = []
    c.AUG.MIXUP_SWITCH_PROB = 0.5
    c.AUG.MIXUP_MODE = "batch"
    c.AUG.MIXCUT_AND_MIXUP = False
    c.AUG.INTERPOLATION = 2
    c.AUG.TIMM_AUG = CN()
    c.AUG.TIMM_AUG.USE_LOADER = False
    c.AUG.TIMM_AUG.USE_TRANSFORM = False
    c.AUG.TIMM_AUG.RE_COUNT = 1
    c.AUG.TIMM_AUG.RE_MODE = "pixel"
    c.AUG.TIMM_AUG.RE_SPLIT = False
    c.AUG.TIMM_AUG.RE_PROB = 0.0
    c.AUG.TIMM_AUG.AUTO_AUGMENT = ""
    c.AUG.TIMM_AUG.HFLIP = 0.5
    c.AUG.TIMM_AUG.VFLIP = 0.0
    c.AUG.TIMM_AUG.COLOR_JITTER = 0.4
    c.AUG.TIMM_AUG.INTERPOLATION = "bicubic"

    c.TRAIN = CN()
    c.TRAIN.AUTO_RESUME = True
    c.TRAIN.CHECKPOINT = ""
    c.TRAIN.LR_SCHEDULER = CN()
    c.TRAIN.LR_SCHEDULER.METHOD = "timm"
    c.TRAIN.LR_SCHEDULER.ARGS = CN(new_allowed=True)
    c.TRAIN.OPTIMIZER = "adamW"
    c.TRAIN.OPTIMIZER_ARGS = CN(new_allowed=True)
    c.TRAIN.LR = 0.001
    c.TRAIN.SCALE_LR = True
    c.TRAIN.MOMENTUM = 0.9
    c.TRAIN.WD = 0.0001
    c.TRAIN.WITHOUT_WD_LIST = []
    c.TRAIN.NESTEROV = True
    c.TRAIN.GAMMA1 = 0.99
    c.TRAIN.GAMMA2 = 0.0
    c.TRAIN.BEGIN_EPOCH = 0
    c.TRAIN.END_EPOCH = 100
    c.TRAIN.IMAGE_SIZE = [224, 224]
    c.TRAIN.BATCH_SIZE_PER_GPU = 32
    c.TRAIN.SHUFFLE = True
    c.TRAIN.EVAL_BEGIN_EPOCH = 0
    c.TRAIN.DETECT_ANOMALY = False
    c.TRAIN.CLIP_GRAD_NORM = 0.0
    c.TRAIN.SAVE_ALL_MODELS = False

    c.TEST = CN()
    c.TEST.BATCH_SIZE_PER_GPU = 32
    c.TEST.CENTER_CROP = True
    c.TEST.IMAGE_SIZE = [224, 224]
    c.TEST.INTERPOLATION = 2
    c.TEST.MODEL_FILE = ""
    c.TEST.REAL_LABELS = False
    c.TEST.VALID_LABELS = ""

    c.FINETUNE = CN()
    c.FINETUNE.FINETUNE = False
    c.FINETUNE.USE_TRAIN_AUG = False
    c.FINETUNE.BASE_LR = 0.003
    c.FINETUNE.BATCH_SIZE = 512
    c.FINETUNE.EVAL_EVERY = 3000
    c.FINETUNE.TRAIN_MODE = True
    c.FINETUNE.FROZEN_LAYERS = []
    c.FINETUNE.LR_SCHEDULER = CN(new_allowed=True)
    c.FINETUNE.LR_SCHEDULER.DECAY_TYPE = "step"

    c.AMP = CN()
    c.AMP.ENABLED = False
    c.AMP.MEMORY_FORMAT = "nchw"

    c.DEBUG = CN()
    c.DEBUG.DEBUG = False
    return c


def _add_cvt_fast_keys(c: CN) -> None:
    """Keys that exist only in cvt_fast. Official files never set them; defaults match
    the official behaviour where there is one."""
    c.SEED = 0
    c.MODEL.BACKEND = "auto"         # official | auto | reference | triton | cuda | sdpa | xformers
    c.MODEL.ACT = "quick_gelu"       # quick_gelu (official) | gelu (Hugging Face's port)
    c.AMP.DTYPE = "bfloat16"         # bfloat16 | float16 (float16 uses a GradScaler)
    c.TRAIN.COMPILE = False
    c.TRAIN.CHANNELS_LAST = False
    c.TRAIN.EMA = CN()
    c.TRAIN.EMA.ENABLED = False
    c.TRAIN.EMA.DECAY = 0.9998
    c.TRAIN.CHECKPOINT_EVERY_STEPS = 0   # 0: only at the end of each epoch
    c.TRAIN.SKIP_NONFINITE_LOSS = False
    c.TRAIN.MAX_STEPS = 0                # 0: no limit
    # When no checkpoint of the run can be read: False stops with an error; True moves them
    # (and the run's metrics and weights) to OUTPUT_DIR/<name>/previous-<time>/ and starts over.
    c.TRAIN.START_OVER = False
    c.DATASET.SKIP_UNREADABLE = True
    c.TEST.INFERENCE_PATH = "eager"      # eager | inference_model (BatchNorm folded once, CUDA graphs on a GPU)
    c.DATA = CN()
    c.DATA.LOADER = "torch"              # torch | dali (see DATA_LOADERS)
    # Warn once when waiting on the loader takes more than this share of the step time (0: never).
    c.DATA.INPUT_BOUND_WARNING = 0.2


def get_default_config() -> CN:
    """A fresh, mutable config holding every valid key with its default."""
    c = _official_defaults()
    _add_cvt_fast_keys(c)
    return c


def _check_keys(node: CN, data: dict, prefix: str, source: str) -> None:
    """Raise ValueError for the first key of `data` that `node` does not have."""
    for key, value in data.items():
        full = f"{prefix}{key}"
        if full.rstrip(".") in _OPEN_SECTIONS or (prefix.rstrip(".") in _OPEN_SECTIONS):
            continue
        if key not in node:
            close = difflib.get_close_matches(key, [k for k in node.keys()], n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            raise ValueError(f"unknown config key {full} in {source}{hint}")
        if isinstance(node[key], CN) and isinstance(value, dict):
            _check_keys(node[key], value, f"{full}.", source)


def _read_yaml(path: str, seen: tuple[str, ...] = ()) -> dict:
    """Read a YAML file, resolving `BASE: [files]` inheritance (relative to the file)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    if path in seen:
        raise ValueError(f"config inheritance loop: {' -> '.join(seen + (path,))}")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping at the top, not {type(data).__name__}")
    merged: dict = {}
    for base in data.get("BASE", [""]) or []:
        if base:
            base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
            _deep_update(merged, _read_yaml(base_path, seen + (path,)))
    _deep_update(merged, {k: v for k, v in data.items() if k != "BASE"})
    return merged


def _deep_update(into: dict, new: dict) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_update(into[key], value)
        else:
            into[key] = value


def merge_overrides(cfg: CN, overrides: Sequence[str]) -> None:
    """Apply `KEY VALUE` pairs as on the official command line."""
    overrides = list(overrides)
    if len(overrides) % 2:
        raise ValueError(f"overrides must be KEY VALUE pairs; got an odd count: {overrides}")
    for key, value in zip(overrides[0::2], overrides[1::2]):
        node, parts = cfg, key.split(".")
        for i, part in enumerate(parts):
            section = ".".join(parts[:i])
            if section in _OPEN_SECTIONS and part not in node:
                # yacs refuses new keys on the command line even where the file may add
                # them; scheduler and optimizer arguments are legitimately open-ended.
                node[part] = CN._decode_cfg_value(value)
                break
            if not isinstance(node, CN) or part not in node:
                options = list(node.keys()) if isinstance(node, CN) else []
                close = difflib.get_close_matches(part, options, n=1)
                prefix = ".".join(parts[:i])
                hint = f"; did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else ""
                raise ValueError(f"unknown config key {key} on the command line{hint}")
            node = node[part]
        else:
            cfg.merge_from_list([key, value])


def check_values(cfg: CN) -> None:
    """ValueError naming the key for a value this code cannot use, whether or not the feature
    it belongs to is switched on (a wrong AMP.DTYPE is wrong with AMP off too)."""
    from cvt_fast.model import ACTIVATIONS, MODEL_BACKENDS

    checks = (("MODEL.BACKEND", cfg.MODEL.BACKEND, MODEL_BACKENDS), ("MODEL.ACT", cfg.MODEL.ACT, ACTIVATIONS),
              ("AMP.DTYPE", cfg.AMP.DTYPE, AMP_DTYPES), ("DATA.LOADER", cfg.DATA.LOADER, DATA_LOADERS))
    for key, value, allowed in checks:
        if value not in allowed:
            raise ValueError(f"{key}={value!r}; expected one of {', '.join(allowed)}")
    if not 0.0 <= float(cfg.DATA.INPUT_BOUND_WARNING) < 1.0:
        raise ValueError(f"DATA.INPUT_BOUND_WARNING={cfg.DATA.INPUT_BOUND_WARNING}; expected a share of the step "
                         "time in [0, 1) (0 switches the warning off)")
    if str(cfg.TRAIN.LR_SCHEDULER.METHOD) == "timm":
        args = cfg.TRAIN.LR_SCHEDULER.ARGS
        for key in args:
            if key not in SCHEDULER_ARGS:
                close = difflib.get_close_matches(key, SCHEDULER_ARGS, n=1)
                hint = f"did you mean {close[0]}? " if close else ""
                raise ValueError(f"unknown key TRAIN.LR_SCHEDULER.ARGS.{key}; {hint}the cosine schedule reads "
                                 f"{', '.join(SCHEDULER_ARGS)}")
        if "epochs" in args and int(args.epochs) != int(cfg.TRAIN.END_EPOCH):
            raise ValueError(f"TRAIN.LR_SCHEDULER.ARGS.epochs={args.epochs} differs from TRAIN.END_EPOCH="
                             f"{cfg.TRAIN.END_EPOCH}; the official code sets it from TRAIN.END_EPOCH: remove it "
                             "or make the two equal")
    for key in cfg.TRAIN.OPTIMIZER_ARGS:
        raise ValueError(f"TRAIN.OPTIMIZER_ARGS.{key} is not read by this trainer: TRAIN.OPTIMIZER (adamW, adam, "
                         "sgd) takes TRAIN.LR, TRAIN.WD, TRAIN.MOMENTUM and TRAIN.NESTEROV; remove it")


def load_config(path: str | None = None, overrides: Iterable[str] = ()) -> CN:
    """Defaults, then the YAML file at `path` (if any), then `overrides`, values checked
    (check_values); returned frozen."""
    cfg = get_default_config()
    if path:
        data = _read_yaml(path)
        _check_keys(cfg, data, "", path)
        cfg.merge_from_other_cfg(CN(data))
        cfg.NAME = cfg.NAME or os.path.splitext(os.path.basename(path))[0]
    merge_overrides(cfg, list(overrides))
    check_values(cfg)
    cfg.freeze()
    return cfg
