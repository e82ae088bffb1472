"""Joint training: both encoders and the fusion head under one multimodal CE (the competition case).

The method has no unimodal heads; the exported ones are linear probes fitted on the frozen
encoders' train features after training (so its "audio"/"visual" rows equal its probe rows).
"""
from __future__ import annotations

import torch.nn as nn

from training.methods.base import Batch, Method, StepResult, ce, fit_probe_heads, register


@register
class Joint(Method):
    name = "joint"
    stages = ("joint",)
    description = "joint training: one CE on the fused output (unimodal heads = linear probes)"

    def __init__(self, model, hp, num_classes: int):
        super().__init__(model, hp, num_classes)
        self.unimodal_heads = "probe"

    def trainable(self, stage: str) -> dict[str, nn.Module]:
        return {"audio_encoder": self.model.audio.encoder, "visual_encoder": self.model.visual.encoder,
                "fusion": self.model.fusion}

    def outputs(self, stage: str) -> tuple[str, ...]:
        return ("fusion",)

    def step(self, stage: str, batch: Batch, nets) -> StepResult:
        z = nets["fusion"](nets["audio_encoder"](batch.audio), nets["visual_encoder"](batch.visual))
        return StepResult({"fused": ce(z, batch.label)}, {"fusion": z})

    def finalize(self, ctx):
        fit_probe_heads(self.model, ctx)
        return self.model
