"""Synthetic corpora for any of DI-MML's settings: real media files whose class lives in every modality.

`python -m training synth --modalities M` writes, deterministically per seed, a corpus with a
`manifest.csv` (`path` for the video, `<name>_path` for a modality's own file, label, split):

  * `audio,visual` (the default): a video per sample, a class tone in its audio track and a
    class-coloured, class-shaped sprite moving in its frames;
  * `visual,flow`: a video whose luminance is a texture moving in the class direction (what
    optical flow sees) and whose colour holds a static class sprite (what RGB frames see);
  * `audio,visual,flow`: the same video with the class tone as its audio track;
  * `front:image,rear:image`: two PNG renders of one synthetic object seen from opposite sides,
    a class emblem on its front and class-oriented stripes on its rear.

Each modality draws its class independently and has a noise knob in [0, 1] (`--noise
visual=0.8,flow=0.2`; `--audio-noise` / `--visual-noise` set audio's and visual's): with
probability x**2 the modality shows a random class's signature, which caps what it alone can
reach at 1 - x**2 (K - 1) / K (0.52 at x = 0.8 with K = 4), and the rest of the noise makes the
signature harder to see (training/synth_signals.py says how per kind). x = 0 is the clean
signature, x = 1 carries no label information: one strong and one weak modality is the
imbalance DI-MML exists for.

`write_clip` (training/clipwriter.py, the PyAV writer used here) is reused by tests to write media.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import sys
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from dimml.datasets import group_split, manifest_column, stratified_split
from dimml.fileio import atomic_path, atomic_write_bytes, atomic_write_text
from dimml.modalities import DEFAULT_MODALITIES, VIDEO_FIELD, ModalitySpec, format_modalities, parse_modalities
from training.clipwriter import DEFAULT_CODECS, write_clip
from training.synth_signals import (
    FRAMES_CUES,
    Canvas,
    make_audio,
    make_body,
    make_frames,
    make_motion_frames,
    make_view,
)

# CREMA-D's emotion codes, in the reference code's label order
CREMAD_EMOTIONS = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")
CREMAD_SENTENCES = ("IEO", "TIE", "IOM", "IWW", "TAI", "MTI", "IWL", "ITH", "DFA", "ITS", "TSI", "WSI")
CREMAD_LEVELS = ("XX", "LO", "MD", "HI")
CREMAD_MAX_ACTORS = 91
VIDEO_KINDS = ("audio", "frames", "flow")   # the video-derived kinds synth has a generator for (one each)
IMAGE_KIND = "image"
DEFAULT_NOISE = 0.5
# the flags of the audio-visual corpus: the noise of the modalities with these (built-in) names
LEGACY_NOISE = {"audio": "audio_noise", "visual": "visual_noise"}
# Named corpora: SynthConfig fields (`synth --recipe NAME`; other flags override them).
# competition: RESULTS.md's modality-competition corpus for the `small` preset: audio learnt
# within an epoch or two, the frames' shape-only cue over 10-25 epochs (issue 14).
# interaction: issue 20's corpus for DUC's claim, that a weak modality learns from the strong one's
# class structure: the same shape-only visual cue, but 40 clips a class (24 to train), too few for
# the frames alone to learn it reliably in 30 epochs, beside a clean audio cue (noise 0) whose
# encoder is right from the first epochs; so DI-MML's visual head should beat the same encoder
# trained alone if DUC helps as the paper says.
RECIPES: dict[str, dict[str, Any]] = {
    "competition": dict(classes=4, per_class=150, seed=1, frames_cue="shape",
                        noise=(("audio", 0.3), ("visual", 0.0))),
    "interaction": dict(classes=4, per_class=40, seed=4, frames_cue="shape", test_frac=0.25,
                        noise=(("audio", 0.0), ("visual", 0.0))),
}


@dataclass(frozen=True)
class SynthConfig:
    """What `synthesize` writes; saved as DIR/synth.json. See the module docstring for the noise."""

    classes: int = 4
    per_class: int = 16
    seed: int = 0
    format: str | None = None       # video container "mp4" | "flv"; None: flv for the cremad layout, else mp4
    layout: str = "folders"         # "folders": DIR/<class>/<id>.<ext>; "cremad": as CREMA-D
    audio_noise: float = DEFAULT_NOISE
    visual_noise: float = DEFAULT_NOISE
    duration_s: float = 2.0
    width: int = 128
    height: int = 96
    fps: int = 15
    sample_rate: int = 16000
    val_frac: float = 0.15
    test_frac: float = 0.15
    modalities: str = DEFAULT_MODALITIES
    noise: tuple[tuple[str, float], ...] = ()   # (modality, knob) for the others; overrides audio/visual_noise
    frames_cue: str = "colour"      # the frames' class cue: "colour" (and shape) | "shape" (only; must be learnt)

    def __post_init__(self):
        specs = parse_modalities(self.modalities)
        object.__setattr__(self, "modalities", format_modalities(specs))
        self._normalise_noise({s.name for s in specs})
        if self.format is None:
            object.__setattr__(self, "format", "flv" if self.layout == "cremad" else "mp4")
        kinds = [s.kind for s in specs]
        unsupported = sorted({k for k in kinds if k not in VIDEO_KINDS + (IMAGE_KIND,)})
        if unsupported:
            raise ValueError(f"synth has no generator for kind(s) {unsupported}")
        repeated = sorted({k for k in kinds if k in VIDEO_KINDS and kinds.count(k) > 1})
        if repeated:
            raise ValueError(f"synth writes one video per sample, with one signal per kind: at most one "
                             f"{'/'.join(repeated)} modality, got {self.modalities}")
        if self.frames_cue not in FRAMES_CUES:
            raise ValueError(f"frames_cue must be one of {FRAMES_CUES}, got {self.frames_cue!r}")
        if self.layout not in ("folders", "cremad"):
            raise ValueError(f"layout must be 'folders' or 'cremad', got {self.layout!r}")
        if self.format not in ("mp4", "flv"):
            raise ValueError(f"format must be 'mp4' or 'flv', got {self.format!r}")
        if self.layout == "cremad":
            if self.format != "flv":
                raise ValueError("the cremad layout writes VideoFlash/*.flv: format must be flv")
            if "audio" not in kinds or IMAGE_KIND in kinds:
                raise ValueError(f"the cremad layout is videos with separate audio: its modalities need an "
                                 f"audio kind and no image, got {self.modalities}")
            if not 1 <= self.classes <= len(CREMAD_EMOTIONS):
                raise ValueError(f"the cremad layout has {len(CREMAD_EMOTIONS)} emotions: "
                                 f"classes must be 1..6, got {self.classes}")
        if self.classes < 1 or self.per_class < 1:
            raise ValueError("classes and per_class must be >= 1")
        for knob in ("audio_noise", "visual_noise"):
            if not 0.0 <= getattr(self, knob) <= 1.0:
                raise ValueError(f"{knob} must be in [0, 1], got {getattr(self, knob)}")
        if self.val_frac < 0 or self.test_frac < 0 or self.val_frac + self.test_frac >= 1:
            raise ValueError("val_frac and test_frac must be >= 0 and sum to less than 1")
        if self.width % 2 or self.height % 2:
            raise ValueError(f"width and height must be even (4:2:0 video), got {self.width}x{self.height}")
        if self.layout == "cremad" and self.per_class > CREMAD_MAX_ACTORS * 48:
            raise ValueError(f"the cremad layout names at most {CREMAD_MAX_ACTORS * 48} clips per emotion")

    def _normalise_noise(self, names: set[str]) -> None:
        """noise as sorted (name, float) pairs; audio/visual entries moved onto the legacy fields."""
        items = self.noise.items() if isinstance(self.noise, Mapping) else self.noise
        out = {}
        for name, value in items:
            value = float(value)
            if name not in names:
                raise ValueError(f"noise for {name!r}, which is not one of the modalities ({self.modalities})")
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"noise of {name} must be in [0, 1], got {value}")
            if name in LEGACY_NOISE:
                object.__setattr__(self, LEGACY_NOISE[name], value)
            else:
                out[name] = value
        object.__setattr__(self, "noise", tuple(sorted(out.items())))

    @property
    def specs(self) -> tuple[ModalitySpec, ...]:
        return parse_modalities(self.modalities)

    def noise_of(self, name: str) -> float:
        """The noise knob of a modality."""
        own = dict(self.noise)
        if name in own:
            return own[name]
        return getattr(self, LEGACY_NOISE[name]) if name in LEGACY_NOISE else DEFAULT_NOISE

    @property
    def has_video(self) -> bool:
        return any(s.kind_obj.from_video for s in self.specs)

    @property
    def image_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.specs if not s.kind_obj.from_video)

    @property
    def canvas(self) -> Canvas:
        return Canvas(self.classes, self.width, self.height, self.fps, self.duration_s, self.sample_rate)

    @property
    def class_names(self) -> list[str]:
        if self.layout == "cremad":
            return list(CREMAD_EMOTIONS[: self.classes])
        return [f"class{k}" for k in range(self.classes)]

    @property
    def num_actors(self) -> int:
        """cremad layout: speakers, each speaking every emotion; >= 3 so every split gets one."""
        return min(CREMAD_MAX_ACTORS, max(math.ceil(self.per_class / 2), min(3, self.per_class)))

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "noise": dict(self.noise)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SynthConfig:
        """From synth.json (one written before modalities existed reads as audio,visual)."""
        return cls(**d)


@dataclass(frozen=True)
class Job:
    """One sample to write: its class, its number within the class, its files and split."""

    label: int
    index: int                              # within the class
    split: str
    files: tuple[tuple[str, str], ...]      # (field, path relative to the corpus): "video", own files

    @property
    def key(self) -> str:
        """The video, else the first file (as dimml.datasets.Sample.key)."""
        return dict(self.files).get(VIDEO_FIELD) or self.files[0][1]


# ---------------------------------------------------------------------------------------
# layout

def _kind_name(cfg: SynthConfig, kind: str) -> str | None:
    return next((s.name for s in cfg.specs if s.kind == kind), None)


def plan(cfg: SynthConfig) -> list[Job]:
    """Every sample's class, files and split (the manifest, before any file is written)."""
    names = cfg.class_names
    items: list[tuple[int, int, tuple[tuple[str, str], ...]]] = []
    if cfg.layout == "folders":
        video, images = cfg.has_video, cfg.image_names
        for k, name in enumerate(names):
            for j in range(cfg.per_class):
                files = ((VIDEO_FIELD, f"{name}/{j:04d}.{cfg.format}"),) if video else ()
                items.append((k, j, files + tuple((m, f"{name}/{j:04d}_{m}.png") for m in images)))
        keys = [dict(f).get(VIDEO_FIELD) or f[0][1] for _, _, f in items]
        # stratified: every class in every split (the one split function of dimml.datasets)
        splits = stratified_split(keys, [k for k, _, _ in items], seed=cfg.seed, val_fraction=cfg.val_frac,
                                  test_fraction=cfg.test_frac)
        return [Job(k, j, split, files) for (k, j, files), split in zip(items, splits)]
    # cremad: every actor speaks every emotion; splits are by actor (speaker-disjoint)
    actors, audio = cfg.num_actors, _kind_name(cfg, "audio")
    takes = [(s, lv) for lv in CREMAD_LEVELS for s in CREMAD_SENTENCES]
    for k, emo in enumerate(names):
        for j in range(cfg.per_class):
            a, (sentence, level) = j % actors, takes[j // actors]
            stem = f"{1001 + a}_{sentence}_{emo}_{level}"
            items.append((k, j, ((VIDEO_FIELD, f"VideoFlash/{stem}.flv"), (audio, f"AudioWAV/{stem}.wav"))))
    keys = [files[0][1] for _, _, files in items]
    splits = group_split(keys, lambda p: Path(p).stem.split("_")[0], seed=cfg.seed, val_fraction=cfg.val_frac,
                         test_fraction=cfg.test_frac)
    return [Job(k, j, split, files) for (k, j, files), split in zip(items, splits)]


def write_png(path: Path, rgb: np.ndarray) -> None:
    """An RGB uint8 image as PNG, written atomically."""
    import cv2  # OpenCV: the media layer's image codec
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    if not ok:
        raise ValueError(f"{path}: PNG encoding failed")
    atomic_write_bytes(path, buf.tobytes())


@dataclass
class Rendered:
    """One sample's signals before encoding."""

    audio: np.ndarray | None              # float32 [n] (the video's audio track)
    frames: np.ndarray | None             # uint8 [T, H, W, 3] (the video's frames)
    images: dict[str, np.ndarray]         # image modality name -> uint8 [H, W, 3]


def render_sample(label: int, index: int, cfg: SynthConfig) -> Rendered:
    """Generate one sample's signals, deterministic in seed, class and index."""
    rng = np.random.default_rng([cfg.seed, label, index])
    canvas = cfg.canvas
    by_kind = {s.kind: s.name for s in cfg.specs if s.kind in VIDEO_KINDS}
    # one random stream per sample, drawn in a fixed order: audio, video, views (the
    # audio-visual corpus draws exactly as it always did, so its files are unchanged)
    audio = make_audio(label, cfg.noise_of(by_kind["audio"]), canvas, rng) if "audio" in by_kind else None
    frames = None   # audio alone: an audio-only file
    frames_noise = cfg.noise_of(by_kind["frames"]) if "frames" in by_kind else None
    if "flow" in by_kind:
        frames = make_motion_frames(label, cfg.noise_of(by_kind["flow"]), frames_noise, canvas, rng, cfg.frames_cue)
    elif frames_noise is not None:
        frames = make_frames(label, frames_noise, canvas, rng, cfg.frames_cue)
    images = {}
    if cfg.image_names:
        body = make_body(canvas, rng)
        for view, name in enumerate(cfg.image_names):
            images[name] = make_view(view, body, label, cfg.noise_of(name), canvas, rng)
    return Rendered(audio, frames, images)


def make_sample(job: Job, cfg: SynthConfig, out: Path) -> None:
    """Generate one sample and write its file(s)."""
    r, files = render_sample(job.label, job.index, cfg), dict(job.files)
    if cfg.has_video:
        write_clip(out / files[VIDEO_FIELD], r.frames, cfg.fps, r.audio, cfg.sample_rate)
        audio_name = _kind_name(cfg, "audio")
        if audio_name in files:   # cremad: the separate wav
            write_clip(out / files[audio_name], None, audio=r.audio, sample_rate=cfg.sample_rate)
    for name, img in r.images.items():
        write_png(out / files[name], img)


def _make_samples(jobs: list[Job], cfg: SynthConfig, out: Path) -> int:
    for job in jobs:
        make_sample(job, cfg, out)
    return len(jobs)


MANIFEST, CONFIG = "manifest.csv", "synth.json"


def _saved_config(path: Path) -> SynthConfig | None:
    try:
        return SynthConfig.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def manifest_columns(cfg: SynthConfig) -> list[str]:
    """`path` (the video) if any, label, split, then each own file's `<name>_path` (cremad: the wav's)."""
    head = [manifest_column(VIDEO_FIELD)] if cfg.has_video else []
    own = ([_kind_name(cfg, "audio")] if cfg.layout == "cremad" else []) + list(cfg.image_names)
    return head + ["label", "split"] + [manifest_column(f) for f in own]


def synthesize(out: str | os.PathLike, cfg: SynthConfig = SynthConfig(), *, workers: int = 1,
               force: bool = False, progress: bool = True) -> Path:
    """Write the corpus under `out`; returns the path of its manifest.csv (written last).

    An existing corpus of the same config is reused as is. A directory holding an
    interrupted synth (synth.json, no manifest) is completed, reusing its finished files.
    Any other non-empty directory is refused unless force (files are overwritten; stale
    ones of another config stay on disk but are not in the manifest).
    """
    out = Path(out)
    manifest, saved = out / MANIFEST, out / CONFIG
    ours = saved.is_file() and _saved_config(saved) == cfg
    if ours and manifest.is_file():
        return manifest
    if out.is_dir() and any(out.iterdir()) and not ours and not force:
        raise FileExistsError(f"{out}: directory is not empty and holds no synth corpus of this "
                              "config; choose another directory or pass --force")
    out.mkdir(parents=True, exist_ok=True)
    manifest.unlink(missing_ok=True)   # from here until the end, the corpus is incomplete
    atomic_write_text(saved, json.dumps(cfg.to_dict(), indent=2) + "\n")

    jobs = plan(cfg)
    # every file is written under a temporary name and renamed, so an existing one is complete
    todo = [j for j in jobs if not (ours and all((out / p).is_file() for _, p in j.files))]
    from tqdm import tqdm
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=f"synth {out}", unit="sample",
               file=sys.stderr, disable=not progress)
    with bar:
        if workers <= 1:
            for job in todo:
                make_sample(job, cfg, out)
                bar.update()
        else:
            chunks = [todo[i:i + 4] for i in range(0, len(todo), 4)]
            # spawn: a forked child of a process running torch/threads can deadlock
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
                for done in pool.map(_make_samples, chunks, [cfg] * len(chunks), [out] * len(chunks)):
                    bar.update(done)

    names = cfg.class_names
    rows = [{"label": names[j.label], "split": j.split, **{manifest_column(f): p for f, p in j.files}}
            for j in sorted(jobs, key=lambda j: j.key)]
    with atomic_path(manifest) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, manifest_columns(cfg))
        w.writeheader()
        w.writerows(rows)
    return manifest


# ---------------------------------------------------------------------------------------
# command line

def parse_noise(text: str | None) -> dict[str, float]:
    """"visual=0.8,flow=0.2" -> {"visual": 0.8, "flow": 0.2}."""
    out: dict[str, float] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, eq, value = item.partition("=")
        try:
            if not eq:
                raise ValueError
            out[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--noise: expected name=value[,name=value...], got {item.strip()!r}") from None
    return out


def noise_from_flags(noise: str | None, legacy: Mapping[str, float | None]) -> dict[str, float]:
    """--noise merged with --audio-noise / --visual-noise (the same modality given twice: an error)."""
    out = parse_noise(noise)
    for name, value in legacy.items():
        if value is None:
            continue
        if name in out:
            raise ValueError(f"the noise of {name} is given twice (--{name}-noise and --noise)")
        out[name] = value
    return out


def register(subparsers) -> None:
    """Add `synth` to the training CLI."""
    p = subparsers.add_parser("synth", help="write a synthetic corpus (any of the four settings)",
                              description=__doc__.splitlines()[0])
    d = SynthConfig()
    # config flags default to None: unset ones come from --recipe, else SynthConfig's defaults
    p.add_argument("--out", required=True, type=Path, help="corpus directory")
    p.add_argument("--recipe", choices=sorted(RECIPES),
                   help="a named corpus (training.synth.RECIPES): competition = RESULTS.md's modality-competition "
                        "corpus, interaction = its DUC-interaction corpus; other flags override its fields")
    p.add_argument("--modalities", help=f"audio,visual | visual,flow | front:image,rear:image | audio,visual,flow "
                                        f"({d.modalities})")
    p.add_argument("--classes", type=int, help=f"number of classes ({d.classes})")
    p.add_argument("--per-class", dest="per_class", type=int, help=f"samples per class ({d.per_class})")
    p.add_argument("--seed", type=int, help=f"same seed, same files ({d.seed})")
    p.add_argument("--noise", default=None, metavar="NAME=X,...",
                   help=f"per-modality noise in [0, 1], e.g. visual=0.8,flow=0.2: 0 clean .. 1 no label "
                        f"information (each unset one: {DEFAULT_NOISE})")
    p.add_argument("--format", choices=["mp4", "flv"], help="video container (flv for --layout cremad, else mp4)")
    p.add_argument("--layout", choices=["folders", "cremad"],
                   help=f"folders: DIR/<class>/<id>.<ext>; cremad: VideoFlash/*.flv + AudioWAV/*.wav ({d.layout})")
    for name in LEGACY_NOISE:
        p.add_argument(f"--{name}-noise", type=float, default=None,
                       help=f"the noise of {name} (as --noise {name}=X; {DEFAULT_NOISE})")
    p.add_argument("--frames-cue", dest="frames_cue", choices=FRAMES_CUES,
                   help=f"what carries the frames' class: colour (and shape) or shape only, which an encoder "
                        f"must learn: the slow, weak modality of RESULTS.md's competition corpus ({d.frames_cue})")
    p.add_argument("--duration", dest="duration_s", type=float, help=f"seconds per clip ({d.duration_s})")
    p.add_argument("--workers", type=int, default=1, help="parallel encoding processes (%(default)s)")
    p.add_argument("--force", action="store_true", help="write into a non-empty directory")
    p.set_defaults(func=_run)


CLI_FIELDS = ("modalities", "classes", "per_class", "seed", "format", "layout", "frames_cue", "duration_s")


def config_from_args(args: argparse.Namespace) -> SynthConfig:
    """The recipe's fields (if any), overridden by the flags given."""
    fields = dict(RECIPES[args.recipe]) if args.recipe else {}
    fields.update({k: getattr(args, k) for k in CLI_FIELDS if getattr(args, k) is not None})
    noise = noise_from_flags(args.noise, {n: getattr(args, f"{n}_noise") for n in LEGACY_NOISE})
    if noise:   # given per modality: merged over the recipe's
        fields["noise"] = tuple({**dict(fields.get("noise", ())), **noise}.items())
    return SynthConfig(**fields)


def _run(args: argparse.Namespace) -> int:
    try:
        manifest = synthesize(args.out, config_from_args(args), workers=args.workers, force=args.force)
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(manifest)
    return 0


__all__ = ["SynthConfig", "RECIPES", "config_from_args", "Job", "Rendered", "synthesize", "plan", "render_sample",
           "make_sample", "manifest_columns", "parse_noise", "write_clip", "write_png", "DEFAULT_CODECS",
           "CREMAD_EMOTIONS", "DEFAULT_NOISE", "register"]
