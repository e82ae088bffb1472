"""Each encoder trained alone (paper's Uni1/Uni2 rows), and prediction averaging of them (Preds-Avg).

Every encoder trains in one loop, each only on its own head's CE: separate parameters and
losses, so this is exactly M independent unimodal trainings sharing the data order.
The exported fusion head averages the M heads' logits (set exactly in a concat or sum head),
so the fusion output of these runs is Preds-Avg. `unimodal` and `preds-avg` train the same
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
    min_modalities = 1
    description = "each encoder alone with its own head; fusion = average of the heads' logits"

    def trainable(self, stage: str) -> dict[str, nn.Module]:
        return {n: self.branch(n) for n in self.names}

    def outputs(self, stage: str) -> tuple[str, ...]:
        return self.names

    def step(self, stage: str, batch: Batch, nets) -> StepResult:
        z = {n: nets[n](batch.inputs[n])[1] for n in self.names}
        return StepResult({n: ce(z[n], batch.label) for n in self.names}, z)

    def finalize(self, ctx):
        averaging_fusion([self.branch(n).head for n in self.names], self.model.fusion)
        return self.model


@register
class PredsAvg(Unimodal):
    name = "preds-avg"
    description = "Preds-Avg: independently trained unimodal models, logits averaged"
