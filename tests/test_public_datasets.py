"""The public datasets as distributed (tests/public_layouts.py): read right, never silently wrong.

Each layout is read with the class counts its lists imply; a folder holding only part of a
layout is refused naming the missing part; damaged media are flagged everywhere and refused with
--strict; and each dataset trains, exports, verifies and scores end to end (slow).
"""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dimml.datasets import DatasetError, load_dataset
from dimml.modalities import preprocess_for

import public_layouts as pl
from conftest import REPO

DATASETS = {   # name -> (builder, the run's modalities, the folder name a user has)
    "cremad": (pl.make_cremad, "audio,visual", "CREMA-D"),
    "ave": (pl.make_ave, "audio,visual", "AVE_Dataset"),
    "ucf101": (pl.make_ucf101, "visual,flow", "UCF101"),
    "modelnet40": (pl.make_modelnet40, "front:image,rear:image", "modelnet40_images_new_12x"),
}


@pytest.fixture(scope="session")
def public(tmp_path_factory):
    """name -> (root, what the builder wrote); each dataset built once per session, on first use."""
    built: dict[str, tuple[Path, dict]] = {}

    def get(name: str) -> tuple[Path, dict]:
        if name not in built:
            builder, _, folder = DATASETS[name]
            root = tmp_path_factory.mktemp(name) / folder
            built[name] = (root, builder(root))
        return built[name]
    return get


def split_files(name: str, facts: dict) -> list[Path]:
    """The files a user passes as --split-file: the DI-MML authors' CREMA-D train.csv and test.csv."""
    return [facts["train_csv"], facts["test_csv"]] if name == "cremad" else []


def dimml(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dimml.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout)


# ---------------------------------------------------------------------------------------
# the layouts, read with the counts their lists imply

@pytest.mark.parametrize("name", DATASETS)
def test_layout_is_read_with_the_counts_of_its_lists(public, name):
    root, facts = public(name)
    spec = load_dataset(root, modalities=preprocess_for("tiny", DATASETS[name][1]), split_files=split_files(name, facts))
    assert spec.layout == name and spec.classes == facts["classes"]
    counts = spec.summary()["classes"]
    expected = facts["counts"][1] if name == "ucf101" else facts["counts"]     # ucf101: split 1
    for split, per_class in expected.items():
        assert {c: counts[c][split] for c in spec.classes} == {c: per_class.get(c, 0) for c in spec.classes}, split


def test_ave_every_row_is_a_sample_and_the_summary_says_what_is_unusual(public):
    root, facts = public("ave")
    spec = load_dataset(root)
    assert len(spec.samples) == len(pl.AVE_ROWS)                     # 18 rows, 16 videos
    by_key = {s.key for s in spec.samples}
    assert len(by_key) == len(spec.samples)                          # distinct identities
    for video, categories in facts["multi_label"].items():
        assert {s.key.rsplit("#", 1)[1] for s in spec.samples if f"/{video}.mp4#" in s.key} == set(categories)
    notes = " | ".join(spec.notes)
    assert f"{len(facts['multi_label'])} video(s) carry several labels" in notes
    assert f"{len(facts['cross_split'])} video(s) are in two splits" in notes


def test_ucf101_case_mismatched_names_are_matched_and_counted(tmp_path):
    """The DI-MML authors' lists spell v_HandstandPushups_*; the files are v_HandStandPushups_*."""
    facts = pl.make_ucf101(tmp_path / "UCF101", groups=2, frames=4, tree=False, edited_lists=True)
    spec = load_dataset(tmp_path / "UCF101", modalities=preprocess_for("tiny", "visual,flow"))
    assert spec.summary()["classes"]["HandstandPushups"] == {"train": 1, "val": 0, "test": 1}
    assert {Path(s.path).name for s in spec.samples} == {p.name for p in facts["videos"]}
    assert any("2 list entr(y/ies) name a video only by a different letter case" in n and
               "v_HandstandPushups_g02_c01.avi -> HandstandPushups/v_HandStandPushups_g02_c01.avi" in n
               for n in spec.notes), spec.notes


def test_ucf101_tree_folders_are_the_flow_source_whatever_their_case(public):
    root, _ = public("ucf101")
    spec = load_dataset(root, modalities=preprocess_for("tiny", "visual,flow"))
    assert all(Path(s.files["flow"]).parent == root / "tvl1_flow" / "u" for s in spec.samples)
    assert any("4 pre-extracted flow folder(s) differ from their video's name in letter case" in n for n in spec.notes)


# ---------------------------------------------------------------------------------------
# never silently wrong

@pytest.mark.parametrize("name, remove, missing", [
    ("ucf101", "ucfTrainTestlist", "trainlist01.txt"),
    ("cremad", "AudioWAV", "AudioWAV/ is missing"),
    ("ave", "Annotations.txt", "Annotations.txt is missing"),
])
def test_a_layout_missing_a_part_is_refused_naming_it(public, tmp_path, name, remove, missing):
    root, _ = public(name)
    copy = tmp_path / root.name
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns(remove, ".dimml-cache"))
    with pytest.raises(DatasetError, match=missing):
        load_dataset(copy)
    r = dimml("train", "--data", copy, "--out", tmp_path / "run", "--preset", "tiny", "--epochs", "1")
    assert r.returncode == 2 and missing in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "run" / "model.pt").exists()
    r = dimml("inspect", copy, "--no-decode")
    assert r.returncode == 1 and missing in r.stderr and "Traceback" not in r.stderr


def test_one_class_is_refused(tmp_path, public):
    root, _ = public("cremad")
    for clip in sorted((root / "VideoFlash").glob("*.flv"))[:3]:
        (tmp_path / "one" / "dog").mkdir(parents=True, exist_ok=True)
        shutil.copy(clip, tmp_path / "one" / "dog" / clip.name)
    with pytest.raises(DatasetError, match=r"1 class\(es\) \(dog\); a classifier needs at least two"):
        load_dataset(tmp_path / "one")
    # UCF101's videos without the lists: not a one-class "dataset" of class UCF-101
    shutil.copytree(public("ucf101")[0] / "UCF-101", tmp_path / "ucf" / "UCF-101")
    with pytest.raises(DatasetError, match="looks like UCF101 but trainlist01.txt"):
        load_dataset(tmp_path / "ucf")


def test_repeated_split_files_add_up(public, tmp_path):
    root, facts = public("cremad")
    r = dimml("train", "--data", root, "--out", tmp_path / "r", "--preset", "tiny", "--print-config",
              "--split-file", facts["train_csv"], "--split-file", facts["test_csv"])
    assert r.returncode == 0, r.stderr
    files = json.loads(r.stdout)["split_file"].split(",")
    assert files == [str(facts["train_csv"]), str(facts["test_csv"])]
    spec = load_dataset(root, split_files=files)
    assert spec.summary()["splits"] == {"train": sum(facts["counts"]["train"].values()), "val": 0,
                                        "test": sum(facts["counts"]["test"].values())}


# ---------------------------------------------------------------------------------------
# damaged media: flagged in inspect, training and scoring; --strict refuses

@pytest.fixture(scope="module")
def damaged_cremad(public, tmp_path_factory) -> tuple[Path, dict, str]:
    """CREMA-D with one clip truncated to a third (FFmpeg: "illegal dc ... Error at MB")."""
    root, facts = public("cremad")
    copy = tmp_path_factory.mktemp("damaged") / "CREMA-D"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns(".dimml-cache"))
    clip = sorted((copy / "VideoFlash").glob("*.flv"))[0]
    data = clip.read_bytes()
    clip.write_bytes(data[: len(data) // 3])
    facts = {**facts, "train_csv": copy / "train.csv", "test_csv": copy / "test.csv"}
    return copy, facts, clip.name


def test_damaged_media_are_flagged_and_strict_refuses(damaged_cremad, tmp_path):
    root, facts, broken = damaged_cremad
    r = dimml("inspect", root, "--preset", "tiny", "--json", "--no-progress")
    assert r.returncode == 0, r.stderr
    media = json.loads(r.stdout)["media"]
    assert [Path(d["sample"]).name for d in media["damaged"]] == [broken]     # that file, no clean one
    assert any("the video stream ends at" in w for w in media["damaged"][0]["warnings"])
    r = dimml("inspect", root, "--preset", "tiny", "--strict", "--no-progress")
    assert r.returncode == 1 and broken in r.stdout

    common = ["--data", root, "--preset", "tiny", "--epochs", "1", "--stage2-epochs", "1", "--no-progress"]
    r = dimml("train", *common, "--out", tmp_path / "strict", "--strict")
    assert r.returncode == 2 and "decoded with damage (strict)" in r.stderr and broken in r.stderr
    assert "Traceback" not in r.stderr
    r = dimml("train", *common, "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    log = (tmp_path / "run" / "train.log").read_text()
    damaged_lines = [line for line in log.splitlines() if "damaged media" in line]
    assert len(damaged_lines) == 1 and broken in damaged_lines[0]


# ---------------------------------------------------------------------------------------
# end to end: train, export, verify, score each dataset as distributed

@pytest.mark.slow
@pytest.mark.parametrize("name", DATASETS)
def test_public_dataset_end_to_end(public, tmp_path, name):
    root, facts = public(name)
    modalities = DATASETS[name][1]
    splits = [a for f in split_files(name, facts) for a in ("--split-file", f)]
    run, bundle, out = tmp_path / "run", tmp_path / "bundle", tmp_path / "scores.csv"
    r = dimml("train", "--data", root, "--modalities", modalities, "--preset", "tiny", "--epochs", "2",
              "--stage2-epochs", "1", "--out", run, "--no-progress", *splits)
    assert r.returncode == 0, r.stderr
    config = json.loads((run / "config.json").read_text())
    assert config["classes"] == facts["classes"] and config["data"]["layout"] == name
    assert dimml("export", "--run", run, "--out", bundle).returncode == 0
    r = dimml("verify", bundle, "--data", root, "--limit", "6")
    assert r.returncode == 0 and "parity OK" in r.stdout, r.stdout + r.stderr

    r = dimml("score", root, "--bundle", bundle, "--out", out, "--no-progress")   # no -r: the layout says what
    assert r.returncode == 0, r.stderr
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    spec = load_dataset(root, modalities=preprocess_for("tiny", modalities), split_files=split_files(name, facts))
    listed = {Path(s.path) for s in spec.samples}
    assert len(rows) == len(listed) and all(r["error"] == "" and r["warning"] == "" for r in rows)
    assert {(root / r["path"]) for r in rows} == listed
    assert f"/{len(listed)} labelled files)" in r.stdout, r.stdout     # every file has its truth from the layout


def test_scoring_flags_the_damaged_file_only(damaged_cremad, tiny_bundle, tmp_path):
    root, _, broken = damaged_cremad
    out = tmp_path / "scores.csv"
    r = dimml("score", root, "--bundle", tiny_bundle("audio,visual"), "--out", out, "--no-progress")
    assert r.returncode == 0, r.stderr
    with open(out, newline="") as f:
        rows = {Path(row["path"]).name: row for row in csv.DictReader(f)}
    assert len(rows) == len(list((root / "VideoFlash").glob("*.flv")))
    assert [name for name, row in rows.items() if row["warning"]] == [broken]
    assert rows[broken]["error"] == "" and "the video stream ends at" in rows[broken]["warning"]


def test_scoring_follows_symlinked_datasets_and_class_folders(public, tiny_bundle, tmp_path):
    root, _ = public("ave")
    (tmp_path / "link").symlink_to(root, target_is_directory=True)        # the dataset folder itself
    (tmp_path / "classes").mkdir()
    (tmp_path / "classes" / "bell").symlink_to(root / "AVE", target_is_directory=True)   # a class folder
    (tmp_path / "classes" / "other").mkdir()
    shutil.copy(next((root / "AVE").glob("*.mp4")), tmp_path / "classes" / "other" / "x.mp4")
    bundle = tiny_bundle("audio,visual")
    for src, n in ((tmp_path / "link", len({v for _, v, *_ in pl.AVE_ROWS})),
                   (tmp_path / "classes", len(list((root / "AVE").glob("*.mp4"))) + 1)):
        out = tmp_path / f"{src.name}.csv"
        r = dimml("score", src, "--bundle", bundle, "--out", out, "--no-progress")
        assert r.returncode == 0, r.stderr
        with open(out, newline="") as f:
            assert len(list(csv.DictReader(f))) == n, src
