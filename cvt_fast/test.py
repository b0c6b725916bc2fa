"""Evaluate CvT: `python -m cvt_fast.test --cfg FILE TEST.MODEL_FILE weights.pth [KEY VALUE ...]`.

Top-1 / top-5 accuracy and cross-entropy on DATASET.ROOT/TEST_SET, with the test
transform of the config (resize to IMAGE_SIZE / 0.875 and center crop when
TEST.CENTER_CROP, TEST.INTERPOLATION). Weights: our checkpoints (final_state.pth,
model_best.pth, checkpoints/ckpt_*.pth), official model-zoo files and Hugging Face
CvtForImageClassification files, all through cvt_fast.checkpoint.load_checkpoint.
Without TEST.MODEL_FILE it evaluates OUTPUT_DIR/<config name>/final_state.pth.
TEST.INFERENCE_PATH inference_model evaluates through cvt_fast.inference_model (CUDA graphs on a GPU).
Runs under torchrun too (the val set is split over the processes, counts summed).
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from cvt_fast.training.cli import load, parse_args, run_cli


def evaluate_config(cfg: Any, model_file: str | None = None) -> dict[str, float]:
    """Build the model of `cfg`, load `model_file` (default TEST.MODEL_FILE), evaluate the val set."""
    import torch

    from cvt_fast.checkpoint import load_checkpoint
    from cvt_fast.model import build_model_from_config
    from cvt_fast.train import ensure_builtin_dataset, run_dir_of
    from cvt_fast.training import distributed as dist_utils
    from cvt_fast.training.data import build_val_loader
    from cvt_fast.training.logs import LOGGER_NAME
    from cvt_fast.training.loop import _amp_dtype, evaluate

    log = logging.getLogger(LOGGER_NAME)
    if cfg.TEST.REAL_LABELS or cfg.TEST.VALID_LABELS:
        raise ValueError("TEST.REAL_LABELS / TEST.VALID_LABELS are not supported; evaluate on the folder labels")
    info = dist_utils.init_distributed()
    path = model_file or str(cfg.TEST.MODEL_FILE)
    if not path:
        default = run_dir_of(cfg) / "final_state.pth"
        if not default.is_file():
            raise ValueError(f"no weights to test: set TEST.MODEL_FILE (and {default} does not exist)")
        path = str(default)
    if not Path(path).exists():
        raise ValueError(f"TEST.MODEL_FILE {path} does not exist")
    ensure_builtin_dataset(cfg, info.is_main)
    loader = build_val_loader(cfg, info.rank, info.world_size)
    n_classes = len(loader.dataset.classes)
    if n_classes > int(cfg.MODEL.NUM_CLASSES):
        raise ValueError(f"the test set has {n_classes} classes but MODEL.NUM_CLASSES={cfg.MODEL.NUM_CLASSES}")
    model = build_model_from_config(cfg)
    load_checkpoint(model, path, strict=True)
    model.to(info.device).eval()
    log.info("=> testing %s on %d images of %s", path, len(loader.dataset), loader.dataset.root)
    channels_last = bool(cfg.TRAIN.CHANNELS_LAST)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.TEST.INFERENCE_PATH == "inference_model":
        from cvt_fast.inference import inference_model

        model = inference_model(model)
    elif cfg.TEST.INFERENCE_PATH != "eager":
        raise ValueError(f"TEST.INFERENCE_PATH={cfg.TEST.INFERENCE_PATH!r}; expected 'eager' or 'inference_model'")
    result = evaluate(model, loader, info.device, _amp_dtype(cfg), channels_last)
    result["model_file"] = path
    return result


def _test(cfg_path: str | None, opts: Sequence[str]) -> int:
    from cvt_fast.checkpoint import atomic_write_bytes
    from cvt_fast.train import run_dir_of
    from cvt_fast.training import distributed as dist_utils
    from cvt_fast.training.logs import close_logging, setup_logging
    from cvt_fast.training.outputs import writing

    cfg = load(cfg_path, opts)
    info = dist_utils.init_distributed()
    try:
        run_dir = run_dir_of(cfg)
        setup_logging(run_dir, info.is_main, log_name="test.log")
        result = evaluate_config(cfg)
        if info.is_main:
            print(f"top-1 {result['top1']:.3f}%  top-5 {result['top5']:.3f}%  loss {result['loss']:.4f}  "
                  f"({int(result['images'])} images, {result['model_file']})")
            with writing(run_dir / "test_results.json"):
                atomic_write_bytes((json.dumps(result, indent=1) + "\n").encode(), run_dir / "test_results.json")
        return 0
    finally:
        close_logging()
        dist_utils.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args("python -m cvt_fast.test", "Evaluate CvT weights on the validation set.", argv)
    return run_cli(lambda: _test(args.cfg, args.opts))


if __name__ == "__main__":
    sys.exit(main())
