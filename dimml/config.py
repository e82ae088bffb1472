"""Preprocessing configuration: the one description of model inputs shared by training and serving."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PreprocessConfig:
    """How a media file becomes a spectrogram [1, 257, T] and frames [N, H, W, 3].

    Saved verbatim with every training run and every exported bundle, and read back from
    there by serving and scoring, so a model is always fed exactly what it was trained on.
    """

    # audio: mono, resampled, tiled/cropped to a fixed duration (as the reference code does)
    sample_rate: int = 16000
    audio_seconds: float = 3.0
    nperseg: int = 512            # scipy.signal.spectrogram window -> 257 frequency bins
    noverlap: int = 353           # hop 159 samples: 299 columns for 3 s at 16 kHz
    log_eps: float = 1e-7
    # video: N frames evenly spaced over the clip, resized (no crop) to H x W
    num_frames: int = 3
    frame_height: int = 224
    frame_width: int = 224
    # safety limits, checked from stream metadata before decoding
    max_duration_s: float = 600.0
    max_pixels: int = 4096 * 4096

    @property
    def num_samples(self) -> int:
        """Waveform length fed to the spectrogram."""
        return int(round(self.sample_rate * self.audio_seconds))

    @property
    def freq_bins(self) -> int:
        return self.nperseg // 2 + 1

    @property
    def time_bins(self) -> int:
        """T of the spectrogram, as scipy.signal.spectrogram computes it."""
        step = self.nperseg - self.noverlap
        return (self.num_samples - self.noverlap) // step

    @property
    def spectrogram_shape(self) -> tuple[int, int, int]:
        return (1, self.freq_bins, self.time_bins)

    @property
    def frames_shape(self) -> tuple[int, int, int, int]:
        return (self.num_frames, self.frame_height, self.frame_width, 3)

    def input_dict(self) -> dict[str, Any]:
        """The fields that change what the model sees (limits excluded): the cache key."""
        d = dataclasses.asdict(self)
        d.pop("max_duration_s")
        d.pop("max_pixels")
        return d

    def fingerprint(self) -> str:
        """Short stable hash of the input-defining fields."""
        blob = json.dumps(self.input_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PreprocessConfig":
        """Build from a saved dict; unknown keys are an error (a newer format we can't honour)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown preprocessing fields {sorted(unknown)}")
        return cls(**d)

    def replace(self, **changes: Any) -> "PreprocessConfig":
        return dataclasses.replace(self, **changes)


# The presets' preprocessing: `resnet18` is the papers' setting, `tiny` trains in seconds on a CPU.
PREPROCESS_PRESETS: dict[str, PreprocessConfig] = {
    "resnet18": PreprocessConfig(),
    "tiny": PreprocessConfig(audio_seconds=2.0, num_frames=2, frame_height=64, frame_width=64),
}

__all__ = ["PreprocessConfig", "PREPROCESS_PRESETS"]
