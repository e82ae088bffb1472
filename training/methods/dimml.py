"""DI-MML (Fan et al., ACM MM 2024) and its ablations.

Stage "encoders" (detached): modality i's loss (Eq. 7) is
    L_i = CE(psi_i(h_i), y) + lambda_s CE(SClf(h_i), y) + lambda_D L_DUC_i
with one linear S-Clf shared by all modalities and L_DUC_i = sum over j != i of DUC (Eq. 6)
pulling i's sub-vector on the dims ineffective for i and effective for j toward j's
(detached): one term per ordered pair (i <- j), so for two modalities exactly the paper's
loss. No term of L_i reaches another encoder. Dimension separation (Eq. 3-5) runs per
modality on the train features after `warmup` epochs, again every `sep_every` epochs (0:
once, as the paper).
Stage "fusion": encoders frozen (eval, no grad), the fusion head trained with CE.
Inference: the output chosen on validation (training.evaluate / dimml.weighting.select_output)
among the fusion head, each unimodal head, the certainty-aware weighting of the M unimodal
logits and the fusion logits (Eq. 8-9) and a fitted weighting; `--final-output paper-lw` with a fixed
`--lw-temperature` forces exactly the paper's Eq. 8-9.
DUC distance (training.losses): the released code's unnormalised dot product at T = 50 by
default; the paper's plain Euclidean and squared Euclidean are options.

Ablations (paper Table 3), same code with other defaults:
    mmclf       two-stage only (TS = "MM Clf"): lambda_s = lambda_D = 0, fused output
    dimml-sclf  TS + S-Clf: lambda_D = 0, fused output
    dimml-duc   TS + S-Clf + DUC, the fusion head answers (no logit weighting)
    dimml       TS + S-Clf + DUC + LW
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from training.losses import (
    DUC_DEFAULT_DISTANCE,
    DUC_DISTANCES,
    DUC_TEMPERATURE,
    duc_loss,
    separate_dimensions,
    transfer_dimensions,
)
from training.methods.base import Batch, Context, HParams, Method, StepResult, ce, register
from training.models import FUSION

# The paper separates dimensions after 20 of 150 epochs; other run lengths keep the proportion.
WARMUP_FRACTION = 20 / 150


@dataclass
class DIMMLConfig(HParams):
    lambda_s: float = 1.0               # S-Clf weight (Eq. 7)
    lambda_d: float = 1.0               # DUC weight (Eq. 7)
    warmup: int | None = None           # epochs before dimension separation; None: 20/150 of the epochs
    sep_every: int = 0                  # re-separate every n epochs after warmup; 0: once (the paper)
    duc_distance: str = DUC_DEFAULT_DISTANCE   # "dot" (the released code), "euclidean" (the paper), "sqeuclidean"
    duc_temperature: float | None = None       # None: training.losses.DUC_TEMPERATURE[distance] (dot 50)

    def resolve(self, epochs: int) -> None:
        if self.duc_distance not in DUC_DISTANCES:
            raise ValueError(f"duc_distance must be one of {DUC_DISTANCES}, got {self.duc_distance!r}")
        if self.warmup is None:
            self.warmup = max(1, round(epochs * WARMUP_FRACTION))
        if self.duc_temperature is None:
            self.duc_temperature = DUC_TEMPERATURE[self.duc_distance]
        if self.sep_every < 0 or self.warmup < 0:
            raise ValueError("warmup and sep_every must be >= 0")


@register
class DIMML(Method):
    name = "dimml"
    stages = ("encoders", "fusion")
    hparams_cls = DIMMLConfig
    description = "DI-MML: detached encoders + S-Clf + DUC, frozen-encoder fusion, certainty-aware weighting"

    def __init__(self, model, hp: DIMMLConfig, num_classes: int):
        super().__init__(model, hp, num_classes)
        if hp.lambda_s > 0:
            self.extras["sclf"] = nn.Linear(self._dim(), num_classes)
        # DUC transfer dims: {student: {teacher: dims}}
        self.dims: dict[str, dict[str, torch.Tensor]] | None = None

    def _dim(self) -> int:
        return self.branch(self.names[0]).head.in_features

    def trainable(self, stage: str) -> dict[str, nn.Module]:
        if stage == "encoders":
            return {**{n: self.branch(n) for n in self.names}, **self.extras}
        return {FUSION: self.model.fusion}

    def outputs(self, stage: str) -> tuple[str, ...]:
        return self.names if stage == "encoders" else (*self.names, FUSION)

    def on_epoch_start(self, stage: str, epoch: int, ctx: Context) -> None:
        hp = self.hp
        if stage != "encoders" or hp.lambda_d <= 0 or epoch < hp.warmup:
            return
        due = self.dims is None or (hp.sep_every > 0 and (epoch - hp.warmup) % hp.sep_every == 0)
        if not due:
            return
        dims = None
        got = ctx.features("train")    # rank 0 only computes; the dims are broadcast
        if got is not None:
            feats, labels = got
            eff = {n: separate_dimensions(feats[n], labels, self.num_classes) for n in self.names}
            dims = transfer_dimensions(eff)
            total = next(iter(eff.values())).numel()
            ctx.log(f"dimension separation at epoch {epoch}: effective "
                    + ", ".join(f"{n} {int(e.sum())}" for n, e in eff.items()) + f" of {total}; DUC dims "
                    + ", ".join(f"{i}<-{j} {d.numel()}" for i, row in dims.items() for j, d in row.items()))
        self.dims = {i: {j: d.to(ctx.device) for j, d in row.items()} for i, row in ctx.broadcast(dims).items()}

    def step(self, stage: str, batch: Batch, nets) -> StepResult:
        y = batch.label
        if stage == "fusion":
            h, z = {}, {}
            with torch.no_grad():
                for n in self.names:
                    h[n], z[n] = nets[n](batch.inputs[n])
            z_f = nets[FUSION](*(h[n] for n in self.names))
            return StepResult({FUSION: ce(z_f, y)}, {**z, FUSION: z_f})

        hp = self.hp
        h, z = {}, {}
        for n in self.names:
            h[n], z[n] = nets[n](batch.inputs[n])
        loss = {n: ce(z[n], y) for n in self.names}
        logs = {}
        if "sclf" in nets:
            # one call on every modality's features: a DDP module must run once per step
            s_all = nets["sclf"](torch.cat([h[n] for n in self.names])).split(y.shape[0])
            for n, s_n in zip(self.names, s_all):
                term = ce(s_n, y)
                loss[n] = loss[n] + hp.lambda_s * term
                logs[f"sclf_{n}"] = term.detach()
        if self.dims is not None and hp.lambda_d > 0:
            kw = dict(temperature=hp.duc_temperature, distance=hp.duc_distance)
            for i in self.names:
                # teacher detached inside duc_loss: no term of L_i reaches encoder j
                duc = sum(duc_loss(h[i], h[j], self.dims[i][j], **kw) for j in self.names if j != i)
                loss[i] = loss[i] + hp.lambda_d * duc
                logs[f"duc_{i}"] = duc.detach()
        return StepResult(loss, z, logs)

    def state_dict(self) -> dict:
        return {"dims": None if self.dims is None else
                {i: {j: d.cpu() for j, d in row.items()} for i, row in self.dims.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.dims = state.get("dims")


@register
class DIMMLNoLW(DIMML):
    name = "dimml-duc"
    chooses_output = False   # a Table 3 ablation: the fusion head answers
    description = "DI-MML ablation TS + S-Clf + DUC: the fusion head answers, no logit weighting"


@register
class DIMMLSClf(DIMML):
    name = "dimml-sclf"
    chooses_output = False   # a Table 3 ablation: the fusion head answers
    defaults = {"lambda_d": 0.0}
    description = "DI-MML ablation TS + S-Clf: no DUC, the fusion head answers"


@register
class MMClf(DIMML):
    name = "mmclf"
    chooses_output = False   # a Table 3 ablation: the fusion head answers
    defaults = {"lambda_s": 0.0, "lambda_d": 0.0}
    description = "two-stage only (MM Clf): independent encoders, then a fusion head on frozen features"
