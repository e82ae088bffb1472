"""DGL, Disentangled Gradient Learning (ICCV 2025; code github.com/shicaiwei123/ICCV2025-GDL).

    L_d   = CE(fusion(h_a.detach(), h_v.detach()))      updates only the fusion head
    L_a   = CE(fusion(h_a, 0)),  L_v = CE(fusion(0, h_v))  update only their own encoder
    total = L_d + alpha (L_a + L_v)
The unimodal losses run the same fusion head with the other modality's features zeroed; their
gradient inside the fusion head is discarded (the paper zeroes it before the fused backward).
Here the unimodal passes use the head's parameters detached (torch.func.functional_call), so
one backward gives each parameter exactly its gradient. Exported unimodal heads: that same
zeroed-fusion prediction written as a Linear layer (exact for concat, sum and FiLM fusion);
for gated fusion, which is not affine in one input, linear probes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.func import functional_call

from training.methods.base import (MODALITIES, Batch, HParams, Method, StepResult, ce, fit_probe_heads,
                                   register, set_linear, zero_modality_head)


@dataclass
class DGLConfig(HParams):
    alpha: float = 4.0    # weight of the unimodal losses (the authors' default and CREMA-D setting)


@register
class DGL(Method):
    name = "dgl"
    stages = ("joint",)
    hparams_cls = DGLConfig
    description = "DGL: fused loss on detached features trains the fusion; zeroed-modality losses train the encoders"

    def __init__(self, model, hp: DGLConfig, num_classes: int):
        super().__init__(model, hp, num_classes)
        self.unimodal_heads = "fusion"

    def trainable(self, stage: str) -> dict[str, nn.Module]:
        return {"audio_encoder": self.model.audio.encoder, "visual_encoder": self.model.visual.encoder,
                "fusion": self.model.fusion}

    def outputs(self, stage: str) -> tuple[str, ...]:
        return ("audio", "visual", "fusion")

    def step(self, stage: str, batch: Batch, nets) -> StepResult:
        y = batch.label
        h_a = nets["audio_encoder"](batch.audio)
        h_v = nets["visual_encoder"](batch.visual)
        z_f = nets["fusion"](h_a.detach(), h_v.detach())
        # unimodal passes through the same head, its parameters cut from the graph
        fusion = self.model.fusion
        frozen = {k: p.detach() for k, p in fusion.named_parameters()}
        za, zv = torch.zeros_like(h_a), torch.zeros_like(h_v)
        z_u = functional_call(fusion, frozen, (torch.cat([h_a, za]), torch.cat([zv, h_v])))
        z_ua, z_uv = z_u.split(h_a.shape[0])
        a = self.hp.alpha
        return StepResult({"fused": ce(z_f, y), "audio": a * ce(z_ua, y), "visual": a * ce(z_uv, y)},
                          {"audio": z_ua, "visual": z_uv, "fusion": z_f})

    def finalize(self, ctx):
        dim = self.model.audio.head.in_features
        for side in MODALITIES:
            head = zero_modality_head(self.model.fusion, side, dim)
            if head is None:
                fit_probe_heads(self.model, ctx, (side,))
                self.unimodal_heads = "probe"
            else:
                set_linear(getattr(self.model, side).head, head.weight, head.bias)
        return self.model
