"""MLB, Multi-Loss Balanced (Kontras et al., BMVC 2024).

L = CE(fused) + sum_i CE(head_i). After every backward, encoder i's learning rate is scaled by
k_i = 1 + (beta_i - 1) tanh(alpha (r_i - 1)) (training.losses.mlb_coefficients), where r_i
compares the other modalities' summed true-class softmax score on the batch with i's.
Only the encoders are scaled; heads and fusion keep the scheduled rate. Under DDP the scores
are summed over ranks first, so every rank applies the same k_i.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from training.losses import mlb_coefficients
from training.methods.base import Batch, HParams, Method, StepResult, ce, register, true_class_probs
from training.models import FUSION


@dataclass
class MLBConfig(HParams):
    # alpha 0.8: the authors' CREMA-D and AVE configs (github.com/kkontras/MLB); beta_max 10:
    # the paper's worked example (the released configs leave beta at the code's default of 2)
    alpha: float = 0.8
    beta_max: float = 10.0
    mode: str = "paper"       # "paper": Eq. 6 (beta_max when accelerating, else 2); "tanh": code default


@register
class MLB(Method):
    name = "mlb"
    stages = ("joint",)
    hparams_cls = MLBConfig
    description = "MLB: fused + unimodal CE, per-step encoder learning rates scaled by k_i"

    def __init__(self, model, hp: MLBConfig, num_classes: int):
        super().__init__(model, hp, num_classes)
        self._scales: dict[str, float] = {}
        self._ctx = None

    def trainable(self, stage: str) -> dict[str, nn.Module]:
        return {**{n: self.branch(n) for n in self.names}, FUSION: self.model.fusion}

    def param_groups(self, stage: str) -> list[dict]:
        """One group per encoder (named after its modality: the ones lr_scales scales), per head, and the fusion."""
        groups = []
        for n in self.names:
            branch = self.branch(n)
            # "<name>.head": a dot never occurs in a modality name, so groups cannot collide
            groups += [{"name": n, "params": list(branch.encoder.parameters())},
                       {"name": f"{n}.head", "params": list(branch.head.parameters())}]
        return groups + [{"name": FUSION, "params": list(self.model.fusion.parameters())}]

    def on_epoch_start(self, stage: str, epoch: int, ctx) -> None:
        self._ctx = ctx   # for the all-reduce of the scores in step

    def step(self, stage: str, batch: Batch, nets) -> StepResult:
        y = batch.label
        h, z = {}, {}
        for n in self.names:
            h[n], z[n] = nets[n](batch.inputs[n])
        z_f = nets[FUSION](*(h[n] for n in self.names))
        # s_i summed over the batch (and over ranks): the ratio r_i only depends on sums
        s = torch.stack([true_class_probs(z[n], y).sum() for n in self.names])
        if self._ctx is not None:
            s = self._ctx.all_reduce_sum(s)
        self._scales = mlb_coefficients({n: s[i:i + 1] for i, n in enumerate(self.names)}, self.hp.alpha,
                                        self.hp.beta_max, mode=self.hp.mode)
        return StepResult({FUSION: ce(z_f, y), **{n: ce(z[n], y) for n in self.names}},
                          {**z, FUSION: z_f}, {f"k_{n}": self._scales[n] for n in self.names})

    def lr_scales(self) -> dict[str, float]:
        return dict(self._scales)
