"""OGM-GE, on-the-fly gradient modulation with generalisation enhancement (Peng et al., CVPR 2022).

Reference: github.com/GeWu-Lab/OGM-GE_CVPR2022 `main.py` (train_epoch). Every step, after the
one backward of CE(fused):
    out_m  = h_m W_m^T + b / M            the concat head's column slice of modality m (bias split evenly)
    s_m    = sum over the batch of softmax(out_m)[y]     (summed over DDP ranks)
    M = 2: rho = s_1 / s_0; rho > 1: k_1 = 1 - tanh(alpha rho), k_0 = 1;
           else k_0 = 1 - tanh(alpha / rho), k_1 = 1      (the reference: a tie slows the first)
    M > 2: rho_m = s_m / min_j s_j; k_m = 1 - tanh(alpha rho_m) where rho_m > 1, else 1
           (BalanceBenchmark's OGM_GE rule with the plain softmax score; several may be slowed)
and, from epoch `start` to `end` (0-based, inclusive), each encoder's modulated gradients become
    g <- g k_m + N(0, (std(g) + 1e-8)^2)      (std of the unscaled gradient; noise on every
                                               modality, also those with k = 1; ge=false: no noise)
Modulated parameters: `params=conv` (default, the reference) = the 4-D conv weights of the
encoder (no BN, no biases, no heads); `params=weights` = every encoder parameter with more than
one dimension (BalanceBenchmark). The fusion head's gradients are never touched.
Defaults: alpha 0.8 (the reference README's CREMA-D value; its argparse has no default and the
README's generic example uses 0.1), start 0, end 50 (the reference's argparse, of its 100-epoch
runs); `start` and `end` may be fractions of the run (0 < x < 1: round(x epochs)), which the short
presets use (tiny, small: end 0.5, dimml/presets.py) so that the window switches off half way as
in the reference rather than never; the paper presets keep epoch 50. Every step logs `modulated`
(1 inside the window, 0 after). Needs the concat
fusion (the slices); unimodal heads = the slices. The noise comes from a generator seeded from the
run's per-epoch seed, so every DDP rank draws the same noise (and a resumed run the same as an
uninterrupted one).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from training.methods.base import (
    Batch,
    Context,
    HParams,
    SliceHeads,
    StepResult,
    ce,
    register,
    slice_logits,
    window_epoch,
)
from training.models import FUSION, ConcatFusion

PARAM_FILTERS = ("conv", "weights")


@dataclass
class OGMGEConfig(HParams):
    alpha: float = 0.8
    start: float = 0        # first modulated epoch (0-based, inclusive; 0 < x < 1: a fraction of the run)
    end: float = 50         # last modulated epoch (inclusive; 0 < x < 1: a fraction of the run)
    ge: bool = True         # generalisation enhancement (Gaussian noise); false: plain OGM
    params: str = "conv"    # "conv": 4-D conv weights (the reference); "weights": every >1-D encoder parameter

    def resolve(self, epochs: int) -> None:
        if self.params not in PARAM_FILTERS:
            raise ValueError(f"ogm-ge params must be one of {PARAM_FILTERS}, got {self.params!r}")
        if self.alpha < 0:
            raise ValueError("ogm-ge alpha must be >= 0")
        self.start, self.end = window_epoch(self.start, epochs), window_epoch(self.end, epochs)


def ogm_coefficients(scores: list[float], alpha: float) -> list[float]:
    """k_m from the per-modality summed true-class scores (see the module docstring)."""
    if len(scores) == 2:
        s0, s1 = scores
        rho = s1 / max(s0, 1e-12)
        if rho > 1:
            return [1.0, 1 - math.tanh(alpha * rho)]
        return [1 - math.tanh(alpha / max(rho, 1e-12)), 1.0]
    low = max(min(scores), 1e-12)
    return [1 - math.tanh(alpha * s / low) if s / low > 1 else 1.0 for s in scores]


@register
class OGMGE(SliceHeads):
    name = "ogm-ge"
    hparams_cls = OGMGEConfig
    fusions = ("concat",)
    description = "OGM-GE: fused CE; the stronger encoder's conv gradients scaled by k < 1, plus Gaussian noise"

    def __init__(self, model, hp: OGMGEConfig, num_classes: int):
        if not isinstance(model.fusion, ConcatFusion):
            raise ValueError(f"method 'ogm-ge' needs the concat fusion (its per-modality logits are the concat "
                             f"head's slices), not {model.fusion.kind!r}")
        super().__init__(model, hp, num_classes)
        self.k: dict[str, float] = {n: 1.0 for n in self.names}
        self.epoch = 0
        self._ctx: Context | None = None
        self._gen: torch.Generator | None = None

    def modulated(self, name: str) -> list[nn.Parameter]:
        """The parameters of modality `name`'s encoder whose gradients OGM-GE edits."""
        keep = (lambda p: p.dim() == 4) if self.hp.params == "conv" else (lambda p: p.dim() > 1)
        return [p for p in self.branch(name).encoder.parameters() if keep(p)]

    def active(self) -> bool:
        return self.hp.start <= self.epoch <= self.hp.end

    def on_epoch_start(self, stage: str, epoch: int, ctx: Context) -> None:
        self.epoch, self._ctx = epoch, ctx
        device = next(self.model.fusion.parameters()).device
        # the trainer has just seeded torch from (seed, stage, epoch), the same on every rank
        self._gen = torch.Generator(device=device).manual_seed(torch.initial_seed() + 7919 * epoch)

    def step(self, stage: str, batch: Batch, nets) -> StepResult:
        y = batch.label
        h, z = self.forward(batch, nets)
        out = slice_logits(self.model.fusion, h)
        s = torch.stack([o.softmax(1).gather(1, y[:, None]).sum() for o in out])
        if self._ctx is not None:
            s = self._ctx.all_reduce_sum(s)
        self.k = dict(zip(self.names, ogm_coefficients(s.tolist(), self.hp.alpha)))
        logits = {**dict(zip(self.names, out)), FUSION: z}
        return StepResult({FUSION: ce(z, y)}, logits,
                          {**{f"k_{n}": self.k[n] for n in self.names}, "modulated": float(self.active())})

    @torch.no_grad()
    def after_backward(self, stage: str, nets) -> None:
        if not self.active():
            return
        for n in self.names:
            k = self.k[n]
            for p in self.modulated(n):
                if p.grad is None:
                    continue
                g = p.grad
                if self.hp.ge:
                    # std of the unscaled gradient, kept on the device (no host sync per parameter)
                    std = g.float().std().nan_to_num(0.0) + 1e-8
                    gen = self._gen if self._gen is not None and self._gen.device == g.device else None
                    noise = torch.randn(g.shape, generator=gen, device=g.device, dtype=g.dtype)
                    g.mul_(k).add_(noise * std.to(g.dtype))
                else:
                    g.mul_(k)

    def state_dict(self) -> dict:
        return {"k": dict(self.k)}

    def load_state_dict(self, state: dict) -> None:
        self.k.update(state.get("k", {}))
