"""Writing a media file (RGB frames and/or audio) with PyAV: the synthetic corpus's writer, reused by tests."""
from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

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
               container_format: str | None = None, codec_tag: str | None = None) -> Path:
    """Encode RGB frames uint8 [T, H, W, 3] and/or audio float32 [n] or [ch, n] into one file.

    Codecs default from the extension (DEFAULT_CODECS); codec_tag sets the video's FourCC (e.g.
    XVID for UCF101's mpeg4 .avi files); frames=None writes audio only,
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
                if codec_tag:
                    v.codec_tag = codec_tag
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


__all__ = ["write_clip", "DEFAULT_CODECS"]
