"""The synthetic corpus: real files that decode, a complete manifest, determinism, noise knobs."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.signal

from dimml.config import PREPROCESS_PRESETS
from dimml.media import decode_clip, decode_waveform, probe
from training import cli
from training.synth import CREMAD_EMOTIONS, SynthConfig, synthesize, write_clip

TINY = PREPROCESS_PRESETS["tiny"]
CREMAD_NAME = re.compile(r"^(\d{4})_([A-Z]{3})_([A-Z]{3})_([A-Z]{2})$")

CORPORA = {
    "folders-mp4": SynthConfig(classes=3, per_class=5, duration_s=1.0, seed=3),
    "folders-flv": SynthConfig(classes=2, per_class=3, duration_s=1.0, format="flv"),
    "cremad": SynthConfig(classes=3, per_class=4, duration_s=1.0, layout="cremad"),
}


def read_manifest(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module", params=list(CORPORA))
def corpus(request, tmp_path_factory) -> tuple[Path, SynthConfig]:
    cfg = CORPORA[request.param]
    out = tmp_path_factory.mktemp(request.param)
    assert synthesize(out, cfg, progress=False) == out / "manifest.csv"
    return out, cfg


def test_every_file_decodes_with_both_modalities(corpus):
    out, cfg = corpus
    for row in read_manifest(out / "manifest.csv"):
        info = probe(out / row["path"])
        video, audio = info.first("video"), info.first("audio")
        assert video is not None and audio is not None, row["path"]
        assert (video.width, video.height) == (cfg.width, cfg.height)
        assert info.duration_s == pytest.approx(cfg.duration_s, abs=0.15)
        clip = decode_clip(out / row["path"], TINY)
        assert clip.spectrogram.shape == TINY.spectrogram_shape
        assert clip.frames.shape == TINY.frames_shape
        assert np.isfinite(clip.spectrogram).all() and clip.frames.std() > 5
        if cfg.layout == "cremad":
            assert video.codec == "flv" and audio.codec.startswith("mp3")
            wav = out / row["audio_path"]
            w = probe(wav).first("audio")
            assert (w.codec, w.sample_rate, w.channels) == ("pcm_s16le", cfg.sample_rate, 1)
            assert probe(wav).first("video") is None
            # the wav is the flv's audio track: the waveforms match up to mp3 coding and delay
            a, b = decode_waveform(out / row["path"]), decode_waveform(wav)
            xcorr = scipy.signal.correlate(a, b, method="fft") / np.sqrt((a * a).sum() * (b * b).sum())
            assert xcorr.max() > 0.6
            assert abs(xcorr.argmax() - (len(b) - 1)) < 0.1 * cfg.sample_rate   # mp3 delay only


def test_manifest_lists_every_file_with_its_label_and_split(corpus):
    out, cfg = corpus
    rows = read_manifest(out / "manifest.csv")
    want_cols = ["path", "label", "split"] + (["audio_path"] if cfg.layout == "cremad" else [])
    assert list(rows[0]) == want_cols
    assert len(rows) == cfg.classes * cfg.per_class
    listed = {r["path"] for r in rows} | {r.get("audio_path") for r in rows if r.get("audio_path")}
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert on_disk - listed == {"manifest.csv", "synth.json"}   # no stray or temporary file
    assert listed <= on_disk
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    assert sorted({r["label"] for r in rows}) == sorted(cfg.class_names)
    for label in cfg.class_names:
        assert sum(r["label"] == label for r in rows) == cfg.per_class
    assert SynthConfig(**json.loads((out / "synth.json").read_text())) == cfg

    if cfg.layout == "folders":
        for r in rows:
            assert r["path"].split("/")[0] == r["label"] and r["path"].endswith("." + cfg.format)
        for label in cfg.class_names:   # stratified: every class in every split
            assert {r["split"] for r in rows if r["label"] == label} == {"train", "val", "test"}
    else:
        assert set(cfg.class_names) <= set(CREMAD_EMOTIONS)
        actors_of: dict[str, set] = {"train": set(), "val": set(), "test": set()}
        for r in rows:
            video, wav = Path(r["path"]), Path(r["audio_path"])
            assert (video.parent.name, video.suffix, wav.parent.name, wav.suffix) == \
                ("VideoFlash", ".flv", "AudioWAV", ".wav")
            assert video.stem == wav.stem
            actor, _, emotion, _ = CREMAD_NAME.match(video.stem).groups()
            assert emotion == r["label"]
            actors_of[r["split"]].add(actor)
        # speaker-disjoint splits
        assert not (actors_of["train"] & actors_of["val"] or actors_of["train"] & actors_of["test"]
                    or actors_of["val"] & actors_of["test"])


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_same_seed_same_files_different_seed_different_content(tmp_path):
    cfg = SynthConfig(classes=2, per_class=3, duration_s=0.6)
    a = synthesize(tmp_path / "a", cfg, progress=False).parent
    b = synthesize(tmp_path / "b", cfg, progress=False, workers=2).parent   # parallel: same bytes
    c = synthesize(tmp_path / "c", SynthConfig(classes=2, per_class=3, duration_s=0.6, seed=1),
                   progress=False).parent
    assert _files(a) == _files(b)
    rows = read_manifest(a / "manifest.csv")
    assert [r["path"] for r in rows] == [r["path"] for r in read_manifest(c / "manifest.csv")]
    for r in rows:
        x, y = decode_clip(a / r["path"], TINY), decode_clip(c / r["path"], TINY)
        assert not np.array_equal(x.frames, y.frames)
        assert not np.array_equal(x.spectrogram, y.spectrogram)

    # an interrupted run (no manifest, a file missing) is completed; finished files are kept
    (a / "manifest.csv").unlink()
    gone, kept = a / rows[0]["path"], a / rows[1]["path"]
    gone.unlink()
    mtime = kept.stat().st_mtime_ns
    synthesize(a, cfg, progress=False)
    assert _files(a) == _files(b)
    assert kept.stat().st_mtime_ns == mtime


def _nearest_centroid_accuracy(x: np.ndarray, y: np.ndarray) -> float:
    """Leave-one-out accuracy of a nearest-centroid classifier on standardised features."""
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    labels = np.unique(y)
    hits = 0
    for i in range(len(y)):
        rest = np.arange(len(y)) != i
        centroids = np.stack([x[rest & (y == lab)].mean(0) for lab in labels])
        hits += labels[np.argmin(((centroids - x[i]) ** 2).sum(1))] == y[i]
    return hits / len(y)


def _separability(out: Path, preset: str = "tiny") -> tuple[float, float]:
    """(audio, visual) accuracy of simple statistics: mean spectrum; mean chroma of the frames."""
    audio, visual, labels = [], [], []
    for r in read_manifest(out / "manifest.csv"):
        clip = decode_clip(out / r["path"], PREPROCESS_PRESETS[preset])
        spectrum = clip.spectrogram[0].mean(1)
        audio.append(spectrum - np.median(spectrum))   # peaks above the noise floor
        pixels = clip.frames.reshape(-1, 3).astype(np.float32)
        visual.append((pixels - pixels.mean(1, keepdims=True)).mean(0))   # colour, not grey level
        labels.append(r["label"])
    y = np.array(labels)
    return _nearest_centroid_accuracy(np.array(audio), y), _nearest_centroid_accuracy(np.array(visual), y)


def test_noise_knobs_make_one_modality_strong_and_the_other_weak(tmp_path):
    common = dict(classes=4, per_class=10, duration_s=1.0, seed=5)
    audio_strong = synthesize(tmp_path / "a", SynthConfig(audio_noise=0.1, visual_noise=0.9, **common),
                              progress=False).parent
    visual_strong = synthesize(tmp_path / "v", SynthConfig(audio_noise=0.9, visual_noise=0.1, **common),
                               progress=False).parent
    a_acc, v_acc = _separability(audio_strong)
    assert a_acc >= 0.8 and a_acc > v_acc + 0.3, (a_acc, v_acc)
    a_acc, v_acc = _separability(visual_strong)
    assert v_acc >= 0.8 and v_acc > a_acc + 0.3, (a_acc, v_acc)
    # the visual signature survives the 224x224 resize of the paper's preset too
    assert _separability(visual_strong, "resnet18")[1] >= 0.8


def test_write_clip_formats(tmp_path):
    """The writer other tests reuse: each container with its usual codecs, audio- or video-only."""
    t = np.arange(8000) / 16000
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    frames = np.random.default_rng(0).integers(0, 256, (8, 48, 64, 3), dtype=np.uint8)
    expect = {  # file -> (video codec, audio codec, audio rate) as probed
        "a.mp4": ("h264", "aac", 16000), "a.flv": ("flv", "mp3", 22050),
        "a.webm": ("vp9", "opus", 48000), "a.avi": ("mjpeg", "pcm_s16le", 16000),
        "a.mkv": ("h264", "aac", 16000), "a.mov": ("h264", "aac", 16000),
        "a.wav": (None, "pcm_s16le", 16000), "a.flac": (None, "flac", 16000),
        "a.mp3": (None, "mp3", 16000), "v.mp4": ("h264", None, None),
    }
    for name, (vcodec, acodec, rate) in expect.items():
        audio = None if acodec is None else tone
        video = None if vcodec is None else frames
        path = write_clip(tmp_path / name, video, 16, audio, 16000)
        info = probe(path)
        v, a = info.first("video"), info.first("audio")
        assert (v.codec if v else None) == vcodec, name
        assert (a.codec.removesuffix("float") if a else None) == acodec, name
        assert (a.sample_rate if a else None) == rate, name
        clip = decode_clip(path, TINY, allow_missing=True)
        assert (clip.frames is not None) == (vcodec is not None)
        assert (clip.spectrogram is not None) == (acodec is not None)
        if acodec:   # the tone is where it was, whatever the codec's rate
            wave = decode_waveform(path, TINY)
            peak = np.abs(np.fft.rfft(wave[:8000])).argmax() * 16000 / 8000
            assert abs(peak - 440) < 10, name
    stereo = write_clip(tmp_path / "s.webm", frames, 16, np.stack([tone, tone]), 16000)
    assert probe(stereo).first("audio").channels == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*expect, "s.webm"])  # no temp files

    with pytest.raises(ValueError, match="even"):
        write_clip(tmp_path / "odd.flv", frames[:, :47], 16, tone, 16000)
    with pytest.raises(ValueError, match="nothing to write"):
        write_clip(tmp_path / "none.mp4", None, 16, None, 16000)
    assert not (tmp_path / "odd.flv").exists()


@pytest.mark.parametrize("kwargs, match", [
    (dict(layout="cremad", classes=7), "classes must be 1..6"),
    (dict(layout="cremad", format="mp4"), "format must be flv"),
    (dict(audio_noise=1.5), "audio_noise must be in"),
    (dict(layout="kinetics"), "layout must be"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SynthConfig(**kwargs)


def test_cli(tmp_path, capsys):
    out = tmp_path / "corpus"
    argv = ["synth", "--out", str(out), "--classes", "2", "--per-class", "3", "--duration", "0.5",
            "--layout", "cremad", "--audio-noise", "0.2", "--visual-noise", "0.7", "--seed", "4"]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.strip() == str(out / "manifest.csv")
    saved = json.loads((out / "synth.json").read_text())
    assert (saved["classes"], saved["per_class"], saved["layout"], saved["format"], saved["seed"],
            saved["audio_noise"], saved["visual_noise"]) == (2, 3, "cremad", "flv", 4, 0.2, 0.7)
    assert len(read_manifest(out / "manifest.csv")) == 6

    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert cli.main(argv) == 0                      # same config again: reused, nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == mtimes

    assert cli.main(argv[:-2] + ["--seed", "5"]) == 2   # another corpus's directory: refused
    assert "not empty" in capsys.readouterr().err
    assert cli.main(argv[:-2] + ["--seed", "5", "--force"]) == 0
    assert json.loads((out / "synth.json").read_text())["seed"] == 5

    assert cli.main(["synth", "--out", str(tmp_path / "x"), "--layout", "cremad", "--classes", "7"]) == 2
    assert "classes must be 1..6" in capsys.readouterr().err
