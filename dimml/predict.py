"""Decoded samples -> answers: the one place serving, batch scoring and `export verify` predict.

    predictor = Predictor("BUNDLE" or "name:version")           # picks the best engine here
    prediction = predictor.predict("clip.mp4")                    # a dimml.Prediction (also: a list,
                                                                  # or files by field: video=..., audio=...)
    answer = predictor.predict_files({"video": "a.mp4"})          # files keyed by source field
    clips = [predictor.decode({"front": "f.png", "rear": "r.png"}), ...]
    answers = predictor.predict_clips(clips)                      # one dict per clip, same order

Each answer (JSON-ready: str keys, Python floats), for a bundle with modalities m1..mM:
    {"label": "...", "probabilities": {"<class>": p, ...},
     "branches": {"<m1>": {"probabilities": {...}, "certainty": c, "weight": w}, ...,
                  "fusion": {...}},
     "modalities_used": ["<m1>", ...],
     "model": {"name": "...", "version": "...", "precision": "fp32"}, "backend": "onnxruntime-cpu",
     "final_output": {"rule": "paper-lw", "reason": "..."},   # which rule answered, and why
     "warnings": []}                          # damage found in the sample's files (Clip.warnings)
`probabilities` is the softmax of Z = sum_i w_i z_i over the branches of the modalities
present, plus the fusion head when every modality is present; the weights sum to 1. They follow
the bundle's final output (`Bundle.final_output`, applied by dimml.weighting.OutputRule.apply): the
rule the run chose on validation (the fusion head, one unimodal head, the paper's Eq. 8-9 at its
T, or the fitted prior weighting); weight 1 on the fusion head for methods that answer by it
(joint, MLB, DGL, the ablations). Each branch's certainty (Eq. 8) is reported whatever the rule.
A sample lacking some modality is answered by the branches it has (a head rule whose head is
absent: the weighting at the rule's T over them; one branch: weight 1); `branches` then holds
those only.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from dimml.bundle import FUSION, Bundle, load_bundle
from dimml.engines import Engine, expand_backends, open_engine
from dimml.media import Clip, Source, decode_sample
from dimml.modalities import VIDEO_FIELD, PreprocessConfig
from dimml.weighting import softmax

if TYPE_CHECKING:
    from dimml.prediction import Prediction


@dataclass
class Outputs:
    """Raw results for a batch of samples sharing the same modalities (numpy, one row per sample)."""

    modalities: tuple[str, ...]
    features: dict[str, np.ndarray] = field(default_factory=dict)      # modality -> [B, D]
    logits: dict[str, np.ndarray] = field(default_factory=dict)        # modality (+ "fusion") -> [B, K]
    combined: np.ndarray | None = None                                  # Z [B, K] (float64)
    weights: dict[str, np.ndarray] = field(default_factory=dict)       # branch -> [B]
    certainties: dict[str, np.ndarray] = field(default_factory=dict)   # branch -> [B]

    def __len__(self) -> int:
        return 0 if self.combined is None else len(self.combined)

    @property
    def probabilities(self) -> np.ndarray:
        return softmax(self.combined)


def decode_files(files: Mapping[str, Source], cfg: PreprocessConfig, *,
                 names: Mapping[str, str] | None = None) -> Clip:
    """One sample's files by field -> Clip, as serving and scoring decode them.

    A modality without a source, or a video without that track, is absent (at least one must be
    present); but a file given in a modality's own field must hold that modality: else the
    decoder's MediaError for it is raised (e.g. a broken image view, a silent file sent as audio).
    """
    clip = decode_sample(files, cfg, names=names, allow_missing=True)
    for name in files:
        if name in cfg.names and name not in clip.modalities:
            raise clip.missing[name]      # why the file given for this modality does not hold it
    return clip


def backend_order(prefer: str | Sequence[str], device: int | str | None = None) -> tuple[list[str], int]:
    """(backends to try in order, GPU index) for a backend preference and a device: an int or
    "cuda:N" picks GPU N (GPU backends only when given as "cuda..."), "cpu" keeps the CPU backends."""
    names = [prefer] if isinstance(prefer, str) else list(prefer)
    order = expand_backends(names)
    if device is None or isinstance(device, int):
        device_id, keep = int(device or 0), None
    else:
        kind, _, index = str(device).strip().lower().partition(":")
        if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index):
            raise ValueError(f"device must be a GPU index, 'cuda', 'cuda:N' or 'cpu', got {device!r}")
        device_id, keep = int(index or 0), kind
    if device_id < 0:
        raise ValueError(f"device index must be >= 0, got {device_id}")
    if keep is not None:
        # tensorrt runs on the GPU; every other backend names its device as its suffix
        order = [b for b in order if (b.endswith("-cpu") if keep == "cpu" else not b.endswith("-cpu"))]
        if not order:
            raise ValueError(f"no backend of {names} runs on device {device!r}")
    return order, device_id


def _concat(parts: list[Outputs]) -> Outputs:
    first = parts[0]
    cat = lambda key: {k: np.concatenate([getattr(p, key)[k] for p in parts]) for k in getattr(first, key)}
    return Outputs(first.modalities, cat("features"), cat("logits"),
                   np.concatenate([p.combined for p in parts]), cat("weights"), cat("certainties"))


class Predictor:
    """A bundle plus an engine: batches inputs, runs the branches and fusion, weighs, answers.

    Thread-safe as far as its engine is (ONNX Runtime and PyTorch are; TensorRT serialises).
    """

    def __init__(self, bundle: Bundle | str | os.PathLike, engine: Engine | None = None,
                 max_batch: int = 32, prefer: str | Sequence[str] = "auto", *,
                 backend: str | Sequence[str] | None = None, device: int | str | None = None,
                 decode_threads: int | None = None, precision: str = "auto", threads: int | None = None):
        """bundle: a folder or a model-store tag; backend (alias `prefer`): "auto", a family or a
        backend name, or an order (dimml.engines.open_engine); device: a GPU index, "cuda:N", "cuda"
        or "cpu" (CPU backends only); decode_threads: `predict` on a list decodes this many files at
        once (default: the CPU count, at most 8); precision: "auto" (a quantized bundle's checked int8
        graphs on onnxruntime-cpu, else fp32), "fp32" or "int8" (dimml.engines.choose_precision);
        threads: the engine's intra-op threads (default: the backend's choice; a process sharing a machine
        with others, e.g. a Ray worker or the local scorer beside its decode threads, sets its share)."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.bundle = load_bundle(bundle)
        if engine is None:
            order, device_id = backend_order(backend if backend is not None else prefer, device)
            engine = open_engine(self.bundle, order, device_id=device_id, precision=precision, threads=threads)
        self.engine = engine
        self.decode_threads = decode_threads or min(8, os.cpu_count() or 1)
        self.max_batch = min(max_batch, self.engine.max_batch or max_batch)
        self.classes = self.bundle.classes
        self.preprocess: PreprocessConfig = self.bundle.preprocess
        self.names: tuple[str, ...] = self.preprocess.names
        self.fields: tuple[str, ...] = self.preprocess.fields
        self.rule = self.bundle.final_output

    @property
    def backend(self) -> str:
        return self.engine.backend

    # -- files --------------------------------------------------------------------------

    def files_of(self, files: Source | Mapping[str, Source]) -> dict[str, Source]:
        """A mapping of source field -> file, or one file for a bundle with one source field."""
        if isinstance(files, Mapping):
            return dict(files)
        if len(self.fields) != 1:
            raise ValueError(f"this model reads {len(self.fields)} source fields ({', '.join(self.fields)}): "
                             "give files keyed by field")
        return {self.fields[0]: files}

    def decode(self, files: Source | Mapping[str, Source], *, names: Mapping[str, str] | None = None,
               cfg: PreprocessConfig | None = None) -> Clip:
        """decode_files with this bundle's preprocessing: missing modalities are allowed (at least
        one must be present), a modality's own file must hold it. `files`: field -> file ("video",
        own-file modality names)."""
        files = self.files_of(files)
        unknown = sorted(set(files) - {*self.fields, *self.names})
        if unknown:
            raise ValueError(f"unknown field(s) {unknown}; this model reads {', '.join(self.fields)}"
                             + (f" (a modality's own file: {', '.join(self.names)})" if VIDEO_FIELD in self.fields else ""))
        return decode_files(files, cfg or self.preprocess, names=names)

    def predict_files(self, files: Source | Mapping[str, Source], *,
                      names: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Decode one sample's files (keyed by source field) and answer it."""
        return self.predict_clips([self.decode(files, names=names)])[0]

    def predict(self, files: Source | Mapping[str, Source] | Sequence[Source | Mapping[str, Source]] | None = None,
                /, **by_field: Source) -> Prediction | list[Prediction]:
        """The Python API: typed answers, the same `Prediction` the HTTP client returns.

            predictor.predict("clip.mp4")                          # one file (one source field)
            predictor.predict(video="face.mp4", audio="voice.wav")  # files by field
            predictor.predict({"front": "f.png", "rear": "r.png"})  # the same as a mapping
            predictor.predict(["a.mp4", "b.flv"])                  # a list -> a list, in order

        A list is decoded in a thread pool of `decode_threads` (FFmpeg releases the GIL) and
        run in batches of `max_batch`; a bad file raises dimml.media.MediaError naming it.
        """
        from dimml.prediction import Prediction

        if by_field:
            if files is not None:
                raise TypeError("give files positionally or by field, not both")
            files = by_field
        if files is None:
            raise TypeError(f"no file given; this model reads {', '.join(self.fields)}")
        if isinstance(files, (list, tuple)):
            samples = list(files)
            if len(samples) <= 1 or self.decode_threads <= 1:
                clips = [self.decode(f) for f in samples]
            else:
                from concurrent.futures import ThreadPoolExecutor
                with ThreadPoolExecutor(min(self.decode_threads, len(samples))) as pool:
                    clips = list(pool.map(self.decode, samples))
            return [Prediction.from_dict(a) for a in (self.predict_clips(clips) if clips else [])]
        return Prediction.from_dict(self.predict_files(files))

    # -- arrays -----------------------------------------------------------------------

    def _check(self, arrays: Mapping[str, np.ndarray | None]) -> dict[str, np.ndarray]:
        """Validate names, dtypes and shapes against the bundle's preprocessing; clear errors, no guessing."""
        unknown = sorted(set(arrays) - set(self.names))
        if unknown:
            raise ValueError(f"unknown modality(ies) {unknown}; this model has {', '.join(self.names)}")
        out: dict[str, np.ndarray] = {}
        n = None
        for spec in self.preprocess.modalities:   # model order
            x = arrays.get(spec.name)
            if x is None:
                continue
            x = np.asarray(x)
            want = spec.shape
            floating = np.issubdtype(spec.dtype, np.floating)
            ok_dtype = np.issubdtype(x.dtype, np.floating) if floating else x.dtype == spec.dtype
            if x.ndim != len(want) + 1 or x.shape[1:] != want or not ok_dtype:
                raise ValueError(f"{spec.name} must be {'float' if floating else spec.dtype} "
                                 f"[B, {', '.join(map(str, want))}] (this model's preprocessing), "
                                 f"got {x.dtype} {list(x.shape)}")
            if n is not None and len(x) != n:
                raise ValueError(f"batch sizes differ: {n} and {len(x)} ({spec.name})")
            n = len(x)
            out[spec.name] = x.astype(spec.dtype, copy=False)
        if not out:
            raise ValueError(f"need at least one of {', '.join(self.names)}")
        return out

    def forward(self, arrays: Mapping[str, np.ndarray | None]) -> Outputs:
        """Run a batch {modality: [B, ...]} (any size; split into max_batch chunks) -> raw Outputs."""
        arrays = self._check(arrays)
        modalities = tuple(arrays)
        n = len(next(iter(arrays.values())))
        if n == 0:
            return Outputs(modalities, combined=np.zeros((0, len(self.classes))))
        parts = [self._forward_chunk({m: x[i:i + self.max_batch] for m, x in arrays.items()})
                 for i in range(0, n, self.max_batch)]
        return parts[0] if len(parts) == 1 else _concat(parts)

    def _forward_chunk(self, arrays: dict[str, np.ndarray]) -> Outputs:
        out = Outputs(tuple(arrays))
        for name, x in arrays.items():
            out.features[name], out.logits[name] = self.engine.branch(name, x)
        if len(arrays) == len(self.names):   # fusion needs every modality's features
            out.logits[FUSION] = self.engine.fusion([out.features[n] for n in self.names])
        out.combined, out.weights, out.certainties = self.rule.apply(out.logits)
        return out

    def format(self, out: Outputs) -> list[dict[str, Any]]:
        """Outputs -> one JSON-ready answer dict per row (see the module docstring)."""
        probs = out.probabilities
        branch_probs = {b: softmax(z) for b, z in out.logits.items()}
        rule, reason = self.rule.answering(tuple(out.logits))
        answers = []
        for i in range(len(out)):
            answers.append({
                "label": self.classes[int(probs[i].argmax())],
                "probabilities": self._named(probs[i]),
                "branches": {b: {"probabilities": self._named(branch_probs[b][i]),
                                 "certainty": float(out.certainties[b][i]),
                                 "weight": float(out.weights[b][i])} for b in out.logits},
                "modalities_used": list(out.modalities),
                "model": {**self.bundle.model_info(), "precision": self.engine.precision},
                "backend": self.engine.backend,
                "final_output": {"rule": rule, "reason": reason},
                "warnings": [],
            })
        return answers

    def _named(self, p: np.ndarray) -> dict[str, float]:
        return {c: float(x) for c, x in zip(self.classes, p)}

    def predict_arrays(self, arrays: Mapping[str, np.ndarray | None]) -> list[dict[str, Any]]:
        """{modality: [B, *spec.shape]} (any subset, at least one) -> B answers."""
        return self.format(self.forward(arrays))

    # -- clips ------------------------------------------------------------------------

    def forward_clips(self, clips: Sequence[Clip]) -> list[tuple[list[int], Outputs]]:
        """Group clips by present modalities and run each group: [(clip indices, Outputs)]."""
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, c in enumerate(clips):
            if not c.modalities:
                raise ValueError(f"{c.name}: sample has none of the modalities {', '.join(self.names)}")
            groups.setdefault(tuple(c.modalities), []).append(i)
        results = []
        for mods, idx in groups.items():
            try:
                arrays = {m: self._stack([clips[i].arrays[m] for i in idx]) for m in mods}
                results.append((idx, self.forward(arrays)))
            except ValueError as e:
                names = ", ".join(clips[i].name for i in idx[:3])
                raise ValueError(f"{names}{'...' if len(idx) > 3 else ''}: {e}") from None
        return results

    @staticmethod
    def _stack(arrays: list[np.ndarray]) -> np.ndarray:
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ValueError(f"samples were decoded with different preprocessing (shapes {sorted(shapes)})")
        return np.stack(arrays)

    def predict_clips(self, clips: Sequence[Clip]) -> list[dict[str, Any]]:
        """Decoded samples (some may lack modalities) -> one answer per sample, in input order."""
        answers: list[dict[str, Any] | None] = [None] * len(clips)
        for idx, out in self.forward_clips(clips):
            for i, a in zip(idx, self.format(out)):
                answers[i] = {**a, "warnings": clips[i].warnings}
        return answers  # type: ignore[return-value]


__all__ = ["Predictor", "Outputs", "decode_files", "backend_order"]
