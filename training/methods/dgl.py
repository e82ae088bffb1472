"""DGL, Disentangled Gradient Learning (ICCV 2025; code github.com/shicaiwei123/ICCV2025-GDL).

    L_d   = CE(fusion(h_1.detach(), ..., h_M.detach()))      updates only the fusion head
    L_i   = CE(fusion(0, ..., h_i, ..., 0))                   updates only encoder i
    total = L_d + alpha sum_i L_i
The unimodal losses run the same fusion head with the other modalities' features zeroed; their
gradient inside the fusion head is discarded (the paper zeroes it before the fused backward).
Here the unimodal passes use the head's parameters detached (torch.func.functional_call), so
one backward gives each parameter exactly its gradient. Exported unimodal heads: that same
zeroed-fusion prediction written as a Linear layer (exact for concat, sum and FiLM fusion);
for gated fusion, which is not affine in its first input, linear probes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.func import functional_call

from training.methods.base import (
    Batch,
    HParams,
    Method,
    StepResult,
    ce,
    fit_probe_heads,
    register,
    set_linear,
    zero_modality_head,
)
from training.models import FUSION


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
        return {**self.encoders(), FUSION: self.model.fusion}

    def step(self, stage: str, batch: Batch, nets) -> StepResult:
        y = batch.label
        h = [nets[f"{n}_encoder"](batch.inputs[n]) for n in self.names]
        z_f = nets[FUSION](*(x.detach() for x in h))
        # unimodal passes through the same head, its parameters cut from the graph: row block i
        # holds modality i's features and zeros elsewhere (one call for all M passes)
        fusion = self.model.fusion
        frozen = {k: p.detach() for k, p in fusion.named_parameters()}
        zeros = [torch.zeros_like(x) for x in h]
        cols = [torch.cat([h[j] if i == j else zeros[j] for i in range(len(h))]) for j in range(len(h))]
        z_u = functional_call(fusion, frozen, tuple(cols)).split(y.shape[0])
        a = self.hp.alpha
        return StepResult({FUSION: ce(z_f, y), **{n: a * ce(z, y) for n, z in zip(self.names, z_u)}},
                          {**dict(zip(self.names, z_u)), FUSION: z_f})

    def finalize(self, ctx):
        dim = self.branch(self.names[0]).head.in_features
        for i, n in enumerate(self.names):
            head = zero_modality_head(self.model.fusion, i, dim)
            if head is None:
                fit_probe_heads(self.model, ctx, (n,))
                self.unimodal_heads = "probe"
            else:
                set_linear(self.branch(n).head, head.weight, head.bias)
        return self.model
