"""Synthetic audio-video corpus: real media files whose classes live in both modalities.

Every class k has an audio signature (a tone at a class frequency, plus its octave, amplitude
modulated at a class rate) and a visual signature (a class-coloured shape moving over a grey
background). Per sample the phase, pitch, loudness, position and speed are random.

Two noise knobs in [0, 1] make one modality strong and the other weak, the imbalance DI-MML
exists for. For a modality with knob x:
  * with probability x**2 the sample carries the signature of a uniformly random class instead
    of its own (independently per modality), which caps what that modality alone can reach at
    1 - x**2 (K - 1) / K: 0.52 at x = 0.8 with K = 4, 0.99 at x = 0.1;
  * audio: white noise at a signal-to-noise ratio falling with x, plus ~Poisson(2x) quieter
    distractor tones of random classes;
  * video: pixel noise with std ~70x, plus ~Poisson(5x) distractor shapes of random classes.
x = 0 is the clean signature, x = 1 buries it (the modality carries no label information).

`write_clip` (the PyAV writer used here) is reused by tests to write media in many formats.
"""
from __future__ import annotations

import argparse
import colorsys
import csv
import dataclasses
import json
import math
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from multiprocessing import get_context
from pathlib import Path

import av
import numpy as np

from dimml.fileio import atomic_path, atomic_write_text

# ---------------------------------------------------------------------------------------
# writing one media file

# extension -> (video encoder, audio encoder): what write_clip uses when not told
DEFAULT_CODECS: dict[str, tuple[str | None, str]] = {
    ".mp4": ("libx264", "aac"),
    ".mov": ("libx264", "aac"),
    ".mkv": ("libx264", "aac"),
    ".flv": ("flv", "libmp3lame"),      # flv1 (Sorenson H.263) + mp3, as CREMA-D's VideoFlash
    ".webm": ("libvpx-vp9", "libopus"),
    ".avi": ("mjpeg", "pcm_s16le"),
    ".wav": (None, "pcm_s16le"),
    ".flac": (None, "flac"),
    ".mp3": (None, "libmp3lame"),
}
# sample rates a muxer accepts when its codec would take more (FFmpeg's flv muxer refuses others)
CONTAINER_RATES: dict[str, tuple[int, ...]] = {"flv": (11025, 22050, 44100)}
# codecs whose usual 4:2:0 format is the full-range one (mjpeg refuses limited-range yuv420p)
PIX_FMT: dict[str, str] = {"mjpeg": "yuvj420p"}
VIDEO_OPTIONS: dict[str, dict[str, str]] = {"libx264": {"preset": "veryfast"},
                                            "libvpx-vp9": {"deadline": "realtime", "cpu-used": "8"}}


def _pick_rate(rate: int, allowed: tuple[int, ...] | None) -> int:
    """rate itself if allowed, else the smallest allowed rate above it (else the largest)."""
    if not allowed or rate in allowed:
        return rate
    above = [r for r in allowed if r >= rate]
    return min(above) if above else max(allowed)


def write_clip(path: str | os.PathLike, frames: np.ndarray | None, fps: float = 15,
               audio: np.ndarray | None = None, sample_rate: int = 16000,
               video_codec: str | None = None, audio_codec: str | None = None,
               container_format: str | None = None) -> Path:
    """Encode RGB frames uint8 [T, H, W, 3] and/or audio float32 [n] or [ch, n] into one file.

    Codecs default from the extension (DEFAULT_CODECS); frames=None writes audio only,
    audio=None video only. Audio is resampled (PyAV) to a rate the codec and container
    accept (opus 48 kHz, flv 22.05 kHz...) and cut to the encoder's frame size. Written to a
    temporary name and renamed, so a crash never leaves a half file under `path`.
    """
    path = Path(path)
    if frames is None and audio is None:
        raise ValueError(f"{path}: nothing to write (no frames and no audio)")
    ext = path.suffix.lower()
    v_default, a_default = DEFAULT_CODECS.get(ext, ("libx264", "aac"))
    video_codec, audio_codec = video_codec or v_default, audio_codec or a_default
    if frames is not None and video_codec is None:
        raise ValueError(f"{path}: {ext} is an audio-only format; pass video_codec to write frames")
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")   # keeps the extension: format guess
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with av.open(str(tmp), "w", format=container_format) as c:
            v = a = None
            if frames is not None:
                v = _add_video(c, frames, fps, video_codec, path)
            if audio is not None:
                a, resampler = _add_audio(c, audio, sample_rate, audio_codec)
            if v is not None:
                for i, rgb in enumerate(frames):
                    f = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
                    f.pts = i
                    c.mux(v.encode(f))
                c.mux(v.encode(None))
            if a is not None:
                _encode_audio(c, a, resampler, audio, sample_rate)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _add_video(c, frames: np.ndarray, fps: float, codec: str, path: Path):
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"{path}: frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    _, h, w, _ = frames.shape
    v = c.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
    pix = PIX_FMT.get(v.codec_context.name, "yuv420p")
    formats = [f.name for f in (v.codec_context.codec.video_formats or [])]
    v.pix_fmt = pix if not formats or pix in formats else formats[0]
    if "420" in v.pix_fmt and (h % 2 or w % 2):
        raise ValueError(f"{path}: {codec} ({v.pix_fmt}) needs even frame dimensions, got {w}x{h}")
    v.width, v.height = w, h
    v.codec_context.time_base = 1 / Fraction(fps).limit_denominator(1001)
    v.codec_context.options = VIDEO_OPTIONS.get(v.codec_context.name, {})
    return v


def _add_audio(c, audio: np.ndarray, sample_rate: int, codec: str):
    channels = 1 if audio.ndim == 1 else audio.shape[0]
    if audio.ndim > 2 or channels not in (1, 2):
        raise ValueError(f"audio must be float [n] or [1|2, n], got shape {audio.shape}")
    rate = _pick_rate(sample_rate, tuple(av.Codec(codec, "w").audio_rates or ()))
    rate = _pick_rate(rate, CONTAINER_RATES.get(c.format.name))
    a = c.add_stream(codec, rate=rate, layout="mono" if channels == 1 else "stereo")
    a.codec_context.open()   # opened now so that frame_size (aac 1024, mp3 1152...) is known
    frame_size = a.codec_context.frame_size or None   # 0: any size (pcm, flac)
    resampler = av.AudioResampler(format=a.format.name, layout=a.layout.name, rate=rate,
                                  frame_size=frame_size)
    return a, resampler


def _encode_audio(c, a, resampler: av.AudioResampler, audio: np.ndarray, sample_rate: int) -> None:
    planar = np.ascontiguousarray(np.atleast_2d(audio).astype(np.float32))
    frame = av.AudioFrame.from_ndarray(planar, format="fltp", layout=a.layout.name)
    frame.sample_rate = sample_rate
    pts = 0
    for out in [*resampler.resample(frame), *resampler.resample(None)]:
        out.pts, out.time_base = pts, Fraction(1, a.codec_context.sample_rate)
        pts += out.samples
        c.mux(a.encode(out))
    c.mux(a.encode(None))


# ---------------------------------------------------------------------------------------
# the corpus

# CREMA-D's emotion codes, in the reference code's label order
CREMAD_EMOTIONS = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")
CREMAD_SENTENCES = ("IEO", "TIE", "IOM", "IWW", "TAI", "MTI", "IWL", "ITH", "DFA", "ITS", "TSI", "WSI")
CREMAD_LEVELS = ("XX", "LO", "MD", "HI")
CREMAD_MAX_ACTORS = 91
SHAPES = ("circle", "square", "triangle", "ring", "cross", "diamond")


@dataclass(frozen=True)
class SynthConfig:
    """What `synthesize` writes; saved as DIR/synth.json. See the module docstring for the noise."""

    classes: int = 4
    per_class: int = 16
    seed: int = 0
    format: str | None = None       # "mp4" | "flv"; None: flv for the cremad layout, else mp4
    layout: str = "folders"         # "folders": DIR/<class>/<id>.<ext>; "cremad": as CREMA-D
    audio_noise: float = 0.5
    visual_noise: float = 0.5
    duration_s: float = 2.0
    width: int = 128
    height: int = 96
    fps: int = 15
    sample_rate: int = 16000
    val_frac: float = 0.15
    test_frac: float = 0.15

    def __post_init__(self):
        if self.format is None:
            object.__setattr__(self, "format", "flv" if self.layout == "cremad" else "mp4")
        if self.layout not in ("folders", "cremad"):
            raise ValueError(f"layout must be 'folders' or 'cremad', got {self.layout!r}")
        if self.format not in ("mp4", "flv"):
            raise ValueError(f"format must be 'mp4' or 'flv', got {self.format!r}")
        if self.layout == "cremad" and self.format != "flv":
            raise ValueError("the cremad layout writes VideoFlash/*.flv: format must be flv")
        if self.layout == "cremad" and not 1 <= self.classes <= len(CREMAD_EMOTIONS):
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
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Job:
    """One sample to write: its class, its number within the class, where it goes."""

    label: int
    index: int          # within the class
    path: str           # relative to the corpus directory
    split: str
    audio_path: str = ""   # cremad: the separate wav


# ----- signatures

def tone_frequency(k: int, classes: int) -> float:
    """Class k's fundamental: log-spaced over 300..3000 Hz (octave below 8 kHz, many bins apart)."""
    return 300.0 * 10.0 ** (k / max(classes - 1, 1))


def am_rate(k: int, classes: int) -> float:
    """Class k's amplitude-modulation rate, 1.5..6 Hz, in an order unrelated to pitch."""
    return 1.5 + 4.5 * ((3 * k) % classes) / max(classes - 1, 1)


def class_colour(k: int, classes: int, rng: np.random.Generator) -> np.ndarray:
    """Class k's colour (hues evenly spaced, jittered by less than half a step), RGB 0..255."""
    hue = (k + rng.uniform(-0.2, 0.2)) / classes % 1.0
    rgb = colorsys.hsv_to_rgb(hue, rng.uniform(0.75, 1.0), rng.uniform(0.8, 1.0))
    return np.array(rgb, np.float32) * 255


def _shown_class(label: int, classes: int, noise: float, rng: np.random.Generator) -> int:
    """The class whose signature the sample carries: a random one with probability noise**2."""
    return int(rng.integers(classes)) if rng.random() < noise * noise else label


def _voice(k: int, cfg: SynthConfig, t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    f = tone_frequency(k, cfg.classes) * rng.uniform(0.98, 1.02)          # pitch jitter
    am = am_rate(k, cfg.classes) * rng.uniform(0.9, 1.1)
    wave = np.zeros_like(t)
    for mult, amp in ((1, 1.0), (2, 0.5)):
        if mult * f < 0.45 * cfg.sample_rate:   # no aliased partials at low sample rates
            wave += amp * np.sin(2 * np.pi * mult * f * t + rng.uniform(0, 2 * np.pi))
    return wave * (0.6 + 0.4 * np.sin(2 * np.pi * am * t + rng.uniform(0, 2 * np.pi)))


def make_audio(label: int, cfg: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    """Mono float32 waveform [duration_s * sample_rate] of one sample of class `label`."""
    x = cfg.audio_noise
    t = np.arange(int(round(cfg.duration_s * cfg.sample_rate))) / cfg.sample_rate
    wave = _voice(_shown_class(label, cfg.classes, x, rng), cfg, t, rng)
    for _ in range(rng.poisson(2 * x)):
        wave += rng.uniform(0.3, 0.7) * _voice(int(rng.integers(cfg.classes)), cfg, t, rng)
    rms = float(np.sqrt(np.mean(wave ** 2)))
    # noise rms / signal rms: 0.01 (40 dB SNR) at x=0, 2.5 (-8 dB) at x=0.5, 10 (-20 dB) at x=1
    wave += rng.standard_normal(t.size) * rms * (0.01 + 10 * x * x)
    wave *= rng.uniform(0.3, 0.9) / np.abs(wave).max()                     # loudness
    return wave.astype(np.float32)


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    ax, ay = np.abs(dx), np.abs(dy)
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return np.maximum(ax, ay) <= 0.8 * r
    if shape == "triangle":
        return (dy <= 0.8 * r) & (ax <= 0.6 * (dy + r))
    if shape == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if shape == "cross":
        return ((ax <= 0.3 * r) & (ay <= r)) | ((ay <= 0.3 * r) & (ax <= r))
    return ax + ay <= r   # diamond


def _bounce(p0: float, v: float, t: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Positions over time of a point moving at speed v, reflected at lo and hi."""
    span = hi - lo
    p = np.mod(p0 - lo + v * t, 2 * span)
    return lo + np.where(p > span, 2 * span - p, p)


class _Sprite:
    """A class-coloured shape moving on a straight line, bouncing off the frame edges."""

    def __init__(self, k: int, r: float, cfg: SynthConfig, t: np.ndarray, rng: np.random.Generator):
        self.shape = SHAPES[k % len(SHAPES)]
        self.colour = class_colour(k, cfg.classes, rng)
        self.r = r
        speed, angle = rng.uniform(0.2, 0.6) * cfg.width, rng.uniform(0, 2 * np.pi)
        self.x = _bounce(rng.uniform(r, cfg.width - r), speed * np.cos(angle), t, r, cfg.width - r)
        self.y = _bounce(rng.uniform(r, cfg.height - r), speed * np.sin(angle), t, r, cfg.height - r)

    def draw(self, frame: np.ndarray, i: int, xx: np.ndarray, yy: np.ndarray) -> None:
        frame[_shape_mask(self.shape, xx - self.x[i], yy - self.y[i], self.r)] = self.colour


def make_frames(label: int, cfg: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    """RGB frames uint8 [duration_s * fps, height, width, 3] of one sample of class `label`."""
    y = cfg.visual_noise
    n = max(1, int(round(cfg.duration_s * cfg.fps)))
    t = np.arange(n) / cfg.fps
    yy, xx = np.mgrid[0:cfg.height, 0:cfg.width].astype(np.float32)
    r = 0.22 * cfg.height * rng.uniform(0.85, 1.15)   # ~10 px after a resize to 64x64
    main = _Sprite(_shown_class(label, cfg.classes, y, rng), r, cfg, t, rng)
    clutter = [_Sprite(int(rng.integers(cfg.classes)), r * rng.uniform(0.5, 1.0), cfg, t, rng)
               for _ in range(rng.poisson(5 * y))]
    layers = clutter + [main]
    rng.shuffle(layers)   # the main shape is sometimes hidden behind clutter
    background = rng.uniform(30, 110) + rng.normal(0, 6, (cfg.height, cfg.width, 1))
    frames = np.empty((n, cfg.height, cfg.width, 3), np.float32)
    for i in range(n):
        frames[i] = background
        for sprite in layers:
            sprite.draw(frames[i], i, xx, yy)
    if y > 0:
        frames += rng.standard_normal(frames.shape, dtype=np.float32) * (70 * y)
    return np.clip(frames, 0, 255).astype(np.uint8)


# ----- layout

def _split_counts(n: int, val_frac: float, test_frac: float) -> tuple[int, int]:
    """(val, test) counts out of n: rounded, at least 1 each where n >= 3 and the fraction > 0."""
    val, test = round(n * val_frac), round(n * test_frac)
    if n >= 3:
        val, test = max(val, int(val_frac > 0)), max(test, int(test_frac > 0))
    return val, test


def _assign_splits(n: int, cfg: SynthConfig, rng: np.random.Generator) -> list[str]:
    val, test = _split_counts(n, cfg.val_frac, cfg.test_frac)
    order = rng.permutation(n)
    splits = ["train"] * n
    for pos, i in enumerate(order):
        splits[i] = "test" if pos < test else "val" if pos < test + val else "train"
    return splits


def plan(cfg: SynthConfig) -> list[Job]:
    """Every sample's class, path and split (the manifest, before any file is written)."""
    names = cfg.class_names
    rng = np.random.default_rng([cfg.seed, 1 << 20])   # split stream: apart from sample streams
    jobs = []
    if cfg.layout == "folders":
        for k, name in enumerate(names):
            splits = _assign_splits(cfg.per_class, cfg, rng)   # stratified: every class in every split
            jobs += [Job(k, j, f"{name}/{j:04d}.{cfg.format}", splits[j]) for j in range(cfg.per_class)]
        return jobs
    # cremad: every actor speaks every emotion; splits are by actor (speaker-disjoint)
    actors = cfg.num_actors
    actor_split = _assign_splits(actors, cfg, rng)
    takes = [(s, lv) for lv in CREMAD_LEVELS for s in CREMAD_SENTENCES]
    for k, emo in enumerate(names):
        for j in range(cfg.per_class):
            a, (sentence, level) = j % actors, takes[j // actors]
            stem = f"{1001 + a}_{sentence}_{emo}_{level}"
            jobs.append(Job(k, j, f"VideoFlash/{stem}.flv", actor_split[a], f"AudioWAV/{stem}.wav"))
    return jobs


def make_sample(job: Job, cfg: SynthConfig, out: Path) -> None:
    """Generate one sample (deterministic in seed, class and index) and write its file(s)."""
    rng = np.random.default_rng([cfg.seed, job.label, job.index])
    audio = make_audio(job.label, cfg, rng)
    frames = make_frames(job.label, cfg, rng)
    write_clip(out / job.path, frames, cfg.fps, audio, cfg.sample_rate)
    if job.audio_path:
        write_clip(out / job.audio_path, None, audio=audio, sample_rate=cfg.sample_rate)


def _make_samples(jobs: list[Job], cfg: SynthConfig, out: Path) -> int:
    for job in jobs:
        make_sample(job, cfg, out)
    return len(jobs)


MANIFEST, CONFIG = "manifest.csv", "synth.json"


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
    ours = saved.is_file() and json.loads(saved.read_text()) == cfg.to_dict()
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
    todo = [j for j in jobs if not (ours and (out / j.path).is_file()
                                    and (not j.audio_path or (out / j.audio_path).is_file()))]
    from tqdm import tqdm
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=f"synth {out}", unit="clip",
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

    fields = ["path", "label", "split"] + (["audio_path"] if cfg.layout == "cremad" else [])
    names = cfg.class_names
    rows = [{"path": j.path, "label": names[j.label], "split": j.split, "audio_path": j.audio_path}
            for j in sorted(jobs, key=lambda j: j.path)]
    with atomic_path(manifest) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return manifest


# ---------------------------------------------------------------------------------------
# command line

def register(subparsers) -> None:
    """Add `synth` to the training CLI."""
    p = subparsers.add_parser("synth", help="write a synthetic audio-video corpus",
                              description=__doc__.splitlines()[0])
    d = SynthConfig()
    p.add_argument("--out", required=True, type=Path, help="corpus directory")
    p.add_argument("--classes", type=int, default=d.classes, help="number of classes (%(default)s)")
    p.add_argument("--per-class", type=int, default=d.per_class, help="clips per class (%(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="same seed, same files (%(default)s)")
    p.add_argument("--format", choices=["mp4", "flv"], default=None,
                   help="container (flv for --layout cremad, else mp4)")
    p.add_argument("--layout", choices=["folders", "cremad"], default=d.layout,
                   help="folders: DIR/<class>/<id>.<ext>; cremad: VideoFlash/*.flv + AudioWAV/*.wav "
                        "(%(default)s)")
    p.add_argument("--audio-noise", type=float, default=d.audio_noise,
                   help="0 clean audio signature .. 1 no label information in audio (%(default)s)")
    p.add_argument("--visual-noise", type=float, default=d.visual_noise,
                   help="0 clean visual signature .. 1 no label information in video (%(default)s)")
    p.add_argument("--duration", type=float, default=d.duration_s, help="seconds per clip (%(default)s)")
    p.add_argument("--workers", type=int, default=1, help="parallel encoding processes (%(default)s)")
    p.add_argument("--force", action="store_true", help="write into a non-empty directory")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        cfg = SynthConfig(classes=args.classes, per_class=args.per_class, seed=args.seed,
                          format=args.format, layout=args.layout, audio_noise=args.audio_noise,
                          visual_noise=args.visual_noise, duration_s=args.duration)
        manifest = synthesize(args.out, cfg, workers=args.workers, force=args.force)
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(manifest)
    return 0


__all__ = ["SynthConfig", "Job", "synthesize", "plan", "make_audio", "make_frames", "make_sample",
           "write_clip", "DEFAULT_CODECS", "CREMAD_EMOTIONS", "register"]
