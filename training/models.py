"""Encoders, unimodal branches and fusion heads, for the modalities a run declares.

The exported pieces (see export/) are exactly the modules built here, one per modality plus
the fusion head:
    Branch      the modality's array, batched [B, *spec.shape] -> (features [B, D], logits [B, K])
    FusionHead  features of every modality, in the run's order -> logits [B, K]
A branch's encoder is chosen by its kind (dimml.modalities): "spectrogram" (a [1, F, T] image
through a ResNet, global average pool) or "stack" (N images through a ResNet with a C-channel
stem, pixel normalisation inside the model, features averaged over N and space). The batch
dimension stays symbolic throughout (no Python ints taken from x.shape), so the ONNX export has
a dynamic batch.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from dimml.modalities import ModalitySpec, PreprocessConfig
from dimml.prediction import FUSION
from dimml.presets import get_preset

FUSIONS = ("concat", "sum", "film", "gated")


@dataclass
class ModelConfig:
    """Architecture of every encoder and the fusion head, and the modalities they take."""

    num_classes: int
    widths: tuple[int, ...] = (64, 128, 256, 512)   # ResNet18 stage widths; D = widths[-1]
    blocks: tuple[int, ...] = (2, 2, 2, 2)           # BasicBlocks per stage
    fusion: str = "concat"
    modalities: tuple[dict, ...] = ()                # ModalitySpec.to_dict() of each modality, in model order

    @property
    def feature_dim(self) -> int:
        return self.widths[-1]

    @property
    def specs(self) -> tuple[ModalitySpec, ...]:
        return tuple(ModalitySpec.from_dict(d) for d in self.modalities)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], preprocess: PreprocessConfig | None = None) -> ModelConfig:
        """Read config.json's "model"; one without modalities (old runs) takes them from `preprocess`."""
        d = dict(d)
        d.pop("num_frames", None)   # old runs: N lived here; it is the frames spec's now
        if not d.get("modalities"):
            if preprocess is None:
                raise ValueError("model config without modalities: pass the run's preprocessing config")
            d["modalities"] = [s.to_dict() for s in preprocess.modalities]
        d["widths"], d["blocks"] = tuple(d["widths"]), tuple(d["blocks"])
        d["modalities"] = tuple(dict(m) for m in d["modalities"])
        return cls(**d)


# ---------------------------------------------------------------------------------------
# ResNet18 (He et al. 2016), written out: torchvision is not usable beside this torch build.

class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.down is None else self.down(x)))


class ResNet(nn.Module):
    """ResNet trunk without pooling/classifier: [B, C, H, W] -> [B, D, H/32, W/32]."""

    def __init__(self, in_channels: int, widths: tuple[int, ...], blocks: tuple[int, ...]):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False), nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        stages, cin = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            stride = 1 if i == 0 else 2
            stages += [BasicBlock(cin if j == 0 else w, w, stride if j == 0 else 1) for j in range(n)]
            cin = w
        self.stages = nn.Sequential(*stages)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))


class SpectrogramEncoder(nn.Module):
    """A [B, C, F, T] float image (a spectrogram) -> features [B, D] (global average pool)."""

    def __init__(self, channels: int, cfg: ModelConfig):
        super().__init__()
        self.net = ResNet(channels, cfg.widths, cfg.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).mean(dim=(2, 3))


class StackEncoder(nn.Module):
    """N images [B, N, H, W, C] (uint8 as decoded, or float in pixel units) -> features [B, D].

    Pixel normalisation (the kind's mean/std, in uint8 units) lives inside the model so that
    callers and the exported graph take arrays as decoded. Each of the N images goes through
    the ResNet; the features are averaged over N and space, as the reference code's 3-D
    average pool does.
    """

    def __init__(self, num_images: int, channels: int, mean: Iterable[float], std: Iterable[float], cfg: ModelConfig):
        super().__init__()
        self.num_images = num_images
        self.net = ResNet(channels, cfg.widths, cfg.blocks)
        self.register_buffer("mean", torch.tensor(tuple(mean), dtype=torch.float32).view(1, channels, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(tuple(std), dtype=torch.float32).view(1, channels, 1, 1),
                             persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, H, W, C] -> float [B*N, C, H, W], normalised."""
        x = x.permute(0, 1, 4, 2, 3).flatten(0, 1).float()
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor, normalized: bool = False) -> torch.Tensor:
        # normalized=True: x is already float [B*N, C, H, W]
        x = x if normalized else self.normalize(x)
        fmap = self.net(x)                                   # [B*N, D, h, w]
        fmap = fmap.unflatten(0, (-1, self.num_images))      # [B, N, D, h, w], B symbolic
        return fmap.mean(dim=(1, 3, 4))                      # [B, D]


def build_encoder(spec: ModalitySpec, cfg: ModelConfig) -> nn.Module:
    """The encoder a modality's kind asks for."""
    kind = spec.kind_obj
    channels = kind.channels(spec.params)
    if kind.encoder == "spectrogram":
        return SpectrogramEncoder(channels, cfg)
    if kind.encoder == "stack":
        if kind.pixel_mean is None or kind.pixel_std is None:
            raise ValueError(f"kind {kind.name!r}: a stack encoder needs pixel_mean and pixel_std")
        return StackEncoder(spec.shape[0], channels, kind.pixel_mean, kind.pixel_std, cfg)
    raise ValueError(f"kind {kind.name!r}: unknown encoder {kind.encoder!r} (spectrogram or stack)")


class Branch(nn.Module):
    """One modality: encoder phi_i and its own linear head psi_i -> (features, logits)."""

    def __init__(self, encoder: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return h, self.head(h)


# ---------------------------------------------------------------------------------------
# Fusion heads: M feature vectors (the run's modality order) -> logits. Layouts follow the
# fusion modules of the OGM-GE / DI-MML reference code.

class FusionHead(nn.Module):
    """Base: every fusion maps M features [B, D] (one per modality, in order) to logits [B, K]."""

    kind: ClassVar[str] = "base"
    max_inputs: ClassVar[int | None] = None   # None: any number of modalities
    # parameter-name prefixes of runs saved before heads took M inputs (always audio, visual)
    legacy_keys: ClassVar[dict[str, str]] = {}

    def __init__(self, num_inputs: int):
        super().__init__()
        if num_inputs < 1 or (self.max_inputs is not None and num_inputs > self.max_inputs):
            raise ValueError(f"{self.kind} fusion takes {self.max_inputs} modalities, not {num_inputs}; "
                             f"concat and sum fusion take any number")
        self.num_inputs = num_inputs

    def check(self, features: tuple[torch.Tensor, ...]) -> None:
        """One feature tensor per modality."""
        if len(features) != self.num_inputs:
            raise ValueError(f"{self.kind} fusion expects {self.num_inputs} feature tensors, got {len(features)}")


class ConcatFusion(FusionHead):
    """A linear layer on the concatenated features."""

    kind = "concat"

    def __init__(self, num_inputs: int, d: int, k: int):
        super().__init__(num_inputs)
        self.fc = nn.Linear(num_inputs * d, k)

    def forward(self, *features: torch.Tensor) -> torch.Tensor:
        self.check(features)
        return self.fc(torch.cat(features, dim=1))


class SumFusion(FusionHead):
    """One linear layer per modality, outputs summed."""

    kind = "sum"
    legacy_keys = {"fc_a.": "fcs.0.", "fc_v.": "fcs.1."}

    def __init__(self, num_inputs: int, d: int, k: int):
        super().__init__(num_inputs)
        self.fcs = nn.ModuleList(nn.Linear(d, k) for _ in range(num_inputs))

    def forward(self, *features: torch.Tensor) -> torch.Tensor:
        self.check(features)
        out = self.fcs[0](features[0])
        for fc, h in zip(list(self.fcs)[1:], features[1:]):
            out = out + fc(h)
        return out


class FiLMFusion(FusionHead):
    """The second modality's features modulated by scale/shift predicted from the first's (M = 2)."""

    kind = "film"
    max_inputs = 2

    def __init__(self, num_inputs: int, d: int, k: int):
        super().__init__(num_inputs)
        self.film = nn.Linear(d, 2 * d)
        self.fc = nn.Linear(d, k)

    def forward(self, *features: torch.Tensor) -> torch.Tensor:
        self.check(features)
        cond, x = features
        gamma, beta = self.film(cond).chunk(2, dim=1)
        return self.fc(gamma * x + beta)


class GatedFusion(FusionHead):
    """The second modality's projection gated by a sigmoid of the first's (M = 2)."""

    kind = "gated"
    max_inputs = 2
    legacy_keys = {"fc_a.": "gate.", "fc_v.": "value."}

    def __init__(self, num_inputs: int, d: int, k: int, hidden: int | None = None):
        super().__init__(num_inputs)
        hidden = hidden or d
        self.gate, self.value = nn.Linear(d, hidden), nn.Linear(d, hidden)
        self.fc = nn.Linear(hidden, k)

    def forward(self, *features: torch.Tensor) -> torch.Tensor:
        self.check(features)
        cond, x = features
        return self.fc(torch.sigmoid(self.gate(cond)) * self.value(x))


FUSION_HEADS: dict[str, type[FusionHead]] = {c.kind: c for c in (ConcatFusion, SumFusion, FiLMFusion, GatedFusion)}


def check_fusion(fusion: str, num_modalities: int) -> None:
    """ValueError unless `fusion` is a known head that takes `num_modalities` inputs."""
    if fusion not in FUSION_HEADS:
        raise ValueError(f"unknown fusion {fusion!r}; choose from {FUSIONS}")
    limit = FUSION_HEADS[fusion].max_inputs
    if num_modalities < 1 or (limit is not None and num_modalities > limit):
        raise ValueError(f"{fusion} fusion takes {limit} modalities, not {num_modalities}; "
                         f"concat and sum fusion take any number")


def fusion_head(cfg: ModelConfig) -> FusionHead:
    """The configured fusion head for cfg's modalities."""
    check_fusion(cfg.fusion, len(cfg.modalities))
    return FUSION_HEADS[cfg.fusion](len(cfg.modalities), cfg.feature_dim, cfg.num_classes)


# ---------------------------------------------------------------------------------------
# the model

@dataclass
class MultiModel:
    """The exported modules of a finished run: one Branch per modality (in order) and the fusion head."""

    branches: dict[str, Branch]
    fusion: FusionHead
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if FUSION in self.branches:
            raise ValueError(f"{FUSION!r} is the fusion head's name, not a modality's")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.branches)

    def modules(self) -> dict[str, nn.Module]:
        """{modality: branch, ..., "fusion": head}: the keys of model.pt."""
        return {**self.branches, FUSION: self.fusion}

    def eval(self) -> MultiModel:
        for m in self.modules().values():
            m.eval()
        return self

    def to(self, device) -> MultiModel:
        for m in self.modules().values():
            m.to(device)
        return self

    @torch.no_grad()
    def __call__(self, inputs: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """{modality: batch} -> (features per modality, logits per modality and "fusion"); no grad."""
        feats, logits = {}, {}
        for name, branch in self.branches.items():
            feats[name], logits[name] = branch(inputs[name])
        logits[FUSION] = self.fusion(*(feats[n] for n in self.names))
        return feats, logits


def build_model_config(preset: str, num_classes: int, preprocess: PreprocessConfig, fusion: str = "concat",
                       **overrides: Any) -> ModelConfig:
    """A preset's architecture for the modalities of `preprocess`."""
    p = get_preset(preset)
    check_fusion(fusion, len(preprocess.modalities))
    kw = {"widths": p.widths, "blocks": p.blocks, **overrides}
    return ModelConfig(num_classes=num_classes, fusion=fusion,
                       modalities=tuple(s.to_dict() for s in preprocess.modalities), **kw)


def build_model(cfg: ModelConfig, preprocess: PreprocessConfig | None = None) -> MultiModel:
    """Fresh modules for cfg (`preprocess`, when given, must declare the same modalities)."""
    specs = cfg.specs
    if preprocess is not None and tuple(preprocess.modalities) != specs:
        raise ValueError(f"model modalities {[s.to_dict() for s in specs]} differ from the preprocessing "
                         f"config's {[s.to_dict() for s in preprocess.modalities]}")
    if not specs:
        raise ValueError("model config declares no modalities")
    branches = {s.name: Branch(build_encoder(s, cfg), cfg.feature_dim, cfg.num_classes) for s in specs}
    return MultiModel(branches, fusion_head(cfg))


__all__ = ["ModelConfig", "FUSIONS", "FUSION", "FUSION_HEADS", "Branch", "FusionHead",
           "ConcatFusion", "SumFusion", "FiLMFusion", "GatedFusion", "SpectrogramEncoder", "StackEncoder",
           "MultiModel", "build_model_config", "build_model", "build_encoder", "fusion_head", "check_fusion"]
