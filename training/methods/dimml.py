"""DI-MML (Fan et al., ACM MM 2024) and its ablations.

Stage "encoders" (detached): modality i's loss (Eq. 7) is
    L_i = CE(psi_i(h_i), y) + lambda_s CE(SClf(h_i), y) + lambda_D L_DUC_i
with one linear S-Clf shared by both modalities and DUC (Eq. 6) pulling i's sub-vector on the
dims ineffective for i and effective for j toward j's (detached). No term of L_i reaches the
other encoder. Dimension separation (Eq. 3-5) runs on the train features after `warmup`
epochs, again every `sep_every` epochs (0: once, as the paper).
Stage "fusion": encoders frozen (eval, no grad), the fusion head trained with CE.
Inference: certainty-aware logit weighting of audio, visual and fusion logits (Eq. 8-9).

Ablations (paper Table 3), same code with other defaults:
    mmclf       two-stage only (TS = "MM Clf"): lambda_s = lambda_D = 0, fused output
    dimml-sclf  TS + S-Clf: lambda_D = 0, fused output
    dimml-duc   TS + S-Clf + DUC, fused output (no logit weighting)
    dimml       TS + S-Clf + DUC + LW
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from training.losses import DUC_DISTANCES, DUC_TEMPERATURE, duc_loss, separate_dimensions, transfer_dimensions
from training.methods.base import Batch, Context, HParams, Method, StepResult, ce, register

# The paper separates dimensions after 20 of 150 epochs; other run lengths keep the proportion.
WARMUP_FRACTION = 20 / 150


@dataclass
class DIMMLConfig(HParams):
    lambda_s: float = 1.0               # S-Clf weight (Eq. 7)
    lambda_d: float = 1.0               # DUC weight (Eq. 7)
    warmup: int | None = None           # epochs before dimension separation; None: 20/150 of the epochs
    sep_every: int = 0                  # re-separate every n epochs after warmup; 0: once (the paper)
    duc_distance: str = "euclidean"     # "euclidean" (the paper) or "dot" (the authors' code)
    duc_temperature: float | None = None  # None: training.losses.DUC_TEMPERATURE[distance]

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
    weighting = True
    description = "DI-MML: detached encoders + S-Clf + DUC, frozen-encoder fusion, certainty-aware weighting"

    def __init__(self, model, hp: DIMMLConfig, num_classes: int):
        super().__init__(model, hp, num_classes)
        if hp.lambda_s > 0:
            self.extras["sclf"] = nn.Linear(model.audio.head.in_features, num_classes)
        self.dims: dict[str, torch.Tensor] | None = None   # DUC transfer dims per student modality

    def trainable(self, stage: str) -> dict[str, nn.Module]:
        if stage == "encoders":
            return {"audio": self.model.audio, "visual": self.model.visual, **self.extras}
        return {"fusion": self.model.fusion}

    def outputs(self, stage: str) -> tuple[str, ...]:
        return ("audio", "visual") if stage == "encoders" else ("audio", "visual", "fusion")

    def on_epoch_start(self, stage: str, epoch: int, ctx: Context) -> None:
        hp = self.hp
        if stage != "encoders" or hp.lambda_d <= 0 or epoch < hp.warmup:
            return
        due = self.dims is None or (hp.sep_every > 0 and (epoch - hp.warmup) % hp.sep_every == 0)
        if not due:
            return
        dims = None
        feats = ctx.features("train")    # rank 0 only computes; the dims are broadcast
        if feats is not None:
            k = self.num_classes
            eff_a = separate_dimensions(feats["audio"], feats["labels"], k)
            eff_v = separate_dimensions(feats["visual"], feats["labels"], k)
            dims = transfer_dimensions(eff_a, eff_v)
            ctx.log(f"dimension separation at epoch {epoch}: effective audio {int(eff_a.sum())}, "
                    f"visual {int(eff_v.sum())} of {eff_a.numel()}; DUC dims audio<-visual "
                    f"{dims['audio'].numel()}, visual<-audio {dims['visual'].numel()}")
        self.dims = {k: v.to(ctx.device) for k, v in ctx.broadcast(dims).items()}

    def step(self, stage: str, batch: Batch, nets) -> StepResult:
        y = batch.label
        if stage == "fusion":
            with torch.no_grad():
                h_a, z_a = nets["audio"](batch.audio)
                h_v, z_v = nets["visual"](batch.visual)
            z_f = nets["fusion"](h_a, h_v)
            return StepResult({"fused": ce(z_f, y)}, {"audio": z_a, "visual": z_v, "fusion": z_f})

        hp = self.hp
        h_a, z_a = nets["audio"](batch.audio)
        h_v, z_v = nets["visual"](batch.visual)
        loss_a, loss_v = ce(z_a, y), ce(z_v, y)
        logs = {}
        if "sclf" in nets:
            # one call on both modalities' features: a DDP module must run once per step
            s_a, s_v = nets["sclf"](torch.cat([h_a, h_v])).split(h_a.shape[0])
            sclf_a, sclf_v = ce(s_a, y), ce(s_v, y)
            loss_a, loss_v = loss_a + hp.lambda_s * sclf_a, loss_v + hp.lambda_s * sclf_v
            logs.update(sclf_audio=sclf_a.detach(), sclf_visual=sclf_v.detach())
        if self.dims is not None and hp.lambda_d > 0:
            kw = dict(temperature=hp.duc_temperature, distance=hp.duc_distance)
            duc_a = duc_loss(h_a, h_v, self.dims["audio"], **kw)     # teacher detached inside
            duc_v = duc_loss(h_v, h_a, self.dims["visual"], **kw)
            loss_a, loss_v = loss_a + hp.lambda_d * duc_a, loss_v + hp.lambda_d * duc_v
            logs.update(duc_audio=duc_a.detach(), duc_visual=duc_v.detach())
        return StepResult({"audio": loss_a, "visual": loss_v}, {"audio": z_a, "visual": z_v}, logs)

    def state_dict(self) -> dict:
        return {"dims": None if self.dims is None else {k: v.cpu() for k, v in self.dims.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.dims = state.get("dims")


@register
class DIMMLNoLW(DIMML):
    name = "dimml-duc"
    weighting = False
    description = "DI-MML ablation TS + S-Clf + DUC: fused output, no logit weighting"


@register
class DIMMLSClf(DIMML):
    name = "dimml-sclf"
    weighting = False
    defaults = {"lambda_d": 0.0}
    description = "DI-MML ablation TS + S-Clf: no DUC, fused output"


@register
class MMClf(DIMML):
    name = "mmclf"
    weighting = False
    defaults = {"lambda_s": 0.0, "lambda_d": 0.0}
    description = "two-stage only (MM Clf): independent encoders, then a fusion head on frozen features"
