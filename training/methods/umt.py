"""UMT, uni-modal teacher (Du et al., 2023): distil unimodal teachers into the multimodal encoders.

    loss = CE(fused) + lam * sum_m MSE(h_m, teacher_m(x_m))
on the pooled encoder features (the fusion head's inputs), MSE averaged over batch and features
(BalanceBenchmark's UMT_trainer: nn.MSELoss, `scaling` = lam = 10, always on). The teachers are
the encoders of a finished `unimodal` (or `preds-avg`) run with the same modalities and preset,
named by `--set teachers=RUN`; they are loaded frozen: eval mode (BalanceBenchmark leaves them
in train mode, whose batch statistics would make the targets depend on the batch), no gradient,
not checkpointed (rebuilt from RUN on resumption) and not exported. A missing, unfinished or
incompatible teacher run is an error at configuration time (existence) and at method
construction (modalities, architecture, classes), before any training. `compare` trains the
unimodal run once per seed and passes it. Unimodal heads: the fusion head's slices (concat/sum),
else linear probes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from training.methods.base import Batch, HParams, SliceHeads, StepResult, ce, register
from training.models import FUSION

TEACHER_METHODS = ("unimodal", "preds-avg")
TEACHER_PREFIX = "teacher."   # frozen module names: "teacher.<modality>" (a dot never occurs in a modality name)


@dataclass
class UMTConfig(HParams):
    teachers: str = ""     # a finished unimodal run folder
    lam: float = 10.0      # distillation weight (BalanceBenchmark's scaling)

    def resolve(self, epochs: int) -> None:
        if not self.teachers:
            raise ValueError("method 'umt' needs unimodal teachers: --set teachers=RUN naming a finished "
                             "`unimodal` run with the same modalities and preset")
        self.teachers = os.path.abspath(self.teachers)
        run = Path(self.teachers)
        if not (run / "model.pt").is_file() or not (run / "config.json").is_file():
            raise ValueError(f"umt teachers {run}: not a finished run (config.json and model.pt missing)")
        if self.lam < 0:
            raise ValueError("umt lam must be >= 0")


def load_teachers(path: str, model, num_classes: int) -> dict[str, nn.Module]:
    """The teacher run's encoders by modality; ValueError unless it is a finished unimodal run of this model."""
    from training.run import load_run

    try:
        run = load_run(path)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"umt teachers: {e}") from e
    if run.method not in TEACHER_METHODS:
        raise ValueError(f"umt teachers {path}: a {run.method!r} run; the teachers come from a "
                         f"{' or '.join(TEACHER_METHODS)} run")
    if run.report is None:
        raise ValueError(f"umt teachers {path}: the run is not finished (no report.json)")
    mine = {n: model.branches[n] for n in model.names}
    if run.model.names != model.names:
        raise ValueError(f"umt teachers {path}: modalities {list(run.model.names)}, the run trains "
                         f"{list(model.names)}")
    if run.model_cfg.num_classes != num_classes:
        raise ValueError(f"umt teachers {path}: {run.model_cfg.num_classes} classes, the run has {num_classes}")
    teachers = {}
    for n in model.names:
        theirs, ours = run.model.branches[n].encoder, mine[n].encoder
        shapes = lambda m: [(k, tuple(v.shape)) for k, v in m.state_dict().items()]
        if type(theirs) is not type(ours) or shapes(theirs) != shapes(ours):
            raise ValueError(f"umt teachers {path}: the {n!r} encoder differs from this run's (another "
                             f"preset or preprocessing?)")
        teachers[n] = theirs
    return teachers


@register
class UMT(SliceHeads):
    name = "umt"
    hparams_cls = UMTConfig
    teachers_from = "unimodal"
    description = "UMT: fused CE + lam * MSE to frozen unimodal teachers' features"

    def __init__(self, model, hp: UMTConfig, num_classes: int):
        super().__init__(model, hp, num_classes)
        for n, enc in load_teachers(hp.teachers, model, num_classes).items():
            self.frozen[TEACHER_PREFIX + n] = enc.eval().requires_grad_(False)

    def step(self, stage: str, batch: Batch, nets) -> StepResult:
        y = batch.label
        h, z = self.forward(batch, nets)
        losses = {FUSION: ce(z, y)}
        for n, x in zip(self.names, h):
            with torch.no_grad():
                target = nets[TEACHER_PREFIX + n](batch.inputs[n])
            losses[f"distill_{n}"] = self.hp.lam * nn.functional.mse_loss(x.float(), target.float())
        return StepResult(losses, self.slice_outputs(h, z))
