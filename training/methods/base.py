"""The Method interface: what one training method (DI-MML, joint, MLB, DGL, ...) is to the trainer.

A method owns its losses and gradient routing; the trainer owns everything else (data,
augmentation, optimiser, schedule, AMP, DDP, checkpoints, logging, evaluation). Per stage:

    trainable(stage)   {name: module} trained in this stage (the trainer wraps each in DDP,
                       puts it in train mode and gives it requires_grad; all else is eval/frozen)
    param_groups(stage) named SGD parameter groups (default: one per trainable module); a group
                       may carry "lr", its own initial rate (MSLR), decayed by the stage's schedule
    on_epoch_start(stage, epoch, ctx)   e.g. DI-MML's dimension separation, PMR's first prototypes
    step(stage, batch, nets) -> StepResult   the loss terms; the trainer back-propagates their
                       sum once and takes one optimiser step. `nets` = self.nets(stage, wrap):
                       every module by name, the trainable ones DDP-wrapped / compiled, the
                       frozen ones as they are.
    after_backward(stage, nets)   between backward and the optimiser step: edit .grad (OGM-GE)
    lr_scales()        per-step learning-rate multipliers by group name (MLB, MSLR), read after backward
    on_epoch_end(stage, epoch, ctx)     after the epoch's steps, before validation (PMR's prototypes)
    on_validation_end(stage, epoch, acc, ctx)   validation accuracy per output {name: float}
                       ({} without a validation split), on every rank (MSLR, MSES)
    finalize(ctx) -> MultiModel   the exported branches (one per modality) and fusion head

`self.frozen` holds method-owned modules that are never trained (UMT's teachers): the trainer
moves them to the device and keeps them in eval mode without gradients; they are neither
checkpointed nor exported (the method rebuilds them on construction). `trainable(stage)` may
shrink during a stage (MSES stops modalities): the trainer re-reads it every epoch for the
train/eval modes; gradients and DDP are set up once per stage.

Gradient isolation is expressed with `.detach()` and `torch.no_grad()` inside `step`, so the
single backward of the summed terms gives every parameter exactly its intended gradient.
Methods are generic over the run's modalities (`self.names`, in model order); none names one.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
import torch.nn as nn

from training.models import FUSION, FUSIONS, ConcatFusion, FusionHead, MultiModel, SumFusion


@dataclass
class Batch:
    """One training batch on the device."""

    inputs: dict[str, torch.Tensor]   # modality -> [B, *spec.shape] (stack kinds: uint8, or float after augmentation)
    label: torch.Tensor               # int64 [B]


@dataclass
class StepResult:
    """What a method's step produced."""

    losses: dict[str, torch.Tensor]                       # terms; their sum is back-propagated
    logits: dict[str, torch.Tensor]                       # output name -> [B, K] (train accuracy)
    logs: dict[str, Any] = field(default_factory=dict)    # extra per-step scalars (floats or 0-d tensors)


class Context(Protocol):
    """What the trainer offers a method outside `step`."""

    num_classes: int
    device: torch.device

    def features(self, split: str) -> tuple[dict[str, torch.Tensor], torch.Tensor] | None:
        """({modality: [N, D]}, labels [N]) of a split (eval mode, no augmentation, CPU) on rank 0;
        None on the other ranks (share results with `broadcast`)."""

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's object on every rank (identity without DDP)."""

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (identity without DDP)."""

    def log(self, msg: str) -> None:
        """A line for the user and RUN/train.log (rank 0 only)."""

    main: bool                                   # rank 0
    optimizer_settings: dict[str, float]         # the stage-1 lr, momentum, weight_decay

    def batches(self, split: str, seed: int | None = None) -> Iterator[Batch]:
        """A split's batches on the device: shuffled by seed and augmented, or in order (seed None)."""


@dataclass
class HParams:
    """Base of a method's hyper-parameters; `resolve` fills defaults that depend on the run."""

    def resolve(self, epochs: int) -> None:
        """Fill None fields from the number of stage-1 epochs (default: nothing to fill)."""


@dataclass
class NoHParams(HParams):
    pass


def window_epoch(value: float, epochs: int) -> int:
    """A modulation window's bound as a 0-based epoch: given as an epoch (0, or >= 1), or as a
    fraction of the run (0 < value < 1: round(value x epochs)), so short runs keep the reference's
    proportions (OGM-GE modulates epochs 0-50 of its 100, PMR 0-70)."""
    if value < 0:
        raise ValueError(f"a window bound must be >= 0 (an epoch, or a fraction of the run), got {value}")
    return round(value * epochs) if 0 < value < 1 else int(value)


class Method:
    """Base class; see the module docstring. Subclasses set the ClassVars and `register` themselves."""

    name: ClassVar[str] = ""
    stages: ClassVar[tuple[str, ...]] = ()
    hparams_cls: ClassVar[type[HParams]] = NoHParams
    defaults: ClassVar[dict[str, Any]] = {}       # hyper-parameter defaults of this variant
    # the final output is chosen on validation (the weighting unless another rule is better; every
    # method whose unimodal heads exist: own, slices of the fusion head, or probes); False: its fusion head
    chooses_output: ClassVar[bool] = True
    fusions: ClassVar[tuple[str, ...]] = FUSIONS  # fusion heads the method can export
    min_modalities: ClassVar[int] = 2             # the fewest modalities the method makes sense for
    teachers_from: ClassVar[str | None] = None    # the method whose finished run is --set teachers=RUN (compare)
    description: ClassVar[str] = ""

    def __init__(self, model: MultiModel, hp: HParams, num_classes: int):
        self.check_modalities(len(model.names))
        self.model, self.hp, self.num_classes = model, hp, num_classes
        self.names: tuple[str, ...] = model.names
        self.extras: dict[str, nn.Module] = {}    # trained but not exported (e.g. DI-MML's S-Clf)
        self.frozen: dict[str, nn.Module] = {}    # never trained, not checkpointed (e.g. UMT's teachers)
        self.unimodal_heads = "trained"           # how finalize obtains the exported unimodal heads

    @classmethod
    def make_hparams(cls, overrides: dict[str, Any] | None = None, epochs: int | None = None) -> HParams:
        """Hyper-parameters: dataclass defaults < this variant's defaults < overrides; then resolved."""
        known = {f.name for f in dataclasses.fields(cls.hparams_cls)}
        unknown = set(overrides or {}) - known
        if unknown:
            raise ValueError(f"method {cls.name!r} has no hyper-parameter(s) {sorted(unknown)}; "
                             f"it has {sorted(known) or 'none'}")
        hp = cls.hparams_cls(**{**cls.defaults, **(overrides or {})})
        if epochs is not None:
            hp.resolve(epochs)
        return hp

    @classmethod
    def check_modalities(cls, count: int) -> None:
        """ValueError when the method cannot train `count` modalities."""
        if count < cls.min_modalities:
            raise ValueError(f"method {cls.name!r} needs at least {cls.min_modalities} modalities, got {count}")

    # ----- structure

    def branch(self, name: str) -> nn.Module:
        """Modality `name`'s Branch (encoder + head)."""
        return self.model.branches[name]

    def encoders(self) -> dict[str, nn.Module]:
        """{"<modality>_encoder": encoder}: the trainable names of methods that train encoders alone."""
        return {f"{n}_encoder": self.model.branches[n].encoder for n in self.names}

    def modules(self) -> dict[str, nn.Module]:
        """Every module with state (checkpointed, moved to the device)."""
        model, extras, frozen = set(self.model.modules()), set(self.extras), set(self.frozen)
        clash = (model & extras) | (model & frozen) | (extras & frozen)
        if clash:
            raise ValueError(f"method {self.name!r} keeps module(s) {sorted(clash)}: rename the modality")
        return {**self.model.modules(), **self.extras}

    def trainable(self, stage: str) -> dict[str, nn.Module]:
        raise NotImplementedError

    def nets(self, stage: str, wrap: Callable[[nn.Module], Callable] | None = None) -> dict[str, Callable]:
        """What `step` calls: every module by name, the stage's trainable ones through `wrap` (DDP, compile)."""
        out: dict[str, Callable] = {**self.frozen, **self.modules()}
        for name, m in self.trainable(stage).items():
            out[name] = wrap(m) if wrap else m
        return out

    def param_groups(self, stage: str) -> list[dict]:
        return [{"name": n, "params": list(m.parameters())} for n, m in self.trainable(stage).items()]

    def outputs(self, stage: str) -> tuple[str, ...]:
        """Outputs meaningful after this stage (tracked as train/val accuracy)."""
        return (*self.names, FUSION)

    # ----- training

    def prepare(self, ctx: Context) -> None:
        """Once before the first stage of a fresh run (not on resume: state_dict carries it)."""

    def record(self) -> dict[str, Any]:
        """What the method decided for this run, saved in RUN/config.json ("method_record")."""
        return {}

    def on_epoch_start(self, stage: str, epoch: int, ctx: Context) -> None:
        pass

    def step(self, stage: str, batch: Batch, nets: dict[str, Callable]) -> StepResult:
        raise NotImplementedError

    def after_backward(self, stage: str, nets: dict[str, Callable]) -> None:
        """Gradient editing after backward, before the optimiser step (default: none)."""

    def lr_scales(self) -> dict[str, float]:
        return {}

    def on_epoch_end(self, stage: str, epoch: int, ctx: Context) -> None:
        pass

    def on_validation_end(self, stage: str, epoch: int, acc: dict[str, float], ctx: Context) -> None:
        """Validation accuracy of this epoch per output name (modalities, "fusion"); {} without val."""

    def state_dict(self) -> dict[str, Any]:
        """Method state beyond module weights (checkpointed)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def finalize(self, ctx: Context) -> MultiModel:
        return self.model


# ---------------------------------------------------------------------------------------
# registry: every module of this package registers its methods on import

REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    if not cls.name or cls.name in REGISTRY:
        raise ValueError(f"method name {cls.name!r} is empty or taken")
    REGISTRY[cls.name] = cls
    return cls


# ---------------------------------------------------------------------------------------
# helpers shared by methods

def ce(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Cross-entropy in float32 (logits may be bf16 under autocast)."""
    return nn.functional.cross_entropy(logits.float(), label)


def true_class_probs(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """[B] softmax probability of the true class."""
    return logits.detach().float().softmax(dim=1).gather(1, label[:, None]).squeeze(1)


@torch.no_grad()
def set_linear(layer: nn.Linear, weight: torch.Tensor, bias: torch.Tensor) -> None:
    layer.weight.copy_(weight.to(layer.weight))
    layer.bias.copy_(bias.to(layer.bias))


@torch.no_grad()
def averaging_fusion(heads: list[nn.Linear], fusion: FusionHead) -> None:
    """Make `fusion` output the mean of the M heads' logits (Preds-Avg), exactly.

    Concat: fc = [W_1, ..., W_M] / M, b = sum b_i / M. Sum: fc_i = head_i / M.
    """
    m = len(heads)
    if isinstance(fusion, ConcatFusion):
        set_linear(fusion.fc, torch.cat([h.weight for h in heads], dim=1) / m, sum(h.bias for h in heads) / m)
    elif isinstance(fusion, SumFusion):
        for fc, h in zip(fusion.fcs, heads):
            set_linear(fc, h.weight / m, h.bias / m)
    else:
        raise ValueError(f"prediction averaging is exportable as a concat or sum fusion head, not {fusion.kind!r}")


@torch.no_grad()
def zero_modality_head(fusion: FusionHead, index: int, dim: int) -> nn.Linear | None:
    """The fusion head with every modality but input `index` set to 0, as a Linear on that one's features.

    DGL's unimodal prediction. Exact for fusions affine in one input when the others are 0
    (concat, sum, FiLM); None when it is not (gated: a sigmoid of the first input).
    """
    p = next(fusion.parameters())

    def run(x: torch.Tensor) -> torch.Tensor:
        z = torch.zeros_like(x)
        return fusion(*(x if i == index else z for i in range(fusion.num_inputs)))

    bias = run(torch.zeros(1, dim, dtype=p.dtype, device=p.device))      # [1, K]
    weight = run(torch.eye(dim, dtype=p.dtype, device=p.device)) - bias   # [D, K]: columns of W^T
    probe = torch.randn(8, dim, generator=torch.Generator().manual_seed(0)).to(p) * 3
    if not torch.allclose(run(probe), probe @ weight + bias, rtol=1e-4, atol=1e-4):
        return None
    head = nn.Linear(dim, bias.shape[1]).to(p)
    set_linear(head, weight.T, bias[0])
    return head


@torch.no_grad()
def fit_probe_heads(model: MultiModel, ctx: Context, names: tuple[str, ...] | None = None) -> None:
    """Replace the unimodal heads of `names` (default: all) by linear probes on the frozen encoders' train features."""
    from training.evaluate import fit_probe

    feats, labels = ctx.features("train")
    for name in names or model.names:
        probe = fit_probe(feats[name], labels, ctx.num_classes)
        set_linear(model.branches[name].head, probe.weight, probe.bias)


@torch.no_grad()
def fusion_slices(fusion: FusionHead) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Each modality's (weight [K, D], bias [K]) inside a concat or sum head; None for other fusions.

    Concat: the head's column slice, the bias split evenly over the M modalities (OGM-GE's
    reference and BalanceBenchmark); sum: each modality's own linear layer.
    """
    if isinstance(fusion, ConcatFusion):
        m = fusion.num_inputs
        return [(w, fusion.fc.bias / m) for w in fusion.fc.weight.chunk(m, dim=1)]
    if isinstance(fusion, SumFusion):
        return [(fc.weight, fc.bias) for fc in fusion.fcs]
    return None


def slice_logits(fusion: FusionHead, features: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """Per-modality logits from the fusion head's slices (detached); None where the fusion has none."""
    slices = fusion_slices(fusion)
    if slices is None:
        return None
    return [h.detach().float() @ w.float().T + b.float() for h, (w, b) in zip(features, slices)]


@torch.no_grad()
def heads_from_fusion(model: MultiModel) -> bool:
    """Write each modality's fusion slice into its unimodal head; False (nothing written) for other fusions.

    Methods without unimodal heads of their own (OGM-GE, PMR, UMT, MSLR) do this before every
    validation and at the end, so the per-modality validation accuracy and the exported heads
    are the slice predictions the reference code reports.
    """
    slices = fusion_slices(model.fusion)
    if slices is None:
        return False
    for n, (w, b) in zip(model.names, slices):
        set_linear(model.branches[n].head, w, b)
    return True


class SliceHeads(Method):
    """Base of the methods that train the encoders and the fusion head under the fused CE and have no
    unimodal heads of their own (OGM-GE, PMR, UMT, MSLR): the heads are the fusion head's slices
    (`heads_from_fusion`), refreshed before every validation and at the end; for fusions without
    slices (FiLM, gated) the exported heads are linear probes and only the fused output is tracked.
    """

    stages = ("joint",)

    def __init__(self, model: MultiModel, hp: HParams, num_classes: int):
        super().__init__(model, hp, num_classes)
        self.unimodal_heads = "fusion" if fusion_slices(model.fusion) is not None else "probe"

    def trainable(self, stage: str) -> dict[str, nn.Module]:
        return {**self.encoders(), FUSION: self.model.fusion}

    def outputs(self, stage: str) -> tuple[str, ...]:
        return (*self.names, FUSION) if self.unimodal_heads == "fusion" else (FUSION,)

    def forward(self, batch: Batch, nets: dict[str, Callable]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every encoder's features (model order) and the fused logits."""
        h = [nets[f"{n}_encoder"](batch.inputs[n]) for n in self.names]
        return h, nets[FUSION](*h)

    def slice_outputs(self, h: list[torch.Tensor], z: torch.Tensor) -> dict[str, torch.Tensor]:
        """The step's logits for train accuracy: the fused output, plus the slices where there are some."""
        sl = slice_logits(self.model.fusion, h)
        return {**(dict(zip(self.names, sl)) if sl is not None else {}), FUSION: z}

    def on_epoch_end(self, stage: str, epoch: int, ctx: Context) -> None:
        heads_from_fusion(self.model)

    def finalize(self, ctx: Context) -> MultiModel:
        if not heads_from_fusion(self.model):
            fit_probe_heads(self.model, ctx)
        return self.model
