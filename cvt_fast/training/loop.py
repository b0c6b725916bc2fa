"""The training loop: one epoch of steps, evaluation, checkpoints, resume, metrics.

`train(cfg, run_dir)` runs the whole recipe in this process (one rank of a torchrun
job, or alone). Each step: mixup/cutmix -> autocast forward -> loss -> non-finite
check agreed by all ranks (before backward, so a bad step never reaches the weights)
-> backward (GradScaler for float16) -> optional clipping -> optimizer step -> lr
schedule step (per iteration) -> EMA update -> step checkpoint every
TRAIN.CHECKPOINT_EVERY_STEPS. Each epoch ends with evaluation on the val set, a
metrics.jsonl record, TensorBoard scalars and an epoch checkpoint.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from . import distributed as dist_utils
from .data import build_train_loader, build_val_loader, set_loader_epoch
from .ema import ModelEma
from .logs import LOGGER_NAME, METRICS_FILE, MetricsWriter, TensorBoard
from .optim import build_criterion, build_mixup, build_optimizer, build_scheduler
from .resume import (FORMAT, atomic_save, capture_rng, checkpoint_path, find_resume_checkpoint,
                     prune_checkpoints, read_checkpoint, restore_rng)

log = logging.getLogger(LOGGER_NAME)

KEEP_CHECKPOINTS = 3
# Fault-injection hook for the kill-and-resume test: seconds to sleep after each step.
_STEP_DELAY_ENV = "CVT_FAST_TEST_STEP_DELAY"


class NonFiniteLossError(ValueError):
    pass


@dataclass
class Position:
    """Where training stands: `epoch` in progress and batches of it already done."""
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_top1: float = -1.0
    # Running sums of the epoch in progress, so a mid-epoch resume reports the same numbers.
    epoch_sums: dict = field(default_factory=lambda: {"loss": 0.0, "samples": 0.0, "seconds": 0.0,
                                                      "skipped_images": 0.0, "skipped_steps": 0.0})


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
    """Top-1/top-5 (percent) and mean cross-entropy over the whole val set, all ranks summed."""
    was_training = model.training
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    loss_sum = top1 = top5 = count = skipped = 0.0
    for x, y, bad in loader:
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
        skipped += float(bad.sum())
    loss_sum, top1, top5, count, skipped = dist_utils.all_reduce_sum([loss_sum, top1, top5, count, skipped], device)
    model.train(was_training)
    if skipped:
        log.warning("evaluation: %d unreadable image(s) skipped (DATASET.SKIP_UNREADABLE)", int(skipped))
    count = max(count, 1.0)
    return {"loss": loss_sum / count, "top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count,
            "images": count}


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
    """Holds the pieces of one training run; `fit()` runs it."""

    def __init__(self, cfg: Any, run_dir: str | os.PathLike, info: dist_utils.DistInfo,
                 model_factory: Optional[Callable[[Any], nn.Module]] = None):
        self.cfg, self.info = cfg, info
        self.run_dir = Path(run_dir)
        if info.is_main:
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
        self.train_loader = build_train_loader(cfg, info.rank, info.world_size)
        self.val_loader = build_val_loader(cfg, info.rank, info.world_size)
        n_classes = len(self.train_loader.dataset.classes)
        if n_classes > int(cfg.MODEL.NUM_CLASSES):
            raise ValueError(f"the training set has {n_classes} classes but MODEL.NUM_CLASSES="
                             f"{cfg.MODEL.NUM_CLASSES}; set MODEL.NUM_CLASSES {n_classes}")
        self.steps_per_epoch = len(self.train_loader)
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

            self.train_model = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                   find_unused_parameters=bool(cfg.DDP_FIND_UNUSED_PARAMETERS))
        self.eval_model: nn.Module = model
        if cfg.TRAIN.COMPILE:
            self.train_model = torch.compile(self.train_model)
            self.eval_model = torch.compile(model)

        self.metrics = MetricsWriter(self.run_dir) if info.is_main else None
        self.tb: Optional[TensorBoard] = None
        self.step_delay = float(os.environ.get(_STEP_DELAY_ENV, "0") or 0)

    # ---- checkpoints -------------------------------------------------------------
    def state_dict(self, rng_states: list) -> dict[str, Any]:
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
            **{k: v for k, v in asdict(self.pos).items()},
        }

    def save_checkpoint(self) -> None:
        # Every rank contributes its RNG state (collective), rank 0 writes.
        rng_states = dist_utils.all_gather_object(capture_rng())
        if self.info.is_main:
            path = checkpoint_path(self.run_dir, self.pos.global_step)
            atomic_save(self.state_dict(rng_states), path)
            prune_checkpoints(self.run_dir, KEEP_CHECKPOINTS)
            log.info("=> checkpoint %s (epoch %d, step %d of %d)", path, self.pos.epoch,
                     self.pos.step_in_epoch, self.steps_per_epoch)

    def try_resume(self) -> bool:
        found, error = None, None
        if self.info.is_main:
            found = find_resume_checkpoint(self.run_dir)
            explicit = str(self.cfg.TRAIN.CHECKPOINT)
            # TRAIN.CHECKPOINT is where a run with no checkpoint of its own starts; once it has
            # its own, those are newer, so a restarted run never goes back to the named file.
            if found is None and explicit:
                try:
                    if not os.path.isfile(explicit):
                        raise ValueError(f"TRAIN.CHECKPOINT {explicit} does not exist")
                    found = (Path(explicit), read_checkpoint(explicit))
                except ValueError as err:
                    error = str(err)
        # Every rank learns rank 0's choice (or its error), so none waits forever.
        path, error = dist_utils.broadcast_object((str(found[0]) if found else None, error))
        if error:
            raise ValueError(error)
        if path is None:
            return False
        state = found[1] if found else read_checkpoint(path)  # other ranks read the file rank 0 chose
        if int(state["world_size"]) != self.info.world_size or int(state["steps_per_epoch"]) != self.steps_per_epoch:
            log.warning("resuming with %d process(es), %d steps per epoch, from a checkpoint of %d, %d: the "
                        "data order changes", self.info.world_size, self.steps_per_epoch,
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
        self.pos = Position(epoch=int(state["epoch"]), step_in_epoch=int(state["step_in_epoch"]),
                            global_step=int(state["global_step"]), best_top1=float(state["best_top1"]),
                            epoch_sums=dict(state["epoch_sums"]))
        if self.pos.step_in_epoch >= self.steps_per_epoch:
            self.pos.step_in_epoch = self.steps_per_epoch
        rngs = state.get("rng") or []
        if len(rngs) == self.info.world_size:
            restore_rng(rngs[self.info.rank])
        else:
            dist_utils.seed_everything(int(self.cfg.SEED) + self.pos.global_step, self.info.rank)
        log.info("=> resumed from %s: epoch %d, step %d, global step %d", path, self.pos.epoch,
                 self.pos.step_in_epoch, self.pos.global_step)
        return True

    # ---- one epoch ---------------------------------------------------------------
    def _nonfinite(self, loss: torch.Tensor, where: str) -> bool:
        bad = dist_utils.any_rank(not bool(torch.isfinite(loss).item()), self.device)
        if bad and not self.cfg.TRAIN.SKIP_NONFINITE_LOSS:
            raise NonFiniteLossError(
                f"non-finite loss ({loss.item()}) at {where}; the weights were not updated by this step "
                "(last good state: the newest checkpoint). Lower TRAIN.LR, set TRAIN.CLIP_GRAD_NORM, "
                "or set TRAIN.SKIP_NONFINITE_LOSS True to skip such steps")
        return bad

    def train_epoch(self, end_epoch: int, max_steps: int) -> bool:
        """Train the rest of epoch self.pos.epoch; True when TRAIN.MAX_STEPS stopped it."""
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
        with bar:
            hit_limit = False
            t0 = time.perf_counter()  # step time includes waiting for the data
            for x, y, skipped in self.train_loader:
                x = x.to(self.device, non_blocking=True)
                y = y.to(self.device, non_blocking=True)
                sums["skipped_images"] += float(skipped.sum())
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
                where = f"epoch {pos.epoch} step {pos.step_in_epoch} (global step {pos.global_step})"
                self.optimizer.zero_grad(set_to_none=True)
                try:
                    skip = self._nonfinite(loss, where)
                except NonFiniteLossError:
                    if buffers:
                        torch._foreach_copy_(buffers, backup)
                    raise
                if not skip:
                    self.scaler.scale(loss).backward()
                    if clip > 0.0:
                        self.scaler.unscale_(self.optimizer)
                        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
                        # (with float16 the GradScaler itself skips steps whose gradients overflow)
                        if not self.scaler.is_enabled() and self._nonfinite(norm, f"{where} (gradient norm)"):
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
                lr = self.optimizer.param_groups[0]["lr"]
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_step / max(dt, 1e-9):.0f}")
                bar.update(1)
                if self.tb is not None:
                    self.tb.scalars({"train/loss": loss_value, "train/lr": lr}, pos.global_step)
                if self.info.is_main and int(cfg.PRINT_FREQ) > 0 and pos.step_in_epoch % int(cfg.PRINT_FREQ) == 0:
                    bar.clear()
                    log.info("epoch %d step %d/%d loss %.4f lr %.3e", pos.epoch + 1, pos.step_in_epoch,
                             self.steps_per_epoch, loss_value, lr)
                hit_limit = 0 < max_steps <= pos.global_step
                sums["seconds"] += time.perf_counter() - start
                start = time.perf_counter()
                if hit_limit:
                    break
                if every > 0 and pos.global_step % every == 0 and pos.step_in_epoch < self.steps_per_epoch:
                    self.save_checkpoint()
                    start = t0 = time.perf_counter()  # checkpoint time is not training time
        return hit_limit

    # ---- the run -----------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        cfg, info = self.cfg, self.info
        resumed = bool(cfg.TRAIN.AUTO_RESUME or cfg.TRAIN.CHECKPOINT) and self.try_resume()
        if not resumed:
            self.pos.epoch = int(cfg.TRAIN.BEGIN_EPOCH)
            if self.pos.epoch:
                # Start the per-iteration schedule where BEGIN_EPOCH puts it.
                self.scheduler.last_epoch = self.pos.epoch * self.steps_per_epoch - 1
                self.scheduler.step()
                self.pos.global_step = self.pos.epoch * self.steps_per_epoch
        end_epoch = int(cfg.TRAIN.END_EPOCH)
        max_steps = int(cfg.TRAIN.MAX_STEPS)
        if info.is_main:
            if self.metrics is not None:
                self.metrics.truncate_before(self.pos.epoch)
            self.tb = TensorBoard(self.run_dir, purge_step=self.pos.global_step + 1 if resumed else None)
            n_params = sum(p.numel() for p in self.model.parameters())
            log.info("=> %d train / %d val images, %d classes, %d steps per epoch x %d process(es), %.2fM params, "
                     "device %s", len(self.train_loader.dataset), len(self.val_loader.dataset),
                     len(self.train_loader.dataset.classes), self.steps_per_epoch, info.world_size,
                     n_params / 1e6, self.device)
        last: dict[str, Any] = {}
        stopped = 0 < max_steps <= self.pos.global_step
        while self.pos.epoch < end_epoch and not stopped:
            with torch.autograd.set_detect_anomaly(bool(cfg.TRAIN.DETECT_ANOMALY)):
                stopped = self.train_epoch(end_epoch, max_steps)
            last = self.end_epoch(partial=self.pos.step_in_epoch < self.steps_per_epoch)
        dist_utils.barrier()
        if info.is_main:
            atomic_save(self.model.state_dict(), self.run_dir / "final_state.pth")
            if self.ema is not None:
                atomic_save(self.ema.module.state_dict(), self.run_dir / "final_state_ema.pth")
            if self.tb is not None:
                self.tb.close()
            from .plots import plot_metrics

            if (self.run_dir / METRICS_FILE).exists():
                plot_metrics(self.run_dir / METRICS_FILE, self.run_dir / "curves.png", title=self.run_dir.name)
        return last

    def end_epoch(self, partial: bool = False) -> dict[str, Any]:
        """Evaluate, record and checkpoint. `partial` (TRAIN.MAX_STEPS stopped mid-epoch): the
        checkpoint stays mid-epoch so a longer run continues it, and redoes this record."""
        cfg, pos = self.cfg, self.pos
        last_epoch = pos.epoch + 1 >= int(cfg.TRAIN.END_EPOCH) or partial
        if pos.epoch < int(cfg.TRAIN.EVAL_BEGIN_EPOCH) and not last_epoch:
            result = {"loss": None, "top1": None, "top5": None}  # official: no evaluation before then
        else:
            result = evaluate(self.eval_model, self.val_loader, self.device, self.amp_dtype, self.channels_last)
        ema_result = None
        if self.ema is not None and result["top1"] is not None:
            ema_result = evaluate(self.ema.module, self.val_loader, self.device, self.amp_dtype, self.channels_last)
        sums = pos.epoch_sums
        loss_sum, samples, skipped_images, skipped_steps = dist_utils.all_reduce_sum(
            [sums["loss"], sums["samples"], sums["skipped_images"], sums["skipped_steps"]], self.device)
        seconds = sums["seconds"]
        steps_done = pos.step_in_epoch
        images = steps_done * int(cfg.TRAIN.BATCH_SIZE_PER_GPU) * self.info.world_size
        record = {
            "epoch": pos.epoch,
            "global_step": pos.global_step,
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": loss_sum / samples if samples else float("nan"),
            "val_loss": result["loss"],
            "val_top1": result["top1"],
            "val_top5": result["top5"],
            "images_per_s": images / seconds if seconds > 0 else 0.0,
            "epoch_seconds": seconds,
        }
        if ema_result is not None:
            record.update(val_loss_ema=ema_result["loss"], val_top1_ema=ema_result["top1"],
                          val_top5_ema=ema_result["top5"])
        if skipped_images:
            record["skipped_images"] = int(skipped_images)
            log.warning("epoch %d: %d unreadable training image(s) skipped (DATASET.SKIP_UNREADABLE)",
                        pos.epoch + 1, int(skipped_images))
        if skipped_steps:
            record["skipped_steps"] = int(skipped_steps)
        evaluated = result["top1"] is not None
        is_best = evaluated and result["top1"] > pos.best_top1
        if is_best:
            pos.best_top1 = result["top1"]
        if self.info.is_main:
            val = (f"val loss {result['loss']:.4f} top-1 {result['top1']:.2f}% top-5 {result['top5']:.2f}%"
                   if evaluated else f"not evaluated (TRAIN.EVAL_BEGIN_EPOCH {cfg.TRAIN.EVAL_BEGIN_EPOCH})")
            ema_text = f" | EMA top-1 {ema_result['top1']:.2f}%" if ema_result else ""
            log.info("=> epoch %d: train loss %.4f | %s | %.0f img/s%s", pos.epoch + 1, record["train_loss"], val,
                     record["images_per_s"], ema_text)
            self.metrics.append(record)
            if self.tb is not None:
                scalars = {"train/epoch_loss": record["train_loss"], "train/images_per_s": record["images_per_s"]}
                if evaluated:
                    scalars.update({"val/loss": result["loss"], "val/top1": result["top1"], "val/top5": result["top5"]})
                self.tb.scalars(scalars, pos.epoch + 1)
            if is_best:
                atomic_save(self.model.state_dict(), self.run_dir / "model_best.pth")
            if cfg.TRAIN.SAVE_ALL_MODELS and not partial:
                atomic_save(self.model.state_dict(), self.run_dir / f"model_{pos.epoch}.pth")
        if not partial:
            # The epoch is done: the checkpoint points at the start of the next one.
            pos.epoch += 1
            pos.step_in_epoch = 0
            pos.epoch_sums = Position().epoch_sums
        self.save_checkpoint()
        return record


def train(cfg: Any, run_dir: str | os.PathLike, info: Optional[dist_utils.DistInfo] = None,
          model_factory: Optional[Callable[[Any], nn.Module]] = None) -> dict[str, Any]:
    """Run the configured training in this process; returns the last epoch's metrics."""
    info = info or dist_utils.init_distributed()
    trainer = Trainer(cfg, run_dir, info, model_factory)
    return trainer.fit()
