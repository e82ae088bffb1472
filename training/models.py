"""Encoders, unimodal branches and fusion heads.

The three exported pieces (see export/) are exactly the three modules built here:
    AudioBranch   spectrogram float32 [B, 1, F, T]   -> (features [B, D], logits [B, K])
    VisualBranch  frames uint8 [B, N, H, W, 3]       -> (features [B, D], logits [B, K])
    FusionHead    (audio [B, D], visual [B, D])      -> logits [B, K]
The batch dimension stays symbolic throughout (no Python ints taken from x.shape), so the
ONNX export has a dynamic batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

# ImageNet statistics, as the reference code's torchvision transforms use.
PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)
FUSIONS = ("concat", "sum", "film", "gated")


@dataclass
class ModelConfig:
    """Architecture of both encoders and the fusion head."""

    num_classes: int
    widths: tuple[int, ...] = (64, 128, 256, 512)   # ResNet18 stage widths; D = widths[-1]
    blocks: tuple[int, ...] = (2, 2, 2, 2)           # BasicBlocks per stage
    num_frames: int = 3                              # N, fixed per model (frames are pooled)
    fusion: str = "concat"

    @property
    def feature_dim(self) -> int:
        return self.widths[-1]


MODEL_PRESETS: dict[str, dict] = {
    "resnet18": dict(widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2)),
    "tiny": dict(widths=(8, 16, 32, 64), blocks=(1, 1, 1, 1)),
}


# ---------------------------------------------------------------------------------------
# ResNet18 (He et al. 2016), written out: torchvision is not usable beside this torch build.

class BasicBlock(nn.Module):
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


class AudioEncoder(nn.Module):
    """Spectrogram [B, 1, F, T] -> features [B, D] (global average pool)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.net = ResNet(1, cfg.widths, cfg.blocks)

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        return self.net(spec).mean(dim=(2, 3))


class VisualEncoder(nn.Module):
    """Frames [B, N, H, W, 3] (uint8 as decoded, or already-normalised float) -> features [B, D].

    Pixel normalisation lives inside the model so that callers (and the exported graph)
    take decoded frames as they are. Each frame goes through the ResNet; the features are
    averaged over frames and space, as the reference code's 3-D average pool does.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_frames = cfg.num_frames
        self.net = ResNet(3, cfg.widths, cfg.blocks)
        self.register_buffer("mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1) * 255.0, persistent=False)

    def normalize(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 [B, N, H, W, 3] -> float [B*N, 3, H, W], ImageNet-normalised."""
        x = frames.permute(0, 1, 4, 2, 3).flatten(0, 1).float()
        return (x - self.mean) / self.std

    def forward(self, frames: torch.Tensor, normalized: bool = False) -> torch.Tensor:
        # normalized=True: frames are already float [B*N, 3, H, W] (GPU augmentation path)
        x = frames if normalized else self.normalize(frames)
        fmap = self.net(x)                                   # [B*N, D, h, w]
        fmap = fmap.unflatten(0, (-1, self.num_frames))      # [B, N, D, h, w], B symbolic
        return fmap.mean(dim=(1, 3, 4))                      # [B, D]


class Branch(nn.Module):
    """One modality: encoder phi_i and its own linear head psi_i -> (features, logits)."""

    def __init__(self, encoder: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return h, self.head(h)


def audio_branch(cfg: ModelConfig) -> Branch:
    return Branch(AudioEncoder(cfg), cfg.feature_dim, cfg.num_classes)


def visual_branch(cfg: ModelConfig) -> Branch:
    return Branch(VisualEncoder(cfg), cfg.feature_dim, cfg.num_classes)


# ---------------------------------------------------------------------------------------
# Fusion heads: (audio features, visual features) -> logits. Layouts follow the fusion
# modules of the OGM-GE / DI-MML reference code.

class FusionHead(nn.Module):
    """Base: every fusion maps (a [B, D], v [B, D]) to logits [B, K]."""

    kind = "base"

    def forward(self, a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class ConcatFusion(FusionHead):
    kind = "concat"

    def __init__(self, d: int, k: int):
        super().__init__()
        self.fc = nn.Linear(2 * d, k)

    def forward(self, a, v):
        return self.fc(torch.cat([a, v], dim=1))


class SumFusion(FusionHead):
    kind = "sum"

    def __init__(self, d: int, k: int):
        super().__init__()
        self.fc_a, self.fc_v = nn.Linear(d, k), nn.Linear(d, k)

    def forward(self, a, v):
        return self.fc_a(a) + self.fc_v(v)


class FiLMFusion(FusionHead):
    """Visual features modulated by scale/shift predicted from audio features."""

    kind = "film"

    def __init__(self, d: int, k: int):
        super().__init__()
        self.film = nn.Linear(d, 2 * d)
        self.fc = nn.Linear(d, k)

    def forward(self, a, v):
        gamma, beta = self.film(a).chunk(2, dim=1)
        return self.fc(gamma * v + beta)


class GatedFusion(FusionHead):
    """Visual projection gated by a sigmoid of the audio projection."""

    kind = "gated"

    def __init__(self, d: int, k: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or d
        self.fc_a, self.fc_v = nn.Linear(d, hidden), nn.Linear(d, hidden)
        self.fc = nn.Linear(hidden, k)

    def forward(self, a, v):
        return self.fc(torch.sigmoid(self.fc_a(a)) * self.fc_v(v))


def fusion_head(cfg: ModelConfig) -> FusionHead:
    table = {c.kind: c for c in (ConcatFusion, SumFusion, FiLMFusion, GatedFusion)}
    if cfg.fusion not in table:
        raise ValueError(f"unknown fusion {cfg.fusion!r}; choose from {FUSIONS}")
    return table[cfg.fusion](cfg.feature_dim, cfg.num_classes)


@dataclass
class AVModel:
    """The three exported modules of a finished run (what export and evaluation consume)."""

    audio: Branch
    visual: Branch
    fusion: FusionHead
    extra: dict = field(default_factory=dict)

    def modules(self) -> dict[str, nn.Module]:
        return {"audio": self.audio, "visual": self.visual, "fusion": self.fusion}

    def eval(self) -> "AVModel":
        for m in self.modules().values():
            m.eval()
        return self

    def to(self, device) -> "AVModel":
        for m in self.modules().values():
            m.to(device)
        return self


def build_model_config(preset: str, num_classes: int, num_frames: int, fusion: str = "concat",
                       **overrides) -> ModelConfig:
    if preset not in MODEL_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(MODEL_PRESETS)}")
    kw = dict(MODEL_PRESETS[preset])
    kw.update(overrides)
    return ModelConfig(num_classes=num_classes, num_frames=num_frames, fusion=fusion, **kw)


def build_av_model(cfg: ModelConfig) -> AVModel:
    return AVModel(audio_branch(cfg), visual_branch(cfg), fusion_head(cfg))
