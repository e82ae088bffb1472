"""`python -m training fit` (train a method into RUN/) and `python -m training evaluate` (re-score RUN/).

    python -m training fit --data DATA --method dimml --out RUN [--preset tiny|resnet18]
        [--config run.yaml|RUN/config.json] [--print-config] [--logger csv|tensorboard]
        [--modalities audio,visual | visual,flow | front:image,rear:image | ...]
        [--device auto|cpu|cuda] [--epochs N] [--lr X] ... [--set KEY=VALUE ...] [--force]
    torchrun --nproc_per_node 2 -m training fit ...        (DDP; gloo on CPU, NCCL on CUDA)
    python -m training evaluate --run RUN [--data DATA]

Every TrainConfig field is a flag (--lr-step-epoch, --stage2-epochs, --no-augment, ...).
Method hyper-parameters: --set lambda_d=0.5 --set duc_distance=dot; preprocessing, per
modality: --set preprocess.visual.num_frames=3 --set preprocess.flow.num_pairs=5.
Methods: dimml, dimml-duc, dimml-sclf, mmclf, joint, mlb, dgl, unimodal, preds-avg, mses, mslr,
ogm-ge, pmr, umt (training/methods/; umt needs --set teachers=RUN, a finished unimodal run).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

# Flags with more to say than their default.
HELP = {
    "method": "training method (dimml, dimml-duc, dimml-sclf, mmclf, joint, mlb, dgl, unimodal, preds-avg, "
              "mses, mslr, ogm-ge, pmr, umt)",
    "preset": "model and preprocessing preset: resnet18 (the paper), tiny (CPU, seconds), small (CPU, minutes: the competition corpus of RESULTS.md) or paper-cremad "
              "(the authors' released CREMA-D run: 10 s audio, fixed T_lw = 1 paper-lw output)",
    "split_file": "comma-separated files assigning each clip its split: the authors' headerless "
                  "train.csv,test.csv (<clip>,<label> rows; split = file name) or a CSV with name and split "
                  "columns; unlisted clips are left out",
    "modalities": "the model's modalities, in order: built-in names (audio, visual, flow) or NAME:KIND "
                  "(e.g. front:image,rear:image)",
    "device": "auto | cpu | cuda | cuda:N",
    "epochs": "stage-1 / joint epochs (default: {epochs})",
    "lr": "learning rate (default: {lr})",
    "lr_step_epoch": "decay the learning rate x lr_gamma every this many epochs (default: this fraction of --epochs: {lr_step_fraction})",
    "batch_size": "batch size per process (default: {batch_size})",
    "stage2_epochs": "fusion-stage epochs of two-stage methods (default: {stage2_epochs})",
    "stage2_lr": "fusion-stage learning rate (default: --lr)",
    "stage2_step": "fusion-stage decay step (default: half of --stage2-epochs)",
    "fusion": "fusion head: concat | sum | film | gated",
    "lw_temperature": "certainty-weighting temperature T_lw (default: fitted on the validation split)",
    "output": "final output: auto (dimml: chosen on validation among the fusion head, each unimodal head, "
              "paper-lw and fitted; other methods: the fusion head) or forced: fusion | MODALITY | paper-lw "
              "(the paper's Eq. 8-9; with --lw-temperature fixed, exactly the paper) | fitted",
    "augment": "random resized crop + horizontal flip of training images (kinds that allow it)",
    "amp": "auto (bf16 autocast on CUDA) | bf16 | off",
    "compile": "torch.compile the trained modules: auto (on CUDA) | on | off",
    "workers": "DataLoader workers (default: 0 on CPU, 4 on CUDA)",
    "cache_dir": "preprocessing cache folder (default: $DIMML_CACHE_DIR or DATA/.dimml-cache)",
    "layout": "dataset layout: auto | manifest | folders | cremad | ave | ucf101 | modelnet40",
    "split_id": "UCF101: which of the three official train/test splits (trainlist0N.txt / testlist0N.txt)",
    "speaker_disjoint": "CREMA-D: split by speaker",
    "skip_bad": "skip missing or undecodable files with a warning instead of failing",
    "logger": "scalars: csv (metrics.csv, always written) | tensorboard (also per-step and per-epoch "
              "scalars in RUN/tensorboard/; needs pip install 'dimml[tensorboard]')",
}
NOT_FLAGS = ("data", "out", "hparams", "preprocess")


def _type_of(annotation: str):
    for name, t in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if annotation.split("|")[0].strip() == name:
            return t
    raise TypeError(f"no CLI type for {annotation!r}")


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, default None (= the config's default)."""
    from training.trainer import PRESET_DEFAULTS, TrainConfig
    # "{epochs}" in a help text -> "150 for resnet18, 30 for tiny", from the presets themselves
    per_preset = {k: ", ".join(f"{d[k]:.3g} for {name}" for name, d in PRESET_DEFAULTS.items())
                  for k in next(iter(PRESET_DEFAULTS.values()))}
    for f in dataclasses.fields(TrainConfig):
        if f.name in NOT_FLAGS:
            continue
        flag, t = "--" + f.name.replace("_", "-"), _type_of(str(f.type))
        helptext = HELP.get(f.name, f.name.replace("_", " ")).format(**per_preset)
        if f.default is not None:
            helptext += f" [default: {f.default}]"
        if t is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=helptext)
        else:
            p.add_argument(flag, dest=f.name, type=t, default=None, help=helptext)


def parse_sets(items: list[str]) -> tuple[dict, dict]:
    """--set KEY=VALUE items -> (method hyper-parameters, preprocessing overrides); values as JSON, else text."""
    hparams, preprocess = {}, {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if key.startswith("preprocess."):
            preprocess[key[len("preprocess."):]] = value
        else:
            hparams[key] = value
    return hparams, preprocess


def register(subparsers) -> None:
    p = subparsers.add_parser("fit", help="train a method into a run folder",
                              description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", default=None,
                   help="TrainConfig fields from a YAML or JSON file (a RUN/config.json as it is); flags override it")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved configuration (JSON, readable by --config) and exit")
    p.add_argument("--data", default=None, help="dataset folder or manifest CSV (required, here or in --config)")
    p.add_argument("--out", default=None,
                   help="run folder (RUN); an interrupted run there resumes (required, here or in --config)")
    _add_config_flags(p)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="method hyper-parameter (e.g. lambda_d=0.5) or preprocess.MODALITY.PARAM=VALUE; repeatable")
    p.add_argument("--force", action="store_true", help="start over, discarding a finished or interrupted run")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_fit)

    e = subparsers.add_parser("evaluate", help="re-evaluate a finished run (report.json, table, confusion.png)")
    e.add_argument("--run", required=True, help="run folder")
    e.add_argument("--data", default=None, help="dataset (default: the one the run was trained on)")
    e.add_argument("--device", default="auto")
    e.add_argument("--cache-dir", default=None)
    e.add_argument("--lw-temperature", type=float, default=None,
                   help="certainty-weighting temperature (default: the run's setting, else fitted on val)")
    e.add_argument("--output", default=None,
                   help="final output rule: auto | fusion | MODALITY | paper-lw | fitted (default: the run's setting)")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--workers", type=int, default=None)
    e.set_defaults(func=run_evaluate)


def run_fit(args: argparse.Namespace) -> int:
    from training.trainer import TrainConfig, fit
    try:
        from training.config_file import config_values, dump, merge, read_file
        hparams, preprocess = parse_sets(args.sets)
        names = {f.name for f in dataclasses.fields(TrainConfig)} - set(NOT_FLAGS) | {"data", "out"}
        from_file = config_values(read_file(args.config), args.config) if args.config else {}
        values = merge(from_file, {k: v for k, v in vars(args).items() if k in names}, hparams, preprocess)
        for key in ("data", "out"):
            if not values.get(key):
                raise ValueError(f"--{key} is required (on the command line or in --config)")
        cfg = TrainConfig(**values)
        if args.print_config:
            print(dump(dataclasses.asdict(cfg.resolve())))
            return 0
        fit(cfg, force=args.force, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as e:   # includes DatasetError and MediaError: the user's input
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate, format_table
    from training.methods import get_method
    from training.plots import plot_confusion
    from dimml.fileio import atomic_write_json
    from training.run import REPORT, load_run
    from training.trainer import make_loader, pick_amp, pick_device, prepare_data, run_train_config
    try:
        run = load_run(args.run)
        cfg = run_train_config(run.config, args.run, data=args.data, cache_dir=args.cache_dir)
        data = prepare_data(cfg, run.preprocess)
        if data.spec.classes != run.classes:
            raise ValueError(f"{cfg.data}: classes {data.spec.classes} differ from the run's {run.classes}")
        device = pick_device(args.device)
        workers = args.workers if args.workers is not None else (4 if device.type == "cuda" else 0)
        loaders = {s: make_loader(data, s, args.batch_size, workers, device.type == "cuda") for s in data.rows}
        lw = args.lw_temperature if args.lw_temperature is not None else run.config.get("lw_temperature")
        weighting = run.config.get("inference", "weighted" if get_method(run.method).weighting else "fused")
        report = evaluate(run.model.to(device), loaders, method=run.method, num_classes=len(run.classes),
                          classes=run.classes, weighting=weighting == "weighted", lw_temperature=lw,
                          device=device, amp_dtype=pick_amp(cfg.amp, device),
                          unimodal_heads=run.config.get("unimodal_heads", "trained"), sizes=data.sizes,
                          output=args.output or cfg.output or "auto")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    atomic_write_json(Path(args.run) / REPORT, report)
    plot_confusion(report["confusion"], run.classes, Path(args.run) / "confusion.png",
                   title=f"{run.method}: {report['primary']} output, {report['eval_split']} split")
    print(format_table(report))
    return 0
