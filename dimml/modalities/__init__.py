"""Modalities, declared once: the only place that says what a modality is.

A *kind* (one file in this package: audio, frames, flow, image) says how a source file becomes
one array and what encoder that array gets. A *ModalitySpec* is a named use of a kind with its
preprocessing parameters:

    ModalitySpec("audio",  "audio",  AudioParams(seconds=3.0))      # from the video's audio track
    ModalitySpec("visual", "frames", FramesParams(num_frames=3))    # N RGB frames of the video
    ModalitySpec("flow",   "flow",   FlowParams(num_pairs=10))      # optical flow of the video
    ModalitySpec("front",  "image",  ImageParams())                 # a still image file of its own

A run's PreprocessConfig holds the tuple of specs (its cache key and its bundle manifest hold
them too); everything else iterates over `cfg.modalities`. Kinds derived from the video read the
upload/manifest field "video" (the manifest's `path` column); a modality may also come from a
file of its own, the field named after it (`<name>_path` in a manifest): required for kinds
that are not derived from a video (image), optional for the others (e.g. CREMA-D's separate
audio files).

Adding a kind: write `dimml/modalities/<kind>.py` with a `Kind` subclass (its params
dataclass, array shape and dtype, encoder description, and `decode`), decorated with
`@register_kind`, and import it at the bottom of this file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

VIDEO_FIELD = "video"          # the upload field / manifest column (`path`) of the video file
# Names a modality may not take: modules, manifest columns, report keys and output-rule names.
# ("fused" and "weighted": the fusion head and the final output in reports before dimml 0.2)
RESERVED = ("fusion", "final", "video", "label", "split", "path", "fused", "weighted", "probe", "fitted")
# Built-in modality names and the kind each stands for (any other name needs `name:kind`).
BUILTIN_NAMES = {"audio": "audio", "visual": "frames", "flow": "flow"}
DEFAULT_MODALITIES = "audio,visual"


class Kind:
    """How one kind of modality is decoded and encoded. Subclasses set the ClassVars."""

    name: ClassVar[str] = ""
    params_cls: ClassVar[type] = object        # frozen dataclass of the kind's preprocessing fields
    # what a parameter absent from a saved config (an older run or bundle) meant before it existed,
    # where that differs from its default today
    legacy_params: ClassVar[dict[str, Any]] = {}
    from_video: ClassVar[bool] = True          # derived from a video file's tracks (else: a file of its own)
    dtype: ClassVar[str] = "uint8"             # dtype of the decoded, cached and served array
    cache_dtype: ClassVar[str] = "uint8"       # dtype stored in the training cache
    # encoder: "spectrogram" (a [1, F, T] image through a ResNet, global average pool) or
    # "stack" (uint8 [N, H, W, C]: each of the N images through a ResNet with a C-channel stem,
    # features averaged over N and space)
    encoder: ClassVar[str] = "stack"
    pixel_mean: ClassVar[tuple[float, ...] | None] = None   # per channel, in uint8 units (normalised in the model)
    pixel_std: ClassVar[tuple[float, ...] | None] = None
    augment: ClassVar[bool] = False            # training-time random resized crop + horizontal flip
    onnx_input: ClassVar[str] = "input"        # name of the ONNX graph's input
    missing_cause: ClassVar[str] = "no_video"  # MediaError cause when the source lacks this modality

    def shape(self, p: Any) -> tuple[int, ...]:
        """Shape of one decoded array (no batch dimension)."""
        raise NotImplementedError

    def decode(self, src, p: Any, limits: Limits, name: str):
        """src (path, bytes or binary file) -> (array of `shape(p)` and `dtype`, MediaInfo).

        Raises dimml.media.MediaError (cause `missing_cause` when the file lacks this modality).
        """
        raise NotImplementedError

    def source_files(self, path: str) -> list[str]:
        """The files decoding reads from a source path (what the training cache hashes): the file
        itself, or every file under a folder."""
        if os.path.isdir(path):
            return sorted(os.path.join(d, f) for d, _, files in os.walk(path) for f in files)
        return [path]

    def channels(self, p: Any) -> int:
        """Input channels of the encoder's stem."""
        return self.shape(p)[0] if self.encoder == "spectrogram" else self.shape(p)[-1]


KINDS: dict[str, Kind] = {}


def register_kind(cls: type[Kind]) -> type[Kind]:
    """Class decorator: make a kind available by its name."""
    if not cls.name or cls.name in KINDS:
        raise ValueError(f"kind name {cls.name!r} is empty or taken")
    KINDS[cls.name] = cls()
    return cls


def get_kind(name: str) -> Kind:
    if name not in KINDS:
        raise ValueError(f"unknown modality kind {name!r}; choose from {', '.join(sorted(KINDS))}")
    return KINDS[name]


@dataclass(frozen=True)
class Limits:
    """Safety limits, checked from stream metadata before decoding (not part of the cache key)."""

    max_duration_s: float = 600.0
    max_pixels: int = 4096 * 4096


@dataclass(frozen=True)
class ModalitySpec:
    """One modality of a model: its name, its kind and the kind's preprocessing parameters."""

    name: str
    kind: str
    params: Any          # an instance of KINDS[kind].params_cls

    def __post_init__(self) -> None:
        check_name(self.name)
        k = get_kind(self.kind)
        if not isinstance(self.params, k.params_cls):
            raise TypeError(f"modality {self.name!r}: params must be {k.params_cls.__name__}, "
                            f"got {type(self.params).__name__}")

    @property
    def kind_obj(self) -> Kind:
        return KINDS[self.kind]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.kind_obj.shape(self.params)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.kind_obj.dtype)

    @property
    def field(self) -> str:
        """The upload field / source file this modality is read from by default."""
        return VIDEO_FIELD if self.kind_obj.from_video else self.name

    @property
    def own_file_field(self) -> str:
        """The field naming a file of its own (`<name>_path` in a manifest; `<name>` in an upload)."""
        return self.name

    @property
    def onnx_input(self) -> str:
        return self.kind_obj.onnx_input

    def replace(self, **params: Any) -> ModalitySpec:
        """A copy with some preprocessing parameters changed (unknown names: ValueError)."""
        return ModalitySpec(self.name, self.kind, _make_params(self.kind, {**dataclasses.asdict(self.params), **params},
                                                               what=f"modality {self.name!r}"))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "params": dataclasses.asdict(self.params)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModalitySpec:
        unknown = set(d) - {"name", "kind", "params"}
        if unknown:
            raise ValueError(f"unknown modality spec field(s) {sorted(unknown)}")
        params = {**get_kind(d["kind"]).legacy_params, **d.get("params", {})}
        return cls(d["name"], d["kind"], _make_params(d["kind"], params, what=f"modality {d['name']!r}"))


def check_name(name: str) -> str:
    if not name or not name.replace("_", "").isalnum() or not name[0].isalpha() or name != name.lower():
        raise ValueError(f"modality name {name!r}: use lowercase letters, digits and _ (starting with a letter)")
    if name in RESERVED:
        raise ValueError(f"modality name {name!r} is reserved ({', '.join(RESERVED)})")
    return name


def _make_params(kind: str, values: Mapping[str, Any], what: str = "") -> Any:
    cls = get_kind(kind).params_cls
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise ValueError(f"{what or kind}: unknown {kind} parameter(s) {sorted(unknown)}; it has {sorted(known)}")
    out = {}
    for k, v in values.items():
        t = type(getattr(cls(), k))
        try:
            out[k] = t(v) if not isinstance(v, t) else v
        except (TypeError, ValueError):
            raise ValueError(f"{what or kind}: {k}={v!r} is not a {t.__name__}") from None
    return cls(**out)


def parse_modalities(text: str | Iterable[str] = DEFAULT_MODALITIES, preset: str = "resnet18") -> tuple[ModalitySpec, ...]:
    """"audio,visual" or "front:image,rear:image" -> specs with the preset's parameters."""
    from dimml.presets import get_preset
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    inputs = get_preset(preset).inputs
    specs = []
    for item in items:
        name, _, kind = item.partition(":")
        kind = kind or BUILTIN_NAMES.get(name, "")
        if not kind:
            raise ValueError(f"modality {name!r} needs a kind, e.g. {name}:image "
                             f"(built-in names: {', '.join(f'{n} ({k})' for n, k in BUILTIN_NAMES.items())}; "
                             f"kinds: {', '.join(sorted(KINDS))})")
        specs.append(ModalitySpec(check_name(name), kind,
                                  _make_params(kind, inputs.get(kind, {}), what=f"modality {name!r}")))
    return check_modalities(specs)


def check_modalities(specs: Iterable[ModalitySpec]) -> tuple[ModalitySpec, ...]:
    specs = tuple(specs)
    names = [s.name for s in specs]
    if len(specs) < 1 or len(set(names)) != len(names):
        raise ValueError(f"modalities must be distinct and at least one, got {names}")
    return specs


def format_modalities(specs: Iterable[ModalitySpec]) -> str:
    """The inverse of parse_modalities' names part: "audio,visual" / "front:image,rear:image"."""
    return ",".join(s.name if BUILTIN_NAMES.get(s.name) == s.kind else f"{s.name}:{s.kind}" for s in specs)


# ---------------------------------------------------------------------------------------
# the preprocessing config: the run's modalities plus limits

# The flat, audio+visual PreprocessConfig of schema 1 (runs, bundles and `--set preprocess.x`):
# old field -> (modality, parameter).
LEGACY_FIELDS = {"sample_rate": ("audio", "sample_rate"), "audio_seconds": ("audio", "seconds"),
                 "nperseg": ("audio", "nperseg"), "noverlap": ("audio", "noverlap"),
                 "log_eps": ("audio", "log_eps"), "num_frames": ("visual", "num_frames"),
                 "frame_height": ("visual", "height"), "frame_width": ("visual", "width")}


@dataclass(frozen=True)
class PreprocessConfig:
    """How source files become model inputs: the modalities (in model order) and safety limits.

    Saved verbatim with every training run and every exported bundle, and read back from
    there by serving and scoring, so a model is always fed exactly what it was trained on.
    """

    modalities: tuple[ModalitySpec, ...] = ()
    max_duration_s: float = 600.0
    max_pixels: int = 4096 * 4096

    def __post_init__(self) -> None:
        if not self.modalities:
            object.__setattr__(self, "modalities", parse_modalities(DEFAULT_MODALITIES))
        object.__setattr__(self, "modalities", check_modalities(self.modalities))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.modalities)

    def spec(self, name: str) -> ModalitySpec:
        for s in self.modalities:
            if s.name == name:
                return s
        raise KeyError(f"no modality {name!r} (this model has {', '.join(self.names)})")

    @property
    def limits(self) -> Limits:
        return Limits(self.max_duration_s, self.max_pixels)

    @property
    def fields(self) -> tuple[str, ...]:
        """Source fields a sample may have: "video" if any modality comes from it, then own files."""
        out = [VIDEO_FIELD] if any(s.kind_obj.from_video for s in self.modalities) else []
        return tuple(out + [s.name for s in self.modalities if not s.kind_obj.from_video])

    @property
    def optional_fields(self) -> tuple[str, ...]:
        """Fields that may replace the video for one modality (a video-derived kind from its own file)."""
        return tuple(s.name for s in self.modalities if s.kind_obj.from_video)

    def input_dict(self) -> dict[str, Any]:
        """The fields that change what the model sees (limits excluded): the cache key."""
        return {"modalities": [s.to_dict() for s in self.modalities]}

    def fingerprint(self) -> str:
        """Short stable hash of the input-defining fields."""
        blob = json.dumps(self.input_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {**self.input_dict(), "max_duration_s": self.max_duration_s, "max_pixels": self.max_pixels}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PreprocessConfig:
        """Build from a saved dict; the flat audio+visual format of schema 1 is read as audio+visual.

        Unknown keys are an error (a newer format we can't honour).
        """
        d = dict(d)
        limits = {k: d.pop(k) for k in ("max_duration_s", "max_pixels") if k in d}
        if "modalities" in d:
            specs = tuple(ModalitySpec.from_dict(s) for s in d.pop("modalities"))
            if d:
                raise ValueError(f"unknown preprocessing fields {sorted(d)}")
            return cls(specs, **limits)
        unknown = set(d) - set(LEGACY_FIELDS)
        if unknown:
            raise ValueError(f"unknown preprocessing fields {sorted(unknown)}")
        return cls(parse_modalities(DEFAULT_MODALITIES), **limits).override(d)

    def override(self, changes: Mapping[str, Any]) -> PreprocessConfig:
        """Apply "<modality>.<param>" (or legacy flat names, or limits) -> value; unknown names: ValueError."""
        per: dict[str, dict[str, Any]] = {}
        limits = {}
        for key, value in changes.items():
            if key in ("max_duration_s", "max_pixels"):
                limits[key] = type(getattr(self, key))(value)
                continue
            if "." in key:
                mod, param = key.split(".", 1)
            else:
                mod, param = LEGACY_FIELDS.get(key, ("", ""))
            if not mod or not param:
                raise ValueError(f"unknown preprocessing field {key!r}; use <modality>.<parameter> "
                                 f"(modalities: {', '.join(self.names)}) or max_duration_s / max_pixels")
            per.setdefault(mod, {})[param] = value
        specs = tuple(s.replace(**per.pop(s.name)) if s.name in per else s for s in self.modalities)
        if per:
            raise ValueError(f"preprocessing names unknown modality(ies) {sorted(per)}; this config has {', '.join(self.names)}")
        return dataclasses.replace(self, modalities=specs, **limits)


def preprocess_for(preset: str, modalities: str | Iterable[str] = DEFAULT_MODALITIES,
                   overrides: Mapping[str, Any] | None = None) -> PreprocessConfig:
    """The PreprocessConfig of a preset for the given modalities, with "<modality>.<param>" overrides."""
    return PreprocessConfig(parse_modalities(modalities, preset)).override(overrides or {})


# the kinds: each module registers itself
from dimml.modalities import audio, flow, frames, image  # noqa: E402,F401

__all__ = ["Kind", "KINDS", "register_kind", "get_kind", "ModalitySpec", "PreprocessConfig", "Limits",
           "parse_modalities", "format_modalities", "preprocess_for", "check_modalities",
           "VIDEO_FIELD", "BUILTIN_NAMES", "DEFAULT_MODALITIES", "LEGACY_FIELDS"]
