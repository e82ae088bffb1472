"""MSLR, modality-specific learning rates (Yao and Mihalcea, Findings of ACL 2022).

The encoders and the fusion head train under CE(fused), each encoder in its own parameter group
with its own initial learning rate, chosen as the paper chooses them: from each modality's own
tuning. Before training (`prepare`), each encoder with its own head is trained alone from its
initial weights for `search_epochs` epochs (default a tenth of the run, at least 1) at each of
`search_factors` x --lr, and the rate with the best validation accuracy is its initial rate
(ties: the factor nearest 1). The rates and every candidate's accuracy are in RUN/config.json
("method_record") and the log. `lrs` (a JSON object, e.g. --set 'lrs={"audio": 0.001, "visual":
0.01}') sets them instead, skipping the search for the modalities it names; the fusion head starts
at --lr. Every rate then follows the run's step schedule. Strategies:
    keep     the initial rates throughout
    dynamic  (default) after every `every`-th validation (epochs every, 2 every, ...):
             lr_m <- lr_m * acc_m(t) / mean(acc_m over the last `every` validations, t included)
acc_m is modality m's validation accuracy from the fusion head's slice (concat/sum fusion).
No official code exists; this follows the one re-implementation found (an `MSLRTrainer`: ring
buffer of length 5 including the current value, rule applied every 5 epochs) and the paper's
abstract; its paper-body "smooth" strategy is not implemented.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from training.methods.base import Batch, Context, HParams, SliceHeads, StepResult, ce, register
from training.models import FUSION

STRATEGIES = ("dynamic", "keep")


@dataclass
class MSLRConfig(HParams):
    lrs: dict = field(default_factory=dict)   # modality -> initial learning rate (default: searched)
    strategy: str = "dynamic"
    every: int = 5                             # N: history length and update period (validations)
    search_factors: list = field(default_factory=lambda: [0.1, 0.3, 1.0, 3.0])   # candidate rates x --lr
    search_epochs: int | None = None           # None: a tenth of the run's epochs, at least 1

    def resolve(self, epochs: int) -> None:
        if self.search_epochs is None:
            self.search_epochs = max(1, round(epochs / 10))
        if self.search_epochs < 1 or not self.search_factors or min(self.search_factors) <= 0:
            raise ValueError("mslr search_epochs must be >= 1 and search_factors positive numbers")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"mslr strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if not isinstance(self.lrs, dict) or any(not isinstance(v, (int, float)) or v < 0 for v in self.lrs.values()):
            raise ValueError(f"mslr lrs must map modalities to rates >= 0, got {self.lrs!r}")
        if self.every < 1:
            raise ValueError("mslr every must be >= 1")


@register
class MSLR(SliceHeads):
    name = "mslr"
    hparams_cls = MSLRConfig
    fusions = ("concat", "sum")
    description = "MSLR: fused CE, one learning rate per encoder, rescaled by validation accuracy every 5 epochs"

    def __init__(self, model, hp: MSLRConfig, num_classes: int):
        super().__init__(model, hp, num_classes)
        if self.unimodal_heads != "fusion":
            raise ValueError(f"method 'mslr' needs per-modality accuracy from a concat or sum fusion head, "
                             f"not {model.fusion.kind!r}")
        unknown = set(hp.lrs) - set(self.names)
        if unknown:
            raise ValueError(f"mslr lrs names {sorted(unknown)}, not modalities of this run {list(self.names)}")
        self.scale: dict[str, float] = {n: 1.0 for n in self.names}   # the dynamic rule's factor
        self.history: dict[str, list[float]] = {n: [] for n in self.names}
        self.initial: dict[str, float] = {n: float(v) for n, v in hp.lrs.items()}   # + the searched ones
        self.search: dict[str, dict[str, float]] = {}    # modality -> {rate: validation accuracy}

    def prepare(self, ctx: Context) -> None:
        """Each encoder's initial rate from its own tuning (rank 0 searches, every rank gets the result)."""
        todo = [n for n in self.names if n not in self.initial]
        if not todo:
            return
        found = ctx.broadcast({n: self._tune(n, ctx) for n in todo} if ctx.main else None)
        for n, scores in found.items():
            self.search[n] = scores
            self.initial[n] = best_rate(scores, ctx.optimizer_settings["lr"])
        ctx.log("mslr initial learning rates (best validation accuracy of each encoder trained alone for "
                f"{self.hp.search_epochs} epoch(s)): " + ", ".join(f"{n} {self.initial[n]:.3g} "
                f"(of {', '.join(f'{lr}: {a:.3f}' for lr, a in self.search[n].items())})" for n in todo))

    def _tune(self, name: str, ctx: Context) -> dict[str, float]:
        """{rate: validation accuracy} of modality `name`'s encoder + head trained alone at each candidate rate."""
        opt = ctx.optimizer_settings
        scores = {}
        for factor in self.hp.search_factors:
            lr = float(f"{opt['lr'] * factor:.6g}")
            branch = copy.deepcopy(self.branch(name)).train()   # from the run's initial weights
            sgd = torch.optim.SGD(branch.parameters(), lr=lr, momentum=opt["momentum"],
                                  weight_decay=opt["weight_decay"])
            for epoch in range(self.hp.search_epochs):
                for batch in ctx.batches("train", seed=epoch):
                    sgd.zero_grad(set_to_none=True)
                    ce(branch(batch.inputs[name])[1], batch.label).backward()
                    sgd.step()
            scores[str(lr)] = accuracy(branch.eval(), name, ctx.batches("val"))
        return scores

    def record(self) -> dict:
        return {"initial_lrs": dict(self.initial),
                "lr_search": {"epochs": self.hp.search_epochs, "val_accuracy": self.search} if self.search else None}

    def param_groups(self, stage: str) -> list[dict]:
        groups = []
        for n in self.names:
            g = {"name": n, "params": list(self.branch(n).encoder.parameters())}
            if n in self.initial:
                g["lr"] = self.initial[n]
            groups.append(g)
        return groups + [{"name": FUSION, "params": list(self.model.fusion.parameters())}]

    def step(self, stage: str, batch: Batch, nets) -> StepResult:
        h, z = self.forward(batch, nets)
        return StepResult({FUSION: ce(z, batch.label)}, self.slice_outputs(h, z),
                          {f"lr_scale_{n}": self.scale[n] for n in self.names})

    def on_validation_end(self, stage: str, epoch: int, acc: dict[str, float], ctx: Context) -> None:
        if not all(n in acc for n in self.names):
            return   # no validation split: the rates stay
        n_hist = self.hp.every
        for n in self.names:
            self.history[n] = (self.history[n] + [acc[n]])[-n_hist:]
        if self.hp.strategy != "dynamic" or (epoch + 1) % n_hist:
            return
        for n in self.names:
            mean = sum(self.history[n]) / len(self.history[n])
            if mean > 0:
                self.scale[n] *= acc[n] / mean
        ctx.log(f"mslr after epoch {epoch + 1}: learning-rate factors "
                + ", ".join(f"{n} {self.scale[n]:.4g}" for n in self.names))

    def lr_scales(self) -> dict[str, float]:
        return dict(self.scale)

    def state_dict(self) -> dict:
        return {"scale": dict(self.scale), "history": {n: list(v) for n, v in self.history.items()},
                "initial": dict(self.initial), "search": self.search}

    def load_state_dict(self, state: dict) -> None:
        self.scale.update(state.get("scale", {}))
        self.history.update(state.get("history", {}))
        self.initial.update(state.get("initial", {}))
        self.search.update(state.get("search", {}))


@torch.no_grad()
def accuracy(branch: torch.nn.Module, name: str, batches: Iterable[Batch]) -> float:
    right = total = 0
    for b in batches:
        right += int((branch(b.inputs[name])[1].argmax(1) == b.label).sum())
        total += len(b.label)
    return right / total if total else 0.0


def best_rate(scores: dict[str, float], base: float) -> float:
    """The rate of the best accuracy; ties to the rate nearest the run's (`base`, on a log scale), then the smaller."""
    rate, _ = max(scores.items(), key=lambda kv: (round(kv[1], 9), -abs(math.log(float(kv[0]) / base)),
                                                  -float(kv[0])))
    return float(rate)
