"""Dataset readers: manifest, class folders, CREMA-D, AVE, UCF101, ModelNet40; splits; missing-file policy."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from dimml.datasets import DatasetError, Sample, group_split, load_dataset, split_sizes, stratified_split
from dimml.modalities import preprocess_for
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


def by_name(spec) -> dict[str, Sample]:
    return {Path(s.key).name: s for s in spec.samples}


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
    a = str((data / "vids" / "a.mp4").resolve())
    assert s["a.mp4"].files == {"video": a} and s["a.mp4"].key == a
    assert (s["a.mp4"].label, s["a.mp4"].split) == (1, "train")
    assert (s["b.mp4"].label, s["b.mp4"].split) == (0, "val")
    assert s["b.mp4"].files == {"video": str((data / "vids" / "b.mp4").resolve()), "audio": str(wav.resolve())}
    assert s["c.mp4"].files == {"video": str(outside.resolve())} and s["c.mp4"].split in ("train", "val", "test")


def test_manifest_minimal_columns_and_csv_path(tmp_path, clip):
    for n in range(3):
        put(clip, tmp_path / f"{n}.mp4")
    write_csv(tmp_path / "list.csv", ["label", "path"], [["10", "0.mp4"], ["9", "1.mp4"], ["10", "2.mp4"]])
    spec = load_dataset(tmp_path / "list.csv")
    assert spec.classes == ["9", "10"]          # integer labels keep numeric order
    assert [by_name(spec)[f"{n}.mp4"].label for n in range(3)] == [1, 0, 1]
    assert all(s.split is not None and list(s.files) == ["video"] for s in spec.samples)


def test_manifest_with_several_own_file_columns(tmp_path, clip):
    """`<name>_path` columns: each modality's own file; no `path` column for an image-only setting."""
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(6):
        for view in ("front", "rear"):
            (tmp_path / "img" / f"{i}_{view}.png").write_bytes(b"png")   # the readers only check existence
        rows.append([f"img/{i}_rear.png", "ab"[i % 2], f"img/{i}_front.png"])
    write_csv(tmp_path / "manifest.csv", ["rear_path", "label", "front_path"], rows)
    images = preprocess_for("tiny", "front:image,rear:image")
    spec = load_dataset(tmp_path, modalities=images)
    s = spec.samples[0]
    front, rear = (str((tmp_path / "img" / f"0_{v}.png").resolve()) for v in ("front", "rear"))
    assert s.files == {"rear": rear, "front": front}
    assert s.key == rear                         # no video: the first file (column order) is the identity
    assert spec.classes == ["a", "b"] and len(spec.samples) == 6

    # the run's modalities need a column the manifest lacks: one clear error, not six missing files
    with pytest.raises(DatasetError, match=r"no sample has a source for modality 'side' \(image\).*side_path"):
        load_dataset(tmp_path, modalities=preprocess_for("tiny", "front:image,side:image"))
    # a video-derived modality needs the video (or its own file): none here
    with pytest.raises(DatasetError, match=r"modality 'visual' \(frames\).*`path` column"):
        load_dataset(tmp_path, modalities=preprocess_for("tiny", "visual,front:image"))

    # video + an image + a separate audio file; a column the run does not read is dropped, not checked
    put(clip, tmp_path / "v.mp4")
    write_wav(tmp_path / "v.wav")
    write_csv(tmp_path / "mixed.csv", ["path", "label", "audio_path", "front_path", "rear_path"],
              [["v.mp4", "x", "v.wav", "img/0_front.png", "gone.png"]])
    mixed = load_dataset(tmp_path / "mixed.csv", modalities=preprocess_for("tiny", "audio,visual,front:image"),
                         min_classes=1)   # one class: this case is about the columns
    assert list(mixed.samples[0].files) == ["video", "audio", "front"]
    assert mixed.samples[0].key == str((tmp_path / "v.mp4").resolve())
    with pytest.raises(DatasetError, match=r"gone\.png \(missing\)"):
        load_dataset(tmp_path / "mixed.csv", min_classes=1)     # without a config every listed file is checked

    # a row lacking a file the run needs is listed like a missing file
    write_csv(tmp_path / "gap.csv", ["front_path", "rear_path", "label"],
              [["img/0_front.png", "img/0_rear.png", "a"], ["img/1_front.png", "", "a"]])
    with pytest.raises(DatasetError, match=r"1 of 2 samples.*\n.*1_front\.png \(no source for modality 'rear'\)"):
        load_dataset(tmp_path / "gap.csv", modalities=images, min_classes=1)


@pytest.mark.parametrize("header, match", [
    (["path", "class"], r"missing required column.*label"),
    (["video", "label"], r"missing required column.*path \(or <name>_path\)"),
    (["path", "video_path", "label"], r"column 'video_path'.*reserved"),
])
def test_manifest_bad_columns_are_a_clear_error(tmp_path, clip, header, match):
    put(clip, tmp_path / "a.mp4")
    write_csv(tmp_path / "manifest.csv", header, [["a.mp4"] * (len(header) - 1) + ["x"]])
    with pytest.raises(DatasetError, match=match):
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
    assert all(spec.classes[s.label] in s.key for s in spec.samples)
    counts = spec.counts()
    # stratified 0.1 / 0.2 of 5: one test, and val rounds to 0 but every asked-for split gets one
    assert counts == {"train": [3, 3], "val": [1, 1], "test": [1, 1]}


def test_folders_with_split_folders(tmp_path, clip):
    layout = {"train": {"a": 2, "b": 2}, "val": {"a": 1}, "test": {"b": 1}}
    for split, classes in layout.items():
        for cls, n in classes.items():
            for i in range(n):
                put(clip, tmp_path / split / cls / f"{split}{i}.mp4")
    spec = load_dataset(tmp_path)
    assert spec.classes == ["a", "b"]
    assert spec.counts() == {"train": [2, 2], "val": [1, 0], "test": [0, 1]}
    assert all(f"/{s.split}/" in s.key for s in spec.samples)


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
        stem = Path(s.key).stem
        assert spec.classes[s.label] == stem.split("_")[2]
        assert s.files == {"video": str((tmp_path / "VideoFlash" / f"{stem}.flv").resolve()),
                           "audio": str((tmp_path / "AudioWAV" / f"{stem}.wav").resolve())}
    counts = spec.counts()
    assert counts["test"][0] == counts["test"][3] == counts["test"][5] == 2   # stratified: 20% of 10 each
    # the wav goes to the run's audio-kind modality, whatever its name; a run without audio drops it
    named = load_dataset(tmp_path, modalities=preprocess_for("tiny", "speech:audio,visual"))
    assert all(set(s.files) == {"video", "speech"} for s in named.samples)
    (tmp_path / "AudioWAV" / "1001_DFA_ANG_XX.wav").unlink()     # not read by a visual-only run
    visual = load_dataset(tmp_path, modalities=preprocess_for("tiny", "visual,flow"))
    assert all(list(s.files) == ["video"] for s in visual.samples) and len(visual.samples) == 30


def speakers_by_split(spec) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for s in spec.samples:
        out.setdefault(s.split, set()).add(Path(s.key).stem.split("_")[0])
    return out


def test_cremad_speaker_disjoint_split(tmp_path, clip):
    make_cremad(tmp_path, clip)
    spec = load_dataset(tmp_path, speaker_disjoint=True, split_seed=3)
    groups = speakers_by_split(spec)
    assert set(groups) == {"train", "val", "test"}
    assert sum(len(g) for g in groups.values()) == 10          # each speaker in exactly one split
    assert len(groups["test"]) == 2 and len(groups["val"]) == 1
    again = load_dataset(tmp_path, speaker_disjoint=True, split_seed=3)
    assert [(s.key, s.split) for s in again.samples] == [(s.key, s.split) for s in spec.samples]
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
    assert spec.classes == ["Church bell", "Dog", "Male speech, man speaking"]   # Annotations.txt's categories
    s = by_name(spec)
    assert len(s) == 3 and "Category.mp4" not in s
    assert [s[f"vid{v}.mp4"].label for v in "ACD"] == [0, 0, 1]
    assert (s["vidA.mp4"].split, s["vidC.mp4"].split, s["vidD.mp4"].split) == ("train", "test", "train")
    assert s["vidA.mp4"].files == {"video": str((tmp_path / "AVE" / "vidA.mp4").resolve())}
    # the split files list the samples: vidB's row is in none of them, left out and said so
    assert any("1 Annotations.txt row(s) are in no split file" in n and "vidB" in n for n in spec.notes)
    assert any("1 class(es) have no training samples: Male speech, man speaking" in n for n in spec.notes)
    # without split files every Annotations.txt row is a sample, split by the seeded stratified split
    for name in ("trainSet.txt", "testSet.txt"):
        (tmp_path / name).unlink()
    assert len(load_dataset(tmp_path).samples) == 4


# ---------------------------------------------------------------------------------------
# UCF101

UCF_CLASSES = {1: "ApplyEyeMakeup", 2: "Basketball", 3: "YoYo"}


def make_ucf101(root: Path, clip: Path, *, lists_dir: str = "ucfTrainTestlist", class_ind: bool = True) -> dict:
    """Class folders of .avi under UCF-101/, groups g01..g04; split N tests on group N."""
    videos = {}
    for idx, cls in UCF_CLASSES.items():
        for g in range(1, 5):
            rel = f"{cls}/v_{cls}_g{g:02d}_c01.avi"
            videos[rel] = (idx, g)
            put(clip, root / "UCF-101" / rel)
    lists = root / lists_dir
    lists.mkdir(parents=True, exist_ok=True)
    if class_ind:   # numbered against alphabetical order, so the order visibly comes from this file
        order = ["YoYo", "ApplyEyeMakeup", "Basketball"]
        (lists / "classInd.txt").write_text("".join(f"{i} {c}\n" for i, c in enumerate(order, 1)))
    for n in (1, 2, 3):
        train = [f"{rel} {idx}\n" for rel, (idx, g) in videos.items() if g != n]
        test = [f"{rel}\n" for rel, (idx, g) in videos.items() if g == n]     # no labels in test lists
        (lists / f"trainlist0{n}.txt").write_text("".join(train))
        (lists / f"testlist0{n}.txt").write_text("".join(test))
    return videos


def test_ucf101_split_ids_labels_and_class_index(tmp_path, clip):
    make_ucf101(tmp_path, clip)
    for n in (1, 2, 3):
        spec = load_dataset(tmp_path, split_id=n)
        assert spec.layout == "ucf101" and spec.classes == ["YoYo", "ApplyEyeMakeup", "Basketball"]
        assert len(spec.samples) == 12
        for s in spec.samples:
            rel = Path(s.key).relative_to(tmp_path / "UCF-101")
            assert spec.classes[s.label] == rel.parts[0]
            assert s.split == ("test" if f"_g0{n}_" in rel.name else "train")
            assert s.files == {"video": str((tmp_path / "UCF-101" / rel).resolve())}
        assert spec.counts() == {"train": [3, 3, 3], "val": [0, 0, 0], "test": [1, 1, 1]}
    with pytest.raises(DatasetError, match="split_id must be one of"):
        load_dataset(tmp_path, split_id=4)


def test_ucf101_lists_in_root_without_class_index(tmp_path, clip):
    make_ucf101(tmp_path, clip, lists_dir=".", class_ind=False)
    spec = load_dataset(tmp_path, layout="ucf101", split_id=2)
    assert spec.classes == sorted(UCF_CLASSES.values())
    assert {Path(s.key).name for s in spec.split("test")} == {f"v_{c}_g02_c01.avi" for c in UCF_CLASSES.values()}
    # a listed video that is gone is named, not dropped silently
    (tmp_path / "UCF-101" / "YoYo" / "v_YoYo_g02_c01.avi").unlink()
    with pytest.raises(DatasetError, match=r"1 of 12 samples.*\n.*v_YoYo_g02_c01\.avi \(missing\)"):
        load_dataset(tmp_path, split_id=2)


@pytest.mark.parametrize("flow_dir", ["flow", "tvl1_flow"])
def test_ucf101_pre_extracted_flow_is_the_flow_source(tmp_path, clip, flow_dir):
    videos = make_ucf101(tmp_path, clip)
    with_flow = sorted(videos)[:5]
    for rel in with_flow:
        stem = Path(rel).stem
        for comp in ("u", "v"):
            (tmp_path / flow_dir / comp / stem).mkdir(parents=True)
            (tmp_path / flow_dir / comp / stem / "frame000001.jpg").write_bytes(b"jpg")
    spec = load_dataset(tmp_path)
    for s in spec.samples:
        rel = Path(s.key).relative_to(tmp_path / "UCF-101").as_posix()
        want = {"video": s.key}
        if rel in with_flow:
            want["flow"] = str((tmp_path / flow_dir / "u" / Path(rel).stem).resolve())
        assert s.files == want
    # the run's flow modality gets the folder under its own name; a run without flow does not read it
    named = load_dataset(tmp_path, modalities=preprocess_for("tiny", "visual,motion:flow"))
    assert sum("motion" in s.files for s in named.samples) == 5
    assert all(list(load_dataset(tmp_path, modalities=preprocess_for("tiny", "audio,visual")).samples[i].files)
               == ["video"] for i in range(12))
    # an empty pre-extracted folder is reported like an empty file
    (tmp_path / flow_dir / "u" / Path(with_flow[0]).stem / "frame000001.jpg").unlink()
    with pytest.raises(DatasetError, match=r"u/v_\w+_c01 \(empty folder\)"):
        load_dataset(tmp_path)


# ---------------------------------------------------------------------------------------
# ModelNet40 (MVCNN 12-view renders)

def make_modelnet(root: Path, objects: dict[str, dict[str, int]], views=range(1, 13)) -> None:
    for cls, splits in objects.items():
        for split, n in splits.items():
            d = root / cls / split
            d.mkdir(parents=True)
            for i in range(n):
                for v in views:
                    (d / f"{cls}_{i:04d}.obj.shaded_v{v:03d}.png").write_bytes(f"{cls}{i}v{v}".encode())


def test_modelnet40_picks_front_v001_and_rear_v007(tmp_path):
    make_modelnet(tmp_path, {"airplane": {"train": 3, "test": 1}, "chair": {"train": 2, "test": 2}})
    spec = load_dataset(tmp_path)
    assert spec.layout == "modelnet40" and spec.classes == ["airplane", "chair"]
    assert spec.counts() == {"train": [3, 2], "val": [0, 0], "test": [1, 2]}
    for s in spec.samples:
        assert list(s.files) == ["front", "rear"]
        assert Path(s.files["front"]).read_bytes().endswith(b"v1")
        assert Path(s.files["rear"]).read_bytes().endswith(b"v7")
        assert Path(s.files["front"]).parent.name == s.split
        assert s.key == s.files["front"]
    # the run's image modalities name the views, in order
    spec = load_dataset(tmp_path, modalities=preprocess_for("tiny", "a:image,b:image"))
    assert all(Path(s.files["a"]).name.endswith("_v001.png") and Path(s.files["b"]).name.endswith("_v007.png")
               for s in spec.samples)
    with pytest.raises(DatasetError, match="gives 2 views"):
        load_dataset(tmp_path, modalities=preprocess_for("tiny", "a:image,b:image,c:image"))


def test_modelnet40_object_without_a_view_is_reported(tmp_path):
    make_modelnet(tmp_path, {"bed": {"train": 2}, "desk": {"train": 2}})
    (tmp_path / "bed" / "train" / "bed_0001.obj.shaded_v007.png").unlink()
    with pytest.raises(DatasetError, match=r"1 of 4 samples.*\n.*bed_0001\.obj\.shaded_v007\.png \(missing\)"):
        load_dataset(tmp_path)
    with pytest.warns(UserWarning, match="skipping"):
        spec = load_dataset(tmp_path, skip_bad=True)
    assert len(spec.samples) == 3 and spec.dropped == [str((tmp_path / "bed/train/bed_0001.obj.shaded_v001.png").resolve())]


# ---------------------------------------------------------------------------------------
# missing files, splits

def test_missing_files_error_lists_them_and_skip_bad_warns(tmp_path, clip):
    rows = []
    for i in range(14):
        if i < 2:
            put(clip, tmp_path / f"ok{i}.mp4")
            rows.append([f"ok{i}.mp4", "xy"[i]])
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
    assert sorted(Path(s.key).name for s in spec.samples) == ["ok0.mp4", "ok1.mp4"]
    assert len(spec.dropped) == 13 and str((tmp_path / "empty.mp4").resolve()) in spec.dropped


def test_stratified_split_is_deterministic_per_seed(tmp_path, clip):
    rows = []
    for cls in ("a", "b", "c"):
        for i in range(20):
            put(clip, tmp_path / f"{cls}{i}.mp4")
            rows.append([f"{cls}{i}.mp4", cls])
    write_csv(tmp_path / "manifest.csv", ["path", "label"], rows)
    splits = lambda spec: {s.key: s.split for s in spec.samples}  # noqa: E731
    first = load_dataset(tmp_path, split_seed=1)
    assert first.counts() == {"train": [14] * 3, "val": [2] * 3, "test": [4] * 3}
    write_csv(tmp_path / "manifest.csv", ["path", "label"], rows[::-1])   # order does not matter
    assert splits(load_dataset(tmp_path, split_seed=1)) == splits(first)
    assert splits(load_dataset(tmp_path, split_seed=2)) != splits(first)
    custom = load_dataset(tmp_path, split_seed=1, val_fraction=0.25, test_fraction=0.25)
    assert custom.counts()["val"] == [5] * 3


def test_the_one_split_function(tmp_path):
    """stratified_split: what load_dataset, training's val carve-out and the synth corpus all call."""
    keys = [f"k{i:02d}" for i in range(30)]
    labels = [i % 3 for i in range(30)]
    out = stratified_split(keys, labels, seed=4, val_fraction=0.2, test_fraction=0.0)
    assert out == stratified_split(keys[::-1], labels[::-1], seed=4, val_fraction=0.2, test_fraction=0.0)[::-1]
    assert out != stratified_split(keys, labels, seed=5, val_fraction=0.2, test_fraction=0.0)
    for k in range(3):
        assert [s for s, lab in zip(out, labels) if lab == k].count("val") == 2 and "test" not in out
    # adding a class does not reshuffle the others
    more = stratified_split(keys + ["z0", "z1", "z2"], labels + [9, 9, 9], seed=4, val_fraction=0.2, test_fraction=0.0)
    assert more[:30] == out and sorted(more[30:]) == ["train", "train", "val"]
    # the size rule: every asked-for split gets one while train keeps one
    assert [split_sizes(n, 0.1, 0.2) for n in (1, 2, 3, 5, 10)] == [(0, 0), (1, 0), (1, 1), (1, 1), (2, 1)]
    assert split_sizes(2, 0.1, 0.0) == (0, 1) and split_sizes(7, 0.0, 0.0) == (0, 0)
    # groups (speakers) stay whole
    spk = group_split(keys, lambda k: k[:2], seed=0, val_fraction=0.2, test_fraction=0.2)
    assert all(len({s for s, k in zip(spk, keys) if k[:2] == g}) == 1 for g in {k[:2] for k in keys})
    with pytest.raises(ValueError, match="val_fraction"):
        stratified_split(keys, labels, seed=0, val_fraction=0.6, test_fraction=0.5)


def test_unknown_layout_and_speaker_disjoint_without_speakers(tmp_path, clip):
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(DatasetError, match="not a dataset"):
        load_dataset(tmp_path)
    put(clip, tmp_path / "cls" / "a.mp4")
    with pytest.raises(DatasetError, match="speaker_disjoint"):
        load_dataset(tmp_path, speaker_disjoint=True)


def test_training_datasets_is_the_core_module():
    """The old import path re-exports the core readers (one implementation)."""
    import dimml.datasets
    import training.datasets
    assert training.datasets.load_dataset is dimml.datasets.load_dataset
    assert training.datasets.Sample is dimml.datasets.Sample
