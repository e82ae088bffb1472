"""Media decoding contract: every container/codec, the spectrogram formula, frame sampling, optical
flow, still images, pre-extracted flow, missing modalities, errors; bit-identical to the old decoder."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.signal
import soundfile as sf

from dimml.media import (
    MediaError,
    consecutive_frames,
    decode_clip,
    decode_sample,
    decode_waveform,
    fit_waveform,
    frame_times,
    open_media,
    probe,
    video_stream,
)
from dimml.modalities import PreprocessConfig, preprocess_for
from dimml.modalities.audio import AudioParams
from dimml.modalities.flow import quantise
from training.synth import write_clip

from conftest import SETTINGS, moving_texture, sine, write_image, write_sample

SR = 16000
CFG = PreprocessConfig()                      # audio,visual with the papers' parameters
AUDIO = preprocess_for("resnet18", "audio")   # audio only
A = AudioParams()


def gray_frames(n: int, h: int = 96, w: int = 128, step: int = 4) -> np.ndarray:
    """Frame i is a flat gray of level step*i (so a decoded frame tells its index)."""
    levels = (np.arange(n) * step) % 256
    return np.broadcast_to(levels[:, None, None, None], (n, h, w, 3)).astype(np.uint8).copy()


def tone(seconds: float, sr: int = SR, f: float = 440.0, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    rng = np.random.default_rng(seed)
    return (0.4 * np.sin(2 * np.pi * f * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def scipy_reference(x: np.ndarray, p: AudioParams = A) -> np.ndarray:
    """The formula the issue fixes, on the same waveform."""
    return np.log(scipy.signal.spectrogram(x, p.sample_rate, nperseg=512, noverlap=353)[2] + 1e-7)


def spec_of(clip) -> np.ndarray:
    return clip.arrays["audio"]


def frames_of(clip) -> np.ndarray:
    return clip.arrays["visual"]


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
    assert clip.modalities == ("audio", "visual") and set(clip.infos) == {"video"}
    assert spec_of(clip).shape == (1, 257, 299) and spec_of(clip).dtype == np.float32
    assert frames_of(clip).shape == (3, 224, 224, 3) and frames_of(clip).dtype == np.uint8
    assert np.isfinite(spec_of(clip)).all()
    # frames at the centres of thirds of a 3 s, 10 fps clip: indices 5, 15, 25 -> levels 20, 60, 100
    levels = frames_of(clip).reshape(3, -1).mean(axis=1)
    np.testing.assert_allclose(levels, [20, 60, 100], atol=6)
    # the 440 Hz tone survives every codec: the loudest bin is the one nearest 440 Hz
    peak_hz = spec_of(clip)[0].mean(axis=1).argmax() * SR / 512
    assert abs(peak_hz - 440) < 2 * SR / 512


@pytest.mark.parametrize("ext,acodec", [("wav", "pcm_s16le"), ("flac", "flac"), ("mp3", "libmp3lame")])
def test_decodes_audio_only_files(tmp_path, ext, acodec):
    path = write_clip(tmp_path / f"a.{ext}", None, audio=tone(2.0), sample_rate=SR, audio_codec=acodec)
    clip = decode_clip(path, AUDIO)
    assert spec_of(clip).shape == (1, 257, 299) and clip.modalities == ("audio",)
    only = decode_sample({"video": path}, CFG, only=["audio"])
    assert only.modalities == ("audio",) and np.array_equal(spec_of(only), spec_of(clip))
    with pytest.raises(MediaError) as e:
        decode_clip(path, CFG)
    assert e.value.cause == "no_video" and str(path) in str(e.value)
    fallback = decode_clip(path, CFG, allow_missing=True)
    assert fallback.modalities == ("audio",) and "visual" not in fallback.arrays


def test_spectrogram_equals_scipy_formula(tmp_path):
    x = tone(3.0)
    sf.write(tmp_path / "x.wav", x, SR, subtype="FLOAT")
    clip = decode_clip(tmp_path / "x.wav", AUDIO)
    ref = scipy_reference(x.astype(np.float64))
    assert ref.shape == (257, 299)
    np.testing.assert_allclose(spec_of(clip)[0], ref, atol=1e-4)


def test_ten_second_spectrogram_shape(tmp_path):
    sf.write(tmp_path / "x.wav", tone(10.0), SR, subtype="FLOAT")
    cfg = AUDIO.override({"audio.seconds": 10.0})
    assert spec_of(decode_clip(tmp_path / "x.wav", cfg)).shape == (1, 257, 1004) == cfg.spec("audio").shape


def test_short_audio_is_tiled_and_long_audio_cropped(tmp_path):
    short = tone(1.25)
    sf.write(tmp_path / "s.wav", short, SR, subtype="FLOAT")
    clip = decode_clip(tmp_path / "s.wav", AUDIO)
    tiled = np.tile(short.astype(np.float64), 3)[: A.num_samples]
    np.testing.assert_allclose(spec_of(clip)[0], scipy_reference(tiled), atol=1e-4)
    long = tone(5.0, seed=1)
    sf.write(tmp_path / "l.wav", long, SR, subtype="FLOAT")
    clip = decode_clip(tmp_path / "l.wav", AUDIO)
    np.testing.assert_allclose(spec_of(clip)[0], scipy_reference(long[: A.num_samples].astype(np.float64)), atol=1e-4)
    # out-of-range samples are clipped to [-1, 1] as the reference code does
    assert fit_waveform(np.array([2.0, -3.0], np.float32), AudioParams(seconds=0.001)).tolist() == [1.0, -1.0] * 8


def test_resampling_and_stereo_mixdown(tmp_path):
    left, right = tone(3.0, sr=44100, f=300.0), tone(3.0, sr=44100, f=1200.0, seed=2)
    path = write_clip(tmp_path / "st.wav", None, audio=np.stack([left, right]), sample_rate=44100,
                      audio_codec="pcm_s16le")
    wave = decode_waveform(path, A)
    assert wave.dtype == np.float32 and abs(len(wave) - 3 * SR) <= 64
    spec = spec_of(decode_clip(path, AUDIO))[0].mean(axis=1)
    bins = lambda hz: int(round(hz * 512 / SR))
    noise_floor = np.median(spec)
    assert spec[bins(300)] > noise_floor + 5 and spec[bins(1200)] > noise_floor + 5  # both channels mixed in


def test_frame_count_and_size_follow_config(tmp_path):
    path = write_clip(tmp_path / "c.mp4", gray_frames(20, h=120, w=160), fps=10, audio=tone(2.0))
    cfg = CFG.override({"visual.num_frames": 5, "visual.height": 96, "visual.width": 128})
    clip = decode_clip(path, cfg)
    assert frames_of(clip).shape == (5, 96, 128, 3)
    # centres of fifths of a 2 s clip at 10 fps: frames 2, 6, 10, 14, 18 -> levels 8..72
    np.testing.assert_allclose(frames_of(clip).reshape(5, -1).mean(1), [8, 24, 40, 56, 72], atol=6)
    assert frame_times(2.0, 5) == pytest.approx([0.2, 0.6, 1.0, 1.4, 1.8])


def test_long_clip_seeks_to_the_right_frames(tmp_path):
    # 30 s at 2 fps with a keyframe every 2 frames: targets 5, 15, 25 s are reached by seeking
    frames = gray_frames(60, h=64, w=64)
    path = write_clip(tmp_path / "long.mp4", frames, fps=2, audio=tone(30.0))
    clip = decode_clip(path, CFG.override({"visual.height": 64, "visual.width": 64}))
    np.testing.assert_allclose(frames_of(clip).reshape(3, -1).mean(1), [40, 120, 200], atol=6)


def test_decoding_is_deterministic_and_reads_bytes(tmp_path):
    path = write_clip(tmp_path / "d.mp4", gray_frames(30), fps=10, audio=tone(3.0))
    a, b = decode_clip(path, CFG), decode_clip(path.read_bytes(), CFG, name="upload.mp4")
    assert np.array_equal(frames_of(a), frames_of(b)) and np.array_equal(spec_of(a), spec_of(b))
    assert b.name == "upload.mp4" and a.name == str(path)


def test_separate_audio_file_replaces_the_track(tmp_path):
    video = write_clip(tmp_path / "v.mp4", gray_frames(30), fps=10, audio=tone(3.0, f=440.0))
    x = tone(3.0, f=2000.0, seed=3)
    sf.write(tmp_path / "a.wav", x, SR, subtype="FLOAT")
    clip = decode_sample({"video": video, "audio": tmp_path / "a.wav"}, CFG)
    np.testing.assert_allclose(spec_of(clip)[0], scipy_reference(x.astype(np.float64)), atol=1e-4)
    assert set(clip.infos) == {"video", "audio"} and clip.infos["audio"].first("audio").codec.startswith("pcm")
    assert np.array_equal(frames_of(clip), frames_of(decode_clip(video, CFG)))


def test_video_without_audio_is_reported_as_such(tmp_path):
    path = write_clip(tmp_path / "mute.mp4", gray_frames(20), fps=10)
    with pytest.raises(MediaError) as e:
        decode_clip(path, CFG)
    assert e.value.cause == "no_audio" and "mute.mp4" in str(e.value)
    clip = decode_clip(path, CFG, allow_missing=True)
    assert clip.modalities == ("visual",) and "audio" not in clip.arrays


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
        good: ("too_long", CFG.override({"max_duration_s": 2.0})),
    }
    for path, (cause, cfg) in cases.items():
        with pytest.raises(MediaError) as e:
            decode_clip(path, cfg)
        assert e.value.cause == cause, (path, e.value)
        assert path.name in str(e.value)
        assert isinstance(e.value, ValueError)
    with pytest.raises(MediaError) as e:
        probe(good, CFG.override({"max_pixels": 100 * 100}))
    assert e.value.cause == "too_large" and "128x96" in str(e.value)


def test_default_limits_accept_1080p60_portrait(tmp_path):
    frames = np.zeros((6, 1920, 1080, 3), np.uint8)
    frames[:, :960] = 200
    path = write_clip(tmp_path / "portrait.mp4", frames, fps=60, audio=tone(0.1))
    info = probe(path)
    assert (info.first("video").width, info.first("video").height) == (1080, 1920)
    frames = frames_of(decode_clip(path, CFG))
    assert frames.shape == (3, 224, 224, 3)
    assert frames[:, :100].mean() > 150 and frames[:, -100:].mean() < 50   # not rotated


def run_inspect(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training", "inspect", *args],
                          capture_output=True, text=True, timeout=120)


def test_inspect_cli(tmp_path):
    path = write_clip(tmp_path / "c.mp4", gray_frames(30), fps=10, audio=tone(3.0))
    out = run_inspect(str(path), "--json")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["arrays"]["audio"]["shape"] == [1, 257, 299] and d["arrays"]["visual"]["shape"] == [3, 224, 224, 3]
    assert {s["kind"] for s in d["sources"]["video"]["streams"]} == {"audio", "video"}
    text = run_inspect(str(path))
    assert text.returncode == 0 and "h264" in text.stdout and "[1, 257, 299]" in text.stdout
    # other settings: flow from the video, images as sources of their own
    flow = json.loads(run_inspect(str(path), "--modalities", "visual,flow", "--preset", "tiny", "--json").stdout)
    assert flow["arrays"]["flow"] == {"shape": [2, 64, 64, 2], "dtype": "uint8"}
    img = write_image(tmp_path / "f.png", np.full((40, 40, 3), 50, np.uint8))
    views = run_inspect("--modalities", "front:image,rear:image", "--source", f"front={img}", "--json")
    d = json.loads(views.stdout)
    assert d["modalities"] == ["front"] and d["arrays"]["rear"] is None and d["arrays"]["front"]["shape"] == [1, 224, 224, 3]
    (tmp_path / "bad.mp4").write_text("nope")
    bad = run_inspect(str(tmp_path / "bad.mp4"))
    assert bad.returncode == 1
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad.mp4" in lines[0] and "Traceback" not in bad.stderr
    bad_json = run_inspect(str(tmp_path / "bad.mp4"), "--json")
    assert bad_json.returncode == 1 and json.loads(bad_json.stdout)["cause"] == "not_media"


# ---------------------------------------------------------------------------------------
# the default audio,visual decode is bit-identical to the decoder before modality specs

@pytest.mark.parametrize("fmt", ["mp4", "flv", "flv+wav", "bytes"])
def test_default_decode_is_bit_identical_to_the_old_decoder(tmp_path, fmt):
    import legacy_decode
    rng = np.random.default_rng(5)
    frames = np.stack([np.roll(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8), 4 * i, axis=1)
                       for i in range(24)])
    ext = "flv" if fmt.startswith("flv") else "mp4"
    with_track = fmt != "flv+wav"
    video = write_clip(tmp_path / f"c.{ext}", frames, fps=8, audio=tone(3.0, sr=22050) if with_track else None,
                       sample_rate=22050)
    audio = None
    if fmt == "flv+wav":          # CREMA-D: an flv without sound plus a separate wav
        audio = tmp_path / "c.wav"
        sf.write(audio, tone(2.5, f=700.0, seed=4), SR)
    for new_cfg, old_cfg in [(CFG, legacy_decode.LegacyConfig()),
                             (preprocess_for("tiny"), legacy_decode.LegacyConfig(audio_seconds=2.0, num_frames=2,
                                                                                 frame_height=64, frame_width=64))]:
        src = video.read_bytes() if fmt == "bytes" else video
        old = legacy_decode.decode_clip(src, old_cfg, audio=audio)
        new = decode_sample({"video": src, **({"audio": audio} if audio else {})}, new_cfg)
        assert new.modalities == old.modalities == ("audio", "visual")
        for name, ref in (("audio", old.spectrogram), ("visual", old.frames)):
            assert new.arrays[name].dtype == ref.dtype and np.array_equal(new.arrays[name], ref), name
        if audio is None:
            lone = decode_clip(src, new_cfg)
            assert all(np.array_equal(lone.arrays[k], new.arrays[k]) for k in new.arrays)


# ---------------------------------------------------------------------------------------
# the four settings

TINY_SETTINGS = {s: preprocess_for("tiny", s) for s in SETTINGS}


@pytest.mark.parametrize("setting", SETTINGS)
def test_decode_shapes_and_dtypes_per_setting(tmp_path, setting):
    cfg = TINY_SETTINGS[setting]
    files = write_sample(tmp_path, setting, seconds=2.0)
    clip = decode_sample(files, cfg)
    assert clip.modalities == cfg.names
    for spec in cfg.modalities:
        x = clip.arrays[spec.name]
        assert x.shape == spec.shape and x.dtype == spec.dtype, spec.name
        assert x.std() > 0, spec.name     # real content, not a blank
    assert set(clip.infos) == set(cfg.fields)
    again = decode_sample({k: open(v, "rb").read() for k, v in files.items()}, cfg)   # uploads: bytes
    assert all(np.array_equal(again.arrays[n], clip.arrays[n]) for n in cfg.names)


def partial_sample(tmp_path: Path, setting: str) -> tuple[dict, tuple[str, ...]]:
    """A sample of the setting lacking one modality, and the modalities it still has."""
    files = write_sample(tmp_path, setting)
    mute = str(write_clip(tmp_path / "mute.mp4", moving_texture(10), fps=10))     # no audio track
    if setting == "audio,visual":
        return {"video": mute}, ("visual",)
    if setting == "visual,flow":             # no video, only pre-extracted flow
        return {"flow": write_extracted(tmp_path / "flow", "x", 4, u=120, v=130)}, ("flow",)
    if setting == "front:image,rear:image":
        return {"front": files["front"]}, ("front",)
    return {"video": mute}, ("visual", "flow")


@pytest.mark.parametrize("setting", SETTINGS)
def test_missing_modality_per_setting(tmp_path, setting):
    cfg = TINY_SETTINGS[setting]
    files, present = partial_sample(tmp_path, setting)
    (gone,) = set(cfg.names) - set(present)
    with pytest.raises(MediaError) as e:
        decode_sample(files, cfg)
    assert e.value.cause in ("missing", "no_audio"), e.value
    clip = decode_sample(files, cfg, allow_missing=True)
    assert clip.modalities == present and gone not in clip.arrays
    assert list(clip.missing) == [gone] and clip.missing[gone].cause == e.value.cause
    for name in present:
        assert clip.arrays[name].shape == cfg.spec(name).shape


def test_missing_modality_rules(tmp_path):
    cfg = TINY_SETTINGS["front:image,rear:image"]
    files = write_sample(tmp_path, "front:image,rear:image")
    with pytest.raises(MediaError) as e:
        decode_sample({"front": files["front"]}, cfg)
    assert e.value.cause == "missing" and "rear" in str(e.value)
    # a named file that does not exist is an error, never a missing modality
    with pytest.raises(MediaError) as e:
        decode_sample({**files, "rear": tmp_path / "absent.png"}, cfg, allow_missing=True)
    assert e.value.cause == "missing" and "absent.png" in str(e.value)
    with pytest.raises(MediaError):
        decode_sample({}, cfg, allow_missing=True)
    assert decode_sample(files, cfg, only=["rear"]).modalities == ("rear",)
    with pytest.raises(ValueError, match="only"):
        decode_sample(files, cfg, only=["side"])
    # display names per field (uploads)
    with pytest.raises(MediaError) as e:
        decode_sample({"front": b"not an image", "rear": files["rear"]}, cfg, names={"front": "front.png"})
    assert e.value.cause == "not_media" and str(e.value).startswith("front.png:")


# ---------------------------------------------------------------------------------------
# flow

def moving_square(n: int, h: int = 96, w: int = 128, step: int = 3, seed: int = 0) -> np.ndarray:
    """A 40x40 textured square (rows 28..68) moving `step` px right per frame from x = 4, over a
    still, textured background."""
    rng = np.random.default_rng(seed)
    tex = rng.integers(0, 256, (10, 10), dtype=np.uint8).repeat(4, 0).repeat(4, 1)
    background = rng.integers(60, 140, (h // 4, w // 4), dtype=np.uint8).repeat(4, 0).repeat(4, 1)
    frames = np.repeat(background[None, :, :, None], n, axis=0).repeat(3, axis=3)
    for i in range(n):
        frames[i, 28:68, 4 + step * i: 44 + step * i] = tex[..., None]
    return frames


@pytest.mark.parametrize("ext,codec,measure_side", [("mp4", "libx264", 256), ("avi", "mjpeg", 256),
                                                    ("mp4", "libx264", 0)])
def test_flow_of_a_translating_square(tmp_path, ext, codec, measure_side):
    n, k = 18, 4
    path = write_clip(tmp_path / f"sq.{ext}", moving_square(n), fps=10, video_codec=codec)   # 128 x 96
    cfg = preprocess_for("resnet18", "flow", {"flow.num_pairs": k, "flow.height": 96, "flow.width": 128,
                                              "flow.measure_side": measure_side})
    flow = decode_clip(path, cfg).arrays["flow"]
    assert flow.shape == (k, 96, 128, 2) and flow.dtype == np.uint8
    # window centred on the 1.8 s clip: K+1 = 5 frames from the one on screen at 0.9 - 0.25 s: frames 6..10;
    # 3 px right in the video is measured at 340 x 256 (short side 256, even sizes): 3 * 340 / 128 = 7.97 px,
    # quantised to 128 + 7.97 * 255 / 40 = 178.8 (at 128 x 96, measure_side 0: 3 px, 147.1); v to 128
    px = 3 * 340 / 128 if measure_side else 3
    for j in range(k):
        x0 = 4 + 3 * (6 + j)
        inner = flow[j, 34:62, x0 + 6: x0 + 34]
        u, v = inner[..., 0].astype(float).mean(), inner[..., 1].astype(float).mean()
        assert abs(u - (128 + px * 255 / 40)) < 2.5 and abs(v - 128) < 2, (j, u, v)
    # the still background far from the square does not move
    assert abs(flow[:, :, -12:].astype(float).mean() - 128) < 1
    assert np.array_equal(flow, decode_clip(path, cfg).arrays["flow"])     # deterministic


def test_flow_quantisation_matches_ucf101():
    d = np.array([-30.0, -20.0, -10.0, 0.0, 3.0, 10.0, 20.0, 25.0], np.float32)
    expected = [round((min(max(x, -20), 20) + 20) * 255 / 40) for x in d]
    assert quantise(d, 20.0).tolist() == expected == [0, 0, 64, 128, 147, 191, 255, 255]


def test_flow_window_is_centred_and_short_clips_repeat_the_last_frame(tmp_path):
    path = write_clip(tmp_path / "g.mp4", gray_frames(30, h=32, w=32), fps=10)
    with open_media(path, "g") as c:
        levels = [f.to_ndarray(format="rgb24").mean() for f in consecutive_frames(c, video_stream(c), 1.5 - 0.55, 11)]
    np.testing.assert_allclose(levels, 4 * np.arange(9, 20), atol=3)     # frames 9..19 of 0..29
    # far into a long clip the window is reached by seeking: 30 s at 2 fps, a keyframe every 2 frames
    long = write_clip(tmp_path / "long.mp4", gray_frames(60, h=32, w=32), fps=2)
    with open_media(long, "long") as c:
        levels = [f.to_ndarray(format="rgb24").mean() for f in consecutive_frames(c, video_stream(c), 14.0, 4)]
    np.testing.assert_allclose(levels, 4 * np.arange(28, 32), atol=3)    # frames 28..31 (14.0 .. 15.5 s)
    short = write_clip(tmp_path / "s.mp4", moving_square(3), fps=10)
    cfg = preprocess_for("resnet18", "flow", {"flow.num_pairs": 5, "flow.height": 96, "flow.width": 128})
    flow = decode_clip(short, cfg).arrays["flow"]
    assert flow.shape == (5, 96, 128, 2)
    assert flow[:2, 34:62, 16:40, 0].mean() > 140               # the two real pairs move right
    assert (flow[2:] == 128).all()                                 # past the end: exactly no motion
    mute_audio = write_clip(tmp_path / "a.wav", None, audio=tone(1.0))
    with pytest.raises(MediaError) as e:
        decode_clip(mute_audio, cfg)
    assert e.value.cause == "no_video"


def write_extracted(root: Path, video: str, n: int, u: int, v: int) -> Path:
    """Pre-extracted flow in the UCF101 layout: root/u/<video>/frame%06d.jpg and root/v/<video>/..."""
    for axis, level in (("u", u), ("v", v)):
        for i in range(1, n + 1):
            img = np.full((48, 64, 3), level + i, np.uint8)
            write_image(root / axis / video / f"frame{i:06d}.jpg", img)
    return root / "u" / video


def test_pre_extracted_flow_folders(tmp_path):
    u_dir = write_extracted(tmp_path / "flow", "v_Jump_g01_c01", 12, u=100, v=40)
    cfg = preprocess_for("resnet18", "visual,flow", {"flow.num_pairs": 4, "flow.height": 24, "flow.width": 32})
    clip = decode_sample({"flow": u_dir}, cfg, only=["flow"])
    flow = clip.arrays["flow"]
    assert flow.shape == (4, 24, 32, 2) and flow.dtype == np.uint8
    # the 4 middle images of 12: frames 5..8 (levels + i), u and v from their own folders
    np.testing.assert_allclose(flow[..., 0].reshape(4, -1).mean(1), [105, 106, 107, 108], atol=1.5)
    np.testing.assert_allclose(flow[..., 1].reshape(4, -1).mean(1), [45, 46, 47, 48], atol=1.5)
    # with the video for the RGB frames: the folder replaces the video for flow only
    video = write_clip(tmp_path / "v.mp4", moving_texture(10), fps=10)
    both = decode_sample({"video": video, "flow": u_dir}, cfg)
    assert both.modalities == ("visual", "flow") and set(both.infos) == {"video", "flow"}
    assert np.array_equal(both.arrays["flow"], flow)
    # fewer images than K: the last repeats
    short = write_extracted(tmp_path / "flow", "short", 2, u=10, v=10)
    np.testing.assert_allclose(decode_sample({"flow": short}, cfg, only=["flow"]).arrays["flow"][..., 0]
                               .reshape(4, -1).mean(1), [11, 12, 12, 12], atol=1.5)
    with pytest.raises(MediaError) as e:             # a folder that is not the layout
        decode_sample({"flow": tmp_path}, cfg, only=["flow"])
    assert e.value.cause == "not_media"
    import shutil
    shutil.rmtree(tmp_path / "flow" / "v" / "short")
    with pytest.raises(MediaError) as e:
        decode_sample({"flow": short}, cfg, only=["flow"])
    assert e.value.cause == "missing" and "v" in e.value.detail


# ---------------------------------------------------------------------------------------
# still images

@pytest.mark.parametrize("ext", [".png", ".jpg", ".webp"])
def test_image_formats(tmp_path, ext):
    img = np.zeros((60, 80, 3), np.uint8)
    img[:, :40] = (200, 30, 30)       # left half red, right half blue
    img[:, 40:] = (20, 40, 220)
    path = write_image(tmp_path / f"x{ext}", img)
    cfg = preprocess_for("resnet18", "front:image", {"front.height": 30, "front.width": 40})
    clip = decode_sample({"front": path}, cfg)
    x = clip.arrays["front"]
    assert x.shape == (1, 30, 40, 3) and x.dtype == np.uint8
    np.testing.assert_allclose(x[0, :, :16].reshape(-1, 3).mean(0), (200, 30, 30), atol=8)   # RGB order
    np.testing.assert_allclose(x[0, :, 24:].reshape(-1, 3).mean(0), (20, 40, 220), atol=8)
    info = clip.infos["front"]
    assert info.first("video").width == 80 and info.first("video").height == 60 and info.duration_s is None
    same = decode_sample({"front": path.read_bytes()}, cfg)
    assert np.array_equal(same.arrays["front"], x)


def test_image_errors_and_limits(tmp_path):
    cfg = preprocess_for("tiny", "front:image")
    png = write_image(tmp_path / "a.png", np.full((50, 50, 3), 9, np.uint8))
    video = write_clip(tmp_path / "v.mp4", moving_texture(10), fps=10)
    (tmp_path / "fake.png").write_text("not an image at all\n" * 20)
    (tmp_path / "empty.png").write_bytes(b"")
    for path, cause in [(video, "not_media"), (tmp_path / "fake.png", "not_media"),
                        (tmp_path / "empty.png", "empty"), (tmp_path / "nope.png", "missing")]:
        with pytest.raises(MediaError) as e:
            decode_sample({"front": path}, cfg)
        assert e.value.cause == cause and path.name in str(e.value), (path, e.value)
    with pytest.raises(MediaError) as e:
        decode_sample({"front": png}, cfg.override({"max_pixels": 40 * 40}))
    assert e.value.cause == "too_large" and "50x50" in str(e.value)


def test_flow_of_odd_sizes(tmp_path):
    # widths whose rows PyAV pads (e.g. 40): the grey frames must still reach OpenCV densely
    path = write_clip(tmp_path / "o.mp4", moving_texture(8, 48, 64), fps=10)
    for h, w in [(30, 40), (24, 24), (17, 33)]:
        cfg = preprocess_for("tiny", "flow", {"flow.height": h, "flow.width": w})
        flow = decode_clip(path, cfg).arrays["flow"]
        assert flow.shape == (2, h, w, 2) and flow[..., 0].mean() > 130    # the texture moves right


# ---------------------------------------------------------------------------------------
# damage: decoded, but flagged (dimml.media.FrameTally, audio_damage, wav_declared_s)

def flip_middle(src: Path, dst: Path, n: int = 200) -> Path:
    """A copy with n bytes of its middle half inverted (a damaged download or disk)."""
    data = bytearray(src.read_bytes())
    for i in np.random.default_rng(1).integers(len(data) // 4, 3 * len(data) // 4, n):
        data[i] ^= 0xFF
    dst.write_bytes(bytes(data))
    return dst


def test_damaged_media_are_flagged_and_clean_media_never(tmp_path):
    cfg = preprocess_for("tiny", "audio,visual")
    # FLV1 conceals damaged macroblocks and flags the frames (FFmpeg: "illegal dc ... Error at MB")
    flv = write_clip(tmp_path / "clip.flv", moving_texture(45, h=96, w=128), fps=15, audio=sine(3.0))
    assert decode_clip(flv, cfg).warnings == []
    flagged = decode_clip(flip_middle(flv, tmp_path / "flipped.flv"), cfg, allow_missing=True).warnings
    assert any("the decoder flagged" in w and "video frame(s) as damaged" in w for w in flagged), flagged
    # H.264 in mp4 gives up part way: the frames before the error are used, and that is said
    mp4 = write_clip(tmp_path / "clip.mp4", moving_texture(45, h=96, w=128), fps=15, audio=sine(3.0))
    assert decode_clip(mp4, cfg).warnings == []
    stopped = decode_clip(flip_middle(mp4, tmp_path / "flipped.mp4"), cfg, allow_missing=True).warnings
    assert any("the video stream stops decoding after" in w for w in stopped), stopped
    # a WAV cut to a third: FFmpeg measures it by its size, its header still says 3 s
    wav = write_clip(tmp_path / "speech.wav", None, audio=sine(3.0))
    whole = wav.read_bytes()
    (tmp_path / "cut.wav").write_bytes(whole[: len(whole) // 3])
    audio_only = preprocess_for("tiny", "audio")
    assert decode_sample({"audio": str(wav)}, audio_only).warnings == []
    [w] = decode_sample({"audio": str(tmp_path / "cut.wav")}, audio_only).warnings
    assert "cut.wav: the audio stream ends at" in w and "of the 3.00 s declared" in w


def run_program(program: str, *args: str) -> str:
    """`python -c program args...` from the repository root, in a fresh process; its stdout."""
    r = subprocess.run([sys.executable, "-c", program, *args], cwd=Path(__file__).resolve().parents[1],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip()


LEAK_PROGRAM = r"""
import json, sys
from dimml.media import decode_sample
from dimml.modalities import preprocess_for
from serving.allocator import mallinfo   # glibc's statistics (the serving workers' allocator helpers)

setting, files, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
cfg = preprocess_for("tiny", setting)   # 2 s of audio, frames picked early: decoding stops before the end
for _ in range(100):
    decode_sample(files, cfg)
before = mallinfo()["uordblks"]
for _ in range(n):
    decode_sample(files, cfg)
print((mallinfo()["uordblks"] - before) / n)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallinfo2")
@pytest.mark.parametrize("setting", SETTINGS)
def test_decoding_that_stops_early_keeps_no_memory(tmp_path, setting):
    """Stopping early leaves nothing behind: PyAV (18.1) keeps ~150 bytes of native memory per demux
    generator abandoned before its end, so the audio decoder and the frame pickers demux every packet
    (decoding only those they need). Malloc's memory in use after 400 decodes of a 3 s sample, per decode
    (measured before the fix, 1000 decodes: 152 audio+frames, 332 frames+flow, 296 two images, 320
    all three; after: 2 to 23, falling towards 0 over more decodes, a one-off growth spread thin)."""
    files = write_sample(tmp_path, setting, seconds=3.0)
    kept = float(run_program(LEAK_PROGRAM, setting, json.dumps(files), "400"))
    assert kept < 50, f"{kept} bytes kept per decode"


THREADS_PROGRAM = r"""
import json, os, sys, threading, time
import numpy as np
from dimml import media
from dimml.modalities import preprocess_for

setting, files, threads = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
cfg = preprocess_for("tiny", setting)
media.set_codec_threads(threads)
media.decode_sample(files, cfg)                # warm: imports, first-use set-up
seen, stop = set(), threading.Event()
def watch():                                   # FFmpeg's threads are native: /proc sees them, threading does not
    while not stop.is_set():
        seen.update(os.listdir("/proc/self/task"))
        time.sleep(0.0002)
before = set(os.listdir("/proc/self/task"))
w = threading.Thread(target=watch)
w.start()
arrays = [media.decode_sample(files, cfg).arrays for _ in range(20)]
stop.set()
w.join()
np.savez(sys.argv[4], **arrays[-1])
print(len(seen - before - {str(w.native_id)}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc/self/task")
@pytest.mark.parametrize("setting", [s for s in SETTINGS if s != "front:image,rear:image"])   # video: FFmpeg threads
def test_codec_threads_one_starts_no_thread_and_decodes_the_same(tmp_path, setting):
    """set_codec_threads(1) (the service's default, DIMML_CODEC_THREADS) decodes on the calling thread:
    no FFmpeg thread starts, where FFmpeg's own choice starts some per file (its video decoder's and
    the audio filter graph's), and the arrays are identical."""
    files = write_sample(tmp_path, setting, seconds=3.0)
    started, arrays = {}, {}
    for threads in (0, 1):
        out = tmp_path / f"threads{threads}.npz"
        started[threads] = int(run_program(THREADS_PROGRAM, setting, json.dumps(files), str(threads), str(out)))
        arrays[threads] = dict(np.load(out))
    assert started[1] == 0, f"{started[1]} threads started with codec threads 1"
    assert started[0] > 0, "FFmpeg's own choice started no thread here: the check would not see one"
    assert arrays[0].keys() == arrays[1].keys()
    assert all(np.array_equal(arrays[0][k], arrays[1][k]) for k in arrays[0])
