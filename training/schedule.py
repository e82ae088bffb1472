"""The learning-rate schedule of a stage: a base rate decayed by gamma every `step_every` epochs.

    s = stage_schedule(cfg, "encoders")     # the paper: 1e-3, x0.1 every 70 epochs, 150 epochs
    s.factor(epoch)                         # gamma ** (epoch // step_every): what every group's rate is scaled by
    s.lr(epoch)                             # base_lr * factor(epoch): the rate logged

A parameter group's rate at a step is its own base rate (the stage's, or the method's per-group
rate: MSLR) x factor(epoch) x the method's per-step scale (MLB).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from training.config import TrainConfig


@dataclass(frozen=True)
class StageSchedule:
    epochs: int
    base_lr: float
    step_every: int
    gamma: float

    def factor(self, epoch: int) -> float:
        return self.gamma ** (epoch // self.step_every)

    def lr(self, epoch: int) -> float:
        return self.base_lr * self.factor(epoch)


def stage_schedule(cfg: TrainConfig, stage: str) -> StageSchedule:
    """The fusion stage of two-stage methods runs on its own (stage2) schedule; every other stage on the run's."""
    if stage == "fusion":
        return StageSchedule(cfg.stage2_epochs, cfg.stage2_lr, cfg.stage2_step, cfg.lr_gamma)
    return StageSchedule(cfg.epochs, cfg.lr, cfg.lr_step_epoch, cfg.lr_gamma)


def set_learning_rates(optimizer: torch.optim.Optimizer, factor: float, scales: dict[str, float]) -> None:
    """Each group: its base rate x the schedule's factor x the method's scale for it (1 if none)."""
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * factor * scales.get(g["name"], 1.0)


__all__ = ["StageSchedule", "stage_schedule", "set_learning_rates"]
