"""Decoded clips -> answers: the one place serving, batch scoring and `export verify` predict.

    predictor = Predictor("BUNDLE" or "name:version")          # picks the best engine here
    clips = [predictor.decode("a.mp4"), predictor.decode("b.wav")]
    answers = predictor.predict_clips(clips)                     # one dict per clip, same order

Each answer (JSON-ready: str keys, Python floats):
    {"label": "...", "probabilities": {"<class>": p, ...},
     "branches": {"audio":  {"probabilities": {...}, "certainty": c, "weight": w},
                  "visual": {...}, "fusion": {...}},
     "modalities_used": ["audio", "visual"],
     "model": {"name": "...", "version": "..."}, "backend": "onnxruntime-cpu"}
`probabilities` is the softmax of the certainty-weighted logits Z = sum_i w_i z_i (DI-MML
Eq. 8-9, dimml.weighting); the weights sum to 1. For a bundle whose method answers by its
fusion head (manifest "output": "fused": joint, MLB, DGL, the ablations) Z is the fusion
logits, i.e. weight 1 on fusion. A clip with one modality is answered by
that branch alone (weight 1, no fusion); `branches` then holds that branch only.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from dimml.bundle import Bundle, load_bundle
from dimml.config import PreprocessConfig
from dimml.engines import Engine, open_engine
from dimml.media import Clip, Source, decode_clip
from dimml.weighting import softmax, weigh_named


@dataclass
class Outputs:
    """Raw results for a batch of clips sharing the same modalities (numpy, one row per clip)."""

    modalities: tuple[str, ...]
    features: dict[str, np.ndarray] = field(default_factory=dict)      # "audio"/"visual" -> [B, D]
    logits: dict[str, np.ndarray] = field(default_factory=dict)        # + "fusion" -> [B, K]
    combined: np.ndarray | None = None                                  # Z [B, K] (float64)
    weights: dict[str, np.ndarray] = field(default_factory=dict)       # branch -> [B]
    certainties: dict[str, np.ndarray] = field(default_factory=dict)   # branch -> [B]

    def __len__(self) -> int:
        return 0 if self.combined is None else len(self.combined)

    @property
    def probabilities(self) -> np.ndarray:
        return softmax(self.combined)


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
                 max_batch: int = 32, prefer: str | Sequence[str] = "auto"):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.bundle = load_bundle(bundle)
        self.engine = engine if engine is not None else open_engine(self.bundle, prefer)
        self.max_batch = min(max_batch, self.engine.max_batch or max_batch)
        self.classes = self.bundle.classes
        self.preprocess: PreprocessConfig = self.bundle.preprocess
        self.temperature = self.bundle.temperature
        self.output = self.bundle.output

    @property
    def backend(self) -> str:
        return self.engine.backend

    def decode(self, src: Source, *, audio: Source | None = None, name: str | None = None,
               audio_name: str | None = None) -> Clip:
        """decode_clip with this bundle's preprocessing; a missing modality is allowed (None)."""
        return decode_clip(src, self.preprocess, audio=audio, modalities=self.bundle.modalities,
                           allow_missing=True, name=name, audio_name=audio_name)

    # -- arrays -----------------------------------------------------------------------

    def _check(self, spec: np.ndarray | None, frames: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Validate dtypes and shapes against the bundle's preprocessing; clear errors, no guessing."""
        if spec is None and frames is None:
            raise ValueError("need a spectrogram, frames, or both")
        n = None
        if spec is not None:
            spec = np.asarray(spec)
            want = self.preprocess.spectrogram_shape
            if spec.ndim != 4 or spec.shape[1:] != want or not np.issubdtype(spec.dtype, np.floating):
                raise ValueError(f"spectrogram must be float [B, {', '.join(map(str, want))}] "
                                 f"(this model's preprocessing), got {spec.dtype} {list(spec.shape)}")
            spec, n = spec.astype(np.float32, copy=False), len(spec)
        if frames is not None:
            frames = np.asarray(frames)
            want = self.preprocess.frames_shape
            if frames.ndim != 5 or frames.shape[1:] != want or frames.dtype != np.uint8:
                raise ValueError(f"frames must be uint8 [B, {', '.join(map(str, want))}] as decoded "
                                 f"(this model's preprocessing), got {frames.dtype} {list(frames.shape)}")
            if n is not None and len(frames) != n:
                raise ValueError(f"batch sizes differ: {n} spectrograms, {len(frames)} frame stacks")
        return spec, frames

    def forward(self, spec: np.ndarray | None, frames: np.ndarray | None) -> Outputs:
        """Run a batch (any size; split into max_batch chunks) -> raw Outputs."""
        spec, frames = self._check(spec, frames)
        n = len(spec) if spec is not None else len(frames)
        modalities = tuple(m for m, x in (("audio", spec), ("visual", frames)) if x is not None)
        if n == 0:
            return Outputs(modalities, combined=np.zeros((0, len(self.classes))))
        parts = [self._forward_chunk(None if spec is None else spec[i:i + self.max_batch],
                                     None if frames is None else frames[i:i + self.max_batch], modalities)
                 for i in range(0, n, self.max_batch)]
        return parts[0] if len(parts) == 1 else _concat(parts)

    def _forward_chunk(self, spec, frames, modalities: tuple[str, ...]) -> Outputs:
        out = Outputs(modalities)
        if spec is not None:
            out.features["audio"], out.logits["audio"] = self.engine.audio(spec)
        if frames is not None:
            out.features["visual"], out.logits["visual"] = self.engine.visual(frames)
        if len(modalities) == 2:
            out.logits["fusion"] = self.engine.fusion(out.features["audio"], out.features["visual"])
        out.combined, out.weights, out.certainties = weigh_named(out.logits, self.temperature)
        if self.output == "fused" and "fusion" in out.logits:
            # a method whose final output is its fusion head (joint, MLB, DGL, ablations):
            # report the same certainties, but the answer is the fusion head's alone
            out.combined = out.logits["fusion"].astype(np.float64)
            out.weights = {b: np.full(len(out.combined), float(b == "fusion")) for b in out.logits}
        return out

    def format(self, out: Outputs) -> list[dict[str, Any]]:
        """Outputs -> one JSON-ready answer dict per row (see the module docstring)."""
        probs = out.probabilities
        branch_probs = {b: softmax(z) for b, z in out.logits.items()}
        answers = []
        for i in range(len(out)):
            answers.append({
                "label": self.classes[int(probs[i].argmax())],
                "probabilities": self._named(probs[i]),
                "branches": {b: {"probabilities": self._named(branch_probs[b][i]),
                                 "certainty": float(out.certainties[b][i]),
                                 "weight": float(out.weights[b][i])} for b in out.logits},
                "modalities_used": list(out.modalities),
                "model": self.bundle.model_info(),
                "backend": self.engine.backend,
            })
        return answers

    def _named(self, p: np.ndarray) -> dict[str, float]:
        return {c: float(x) for c, x in zip(self.classes, p)}

    def predict_arrays(self, spec: np.ndarray | None, frames: np.ndarray | None) -> list[dict[str, Any]]:
        """spec float32 [B, 1, F, T] and/or frames uint8 [B, N, H, W, 3] -> B answers."""
        return self.format(self.forward(spec, frames))

    # -- clips ------------------------------------------------------------------------

    def forward_clips(self, clips: Sequence[Clip]) -> list[tuple[list[int], Outputs]]:
        """Group clips by available modalities and run each group: [(clip indices, Outputs)]."""
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, c in enumerate(clips):
            if not c.modalities:
                raise ValueError(f"{c.info.name}: clip has neither audio nor frames")
            groups.setdefault(c.modalities, []).append(i)
        results = []
        for mods, idx in groups.items():
            try:
                spec = self._stack([clips[i].spectrogram for i in idx]) if "audio" in mods else None
                frames = self._stack([clips[i].frames for i in idx]) if "visual" in mods else None
                results.append((idx, self.forward(spec, frames)))
            except ValueError as e:
                names = ", ".join(clips[i].info.name for i in idx[:3])
                raise ValueError(f"{names}{'...' if len(idx) > 3 else ''}: {e}") from None
        return results

    @staticmethod
    def _stack(arrays: list[np.ndarray]) -> np.ndarray:
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ValueError(f"clips were decoded with different preprocessing (shapes {sorted(shapes)})")
        return np.stack(arrays)

    def predict_clips(self, clips: Sequence[Clip]) -> list[dict[str, Any]]:
        """Decoded clips (some may lack a modality) -> one answer per clip, in input order."""
        answers: list[dict[str, Any] | None] = [None] * len(clips)
        for idx, out in self.forward_clips(clips):
            for i, a in zip(idx, self.format(out)):
                answers[i] = a
        return answers  # type: ignore[return-value]


__all__ = ["Predictor", "Outputs"]
