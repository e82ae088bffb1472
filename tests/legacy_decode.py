"""Reference: dimml.media's decoding as it was before modality specs (commit 5293f20), kept verbatim.

tests/test_media.py asserts the default audio,visual decode of today's dimml.media equals this
one bit for bit. Only the config changed: the flat schema-1 PreprocessConfig (LegacyConfig
below, copied from 5293f20:dimml/config.py) replaces the import. Do not "fix" this file: it is
the record of what users' caches and models were made with.
"""
from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import BinaryIO

import av
import numpy as np
import scipy.signal


@dataclass(frozen=True)
class PreprocessConfig:
    """The flat audio+visual preprocessing config of schema 1 (decoding fields and limits only)."""

    sample_rate: int = 16000
    audio_seconds: float = 3.0
    nperseg: int = 512
    noverlap: int = 353
    log_eps: float = 1e-7
    num_frames: int = 3
    frame_height: int = 224
    frame_width: int = 224
    max_duration_s: float = 600.0
    max_pixels: int = 4096 * 4096

    @property
    def num_samples(self) -> int:
        return int(round(self.sample_rate * self.audio_seconds))


LegacyConfig = PreprocessConfig


Source = str | os.PathLike | bytes | BinaryIO
MODALITIES = ("audio", "visual")

# Seek instead of decoding forward when the next wanted frame is this far ahead (seconds):
# below it, decoding through is cheaper than a seek back to the previous keyframe.
SEEK_GAP_S = 2.0


class MediaError(ValueError):
    """A media file that cannot become model input. `cause` is one of CAUSES."""

    CAUSES = ("missing", "empty", "not_media", "undecodable", "no_audio", "no_video",
              "too_long", "too_large")

    def __init__(self, name: str, cause: str, detail: str):
        assert cause in self.CAUSES, cause
        self.name, self.cause, self.detail = name, cause, detail
        super().__init__(f"{name}: {detail}")


@dataclass
class StreamInfo:
    """What a stream's metadata says, before any decoding."""

    index: int
    kind: str                      # "audio" | "video"
    codec: str
    duration_s: float | None
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    sample_rate: int | None = None
    channels: int | None = None


@dataclass
class MediaInfo:
    """Container-level metadata of one file."""

    name: str
    format: str
    duration_s: float | None
    streams: list[StreamInfo] = field(default_factory=list)

    def first(self, kind: str) -> StreamInfo | None:
        return next((s for s in self.streams if s.kind == kind), None)


@dataclass
class Clip:
    """Decoded model inputs of one sample; a modality the media lacks is None."""

    spectrogram: np.ndarray | None   # float32 [1, F, T]
    frames: np.ndarray | None        # uint8 [N, H, W, 3]
    info: MediaInfo
    audio_info: MediaInfo | None = None   # set when audio came from a separate file

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m, x in (("audio", self.spectrogram), ("visual", self.frames))
                     if x is not None)


# ---------------------------------------------------------------------------------------
# opening and probing

def _name(src: Source, name: str | None) -> str:
    if name:
        return name
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    return getattr(src, "name", None) or "<upload>"


def _open(src: Source, name: str) -> av.container.InputContainer:
    """Open a container, turning every failure into a MediaError naming the file."""
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if not os.path.isfile(path):
            raise MediaError(name, "missing", "no such file")
        if os.path.getsize(path) == 0:
            raise MediaError(name, "empty", "empty file (0 bytes)")
        target: object = path
    elif isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise MediaError(name, "empty", "empty file (0 bytes)")
        target = io.BytesIO(bytes(src))
    else:
        src.seek(0)
        target = src
    try:
        return av.open(target, mode="r", metadata_errors="ignore")
    except av.FFmpegError as e:
        raise MediaError(name, "not_media", f"not a decodable media file ({e.strerror or e})") from None


def _is_cover_art(stream: av.stream.Stream) -> bool:
    """An embedded picture (mp3 album art) is not a video modality."""
    return bool(stream.disposition & av.stream.Disposition.attached_pic)


def _video_stream(c: av.container.InputContainer):
    return next((s for s in c.streams.video if not _is_cover_art(s)), None)


def _stream_duration(s: av.stream.Stream) -> float | None:
    if s.duration is not None and s.time_base is not None:
        return float(s.duration * s.time_base)
    return None


def _info(c: av.container.InputContainer, name: str) -> MediaInfo:
    streams = []
    v = _video_stream(c)
    for s in c.streams:
        if s.type == "video" and s is v:
            fps = s.average_rate or s.guessed_rate
            streams.append(StreamInfo(s.index, "video", s.codec_context.name, _stream_duration(s),
                                      width=s.codec_context.width, height=s.codec_context.height,
                                      fps=float(fps) if fps else None))
        elif s.type == "audio":
            cc = s.codec_context
            streams.append(StreamInfo(s.index, "audio", cc.name, _stream_duration(s),
                                      sample_rate=cc.sample_rate, channels=cc.channels))
    duration = c.duration / av.time_base if c.duration is not None else None
    if duration is None:
        known = [s.duration_s for s in streams if s.duration_s is not None]
        duration = max(known) if known else None
    return MediaInfo(name, c.format.name, duration, streams)


def _check_limits(info: MediaInfo, cfg: PreprocessConfig) -> None:
    """Refuse over-long or over-large media from metadata alone, before decoding anything."""
    if info.duration_s is not None and info.duration_s > cfg.max_duration_s:
        raise MediaError(info.name, "too_long",
                         f"duration {info.duration_s:.1f} s exceeds the maximum {cfg.max_duration_s:g} s")
    v = info.first("video")
    if v is not None and v.width and v.height and v.width * v.height > cfg.max_pixels:
        raise MediaError(info.name, "too_large",
                         f"frame size {v.width}x{v.height} exceeds the maximum of {cfg.max_pixels} pixels")


def probe(src: Source, cfg: PreprocessConfig | None = None, *, name: str | None = None) -> MediaInfo:
    """Read a file's stream metadata and check it against cfg's limits; decodes nothing."""
    cfg = cfg or PreprocessConfig()
    name = _name(src, name)
    with _open(src, name) as c:
        info = _info(c, name)
    if not info.streams:
        raise MediaError(name, "not_media", "no audio or video stream")
    _check_limits(info, cfg)
    return info


# ---------------------------------------------------------------------------------------
# audio

def fit_waveform(wave: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """Tile a short waveform / crop a long one to cfg.num_samples and clip to [-1, 1].

    As the reference code does (np.tile(samples, k)[:n]; values clipped to [-1, 1]); we tile
    as often as needed, so clips shorter than duration / k are filled too.
    """
    n = cfg.num_samples
    reps = max(1, math.ceil(n / len(wave)))
    return np.clip(np.tile(wave, reps)[:n], -1.0, 1.0)


def log_spectrogram(wave: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """float32 [1, F, T] = log(scipy.signal.spectrogram(wave, sr, nperseg, noverlap)[2] + eps)."""
    _, _, spec = scipy.signal.spectrogram(np.asarray(wave, dtype=np.float64), cfg.sample_rate,
                                          nperseg=cfg.nperseg, noverlap=cfg.noverlap)
    return np.log(spec + cfg.log_eps).astype(np.float32)[None]


def decode_waveform(src: Source, cfg: PreprocessConfig | None = None, *, name: str | None = None,
                    max_samples: int | None = None) -> np.ndarray:
    """Mono float32 waveform at cfg.sample_rate via PyAV's resampler (first max_samples only)."""
    cfg = cfg or PreprocessConfig()
    name = _name(src, name)
    with _open(src, name) as c:
        info = _info(c, name)
        _check_limits(info, cfg)
        if not c.streams.audio:
            raise MediaError(name, "no_audio", "no audio stream")
        return _decode_audio(c, c.streams.audio[0], cfg, name, max_samples)


def _decode_audio(c, stream, cfg: PreprocessConfig, name: str, max_samples: int | None) -> np.ndarray:
    resampler = av.AudioResampler(format="flt", layout="mono", rate=cfg.sample_rate)
    chunks: list[np.ndarray] = []
    have = 0
    try:
        for frame in c.decode(stream):
            frame.pts = None  # let the resampler count samples; broken pts must not drop audio
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
                have += chunks[-1].size
            if max_samples is not None and have >= max_samples:
                break
        else:
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
    except av.FFmpegError as e:
        if not chunks:
            raise MediaError(name, "undecodable", f"audio stream cannot be decoded ({e.strerror or e})") from None
        # a damaged tail: keep what decoded (players do the same)
    wave = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    if wave.size == 0:
        raise MediaError(name, "empty", "audio stream holds no samples")
    return wave[:max_samples] if max_samples is not None else wave


# ---------------------------------------------------------------------------------------
# video

def frame_times(duration_s: float, n: int) -> list[float]:
    """Centres of n equal segments of the clip: the deterministic inference sampling."""
    return [duration_s * (k + 0.5) / n for k in range(n)]


def _pick_frames(c, stream, targets: list[float]) -> list[av.VideoFrame]:
    """For each target time, the frame on screen at that time; decodes only what it needs.

    Decodes forward; when the next target is more than SEEK_GAP_S ahead it seeks (to the
    keyframe before the target); it stops right after the last target's frame.
    """
    picked: list[av.VideoFrame] = []
    prev = None
    tried_seek = set()
    while len(picked) < len(targets):
        restart = False
        for frame in c.decode(stream):
            t = frame.time if frame.time is not None else 0.0
            while len(picked) < len(targets) and t > targets[len(picked)] + 1e-6:
                picked.append(prev if prev is not None else frame)
            if len(picked) == len(targets):
                break
            nxt = targets[len(picked)]
            if nxt - t > SEEK_GAP_S and nxt not in tried_seek:
                tried_seek.add(nxt)   # at most one seek per target: no loop on sparse keyframes
                try:
                    c.seek(int(nxt / stream.time_base), stream=stream, backward=True)
                except av.FFmpegError:
                    pass             # not seekable (e.g. a pipe-like stream): decode through
                else:
                    prev, restart = None, True
                    break
            prev = frame
        if not restart:
            break
    if prev is None and not picked:
        return []
    while len(picked) < len(targets):   # clip shorter than its metadata said: repeat the last
        picked.append(prev if prev is not None else picked[-1])
    return picked


def _decode_frames(c, stream, cfg: PreprocessConfig, info: MediaInfo, name: str) -> np.ndarray:
    duration = info.first("video").duration_s or info.duration_s
    if not duration or duration <= 0:
        duration = 0.0  # unknown: every target at t=0 -> the first frame N times
    try:
        frames = _pick_frames(c, stream, frame_times(duration, cfg.num_frames))
        if not frames:
            raise MediaError(name, "undecodable", "video stream holds no decodable frame")
        out = np.stack([f.to_ndarray(format="rgb24", width=cfg.frame_width, height=cfg.frame_height,
                                     interpolation="BILINEAR") for f in frames])
    except av.FFmpegError as e:
        raise MediaError(name, "undecodable", f"video stream cannot be decoded ({e.strerror or e})") from None
    return out


# ---------------------------------------------------------------------------------------
# the contract

def decode_clip(src: Source, cfg: PreprocessConfig | None = None, *, audio: Source | None = None,
                modalities: Iterable[str] = MODALITIES, allow_missing: bool = False,
                name: str | None = None, audio_name: str | None = None) -> Clip:
    """Decode one sample into model inputs.

    src: a media file (path, bytes or binary file); `audio`: an optional separate audio file,
    used instead of src's audio track. A requested modality the media lacks raises MediaError
    ("no_audio" / "no_video") unless allow_missing, in which case it is None in the Clip (at
    least one requested modality must exist). Deterministic: same file, same arrays.
    """
    cfg = cfg or PreprocessConfig()
    wanted = tuple(modalities)
    if not wanted or set(wanted) - set(MODALITIES):
        raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got {wanted}")
    name = _name(src, name)
    spec = frames = None
    audio_info = None

    with _open(src, name) as c:
        info = _info(c, name)
        if not info.streams:
            raise MediaError(name, "not_media", "no audio or video stream")
        _check_limits(info, cfg)
        if "visual" in wanted:
            vs = _video_stream(c)
            if vs is not None:
                vs.thread_type = "AUTO"
                frames = _decode_frames(c, vs, cfg, info, name)
            elif not allow_missing:
                raise MediaError(name, "no_video", "no video stream")

    if "audio" in wanted:
        a_src, a_name = (audio, _name(audio, audio_name)) if audio is not None else (src, name)
        with _open(a_src, a_name) as c:
            a_info = info if audio is None else _info(c, a_name)
            if audio is not None:
                _check_limits(a_info, cfg)
                audio_info = a_info
            if c.streams.audio:
                wave = _decode_audio(c, c.streams.audio[0], cfg, a_name, cfg.num_samples)
                spec = log_spectrogram(fit_waveform(wave, cfg), cfg)
            elif not allow_missing:
                raise MediaError(a_name, "no_audio", "no audio stream")

    if spec is None and frames is None:
        missing = " or ".join("an audio stream" if m == "audio" else "a video stream" for m in wanted)
        raise MediaError(name, "no_audio" if "audio" in wanted else "no_video", f"has no {missing}")
    return Clip(spec, frames, info, audio_info)


__all__ = ["MediaError", "MediaInfo", "StreamInfo", "Clip", "decode_clip", "decode_waveform",
           "probe", "fit_waveform", "log_spectrogram", "frame_times", "MODALITIES"]
