"""The training loop every method shares, read top down: a run, its stages, their epochs, each step.

    fit(TrainConfig(data=..., out=RUN, method="dimml", preset="tiny"))

Trainer.run -> _run: where the run stands (training/checkpoint.py), its data (training/data.py)
and modules (_build), resuming (_resume), then each of the method's stages (_train_stage: the
trainable modules, their optimizer and the train loader), each epoch (_train_epoch: its steps,
totals over every rank, validation, the log line, one metrics.csv row, then checkpoint.pt) and
each step (_step: forward, backward, the method's gradient hook, the schedule's learning rates
from training/schedule.py, the update); then evaluation and report.json (_finish). The method's
hooks run where a reader expects them: on_epoch_start before the first step, after_backward
between backward and the update, lr_scales per step, on_epoch_end after the last step,
on_validation_end after validation.

RUN/ holds config.json (resolved configuration, written first), checkpoint.pt (after every
epoch, atomically; removed once the run is complete), metrics.csv (one row per epoch),
train.log, and at the end model.pt, report.json, curves.png and confusion.png. Running the
same command again resumes from checkpoint.pt (e.g. after a SIGKILL), or says the run is
already finished (force=True starts over).

Defaults come from the preset (dimml/presets.py; resnet18: the DI-MML paper's SGD momentum 0.9,
weight decay 1e-4, batch 16, lr 1e-3 x0.1 after 70 of 150 epochs, fusion stage 20 epochs x0.1
after 10). Multi-GPU / multi-process / several nodes: `torchrun [--nnodes N --rdzv_backend c10d
...] --nproc_per_node P -m training fit ...` (NCCL on CUDA, gloo on CPU; training/distributed.py):
batch_size is per process (the global batch is batch_size x WORLD_SIZE), each node's local rank
0 builds its decode cache, global rank 0 alone writes RUN/. Reproducible on the CPU for a fixed
seed: the model is initialised from the seed and every epoch reseeds data order and
augmentation from (seed, stage, epoch), so a resumed run equals an uninterrupted one.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm import tqdm

from dimml.datasets import SPLITS
from dimml.fileio import atomic_write_bytes, atomic_write_json
from dimml.modalities import PreprocessConfig
from training import checkpoint, distributed
from training.augment import augment_frames
from training.cache import CachedDataset
from training.checkpoint import CHECKPOINT, LOG, METRICS, RUN_FILES  # noqa: F401 (RUN_FILES: the run's files)
from training.config import TrainConfig
from training.data import RunData, make_loader, prepare_data  # noqa: F401 (RunData: re-exported)
from training.distributed import Ranks
from training.evaluate import autocast, collect, confusion_title, evaluate, format_table
from training.logs import LOGGER, Scalars, attach, detach, open_scalars
from training.methods import Batch, Method, StepResult, get_method
from training.models import build_model, build_model_config
from training.run import CONFIG, REPORT, read_report, run_config_fields, save_run_model
from training.schedule import StageSchedule, set_learning_rates, stage_schedule

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


@dataclass
class Stage:
    """One stage of a method while it trains: its schedule and the objects its epochs share."""

    index: int
    name: str
    schedule: StageSchedule
    nets: dict[str, torch.nn.Module]
    optimizer: torch.optim.Optimizer
    sampler: DistributedSampler
    loader: DataLoader


class EpochTotals:
    """Sums over an epoch's batches on the device (no sync per step): losses and logs weighted by
    batch size, correct predictions per output, the sample count; `means` reduces across ranks."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}

    def _add(self, key: str, v) -> None:
        v = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v))
        self.sums[key] = self.sums.get(key, 0) + v.to(self.device)

    def add(self, res: StepResult, label: torch.Tensor) -> None:
        b = label.shape[0]
        for k, v in res.losses.items():
            self._add(f"loss_{k}", v * b)
        for k, v in res.logs.items():
            self._add(k, v * b)
        for k, z in res.logits.items():
            self._add(f"train_acc_{k}", (z.argmax(1) == label).sum())
        self._add("n", b)

    def means(self, all_reduce_sum) -> dict[str, float]:
        """Per-sample means over every rank's batches."""
        keys = sorted(self.sums)
        totals = dict(zip(keys, all_reduce_sum(torch.stack([self.sums[k] for k in keys])).tolist())) if keys else {}
        n = totals.pop("n", 0) or 1
        return {k: v / n for k, v in totals.items()}


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
        self.ranks = Ranks.from_env()
        self.world, self.rank = self.ranks.world, self.ranks.rank
        self.device = pick_device(self.cfg.device, self.ranks.local_rank if self.world > 1 else None)
        if self.world > 1:
            distributed.start(self.device)
        self.main = self.ranks.main
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

    def _log_dataset(self) -> None:
        """The dataset's layout, classes and what is unusual about it; a warning per damaged file."""
        spec = self.data.spec
        self.log(f"dataset: {spec.layout} layout, {len(spec.samples)} samples, {spec.num_classes} classes")
        for note in spec.notes:
            self.log(f"dataset: {note}", logging.WARNING)
        for _, damage in self.data.cache.damaged:
            self.log(f"damaged media (trained on; --strict refuses): {'; '.join(damage)}", logging.WARNING)

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

    def batches(self, split: str, seed: int | None = None) -> Iterator[Batch]:
        """A split's batches on the device: shuffled by `seed` and augmented (training-like), or in
        order without augmentation (seed None)."""
        if seed is None:
            loader, augment = self.eval_loader(split), None
        else:
            order = RandomSampler(CachedDataset(self.data.cache, self.data.rows[split]),
                                  generator=torch.Generator().manual_seed(seed))
            loader = make_loader(self.data, split, self.cfg.batch_size, self.workers, self.device.type == "cuda",
                                 order)
            augment = torch.Generator().manual_seed(seed)
        for inputs, label in loader:
            yield self._to_device(inputs, label, augment)

    @property
    def optimizer_settings(self) -> dict[str, float]:
        """The stage-1 optimiser's lr, momentum and weight decay (a method's own search trains with them)."""
        return {"lr": self.cfg.lr, "momentum": self.cfg.momentum, "weight_decay": self.cfg.weight_decay}

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
            # the other ranks wait for rank 0's evaluation (however long: a group torn down under a live peer aborts)
            distributed.long_barrier(self.ranks)
            return report
        finally:
            self.scalars.close()
            detach(self._log_handlers)
            if self.world > 1:
                distributed.stop()

    def _run(self) -> dict | None:
        """Top down: where the run stands, its data and modules, resuming, every stage, the end."""
        state = self.broadcast(checkpoint.start_state(self.out, self.force) if self.main else None)
        if self.main:
            self.scalars = open_scalars(self.cfg.logger, self.out, fresh=state == "fresh")
        if state == "finished":
            return read_report(self.out) if self.main else None
        self._build()
        if state == "resume":
            start_stage, start_epoch, opt_state = self._resume()
        else:
            start_stage, start_epoch, opt_state = 0, 0, None
            self.method.prepare(self)   # e.g. MSLR's search for each encoder's initial rate
        if self.main:
            self._announce()
        for si in range(start_stage, len(self.method.stages)):
            self._train_stage(si, start_epoch if si == start_stage else 0, opt_state if si == start_stage else None)
        if self.world > 1:
            self._compare_weights()
        return self._finish() if self.main else None

    def _build(self) -> None:
        """The data and its cache, the model and the method on the device, the run's config.json contents."""
        cfg = self.cfg
        preprocess = cfg.preprocess_config()
        self.data = prepare_data(cfg, preprocess, ranks=self.ranks, progress=self.progress)
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
            "lw_temperature": cfg.lw_temperature, "unimodal_heads": self.method.unimodal_heads,
            "train": dataclasses.asdict(cfg), "hparams": dataclasses.asdict(hp),
            "data": {"root": str(self.data.spec.root), "layout": self.data.spec.layout,
                     "sizes": self.data.sizes, "val_carved": self.data.val_carved,
                     "sources": self.data.spec.summary()["sources"], "notes": self.data.spec.notes},
            **run_config_fields(preprocess, model_cfg, classes),
        }
        self.fingerprint = checkpoint.fingerprint(self.config)

    def _resume(self) -> tuple[int, int, dict | None]:
        """Load checkpoint.pt into the modules and the method; (stage index, epoch, optimizer state) to go on from."""
        path = self.out / CHECKPOINT
        ck, error = self.broadcast(checkpoint.load(path, self.fingerprint) if self.main else (None, None))
        if error:   # rank 0 reads it (RUN is rank 0's: other nodes have none), every rank gets it
            raise ValueError(error)
        for name, m in self.method.modules().items():
            m.load_state_dict(ck["modules"][name])
        self.method.load_state_dict(ck["method"])
        self.history = list(ck["history"])
        stages = self.method.stages
        where = stages[ck["stage_index"]] if ck["stage_index"] < len(stages) else "evaluation"
        self.log(f"resumed at epoch {ck['epoch']} of stage {where!r} from {path}")
        return ck["stage_index"], ck["epoch"], ck["optimizer"]

    def _announce(self) -> None:
        """config.json, then what runs where on what data (rank 0)."""
        cfg = self.cfg
        # what the method decided before training (MSLR: the initial rates it searched), beside the config
        self.config["method_record"] = self.method.record()
        atomic_write_json(self.out / CONFIG, self.config)
        self.log(f"{cfg.method} on {self.data.spec.root} ({self.data.sizes}), preset {cfg.preset}, "
                 f"device {self.device}, {self.world} process(es) on {self.ranks.nodes} node(s), "
                 f"global batch {cfg.batch_size * self.world} ({cfg.batch_size} per process)")
        self.log(f"decode cache {self.data.cache.directory}")
        self._log_dataset()

    def _compare_weights(self) -> None:
        """Log every rank's parameter checksum after the last stage (model.pt: rank 0's model, as the
        method finalizes it); warn if they differ."""
        sums = distributed.gather_objects(distributed.weights_checksum(self.model.modules()))
        listed = " ".join(f"{r}={c}" for r, c in enumerate(sums))
        if len(set(sums)) == 1:
            self.log(f"weights identical on every rank: sha256 by rank {listed}")
        else:
            self.log(f"weights differ between ranks (the saved model is rank 0's): sha256 by rank {listed}",
                     logging.WARNING)

    # ----- stages, epochs, steps: a stage sets up its nets and optimizer and runs its epochs; an
    # epoch runs its steps, then reduces, validates and logs; a step is forward, backward, update

    def _train_stage(self, si: int, start_epoch: int, opt_state: dict | None) -> None:
        stage = self._begin_stage(si, opt_state)
        for epoch in range(start_epoch, stage.schedule.epochs):
            self.history.append(self._train_epoch(stage, epoch))
            if self.main:
                checkpoint.save(self.out, config_fingerprint=self.fingerprint, stage_index=si, epoch=epoch,
                                last=epoch + 1 == stage.schedule.epochs, optimizer=stage.optimizer,
                                modules=self.method.modules(), method_state=self.method.state_dict(),
                                history=self.history)
                self._write_metrics()
        if stage.schedule.epochs == 0:
            self.log(f"stage {stage.name!r}: 0 epochs, skipped")

    def _begin_stage(self, si: int, opt_state: dict | None) -> Stage:
        """Which modules train (the others frozen), their nets, the optimizer, the sampler and loader."""
        name = self.method.stages[si]
        schedule = stage_schedule(self.cfg, name)
        for m in self.method.modules().values():
            m.requires_grad_(False)
        for m in self.method.trainable(name).values():
            m.requires_grad_(True)
        groups = self.method.param_groups(name)
        for g in groups:   # a group's own initial rate (MSLR), else the stage's; both follow the schedule
            g["base_lr"] = g.get("lr", schedule.base_lr)
        optimizer = torch.optim.SGD(groups, lr=schedule.base_lr, momentum=self.cfg.momentum,
                                    weight_decay=self.cfg.weight_decay)
        if opt_state is not None:
            optimizer.load_state_dict(opt_state)
        sampler = DistributedSampler(CachedDataset(self.data.cache, self.data.rows["train"]),
                                     num_replicas=self.world, rank=self.rank, shuffle=True, seed=self.cfg.seed)
        loader = make_loader(self.data, "train", self.cfg.batch_size, self.workers, self.device.type == "cuda",
                             sampler)
        return Stage(si, name, schedule, self.method.nets(name, self._wrap), optimizer, sampler, loader)

    def _wrap(self, module: torch.nn.Module):
        """A trainable module as `step` calls it: DDP-wrapped across processes, compiled where enabled."""
        from torch.nn.parallel import DistributedDataParallel as DDP
        net = module
        if self.world > 1:
            net = DDP(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return torch.compile(net) if self.compile else net

    def _train_epoch(self, stage: Stage, epoch: int) -> dict:
        """One epoch: its steps, then the totals over every rank, validation and the log line; one metrics row."""
        t0 = time.time()
        augment = self._begin_epoch(stage, epoch)
        totals = EpochTotals(self.device)
        batches = tqdm(stage.loader, desc=f"{stage.name} {epoch + 1}/{stage.schedule.epochs}", leave=False,
                       unit="batch", file=sys.stderr, disable=not (self.main and self.progress))
        step0 = len(self.history) * len(stage.loader)   # TensorBoard step: training batches so far, all stages
        for bi, (inputs, label) in enumerate(batches):
            batch = self._to_device(inputs, label, augment)
            res = self._step(stage, epoch, batch)
            totals.add(res, batch.label)
            if self.main and self.scalars.enabled:   # per-step values cost a device sync: only when logged
                self.scalars.write(step0 + bi, {"lr": stage.schedule.lr(epoch),
                                                **{f"step/loss_{k}": v for k, v in res.losses.items()}})
        row: dict[str, Any] = {"stage": stage.name, "epoch": epoch + 1, "lr": stage.schedule.lr(epoch),
                               **totals.means(self.all_reduce_sum)}
        self.method.on_epoch_end(stage.name, epoch, self)
        row.update(self._validate(stage.name, epoch))
        row["time_s"] = round(time.time() - t0, 3)
        self._log_epoch(stage, epoch, row, step0 + len(stage.loader))
        return row

    def _begin_epoch(self, stage: Stage, epoch: int) -> torch.Generator:
        """Seed the epoch from (seed, stage, epoch) (a resumed run equals an uninterrupted one), put the
        modules in their modes, run the method's hook; returns the augmentation's generator."""
        seed = epoch_seed(self.cfg.seed, stage.index, epoch)
        torch.manual_seed(seed)
        stage.sampler.set_epoch(stage.index * 100_000 + epoch)
        self.method.on_epoch_start(stage.name, epoch, self)
        for m in (*self.method.modules().values(), *self.method.frozen.values()):
            m.eval()
        for m in self.method.trainable(stage.name).values():
            m.train()
        return torch.Generator().manual_seed(seed)

    def _to_device(self, inputs: dict[str, torch.Tensor], label: torch.Tensor,
                   augment: torch.Generator | None) -> Batch:
        inputs = {n: inputs[n].to(self.device, non_blocking=True) for n in self.model.names}
        for n in self.augmented if augment is not None else ():   # in model order: one generator, fixed draws
            inputs[n] = augment_frames(inputs[n], generator=augment)
        return Batch(inputs, label.to(self.device, non_blocking=True))

    def _step(self, stage: Stage, epoch: int, batch: Batch) -> StepResult:
        """Forward, backward, the method's gradient hook (OGM-GE), this step's learning rates, the update."""
        stage.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.amp_dtype):
            res = self.method.step(stage.name, batch, stage.nets)
        sum(res.losses.values()).backward()
        self.method.after_backward(stage.name, stage.nets)
        set_learning_rates(stage.optimizer, stage.schedule.factor(epoch), self.method.lr_scales())
        stage.optimizer.step()
        return res

    def _validate(self, stage: str, epoch: int) -> dict[str, float]:
        """Validation accuracy of the stage's outputs (rank 0), given to every rank's method hook (MSLR, MSES)."""
        acc: dict[str, float] = {}
        if self.main and len(self.data.rows["val"]):
            o = collect(self.model, self.eval_loader("val"), self.device, self.amp_dtype)
            acc = {k: float((o.logits[k].argmax(1) == o.labels).double().mean()) for k in self.method.outputs(stage)}
        acc = self.broadcast(acc)
        self.method.on_validation_end(stage, epoch, acc, self)
        return {f"val_acc_{k}": v for k, v in acc.items()}

    def _log_epoch(self, stage: Stage, epoch: int, row: dict, step: int) -> None:
        if not self.main:
            return
        self.scalars.write(step, {f"epoch/{k}": v for k, v in row.items()
                                  if k not in ("stage", "epoch") and isinstance(v, (int, float))})
        shown = {k: v for k, v in row.items() if k.startswith(("loss_", "train_acc_", "val_acc_"))}
        self.log(f"{stage.name} epoch {epoch + 1}/{stage.schedule.epochs} lr {row['lr']:.3g} "
                 + " ".join(f"{k} {v:.4f}" for k, v in shown.items()) + f" ({row['time_s']:.1f}s)")

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
                          classes=self.data.spec.classes, chooses=method_cls.chooses_output,
                          lw_temperature=self.cfg.lw_temperature, device=self.device, amp_dtype=self.amp_dtype,
                          unimodal_heads=self.method.unimodal_heads, sizes=self.data.sizes,
                          progress=self.progress, final_output=self.cfg.final_output, log=self.log)
        atomic_write_json(self.out / REPORT, report)
        print(format_table(report), flush=True)
        plot_curves(self.history, self.out / "curves.png")
        plot_confusion(report["confusion"], self.data.spec.classes, self.out / "confusion.png",
                       title=confusion_title(report))
        (self.out / CHECKPOINT).unlink(missing_ok=True)   # last: the run is complete
        self.log(f"finished: {self.out / REPORT}")
        return report


def fit(cfg: TrainConfig, *, force: bool = False, progress: bool = True) -> dict | None:
    """Train cfg.method on cfg.data into cfg.out (resuming if a checkpoint is there); returns the report."""
    return Trainer(cfg, force=force, progress=progress).run()
