"""MSES, modality-specific early stopping (Fujimori et al., ACPR 2019).

A multitask model: loss = CE(fused) + sum_m CE(head_m(h_m)), every encoder with its own
unimodal head. After each validation, modality m's unimodal validation accuracy is compared
with its best so far; once it has not improved (strictly) for `patience` epochs, m's encoder
and head stop updating for the rest of the run: from the next epoch they run in eval mode
under no_grad, so the optimiser skips them (no gradient, no momentum, no weight decay) and
their weights no longer change. The fusion head keeps training on their features. The run
log says when each modality stopped. The paper's code is not public and its abstract leaves
the monitored metric, the patience and whether the best weights are restored open: here the
unimodal head's validation accuracy, patience 10, and the weights are kept as they are.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from training.methods.base import Batch, Context, HParams, Method, StepResult, ce, register
from training.models import FUSION


@dataclass
class MSESConfig(HParams):
    patience: int = 10      # epochs without a unimodal validation improvement before a modality stops

    def resolve(self, epochs: int) -> None:
        if self.patience < 1:
            raise ValueError("mses patience must be >= 1")


@register
class MSES(Method):
    name = "mses"
    stages = ("joint",)
    hparams_cls = MSESConfig
    description = "MSES: fused + unimodal CE; each encoder stops after `patience` epochs without unimodal val gain"

    def __init__(self, model, hp: MSESConfig, num_classes: int):
        super().__init__(model, hp, num_classes)
        self.best: dict[str, float] = {}
        self.since: dict[str, int] = {n: 0 for n in self.names}
        self.stopped: dict[str, int] = {}    # modality -> the last epoch (1-based) it trained

    def trainable(self, stage: str) -> dict[str, nn.Module]:
        return {**{n: self.branch(n) for n in self.names if n not in self.stopped}, FUSION: self.model.fusion}

    def param_groups(self, stage: str) -> list[dict]:
        """Every branch and the fusion, stopped or not: the optimiser's groups never change within a run."""
        return [{"name": n, "params": list(self.branch(n).parameters())} for n in self.names] + \
               [{"name": FUSION, "params": list(self.model.fusion.parameters())}]

    def step(self, stage: str, batch: Batch, nets) -> StepResult:
        y = batch.label
        h, z = {}, {}
        for n in self.names:
            if n in self.stopped:
                with torch.no_grad():
                    h[n], z[n] = nets[n](batch.inputs[n])
            else:
                h[n], z[n] = nets[n](batch.inputs[n])
        z_f = nets[FUSION](*(h[n] for n in self.names))
        return StepResult({FUSION: ce(z_f, y), **{n: ce(z[n], y) for n in self.names}}, {**z, FUSION: z_f},
                          {f"stopped_{n}": float(n in self.stopped) for n in self.names})

    def on_validation_end(self, stage: str, epoch: int, acc: dict[str, float], ctx: Context) -> None:
        for n in self.names:
            if n in self.stopped or n not in acc:
                continue
            if n not in self.best or acc[n] > self.best[n]:
                self.best[n], self.since[n] = acc[n], 0
                continue
            self.since[n] += 1
            if self.since[n] >= self.hp.patience:
                self.stopped[n] = epoch + 1
                ctx.log(f"mses: {n} stopped after epoch {epoch + 1}: no validation improvement for "
                        f"{self.hp.patience} epochs (best {self.best[n]:.4f}); its encoder and head are frozen")

    def state_dict(self) -> dict:
        return {"best": dict(self.best), "since": dict(self.since), "stopped": dict(self.stopped)}

    def load_state_dict(self, state: dict) -> None:
        self.best = dict(state.get("best", {}))
        self.since.update(state.get("since", {}))
        self.stopped = dict(state.get("stopped", {}))
