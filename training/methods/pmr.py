"""PMR, prototypical modal rebalance (Fan et al., CVPR 2023).

Reference: github.com/fanyunfeng-bit/Modal-Imbalance-PMR `main_Prototype_grad.py`.
Prototypes c_m[k]: the mean encoder feature of class k per modality, computed in eval mode
without gradient over a subset of the train split (`proto_batches=tenth`, the reference's first
len(loader)//10 batches of the shuffled loader: here a random tenth of the train samples, drawn
from the epoch, without augmentation; `all`: every train sample). As the reference, they are
computed before the first epoch and again after every training epoch (`on_epoch_end`), with
momentum c <- (1 - mu) c_new + mu c_old except after epoch 0 (the reference passes the finished
epoch's index and takes the new prototypes when it is 0); they are constants during an epoch.
Every step within epochs [start, end] (0-based, inclusive):
    sim_m   = -||h_m - c_m||                  (plain Euclidean distance, no temperature)
    s_m     = sum over the batch of softmax(sim_m)[y]   (summed over DDP ranks)
    M = 2:  s_0 / s_1 > 1 -> modality 1 is the weaker; < 1 -> modality 0; == 1 -> none
    M > 2:  every modality whose s_m is below the largest is a weaker one (for M = 2 the same rule)
    loss    = CE(fused) + alpha * sum over the weaker m of CE(sim_m, y)
The extra term depends only on h_m (the prototypes are constants), so its gradient reaches only
the weaker modality's encoder, never the fusion head. The released code has binary
coefficients {0, alpha} and no entropy regulariser (the paper's); this follows the code.
Defaults: alpha 2.0 (the authors' runs with concat or sum fusion on CREMA-D and AVE, bash.sh; the
argparse default is 1.0), momentum 0.0, end 70 (their runs of 100 to 130 epochs; the argparse has
momentum_coef 0.2 and modulation_ends 100; set them with --set). `start` and `end` may be fractions
of the run (0 < x < 1: round(x epochs)): the short presets end at 0.7 (dimml/presets.py), the paper
presets keep epoch 70. Unimodal heads: the fusion head's slices (concat/sum), else linear probes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from training.methods.base import Batch, Context, HParams, SliceHeads, StepResult, ce, register, window_epoch
from training.models import FUSION

PROTO_BATCHES = ("tenth", "all")


@dataclass
class PMRConfig(HParams):
    alpha: float = 2.0          # the authors' concat-fusion runs on CREMA-D and AVE (bash.sh)
    momentum: float = 0.0       # mu of the prototype update
    start: float = 0            # first epoch with the prototype loss (0-based, inclusive; 0 < x < 1: a fraction)
    end: float = 70             # last epoch with it (inclusive; 0 < x < 1: a fraction of the run)
    proto_batches: str = "tenth"  # "tenth": a tenth of the train samples (the reference); "all"

    def resolve(self, epochs: int) -> None:
        if self.proto_batches not in PROTO_BATCHES:
            raise ValueError(f"pmr proto_batches must be one of {PROTO_BATCHES}, got {self.proto_batches!r}")
        if not 0 <= self.momentum <= 1:
            raise ValueError("pmr momentum must be in [0, 1]")
        self.start, self.end = window_epoch(self.start, epochs), window_epoch(self.end, epochs)


def class_means(feats: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[K, D] mean feature per class (zero for a class without samples)."""
    sums = torch.zeros(num_classes, feats.shape[1], dtype=torch.float32).index_add_(0, labels, feats.float())
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1).float()
    return sums / counts[:, None]


def weaker(scores: list[float]) -> list[bool]:
    """Which modalities get the prototype loss: those whose score is below the largest."""
    top = max(scores)
    return [s < top for s in scores]


@register
class PMR(SliceHeads):
    name = "pmr"
    hparams_cls = PMRConfig
    description = "PMR: fused CE + alpha * prototype CE on the weaker modality's encoder"

    def __init__(self, model, hp: PMRConfig, num_classes: int):
        super().__init__(model, hp, num_classes)
        self.protos: dict[str, torch.Tensor] | None = None
        self.epoch = 0
        self._ctx: Context | None = None

    def update_prototypes(self, epoch: int, ctx: Context) -> None:
        """New prototypes from the train features (rank 0, broadcast); momentum unless `epoch` is 0."""
        new = None
        got = ctx.features("train")
        if got is not None:
            feats, labels = got
            if self.hp.proto_batches == "tenth":
                g = torch.Generator().manual_seed(epoch)
                rows = torch.randperm(len(labels), generator=g)[:max(1, len(labels) // 10)]
                feats, labels = {n: f[rows] for n, f in feats.items()}, labels[rows]
            new = {n: class_means(feats[n], labels, self.num_classes) for n in self.names}
        new = {n: c.to(ctx.device) for n, c in ctx.broadcast(new).items()}
        mu = self.hp.momentum
        if self.protos is None or epoch <= 0 or mu == 0:
            self.protos = new
        else:
            self.protos = {n: (1 - mu) * new[n] + mu * self.protos[n].to(ctx.device) for n in self.names}

    def on_epoch_start(self, stage: str, epoch: int, ctx: Context) -> None:
        self.epoch, self._ctx = epoch, ctx
        if self.protos is None:   # before the first epoch (or a resumed run without them)
            self.update_prototypes(0, ctx)

    def on_epoch_end(self, stage: str, epoch: int, ctx: Context) -> None:
        super().on_epoch_end(stage, epoch, ctx)
        self.update_prototypes(epoch, ctx)

    def proto_logits(self, h: torch.Tensor, name: str) -> torch.Tensor:
        """[B, K] negative Euclidean distance of the features to modality `name`'s prototypes."""
        return -torch.cdist(h.float(), self.protos[name].to(h.device).float())

    def step(self, stage: str, batch: Batch, nets) -> StepResult:
        y = batch.label
        h, z = self.forward(batch, nets)
        losses = {FUSION: ce(z, y)}
        logs = {}
        if self.protos is not None and self.hp.start <= self.epoch <= self.hp.end:
            sim = [self.proto_logits(x, n) for x, n in zip(h, self.names)]
            s = torch.stack([p.detach().softmax(1).gather(1, y[:, None]).sum() for p in sim])
            if self._ctx is not None:
                s = self._ctx.all_reduce_sum(s)
            for n, p, weak in zip(self.names, sim, weaker(s.tolist())):
                # every modality's term, weighted 0 unless weaker: the same loss columns every step
                losses[f"proto_{n}"] = (self.hp.alpha if weak else 0.0) * ce(p, y)
                logs[f"weak_{n}"] = float(weak)
        return StepResult(losses, self.slice_outputs(h, z), logs)

    def state_dict(self) -> dict:
        return {"protos": None if self.protos is None else {n: c.cpu() for n, c in self.protos.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.protos = state.get("protos")
