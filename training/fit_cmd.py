"""`python -m training fit` (train a method into RUN/) and `python -m training evaluate` (re-score RUN/).

    python -m training fit --data DATA --method dimml --out RUN [--preset tiny|resnet18]
        [--config run.yaml|RUN/config.json] [--print-config] [--logger csv|tensorboard]
        [--modalities audio,visual | visual,flow | front:image,rear:image | ...]
        [--device auto|cpu|cuda] [--epochs N] [--lr X] ... [--set KEY=VALUE ...] [--force]
    torchrun --nproc_per_node 2 -m training fit ...        (DDP; gloo on CPU, NCCL on CUDA)
    torchrun --nnodes N --nproc_per_node P --rdzv_backend c10d --rdzv_endpoint HOST:PORT \
        --max_restarts 0 -m training fit ...               (on every node: README, several nodes)
    python -m training evaluate --run RUN [--data DATA]

Every TrainConfig field is a flag (--lr-step-epoch, --stage2-epochs, --no-augment, ...).
Method hyper-parameters: --set lambda_d=0.5 --set duc_distance=dot; preprocessing, per
modality: --set preprocess.visual.num_frames=3 --set preprocess.flow.num_pairs=5.
The methods (--method) are training/methods/'s registry and the presets (--preset) dimml/presets.py's
table: both listed under their flags below.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

# Flags with more to say than their default.
HELP = {
    "method": "training method: {methods}",
    "preset": "schedule, inputs and widths: {presets}",
    "split_file": "files assigning each clip its split, comma-separated or the flag repeated (they add up): "
                  "the authors' headerless train.csv,test.csv (<clip>,<label> rows; split = file name) or a CSV "
                  "with name and split columns; unlisted clips are left out",
    "modalities": "the model's modalities, in order: built-in names (audio, visual, flow) or NAME:KIND "
                  "(e.g. front:image,rear:image)",
    "device": "auto | cpu | cuda | cuda:N",
    "epochs": "stage-1 / joint epochs (default: {epochs})",
    "lr": "learning rate (default: {lr})",
    "lr_step_epoch": "decay the learning rate x lr_gamma every this many epochs "
                     "(default: this fraction of --epochs: {lr_step_fraction})",
    "batch_size": "batch size per process; under torchrun the global batch is this x WORLD_SIZE, the learning "
                  "rate is not scaled (default: {batch_size})",
    "stage2_epochs": "fusion-stage epochs of two-stage methods (default: {stage2_epochs})",
    "stage2_lr": "fusion-stage learning rate (default: --lr)",
    "stage2_step": "fusion-stage decay step (default: half of --stage2-epochs)",
    "fusion": "fusion head: concat | sum | film | gated",
    "lw_temperature": "certainty-weighting temperature T_lw (default: fitted on the validation split)",
    "final_output": "the final output (what answers): auto (chosen on validation among the paper's weighting "
                    "paper-lw, the fitted weighting, the fusion head and each unimodal head, ties to the weighting; "
                    "the ablations dimml-duc, dimml-sclf, mmclf: their fusion head) or forced: paper-lw (the paper's "
                    "Eq. 8-9; with --lw-temperature fixed, exactly the paper) | fitted | fusion | MODALITY",
    "augment": "random resized crop + horizontal flip of training images (kinds that allow it)",
    "amp": "auto (bf16 autocast on CUDA) | bf16 | off",
    "compile": "torch.compile the trained modules: auto (on CUDA) | on | off",
    "workers": "DataLoader workers (default: 0 on CPU, 4 on CUDA)",
    "cache_dir": "preprocessing cache folder (default: $DIMML_CACHE_DIR or DATA/.dimml-cache)",
    "layout": "dataset layout: auto | manifest | folders | cremad | ave | ucf101 | modelnet40",
    "split_id": "UCF101: which of the three official train/test splits (trainlist0N.txt / testlist0N.txt)",
    "speaker_disjoint": "CREMA-D: split by speaker",
    "skip_bad": "skip missing or undecodable files with a warning instead of failing",
    "strict": "refuse media that decode with damage (frames the decoder flagged, streams far shorter than "
              "declared) instead of training on them with a warning each",
    "logger": "scalars: csv (metrics.csv, always written) | tensorboard (also per-step and per-epoch "
              "scalars in RUN/tensorboard/; needs pip install 'dimml[tensorboard]')",
}
NOT_FLAGS = ("data", "out", "hparams", "preprocess")
LIST_FLAGS = ("split_file",)   # comma-separated config fields whose flag may be repeated


def _type_of(annotation: str):
    for name, t in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if annotation.split("|")[0].strip() == name:
            return t
    raise TypeError(f"no CLI type for {annotation!r}")


def _help_values(names: set[str]) -> dict[str, str]:
    """What the help texts' {fields} stand for, from the registries themselves: "{epochs}" -> "150 for
    resnet18, 30 for tiny, ...", "{presets}" -> each preset with its line, "{methods}" -> every method."""
    from dimml.presets import PRESETS, SCHEDULE_FIELDS, describe
    out = {k: ", ".join(f"{getattr(p.schedule, k):.3g} for {name}" for name, p in PRESETS.items())
           for k in SCHEDULE_FIELDS}
    out["presets"] = describe()
    if "method" in names:   # the registry imports torch: only for the commands that take --method
        from training.methods import REGISTRY
        out["methods"] = ", ".join(f"{n} ({m.description})" if m.description else n for n, m in REGISTRY.items())
    return out


def add_config_flags(p: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    """One flag per TrainConfig field (or the fields in `only`), default None (= the config's default)."""
    from training.config import TrainConfig
    wanted = [f for f in dataclasses.fields(TrainConfig)
              if f.name not in NOT_FLAGS and (only is None or f.name in only)]
    values = _help_values({f.name for f in wanted})
    for f in wanted:
        flag, t = "--" + f.name.replace("_", "-"), _type_of(str(f.type))
        helptext = HELP.get(f.name, f.name.replace("_", " ")).format(**values).replace("%", "%%")
        if f.default is not None:
            helptext += f" [default: {f.default}]"
        if t is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=helptext)
        elif f.name == "final_output":   # --output: its name before the vocabulary had one name
            p.add_argument(flag, "--output", dest=f.name, type=t, default=None, help=helptext)
        elif f.name in LIST_FLAGS:   # repeatable: the values add up (joined with commas)
            p.add_argument(flag, dest=f.name, action="append", default=None, help=helptext)
        else:
            p.add_argument(flag, dest=f.name, type=t, default=None, help=helptext)


def config_flags(args: argparse.Namespace, names) -> dict:
    """The TrainConfig values given as flags (repeated list flags joined with commas)."""
    return {k: ",".join(v) if k in LIST_FLAGS and v is not None else v for k, v in vars(args).items() if k in names}


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


def add_config_options(p: argparse.ArgumentParser, out_help: str) -> None:
    """--config, --print-config, --data, --out, one flag per TrainConfig field and --set (fit and cache)."""
    p.add_argument("--config", metavar="FILE", default=None,
                   help="TrainConfig fields from a YAML or JSON file (a RUN/config.json as it is); flags override it")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved configuration (JSON, readable by --config) and exit")
    p.add_argument("--data", default=None, help="dataset folder or manifest CSV (required, here or in --config)")
    p.add_argument("--out", default=None, help=out_help)
    add_config_flags(p)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="method hyper-parameter (e.g. lambda_d=0.5) or preprocess.MODALITY.PARAM=VALUE; repeatable")


def config_from_args(args: argparse.Namespace, required: tuple[str, ...] = ("data", "out")):
    """The TrainConfig the options of add_config_options give (file < flags < --set); not yet resolved."""
    from training.config import TrainConfig
    from training.config_file import config_values, merge, read_file
    hparams, preprocess = parse_sets(args.sets)
    names = {f.name for f in dataclasses.fields(TrainConfig)} - set(NOT_FLAGS) | {"data", "out"}
    from_file = config_values(read_file(args.config), args.config) if args.config else {}
    values = merge(from_file, config_flags(args, names), hparams, preprocess)
    for key in required:
        if not values.get(key):
            raise ValueError(f"--{key} is required (on the command line or in --config)")
    values.setdefault("out", "")   # not required (dimml cache): nothing is written there
    return TrainConfig(**values)


def register(subparsers) -> None:
    p = subparsers.add_parser("fit", help="train a method into a run folder",
                              description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_options(p, "run folder (RUN); an interrupted run there resumes (required, here or in --config)")
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
    e.add_argument("--final-output", "--output", dest="final_output", default=None,
                   help="the final output: auto | paper-lw | fitted | fusion | MODALITY (default: the run's setting)")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--workers", type=int, default=None)
    e.set_defaults(func=run_evaluate)


def run_fit(args: argparse.Namespace) -> int:
    from training.trainer import fit
    try:
        from training.config_file import dump
        cfg = config_from_args(args)
        if args.print_config:
            print(dump(dataclasses.asdict(cfg.resolve())))
            return 0
        fit(cfg, force=args.force, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as e:   # includes DatasetError and MediaError: the user's input
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from dimml.fileio import atomic_write_json
    from training.config import run_train_config
    from training.evaluate import confusion_title, evaluate, format_table
    from training.methods import get_method
    from training.plots import plot_confusion
    from training.run import REPORT, load_run
    from training.trainer import make_loader, pick_amp, pick_device, prepare_data
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
        report = evaluate(run.model.to(device), loaders, method=run.method, num_classes=len(run.classes),
                          classes=run.classes, chooses=get_method(run.method).chooses_output, lw_temperature=lw,
                          device=device, amp_dtype=pick_amp(cfg.amp, device),
                          unimodal_heads=run.config.get("unimodal_heads", "trained"), sizes=data.sizes,
                          final_output=args.final_output or cfg.final_output or "auto")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    atomic_write_json(Path(args.run) / REPORT, report)
    plot_confusion(report["confusion"], run.classes, Path(args.run) / "confusion.png",
                   title=confusion_title(report))
    print(format_table(report))
    return 0
