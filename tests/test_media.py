"""Media decoding contract: every container/codec, the spectrogram formula, frame sampling, errors."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import scipy.signal
import soundfile as sf

from dimml.config import PreprocessConfig
from dimml.media import MediaError, decode_clip, decode_waveform, fit_waveform, frame_times, probe
from training.synth import write_clip

SR = 16000
CFG = PreprocessConfig()


def gray_frames(n: int, h: int = 96, w: int = 128, step: int = 4) -> np.ndarray:
    """Frame i is a flat gray of level step*i (so a decoded frame tells its index)."""
    levels = (np.arange(n) * step) % 256
    return np.broadcast_to(levels[:, None, None, None], (n, h, w, 3)).astype(np.uint8).copy()


def tone(seconds: float, sr: int = SR, f: float = 440.0, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    rng = np.random.default_rng(seed)
    return (0.4 * np.sin(2 * np.pi * f * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def scipy_reference(x: np.ndarray, cfg: PreprocessConfig = CFG) -> np.ndarray:
    """The formula the issue fixes, on the same waveform."""
    return np.log(scipy.signal.spectrogram(x, cfg.sample_rate, nperseg=512, noverlap=353)[2] + 1e-7)


# (extension, video codec, audio codec): the containers the product must read
AV_FORMATS = [
    ("mp4", "libx264", "aac"),
    ("flv", "flv", "libmp3lame"),          # CREMA-D's format
    ("webm", "libvpx-vp9", "libopus"),
    ("avi", "mjpeg", "pcm_s16le"),
    ("mkv", "libx264", "aac"),
    ("mov", "libx264", "aac"),
]


@pytest.mark.parametrize("ext,vcodec,acodec", AV_FORMATS)
def test_decodes_every_av_format(tmp_path, ext, vcodec, acodec):
    path = write_clip(tmp_path / f"clip.{ext}", gray_frames(30), fps=10, audio=tone(3.0),
                      sample_rate=SR, video_codec=vcodec, audio_codec=acodec)
    clip = decode_clip(path, CFG)
    assert clip.modalities == ("audio", "visual")
    assert clip.spectrogram.shape == (1, 257, 299) and clip.spectrogram.dtype == np.float32
    assert clip.frames.shape == (3, 224, 224, 3) and clip.frames.dtype == np.uint8
    assert np.isfinite(clip.spectrogram).all()
    # frames at the centres of thirds of a 3 s, 10 fps clip: indices 5, 15, 25 -> levels 20, 60, 100
    levels = clip.frames.reshape(3, -1).mean(axis=1)
    np.testing.assert_allclose(levels, [20, 60, 100], atol=6)
    # the 440 Hz tone survives every codec: the loudest bin is the one nearest 440 Hz
    peak_hz = clip.spectrogram[0].mean(axis=1).argmax() * SR / 512
    assert abs(peak_hz - 440) < 2 * SR / 512


@pytest.mark.parametrize("ext,acodec", [("wav", "pcm_s16le"), ("flac", "flac"), ("mp3", "libmp3lame")])
def test_decodes_audio_only_files(tmp_path, ext, acodec):
    path = write_clip(tmp_path / f"a.{ext}", None, audio=tone(2.0), sample_rate=SR, audio_codec=acodec)
    clip = decode_clip(path, CFG, modalities=("audio",))
    assert clip.spectrogram.shape == (1, 257, 299) and clip.frames is None
    with pytest.raises(MediaError) as e:
        decode_clip(path, CFG)
    assert e.value.cause == "no_video" and str(path) in str(e.value)
    fallback = decode_clip(path, CFG, allow_missing=True)
    assert fallback.modalities == ("audio",)


def test_spectrogram_equals_scipy_formula(tmp_path):
    x = tone(3.0)
    sf.write(tmp_path / "x.wav", x, SR, subtype="FLOAT")
    clip = decode_clip(tmp_path / "x.wav", CFG, modalities=("audio",))
    ref = scipy_reference(x.astype(np.float64))
    assert ref.shape == (257, 299)
    np.testing.assert_allclose(clip.spectrogram[0], ref, atol=1e-4)


def test_ten_second_spectrogram_shape(tmp_path):
    sf.write(tmp_path / "x.wav", tone(10.0), SR, subtype="FLOAT")
    cfg = CFG.replace(audio_seconds=10.0)
    assert decode_clip(tmp_path / "x.wav", cfg, modalities=("audio",)).spectrogram.shape == (1, 257, 1004)


def test_short_audio_is_tiled_and_long_audio_cropped(tmp_path):
    short = tone(1.25)
    sf.write(tmp_path / "s.wav", short, SR, subtype="FLOAT")
    clip = decode_clip(tmp_path / "s.wav", CFG, modalities=("audio",))
    tiled = np.tile(short.astype(np.float64), 3)[: CFG.num_samples]
    np.testing.assert_allclose(clip.spectrogram[0], scipy_reference(tiled), atol=1e-4)
    long = tone(5.0, seed=1)
    sf.write(tmp_path / "l.wav", long, SR, subtype="FLOAT")
    clip = decode_clip(tmp_path / "l.wav", CFG, modalities=("audio",))
    np.testing.assert_allclose(clip.spectrogram[0], scipy_reference(long[: CFG.num_samples].astype(np.float64)), atol=1e-4)
    # out-of-range samples are clipped to [-1, 1] as the reference code does
    assert fit_waveform(np.array([2.0, -3.0], np.float32), CFG.replace(audio_seconds=0.001)).tolist() == [1.0, -1.0] * 8


def test_resampling_and_stereo_mixdown(tmp_path):
    left, right = tone(3.0, sr=44100, f=300.0), tone(3.0, sr=44100, f=1200.0, seed=2)
    path = write_clip(tmp_path / "st.wav", None, audio=np.stack([left, right]), sample_rate=44100,
                      audio_codec="pcm_s16le")
    wave = decode_waveform(path, CFG)
    assert wave.dtype == np.float32 and abs(len(wave) - 3 * SR) <= 64
    spec = decode_clip(path, CFG, modalities=("audio",)).spectrogram[0].mean(axis=1)
    bins = lambda hz: int(round(hz * 512 / SR))
    noise_floor = np.median(spec)
    assert spec[bins(300)] > noise_floor + 5 and spec[bins(1200)] > noise_floor + 5  # both channels mixed in


def test_frame_count_and_size_follow_config(tmp_path):
    path = write_clip(tmp_path / "c.mp4", gray_frames(20, h=120, w=160), fps=10, audio=tone(2.0))
    cfg = CFG.replace(num_frames=5, frame_height=96, frame_width=128)
    clip = decode_clip(path, cfg)
    assert clip.frames.shape == (5, 96, 128, 3)
    # centres of fifths of a 2 s clip at 10 fps: frames 2, 6, 10, 14, 18 -> levels 8..72
    np.testing.assert_allclose(clip.frames.reshape(5, -1).mean(1), [8, 24, 40, 56, 72], atol=6)
    assert frame_times(2.0, 5) == pytest.approx([0.2, 0.6, 1.0, 1.4, 1.8])


def test_long_clip_seeks_to_the_right_frames(tmp_path):
    # 30 s at 2 fps with a keyframe every 2 frames: targets 5, 15, 25 s are reached by seeking
    frames = gray_frames(60, h=64, w=64)
    path = write_clip(tmp_path / "long.mp4", frames, fps=2, audio=tone(30.0))
    clip = decode_clip(path, CFG.replace(frame_height=64, frame_width=64))
    np.testing.assert_allclose(clip.frames.reshape(3, -1).mean(1), [40, 120, 200], atol=6)


def test_decoding_is_deterministic_and_reads_bytes(tmp_path):
    path = write_clip(tmp_path / "d.mp4", gray_frames(30), fps=10, audio=tone(3.0))
    a, b = decode_clip(path, CFG), decode_clip(path.read_bytes(), CFG, name="upload.mp4")
    assert np.array_equal(a.frames, b.frames) and np.array_equal(a.spectrogram, b.spectrogram)


def test_separate_audio_file_replaces_the_track(tmp_path):
    video = write_clip(tmp_path / "v.mp4", gray_frames(30), fps=10, audio=tone(3.0, f=440.0))
    x = tone(3.0, f=2000.0, seed=3)
    sf.write(tmp_path / "a.wav", x, SR, subtype="FLOAT")
    clip = decode_clip(video, CFG, audio=tmp_path / "a.wav")
    np.testing.assert_allclose(clip.spectrogram[0], scipy_reference(x.astype(np.float64)), atol=1e-4)
    assert clip.audio_info is not None and clip.audio_info.first("audio").codec.startswith("pcm")


def test_video_without_audio_is_reported_as_such(tmp_path):
    path = write_clip(tmp_path / "mute.mp4", gray_frames(20), fps=10)
    with pytest.raises(MediaError) as e:
        decode_clip(path, CFG)
    assert e.value.cause == "no_audio" and "mute.mp4" in str(e.value)
    clip = decode_clip(path, CFG, allow_missing=True)
    assert clip.modalities == ("visual",) and clip.spectrogram is None


def test_error_causes(tmp_path):
    good = write_clip(tmp_path / "ok.mp4", gray_frames(30), fps=10, audio=tone(3.0))
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "notes.mp4").write_text("this is not a video\n" * 50)
    data = bytearray(good.read_bytes())
    broken = tmp_path / "broken.mp4"          # container intact, every coded byte zeroed
    mdat = data.find(b"mdat")
    size = int.from_bytes(data[mdat - 4: mdat], "big")
    data[mdat + 4: mdat - 4 + size] = bytes(size - 8)
    broken.write_bytes(bytes(data))
    cases = {
        tmp_path / "absent.mp4": ("missing", CFG),
        tmp_path / "empty.mp4": ("empty", CFG),
        tmp_path / "notes.mp4": ("not_media", CFG),
        broken: ("undecodable", CFG),
        good: ("too_long", CFG.replace(max_duration_s=2.0)),
    }
    for path, (cause, cfg) in cases.items():
        with pytest.raises(MediaError) as e:
            decode_clip(path, cfg)
        assert e.value.cause == cause, (path, e.value)
        assert path.name in str(e.value)
        assert isinstance(e.value, ValueError)
    with pytest.raises(MediaError) as e:
        probe(good, CFG.replace(max_pixels=100 * 100))
    assert e.value.cause == "too_large" and "128x96" in str(e.value)


def test_default_limits_accept_1080p60_portrait(tmp_path):
    frames = np.zeros((6, 1920, 1080, 3), np.uint8)
    frames[:, :960] = 200
    path = write_clip(tmp_path / "portrait.mp4", frames, fps=60, audio=tone(0.1))
    info = probe(path)
    assert (info.first("video").width, info.first("video").height) == (1080, 1920)
    clip = decode_clip(path, CFG)
    assert clip.frames.shape == (3, 224, 224, 3)
    assert clip.frames[:, :100].mean() > 150 and clip.frames[:, -100:].mean() < 50   # not rotated


def run_inspect(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training", "inspect", *args],
                          capture_output=True, text=True, timeout=120)


def test_inspect_cli(tmp_path):
    path = write_clip(tmp_path / "c.mp4", gray_frames(30), fps=10, audio=tone(3.0))
    out = run_inspect(str(path), "--json")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["spectrogram"] == [1, 257, 299] and d["frames"] == [3, 224, 224, 3]
    assert {s["kind"] for s in d["streams"]} == {"audio", "video"}
    text = run_inspect(str(path))
    assert text.returncode == 0 and "h264" in text.stdout and "[1, 257, 299]" in text.stdout
    (tmp_path / "bad.mp4").write_text("nope")
    bad = run_inspect(str(tmp_path / "bad.mp4"))
    assert bad.returncode == 1
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad.mp4" in lines[0] and "Traceback" not in bad.stderr
    bad_json = run_inspect(str(tmp_path / "bad.mp4"), "--json")
    assert bad_json.returncode == 1 and json.loads(bad_json.stdout)["cause"] == "not_media"
