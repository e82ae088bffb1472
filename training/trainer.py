"""The training loop every method shares: data, optimiser, schedule, AMP, DDP, checkpoints, logs, report.

    fit(TrainConfig(data=..., out=RUN, method="dimml", preset="tiny"))

RUN/ holds config.json (resolved configuration, written first), checkpoint.pt (after every
epoch, atomically; removed once the run is complete), metrics.csv (one row per epoch),
train.log, and at the end model.pt, report.json, curves.png and confusion.png. Running the
same command again resumes from checkpoint.pt (e.g. after a SIGKILL), or says the run is
already finished (force=True starts over).

Defaults are the DI-MML paper's for the resnet18 preset (SGD momentum 0.9, weight decay 1e-4,
batch 16, lr 1e-3 x0.1 after 70 of 150 epochs; fusion stage 20 epochs, x0.1 after 10). The
tiny preset, for CPU tests and smoke runs, uses fewer epochs and a larger learning rate.
Multi-GPU / multi-process: `torchrun --nproc_per_node P -m training fit ...` (NCCL on CUDA,
gloo on CPU); batch_size is per process. Reproducible on the CPU for a fixed seed: the model
is initialised from the seed and every epoch reseeds data order and augmentation from
(seed, stage, epoch), so a resumed run equals an uninterrupted one.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from dimml.datasets import SPLITS, DatasetError, DatasetSpec, load_dataset, stratified_split
from dimml.fileio import atomic_write_bytes, atomic_write_json
from dimml.modalities import DEFAULT_MODALITIES, PreprocessConfig, preprocess_for
from training.augment import augment_frames
from training.logs import LOGGER, LOGGERS, Scalars, attach, detach, open_scalars
from training.cache import CachedDataset, DecodedCache, build_cache, default_cache_dir
from training.evaluate import AUTO, autocast, collect, evaluate, format_table, output_choices
from training.methods import Batch, Method, get_method
from training.models import FUSIONS, build_model, build_model_config, check_fusion
from training.run import CONFIG, REPORT, WEIGHTS, atomic_torch_save, run_config_fields, save_run_model

CHECKPOINT, METRICS, LOG = "checkpoint.pt", "metrics.csv", "train.log"
RUN_FILES = (CHECKPOINT, METRICS, LOG, CONFIG, WEIGHTS, REPORT, "curves.png", "confusion.png")

# Values a TrainConfig leaves None, per preset. resnet18: the paper. tiny: learns the
# synthetic corpus in seconds on a CPU. paper-cremad: the authors' released CREMA-D run (their
# README / run script): ResNet18, 10 s of audio at 16 kHz (257 x 1004), 3 frames at 224 with
# random resized crop + flip, SGD lr 1e-3 (x0.1 at epoch 70), 150 + 20 epochs, batch 16, DUC dot
# product at T = 50 (the default), and the paper's weighting at their fixed T = 1 as the output.
LR_STEP_FRACTION = 70 / 150       # the paper decays after 70 of 150 epochs
PAPER_SCHEDULE = dict(epochs=150, lr=1e-3, stage2_epochs=20, batch_size=16, lr_step_fraction=LR_STEP_FRACTION)
PRESET_DEFAULTS: dict[str, dict[str, Any]] = {
    "resnet18": PAPER_SCHEDULE,
    "tiny": dict(epochs=30, lr=2e-2, stage2_epochs=10, batch_size=16, lr_step_fraction=LR_STEP_FRACTION),
    # small: CPU minutes per run; the competition corpus of RESULTS.md (issue 14). Batch 8 and the
    # decay after 80 % of the epochs: a shape-only visual cue takes 10-25 epochs to be learnt alone,
    # and at the paper's 70/150 it was often cut off by the decay (unimodal visual 60 to 100 % by seed)
    "small": dict(epochs=30, lr=2e-2, stage2_epochs=10, batch_size=8, lr_step_fraction=0.8),
    "paper-cremad": {**PAPER_SCHEDULE, "lw_temperature": 1.0, "output": "paper-lw"},
}
# Fields that may change between a run and its resumption (how, not what, is computed).
VOLATILE = ("device", "workers", "decode_workers", "compile", "cache_dir", "eval_batch_size", "output", "logger")


@dataclass
class TrainConfig:
    """Everything a run depends on; None fields are filled by `resolve` (see PRESET_DEFAULTS)."""

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
    # final output: auto (weighting methods: chosen on validation; others: the fusion head) or forced:
    # fusion | <modality> | paper-lw (Eq. 8-9 at lw_temperature) | fitted (training.evaluate)
    output: str | None = None             # None: the preset's, else auto
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
    cache_dir: str | None = None          # None: training.cache.default_cache_dir(data root)
    split_file: str | None = None         # comma-separated split files (dimml.datasets.read_split_files),
                                          # e.g. the authors' CREMA-D train.csv,test.csv
    # overrides
    hparams: dict = field(default_factory=dict)      # method hyper-parameters (--set key=value)
    preprocess: dict = field(default_factory=dict)   # "<modality>.<param>" -> value (--set preprocess.visual.num_frames=3)

    def resolve(self) -> "TrainConfig":
        """A copy with every None default filled and choices checked."""
        if self.preset not in PRESET_DEFAULTS:
            raise ValueError(f"unknown preset {self.preset!r}; choose from {sorted(PRESET_DEFAULTS)}")
        for name, allowed in (("amp", ("auto", "bf16", "off")), ("compile", ("auto", "on", "off")),
                              ("fusion", FUSIONS), ("logger", LOGGERS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        names = self.preprocess_config().names   # unknown modalities, kinds or fields fail here
        d = PRESET_DEFAULTS[self.preset]
        output = self.output if self.output is not None else d.get("output", AUTO)
        if output not in output_choices(names):
            raise ValueError(f"output must be one of {output_choices(names)}, got {output!r}")
        # absolute data path: `evaluate --run RUN` and resumption work from any directory
        c = dataclasses.replace(self, data=os.path.abspath(self.data), hparams=dict(self.hparams),
                                preprocess=dict(self.preprocess), output=output)
        if c.split_file:
            c.split_file = ",".join(os.path.abspath(p.strip()) for p in c.split_file.split(",") if p.strip())
        c.lw_temperature = d.get("lw_temperature") if c.lw_temperature is None else c.lw_temperature
        c.epochs = d["epochs"] if c.epochs is None else c.epochs
        c.lr = d["lr"] if c.lr is None else c.lr
        c.batch_size = d["batch_size"] if c.batch_size is None else c.batch_size
        c.lr_step_epoch = max(1, round(c.epochs * d["lr_step_fraction"])) if c.lr_step_epoch is None else c.lr_step_epoch
        c.stage2_epochs = d["stage2_epochs"] if c.stage2_epochs is None else c.stage2_epochs
        c.stage2_lr = c.lr if c.stage2_lr is None else c.stage2_lr
        c.stage2_step = max(1, c.stage2_epochs // 2) if c.stage2_step is None else c.stage2_step
        if min(c.epochs, c.stage2_epochs) < 0 or min(c.lr_step_epoch, c.stage2_step, c.batch_size) < 1:
            raise ValueError("epochs must be >= 0; lr steps and batch_size >= 1")
        method = get_method(c.method)
        if c.fusion not in method.fusions:
            raise ValueError(f"method {c.method!r} supports fusion {method.fusions}, not {c.fusion!r}")
        method.check_modalities(len(names))
        check_fusion(c.fusion, len(names))
        method.make_hparams(c.hparams, c.epochs)   # unknown or invalid hyper-parameters fail here, early
        return c

    def preprocess_config(self) -> PreprocessConfig:
        """The run's modalities with the preset's parameters and the --set preprocess.* overrides."""
        return preprocess_for(self.preset, self.modalities, self.preprocess)


# ---------------------------------------------------------------------------------------
# data

@dataclass
class RunData:
    """A dataset, its decoded cache and the cache rows of each split."""

    spec: DatasetSpec
    cache: DecodedCache
    rows: dict[str, np.ndarray]
    val_carved: bool

    @property
    def sizes(self) -> dict[str, int]:
        return {s: int(len(r)) for s, r in self.rows.items()}


def read_dataset(cfg: TrainConfig, preprocess: PreprocessConfig) -> DatasetSpec:
    """The run's dataset with its splits, as the config reads it (layout, split seed and fractions, split files)."""
    return load_dataset(cfg.data, layout=cfg.layout, split_seed=cfg.split_seed, val_fraction=cfg.val_fraction,
                        test_fraction=cfg.test_fraction, speaker_disjoint=cfg.speaker_disjoint,
                        skip_bad=cfg.skip_bad, modalities=preprocess, split_id=cfg.split_id,
                        split_files=cfg.split_file.split(",") if cfg.split_file else ())


def prepare_data(cfg: TrainConfig, preprocess: PreprocessConfig, *, rank: int = 0, world: int = 1,
                 progress: bool = True) -> RunData:
    """Read the dataset, build (rank 0) or open (others) its cache, and index the splits.

    A dataset without a validation split gets one carved from train (val_fraction, or 0.1).
    """
    spec = read_dataset(cfg, preprocess)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir(spec.root)
    if rank > 0:
        dist.barrier()   # wait for rank 0 to build the cache, then open it
    cache = build_cache(spec.samples, preprocess, cache_dir, workers=cfg.decode_workers, skip_bad=cfg.skip_bad,
                        progress=progress and rank == 0)
    if rank == 0 and world > 1:
        dist.barrier()
    rows = {s: cache.subset([x.key for x in spec.split(s)]) for s in SPLITS}
    if len(rows["train"]) == 0:
        raise DatasetError(f"{spec.root}: no training samples")
    carved = len(rows["val"]) == 0
    if carved:   # the one class-stratified split, train rows only (keys: the rows, zero-padded so they sort)
        train = rows["train"]
        where = np.asarray(stratified_split([f"{r:012d}" for r in train], np.asarray(cache.labels[train]).tolist(),
                                            seed=cfg.split_seed, val_fraction=cfg.val_fraction or 0.1,
                                            test_fraction=0.0))
        rows["train"], rows["val"] = train[where == "train"], train[where == "val"]
    return RunData(spec, cache, rows, carved)


def run_train_config(config: dict[str, Any], out: str | os.PathLike, data: str | None = None,
                     cache_dir: str | None = None) -> TrainConfig:
    """The TrainConfig a finished run (its config.json, at `out`) was trained with, for reading its data
    again (evaluate, export --quantize, verify); `data` / `cache_dir` replace the recorded ones (a moved
    dataset). A run that records no dataset needs `data` (its split settings are then the defaults)."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    train = {k: v for k, v in (config.get("train") or {}).items() if k in known}
    if not (data or train.get("data")):
        raise ValueError(f"{out}: the run records no dataset (config.json has no 'train'); pass its --data")
    train.update(out=str(out), data=data or train["data"], cache_dir=cache_dir or train.get("cache_dir"))
    return TrainConfig(**train)


def make_loader(data: RunData, split: str, batch_size: int, workers: int, pin: bool,
                sampler: DistributedSampler | None = None) -> DataLoader:
    """Batches of ({modality: [B, *shape]}, label [B]) from the cache."""
    ds = CachedDataset(data.cache, data.rows[split])
    return DataLoader(ds, batch_size=batch_size, shuffle=False, sampler=sampler, num_workers=workers,
                      pin_memory=pin, persistent_workers=workers > 0, drop_last=False)


# ---------------------------------------------------------------------------------------
# the trainer

def pick_device(name: str, local_rank: int | None = None) -> torch.device:
    """auto | cpu | cuda | cuda:N -> a device (under DDP, cuda means cuda:LOCAL_RANK)."""
    want = ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: CUDA is not available on this machine")
    if want == "cuda":
        want = f"cuda:{local_rank if local_rank is not None else torch.cuda.current_device()}"
    device = torch.device(want)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def pick_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: bf16 for "bf16", or for "auto" on CUDA; None (fp32) otherwise."""
    return torch.bfloat16 if amp == "bf16" or (amp == "auto" and device.type == "cuda") else None


def augmented_names(preprocess: PreprocessConfig, augment: bool) -> tuple[str, ...]:
    """The modalities whose training batches are augmented (stacked-frame kinds that allow it)."""
    return tuple(s.name for s in preprocess.modalities if augment and s.kind_obj.augment and s.kind_obj.encoder == "stack")


def epoch_seed(seed: int, stage_index: int, epoch: int) -> int:
    return (seed * 1_000_003 + stage_index * 10_007 + epoch) % (2 ** 63)


class Trainer:
    """One run: set up, train every stage of the method (resuming), finalize, save, evaluate."""

    def __init__(self, cfg: TrainConfig, *, force: bool = False, progress: bool = True):
        self.cfg = cfg.resolve()
        self.force, self.progress = force, progress
        self.out = Path(self.cfg.out)
        self.history: list[dict] = []
        self._eval_loaders: dict[str, DataLoader] = {}
        self.scalars: Scalars = Scalars()   # TensorBoard when cfg.logger says so (rank 0, set in _run)
        self._log_handlers: list[logging.Handler] = []

    # ----- process group, device, logging

    def _setup(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = pick_device(self.cfg.device, int(os.environ.get("LOCAL_RANK", "0")) if self.world > 1 else None)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            # CPU convolutions return channels_last weight gradients for the frames' layout: harmless
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        self.main = self.rank == 0
        cuda = self.device.type == "cuda"
        self.amp_dtype = pick_amp(self.cfg.amp, self.device)
        self.compile = self.cfg.compile == "on" or (self.cfg.compile == "auto" and cuda)
        self.workers = self.cfg.workers if self.cfg.workers is not None else (4 if cuda else 0)

    def log(self, msg: str, level: int = logging.INFO) -> None:
        """A message of the run (rank 0): logger "dimml.train" -> RUN/train.log and stderr (training.logs)."""
        if not self.main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        LOGGER.log(level, msg)

    def broadcast(self, obj: Any) -> Any:
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return t
        t = t.detach().clone()
        dist.all_reduce(t)
        return t

    # ----- Context for methods

    @property
    def num_classes(self) -> int:
        return len(self.data.spec.classes)

    def features(self, split: str) -> tuple[dict[str, torch.Tensor], torch.Tensor] | None:
        if not self.main:
            return None
        o = collect(self.model, self.eval_loader(split), self.device, self.amp_dtype)
        return o.features, o.labels

    def eval_loader(self, split: str) -> DataLoader:
        """Sequential, unaugmented batches of a split (made once per split)."""
        if split not in self._eval_loaders:
            bs = self.cfg.eval_batch_size or 4 * self.cfg.batch_size
            self._eval_loaders[split] = make_loader(self.data, split, bs, self.workers, self.device.type == "cuda")
        return self._eval_loaders[split]

    # ----- run

    def run(self) -> dict | None:
        """Train (or resume) and evaluate; returns the report (rank 0; None on other ranks)."""
        self._setup()
        self._log_handlers = attach(self.out / LOG) if self.main else []   # detached below, whatever happens
        try:
            report = self._run()
            if self.world > 1:   # the other ranks wait for rank 0's evaluation: gloo torn down under a live peer aborts
                dist.barrier()
            return report
        finally:
            self.scalars.close()
            detach(self._log_handlers)
            if self.world > 1 and dist.is_initialized():
                dist.destroy_process_group()

    def _run(self) -> dict | None:
        cfg = self.cfg
        state = self.broadcast(self._start_state() if self.main else None)
        if self.main:
            self.scalars = open_scalars(cfg.logger, self.out, fresh=state == "fresh")
        if state == "finished":
            return json.loads((self.out / REPORT).read_text()) if self.main else None

        preprocess = cfg.preprocess_config()
        self.data = prepare_data(cfg, preprocess, rank=self.rank, world=self.world, progress=self.progress)
        classes = self.data.spec.classes
        method_cls = get_method(cfg.method)
        torch.manual_seed(cfg.seed)
        model_cfg = build_model_config(cfg.preset, len(classes), preprocess, cfg.fusion)
        self.model = build_model(model_cfg, preprocess)
        self.augmented = augmented_names(preprocess, cfg.augment)
        hp = method_cls.make_hparams(cfg.hparams, cfg.epochs)
        self.method: Method = method_cls(self.model, hp, len(classes))
        for m in (*self.method.modules().values(), *self.method.frozen.values()):
            m.to(self.device)
            if self.device.type == "cuda" and cfg.channels_last:
                m.to(memory_format=torch.channels_last)
        for m in self.method.frozen.values():   # method-owned, never trained (e.g. UMT's teachers)
            m.requires_grad_(False)
            m.eval()

        self.config = {
            "method": cfg.method, "description": method_cls.description,
            "inference": "weighted" if method_cls.weighting else "fused",
            "lw_temperature": cfg.lw_temperature, "unimodal_heads": self.method.unimodal_heads,
            "train": dataclasses.asdict(cfg), "hparams": dataclasses.asdict(hp),
            "data": {"root": str(self.data.spec.root), "layout": self.data.spec.layout,
                     "sizes": self.data.sizes, "val_carved": self.data.val_carved},
            **run_config_fields(preprocess, model_cfg, classes),
        }
        fingerprint = self._fingerprint(self.config)
        start_stage, start_epoch, opt_state = 0, 0, None
        ckpt_path = self.out / CHECKPOINT
        if state == "resume":
            ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
            if ck["config"] != fingerprint:
                raise ValueError(f"{ckpt_path}: checkpoint of a different configuration; rerun with the "
                                 f"same options, or pass --force to start over (or choose another --out)")
            for name, m in self.method.modules().items():
                m.load_state_dict(ck["modules"][name])
            self.method.load_state_dict(ck["method"])
            self.history = list(ck["history"])
            start_stage, start_epoch, opt_state = ck["stage_index"], ck["epoch"], ck["optimizer"]
            stages = self.method.stages
            where = stages[start_stage] if start_stage < len(stages) else "evaluation"
            self.log(f"resumed at epoch {start_epoch} of stage {where!r} from {ckpt_path}")
        if self.main:
            atomic_write_json(self.out / CONFIG, self.config)
            self.log(f"{cfg.method} on {self.data.spec.root} ({self.data.sizes}), preset {cfg.preset}, "
                     f"device {self.device}, {self.world} process(es)")

        for si in range(start_stage, len(self.method.stages)):
            self._train_stage(si, fingerprint, start_epoch if si == start_stage else 0,
                              opt_state if si == start_stage else None)
        if not self.main:
            return None
        return self._finish()

    def _start_state(self) -> str:
        """"finished", "resume" or "fresh" (rank 0; cleans up for a fresh or forced start)."""
        done = all((self.out / f).is_file() for f in (WEIGHTS, REPORT)) and not (self.out / CHECKPOINT).exists()
        if self.force:
            for f in RUN_FILES:
                (self.out / f).unlink(missing_ok=True)
            return "fresh"
        if done:
            tqdm.write(f"{self.out}: already finished (report.json and model.pt exist); pass --force to retrain",
                       file=sys.stderr)
            return "finished"
        if (self.out / CHECKPOINT).is_file():
            return "resume"
        for f in (METRICS, LOG):   # leftovers of a run killed before its first checkpoint
            (self.out / f).unlink(missing_ok=True)
        return "fresh"

    @staticmethod
    def _fingerprint(config: dict) -> dict:
        """The part of the config a checkpoint must match to be resumed."""
        fp = {k: v for k, v in config.items() if k not in ("unimodal_heads",)}
        fp["train"] = {k: v for k, v in config["train"].items() if k not in VOLATILE}
        return json.loads(json.dumps(fp))

    # ----- stages and epochs

    def _schedule(self, stage: str) -> tuple[int, float, int]:
        c = self.cfg
        return (c.stage2_epochs, c.stage2_lr, c.stage2_step) if stage == "fusion" else (c.epochs, c.lr, c.lr_step_epoch)

    def _wrap(self, module: torch.nn.Module):
        """A trainable module as `step` calls it: DDP-wrapped across processes, compiled where enabled."""
        from torch.nn.parallel import DistributedDataParallel as DDP
        net = module
        if self.world > 1:
            net = DDP(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return torch.compile(net) if self.compile else net

    def _train_stage(self, si: int, fingerprint: dict, start_epoch: int, opt_state: dict | None) -> None:
        stage = self.method.stages[si]
        n_epochs, base_lr, step_every = self._schedule(stage)
        trainable = self.method.trainable(stage)
        for m in self.method.modules().values():
            m.requires_grad_(False)
        for m in trainable.values():
            m.requires_grad_(True)
        nets = self.method.nets(stage, self._wrap)
        groups = self.method.param_groups(stage)
        for g in groups:   # a group's own initial rate (MSLR), else the stage's; both follow the schedule
            g["base_lr"] = g.get("lr", base_lr)
        optimizer = torch.optim.SGD(groups, lr=base_lr, momentum=self.cfg.momentum,
                                    weight_decay=self.cfg.weight_decay)
        if opt_state is not None:
            optimizer.load_state_dict(opt_state)
        sampler = DistributedSampler(CachedDataset(self.data.cache, self.data.rows["train"]),
                                     num_replicas=self.world, rank=self.rank, shuffle=True, seed=self.cfg.seed)
        loader = make_loader(self.data, "train", self.cfg.batch_size, self.workers,
                             self.device.type == "cuda", sampler)
        for epoch in range(start_epoch, n_epochs):
            lr = base_lr * self.cfg.lr_gamma ** (epoch // step_every)
            row = self._train_epoch(si, stage, epoch, n_epochs, lr, nets, optimizer, sampler, loader)
            self.history.append(row)
            last = epoch + 1 == n_epochs
            if self.main:
                ck = {"version": 1, "config": fingerprint, "stage_index": si + 1 if last else si,
                      "epoch": 0 if last else epoch + 1, "optimizer": None if last else optimizer.state_dict(),
                      "modules": {n: m.state_dict() for n, m in self.method.modules().items()},
                      "method": self.method.state_dict(), "history": self.history,
                      "rng": {"torch": torch.get_rng_state()}}
                atomic_torch_save(self.out / CHECKPOINT, ck)
                self._write_metrics()
        if n_epochs == 0 and self.main:
            self.log(f"stage {stage!r}: 0 epochs, skipped")

    def _train_epoch(self, si, stage, epoch, n_epochs, lr, nets, optimizer, sampler, loader) -> dict:
        t0 = time.time()
        seed = epoch_seed(self.cfg.seed, si, epoch)
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        sampler.set_epoch(si * 100_000 + epoch)
        self.method.on_epoch_start(stage, epoch, self)
        for m in self.method.modules().values():
            m.eval()
        for m in self.method.trainable(stage).values():
            m.train()
        for m in self.method.frozen.values():
            m.eval()
        stage_lr = self._schedule(stage)[1]
        decay = lr / stage_lr if stage_lr else 0.0

        sums: dict[str, torch.Tensor] = {}
        def add(key: str, v) -> None:
            v = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v))
            sums[key] = sums.get(key, 0) + v.to(self.device)

        bar = tqdm(loader, desc=f"{stage} {epoch + 1}/{n_epochs}", leave=False, unit="batch", file=sys.stderr,
                   disable=not (self.main and self.progress))
        seen = 0
        step0 = len(self.history) * len(loader)   # TensorBoard step: training batches so far, all stages
        for bi, (inputs, label) in enumerate(bar):
            inputs = {n: inputs[n].to(self.device, non_blocking=True) for n in self.model.names}
            label = label.to(self.device, non_blocking=True)
            for n in self.augmented:   # in model order: one generator, a fixed sequence of draws
                inputs[n] = augment_frames(inputs[n], generator=gen)
            optimizer.zero_grad(set_to_none=True)
            with autocast(self.device, self.amp_dtype):
                res = self.method.step(stage, Batch(inputs, label), nets)
            sum(res.losses.values()).backward()
            self.method.after_backward(stage, nets)
            scales = self.method.lr_scales()
            for g in optimizer.param_groups:
                g["lr"] = g.get("base_lr", stage_lr) * decay * scales.get(g["name"], 1.0)
            optimizer.step()
            if self.main and self.scalars.enabled:   # per-step values cost a device sync: only when logged
                self.scalars.write(step0 + bi, {"lr": lr, **{f"step/loss_{k}": v for k, v in res.losses.items()}})
            b = label.shape[0]
            seen += b
            for k, v in res.losses.items():
                add(f"loss_{k}", v * b)
            for k, v in res.logs.items():
                add(k, v * b)
            for k, z in res.logits.items():
                add(f"train_acc_{k}", (z.argmax(1) == label).sum())
            add("n", b)

        keys = sorted(sums)
        totals = self.all_reduce_sum(torch.stack([sums[k] for k in keys])) if keys else torch.zeros(0)
        totals = dict(zip(keys, totals.tolist()))
        n = totals.pop("n", 0) or 1
        row: dict[str, Any] = {"stage": stage, "epoch": epoch + 1, "lr": lr}
        row.update({k: v / n for k, v in totals.items()})
        self.method.on_epoch_end(stage, epoch, self)
        acc: dict[str, float] = {}
        if self.main and len(self.data.rows["val"]):
            o = collect(self.model, self.eval_loader("val"), self.device, self.amp_dtype)
            for k in self.method.outputs(stage):
                acc[k] = row[f"val_acc_{k}"] = float((o.logits[k].argmax(1) == o.labels).double().mean())
        # every rank gets rank 0's accuracies: methods that act on them (MSLR, MSES) stay in step
        self.method.on_validation_end(stage, epoch, self.broadcast(acc), self)
        row["time_s"] = round(time.time() - t0, 3)
        if self.main:
            self.scalars.write(step0 + len(loader), {f"epoch/{k}": v for k, v in row.items()
                                                     if k not in ("stage", "epoch") and isinstance(v, (int, float))})
        if self.main:
            shown = {k: v for k, v in row.items() if k.startswith(("loss_", "train_acc_", "val_acc_"))}
            self.log(f"{stage} epoch {epoch + 1}/{n_epochs} lr {lr:.3g} "
                     + " ".join(f"{k} {v:.4f}" for k, v in shown.items()) + f" ({row['time_s']:.1f}s)")
        return row

    def _write_metrics(self) -> None:
        first = ["stage", "epoch", "lr"]
        rest = sorted({k for r in self.history for k in r} - set(first) - {"time_s"},
                      key=lambda k: (not k.startswith("loss_"), not k.startswith("train_acc_"),
                                     not k.startswith("val_acc_"), k))
        buf = io.StringIO()
        w = csv.DictWriter(buf, first + rest + ["time_s"], restval="")
        w.writeheader()
        w.writerows(self.history)
        atomic_write_bytes(self.out / METRICS, buf.getvalue().encode())

    # ----- the end

    def _finish(self) -> dict:
        from training.plots import plot_confusion, plot_curves
        model = self.method.finalize(self)
        self.config["unimodal_heads"] = self.method.unimodal_heads
        save_run_model(self.out, self.config, model)
        method_cls = get_method(self.cfg.method)
        loaders = {s: self.eval_loader(s) for s in SPLITS}
        report = evaluate(model, loaders, method=self.cfg.method, num_classes=self.num_classes,
                          classes=self.data.spec.classes, weighting=method_cls.weighting,
                          lw_temperature=self.cfg.lw_temperature, device=self.device, amp_dtype=self.amp_dtype,
                          unimodal_heads=self.method.unimodal_heads, sizes=self.data.sizes,
                          progress=self.progress, output=self.cfg.output, log=self.log)
        atomic_write_json(self.out / REPORT, report)
        print(format_table(report), flush=True)
        plot_curves(self.history, self.out / "curves.png")
        plot_confusion(report["confusion"], self.data.spec.classes, self.out / "confusion.png",
                       title=f"{self.cfg.method}: {report['primary']} output, {report['eval_split']} split")
        (self.out / CHECKPOINT).unlink(missing_ok=True)   # last: the run is complete
        self.log(f"finished: {self.out / REPORT}")
        return report


def fit(cfg: TrainConfig, *, force: bool = False, progress: bool = True) -> dict | None:
    """Train cfg.method on cfg.data into cfg.out (resuming if a checkpoint is there); returns the report."""
    return Trainer(cfg, force=force, progress=progress).run()
