"""The training loop: one epoch of steps, evaluation, checkpoints, resume, metrics.

`train(cfg, run_dir)` runs the whole recipe in this process (one rank of a torchrun
job, or alone). Each step: the loader's uint8 batch to the device, float, normalised and
randomly erased there (device_input.py) -> mixup/cutmix -> autocast forward -> loss -> non-finite
check and stop request, agreed by all ranks in one all-reduce (before backward, so a bad
step never reaches the weights) -> backward (GradScaler for float16) -> optional clipping
-> optimizer step -> lr schedule step (per iteration) -> EMA update -> step checkpoint
every TRAIN.CHECKPOINT_EVERY_STEPS, or a final one and TrainingStopped when a stop was
requested (SIGTERM/SIGINT, see stop.py). Each epoch ends with evaluation on the val set, a
metrics.jsonl record, TensorBoard scalars and an epoch checkpoint.

What a run changes on disk, and when: nothing in OUTPUT_DIR/<name>/ (config.yaml,
metrics.jsonl, model_best.pth, checkpoints) before the arguments are checked, the data
and model are built and the starting state is loaded (`Trainer.restore`); a run whose
checkpoints are all unreadable stops there with an error unless TRAIN.START_OVER is set.
Under DDP, BatchNorm running statistics are averaged over ranks for evaluation and for
everything saved, and the running sums of the epoch in progress are summed over ranks
before they are saved, so logged metrics are those of the saved weights.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn as nn

from cvt_fast.checkpoint import atomic_write_bytes

from . import distributed as dist_utils
from .data import build_train_loader, build_val_loader, name_files, set_loader_epoch
from .device_input import build_device_input
from .ema import ModelEma
from .input_wait import MIN_STEPS as INPUT_WAIT_MIN_STEPS
from .input_wait import InputWaitMeter
from .logs import LOGGER_NAME, METRICS_FILE, MetricsWriter, TensorBoard
from .optim import build_criterion, build_mixup, build_optimizer, build_scheduler
from .outputs import OutputError, writing
from .resume import (CKPT_DIR, FORMAT, atomic_save, capture_rng, checkpoint_path, earlier_outputs, prune_checkpoints,
                     read_checkpoint, remove_stale_temporaries, restore_rng, save_checkpoint, scan_checkpoints,
                     set_aside)
from .stop import StopRequest, TrainingStopped

log = logging.getLogger(LOGGER_NAME)

KEEP_CHECKPOINTS = 3
# Fault-injection hook for the kill-and-resume tests: seconds to sleep after each step.
_STEP_DELAY_ENV = "CVT_FAST_TEST_STEP_DELAY"


class NonFiniteLossError(ValueError):
    pass


def _fresh_sums() -> dict[str, float]:
    # data_seconds: time spent waiting on the loader (rank 0's own, as seconds).
    return {"loss": 0.0, "samples": 0.0, "seconds": 0.0, "skipped_steps": 0.0, "data_seconds": 0.0}


@dataclass
class Position:
    """Where training stands: `epoch` in progress and batches of it already done."""
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_top1: float = -1.0
    # Running sums of the epoch in progress (this rank's), so a mid-epoch resume reports
    # the same numbers; and the training images of it found unreadable (dataset indices).
    epoch_sums: dict = field(default_factory=_fresh_sums)
    skipped_files: set = field(default_factory=set)


def _amp_dtype(cfg: Any) -> Optional[torch.dtype]:
    if not cfg.AMP.ENABLED:
        return None
    name = str(cfg.AMP.DTYPE)
    dtypes = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"AMP.DTYPE={name!r}; expected 'bfloat16' or 'float16'")
    return dtypes[name]


def describe_state_mismatch(model: nn.Module, state: dict[str, torch.Tensor], limit: int = 3) -> str:
    """'' when `state` fits `model` exactly, else a one-line account of the differences."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{label}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts)


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    problem = describe_state_mismatch(model, state)
    if problem:
        raise ValueError(f"{source} does not match this model (another architecture or MODEL.SPEC?): {problem}")
    model.load_state_dict(state)


def _accuracy_counts(logits: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    k = min(5, logits.shape[-1])
    topk = logits.topk(k, dim=-1).indices
    hits = topk.eq(target[:, None])
    return hits[:, 0].sum().item(), hits.any(dim=-1).sum().item()


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp_dtype: Optional[torch.dtype] = None,
             channels_last: bool = False) -> dict[str, float]:
    """Top-1/top-5 (percent) and mean cross-entropy over the whole val set, all ranks summed.
    Unreadable images (DATASET.SKIP_UNREADABLE) are left out of every number, and named."""
    was_training = model.training
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    loss_sum = top1 = top5 = count = 0.0
    unreadable: list[int] = []
    for x, y, bad in loader:
        keep = bad < 0
        if not bool(keep.all()):
            unreadable += bad[~keep].tolist()
            if not bool(keep.any()):
                continue
            x, y = x[keep], y[keep]
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(x)
        logits = logits.float()
        loss_sum += criterion(logits, y).item()
        c1, c5 = _accuracy_counts(logits, y)
        top1, top5, count = top1 + c1, top5 + c5, count + y.numel()
    loss_sum, top1, top5, count, n_bad = dist_utils.all_reduce_sum(
        [loss_sum, top1, top5, count, float(len(unreadable))], device)
    model.train(was_training)
    if n_bad:
        everywhere = sorted({i for part in dist_utils.all_gather_object(unreadable) for i in part})
        log.warning("evaluation: %d unreadable image(s) left out (DATASET.SKIP_UNREADABLE): %s", len(everywhere),
                    name_files(loader.dataset, everywhere))
    if not count:
        raise ValueError(f"no readable validation image in {loader.dataset.root}")
    return {"loss": loss_sum / count, "top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count,
            "images": count, "unreadable": n_bad}


def _build_model(cfg: Any) -> nn.Module:
    from cvt_fast.model import build_model_from_config

    return build_model_from_config(cfg)


def _load_pretrained(model: nn.Module, cfg: Any) -> None:
    path = str(cfg.MODEL.PRETRAINED)
    if not path:
        return
    if not os.path.isfile(path):
        raise ValueError(f"MODEL.PRETRAINED={path!r} does not exist")
    from cvt_fast.checkpoint import load_checkpoint

    # Fine-tuning to another label set keeps the backbone and starts a fresh head.
    load_checkpoint(model, path, strict=True, reset_head=int(cfg.MODEL.NUM_CLASSES) != 1000)
    log.info("=> initialised from %s", path)


def check_supported(cfg: Any) -> None:
    """Official keys whose features this trainer does not implement: an error, never ignored."""
    if cfg.FINETUNE.FINETUNE:
        raise ValueError("FINETUNE.FINETUNE True is not supported; fine-tune with MODEL.PRETRAINED <weights> "
                         "(the head is re-initialised when MODEL.NUM_CLASSES != 1000) and the usual TRAIN.* keys")
    if str(cfg.DATASET.SAMPLER) != "default":
        raise ValueError(f"DATASET.SAMPLER={cfg.DATASET.SAMPLER!r} is not supported; expected 'default'")
    if list(cfg.MODEL.PRETRAINED_LAYERS) != ["*"]:
        raise ValueError(f"MODEL.PRETRAINED_LAYERS={list(cfg.MODEL.PRETRAINED_LAYERS)} is not supported; "
                         "expected ['*'] (all layers)")


class Trainer:
    """Holds the pieces of one training run; `restore()` then `fit()` runs it."""

    def __init__(self, cfg: Any, run_dir: str | os.PathLike, info: dist_utils.DistInfo,
                 model_factory: Optional[Callable[[Any], nn.Module]] = None, stop: Optional[StopRequest] = None):
        self.cfg, self.info = cfg, info
        self.run_dir = Path(run_dir)
        if info.is_main:
            with writing(self.run_dir):
                self.run_dir.mkdir(parents=True, exist_ok=True)
        self.device = info.device
        self.amp_dtype = _amp_dtype(cfg)
        # AMP.MEMORY_FORMAT 'nhwc' is the official spelling of channels-last.
        self.channels_last = bool(cfg.TRAIN.CHANNELS_LAST) or str(cfg.AMP.MEMORY_FORMAT).lower() == "nhwc"
        check_supported(cfg)
        if self.device.type == "cuda":
            torch.backends.cudnn.enabled = bool(cfg.CUDNN.ENABLED)
            torch.backends.cudnn.benchmark = bool(cfg.CUDNN.BENCHMARK)
            torch.backends.cudnn.deterministic = bool(cfg.CUDNN.DETERMINISTIC)
        # The same initial weights on every rank (so the EMA copies agree from the start) ...
        dist_utils.seed_everything(int(cfg.SEED), 0)

        # Data first: a bad dataset path fails before any model is built.
        self.train_loader = build_train_loader(cfg, info.rank, info.world_size, self.device)
        self.val_loader = build_val_loader(cfg, info.rank, info.world_size)
        n_classes = len(self.train_loader.dataset.classes)
        if n_classes > int(cfg.MODEL.NUM_CLASSES):
            raise ValueError(f"the training set has {n_classes} classes but MODEL.NUM_CLASSES="
                             f"{cfg.MODEL.NUM_CLASSES}; set MODEL.NUM_CLASSES {n_classes}")
        self.steps_per_epoch = len(self.train_loader)
        # The loaders stop at uint8 images: float, normalisation and random erasing happen here.
        self.device_input = build_device_input(cfg, self.device)
        self.input_wait = InputWaitMeter(float(cfg.DATA.INPUT_BOUND_WARNING),
                                         min(INPUT_WAIT_MIN_STEPS, max(self.steps_per_epoch - 1, 1)), int(cfg.WORKERS),
                                         str(cfg.DATA.LOADER))
        self.mixup = build_mixup(cfg)
        if self.mixup is not None and int(cfg.TRAIN.BATCH_SIZE_PER_GPU) % 2:
            raise ValueError(f"mixup/cutmix needs an even TRAIN.BATCH_SIZE_PER_GPU, got {cfg.TRAIN.BATCH_SIZE_PER_GPU}")

        model = (model_factory or _build_model)(cfg)
        _load_pretrained(model, cfg)
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model  # the plain module: what checkpoints, EMA and evaluation see
        self.ema = ModelEma(model, float(cfg.TRAIN.EMA.DECAY)) if cfg.TRAIN.EMA.ENABLED else None
        self.optimizer = build_optimizer(cfg, model)
        # ... and a different augmentation / dropout stream on each rank.
        dist_utils.seed_everything(int(cfg.SEED) + 1, info.rank)
        self.scheduler = build_scheduler(cfg, self.optimizer, self.steps_per_epoch)
        use_scaler = self.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        self.criterion = build_criterion(cfg, train=True)
        self.pos = Position()

        self.train_model: nn.Module = model
        if info.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # broadcast_buffers (the default): every forward starts from rank 0's BatchNorm
            # statistics; each rank then updates its copy from its own batch.
            self.train_model = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                   find_unused_parameters=bool(cfg.DDP_FIND_UNUSED_PARAMETERS))
        self.eval_model: nn.Module = model
        if cfg.TRAIN.COMPILE:
            self.train_model = torch.compile(self.train_model)
            self.eval_model = torch.compile(model)

        self.metrics = MetricsWriter(self.run_dir) if info.is_main else None
        self.tb: Optional[TensorBoard] = None
        self.step_delay = float(os.environ.get(_STEP_DELAY_ENV, "0") or 0)
        self.stop = stop or StopRequest()
        self.resumed: Optional[bool] = None  # set by restore()
        self.resumed_from: Optional[Path] = None
        self.last_checkpoint: Optional[Path] = None  # newest checkpoint written or resumed from
        self.readable_checkpoints: set[Path] = set()  # files known to read and verify (rank 0)

    # ---- BatchNorm statistics across ranks ------------------------------------------
    @contextlib.contextmanager
    def averaged_statistics(self) -> Iterator[None]:
        """BatchNorm running statistics of the model (and EMA) averaged over ranks inside;
        each rank's own again after (collective)."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(dist_utils.averaged_batch_norm(self.model))
            if self.ema is not None:
                stack.enter_context(dist_utils.averaged_batch_norm(self.ema.module))
            yield

    def _own_statistics(self) -> dict[str, dict[str, torch.Tensor]]:
        modules = {"model": self.model, **({"ema": self.ema.module} if self.ema is not None else {})}
        return {name: {k: t.detach().to("cpu", copy=True) for k, t in dist_utils.batch_norm_statistics(m).items()}
                for name, m in modules.items()}

    def _load_own_statistics(self, saved: dict[str, dict[str, torch.Tensor]]) -> None:
        modules = {"model": self.model, **({"ema": self.ema.module} if self.ema is not None else {})}
        with torch.no_grad():
            for name, module in modules.items():
                mine = dist_utils.batch_norm_statistics(module)
                for key, value in saved.get(name, {}).items():
                    if key in mine:
                        mine[key].copy_(value)

    # ---- checkpoints -------------------------------------------------------------
    def _global_epoch_sums(self) -> tuple[dict[str, float], list[int]]:
        """The running sums of the epoch in progress over all ranks (collective); time is rank
        0's own (it reports images/s)."""
        sums = self.pos.epoch_sums
        keys = ("loss", "samples", "skipped_steps")
        totals = dict(zip(keys, dist_utils.all_reduce_sum([sums[k] for k in keys], self.device)))
        totals["seconds"] = sums["seconds"]
        totals["data_seconds"] = sums.get("data_seconds", 0.0)
        files = sorted({i for part in dist_utils.all_gather_object(sorted(self.pos.skipped_files)) for i in part})
        return totals, files

    def state_dict(self, rng_states: list, epoch_sums: dict[str, float], skipped_files: list[int],
                   rank_statistics: Optional[list] = None) -> dict[str, Any]:
        pos = self.pos
        return {
            "format": FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict()["model"] if self.ema is not None else None,
            "rng": rng_states,
            "world_size": self.info.world_size,
            "steps_per_epoch": self.steps_per_epoch,
            "config": self.cfg.dump(),
            "epoch": pos.epoch,
            "step_in_epoch": pos.step_in_epoch,
            "global_step": pos.global_step,
            "best_top1": pos.best_top1,
            "epoch_sums": epoch_sums,  # over all ranks
            "skipped_files": skipped_files,  # over all ranks
            # Each rank's own BatchNorm statistics ("model" and "ema" hold their average), so a
            # resumed DDP run continues exactly where each rank was.
            "rank_statistics": rank_statistics,
        }

    def _agreed_error(self, error: Optional[str]) -> None:
        """Raise rank 0's OutputError on every rank, so no rank waits for a failed one."""
        error = dist_utils.broadcast_object(error)
        if error:
            raise OutputError(error)

    def save_checkpoint(self) -> Path:
        # Every rank contributes (collectives), rank 0 writes.
        rng_states = dist_utils.all_gather_object(capture_rng())
        sums, files = self._global_epoch_sums()
        statistics = dist_utils.all_gather_object(self._own_statistics()) if self.info.distributed else None
        path = checkpoint_path(self.run_dir, self.pos.global_step)
        error = None
        with self.averaged_statistics():
            if self.info.is_main:
                try:
                    with writing(path):
                        save_checkpoint(self.state_dict(rng_states, sums, files, statistics), path)
                except OutputError as err:
                    error = str(err)
        self._agreed_error(error)
        self.last_checkpoint = path
        if self.info.is_main:
            self.readable_checkpoints.add(path)
            log.info("=> checkpoint %s (%s)", path, self._where())
            for old in prune_checkpoints(self.run_dir, KEEP_CHECKPOINTS, path, self.readable_checkpoints,
                                         protect=self.resumed_from):
                self.readable_checkpoints.discard(old)
        return path

    def _choose_start(self) -> Optional[tuple[Path, dict[str, Any]]]:
        """Rank 0: the checkpoint to resume from (read and verified), or None to start from the
        beginning. Reads only; ValueError when the run's checkpoints are all unreadable."""
        cfg = self.cfg
        explicit = str(cfg.TRAIN.CHECKPOINT)
        found, skipped = None, []
        if cfg.TRAIN.AUTO_RESUME or explicit:
            found, skipped = scan_checkpoints(self.run_dir)
        if found is not None:
            return found
        # TRAIN.CHECKPOINT is where a run with no checkpoint of its own starts; once it has
        # its own, those are newer, so a restarted run never goes back to the named file.
        if explicit:
            if not os.path.isfile(explicit):
                raise ValueError(f"TRAIN.CHECKPOINT {explicit} does not exist")
            return Path(explicit), read_checkpoint(explicit)
        if skipped and not cfg.TRAIN.START_OVER:
            raise ValueError(
                f"none of the {len(skipped)} checkpoint(s) in {self.run_dir / CKPT_DIR} can be read (newest: "
                f"{skipped[0]}); nothing was changed. Set TRAIN.START_OVER True to start from the beginning (the "
                f"unreadable files and the run's metrics and weights are moved to {self.run_dir}/previous-<time>/), "
                "or TRAIN.CHECKPOINT to a good copy")
        return None

    def restore(self) -> bool:
        """Load the starting state: the newest readable checkpoint of the run (or TRAIN.CHECKPOINT),
        else the beginning. Only once that worked does rank 0 touch the run folder: remove
        temporaries of killed writes, move an earlier run's outputs aside when starting from the
        beginning, write config.yaml, cut metrics.jsonl back to the resumed epoch. Returns
        whether it resumed; repeated calls return the first answer."""
        if self.resumed is not None:
            return self.resumed
        choice, error = None, None
        if self.info.is_main:
            try:
                choice = self._choose_start()
            except ValueError as err:
                error = str(err)
        # Every rank learns rank 0's choice (or its error), so none waits forever.
        path, error = dist_utils.broadcast_object((str(choice[0]) if choice else None, error))
        if error:
            raise ValueError(error)
        if path is not None:
            state = choice[1] if choice else read_checkpoint(path)  # other ranks read the file rank 0 chose
            self._load_state(state, Path(path))
        else:
            self._start_position()
        error = None
        if self.info.is_main:
            try:
                self._prepare_run_folder(resumed=path is not None)
            except OutputError as err:
                error = str(err)
        self._agreed_error(error)
        self.resumed = path is not None
        return self.resumed

    def _start_position(self) -> None:
        self.pos.epoch = int(self.cfg.TRAIN.BEGIN_EPOCH)
        if self.pos.epoch:
            # Start the per-iteration schedule where BEGIN_EPOCH puts it.
            self.scheduler.last_epoch = self.pos.epoch * self.steps_per_epoch - 1
            self.scheduler.step()
            self.pos.global_step = self.pos.epoch * self.steps_per_epoch

    def _load_state(self, state: dict[str, Any], path: Path) -> None:
        info = self.info
        if int(state["world_size"]) != info.world_size or int(state["steps_per_epoch"]) != self.steps_per_epoch:
            log.warning("resuming with %d process(es), %d steps per epoch, from a checkpoint of %d, %d: the "
                        "data order changes", info.world_size, self.steps_per_epoch,
                        state["world_size"], state["steps_per_epoch"])
        load_model_state(self.model, state["model"], f"checkpoint {path}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            if state.get("ema") is not None:
                self.ema.module.load_state_dict(state["ema"])
            else:
                self.ema = ModelEma(self.model, float(self.cfg.TRAIN.EMA.DECAY))
        statistics = state.get("rank_statistics")
        if statistics and len(statistics) == info.world_size:
            self._load_own_statistics(statistics[info.rank])
        # The saved sums are over all ranks: rank 0 carries them on, the others add from zero,
        # so the end-of-epoch all-reduce gives the uninterrupted run's totals.
        saved = dict(state.get("epoch_sums") or {})
        sums = _fresh_sums()
        if info.is_main:
            sums.update({k: float(saved[k]) for k in sums if k in saved})
        else:
            sums["seconds"] = float(saved.get("seconds", 0.0))
            sums["data_seconds"] = float(saved.get("data_seconds", 0.0))
        self.pos = Position(epoch=int(state["epoch"]), step_in_epoch=int(state["step_in_epoch"]),
                            global_step=int(state["global_step"]), best_top1=float(state["best_top1"]),
                            epoch_sums=sums,
                            skipped_files=set(state.get("skipped_files") or ()) if info.is_main else set())
        if self.pos.step_in_epoch >= self.steps_per_epoch:
            self.pos.step_in_epoch = self.steps_per_epoch
        rngs = state.get("rng") or []
        if len(rngs) == info.world_size:
            restore_rng(rngs[info.rank])
        else:
            dist_utils.seed_everything(int(self.cfg.SEED) + self.pos.global_step, info.rank)
        self.resumed_from = self.last_checkpoint = path
        self.readable_checkpoints.add(path)
        log.info("=> resumed from %s (%s)", path, self._where())

    def _prepare_run_folder(self, resumed: bool) -> None:
        run_dir = self.run_dir
        with writing(run_dir):
            for stale in remove_stale_temporaries(run_dir):
                log.info("=> removed %s (left by a write that was killed)", stale)
            earlier = [] if resumed else earlier_outputs(run_dir)
            if earlier:
                folder = set_aside(run_dir, earlier)
                log.warning("=> starting from the beginning: the %d file(s) of the earlier run here were moved to %s",
                            len(earlier), folder)
        with writing(run_dir / "config.yaml"):
            atomic_write_bytes(self.cfg.dump().encode(), run_dir / "config.yaml")
        if self.metrics is not None:
            with writing(self.metrics.path):
                self.metrics.truncate_before(self.pos.epoch)
        with writing(run_dir / "tensorboard"):
            self.tb = TensorBoard(run_dir, purge_step=self.pos.global_step + 1 if resumed else None)

    # ---- stopping ----------------------------------------------------------------
    def _agree(self, loss: torch.Tensor) -> tuple[bool, bool]:
        """(some rank's loss is not finite, some rank was asked to stop): one all-reduce."""
        bad, stop = dist_utils.all_reduce_sum(
            [0.0 if bool(torch.isfinite(loss).item()) else 1.0, 1.0 if self.stop.requested else 0.0], self.device)
        return bad > 0, stop > 0

    def _where(self) -> str:
        """'epoch 2/6, step 3 of 8 done' or 'end of epoch 2/6' (epochs counted from 1, as the bar does)."""
        pos, end = self.pos, int(self.cfg.TRAIN.END_EPOCH)
        if pos.step_in_epoch == 0 and pos.epoch > 0:
            return f"end of epoch {pos.epoch}/{end}, global step {pos.global_step}"
        return (f"epoch {pos.epoch + 1}/{end}, step {pos.step_in_epoch} of {self.steps_per_epoch} done, "
                f"global step {pos.global_step}")

    def _stopped(self) -> TrainingStopped:
        why = f"{self.stop.signal_name} received" if self.stop.requested else "stop requested on another rank"
        return TrainingStopped(f"{why}: checkpoint {self.last_checkpoint} written ({self._where()}); run the same "
                               "command again to continue from there", is_main=self.info.is_main)

    # ---- one epoch ---------------------------------------------------------------
    def _nonfinite_error(self, loss: torch.Tensor, where: str) -> NonFiniteLossError:
        last = (f"the newest checkpoint, {self.last_checkpoint}" if self.last_checkpoint is not None else
                "no checkpoint has been written yet, a rerun starts from the beginning")
        return NonFiniteLossError(
            f"non-finite loss ({loss.item()}) at {where}; the weights were not updated by this step "
            f"(last good state: {last}). Lower TRAIN.LR, set TRAIN.CLIP_GRAD_NORM, "
            "or set TRAIN.SKIP_NONFINITE_LOSS True to skip such steps")

    def train_epoch(self, end_epoch: int, max_steps: int) -> tuple[bool, bool]:
        """Train the rest of epoch self.pos.epoch; returns (TRAIN.MAX_STEPS stopped it, a stop
        request came on its last step). A stop request earlier in the epoch writes a checkpoint
        and raises TrainingStopped."""
        from tqdm import tqdm

        cfg, pos = self.cfg, self.pos
        set_loader_epoch(self.train_loader, int(cfg.SEED), pos.epoch, self.info.rank, pos.step_in_epoch)
        self.train_model.train()
        images_per_step = int(cfg.TRAIN.BATCH_SIZE_PER_GPU) * self.info.world_size
        clip = float(cfg.TRAIN.CLIP_GRAD_NORM)
        every = int(cfg.TRAIN.CHECKPOINT_EVERY_STEPS)
        bar = tqdm(total=self.steps_per_epoch, initial=pos.step_in_epoch, disable=not self.info.is_main,
                   desc=f"epoch {pos.epoch + 1}/{end_epoch}", dynamic_ncols=True, leave=True)
        sums = pos.epoch_sums
        # A bad forward must not leave its BatchNorm statistics behind either: the buffers
        # are backed up before each forward (one fused copy) and restored on a bad step.
        buffers = [b for b in self.model.buffers()]
        backup = [b.detach().clone() for b in buffers]
        start = time.perf_counter()
        # The context closes the bar on errors too, so a message is not glued to it.
        # Waiting on the loader, this call's (the bar shows its share); the first batch of a call
        # also starts the loader's workers, so the input-bound judgement leaves it out.
        wait_s = step_s = 0.0
        first = True
        with bar:
            hit_limit = stop = False
            t0 = time.perf_counter()  # step time includes waiting for the data
            for x, y, unreadable in self.train_loader:
                waited = time.perf_counter() - t0
                x = self.device_input(x)
                y = y.to(self.device, non_blocking=True)
                pos.skipped_files.update(unreadable[unreadable >= 0].tolist())
                if self.mixup is not None:
                    x, y = self.mixup(x, y)
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                if buffers:
                    torch._foreach_copy_(backup, buffers)
                with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                    enabled=self.amp_dtype is not None):
                    logits = self.train_model(x)
                loss = self.criterion(logits.float(), y)
                where = f"epoch {pos.epoch + 1} step {pos.step_in_epoch + 1} (global step {pos.global_step})"
                self.optimizer.zero_grad(set_to_none=True)
                skip, stop = self._agree(loss)
                if skip and not cfg.TRAIN.SKIP_NONFINITE_LOSS:
                    if buffers:
                        torch._foreach_copy_(buffers, backup)
                    raise self._nonfinite_error(loss, where)
                if not skip:
                    self.scaler.scale(loss).backward()
                    if clip > 0.0:
                        self.scaler.unscale_(self.optimizer)
                        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
                        # (with float16 the GradScaler itself skips steps whose gradients overflow)
                        if not self.scaler.is_enabled() and dist_utils.any_rank(
                                not bool(torch.isfinite(norm).item()), self.device):
                            if not cfg.TRAIN.SKIP_NONFINITE_LOSS:
                                raise self._nonfinite_error(norm, f"{where} (gradient norm)")
                            skip = True
                            self.optimizer.zero_grad(set_to_none=True)
                    if not skip:
                        self.scaler.step(self.optimizer)
                        self.scaler.update()
                        if self.ema is not None:
                            self.ema.update(self.model)
                if skip:
                    if buffers:
                        torch._foreach_copy_(buffers, backup)
                    sums["skipped_steps"] += 1
                    log.warning("non-finite loss at %s: step skipped (TRAIN.SKIP_NONFINITE_LOSS)", where)
                # The schedule follows the data position, skipped steps included.
                self.scheduler.step()
                loss_value = loss.item()
                if not skip:
                    sums["loss"] += loss_value * y.shape[0]
                    sums["samples"] += y.shape[0]
                pos.step_in_epoch += 1
                pos.global_step += 1
                if self.step_delay:
                    time.sleep(self.step_delay)
                dt, t0 = time.perf_counter() - t0, time.perf_counter()
                sums["data_seconds"] = sums.get("data_seconds", 0.0) + waited
                wait_s, step_s = wait_s + waited, step_s + dt
                if not first:
                    self.input_wait.add(waited, dt)
                    warning = self.input_wait.warning()
                    if warning and self.info.is_main:
                        log.warning(warning)
                first = False
                lr = self.optimizer.param_groups[0]["lr"]
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_step / max(dt, 1e-9):.0f}",
                                data=f"{100 * wait_s / max(step_s, 1e-9):.0f}%")
                bar.update(1)
                if self.tb is not None:
                    self.tb.scalars({"train/loss": loss_value, "train/lr": lr}, pos.global_step)
                if self.info.is_main and int(cfg.PRINT_FREQ) > 0 and pos.step_in_epoch % int(cfg.PRINT_FREQ) == 0:
                    log.info("epoch %d/%d step %d/%d loss %.4f lr %.3e data wait %.0f%% of the step time", pos.epoch + 1,
                             end_epoch, pos.step_in_epoch, self.steps_per_epoch, loss_value, lr,
                             100 * wait_s / max(step_s, 1e-9))
                hit_limit = 0 < max_steps <= pos.global_step
                sums["seconds"] += time.perf_counter() - start
                start = time.perf_counter()
                if hit_limit:
                    break
                mid_epoch = pos.step_in_epoch < self.steps_per_epoch
                if stop and mid_epoch:
                    self.save_checkpoint()
                    raise self._stopped()
                if every > 0 and pos.global_step % every == 0 and mid_epoch:
                    self.save_checkpoint()
                    start = t0 = time.perf_counter()  # checkpoint time is not training time
        return hit_limit, stop

    # ---- the run -----------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        cfg, info = self.cfg, self.info
        resumed = self.restore()
        end_epoch = int(cfg.TRAIN.END_EPOCH)
        max_steps = int(cfg.TRAIN.MAX_STEPS)
        if info.is_main:
            n_params = sum(p.numel() for p in self.model.parameters())
            log.info("=> %d train / %d val images, %d classes, %d steps per epoch x %d process(es), %.2fM params, "
                     "device %s, loader %s with %d worker(s)%s", len(self.train_loader.dataset),
                     len(self.val_loader.dataset), len(self.train_loader.dataset.classes), self.steps_per_epoch,
                     info.world_size, n_params / 1e6, self.device, cfg.DATA.LOADER, int(cfg.WORKERS),
                     "" if resumed else ", from the beginning")
        last: dict[str, Any] = {}
        stopped = 0 < max_steps <= self.pos.global_step
        while self.pos.epoch < end_epoch and not stopped:
            with torch.autograd.set_detect_anomaly(bool(cfg.TRAIN.DETECT_ANOMALY)):
                stopped, stop_requested = self.train_epoch(end_epoch, max_steps)
            last = self.end_epoch(partial=self.pos.step_in_epoch < self.steps_per_epoch)
            # A stop request on an epoch's last step (or during its evaluation): its checkpoint
            # has just been written.
            if (stop_requested or dist_utils.any_rank(self.stop.requested, self.device)) and self.pos.epoch < end_epoch:
                raise self._stopped()
        dist_utils.barrier()
        error = None
        with self.averaged_statistics():
            if info.is_main:
                try:
                    self._write_final_outputs()
                except OutputError as err:
                    error = str(err)
        self._agreed_error(error)
        return last

    def _write_final_outputs(self) -> None:
        for path, module in ((self.run_dir / "final_state.pth", self.model),
                             (self.run_dir / "final_state_ema.pth", self.ema.module if self.ema else None)):
            if module is not None:
                with writing(path):
                    atomic_save(module.state_dict(), path)
        if self.tb is not None:
            self.tb.close()
        from .plots import plot_metrics

        if (self.run_dir / METRICS_FILE).exists():
            with writing(self.run_dir / "curves.png"):
                plot_metrics(self.run_dir / METRICS_FILE, self.run_dir / "curves.png", title=self.run_dir.name)

    def end_epoch(self, partial: bool = False) -> dict[str, Any]:
        """Evaluate, record and checkpoint. `partial` (TRAIN.MAX_STEPS stopped mid-epoch): the
        checkpoint stays mid-epoch so a longer run continues it, and redoes this record."""
        cfg, pos = self.cfg, self.pos
        end = int(cfg.TRAIN.END_EPOCH)
        last_epoch = pos.epoch + 1 >= end or partial
        sums, skipped_files = self._global_epoch_sums()
        with self.averaged_statistics():
            if pos.epoch < int(cfg.TRAIN.EVAL_BEGIN_EPOCH) and not last_epoch:
                result = {"loss": None, "top1": None, "top5": None}  # official: no evaluation before then
            else:
                result = evaluate(self.eval_model, self.val_loader, self.device, self.amp_dtype, self.channels_last)
            ema_result = None
            if self.ema is not None and result["top1"] is not None:
                ema_result = evaluate(self.ema.module, self.val_loader, self.device, self.amp_dtype,
                                      self.channels_last)
            seconds = sums["seconds"]
            images = pos.step_in_epoch * int(cfg.TRAIN.BATCH_SIZE_PER_GPU) * self.info.world_size
            record = {
                "epoch": pos.epoch,
                "global_step": pos.global_step,
                "lr": self.optimizer.param_groups[0]["lr"],
                "train_loss": sums["loss"] / sums["samples"] if sums["samples"] else float("nan"),
                "val_loss": result["loss"],
                "val_top1": result["top1"],
                "val_top5": result["top5"],
                "images_per_s": images / seconds if seconds > 0 else 0.0,
                "epoch_seconds": seconds,
                # Waiting on the loader (rank 0's): above ~0.2 the run is input-bound.
                "data_wait_s": sums["data_seconds"],
                "data_wait_fraction": sums["data_seconds"] / seconds if seconds > 0 else 0.0,
            }
            if ema_result is not None:
                record.update(val_loss_ema=ema_result["loss"], val_top1_ema=ema_result["top1"],
                              val_top5_ema=ema_result["top5"])
            if skipped_files:
                record["skipped_images"] = len(skipped_files)
                if self.info.is_main:
                    log.warning("epoch %d/%d: %d unreadable training image(s) skipped (DATASET.SKIP_UNREADABLE), "
                                "others stood in for them: %s", pos.epoch + 1, end, len(skipped_files),
                                name_files(self.train_loader.dataset, skipped_files))
            if sums["skipped_steps"]:
                record["skipped_steps"] = int(sums["skipped_steps"])
            evaluated = result["top1"] is not None
            is_best = evaluated and result["top1"] > pos.best_top1
            if is_best:
                pos.best_top1 = result["top1"]
            error = None
            if self.info.is_main:
                try:
                    self._write_epoch_outputs(record, result, ema_result, is_best, partial)
                except OutputError as err:
                    error = str(err)
        self._agreed_error(error)
        if not partial:
            # The epoch is done: the checkpoint points at the start of the next one.
            pos.epoch += 1
            pos.step_in_epoch = 0
            pos.epoch_sums = _fresh_sums()
            pos.skipped_files = set()
        self.save_checkpoint()
        return record

    def _write_epoch_outputs(self, record: dict[str, Any], result: dict[str, Any], ema_result: Optional[dict],
                             is_best: bool, partial: bool) -> None:
        """Rank 0, BatchNorm statistics averaged: log line, metrics record, TensorBoard, weights."""
        cfg, pos = self.cfg, self.pos
        evaluated = result["top1"] is not None
        val = (f"val loss {result['loss']:.4f} top-1 {result['top1']:.2f}% top-5 {result['top5']:.2f}%"
               if evaluated else f"not evaluated (TRAIN.EVAL_BEGIN_EPOCH {cfg.TRAIN.EVAL_BEGIN_EPOCH})")
        ema_text = f" | EMA top-1 {ema_result['top1']:.2f}%" if ema_result else ""
        log.info("=> epoch %d/%d: train loss %.4f | %s | %.0f img/s, %.0f%% of it waiting on data%s", pos.epoch + 1,
                 int(cfg.TRAIN.END_EPOCH), record["train_loss"], val, record["images_per_s"],
                 100 * record["data_wait_fraction"], ema_text)
        with writing(self.metrics.path):
            self.metrics.append(record)
        if self.tb is not None:
            scalars = {"train/epoch_loss": record["train_loss"], "train/images_per_s": record["images_per_s"],
                       "train/data_wait_fraction": record["data_wait_fraction"]}
            if evaluated:
                scalars.update({"val/loss": result["loss"], "val/top1": result["top1"], "val/top5": result["top5"]})
            self.tb.scalars(scalars, pos.epoch + 1)
        if is_best:
            with writing(self.run_dir / "model_best.pth"):
                atomic_save(self.model.state_dict(), self.run_dir / "model_best.pth")
        if cfg.TRAIN.SAVE_ALL_MODELS and not partial:
            with writing(self.run_dir / f"model_{pos.epoch}.pth"):
                atomic_save(self.model.state_dict(), self.run_dir / f"model_{pos.epoch}.pth")


def train(cfg: Any, run_dir: str | os.PathLike, info: Optional[dist_utils.DistInfo] = None,
          model_factory: Optional[Callable[[Any], nn.Module]] = None) -> dict[str, Any]:
    """Run the configured training in this process; returns the last epoch's metrics."""
    info = info or dist_utils.init_distributed()
    trainer = Trainer(cfg, run_dir, info, model_factory)
    return trainer.fit()
