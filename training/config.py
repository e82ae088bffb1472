"""A run's configuration: TrainConfig, every field a flag of `dimml train`; its defaults come from a preset.

Torch-free, so that commands reading a dataset the way training does (`dimml inspect DATASET`)
stay light; `TrainConfig.resolve` imports the method and model registries only when called.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from dimml.datasets import DatasetSpec, load_dataset
from dimml.modalities import DEFAULT_MODALITIES, PreprocessConfig, preprocess_for
from dimml.presets import get_preset
from training.logs import LOGGERS

# TrainConfig fields renamed since runs were first written: old name -> new (old config.json files load)
RENAMED = {"output": "final_output"}
# Fields that may change between a run and its resumption (how, not what, is computed).
VOLATILE = ("device", "workers", "decode_workers", "compile", "cache_dir", "eval_batch_size", "final_output", "logger",
            "strict")


@dataclass
class TrainConfig:
    """Everything a run depends on; None fields are filled by `resolve` from the preset (dimml.presets)."""

    data: str
    out: str
    method: str = "dimml"
    preset: str = "resnet18"
    modalities: str = DEFAULT_MODALITIES  # e.g. "visual,flow" or "front:image,rear:image" (dimml.modalities)
    device: str = "auto"                  # auto | cpu | cuda | cuda:N
    seed: int = 0
    # optimisation (stage "encoders"/"joint")
    epochs: int | None = None
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_step_epoch: int | None = None      # None: the preset's fraction of epochs (70/150, the paper's; small 0.8)
    lr_gamma: float = 0.1
    batch_size: int | None = None         # None: the preset's (16, the paper's; small 8); per process under DDP
    # stage "fusion" (two-stage methods)
    stage2_epochs: int | None = None
    stage2_lr: float | None = None        # None: lr
    stage2_step: int | None = None        # None: half of stage2_epochs
    # model / inference
    fusion: str = "concat"
    lw_temperature: float | None = None   # None: fitted on the validation split
    # final output: auto (chosen on validation, ties to the weighting; the ablations: the fusion head) or forced:
    # fusion | <modality> | paper-lw (Eq. 8-9 at lw_temperature) | fitted (training.evaluate)
    final_output: str | None = None       # None: the preset's, else auto
    # execution
    augment: bool = True                  # random resized crop + flip of image kinds (training only)
    amp: str = "auto"                     # auto (bf16 on CUDA) | bf16 | off
    compile: str = "auto"                 # auto (on CUDA) | on | off
    channels_last: bool = True            # on CUDA
    workers: int | None = None            # DataLoader workers; None: 0 on CPU, 4 on CUDA
    decode_workers: int = 2               # processes decoding media into the cache
    eval_batch_size: int | None = None    # None: 4 x batch_size
    logger: str = "csv"                   # scalars: csv (metrics.csv) | tensorboard (also RUN/tensorboard/)
    # data
    layout: str = "auto"
    split_seed: int = 0
    split_id: int = 1                     # UCF101: which official train/test split (1..3)
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    speaker_disjoint: bool = False
    skip_bad: bool = False
    strict: bool = False                  # refuse media that decode with damage (else a warning per file)
    cache_dir: str | None = None          # None: training.cache.default_cache_dir(data root)
    split_file: str | None = None         # comma-separated split files (dimml.datasets.read_split_files),
                                          # e.g. the authors' CREMA-D train.csv,test.csv
    # overrides
    hparams: dict = field(default_factory=dict)      # method hyper-parameters (--set key=value)
    preprocess: dict = field(default_factory=dict)   # "<modality>.<param>" -> value (--set preprocess.visual.num_frames=3)

    def resolve(self) -> TrainConfig:
        """A copy with every None default filled and choices checked."""
        from training.evaluate import AUTO, output_choices
        from training.methods import get_method
        from training.models import FUSIONS, check_fusion
        preset = get_preset(self.preset)   # unknown presets fail here
        for name, allowed in (("amp", ("auto", "bf16", "off")), ("compile", ("auto", "on", "off")),
                              ("fusion", FUSIONS), ("logger", LOGGERS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        names = self.preprocess_config().names   # unknown modalities, kinds or fields fail here
        d, defaults = preset.schedule, preset.defaults
        final = self.final_output if self.final_output is not None else defaults.get("final_output", AUTO)
        if final not in output_choices(names):
            raise ValueError(f"final_output must be one of {output_choices(names)}, got {final!r}")
        # absolute data path: `evaluate --run RUN` and resumption work from any directory
        c = dataclasses.replace(self, data=os.path.abspath(self.data), hparams=dict(self.hparams),
                                preprocess=dict(self.preprocess), final_output=final)
        if c.split_file:
            c.split_file = ",".join(os.path.abspath(p.strip()) for p in c.split_file.split(",") if p.strip())
        c.lw_temperature = defaults.get("lw_temperature") if c.lw_temperature is None else c.lw_temperature
        c.epochs = d.epochs if c.epochs is None else c.epochs
        c.lr = d.lr if c.lr is None else c.lr
        c.batch_size = d.batch_size if c.batch_size is None else c.batch_size
        c.lr_step_epoch = max(1, round(c.epochs * d.lr_step_fraction)) if c.lr_step_epoch is None else c.lr_step_epoch
        c.stage2_epochs = d.stage2_epochs if c.stage2_epochs is None else c.stage2_epochs
        c.stage2_lr = c.lr if c.stage2_lr is None else c.stage2_lr
        c.stage2_step = max(1, c.stage2_epochs // 2) if c.stage2_step is None else c.stage2_step
        if min(c.epochs, c.stage2_epochs) < 0 or min(c.lr_step_epoch, c.stage2_step, c.batch_size) < 1:
            raise ValueError("epochs must be >= 0; lr steps and batch_size >= 1")
        method = get_method(c.method)
        if c.fusion not in method.fusions:
            raise ValueError(f"method {c.method!r} supports fusion {method.fusions}, not {c.fusion!r}")
        method.check_modalities(len(names))
        check_fusion(c.fusion, len(names))
        # the preset's defaults for this method, under what the user set (--set); then checked, early
        c.hparams = {**preset.method_hparams.get(c.method, {}), **c.hparams}
        method.make_hparams(c.hparams, c.epochs)
        return c

    def preprocess_config(self) -> PreprocessConfig:
        """The run's modalities with the preset's parameters and the --set preprocess.* overrides."""
        return preprocess_for(self.preset, self.modalities, self.preprocess)

    def load_dataset(self, preprocess: PreprocessConfig) -> DatasetSpec:
        """The run's dataset, read, checked and split as training reads it (dimml.datasets.load_dataset)."""
        return load_dataset(self.data, layout=self.layout, split_seed=self.split_seed, val_fraction=self.val_fraction,
                            test_fraction=self.test_fraction, speaker_disjoint=self.speaker_disjoint,
                            skip_bad=self.skip_bad, modalities=preprocess, split_id=self.split_id,
                            split_files=self.split_file.split(",") if self.split_file else ())


def run_train_config(config: dict, out: str | os.PathLike, data: str | None = None,
                     cache_dir: str | None = None) -> TrainConfig:
    """The TrainConfig a finished run (its config.json, at `out`) was trained with, for reading its data
    again (evaluate, export --quantize, verify); `data` / `cache_dir` replace the recorded ones (a moved
    dataset). A run that records no dataset needs `data` (its split settings are then the defaults)."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    train = {RENAMED.get(k, k): v for k, v in (config.get("train") or {}).items() if RENAMED.get(k, k) in known}
    if not (data or train.get("data")):
        raise ValueError(f"{out}: the run records no dataset (config.json has no 'train'); pass its --data")
    train.update(out=str(out), data=data or train["data"], cache_dir=cache_dir or train.get("cache_dir"))
    return TrainConfig(**train)


# The fields that say how the dataset is read and decoded (`dimml inspect DATASET` takes them too).
DATA_FIELDS = ("layout", "split_seed", "split_id", "val_fraction", "test_fraction", "speaker_disjoint", "skip_bad",
               "strict", "cache_dir", "split_file", "decode_workers")
