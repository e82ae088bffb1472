"""A run folder's state between epochs: checkpoint.pt written after every epoch, and resuming.

RUN/checkpoint.pt (atomic) holds the modules, the method's state (e.g. DI-MML's separated
dimensions), the optimizer, the epoch history and where to go on; it must match the run's
configuration (`fingerprint`) to be resumed, and is removed once the run is complete.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from training.config import VOLATILE
from training.run import CONFIG, REPORT, WEIGHTS, atomic_torch_save

CHECKPOINT, METRICS, LOG = "checkpoint.pt", "metrics.csv", "train.log"
RUN_FILES = (CHECKPOINT, METRICS, LOG, CONFIG, WEIGHTS, REPORT, "curves.png", "confusion.png")
VERSION = 1


def start_state(out: Path, force: bool) -> str:
    """"finished", "resume" or "fresh" for a run folder (cleaning it up for a fresh or forced start)."""
    done = all((out / f).is_file() for f in (WEIGHTS, REPORT)) and not (out / CHECKPOINT).exists()
    if force:
        for f in RUN_FILES:
            (out / f).unlink(missing_ok=True)
        return "fresh"
    if done:
        tqdm.write(f"{out}: already finished (report.json and model.pt exist); pass --force to retrain",
                   file=sys.stderr)
        return "finished"
    if (out / CHECKPOINT).is_file():
        return "resume"
    for f in (METRICS, LOG):   # leftovers of a run killed before its first checkpoint
        (out / f).unlink(missing_ok=True)
    return "fresh"


def fingerprint(config: dict) -> dict:
    """The part of a run's config.json a checkpoint must match to be resumed."""
    fp = {k: v for k, v in config.items() if k not in ("unimodal_heads", "method_record")}
    fp["train"] = {k: v for k, v in config["train"].items() if k not in VOLATILE}
    # the dataset's description (sources, notes) follows from its files: a checkpoint matches without it
    fp["data"] = {k: v for k, v in config["data"].items() if k not in ("sources", "notes")}
    return json.loads(json.dumps(fp))


def save(out: Path, *, config_fingerprint: dict, stage_index: int, epoch: int, last: bool,
         optimizer: torch.optim.Optimizer, modules: dict[str, torch.nn.Module], method_state: dict,
         history: list[dict]) -> None:
    """After an epoch: where to go on (the next stage after its last epoch) and everything to get there."""
    atomic_torch_save(out / CHECKPOINT, {
        "version": VERSION, "config": config_fingerprint,
        "stage_index": stage_index + 1 if last else stage_index, "epoch": 0 if last else epoch + 1,
        "optimizer": None if last else optimizer.state_dict(),
        "modules": {n: m.state_dict() for n, m in modules.items()}, "method": method_state,
        "history": history, "rng": {"torch": torch.get_rng_state()}})


def load(path: Path, config_fingerprint: dict) -> tuple[dict | None, str | None]:
    """(checkpoint, None), or (None, why it cannot be resumed)."""
    ck = torch.load(path, map_location="cpu", weights_only=True)
    if ck["config"] != config_fingerprint:
        return None, (f"{path}: checkpoint of a different configuration; rerun with the same options, "
                      f"or pass --force to start over (or choose another --out)")
    return ck, None


__all__ = ["CHECKPOINT", "METRICS", "LOG", "RUN_FILES", "start_state", "fingerprint", "save", "load"]
