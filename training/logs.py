"""A run's messages (Python logging: "dimml.train" -> RUN/train.log and stderr) and scalars (TensorBoard).

Messages go through `logging.getLogger("dimml.train")`: while a run trains, a file handler writes
them to RUN/train.log ("YYYY-mm-dd HH:MM:SS message"), and, unless the application configured
logging itself (the root logger has handlers), a handler prints them above the progress bars.
Scalars: metrics.csv is always written by the trainer; `--logger tensorboard` also writes
per-step losses and learning rate and per-epoch metrics to RUN/tensorboard/ (one step = one
training batch, counted across stages, so curves of both stages line up).
"""
from __future__ import annotations

import logging
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

from tqdm import tqdm

LOGGER = logging.getLogger("dimml.train")
LOGGERS = ("csv", "tensorboard")
TB_DIR = "tensorboard"
LOG_FORMAT, DATE_FORMAT = "%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"


class TqdmHandler(logging.Handler):
    """Messages to stderr through tqdm.write, so they do not break a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:   # logging must never kill training
            self.handleError(record)


def attach(log_file: Path) -> list[logging.Handler]:
    """Handlers for one run (remove them with `detach`): the log file, and stderr if nobody else prints."""
    handlers: list[logging.Handler] = []
    file = logging.FileHandler(log_file, mode="a", delay=True)   # opened on the first message
    file.setFormatter(logging.Formatter(LOG_FORMAT, DATE_FORMAT))
    handlers.append(file)
    if not logging.getLogger().handlers:   # an application that configured logging gets the records itself
        console = TqdmHandler()
        console.setFormatter(logging.Formatter("%(message)s"))
        handlers.append(console)
    for h in handlers:
        LOGGER.addHandler(h)
    if LOGGER.level == logging.NOTSET:
        LOGGER.setLevel(logging.INFO)
    return handlers


def detach(handlers: list[logging.Handler]) -> None:
    for h in handlers:
        LOGGER.removeHandler(h)
        h.close()


class Scalars:
    """Where scalars go besides metrics.csv: nowhere (csv)."""

    enabled = False

    def write(self, step: int, values: Mapping[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardScalars(Scalars):
    """Scalars as TensorBoard events in RUN/tensorboard/ (torch.utils.tensorboard)."""

    enabled = True

    def __init__(self, run_dir: Path, *, fresh: bool):
        from dimml.extras import check
        check("tensorboard", what="--logger tensorboard", extra="tensorboard")
        self.dir = Path(run_dir) / TB_DIR
        if fresh:   # a new or forced run: no curves of an earlier one
            shutil.rmtree(self.dir, ignore_errors=True)
        self.resumed = not fresh
        self.writer = None

    def write(self, step: int, values: Mapping[str, float]) -> None:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter
            # resumed: drop the events of the interrupted epoch, which is trained again from its start
            self.writer = SummaryWriter(str(self.dir), purge_step=step if self.resumed else None)
        for tag, v in values.items():
            self.writer.add_scalar(tag, float(v.detach()) if hasattr(v, "detach") else float(v), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def open_scalars(kind: str, run_dir: Path, *, fresh: bool) -> Scalars:
    """The scalar logger `--logger` names (csv: metrics.csv only; tensorboard: also event files)."""
    if kind not in LOGGERS:
        raise ValueError(f"logger must be one of {LOGGERS}, got {kind!r}")
    return TensorBoardScalars(run_dir, fresh=fresh) if kind == "tensorboard" else Scalars()
