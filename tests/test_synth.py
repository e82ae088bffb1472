"""The synthetic corpora: real files for each setting, a complete manifest that load_dataset reads,
determinism per seed, per-modality noise knobs, the clip writer, the CLI."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import scipy.signal

from dimml.datasets import load_dataset
from dimml.modalities import parse_modalities, preprocess_for
from training import cli
from training.synth import CREMAD_EMOTIONS, SynthConfig, render_sample, synthesize, write_clip
from training.synth_signals import FRAMES_CUES

from conftest import SETTINGS

CREMAD_NAME = re.compile(r"^(\d{4})_([A-Z]{3})_([A-Z]{3})_([A-Z]{2})$")

CORPORA = {
    "audio,visual": SynthConfig(classes=3, per_class=5, duration_s=1.0, seed=3),
    "visual,flow": SynthConfig(classes=3, per_class=4, duration_s=1.0, modalities="visual,flow"),
    "front:image,rear:image": SynthConfig(classes=3, per_class=4, modalities="front:image,rear:image", seed=2),
    "audio,visual,flow": SynthConfig(classes=3, per_class=3, duration_s=1.0, modalities="audio,visual,flow"),
    "flv": SynthConfig(classes=2, per_class=3, duration_s=1.0, format="flv"),
    "cremad": SynthConfig(classes=3, per_class=4, duration_s=1.0, layout="cremad"),
}
assert set(SETTINGS) <= set(CORPORA)


def read_manifest(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------
# reading what synth wrote, with PyAV and OpenCV directly (independent of dimml.media)

def video_frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def audio_wave(path: Path) -> tuple[np.ndarray, int]:
    with av.open(str(path)) as c:
        rate = c.streams.audio[0].codec_context.sample_rate
        chunks = [f.to_ndarray().astype(np.float32).reshape(f.to_ndarray().shape[0], -1) for f in c.decode(audio=0)]
    wave = np.concatenate(chunks, axis=1)
    return (wave.mean(0) if wave.shape[0] <= 2 else wave.reshape(-1)), rate


def streams(path: Path) -> tuple[object, object, float]:
    """(video stream or None, audio stream or None, container duration s)."""
    with av.open(str(path)) as c:
        v = c.streams.video[0] if c.streams.video else None
        a = c.streams.audio[0] if c.streams.audio else None
        return ((v.codec_context.name, v.codec_context.width, v.codec_context.height) if v else None,
                (a.codec_context.name, a.codec_context.sample_rate, a.codec_context.channels) if a else None,
                c.duration / 1e6)


def image(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert bgr is not None, path
    return bgr[..., ::-1]


def kinds(cfg: SynthConfig) -> set[str]:
    return {s.kind for s in parse_modalities(cfg.modalities)}


# ---------------------------------------------------------------------------------------
# each setting's corpus

@pytest.fixture(scope="module", params=list(CORPORA))
def corpus(request, tmp_path_factory) -> tuple[Path, SynthConfig]:
    cfg = CORPORA[request.param]
    out = tmp_path_factory.mktemp(request.param.replace(":", "-").replace(",", "_"))
    assert synthesize(out, cfg, progress=False) == out / "manifest.csv"
    return out, cfg


def test_every_file_is_real_media_of_its_setting(corpus):
    out, cfg = corpus
    k = kinds(cfg)
    for row in read_manifest(out / "manifest.csv"):
        if "path" in row:
            video, audio, duration = streams(out / row["path"])
            assert video is not None and video[1:] == (cfg.width, cfg.height), row
            assert (audio is not None) == ("audio" in k), row        # an audio track only when a modality hears it
            assert duration == pytest.approx(cfg.duration_s, abs=0.15)
            frames = video_frames(out / row["path"])
            assert len(frames) == pytest.approx(cfg.duration_s * cfg.fps, abs=1) and frames.std() > 5
        for name in cfg.image_names:
            img = image(out / row[f"{name}_path"])
            assert img.shape == (cfg.height, cfg.width, 3) and img.std() > 5
        if cfg.layout == "cremad":
            video, audio, _ = streams(out / row["path"])
            assert video[0] == "flv" and audio[0].removesuffix("float") == "mp3"
            wav = out / row["audio_path"]
            video, audio, _ = streams(wav)
            assert video is None and audio == ("pcm_s16le", cfg.sample_rate, 1)
            # the wav is the flv's audio track: the waveforms match up to mp3 coding and delay
            (a, ra), (b, rb) = audio_wave(out / row["path"]), audio_wave(wav)
            a = scipy.signal.resample_poly(a, rb, ra)
            xcorr = scipy.signal.correlate(a, b, method="fft") / np.sqrt((a * a).sum() * (b * b).sum())
            assert xcorr.max() > 0.6
            assert abs(xcorr.argmax() - (len(b) - 1)) < 0.1 * cfg.sample_rate   # mp3 delay only


def test_manifest_lists_every_file_with_its_label_and_split(corpus):
    out, cfg = corpus
    rows = read_manifest(out / "manifest.csv")
    own = (["audio_path"] if cfg.layout == "cremad" else []) + [f"{n}_path" for n in cfg.image_names]
    want_cols = (["path"] if cfg.has_video else []) + ["label", "split"] + own
    assert list(rows[0]) == want_cols
    assert len(rows) == cfg.classes * cfg.per_class
    listed = {r[c] for r in rows for c in want_cols if c.endswith("path")}
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert on_disk - listed == {"manifest.csv", "synth.json"}   # no stray or temporary file
    assert listed <= on_disk
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    assert sorted({r["label"] for r in rows}) == sorted(cfg.class_names)
    for label in cfg.class_names:
        assert sum(r["label"] == label for r in rows) == cfg.per_class
    assert SynthConfig.from_dict(json.loads((out / "synth.json").read_text())) == cfg

    if cfg.layout == "folders":
        for r in rows:
            files = [r[c] for c in want_cols if c.endswith("path")]
            assert all(f.split("/")[0] == r["label"] for f in files)
            assert r.get("path", ".mp4").endswith("." + cfg.format)
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


def test_manifest_loads_into_samples_with_the_settings_fields(corpus):
    out, cfg = corpus
    run = preprocess_for("tiny", cfg.modalities)
    spec = load_dataset(out, modalities=run)
    rows = read_manifest(out / "manifest.csv")
    assert spec.layout == "manifest" and spec.classes == sorted(cfg.class_names)
    assert len(spec.samples) == len(rows)
    want = (["video"] if cfg.has_video else []) + (["audio"] if cfg.layout == "cremad" else []) + list(cfg.image_names)
    by_key = {s.key: s for s in spec.samples}
    for r in rows:
        s = by_key[str((out / (r.get("path") or r[f"{cfg.image_names[0]}_path"])).resolve())]
        assert list(s.files) == want
        assert (spec.classes[s.label], s.split) == (r["label"], r["split"])   # the manifest's splits are kept
        assert all(Path(p).is_file() and Path(p).is_relative_to(out.resolve()) for p in s.files.values())
    # the cremad corpus is also a CREMA-D folder: the layout reader pairs the same files
    if cfg.layout == "cremad":
        (out / "manifest.csv").rename(out / "m.csv")
        try:
            as_cremad = load_dataset(out, modalities=run)
        finally:
            (out / "m.csv").rename(out / "manifest.csv")
        assert as_cremad.layout == "cremad"
        assert sorted(tuple(s.files.items()) for s in as_cremad.samples) == \
            sorted(tuple(s.files.items()) for s in spec.samples)


def test_corpus_decodes_into_each_modalitys_array(corpus):
    """Through the media layer, as training's cache does: every modality of the setting, spec-shaped."""
    from dimml.media import decode_sample
    out, cfg = corpus
    run = preprocess_for("tiny", cfg.modalities)
    for s in load_dataset(out, modalities=run).samples[:3]:
        clip = decode_sample(s.files, run)
        assert list(clip.arrays) == list(run.names)
        for spec in run.modalities:
            a = clip.arrays[spec.name]
            assert a.shape == spec.shape and a.dtype == spec.dtype and np.isfinite(a.astype(np.float32)).all()


# ---------------------------------------------------------------------------------------
# determinism

def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _media(d: Path) -> dict[str, bytes]:
    return {k: v for k, v in _files(d).items() if k not in ("manifest.csv", "synth.json")}


@pytest.mark.parametrize("setting", SETTINGS)
def test_same_seed_same_files_different_seed_different_content(tmp_path, setting):
    cfg = SynthConfig(classes=2, per_class=3, duration_s=0.6, modalities=setting)
    a = synthesize(tmp_path / "a", cfg, progress=False).parent
    b = synthesize(tmp_path / "b", cfg, progress=False, workers=2).parent   # parallel: same bytes
    c = synthesize(tmp_path / "c", SynthConfig(classes=2, per_class=3, duration_s=0.6, modalities=setting, seed=1),
                   progress=False).parent
    assert _files(a) == _files(b)
    ma, mc = _media(a), _media(c)
    assert ma.keys() == mc.keys() and all(ma[k] != mc[k] for k in ma)

    # an interrupted run (no manifest, a file missing) is completed; finished files are kept
    (a / "manifest.csv").unlink()
    first, second = sorted(ma)[0], sorted(ma)[-1]     # of different samples
    (a / first).unlink()
    mtime = (a / second).stat().st_mtime_ns
    synthesize(a, cfg, progress=False)
    assert _files(a) == _files(b)
    assert (a / second).stat().st_mtime_ns == mtime


def test_audio_visual_signals_are_unchanged_by_the_new_settings():
    """The default setting draws as it did before other settings existed (so its files are the same)."""
    import hashlib
    cfg = SynthConfig(classes=3, per_class=2, duration_s=0.6, seed=7, audio_noise=0.3, visual_noise=0.6)
    got = {}
    for k in range(3):
        for j in range(2):
            r = render_sample(k, j, cfg)
            assert not r.images
            got[(k, j)] = hashlib.sha256(r.audio.tobytes() + r.frames.tobytes()).hexdigest()[:16]
    assert got == AV_SIGNAL_DIGESTS


# sha256[:16] of audio float32 + frames uint8 per (class, index) of the config above, from the
# audio-visual-only synth of commit b606b9e
AV_SIGNAL_DIGESTS = {(0, 0): "827d38497ca60379", (0, 1): "d14e18bc4f21c386", (1, 0): "66f4a22d3a1999da",
                     (1, 1): "662aed005e4c2385", (2, 0): "e060616ff196318d", (2, 1): "19794286e0356b5d"}


# ---------------------------------------------------------------------------------------
# noise knobs: each modality's signature, measured by simple statistics of the files

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


def _spectrum(path: Path) -> np.ndarray:
    """Mean log spectrum above its median: the tone's peaks over the noise floor."""
    wave, rate = audio_wave(path)
    _, _, sxx = scipy.signal.spectrogram(wave, rate, nperseg=512)
    s = np.log(sxx.mean(1) + 1e-10)
    return s - np.median(s)


def _chroma(rgb: np.ndarray) -> np.ndarray:
    """Mean colour with the grey level removed: a sprite's or emblem's colour, not the brightness."""
    px = rgb.reshape(-1, 3).astype(np.float32)
    return (px - px.mean(1, keepdims=True)).mean(0)


def _motion(frames: np.ndarray) -> np.ndarray:
    """Mean optical flow direction (DIS, as the flow kind computes it) of 4 pairs at the centre, a unit vector."""
    mid = len(frames) // 2
    grey = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames[max(0, mid - 2):mid + 3]]
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    mean = np.mean([dis.calc(a, b, None).reshape(-1, 2).mean(0) for a, b in zip(grey[:-1], grey[1:])], axis=0)
    return mean / (np.linalg.norm(mean) + 1e-6)


def _orientation(rgb: np.ndarray) -> np.ndarray:
    """Dominant gradient orientation as a doubled-angle vector (stripes at angle a -> (cos 2a, sin 2a))."""
    grey = rgb.astype(np.float32).mean(-1)
    gy, gx = np.gradient(grey)
    v = np.array([(gx * gx - gy * gy).sum(), (2 * gx * gy).sum()])
    return v / ((gx * gx + gy * gy).sum() + 1e-6)


def features(out: Path, cfg: SynthConfig) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per modality name, one feature row per sample; and the labels."""
    names = {s.kind: s.name for s in parse_modalities(cfg.modalities)}
    feats: dict[str, list] = {}
    labels = []
    for r in read_manifest(out / "manifest.csv"):
        labels.append(r["label"])
        if "path" in r:
            frames = video_frames(out / r["path"])
            if "audio" in names:
                feats.setdefault(names["audio"], []).append(_spectrum(out / r["path"]))
            if "frames" in names:
                feats.setdefault(names["frames"], []).append(np.mean([_chroma(f) for f in frames], 0))
            if "flow" in names:
                feats.setdefault(names["flow"], []).append(_motion(frames))
        for view, name in enumerate(cfg.image_names):
            img = image(out / r[f"{name}_path"])
            feats.setdefault(name, []).append(_chroma(img) if view % 2 == 0 else _orientation(img))
    return {k: np.array(v) for k, v in feats.items()}, np.array(labels)


def accuracies(out: Path, cfg: SynthConfig) -> dict[str, float]:
    feats, y = features(out, cfg)
    return {name: _nearest_centroid_accuracy(x, y) for name, x in feats.items()}


@pytest.mark.parametrize("setting", SETTINGS)
def test_noise_knobs_make_one_modality_strong_and_the_others_weak(tmp_path, setting):
    names = [s.name for s in parse_modalities(setting)]
    for strong in names:
        noise = {n: 0.1 if n == strong else 0.9 for n in names}
        cfg = SynthConfig(classes=4, per_class=8, duration_s=0.6, seed=5, modalities=setting, noise=noise)
        acc = accuracies(synthesize(tmp_path / strong, cfg, progress=False).parent, cfg)
        weak = max(a for n, a in acc.items() if n != strong)
        assert acc[strong] >= 0.8 and acc[strong] > weak + 0.3, (strong, acc)


def test_shape_cue_leaves_the_colour_without_the_class(tmp_path):
    """--frames-cue shape: the sprites' colour says nothing of the class (with "colour" it does)."""
    acc = {}
    for cue in FRAMES_CUES:
        cfg = SynthConfig(classes=4, per_class=8, duration_s=0.6, seed=5, noise={"audio": 0.1, "visual": 0.0},
                          frames_cue=cue)
        acc[cue] = accuracies(synthesize(tmp_path / cue, cfg, progress=False).parent, cfg)["visual"]
    assert acc["colour"] >= 0.8 and acc["shape"] <= 0.5, acc


def _decoded_feature(kind: str, view: int, a: np.ndarray) -> np.ndarray:
    """The same statistics, of what the model is fed (dimml.media's arrays)."""
    if kind == "audio":
        s = a[0].astype(np.float32).mean(1)
        return s - np.median(s)
    if kind == "flow":
        m = (a.astype(np.float32) - 127.5).reshape(-1, 2).mean(0)
        return m / (np.linalg.norm(m) + 1e-6)
    if kind == "image" and view % 2:
        return _orientation(a[0])
    return np.mean([_chroma(f) for f in a], 0)


@pytest.mark.parametrize("setting", SETTINGS)
def test_every_modality_carries_its_class_through_decoding(tmp_path, setting):
    """Clean signatures survive the media layer's preprocessing (tiny preset: 64x64, few frames)."""
    from dimml.media import decode_sample
    specs = parse_modalities(setting)
    cfg = SynthConfig(classes=4, per_class=6, duration_s=1.0, seed=8, modalities=setting,
                      noise={s.name: 0.1 for s in specs})
    run = preprocess_for("tiny", setting)
    spec = load_dataset(synthesize(tmp_path, cfg, progress=False), modalities=run)
    views = {n: i for i, n in enumerate(cfg.image_names)}
    feats: dict[str, list] = {s.name: [] for s in specs}
    for smp in spec.samples:
        clip = decode_sample(smp.files, run)
        for s in specs:
            feats[s.name].append(_decoded_feature(s.kind, views.get(s.name, 0), clip.arrays[s.name]))
    y = np.array([smp.label for smp in spec.samples])
    acc = {n: _nearest_centroid_accuracy(np.array(f), y) for n, f in feats.items()}
    assert min(acc.values()) >= 0.8, acc


def test_legacy_noise_flags_are_the_audio_and_visual_knobs():
    a = SynthConfig(audio_noise=0.2, visual_noise=0.7)
    b = SynthConfig(noise={"audio": 0.2, "visual": 0.7})
    assert a == b and a.to_dict() == b.to_dict() and (a.noise_of("audio"), a.noise_of("visual")) == (0.2, 0.7)
    flow = SynthConfig(modalities="visual,flow", noise=(("flow", 0.3),))
    assert (flow.noise_of("visual"), flow.noise_of("flow")) == (0.5, 0.3)
    # a synth.json written before modalities existed reads as the same audio-visual config
    old = {k: v for k, v in a.to_dict().items() if k not in ("modalities", "noise")}
    assert SynthConfig.from_dict(old) == a


# ---------------------------------------------------------------------------------------
# the clip writer

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
        v, a, _ = streams(path)
        assert (v[0] if v else None) == vcodec, name
        assert (a[0].removesuffix("float") if a else None) == acodec, name
        assert (a[1] if a else None) == rate, name
        if vcodec:
            assert video_frames(path).shape[1:] == (48, 64, 3), name
        if acodec:   # the tone is where it was, whatever the codec's rate
            wave, r = audio_wave(path)
            wave = scipy.signal.resample_poly(wave, 16000, r)
            peak = np.abs(np.fft.rfft(wave[:8000])).argmax() * 16000 / 8000
            assert abs(peak - 440) < 10, name
    stereo = write_clip(tmp_path / "s.webm", frames, 16, np.stack([tone, tone]), 16000)
    assert streams(stereo)[1][2] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*expect, "s.webm"])  # no temp files

    with pytest.raises(ValueError, match="even"):
        write_clip(tmp_path / "odd.flv", frames[:, :47], 16, tone, 16000)
    with pytest.raises(ValueError, match="nothing to write"):
        write_clip(tmp_path / "none.mp4", None, 16, None, 16000)
    assert not (tmp_path / "odd.flv").exists()


# ---------------------------------------------------------------------------------------
# config and command line

@pytest.mark.parametrize("kwargs, match", [
    (dict(layout="cremad", classes=7), "classes must be 1..6"),
    (dict(layout="cremad", format="mp4"), "format must be flv"),
    (dict(layout="cremad", modalities="visual,flow"), "need an audio kind"),
    (dict(audio_noise=1.5), "audio_noise must be in"),
    (dict(modalities="visual,flow", noise={"flow": 2}), "noise of flow must be in"),
    (dict(modalities="visual,flow", noise={"rear": 0.1}), "not one of the modalities"),
    (dict(modalities="visual,other:frames"), "at most one frames modality"),
    (dict(modalities="front"), "needs a kind"),
    (dict(layout="kinetics"), "layout must be"),
    (dict(frames_cue="texture"), "frames_cue must be one of"),
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
            saved["audio_noise"], saved["visual_noise"], saved["modalities"]) == \
        (2, 3, "cremad", "flv", 4, 0.2, 0.7, "audio,visual")
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

    # another setting, with per-modality noise
    img = tmp_path / "img"
    assert cli.main(["synth", "--out", str(img), "--modalities", "front:image,rear:image", "--classes", "2",
                     "--per-class", "3", "--noise", "front=0.1,rear=0.9"]) == 0
    saved = json.loads((img / "synth.json").read_text())
    assert (saved["modalities"], saved["noise"]) == ("front:image,rear:image", {"front": 0.1, "rear": 0.9})
    assert list(read_manifest(img / "manifest.csv")[0]) == ["label", "split", "front_path", "rear_path"]
    capsys.readouterr()
    for bad, match in ((["--noise", "visual"], "expected name=value"),
                       (["--noise", "visual=0.2", "--visual-noise", "0.3"], "given twice"),
                       (["--modalities", "visual,flow", "--noise", "audio=0.2"], "not one of the modalities")):
        assert cli.main(["synth", "--out", str(tmp_path / "bad")] + bad) == 2
        assert match in capsys.readouterr().err


def test_recipe_fills_the_config_and_flags_override_it():
    """--recipe competition: RESULTS.md's corpus; a flag given wins, noise merges per modality."""
    from training.synth import RECIPES, config_from_args
    argv = ["synth", "--out", "x", "--recipe", "competition"]
    cfg = config_from_args(cli.build_parser(argv).parse_args(argv))
    assert cfg == SynthConfig(**RECIPES["competition"])
    assert (cfg.frames_cue, cfg.audio_noise, cfg.visual_noise, cfg.per_class) == ("shape", 0.3, 0.0, 150)
    argv += ["--per-class", "4", "--noise", "visual=0.2"]
    cfg = config_from_args(cli.build_parser(argv).parse_args(argv))
    assert (cfg.per_class, cfg.audio_noise, cfg.visual_noise, cfg.seed) == (4, 0.3, 0.2, 1)
    plain = ["synth", "--out", "x"]
    assert config_from_args(cli.build_parser(plain).parse_args(plain)) == SynthConfig()
