"""Each encoder trained alone (paper's Uni1/Uni2 rows), and prediction averaging of them (Preds-Avg).

Both encoders train in one loop, each only on its own head's CE: separate parameters and
losses, so this is exactly two independent unimodal trainings sharing the data order.
The exported fusion head averages the two heads' logits (set exactly in a concat or sum head),
so the "fused" output of these runs is Preds-Avg. `unimodal` and `preds-avg` train the same
way; the name says which row of a comparison the run is for.
"""
from __future__ import annotations

import torch.nn as nn

from training.methods.base import Batch, Method, StepResult, averaging_fusion, ce, register


@register
class Unimodal(Method):
    name = "unimodal"
    stages = ("encoders",)
    fusions = ("concat", "sum")
    description = "each encoder alone with its own head; fusion = average of the two heads' logits"

    def trainable(self, stage: str) -> dict[str, nn.Module]:
        return {"audio": self.model.audio, "visual": self.model.visual}

    def outputs(self, stage: str) -> tuple[str, ...]:
        return ("audio", "visual")

    def step(self, stage: str, batch: Batch, nets) -> StepResult:
        _, z_a = nets["audio"](batch.audio)
        _, z_v = nets["visual"](batch.visual)
        return StepResult({"audio": ce(z_a, batch.label), "visual": ce(z_v, batch.label)},
                          {"audio": z_a, "visual": z_v})

    def finalize(self, ctx):
        averaging_fusion(self.model.audio.head, self.model.visual.head, self.model.fusion)
        return self.model


@register
class PredsAvg(Unimodal):
    name = "preds-avg"
    description = "Preds-Avg: independently trained unimodal models, logits averaged"
