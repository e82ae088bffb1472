"""`python -m clients` / `dimml-score`: score media files with a bundle or a server.

    dimml-score score INPUT [INPUT ...] --out results.csv|results.jsonl (--server URL | --bundle BUNDLE [--engine ray])
    dimml-score predict [FIELD=]FILE [FIELD=FILE ...] (--server URL | --bundle BUNDLE)
`dimml-score INPUT ...` (no command) means `score`.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from clients.http import ClientError
from clients.inputs import DEFAULT_EXTS, IMAGE_DEFAULT_EXTS, InputError, parse_exts
from clients.output import OutputError
from dimml.engines import PRECISIONS  # numpy only; the engines import their runtimes when opened

COMMANDS = ("score", "predict")

# exit codes
EXIT_FAILED_FILES = 1   # with --fail-on-error: some file could not be scored
EXIT_USAGE = 2          # bad arguments, INPUT, --out, bundle or server at start
EXIT_SERVER_LOST = 3    # the server stopped answering mid-run (rows so far are kept)
RAY_SHARD_ROWS = 100_000   # --engine ray writes --out as shards of this many rows unless --shard-rows says

SCORE_EPILOG = f"""\
samples: what a sample is follows the model's source fields (bundle manifest / server /metadata):
  a model reading videos scores every video of a folder (a dataset layout adds labels and own
  files, e.g. CREMA-D's audio); a model of own files only (e.g. front:image,rear:image) scores
  the samples of a dataset layout naming them (manifest.csv with <name>_path columns, ModelNet40
  renders). A manifest .csv (label, `path` for the video and/or `<name>_path` columns) scores its rows.
engines: --bundle scores in this process; --bundle --engine ray on Ray Data actors (a local Ray, or the
  cluster at --address / RAY_ADDRESS; the files and the bundle must be readable by every node), writing
  the same rows, as shards of --shard-rows rows; --server sends the files to a running `dimml serve`.
output: one row per sample: path, label, confidence, prob_<class>..., weight_<branch>... (the
  model's modalities, then fusion), modalities_used ('+'-joined in CSV), error (empty when scored;
  else "<cause>: <message>"). Rows are appended as results arrive; an interrupted run leaves a valid file.
paths: the sample's video (else its first file), relative to the INPUT (a manifest .csv: to its
  folder; a single file: its name). With several INPUTs each path starts with its INPUT's folder
  name (data/a, data/b -> a/..., b/...).
labels: class sub-folders, a manifest.csv or a CREMA-D/AVE/UCF101/ModelNet40 layout in an INPUT
  give true labels: accuracy and a confusion matrix are printed at the end.
exit codes: 0 done; {EXIT_FAILED_FILES} some file failed (--fail-on-error); {EXIT_USAGE} bad arguments, inputs, --out,
  bundle or server; {EXIT_SERVER_LOST} server lost mid-run; 130 / 143 interrupted by SIGINT / SIGTERM
  (finish with --resume).
default extensions: {','.join(DEFAULT_EXTS)} (models reading images: {','.join(IMAGE_DEFAULT_EXTS)})
"""


def _at_least(kind, low, strict: bool = False):
    """argparse type: a number >= low (> low when strict)."""
    def parse(text: str):
        v = kind(text)
        if v < low or (strict and v == low):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low}, got {text}")
        return v
    return parse


def _add_model_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--server", metavar="URL", help="score through a running server (http://host:port)")
    src.add_argument("--bundle", metavar="BUNDLE", help="score in-process with a bundle folder or model-store tag")
    p.add_argument("--backend", default="auto",
                   help="local mode: inference backend or family (auto, onnxruntime, torch, onnxruntime-cpu, ...)")
    p.add_argument("--device-id", type=_at_least(int, 0), default=0,
                   help="local mode: the GPU index the GPU backends use (default %(default)s)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="local mode: auto runs a quantized bundle's checked int8 graphs on onnxruntime-cpu, "
                        "else fp32 (default %(default)s)")
    p.add_argument("--timeout", type=_at_least(float, 0, strict=True), default=120.0, help="remote mode: seconds per request")
    p.add_argument("--retries", type=_at_least(int, 0), default=3, help="remote mode: retries on 429/503/connection errors")
    p.add_argument("--max-wait", type=_at_least(float, 0), default=120.0,
                   help="remote mode: seconds to keep retrying a server that answers 503 with Retry-After "
                        "(its model restarting), past --retries (default %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dimml-score", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("score", help="score every sample of folders or manifests into a CSV / JSONL file",
                       description="Score every sample of the INPUTs (folders, media files or manifest "
                                   ".csv files), one row per sample.",
                       epilog=SCORE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("--out", required=True, type=Path, help="results file: .csv or .jsonl")
    _add_model_args(p)
    p.add_argument("--workers", type=_at_least(int, 0), default=0,
                   help="decode threads (local; default: CPU count) or concurrent requests (remote; default 8)")
    p.add_argument("--batch-size", type=_at_least(int, 1), default=32, help="local mode: clips per inference batch")
    p.add_argument("--recursive", "-r", action="store_true", help="walk sub-folders too")
    p.add_argument("--ext", default=None, help="comma-separated extensions a folder is walked for "
                                               "(default: video formats; image formats for image models)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="keep the rows of an existing --out; score the rest")
    mode.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--shard-rows", type=_at_least(int, 0), default=None,
                   help="write --out as shards of this many rows (results.csv -> results.00000.csv, ...); "
                        f"0: one file (default: 0, or {RAY_SHARD_ROWS} with --engine ray)")
    p.add_argument("--fail-on-error", action="store_true", help=f"exit {EXIT_FAILED_FILES} when any file failed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("Ray (--engine ray, pip install 'dimml[ray]')")
    g.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="with --bundle: score in this process (local, the default) or on Ray Data actors (ray)")
    g.add_argument("--address", default=None,
                   help="the Ray cluster to join (default: $RAY_ADDRESS, else a local Ray started for the run)")
    g.add_argument("--actors", type=_at_least(int, 0), default=0,
                   help="actors, each holding the model once (default: as many as the cluster's CPUs / GPUs hold)")
    g.add_argument("--cpus-per-actor", type=_at_least(float, 0, strict=True), default=1.0,
                   help="CPUs each actor reserves; it decodes with as many threads (default %(default)s)")
    g.add_argument("--gpus-per-actor", type=_at_least(float, 0), default=0.0,
                   help="GPUs each actor reserves; 0 runs the CPU backends (default %(default)s)")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("predict", help="classify one sample and print the result as JSON")
    p.add_argument("files", nargs="+", metavar="[FIELD=]FILE",
                   help="the sample's files by source field (e.g. video=clip.mp4 audio=voice.wav, or "
                        "front=f.png rear=r.png); a lone FILE is the model's only field (a video)")
    _add_model_args(p)
    p.set_defaults(func=cmd_predict)
    return parser


def cmd_score(args: argparse.Namespace) -> int:
    from clients.score import ScoreOptions, Stop, format_summary, graceful_stop, run_score

    ray = None
    if args.engine == "ray":
        from clients.ray_scoring import RayOptions

        ray = RayOptions(address=args.address, actors=args.actors, cpus_per_actor=args.cpus_per_actor,
                         gpus_per_actor=args.gpus_per_actor)
    shard_rows = args.shard_rows if args.shard_rows is not None else (RAY_SHARD_ROWS if ray else 0)
    opts = ScoreOptions(inputs=args.inputs, out=args.out, server=args.server, bundle=args.bundle,
                        workers=args.workers, recursive=args.recursive,
                        exts=None if args.ext is None else parse_exts(args.ext),
                        resume=args.resume, overwrite=args.overwrite, batch_size=args.batch_size,
                        backend=args.backend, device_id=args.device_id, precision=args.precision, timeout=args.timeout,
                        retries=args.retries, max_wait_s=args.max_wait, progress=not args.no_progress,
                        engine=args.engine,
                        shard_rows=shard_rows, ray=ray)
    with graceful_stop(Stop()) as stop:
        summary = run_score(opts, stop)
    print(format_summary(summary, args.out), flush=True)
    if summary.server_lost:
        return EXIT_SERVER_LOST
    if summary.interrupted is not None:
        return 128 + (summary.interrupted or signal.SIGINT)
    if args.fail_on_error and summary.failed:
        return EXIT_FAILED_FILES
    return 0


def parse_files(items: list[str]) -> dict[str, str] | str:
    """["video=a.mp4", "audio=b.wav"] -> {"video": ..., "audio": ...}; one bare FILE stays a path."""
    if len(items) == 1 and "=" not in items[0]:
        return items[0]
    out: dict[str, str] = {}
    for item in items:
        field, sep, path = item.partition("=")
        if not sep or not field or not path:
            raise InputError(f"{item!r}: give FIELD=FILE for each file of a sample of several files")
        if field in out:
            raise InputError(f"field {field!r} given twice")
        out[field] = path
    return out


def cmd_predict(args: argparse.Namespace) -> int:
    files = parse_files(args.files)
    if args.server:
        from clients.http import Client, RetryPolicy

        with Client(args.server, timeout=args.timeout,
                    retry=RetryPolicy(retries=args.retries, max_wait_s=args.max_wait)) as c:
            answer = c.predict(files).to_dict()
    else:
        from dimml.predict import Predictor

        predictor = Predictor(args.bundle, prefer=args.backend, device=args.device_id, precision=args.precision)
        try:
            answer = predictor.predict_files(files)
        except ValueError as e:   # files that do not fit the model's fields (MediaError stays itself)
            raise e if type(e) is not ValueError else InputError(str(e)) from None
    print(json.dumps(answer, indent=2))
    return 0


def _known_errors() -> tuple[type[BaseException], ...]:
    """Errors a user can cause (bad input, bundle, server): shown as one line, no traceback.

    Evaluated when an exception is being handled: only modules already imported can have raised.
    """
    errors: list[type[BaseException]] = [InputError, OutputError, ClientError, FileNotFoundError]
    for module, name in (("dimml.bundle", "BundleError"), ("dimml.media", "MediaError"),
                         ("dimml.engines", "EngineError"), ("dimml.extras", "MissingExtra")):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


def main(argv: list[str] | None = None, *, prog: str | None = None) -> int:
    """Run a command; `prog` names it in usage and errors (`dimml score` runs `score` as 'dimml score')."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        argv.insert(0, "score")
    parser = build_parser()
    from dimml.cli import parse_args
    args = parse_args(parser, argv, prog)
    name = prog or f"dimml-score {args.command}"
    try:
        return int(args.func(args) or 0)
    except _known_errors() as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:   # a second Ctrl-C: rows written so far are complete
        print(f"{name}: aborted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
