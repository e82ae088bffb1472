"""`python -m export verify`: PyTorch vs the bundle's engines on real decoded clips.

fp32 ONNX Runtime: max |logits difference| <= 1e-4 x max(1, max |logits|) for every branch and
the fusion (float32 rounding grows with the logits' magnitude, which trained heads push past
100), the same top-1 on every sample, and the same final answer (combined logits, label). TensorRT
engines (fp32 with other kernels, or fp16): top-1 agreement >= 99% and feature cosine
>= 0.999. Each at batch sizes 1 and several. The PyTorch reference is the bundle's
`torch.export` programs (torch/<module>.pt2), run on the CPU.

A quantized bundle's int8 graphs are checked against its fp32 graphs (both on ONNX Runtime CPU)
on the labelled test split of the data (the run's split settings, from the bundle's copy of its
config; the validation split when there is no test split), every clip of it: the accuracy of
both and their top-1 agreement, within the tolerance the bundle was exported with (or the one
given). Past it, verify refuses the int8 graphs (exit 1), as export does.
"""
from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from dimml.bundle import FP32, INT8, Bundle, int8_check_summary, load_bundle
from dimml.engines import INT8_BACKEND, Engine, TorchEngine, open_engine, usable_engines
from dimml.media import Clip, MediaError
from dimml.modalities import PreprocessConfig
from dimml.predict import Outputs, Predictor, decode_files
from export.onnx_export import scaled_diff

ATOL = 1e-4
MIN_TOP1 = 0.99
MIN_COSINE = 0.999
CHECK_CHUNK = 64   # clips decoded at a time by the int8 check (a whole test split can be gigabytes)
# what a plain media folder is searched for (datasets are read by dimml.datasets instead)
MEDIA_EXTS = {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".flv", ".mpg", ".mpeg", ".ts", ".3gp",
              ".wav", ".flac", ".mp3", ".ogg", ".m4a", ".aac", ".opus",
              ".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


@dataclass
class Check:
    """One comparison: backend at one batch size."""

    backend: str
    batch_size: int
    strict: bool
    passed: bool
    max_scaled_diff: float
    top1_agreement: float
    min_cosine: float
    combined_max_diff: float
    clips: int
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        mode = "fp32 strict" if self.strict else "loose"
        return (f"{'PASS' if self.passed else 'FAIL'}  {self.backend:<17} batch {self.batch_size:<3} "
                f"({mode}): max|dlogits|/scale {self.max_scaled_diff:.2e}  top-1 {self.top1_agreement:.2%}  "
                f"cos {self.min_cosine:.6f}  max|dZ| {self.combined_max_diff:.2e}"
                + ("".join(f"\n      - {p}" for p in self.problems)))


# ---------------------------------------------------------------------------------------
# data

def media_sources(data: str | os.PathLike, cfg: PreprocessConfig,
                  limit: int | None = None) -> list[dict[str, str]]:
    """The samples of a dataset or media folder as files keyed by source field.

    A dataset layout the readers know (manifest.csv with `path` / `<name>_path` columns, class
    folders, CREMA-D, AVE, UCF101, ModelNet40 renders) is read with dimml.datasets, test split
    first; any other folder is walked for media files, each one sample of the model's one source
    field ("video" for video-derived modalities); a file is one sample.
    """
    from dimml.datasets import DatasetError, load_dataset

    data = Path(data)
    fields = cfg.fields
    if data.is_file() and data.suffix.lower() != ".csv":
        return [{_single_field(fields, data): str(data)}]
    found: list[dict[str, str]] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            spec = load_dataset(data, modalities=cfg, min_classes=1)
        # test split first: the samples the model did not train on
        samples = sorted(spec.samples, key=lambda s: (s.split != "test", s.key))
        found = [dict(s.files) for s in samples]
    except DatasetError:
        found = []
    if not found:
        if not data.is_dir():
            raise FileNotFoundError(f"{data}: no such media folder or dataset")
        field = _single_field(fields, data)
        for dirpath, dirnames, filenames in os.walk(data):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found += [{field: str(Path(dirpath, n))} for n in sorted(filenames)
                      if not n.startswith(".") and Path(n).suffix.lower() in MEDIA_EXTS]
    if not found:
        raise FileNotFoundError(f"{data}: no media files found")
    return found[:limit] if limit else found


def _single_field(fields: tuple[str, ...], where: Path) -> str:
    """The one source field a lone media file can fill."""
    if len(fields) != 1:
        raise FileNotFoundError(f"{where}: this model reads {len(fields)} source files per sample "
                                f"({', '.join(fields)}); give a dataset whose manifest.csv names them")
    return fields[0]


def decode_all(sources: list[dict[str, str]], bundle: Bundle, progress: bool = True) -> tuple[list[Clip], list[str]]:
    """Decode every sample with the bundle's preprocessing; undecodable ones are listed, not fatal."""
    clips, skipped = [], []
    cfg = bundle.preprocess
    for files in tqdm(sources, desc="decode", unit="sample", file=sys.stderr, disable=not progress):
        try:
            clips.append(decode_files(files, cfg))
        except MediaError as e:
            skipped.append(str(e))
    return clips, skipped


# ---------------------------------------------------------------------------------------
# comparison

def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def compare(ref: list[Outputs], got: list[Outputs], backend: str, batch_size: int, strict: bool) -> Check:
    """Compare per-group Outputs of the reference and an engine (same grouping, same order)."""
    diffs, combined, cos, agree, total, problems = [0.0], [0.0], [1.0], 0, 0, []
    for r, g in zip(ref, got):
        for b in r.logits:
            d = scaled_diff(r.logits[b], g.logits[b])
            diffs.append(d)
            same = r.logits[b].argmax(1) == g.logits[b].argmax(1)
            agree, total = agree + int(same.sum()), total + len(same)
            if strict and not same.all():
                problems.append(f"{b}: top-1 differs on {int((~same).sum())} clip(s)")
        for b in r.features:
            cos.append(float(_cosine(r.features[b], g.features[b]).min()))
        combined.append(scaled_diff(r.combined, g.combined))
        same = r.combined.argmax(1) == g.combined.argmax(1)
        agree, total = agree + int(same.sum()), total + len(same)
        if strict and not same.all():
            problems.append(f"weighted answer: label differs on {int((~same).sum())} clip(s)")
    top1 = agree / max(total, 1)
    if strict:
        if max(diffs) > ATOL:
            problems.append(f"logits differ by {max(diffs):.3g} > {ATOL} (relative to their scale)")
        if max(combined) > ATOL:
            problems.append(f"weighted logits differ by {max(combined):.3g} > {ATOL} (relative to their scale)")
    else:
        if top1 < MIN_TOP1:
            problems.append(f"top-1 agreement {top1:.2%} < {MIN_TOP1:.0%}")
        if min(cos) < MIN_COSINE:
            problems.append(f"feature cosine {min(cos):.6f} < {MIN_COSINE}")
    return Check(backend, batch_size, strict, not problems, max(diffs), top1, min(cos), max(combined),
                 sum(len(r) for r in ref), problems)


def _run(predictor: Predictor, clips: list[Clip]) -> list[Outputs]:
    return [out for _, out in predictor.forward_clips(clips)]


def default_backends(bundle: Bundle) -> list[str]:
    """ONNX Runtime CPU always; CUDA and TensorRT where this machine can run them."""
    import onnxruntime as ort

    backends = ["onnxruntime-cpu"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        backends.append("onnxruntime-cuda")
    if usable_engines(bundle)[0]:
        backends.append("tensorrt")
    return backends


def verify_clips(bundle: Bundle, clips: list[Clip], *, backends: Sequence[str] | None = None,
                 batch_sizes: Sequence[int] = (1, 4, 16), engines: dict[str, Engine] | None = None) -> list[Check]:
    """All checks for these clips: every backend at every batch size against PyTorch (CPU)."""
    reference = Predictor(bundle, TorchEngine(bundle, "cpu"), max_batch=64)
    ref = _run(reference, clips)
    checks = []
    for backend in backends or default_backends(bundle):
        # the fp32 graphs: a quantized bundle's int8 ones are checked against them (int8_check)
        engine = (engines or {}).get(backend) or open_engine(bundle, backend, precision=FP32)
        strict = engine.backend.startswith("onnxruntime")   # fp32 graphs; TensorRT: loose
        sizes = sorted({min(b, engine.max_batch or b, len(clips)) for b in batch_sizes})
        for bs in sizes:
            got = _run(Predictor(bundle, engine, max_batch=bs), clips)
            checks.append(compare(ref, got, engine.backend, bs, strict))
    return checks


def labelled_split(data: str | os.PathLike, bundle: Bundle) -> tuple[str, list[dict[str, str]], list[int]]:
    """(split, files of each sample, labels in the bundle's class order) of the data's test split (the
    validation split when it has none), read with the run's split settings (the bundle's copy of its
    config.json). ValueError when the data holds no labelled samples."""
    from dimml.datasets import DatasetError
    from training.config import run_train_config

    config = {}
    if "config" in (bundle.manifest.get("torch") or {}):
        config = json.loads(bundle.file(bundle.manifest["torch"]["config"]).read_text())
    cfg = run_train_config(config, bundle.path, data=str(data))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            spec = cfg.load_dataset(bundle.preprocess)
    except DatasetError as e:
        raise ValueError(f"{data}: the int8 check needs labelled clips (a dataset the readers know), "
                         f"and this is not one ({e})") from None
    if spec.classes != bundle.classes:
        raise ValueError(f"{data}: classes {spec.classes} differ from the bundle's {bundle.classes}")
    split = "test" if spec.split("test") else "val"
    samples = spec.split(split)
    if not samples:
        raise ValueError(f"{data}: no test or validation samples to check int8 on")
    return split, [dict(s.files) for s in samples], [s.label for s in samples]


def int8_check(bundle: Bundle, data: str | os.PathLike, tolerance: dict[str, float] | None = None,
               batch_size: int = 16, progress: bool = True) -> dict[str, Any]:
    """The bundle's int8 graphs against its fp32 graphs on the labelled split of the data (every clip):
    export.quantize.precision_check's record, plus the undecodable clips it skipped."""
    from export.quantize import precision_check, precision_predictors, top1

    tolerance = {**{k: bundle.int8["check"][k] for k in ("max_accuracy_drop", "min_top1_agreement")},
                 **(tolerance or {})}
    split, sources, labels = labelled_split(data, bundle)
    predictors = precision_predictors(bundle, batch_size)
    cfg = bundle.preprocess
    answers: dict[str, list[np.ndarray]] = {p: [] for p in predictors}
    truth, skipped, clips, kept = [], [], [], []

    def answer() -> None:   # a chunk of decoded clips through both precisions (memory stays bounded)
        for p, predictor in predictors.items():
            groups = predictor.forward_clips(clips)
            answers[p].append(top1([out for _, out in groups]))
        truth.append(np.asarray(kept)[[i for idx, _ in groups for i in idx]])
        clips.clear()
        kept.clear()

    for i, files in enumerate(tqdm(sources, desc=f"int8 check, {split}", unit="sample", file=sys.stderr,
                                   disable=not progress)):
        try:
            clips.append(decode_files(files, cfg))
            kept.append(labels[i])
        except MediaError as e:
            skipped.append(str(e))
        if len(clips) == CHECK_CHUNK:
            answer()
    if clips:
        answer()
    if not truth:
        raise ValueError(f"{data}: none of the {split} clips could be decoded ({len(skipped)} failed)")
    check = precision_check(np.concatenate(truth), np.concatenate(answers[FP32]), np.concatenate(answers[INT8]),
                            split, tolerance)
    return {**check, "skipped": skipped}


def verify_bundle(source: str | os.PathLike, data: str | os.PathLike, *, backends: Sequence[str] | None = None,
                  batch_sizes: Sequence[int] = (1, 4, 16), limit: int | None = 64, progress: bool = True,
                  tolerance: dict[str, float] | None = None) -> tuple[list[Check], dict[str, Any]]:
    """Load (and checksum) the bundle, decode up to `limit` clips of data, run every check; for a
    quantized bundle (when onnxruntime-cpu is among the backends) also int8_check, whose record is the
    summary's "int8" (tolerance: the bundle's unless given)."""
    bundle = load_bundle(source)
    clips, skipped = decode_all(media_sources(data, bundle.preprocess, limit), bundle, progress)
    if not clips:
        raise ValueError(f"{data}: none of the clips could be decoded ({len(skipped)} failed)")
    checks = verify_clips(bundle, clips, backends=backends, batch_sizes=batch_sizes)
    groups = {}
    for c in clips:
        key = "+".join(c.modalities)
        groups[key] = groups.get(key, 0) + 1
    summary = {"bundle": str(bundle.path), "model": bundle.model_info(), "clips": len(clips),
               "modalities": groups, "skipped": skipped,
               "passed": all(c.passed for c in checks), "checks": [c.__dict__ for c in checks]}
    if bundle.int8 and (not backends or INT8_BACKEND in backends):
        try:
            summary[INT8] = int8_check(bundle, data, tolerance, progress=progress)
        except ValueError as e:   # no labelled clips here: the int8 graphs are unchecked, which is a failure
            summary[INT8] = {"passed": False, "problems": [str(e)]}
        summary["passed"] = summary["passed"] and summary[INT8]["passed"]
    return checks, summary


def int8_lines(check: dict[str, Any]) -> list[str]:
    """What verify prints of an int8 check: a PASS/FAIL line, then the refusal and its reasons."""
    from export.quantize import refusal

    if "clips" not in check:
        return [f"FAIL  int8 vs fp32 ({INT8_BACKEND}): {'; '.join(check['problems'])}",
                "int8 REFUSED: its accuracy against fp32 cannot be checked on this data"]
    lines = [f"{'PASS' if check['passed'] else 'FAIL'}  int8 vs fp32 ({INT8_BACKEND}): {int8_check_summary(check)}"]
    lines += [f"      - {p}" for p in check["problems"]]
    if not check["passed"]:
        lines.append(refusal(check).replace("int8 refused:", "int8 REFUSED:", 1))
    return lines


__all__ = ["verify_bundle", "verify_clips", "compare", "media_sources", "decode_all", "Check", "int8_check",
           "labelled_split", "int8_lines",
           "ATOL", "MIN_TOP1", "MIN_COSINE"]
