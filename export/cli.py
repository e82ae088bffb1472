"""`python -m export` / `dimml-export`: make, check and register model bundles.

  bundle   RUN -> BUNDLE (ONNX files, weights, manifest; optional int8 graphs for the CPU, TensorRT
           engines, registration)
  verify   PyTorch vs ONNX Runtime / TensorRT on real clips, and a quantized bundle's int8 graphs
           against fp32 on labelled clips; exit 0 only when parity (and the int8 tolerance) holds
  register copy a bundle into the BentoML model store
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {text!r}")
    return sizes


def cmd_bundle(args: argparse.Namespace) -> int:
    from dimml.bundle import int8_check_summary, load_bundle, register_bundle
    from export.build import BundleOptions, build_bundle
    from export.quantize import Int8Refused, QuantizeOptions
    from export.tensorrt_build import TrtOptions

    if args.fp16 and not args.tensorrt:
        print("error: --fp16 applies to TensorRT engines; add --tensorrt", file=sys.stderr)
        return 2
    quantize = None
    if args.quantize:
        quantize = QuantizeOptions(calibration_clips=args.calibration_clips, max_accuracy_drop=args.max_accuracy_drop,
                                   min_agreement=args.min_agreement, data=args.data, cache_dir=args.cache_dir)
    elif args.data or args.cache_dir:
        print("error: --data and --cache-dir are for --quantize int8 (its calibration and check clips)", file=sys.stderr)
        return 2
    opts = BundleOptions(name=args.name or args.register, opset=args.opset, exporter=args.exporter,
                         max_batch=args.max_batch, tensorrt=args.tensorrt, force=args.force, quantize=quantize,
                         trt=TrtOptions(fp16=args.fp16, max_batch=args.max_batch, opt_batch=args.opt_batch,
                                        workspace_gb=args.workspace_gb, timing_cache=args.timing_cache,
                                        version_compatible=args.version_compatible))
    try:
        out = build_bundle(args.run, args.out, opts, progress=not args.quiet)
    except Int8Refused as e:
        print(f"error: {e}; no bundle written", file=sys.stderr)
        return 1
    bundle = load_bundle(out)
    print(f"bundle {out}  ({bundle.name}:{bundle.version}, {len(bundle.classes)} classes, "
          f"{len(bundle.engines)} TensorRT engines, graphs {' + '.join(bundle.precisions)})")
    if bundle.int8:
        print(f"int8: {int8_check_summary(bundle.int8['check'])}; calibrated on "
              f"{bundle.int8['calibration']['clips']} {bundle.int8['calibration']['split']} clips")
    if args.register:
        print(f"registered {register_bundle(out, args.register)}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from export.verify import int8_lines, verify_bundle

    tolerance = {k: v for k, v in (("max_accuracy_drop", args.max_accuracy_drop),
                                   ("min_top1_agreement", args.min_agreement)) if v is not None}
    checks, summary = verify_bundle(args.bundle, args.data, backends=args.backend or None,
                                    batch_sizes=args.batch_sizes, limit=args.limit or None,
                                    progress=not args.quiet, tolerance=tolerance)
    print(f"{summary['model']['name']}:{summary['model']['version']} on {summary['clips']} clips "
          f"{summary['modalities']}" + (f", {len(summary['skipped'])} undecodable" if summary["skipped"] else ""))
    for s in summary["skipped"][:10]:
        print(f"  skipped: {s}")
    for c in checks:
        print(c.line())
    if "int8" in summary:
        print("\n".join(int8_lines(summary["int8"])))
    if args.report:
        from dimml.fileio import atomic_write_json
        atomic_write_json(Path(args.report), summary)
    parity = all(c.passed for c in checks)
    print(("parity OK" if parity else "parity FAILED")
          + ("" if "int8" not in summary else ", int8 OK" if summary["int8"]["passed"] else ", int8 REFUSED"))
    return 0 if summary["passed"] else 1


def cmd_register(args: argparse.Namespace) -> int:
    from dimml.bundle import register_bundle

    print(register_bundle(args.bundle, args.name))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from export.quantize import QuantizeOptions

    qdefaults = QuantizeOptions()
    parser = argparse.ArgumentParser(prog="dimml-export", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("bundle", help="export a finished run to a bundle folder")
    p.add_argument("--run", required=True, help="run folder (config.json, model.pt[, report.json])")
    p.add_argument("--out", required=True, help="bundle folder to create")
    p.add_argument("--tensorrt", action="store_true", help="also build TensorRT engines for this GPU")
    p.add_argument("--fp16", action="store_true", help="fp16 TensorRT engines (fp32 inputs/outputs)")
    p.add_argument("--max-batch", type=int, default=32, help="largest TensorRT batch (default 32)")
    p.add_argument("--opt-batch", type=int, default=None, help="TensorRT profile optimum (default min(8, max))")
    p.add_argument("--workspace-gb", type=float, default=4.0, help="TensorRT workspace limit (GiB)")
    p.add_argument("--timing-cache", type=Path, default=None, help="TensorRT timing cache file to reuse")
    p.add_argument("--version-compatible", action="store_true",
                   help="engines later TensorRT runtimes (incl. the lean runtime) can run")
    p.add_argument("--register", metavar="NAME", help="also store the bundle in the BentoML model store")
    p.add_argument("--name", help="model name in the manifest (default: --register NAME or the run folder)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo",
                   help="torch ONNX exporter (default dynamo)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle folder")
    q = p.add_argument_group("int8 for the CPU (ONNX Runtime static quantization, beside the fp32 graphs)")
    q.add_argument("--quantize", choices=("int8",), default=None,
                   help="also write int8 graphs, calibrated on the run's training split and checked against "
                        "fp32 on its test split; refused past the tolerance (default: fp32 only)")
    q.add_argument("--calibration-clips", type=int, default=qdefaults.calibration_clips,
                   help="training clips the activation ranges come from (default %(default)s)")
    q.add_argument("--max-accuracy-drop", type=float, default=qdefaults.max_accuracy_drop, metavar="POINTS",
                   help="test accuracy int8 may lose against fp32, in points (default %(default)s)")
    q.add_argument("--min-agreement", type=float, default=qdefaults.min_agreement, metavar="SHARE",
                   help="share of test clips on which int8 must answer as fp32 does (default %(default)s)")
    q.add_argument("--data", help="the run's dataset, where it has moved (default: the one it trained on)")
    q.add_argument("--cache-dir", help="the run's decode cache, where it has moved")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_bundle)

    p = sub.add_parser("verify", help="check engine parity against PyTorch on real clips")
    p.add_argument("bundle", help="bundle folder or BentoML model tag")
    p.add_argument("--data", required=True, help="dataset folder / manifest.csv, media folder, or one file")
    p.add_argument("--batch-sizes", type=_batch_sizes, default=[1, 4, 16], help="default 1,4,16")
    p.add_argument("--limit", type=int, default=64, help="clips to use (0: all; default 64)")
    p.add_argument("--backend", action="append", default=None,
                   choices=("onnxruntime-cpu", "onnxruntime-cuda", "tensorrt"),
                   help="backend to check (repeatable; default: all that run here)")
    p.add_argument("--report", help="write the results as JSON here")
    p.add_argument("--max-accuracy-drop", type=float, default=None, metavar="POINTS",
                   help="int8 graphs: test accuracy they may lose against fp32 (default: the bundle's, from export)")
    p.add_argument("--min-agreement", type=float, default=None, metavar="SHARE",
                   help="int8 graphs: share of test clips answered as fp32 does (default: the bundle's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("register", help="store a bundle in the BentoML model store")
    p.add_argument("bundle", help="bundle folder")
    p.add_argument("--name", help="model name (default: the manifest's)")
    p.set_defaults(func=cmd_register)
    return parser


def main(argv: list[str] | None = None, *, prog: str | None = None) -> int:
    """Run a command; `prog` names it in usage and errors (`dimml export` runs `bundle` as 'dimml export')."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    from dimml.cli import parse_args
    args = parse_args(parser, argv, prog)
    from dimml.bundle import BundleError
    from dimml.engines import EngineError
    try:
        return int(args.func(args) or 0)
    except (BundleError, EngineError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
