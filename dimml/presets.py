"""Presets: one record each, read by every command: the schedule, the inputs and the widths of a run.

    PRESETS["tiny"].schedule.epochs     # 30
    PRESETS["tiny"].inputs["frames"]    # {"num_frames": 2, "height": 64, "width": 64}
    PRESETS["tiny"].widths              # (8, 16, 32, 64)

`resnet18` is the papers' setting (DI-MML: SGD lr 1e-3 x0.1 after 70 of 150 epochs, batch 16;
fusion stage 20 epochs; ResNet18 encoders; the kinds' default inputs: 3 s of audio at 16 kHz,
3 frames at 224). `tiny` trains the synthetic corpus in seconds on a CPU; `small` is the CPU
preset of RESULTS.md's competition experiment; `paper-cremad` the DI-MML authors' released
CREMA-D run. Plain data: the core reads `inputs` (dimml.modalities.preprocess_for), the trainer
`schedule` and the run-level defaults, the model builder `widths` and `blocks`.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True)
class Schedule:
    """The optimisation a preset runs (every field a `dimml train` flag that overrides it)."""

    epochs: int                 # stage-1 / joint epochs
    lr: float
    stage2_epochs: int          # fusion-stage epochs of the two-stage methods
    batch_size: int             # per process
    lr_step_fraction: float     # decay x0.1 after this fraction of the epochs


@dataclass(frozen=True)
class Preset:
    """A named run setting: schedule, inputs per modality kind, encoder widths, run defaults."""

    name: str
    about: str                                  # one line, for --help
    schedule: Schedule
    inputs: Mapping[str, Mapping[str, Any]]     # kind -> preprocessing parameters (others: the kind's defaults)
    widths: tuple[int, ...]                     # ResNet stage widths; the feature size is the last
    blocks: tuple[int, ...]                     # BasicBlocks per stage
    defaults: Mapping[str, Any] = field(default_factory=dict)   # other TrainConfig fields (lw_temperature, final_output)
    # method -> hyper-parameter defaults of this preset (a method's own defaults otherwise; --set wins)
    method_hparams: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        freeze = lambda d: MappingProxyType({k: MappingProxyType(dict(v)) for k, v in d.items()})
        object.__setattr__(self, "inputs", freeze(self.inputs))
        object.__setattr__(self, "method_hparams", freeze(self.method_hparams))
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))


PAPER = Schedule(epochs=150, lr=1e-3, stage2_epochs=20, batch_size=16, lr_step_fraction=70 / 150)
RESNET18 = dict(widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2))
NARROW = dict(widths=(8, 16, 32, 64), blocks=(1, 1, 1, 1))
SMALL_IMAGES = {"frames": {"height": 64, "width": 64}, "flow": {"height": 64, "width": 64},
                "image": {"height": 64, "width": 64}}
# 30-epoch runs: the modulation windows as the references' fractions (OGM-GE 0-50 of 100 epochs,
# PMR 0-70 of 100), not their absolute epochs, which a 30-epoch run never leaves
SHORT_RUN_WINDOWS = {"ogm-ge": {"end": 0.5}, "pmr": {"end": 0.7}}

PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("resnet18", "the papers' setting: ResNet18, 150 + 20 epochs, 3 s audio, 3 frames at 224",
           PAPER, inputs={}, **RESNET18),
    Preset("tiny", "CPU, seconds: a narrow ResNet on 2 s of audio and two 64x64 frames, 30 + 10 epochs",
           Schedule(epochs=30, lr=2e-2, stage2_epochs=10, batch_size=16, lr_step_fraction=70 / 150),
           inputs={"audio": {"seconds": 2.0}, "frames": {"num_frames": 2, **SMALL_IMAGES["frames"]},
                   "flow": {"num_pairs": 2, **SMALL_IMAGES["flow"]}, "image": SMALL_IMAGES["image"]},
           method_hparams=SHORT_RUN_WINDOWS, **NARROW),
    # small: 2 s at 8 kHz -> a 129 x 99 spectrogram (cheaper than tiny's 257 x 199), 3 frames / pairs at
    # 64 x 64. Batch 8 and the decay after 80 % of the epochs: a shape-only visual cue takes 10-25 epochs
    # to be learnt alone, and at the paper's 70/150 it was often cut off by the decay
    Preset("small", "CPU, minutes: the competition corpus of RESULTS.md (tiny's widths, 3 frames, batch 8)",
           Schedule(epochs=30, lr=2e-2, stage2_epochs=10, batch_size=8, lr_step_fraction=0.8),
           inputs={"audio": {"sample_rate": 8000, "seconds": 2.0, "nperseg": 256, "noverlap": 96},
                   "frames": {"num_frames": 3, **SMALL_IMAGES["frames"]},
                   "flow": {"num_pairs": 3, **SMALL_IMAGES["flow"]}, "image": SMALL_IMAGES["image"]},
           method_hparams=SHORT_RUN_WINDOWS, **NARROW),
    # the DI-MML authors' CREMA-D run (their README / run script): 10 s at 16 kHz (257 x 1004), 3 frames
    # at 224, DUC dot product at T = 50 (the method's default), the paper's weighting at their fixed T = 1
    Preset("paper-cremad", "the DI-MML authors' CREMA-D run: ResNet18, 10 s of audio, fixed T_lw = 1 paper-lw output",
           PAPER, inputs={"audio": {"sample_rate": 16000, "seconds": 10.0},
                          "frames": {"num_frames": 3, "height": 224, "width": 224}},
           defaults={"lw_temperature": 1.0, "final_output": "paper-lw"}, **RESNET18),
)}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]


def describe() -> str:
    """"tiny (CPU, seconds: ...); small (...)": the presets for help texts."""
    return "; ".join(f"{p.name} ({p.about})" for p in PRESETS.values())


SCHEDULE_FIELDS = tuple(f.name for f in fields(Schedule))

__all__ = ["Preset", "Schedule", "PRESETS", "get_preset", "describe", "SCHEDULE_FIELDS"]
