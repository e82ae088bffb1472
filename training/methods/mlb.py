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
from training.methods.base import MODALITIES, Batch, HParams, Method, StepResult, ce, register, true_class_probs


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
        return {"audio": self.model.audio, "visual": self.model.visual, "fusion": self.model.fusion}

    def param_groups(self, stage: str) -> list[dict]:
        groups = []
        for m in MODALITIES:
            branch = getattr(self.model, m)
            groups += [{"name": m, "params": list(branch.encoder.parameters())},
                       {"name": f"{m}_head", "params": list(branch.head.parameters())}]
        return groups + [{"name": "fusion", "params": list(self.model.fusion.parameters())}]

    def on_epoch_start(self, stage: str, epoch: int, ctx) -> None:
        self._ctx = ctx   # for the all-reduce of the scores in step

    def step(self, stage: str, batch: Batch, nets) -> StepResult:
        y = batch.label
        h_a, z_a = nets["audio"](batch.audio)
        h_v, z_v = nets["visual"](batch.visual)
        z_f = nets["fusion"](h_a, h_v)
        # s_i summed over the batch (and over ranks): the ratio r_i only depends on sums
        s = torch.stack([true_class_probs(z_a, y).sum(), true_class_probs(z_v, y).sum()])
        if self._ctx is not None:
            s = self._ctx.all_reduce_sum(s)
        self._scales = mlb_coefficients({"audio": s[0:1], "visual": s[1:2]}, self.hp.alpha,
                                        self.hp.beta_max, mode=self.hp.mode)
        return StepResult({"fused": ce(z_f, y), "audio": ce(z_a, y), "visual": ce(z_v, y)},
                          {"audio": z_a, "visual": z_v, "fusion": z_f},
                          {"k_audio": self._scales["audio"], "k_visual": self._scales["visual"]})

    def lr_scales(self) -> dict[str, float]:
        return dict(self._scales)
