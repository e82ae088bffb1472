"""MSLR, modality-specific learning rates (Yao and Mihalcea, Findings of ACL 2022).

The encoders and the fusion head train under CE(fused), each encoder in its own parameter group
with its own learning rate: `lrs` sets the initial rate per modality (a JSON object, e.g.
--set 'lrs={"audio": 0.001, "visual": 0.01}'; a modality left out starts at --lr, the fusion
head always does); every rate then follows the run's step schedule. Strategies:
    keep     the initial rates throughout
    dynamic  (default) after every `every`-th validation (epochs every, 2 every, ...):
             lr_m <- lr_m * acc_m(t) / mean(acc_m over the last `every` validations, t included)
acc_m is modality m's validation accuracy from the fusion head's slice (concat/sum fusion).
No official code exists; this follows the one re-implementation found (an `MSLRTrainer`: ring
buffer of length 5 including the current value, rule applied every 5 epochs) and the paper's
abstract; its paper-body "smooth" strategy is not implemented.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from training.methods.base import Batch, Context, HParams, SliceHeads, StepResult, ce, register
from training.models import FUSION

STRATEGIES = ("dynamic", "keep")


@dataclass
class MSLRConfig(HParams):
    lrs: dict = field(default_factory=dict)   # modality -> initial learning rate (default: --lr)
    strategy: str = "dynamic"
    every: int = 5                             # N: history length and update period (validations)

    def resolve(self, epochs: int) -> None:
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

    def param_groups(self, stage: str) -> list[dict]:
        groups = []
        for n in self.names:
            g = {"name": n, "params": list(self.branch(n).encoder.parameters())}
            if n in self.hp.lrs:
                g["lr"] = float(self.hp.lrs[n])
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
        return {"scale": dict(self.scale), "history": {n: list(v) for n, v in self.history.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.scale.update(state.get("scale", {}))
        self.history.update(state.get("history", {}))
