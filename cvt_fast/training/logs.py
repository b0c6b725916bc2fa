"""Run outputs of rank 0: the text log, metrics.jsonl and TensorBoard events.

metrics.jsonl has one JSON record per epoch (epoch, lr, train_loss, val_loss, val_top1,
val_top5 in percent, images_per_s, ...). On resume it is cut back to the epochs before
the resumed one, so a record is never duplicated.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

LOGGER_NAME = "cvt_fast.train"
METRICS_FILE = "metrics.jsonl"


class ConsoleHandler(logging.StreamHandler):
    """Writes through tqdm, which lifts an active progress bar off its line, prints the record on
    a line of its own and draws the bar again below it (a plain stream handler would append the
    record to the bar's unfinished line)."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:
            self.handleError(record)


def setup_logging(run_dir: Optional[str | os.PathLike], is_main: bool, log_name: str = "train.log") -> logging.Logger:
    """Rank 0 logs INFO to the console and to run_dir/log_name; other ranks warnings only.
    Raises OutputError naming the log file when it cannot be written."""
    from .outputs import writing

    logger = logging.getLogger(LOGGER_NAME)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    logger.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    console = ConsoleHandler(sys.stderr)
    console.setFormatter(fmt)
    logger.addHandler(console)
    if is_main and run_dir is not None:
        with writing(Path(run_dir) / log_name):
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            fh = logging.FileHandler(Path(run_dir) / log_name)
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    return logger


def close_logging() -> None:
    logger = logging.getLogger(LOGGER_NAME)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    records = []
    p = Path(path)
    if not p.exists():
        return records
    for line in p.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except ValueError:  # a line cut by a crash: drop it
            continue
    return records


class MetricsWriter:
    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / METRICS_FILE

    def truncate_before(self, epoch: int) -> None:
        """Keep only records of epochs < epoch (those a resumed run does not redo)."""
        kept = [r for r in read_metrics(self.path) if int(r.get("epoch", -1)) < epoch]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)

    def append(self, record: dict[str, Any]) -> None:
        """Add one record, durably. A failed write (full disk) is undone, so the file never keeps
        half a line that the next record would be glued to."""
        data = (json.dumps(record) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            size = os.fstat(fd).st_size
            try:
                written = 0
                while written < len(data):
                    written += os.write(fd, data[written:])
                os.fsync(fd)
            except OSError:
                try:
                    os.ftruncate(fd, size)
                except OSError:
                    pass  # read_metrics drops a cut line; the original error says what happened
                raise
        finally:
            os.close(fd)


class TensorBoard:
    """A SummaryWriter on rank 0 (a no-op elsewhere, or when tensorboard is missing)."""

    def __init__(self, run_dir: Optional[str | os.PathLike], purge_step: Optional[int] = None):
        self.writer = None
        if run_dir is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            logging.getLogger(LOGGER_NAME).warning("TensorBoard logging off: %s", err)
            return
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=purge_step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            try:
                for k, v in values.items():
                    self.writer.add_scalar(k, v, step)
            except OSError as err:
                self._give_up(err)

    def close(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except OSError as err:
                self._give_up(err)

    def _give_up(self, err: OSError) -> None:
        # TensorBoard only mirrors metrics.jsonl: a failed write there turns it off instead of
        # stopping one rank alone (the next checkpoint or metrics write stops the run properly).
        logging.getLogger(LOGGER_NAME).warning("TensorBoard logging off: %s", err)
        self.writer = None
