"""Dataset readers: a data folder (manifest CSV, class folders, CREMA-D, AVE) -> labelled samples.

Every reader returns a `DatasetSpec`: absolute media paths, integer labels (index into the
sorted class names) and a train/val/test split for every sample. Samples whose layout gives
no split get a seeded, deterministic, class-stratified one. Missing files are never dropped
silently: they raise `DatasetError` (how many, which), or with skip_bad a warning lists them.
"""
from __future__ import annotations

import csv
import os
import random
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "dev": "val", "test": "test", "testing": "test"}
VIDEO_EXTS = {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".flv", ".mpg", ".mpeg", ".ts", ".3gp"}
LAYOUTS = ("auto", "manifest", "folders", "cremad", "ave")
CREMAD_EMOTIONS = ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD")
AVE_SPLIT_FILES = {"train": "trainSet.txt", "val": "valSet.txt", "test": "testSet.txt"}
LIST_MAX = 10   # how many offending paths an error or warning names


class DatasetError(ValueError):
    """A dataset that cannot be read as asked (bad layout, missing or undecodable files)."""


@dataclass
class Sample:
    """One labelled clip: a media file, plus a separate audio file when the layout has one."""

    path: str                       # absolute
    label: int                      # index into DatasetSpec.classes
    split: str | None               # "train" | "val" | "test"
    audio_path: str | None = None   # absolute; None: audio from `path`


@dataclass
class DatasetSpec:
    """A readable dataset: its samples, class names (label order) and where it came from."""

    root: Path
    samples: list[Sample]
    classes: list[str]
    layout: str = ""
    dropped: list[str] = field(default_factory=list)   # paths skipped (skip_bad), already warned about

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> list[Sample]:
        """The samples of one split ("train", "val" or "test")."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return [s for s in self.samples if s.split == name]

    def counts(self) -> dict[str, list[int]]:
        """Per split, the number of samples of each class."""
        out = {name: [0] * len(self.classes) for name in SPLITS}
        for s in self.samples:
            out[s.split][s.label] += 1
        return out


def format_list(items: list[str], limit: int = LIST_MAX) -> str:
    """A readable bulleted list of at most `limit` items, noting how many more there are."""
    lines = [f"  {x}" for x in items[:limit]]
    if len(items) > limit:
        lines.append(f"  ... and {len(items) - limit} more")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# layouts: each returns (samples, classes) with absolute paths and splits where the layout has them

def _abs(base: Path, p: str) -> str:
    return os.path.abspath(os.path.join(base, os.path.expanduser(p)))


def _class_order(names: set[str]) -> list[str]:
    """Sorted class names; numerically when all are integers (so label "10" comes after "9")."""
    if names and all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def _split_name(value: str, where: str) -> str | None:
    v = value.strip().lower()
    if not v:
        return None
    if v not in SPLIT_ALIASES:
        raise DatasetError(f"{where}: unknown split {value!r}; expected one of {SPLITS} (or empty)")
    return SPLIT_ALIASES[v]


def _need(*paths: Path) -> None:
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise DatasetError(f"not found: {', '.join(missing)}")


def read_manifest(csv_path: Path) -> tuple[list[Sample], list[str]]:
    """`path,label[,audio_path][,split]` CSV; paths relative to the CSV's folder or absolute."""
    _need(csv_path)
    base = csv_path.parent
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = {"path", "label"} - set(columns)
        if missing:
            raise DatasetError(f"{csv_path}: missing required column(s) {sorted(missing)}; "
                               f"found {columns} (need path,label and optionally audio_path,split)")
        rows = []
        for lineno, raw in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
            if not any(row.values()):
                continue   # blank line
            where = f"{csv_path}, line {lineno}"
            if not row["path"] or not row["label"]:
                raise DatasetError(f"{where}: empty path or label")
            rows.append((row["path"], row["label"], row.get("audio_path") or None,
                         _split_name(row.get("split", ""), where)))
    if not rows:
        raise DatasetError(f"{csv_path}: the manifest lists no samples")
    classes = _class_order({r[1] for r in rows})
    index = {c: i for i, c in enumerate(classes)}
    samples = [Sample(_abs(base, p), index[lab], split, _abs(base, a) if a else None)
               for p, lab, a, split in rows]
    return samples, classes


def _media_files(folder: Path) -> list[Path]:
    """Video files under folder (recursively), skipping hidden files and folders (e.g. the cache)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [Path(dirpath, n) for n in sorted(filenames)
                if not n.startswith(".") and Path(n).suffix.lower() in VIDEO_EXTS]
    return out


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_folders(root: Path) -> tuple[list[Sample], list[str]]:
    """`root/<class>/**/<video>` or `root/{train,val,test}/<class>/**/<video>`."""
    top = _subdirs(root)
    split_dirs = [d for d in top if d.name.lower() in SPLIT_ALIASES]
    if split_dirs and len(split_dirs) == len(top):
        parts = [(SPLIT_ALIASES[d.name.lower()], d) for d in split_dirs]
    else:
        parts = [(None, root)]
    found: list[tuple[str, str | None, str]] = []   # (class, split, path)
    empty = []
    for split, folder in parts:
        for class_dir in _subdirs(folder):
            files = _media_files(class_dir)
            if not files:
                empty.append(str(class_dir))
            found += [(class_dir.name, split, str(p.resolve())) for p in files]
    if not found:
        raise DatasetError(f"{root}: no class folders with video files ({', '.join(sorted(VIDEO_EXTS))}) found")
    if empty:
        warnings.warn(f"{len(empty)} class folder(s) under {root} hold no video files and are ignored:\n"
                      + format_list(empty), stacklevel=3)
    classes = _class_order({c for c, _, _ in found})
    index = {c: i for i, c in enumerate(classes)}
    return [Sample(p, index[c], split) for c, split, p in found], classes


def cremad_speaker(path: str) -> str:
    """Actor id of a CREMA-D clip: the first field of `1001_DFA_ANG_XX`."""
    return Path(path).stem.split("_")[0]


def read_cremad(root: Path) -> tuple[list[Sample], list[str], list[str]]:
    """CREMA-D: `VideoFlash/<id>.flv` with audio from `AudioWAV/<id>.wav`; emotion = 3rd name field.

    Also returns the .flv files whose names do not parse, reported like missing files.
    """
    _need(root / "VideoFlash", root / "AudioWAV")
    videos = sorted(p for p in (root / "VideoFlash").iterdir() if p.suffix.lower() == ".flv")
    if not videos:
        raise DatasetError(f"{root / 'VideoFlash'}: no .flv files")
    classes = list(CREMAD_EMOTIONS)
    samples, bad = [], []
    for v in videos:
        fields = v.stem.split("_")
        if len(fields) != 4 or not fields[0].isdigit() or fields[2] not in CREMAD_EMOTIONS:
            bad.append(str(v))
            continue
        samples.append(Sample(str(v.resolve()), classes.index(fields[2]), None,
                              str((root / "AudioWAV" / f"{v.stem}.wav").resolve())))
    return samples, classes, bad


def _read_ave_list(path: Path) -> list[tuple[str, str]]:
    """(category, video id) per line of an AVE list file `Category&VideoID&Quality&Start&End`."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            fields = line.split("&")
            if len(fields) < 2:
                raise DatasetError(f"{path}, line {lineno}: expected Category&VideoID&Quality&StartTime&EndTime, "
                                   f"got {line!r}")
            if lineno == 1 and fields[0].strip().lower() == "category":
                continue   # header
            out.append((fields[0].strip(), fields[1].strip()))
    return out


def read_ave(root: Path) -> tuple[list[Sample], list[str]]:
    """AVE: `Annotations.txt` (+ optional train/val/testSet.txt), videos in `AVE/` or the root.

    The whole video is used; the annotated event segment (StartTime..EndTime) is not cut out.
    """
    _need(root / "Annotations.txt")
    entries = _read_ave_list(root / "Annotations.txt")
    if not entries:
        raise DatasetError(f"{root / 'Annotations.txt'}: no annotations")
    split_of: dict[str, str] = {}
    for split, name in AVE_SPLIT_FILES.items():
        if (root / name).is_file():
            split_of.update({vid: split for _, vid in _read_ave_list(root / name)})
    video_dir = root / "AVE" if (root / "AVE").is_dir() else root
    classes = sorted({c for c, _ in entries})
    index = {c: i for i, c in enumerate(classes)}
    samples = [Sample(str((video_dir / f"{vid}.mp4").resolve()), index[c], split_of.get(vid))
               for c, vid in entries]
    return samples, classes


def detect_layout(data: Path) -> str:
    """Which layout a data path is, by what it contains."""
    if data.is_file():
        if data.suffix.lower() == ".csv":
            return "manifest"
        raise DatasetError(f"{data}: a data file must be a .csv manifest")
    if not data.is_dir():
        raise DatasetError(f"{data}: no such file or folder")
    if (data / "manifest.csv").is_file():
        return "manifest"
    if (data / "VideoFlash").is_dir() and (data / "AudioWAV").is_dir():
        return "cremad"
    if (data / "Annotations.txt").is_file():
        return "ave"
    if _subdirs(data):
        return "folders"
    raise DatasetError(f"{data}: not a dataset. Expected one of: manifest.csv (path,label[,audio_path][,split]); "
                       f"class sub-folders of videos (optionally under train/val/test); CREMA-D "
                       f"(VideoFlash/ + AudioWAV/); AVE (Annotations.txt)")


# ---------------------------------------------------------------------------------------
# splits

def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"need 0 <= val_fraction, test_fraction and val+test < 1; "
                         f"got val={val_fraction}, test={test_fraction}")


def _cut(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(n_test, n_val) for n items; train keeps the rest, and at least one."""
    n_test = max(0, min(round(n * test_fraction), n - 1))
    n_val = max(0, min(round(n * val_fraction), n - n_test - 1))
    return n_test, n_val


def stratified_split(samples: list[Sample], *, seed: int, val_fraction: float, test_fraction: float) -> None:
    """Give each sample without a split one: per class, a seeded shuffle cut into test/val/train.

    Deterministic for a seed whatever the input order (samples are sorted by path first), and
    each class is shuffled with its own seed so adding a class does not reshuffle the others.
    """
    by_class: dict[int, list[Sample]] = {}
    for s in samples:
        if s.split is None:
            by_class.setdefault(s.label, []).append(s)
    for label, group in by_class.items():
        group.sort(key=lambda s: s.path)
        random.Random(f"{seed}:class:{label}").shuffle(group)
        n_test, n_val = _cut(len(group), val_fraction, test_fraction)
        for i, s in enumerate(group):
            s.split = "test" if i < n_test else "val" if i < n_test + n_val else "train"


def speaker_split(samples: list[Sample], speaker_of: Callable[[str], str], *, seed: int, val_fraction: float,
                  test_fraction: float) -> None:
    """Split by speaker: every speaker's samples land in one split (seeded shuffle of speakers)."""
    speakers = sorted({speaker_of(s.path) for s in samples})
    random.Random(f"{seed}:speakers").shuffle(speakers)
    n_test, n_val = _cut(len(speakers), val_fraction, test_fraction)
    # with few speakers, still give a non-empty split every asked-for fraction while train keeps one
    if test_fraction > 0 and n_test == 0 and len(speakers) >= 2:
        n_test = 1
    if val_fraction > 0 and n_val == 0 and len(speakers) - n_test >= 2:
        n_val = 1
    split_of = {spk: "test" if i < n_test else "val" if i < n_test + n_val else "train"
                for i, spk in enumerate(speakers)}
    for s in samples:
        s.split = split_of[speaker_of(s.path)]


# ---------------------------------------------------------------------------------------
# the entry point

def _report(msg: str, paths: list[str], skip_bad: bool) -> None:
    """Raise DatasetError naming the paths, or with skip_bad warn with the list."""
    if skip_bad:
        warnings.warn(f"{msg}; skipping them (skip_bad):\n{format_list(paths)}", stacklevel=3)
    else:
        raise DatasetError(f"{msg}:\n{format_list(paths)}\n(pass skip_bad / --skip-bad to skip them with a warning)")


def _bad_files(samples: list[Sample]) -> dict[int, str]:
    """Sample index -> why, for samples whose video or audio file is missing or empty."""
    bad = {}
    for i, s in enumerate(samples):
        for p in filter(None, (s.path, s.audio_path)):
            if not os.path.isfile(p):
                bad[i] = f"{p} (missing)"
                break
            if os.path.getsize(p) == 0:
                bad[i] = f"{p} (empty file)"
                break
    return bad


def load_dataset(data: str | os.PathLike, *, layout: str = "auto", split_seed: int = 0,
                 val_fraction: float = 0.1, test_fraction: float = 0.2, speaker_disjoint: bool = False,
                 skip_bad: bool = False) -> DatasetSpec:
    """Read a dataset folder (or manifest CSV) into labelled, split samples; checks files exist."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    _check_fractions(val_fraction, test_fraction)
    data = Path(data).expanduser().resolve()
    if layout == "auto":
        layout = detect_layout(data)
    elif not data.exists():
        raise DatasetError(f"{data}: no such file or folder")
    if speaker_disjoint and layout != "cremad":
        raise DatasetError(f"speaker_disjoint needs speaker ids, which only the cremad layout has "
                           f"(this dataset is {layout})")

    root = data
    misnamed: list[str] = []
    if layout == "manifest":
        csv_path = data if data.is_file() else data / "manifest.csv"
        root = csv_path.parent
        samples, classes = read_manifest(csv_path)
    elif layout == "folders":
        samples, classes = read_folders(root)
    elif layout == "cremad":
        samples, classes, misnamed = read_cremad(root)
    else:
        samples, classes = read_ave(root)

    dupes = sorted(p for p, n in Counter(s.path for s in samples).items() if n > 1)
    if dupes:
        raise DatasetError(f"{len(dupes)} path(s) listed more than once in {root}:\n{format_list(dupes)}")

    bad = _bad_files(samples)
    if bad or misnamed:
        total = len(samples) + len(misnamed)
        why = [f"{p} (name is not ACTOR_SENTENCE_EMOTION_LEVEL, EMOTION one of "
               f"{'/'.join(CREMAD_EMOTIONS)})" for p in misnamed] + list(bad.values())
        _report(f"{len(why)} of {total} samples of {root} are unusable (missing or empty files"
                f"{', or bad names' if misnamed else ''})", why, skip_bad)
        dropped = misnamed + [samples[i].path for i in sorted(bad)]
        samples = [s for i, s in enumerate(samples) if i not in bad]
        if not samples:
            raise DatasetError(f"{root}: no usable samples left after skipping {len(dropped)} bad ones")
    else:
        dropped = []

    if speaker_disjoint:
        speaker_split(samples, cremad_speaker, seed=split_seed, val_fraction=val_fraction,
                      test_fraction=test_fraction)
    else:
        stratified_split(samples, seed=split_seed, val_fraction=val_fraction, test_fraction=test_fraction)
    return DatasetSpec(root, samples, classes, layout, dropped)


__all__ = ["Sample", "DatasetSpec", "DatasetError", "load_dataset", "detect_layout", "read_manifest",
           "read_folders", "read_cremad", "read_ave", "stratified_split", "speaker_split",
           "cremad_speaker", "format_list", "SPLITS", "LAYOUTS", "VIDEO_EXTS", "CREMAD_EMOTIONS"]
