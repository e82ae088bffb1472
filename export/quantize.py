"""INT8 graphs for the CPU: ONNX Runtime static quantization of a bundle's modules, calibrated on
clips of the run's training split and checked against fp32 on its test split.

    python -m export bundle --run RUN --out BUNDLE --quantize int8 [--calibration-clips 64]

Each module's fp32 graph (every branch and the fusion head) goes through ONNX Runtime's
`quant_pre_process` (shape inference, constant folding, batch-norm fusion) and `quantize_static`:
QDQ format, int8 weights per output channel (symmetric), uint8 activations per tensor
(asymmetric) with MinMax ranges over the calibration clips, read from the run's decode cache
(`training.trainer.prepare_data`: the same arrays training saw, without augmentation). The fusion
head is calibrated on the fp32 branches' features of the same clips. u8 activations x s8 weights
is the combination ONNX Runtime's fast x86 kernels take (VNNI / AMX); s8 x s8 QDQ graphs ran no
faster than fp32 on the development CPU (BENCHMARKS.md).

The check runs the fp32 and the int8 graphs over the run's test split (its validation split when
it has no test split) through `dimml.predict.Predictor`, so it compares the bundle's final
answers (its output rule): int8 may lose at most `max_accuracy_drop` points of accuracy and must
give fp32's top-1 on at least `min_agreement` of the clips. A bundle whose int8 graphs fail is not
written (`Int8Refused`); `python -m export verify` runs the same check (`precision_check`) on
decoded media. The manifest's `int8` entry records the graphs, the recipe, the calibration set
(split, count, sample keys) and the check; `dimml.engines.choose_precision` serves int8 only where
that check passed.
"""
from __future__ import annotations

import hashlib
import platform
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from tqdm import tqdm

from dimml.bundle import FP32, FUSION, INT8, Bundle
from dimml.engines import OrtEngine, int8_cpu_features

if TYPE_CHECKING:
    from dimml.predict import Outputs

# what the manifest records of how the graphs were made (one place: written and documented from here)
RECIPE = {"tool": "onnxruntime.quantization.quantize_static", "format": "QDQ",
          "weights": "int8, per output channel, symmetric", "activations": "uint8, per tensor, asymmetric",
          "calibration_method": "MinMax", "pre_process": "onnxruntime.quantization.shape_inference.quant_pre_process"}


class Int8Refused(ValueError):
    """The int8 graphs lose more accuracy against fp32 than the tolerance allows."""


@dataclass
class QuantizeOptions:
    """What `python -m export bundle --quantize int8` can change."""

    calibration_clips: int = 64       # clips of the training split the activation ranges come from
    max_accuracy_drop: float = 1.0    # points of test accuracy int8 may lose against fp32
    min_agreement: float = 0.95       # share of test clips on which int8 must give fp32's top-1
    seed: int = 0                     # which training clips calibrate (a seeded draw)
    batch_size: int = 8               # clips per calibration / check batch
    data: str | None = None           # the run's dataset, where it moved (default: the run's own)
    cache_dir: str | None = None      # its decode cache, where it moved

    def __post_init__(self):
        if self.calibration_clips < 1:
            raise ValueError(f"calibration clips must be >= 1, got {self.calibration_clips}")
        if self.max_accuracy_drop < 0:
            raise ValueError(f"the accuracy drop tolerance must be >= 0 points, got {self.max_accuracy_drop}")
        if not 0 <= self.min_agreement <= 1:
            raise ValueError(f"the top-1 agreement minimum must be in [0, 1], got {self.min_agreement}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")

    @property
    def tolerance(self) -> dict[str, float]:
        return {"max_accuracy_drop": self.max_accuracy_drop, "min_top1_agreement": self.min_agreement}


@dataclass
class ClipSet:
    """Clips of one split: labels, sample keys, and their model input arrays read a batch at a time
    (a test split of the paper's sizes is gigabytes decoded; the cache is memory-mapped)."""

    split: str
    labels: np.ndarray                                   # int [N]
    keys: list[str]                                      # the samples' keys (dimml.datasets.Sample.key)
    read: Callable[[slice], dict[str, np.ndarray]]       # rows -> modality -> [n, *spec.shape] in spec.dtype

    @classmethod
    def of_arrays(cls, split: str, arrays: Mapping[str, np.ndarray], labels: np.ndarray, keys: list[str]) -> ClipSet:
        """Clips held in memory (modality -> [N, *spec.shape])."""
        return cls(split, np.asarray(labels), list(keys), lambda rows: {k: v[rows] for k, v in arrays.items()})

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, size: int) -> Iterator[dict[str, np.ndarray]]:
        for i in range(0, len(self), size):
            yield {k: np.ascontiguousarray(v) for k, v in self.read(slice(i, i + size)).items()}


# ---------------------------------------------------------------------------------------
# the run's data

def run_clips(run: Any, opts: QuantizeOptions, progress: bool = True) -> tuple[ClipSet, ClipSet, dict[str, Any]]:
    """(calibration clips from the training split, check clips from the test split, where they came
    from), read from the run's decode cache (built, or completed, if it is missing)."""
    from training.config import run_train_config
    from training.data import prepare_data

    cfg = run_train_config(run.config, run.path, data=opts.data, cache_dir=opts.cache_dir)
    data = prepare_data(cfg, run.preprocess, progress=progress)
    if data.spec.classes != run.classes:
        raise ValueError(f"{cfg.data}: classes {data.spec.classes} differ from the run's {run.classes}")
    train = np.asarray(data.rows["train"])
    n = min(opts.calibration_clips, len(train))
    pick = np.sort(np.random.default_rng(opts.seed).choice(len(train), n, replace=False))
    split = "test" if len(data.rows["test"]) else "val"
    if not len(data.rows[split]):
        raise ValueError(f"{cfg.data}: the run has neither a test nor a validation split to check int8 on")
    calib = _clip_set(data.cache, "train", train[pick], run.preprocess)
    check = _clip_set(data.cache, split, np.asarray(data.rows[split]), run.preprocess)
    root = Path(data.spec.root)
    source = {"data": str(root), "layout": data.spec.layout, "cache": str(data.cache.directory)}
    return calib, check, source


def _clip_set(cache: Any, split: str, rows: np.ndarray, preprocess: Any) -> ClipSet:
    order = np.sort(rows)   # memory-mapped rows read in file order
    keys = cache.keys

    def read(sel: slice) -> dict[str, np.ndarray]:
        return {s.name: np.asarray(cache.array(s.name)[order[sel]], dtype=s.dtype) for s in preprocess.modalities}

    return ClipSet(split, np.asarray(cache.labels[order], dtype=np.int64), [keys[int(r)] for r in order], read)


# ---------------------------------------------------------------------------------------
# quantization


def quantize_graph(src: Path, dst: Path, feeds: Sequence[dict[str, np.ndarray]], work: Path) -> None:
    """One fp32 ONNX graph -> its int8 QDQ graph, activation ranges from `feeds` (input name -> batch)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    pre, raw = work / f"{src.stem}.pre.onnx", work / f"{src.stem}.qdq.onnx"
    # symbolic shape inference (for transformers) trips over the exported Reshapes; ONNX shape inference suffices here
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(raw), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    onnx.save(float_outputs(onnx.load(str(raw))), str(dst))


def float_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop the Quantize/DequantizeLinear pair the quantizer puts on each graph output: features and
    logits leave the graph in float, not on a 256-level grid (which ties close logits of the answer);
    what consumes them inside (a head's Gemm) then runs in float, a negligible cost."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    drop, rename = set(), {}
    for out in g.output:
        dq = producer.get(out.name)
        q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear" or len(consumers.get(q.output[0], [])) != 1:
            continue
        drop |= {id(q), id(dq)}
        rename[q.input[0]] = out.name   # the float tensor the pair rounded becomes the output itself
    nodes = [n for n in g.node if id(n) not in drop]
    for n in nodes:
        n.input[:] = [rename.get(i, i) for i in n.input]
        n.output[:] = [rename.get(o, o) for o in n.output]
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in nodes for i in n.input}
    kept = [t for t in g.initializer if t.name in used]   # the dropped pairs' scales and zero points
    del g.initializer[:]
    g.initializer.extend(kept)
    return model


def quantize_modules(bundle: Bundle, calib: ClipSet, out_dir: Path, batch_size: int = 8,
                     progress=None) -> dict[str, dict[str, Any]]:
    """Write `int8/<module>.onnx` for every module of the bundle into out_dir (the bundle folder);
    returns the manifest's int8 `modules` entries."""
    fp32 = OrtEngine(bundle, "cpu", precision=FP32)
    (out_dir / INT8).mkdir(exist_ok=True)
    entries: dict[str, dict[str, Any]] = {}
    features: dict[str, list[np.ndarray]] = {n: [] for n in bundle.modalities}   # fp32, per batch
    with tempfile.TemporaryDirectory(prefix="dimml-quantize-") as tmp:
        for module, (inputs, outputs) in bundle.io.items():
            if module == FUSION:
                feeds = [{f"{n}_features": features[n][i] for n in bundle.modalities}
                         for i in range(len(features[bundle.modalities[0]]))]
            else:
                feeds = []
                for batch in calib.batches(batch_size):
                    feeds.append({inputs[0]: batch[module]})
                    features[module].append(fp32.branch(module, batch[module])[0])
            rel = f"{INT8}/{module}.onnx"
            quantize_graph(bundle.onnx_path(module), out_dir / rel, feeds, Path(tmp))
            entries[module] = {"file": rel, "inputs": list(inputs), "outputs": list(outputs)}
            if progress is not None:
                progress.update(1)
    return entries


# ---------------------------------------------------------------------------------------
# the accuracy check

def precision_check(labels: np.ndarray, fp32_top1: np.ndarray, int8_top1: np.ndarray, split: str,
                    tolerance: Mapping[str, float]) -> dict[str, Any]:
    """The manifest's `check` record: accuracy of both, top-1 agreement, and whether int8 is within
    the tolerance (`max_accuracy_drop` points, `min_top1_agreement`); `problems` says where not."""
    labels, a, b = (np.asarray(x, dtype=np.int64) for x in (labels, fp32_top1, int8_top1))
    n = len(labels)
    if not n:
        raise ValueError("no clips to check int8 against fp32 on")
    acc32, acc8, agree = float((a == labels).mean()), float((b == labels).mean()), float((a == b).mean())
    drop = round(100 * (acc32 - acc8), 4)
    max_drop, min_agree = float(tolerance["max_accuracy_drop"]), float(tolerance["min_top1_agreement"])
    problems = []
    if drop > max_drop:
        problems.append(f"int8 loses {drop:.1f} points of accuracy against fp32 (at most {max_drop:g} allowed)")
    if agree < min_agree:
        problems.append(f"int8 gives fp32's top-1 on {agree:.1%} of the clips (at least {min_agree:.0%} required)")
    return {"split": split, "clips": n, "fp32_accuracy": acc32, "int8_accuracy": acc8, "accuracy_drop": drop,
            "top1_agreement": agree, "max_accuracy_drop": max_drop, "min_top1_agreement": min_agree,
            "passed": not problems, "problems": problems}


def top1(outputs: Sequence[Outputs]) -> np.ndarray:
    """The final answers' class indices of Predictor outputs, concatenated."""
    return np.concatenate([o.combined.argmax(1) for o in outputs]) if outputs else np.zeros(0, np.int64)


def precision_predictors(bundle: Bundle, batch_size: int) -> dict[str, Any]:
    """{fp32, int8: a Predictor of that precision's graphs on ONNX Runtime CPU}: what the check compares."""
    from dimml.predict import Predictor

    return {p: Predictor(bundle, OrtEngine(bundle, "cpu", precision=p), max_batch=batch_size) for p in (FP32, INT8)}


def check_clip_set(bundle: Bundle, clips: ClipSet, tolerance: Mapping[str, float], batch_size: int = 8) -> dict[str, Any]:
    """fp32 and int8 graphs of the bundle on ONNX Runtime CPU over a ClipSet -> precision_check's record."""
    predictors = precision_predictors(bundle, batch_size)
    answers: dict[str, list] = {p: [] for p in predictors}
    for batch in clips.batches(batch_size):
        for p, predictor in predictors.items():
            answers[p].append(predictor.forward(batch))
    return precision_check(clips.labels, top1(answers[FP32]), top1(answers[INT8]), clips.split, tolerance)


def refusal(check: Mapping[str, Any]) -> str:
    """Why int8 graphs are refused, and what to do, in one message."""
    return (f"int8 refused: {'; '.join(check['problems'])}, on {check['clips']} {check['split']} clips (fp32 "
            f"accuracy {check['fp32_accuracy']:.1%}, int8 {check['int8_accuracy']:.1%}). Calibrate on more clips "
            "(--calibration-clips) or serve fp32 (export without --quantize)")


def quantize_bundle(bundle: Bundle, out_dir: Path, clips: tuple[ClipSet, ClipSet, dict[str, Any]],
                    opts: QuantizeOptions | None = None, progress: bool = True) -> dict[str, Any]:
    """Quantize a bundle's graphs into out_dir/int8/ and check them; returns the manifest's `int8` entry.

    clips: run_clips' (calibration, check, source). Raises Int8Refused (the int8 files removed) when
    the check fails.
    """
    import onnxruntime as ort

    opts = opts or QuantizeOptions()
    calib, check_set, source = clips
    with tqdm(total=len(bundle.io), desc="quantize int8", unit="module", file=sys.stderr,
              disable=not progress) as bar:
        modules = quantize_modules(bundle, calib, out_dir, opts.batch_size, bar)
    # the check loads the graphs just written (the manifest does not list them yet)
    staged = Bundle(bundle.path, {**bundle.manifest, INT8: {"modules": modules}}, bundle.tag)
    check = check_clip_set(staged, check_set, opts.tolerance, opts.batch_size)
    check["cpu"] = {"machine": platform.machine(), "int8_features": int8_cpu_features()}
    if not check["passed"]:
        shutil.rmtree(out_dir / INT8, ignore_errors=True)
        raise Int8Refused(refusal(check))
    keys = [_relative(k, source["data"]) for k in calib.keys]
    calibration = {"split": calib.split, "clips": len(calib), "seed": opts.seed, **source,
                   "samples_sha256": hashlib.sha256("\n".join(keys).encode()).hexdigest(), "samples": keys}
    return {"modules": modules, "recipe": RECIPE, "onnxruntime": ort.__version__,
            "calibration": calibration, "check": check}


def _relative(key: str, root: str) -> str:
    """A sample key relative to the data root where it lies under it (manifests move between machines)."""
    try:
        return Path(key).relative_to(root).as_posix()
    except ValueError:
        return key


__all__ = ["QuantizeOptions", "Int8Refused", "ClipSet", "precision_predictors", "quantize_bundle", "quantize_modules",
           "quantize_graph", "precision_check", "check_clip_set", "run_clips", "top1", "refusal", "RECIPE"]
