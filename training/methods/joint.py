"""Joint training: every encoder and the fusion head under one multimodal CE (the competition case).

The method has no unimodal heads; the exported ones are linear probes fitted on the frozen
encoders' train features after training (so its per-modality rows equal its probe rows).
"""
from __future__ import annotations

import torch.nn as nn

from training.methods.base import Batch, Method, StepResult, ce, fit_probe_heads, register
from training.models import FUSION


@register
class Joint(Method):
    name = "joint"
    stages = ("joint",)
    min_modalities = 1
    description = "joint training: one CE on the fused output (unimodal heads = linear probes)"

    def __init__(self, model, hp, num_classes: int):
        super().__init__(model, hp, num_classes)
        self.unimodal_heads = "probe"

    def trainable(self, stage: str) -> dict[str, nn.Module]:
        return {**self.encoders(), FUSION: self.model.fusion}

    def outputs(self, stage: str) -> tuple[str, ...]:
        return (FUSION,)

    def step(self, stage: str, batch: Batch, nets) -> StepResult:
        z = nets[FUSION](*(nets[f"{n}_encoder"](batch.inputs[n]) for n in self.names))
        return StepResult({FUSION: ce(z, batch.label)}, {FUSION: z})

    def finalize(self, ctx):
        fit_probe_heads(self.model, ctx)
        return self.model
