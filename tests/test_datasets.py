"""Dataset readers: manifest, class folders, CREMA-D, AVE; splits; missing-file policy."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from training.datasets import DatasetError, load_dataset
from training.synth import write_clip as synth_write_clip


# ---------------------------------------------------------------------------------------
# tiny real media files (also used by test_cache.py)

def write_clip(path: Path, *, seed: int = 0, seconds: float = 1.0, fps: int = 10, size=(64, 48),
               video_codec: str = "libx264", audio: bool = True, sr: int = 16000) -> Path:
    """A short clip through training.synth.write_clip: moving noise video (+ a sine tone)."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    frames = np.stack([np.roll(base, 3 * i, axis=1) for i in range(int(seconds * fps))])
    t = np.arange(int(seconds * sr)) / sr
    tone = (0.3 * np.sin(2 * np.pi * (220 + 40 * seed) * t)).astype(np.float32) if audio else None
    return synth_write_clip(path, frames, fps=fps, audio=tone, sample_rate=sr, video_codec=video_codec)


def write_wav(path: Path, *, seed: int = 0, seconds: float = 1.0, sr: int = 16000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, (0.3 * np.sin(2 * np.pi * (300 + 50 * seed) * t)).astype(np.float32), sr)
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """One real mp4, copied wherever a dataset needs a file (the readers only check existence)."""
    return write_clip(tmp_path_factory.mktemp("media") / "clip.mp4")


def put(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def by_name(spec) -> dict[str, object]:
    return {Path(s.path).name: s for s in spec.samples}


# ---------------------------------------------------------------------------------------
# manifest

def test_manifest_relative_paths_and_optional_columns(tmp_path, clip):
    data = tmp_path / "data"
    put(clip, data / "vids" / "a.mp4")
    put(clip, data / "vids" / "b.mp4")
    wav = write_wav(data / "sounds" / "b.wav")
    outside = put(clip, tmp_path / "elsewhere" / "c.mp4")
    write_csv(data / "manifest.csv", ["path", "label", "audio_path", "split"], [
        ["vids/a.mp4", "dog", "", "train"],
        ["vids/b.mp4", "cat", "sounds/b.wav", "valid"],
        [str(outside), "dog", "", ""],
    ])
    spec = load_dataset(data)
    assert spec.layout == "manifest" and spec.root == data.resolve()
    assert spec.classes == ["cat", "dog"]
    s = by_name(spec)
    assert s["a.mp4"].path == str((data / "vids" / "a.mp4").resolve())
    assert (s["a.mp4"].label, s["a.mp4"].split, s["a.mp4"].audio_path) == (1, "train", None)
    assert (s["b.mp4"].label, s["b.mp4"].split, s["b.mp4"].audio_path) == (0, "val", str(wav.resolve()))
    assert s["c.mp4"].path == str(outside.resolve()) and s["c.mp4"].split in ("train", "val", "test")


def test_manifest_minimal_columns_and_csv_path(tmp_path, clip):
    for n in range(3):
        put(clip, tmp_path / f"{n}.mp4")
    write_csv(tmp_path / "list.csv", ["label", "path"], [["10", "0.mp4"], ["9", "1.mp4"], ["10", "2.mp4"]])
    spec = load_dataset(tmp_path / "list.csv")
    assert spec.classes == ["9", "10"]          # integer labels keep numeric order
    assert [by_name(spec)[f"{n}.mp4"].label for n in range(3)] == [1, 0, 1]
    assert all(s.split is not None and s.audio_path is None for s in spec.samples)


def test_manifest_without_label_column_is_a_clear_error(tmp_path, clip):
    put(clip, tmp_path / "a.mp4")
    write_csv(tmp_path / "manifest.csv", ["path", "class"], [["a.mp4", "x"]])
    with pytest.raises(DatasetError, match=r"missing required column.*label"):
        load_dataset(tmp_path)


# ---------------------------------------------------------------------------------------
# class folders

def test_folders_without_split_folders(tmp_path, clip):
    for cls, n in (("walk", 5), ("run", 5)):
        for i in range(n):
            put(clip, tmp_path / cls / "sub" / f"{cls}{i}.mp4")
    put(clip, tmp_path / ".dimml-cache" / "x" / "junk.mp4")     # hidden folders are not classes
    (tmp_path / "run" / "notes.txt").write_text("not media")
    spec = load_dataset(tmp_path)
    assert spec.layout == "folders" and spec.classes == ["run", "walk"]
    assert len(spec.samples) == 10
    assert all(spec.classes[s.label] in s.path for s in spec.samples)
    counts = spec.counts()
    assert counts["test"] == [1, 1] and counts["train"] == [4, 4]      # stratified 0.1 / 0.2 of 5


def test_folders_with_split_folders(tmp_path, clip):
    layout = {"train": {"a": 2, "b": 2}, "val": {"a": 1}, "test": {"b": 1}}
    for split, classes in layout.items():
        for cls, n in classes.items():
            for i in range(n):
                put(clip, tmp_path / split / cls / f"{split}{i}.mp4")
    spec = load_dataset(tmp_path)
    assert spec.classes == ["a", "b"]
    assert spec.counts() == {"train": [2, 2], "val": [1, 0], "test": [0, 1]}
    assert all(f"/{s.split}/" in s.path for s in spec.samples)


# ---------------------------------------------------------------------------------------
# CREMA-D

def make_cremad(root: Path, clip: Path, speakers=range(1001, 1011)) -> None:
    wav = write_wav(root / "AudioWAV" / "tmp.wav")
    for spk in speakers:
        for emo in ("ANG", "HAP", "SAD"):
            stem = f"{spk}_DFA_{emo}_XX"
            put(clip, root / "VideoFlash" / f"{stem}.flv")
            shutil.copyfile(wav, root / "AudioWAV" / f"{stem}.wav")
    wav.unlink()


def test_cremad_labels_and_audio_pairing(tmp_path, clip):
    make_cremad(tmp_path, clip)
    spec = load_dataset(tmp_path)
    assert spec.layout == "cremad"
    assert spec.classes == ["ANG", "DIS", "FEA", "HAP", "NEU", "SAD"]
    assert len(spec.samples) == 30
    for s in spec.samples:
        stem = Path(s.path).stem
        assert spec.classes[s.label] == stem.split("_")[2]
        assert s.audio_path == str((tmp_path / "AudioWAV" / f"{stem}.wav").resolve())
    counts = spec.counts()
    assert counts["test"][0] == counts["test"][3] == counts["test"][5] == 2   # stratified: 20% of 10 each


def speakers_by_split(spec) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for s in spec.samples:
        out.setdefault(s.split, set()).add(Path(s.path).stem.split("_")[0])
    return out


def test_cremad_speaker_disjoint_split(tmp_path, clip):
    make_cremad(tmp_path, clip)
    spec = load_dataset(tmp_path, speaker_disjoint=True, split_seed=3)
    groups = speakers_by_split(spec)
    assert set(groups) == {"train", "val", "test"}
    assert sum(len(g) for g in groups.values()) == 10          # each speaker in exactly one split
    assert len(groups["test"]) == 2 and len(groups["val"]) == 1
    again = load_dataset(tmp_path, speaker_disjoint=True, split_seed=3)
    assert [(s.path, s.split) for s in again.samples] == [(s.path, s.split) for s in spec.samples]
    others = [speakers_by_split(load_dataset(tmp_path, speaker_disjoint=True, split_seed=k))
              for k in range(4, 8)]
    assert any(g["test"] != groups["test"] for g in others)    # the seed matters


def test_cremad_missing_wav_is_reported(tmp_path, clip):
    make_cremad(tmp_path, clip, speakers=[1001, 1002])
    (tmp_path / "AudioWAV" / "1002_DFA_SAD_XX.wav").unlink()
    with pytest.raises(DatasetError, match=r"1 of 6 samples.*\n.*1002_DFA_SAD_XX\.wav \(missing\)"):
        load_dataset(tmp_path)


# ---------------------------------------------------------------------------------------
# AVE

def test_ave_annotations_and_split_files(tmp_path, clip):
    lines = ["Category&VideoID&Quality&StartTime&EndTime",
             "Church bell&vidA&good&0&10", "Male speech, man speaking&vidB&good&2&8",
             "Church bell&vidC&bad&1&5", "Dog&vidD&good&0&4"]
    (tmp_path / "Annotations.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "trainSet.txt").write_text("Church bell&vidA&good&0&10\nDog&vidD&good&0&4\n")
    (tmp_path / "testSet.txt").write_text("Church bell&vidC&bad&1&5\n")
    for vid in "ABCD":
        put(clip, tmp_path / "AVE" / f"vid{vid}.mp4")
    spec = load_dataset(tmp_path)
    assert spec.layout == "ave"
    assert spec.classes == ["Church bell", "Dog", "Male speech, man speaking"]
    s = by_name(spec)
    assert len(s) == 4 and "Category.mp4" not in s
    assert [s[f"vid{v}.mp4"].label for v in "ABCD"] == [0, 2, 0, 1]
    assert (s["vidA.mp4"].split, s["vidC.mp4"].split, s["vidD.mp4"].split) == ("train", "test", "train")
    assert s["vidB.mp4"].split == "train"          # not in a split file: seeded split (1 sample -> train)
    assert s["vidA.mp4"].path == str((tmp_path / "AVE" / "vidA.mp4").resolve())


# ---------------------------------------------------------------------------------------
# missing files, splits

def test_missing_files_error_lists_them_and_skip_bad_warns(tmp_path, clip):
    rows = []
    for i in range(14):
        if i < 2:
            put(clip, tmp_path / f"ok{i}.mp4")
            rows.append([f"ok{i}.mp4", "x"])
        else:
            rows.append([f"gone{i}.mp4", "x"])
    (tmp_path / "empty.mp4").write_bytes(b"")
    rows.append(["empty.mp4", "x"])
    write_csv(tmp_path / "manifest.csv", ["path", "label"], rows)

    with pytest.raises(DatasetError) as err:
        load_dataset(tmp_path)
    msg = str(err.value)
    assert "13 of 15 samples" in msg
    assert "gone2.mp4 (missing)" in msg and "... and 3 more" in msg     # first 10 listed, then a count
    assert "ok0.mp4" not in msg

    with pytest.warns(UserWarning, match=r"13 of 15 samples.*skipping") as rec:
        spec = load_dataset(tmp_path, skip_bad=True)
    assert "gone2.mp4" in str(rec[0].message)
    assert sorted(Path(s.path).name for s in spec.samples) == ["ok0.mp4", "ok1.mp4"]
    assert len(spec.dropped) == 13 and str((tmp_path / "empty.mp4").resolve()) in spec.dropped


def test_stratified_split_is_deterministic_per_seed(tmp_path, clip):
    rows = []
    for cls in ("a", "b", "c"):
        for i in range(20):
            put(clip, tmp_path / f"{cls}{i}.mp4")
            rows.append([f"{cls}{i}.mp4", cls])
    write_csv(tmp_path / "manifest.csv", ["path", "label"], rows)
    splits = lambda spec: {s.path: s.split for s in spec.samples}  # noqa: E731
    first = load_dataset(tmp_path, split_seed=1)
    assert first.counts() == {"train": [14] * 3, "val": [2] * 3, "test": [4] * 3}
    write_csv(tmp_path / "manifest.csv", ["path", "label"], rows[::-1])   # order does not matter
    assert splits(load_dataset(tmp_path, split_seed=1)) == splits(first)
    assert splits(load_dataset(tmp_path, split_seed=2)) != splits(first)
    custom = load_dataset(tmp_path, split_seed=1, val_fraction=0.25, test_fraction=0.25)
    assert custom.counts()["val"] == [5] * 3


def test_unknown_layout_and_speaker_disjoint_without_speakers(tmp_path, clip):
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(DatasetError, match="not a dataset"):
        load_dataset(tmp_path)
    put(clip, tmp_path / "cls" / "a.mp4")
    with pytest.raises(DatasetError, match="speaker_disjoint"):
        load_dataset(tmp_path, speaker_disjoint=True)
