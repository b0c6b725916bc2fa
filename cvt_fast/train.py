"""Train CvT: `python -m cvt_fast.train [--cfg FILE] [KEY VALUE ...]`.

Without --cfg it runs the built-in experiment, experiments/digits/cvt-digits.yaml
(scikit-learn's digits as an ImageFolder, a small CvT, a few minutes on a CPU). With an
official config (experiments/imagenet/cvt/*.yaml) it runs the official recipe. Multi-GPU
and multi-node through torchrun: `torchrun --nproc_per_node 8 -m cvt_fast.train --cfg ...`.
Outputs go to OUTPUT_DIR/<config name>/: train.log, metrics.jsonl, curves.png,
tensorboard/, checkpoints/ (resumable), model_best.pth and final_state.pth (weights).
Rerunning the same command resumes from the newest readable checkpoint. SIGTERM or SIGINT
stops at the next step with a checkpoint (exit code 75); errors are one line, exit code 2.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Sequence

from cvt_fast.training.cli import load, parse_args, run_cli


def prepare_config(cfg: Any, world_size: int) -> Any:
    """Run-time adjustments the official trainer makes: LR scaled by the process count."""
    if world_size > 1 and cfg.TRAIN.SCALE_LR:
        cfg = cfg.clone()
        cfg.defrost()
        cfg.TRAIN.LR = float(cfg.TRAIN.LR) * world_size
        cfg.freeze()
    return cfg


def run_dir_of(cfg: Any) -> Path:
    return Path(cfg.OUTPUT_DIR) / (cfg.NAME or "run")


def ensure_builtin_dataset(cfg: Any, is_main: bool) -> None:
    """The digits experiment writes its ImageFolder on first use (rank 0; others wait)."""
    from cvt_fast.training import distributed as dist_utils

    if str(cfg.DATASET.DATASET) == "digits":
        if is_main:
            from cvt_fast.training.digits import export_digits

            export_digits(cfg.DATASET.ROOT)
        dist_utils.barrier()


def _train(cfg_path: str | None, opts: Sequence[str]) -> int:
    import torch

    from cvt_fast.training import distributed as dist_utils
    from cvt_fast.training.logs import close_logging, setup_logging
    from cvt_fast.training.loop import Trainer
    from cvt_fast.training.stop import StopRequest

    cfg = load(cfg_path, opts)
    info = dist_utils.init_distributed()
    try:
        cfg = prepare_config(cfg, info.world_size)
        run_dir = run_dir_of(cfg)
        log = setup_logging(run_dir, info.is_main)
        if info.is_main:
            log.info("=> config %s, outputs in %s", cfg_path or "(built-in digits)", run_dir)
            log.info("=> torch %s, %d process(es), device %s", torch.__version__, info.world_size, info.device)
        ensure_builtin_dataset(cfg, info.is_main)
        started = time.time()
        stop = StopRequest()
        # Builds everything and loads the starting state before the run folder is touched
        # (config.yaml included): a refused invocation changes nothing there.
        trainer = Trainer(cfg, run_dir, info, stop=stop)
        trainer.restore()
        with stop.handling_signals():
            last = trainer.fit()
        if info.is_main:
            minutes = (time.time() - started) / 60
            if last:
                log.info("=> done in %.1f min: val top-1 %.2f%%, top-5 %.2f%%, loss %.4f", minutes,
                         last["val_top1"], last["val_top5"], last["val_loss"])
            else:
                log.info("=> nothing to do: training already finished (TRAIN.END_EPOCH %d)", cfg.TRAIN.END_EPOCH)
            print(f"outputs in {run_dir}/: train.log, metrics.jsonl, curves.png, tensorboard/, "
                  "checkpoints/, model_best.pth, final_state.pth")
        return 0
    finally:
        close_logging()
        dist_utils.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args("python -m cvt_fast.train", "Train CvT (official recipe, or the built-in digits run).", argv)
    return run_cli(lambda: _train(args.cfg, args.opts))


if __name__ == "__main__":
    sys.exit(main())
