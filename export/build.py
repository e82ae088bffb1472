"""A finished run -> a bundle folder (see dimml/bundle.py for the layout).

Everything is written into a hidden temporary folder beside the target and renamed into
place at the end, so a bundle folder that exists is always complete and verified (with
`--quantize int8`, its int8 graphs passed their accuracy check: export/quantize.py).
"""
from __future__ import annotations

import os
import platform
import shutil
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from dimml.bundle import FP32, INT8, BundleError, load_bundle, model_name, write_manifest
from export.tensorrt_build import TrtOptions

if TYPE_CHECKING:
    from export.quantize import QuantizeOptions


@dataclass
class BundleOptions:
    """What `python -m export bundle` can change."""

    name: str | None = None            # model name (BentoML-valid); default from the run folder
    opset: int = 18
    exporter: str = "dynamo"           # "dynamo" (torch.export) or "torchscript" (legacy)
    max_batch: int = 32                # largest batch TensorRT engines accept (profile max)
    tensorrt: bool = False
    trt: TrtOptions = field(default_factory=TrtOptions)
    force: bool = False                # replace an existing bundle folder
    quantize: QuantizeOptions | None = None   # also int8 graphs for the CPU (--quantize int8)


def package_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Versions of what made (and what can read) the bundle."""
    out = {"python": platform.python_version()}
    for pkg in ("dimml", "torch", "onnx", "onnxruntime", "onnxscript", *extra):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _metrics(report: dict[str, Any] | None) -> dict[str, Any]:
    """The run's test metrics from report.json (training.evaluate's "metrics", with its split)."""
    if not report:
        return {}
    return {"eval_split": report["eval_split"], **report["metrics"]}


def build_bundle(run_dir: str | os.PathLike, out: str | os.PathLike, opts: BundleOptions | None = None,
                 progress: bool = True) -> Path:
    """Export the run's modules (ONNX and torch.export programs), optionally build engines,
    write the manifest."""
    opts = opts or BundleOptions()
    from export.onnx_export import OPSET, check_parity, export_model, export_programs
    from training.run import CONFIG, REPORT, load_run

    run = load_run(run_dir)
    clips = None
    if opts.quantize is not None:   # the run's data first: a missing dataset fails before the export's minutes
        from export.quantize import run_clips
        clips = run_clips(run, opts.quantize, progress)
    if opts.tensorrt:
        from export.tensorrt_build import preflight
        preflight(opts.trt.device_id)
    out = Path(out)
    if out.exists() and not opts.force:
        raise FileExistsError(f"{out}: already exists; choose another --out or pass --force to replace it")
    if opts.opset != OPSET:
        print(f"note: exporting with opset {opts.opset} (tested with {OPSET})", file=sys.stderr)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    n_modules = len(run.preprocess.names) + 1
    steps = 2 * n_modules + (n_modules if opts.tensorrt else 0)
    cfg, dim = run.preprocess, run.model_cfg.feature_dim
    try:
        with tqdm(total=steps, desc=f"export {out.name}", unit="module", file=sys.stderr,
                  disable=not progress) as bar:
            modules = export_model(run.model, cfg, dim, tmp, opset=opts.opset, exporter=opts.exporter,
                                   progress=bar)
            (tmp / "torch").mkdir()
            programs = export_programs(run.model, cfg, dim, tmp, progress=bar)
            check_parity(run.model, cfg, dim, tmp, programs)
            # the run's config and report: provenance (the programs hold the weights)
            torch_files: dict[str, Any] = {"programs": programs, "config": f"torch/{CONFIG}"}
            if (run.path / REPORT).is_file():
                torch_files["report"] = f"torch/{REPORT}"
            for key in ("config", "report"):
                if key in torch_files:
                    shutil.copyfile(run.path / Path(torch_files[key]).name, tmp / torch_files[key])
            trt_entry = None
            if opts.tensorrt:
                from export.tensorrt_build import build_engines

                trt_opts = TrtOptions(**{**opts.trt.__dict__, "max_batch": opts.max_batch})
                trt_entry = build_engines(tmp, {m: tmp / e["file"] for m, e in modules.items()},
                                          trt_opts, progress=bar)
        fields = {
            "name": model_name(opts.name or run.path.resolve().name),
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "classes": run.classes,
            "modalities": list(cfg.names),
            "fields": list(cfg.fields),
            "preprocess": cfg.to_dict(),
            "feature_dim": dim,
            "fusion": run.model_cfg.fusion,
            "method": run.config.get("method"),
            # what it learnt from: the layout, split sizes and source fields (a flow tree shows as
            # "flow"), whose convention the preprocessing above records
            "data": {k: v for k, v in run.config.get("data", {}).items() if k in ("layout", "sizes", "sources")},
            "lw_temperature": run.lw_temperature,
            # the run's final output (chosen on validation, and why): what serving and scoring answer with
            "final_output": run.final_output.to_dict(),
            "metrics": _metrics(run.report),
            "onnx": {"opset": opts.opset, "exporter": opts.exporter, "precision": FP32, "modules": modules},
            "torch": torch_files,
            "max_batch": opts.max_batch,
            "versions": package_versions(("tensorrt",) if opts.tensorrt else ()),
        }
        if trt_entry is not None:
            fields["tensorrt"] = trt_entry
        write_manifest(tmp, fields)
        if opts.quantize is not None:
            from export.quantize import quantize_bundle

            # calibrated and checked through the fp32 bundle just written; refused (raises) past the tolerance
            # (checksums once, below: the int8 files join the manifest there)
            fields[INT8] = quantize_bundle(load_bundle(tmp, checksums=False), tmp, clips, opts.quantize, progress)
            write_manifest(tmp, fields)
        load_bundle(tmp)   # what we wrote must load
        _install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _install(tmp: Path, out: Path) -> None:
    """Rename tmp to out; an existing out (with --force) is moved aside first, then deleted."""
    if out.exists():
        if not (out / "manifest.json").is_file() and any(out.iterdir()):
            raise BundleError(f"{out}: exists and is not a bundle; refusing to replace it")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)


__all__ = ["BundleOptions", "build_bundle", "package_versions"]
