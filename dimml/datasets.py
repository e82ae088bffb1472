"""Dataset readers: a data folder or manifest -> labelled samples, each a set of source files.

Layouts: a manifest CSV (`path` for the video, `<name>_path` for a modality's own file, `label`,
optional `split`), class folders of videos (optionally under train/val/test), CREMA-D, AVE,
UCF101 (class folders of .avi with `trainlist0N.txt` / `testlist0N.txt`, optional pre-extracted
flow) and ModelNet40's MVCNN 12-view renders (two views as two image modalities).

Every reader returns samples whose `files` are absolute paths keyed by source field ("video",
or a modality's name for a file of its own: `PreprocessConfig.fields`). `load_dataset` checks
the files exist, keeps the fields the run's modalities read, and gives every sample a split:
the layout's, or a seeded class-stratified one (`stratified_split`, the one split function
training's validation carve-out uses too). Missing files are never dropped silently: they raise
`DatasetError` naming them, or with skip_bad a warning lists them.

Scoring and `export verify` read datasets through this module, so it is part of the core and
never imports `training`.
"""
from __future__ import annotations

import csv
import os
import random
import re
import warnings
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dimml.modalities import BUILTIN_NAMES, VIDEO_FIELD, PreprocessConfig, check_name

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "dev": "val", "test": "test", "testing": "test"}
VIDEO_EXTS = {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".flv", ".mpg", ".mpeg", ".ts", ".3gp"}
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
LAYOUTS = ("auto", "manifest", "folders", "cremad", "ave", "ucf101", "modelnet40")
PUBLIC_LAYOUTS = ("cremad", "ave", "ucf101", "modelnet40")   # the public datasets' own layouts
CREMAD_EMOTIONS = ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD")
CREMAD_DIRS = ("VideoFlash", "AudioWAV")           # the videos, their own audio files
AVE_SPLIT_FILES = {"train": "trainSet.txt", "val": "valSet.txt", "test": "testSet.txt"}
UCF_LIST_DIRS = (".", "ucfTrainTestlist")          # where UCF101's split lists may be
UCF_VIDEO_DIRS = ("UCF-101", ".")                  # where its class folders may be
UCF_FLOW_DIRS = ("flow", "tvl1_flow")              # pre-extracted flow: <dir>/u/<stem>/, <dir>/v/<stem>/
UCF_SPLIT_IDS = (1, 2, 3)
# ModelNet40 MVCNN 12-view renders: `<class>/<split>/<object>.obj.shaded_v0XX.png`. The authors'
# code takes view 1 as the front and view 7 (the opposite side) as the rear.
MODELNET_VIEWS = (1, 7)
MODELNET_NAMES = ("front", "rear")                 # the image modalities' names when no config is given
MODELNET_FILE = re.compile(r"^(?P<object>.+)\.obj\.shaded_v(?P<view>\d{3})\.png$", re.IGNORECASE)
MANIFEST_PATH = "path"                             # the manifest column of the video
MANIFEST_SUFFIX = "_path"                          # `<name>_path`: a modality's own file
LIST_MAX = 10   # how many offending paths an error or warning names
BUILTIN_OF_KIND = {k: n for n, k in BUILTIN_NAMES.items()}   # kind -> its built-in modality name


class DatasetError(ValueError):
    """A dataset that cannot be read as asked (bad layout, missing or undecodable files)."""


class LayoutIncomplete(DatasetError):
    """A folder holding part of a known layout (CREMA-D's VideoFlash/ without AudioWAV/, ...)."""


@dataclass
class Sample:
    """One labelled sample: its source files (absolute paths keyed by field), label and split."""

    files: dict[str, str]           # "video" and/or modality names -> absolute path (a file, or a flow folder)
    label: int                      # index into DatasetSpec.classes
    split: str | None               # "train" | "val" | "test"
    tag: str = ""                   # which row, for a file a layout lists more than once (AVE: its category)

    @property
    def path(self) -> str:
        """The file that names the sample: its video, else its first file."""
        return self.files.get(VIDEO_FIELD) or next(iter(self.files.values()))

    @property
    def key(self) -> str:
        """The sample's identity: its path, with `#tag` for a file listed more than once."""
        return f"{self.path}#{self.tag}" if self.tag else self.path


@dataclass
class DatasetSpec:
    """A readable dataset: its samples, class names (label order) and where it came from."""

    root: Path
    samples: list[Sample]
    classes: list[str]
    layout: str = ""
    dropped: list[str] = field(default_factory=list)   # keys of samples skipped (skip_bad), already warned about
    notes: list[str] = field(default_factory=list)     # what is unusual about the dataset, one line each (counts)

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

    def summary(self) -> dict:
        """What `dimml inspect DATASET` and the training log show: layout, classes with their
        counts per split, how many samples have each source field (a flow tree shows as "flow"),
        and the notes (JSON-ready)."""
        counts = self.counts()
        return {"root": str(self.root), "layout": self.layout, "samples": len(self.samples),
                "classes": {c: {split: counts[split][i] for split in SPLITS} for i, c in enumerate(self.classes)},
                "splits": {split: sum(counts[split]) for split in SPLITS},
                "sources": dict(Counter(f for s in self.samples for f in s.files)),
                "notes": list(self.notes), "dropped": len(self.dropped)}


@dataclass
class Layout:
    """What a layout reader found, before any file check or split: samples, classes, unusable names."""

    root: Path
    layout: str
    samples: list[Sample]
    classes: list[str]
    misnamed: list[str] = field(default_factory=list)   # "path (why)" of files the layout cannot use
    notes: list[str] = field(default_factory=list)      # what is unusual, one line each (DatasetSpec.notes)


def format_list(items: list[str], limit: int = LIST_MAX) -> str:
    """A readable bulleted list of at most `limit` items, noting how many more there are."""
    lines = [f"  {x}" for x in items[:limit]]
    if len(items) > limit:
        lines.append(f"  ... and {len(items) - limit} more")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# helpers

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


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def walk_files(folder: Path, exts: Iterable[str] = VIDEO_EXTS, recursive: bool = True) -> list[Path]:
    """Files with one of `exts` (".mp4", ...) under folder, sorted; hidden files and folders (e.g. the
    cache) skipped; symlinked folders followed, each real folder once (no loop through a link cycle)."""
    exts = {e.lower() for e in exts}
    out = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if recursive else []
        out += [Path(dirpath, n) for n in sorted(filenames)
                if not n.startswith(".") and Path(n).suffix.lower() in exts]
    return out


# ---------------------------------------------------------------------------------------
# layouts: each returns samples with absolute paths, and splits where the layout has them

def manifest_field(column: str) -> str | None:
    """The source field a manifest column holds: `path` -> "video", `<name>_path` -> name; else None."""
    if column == MANIFEST_PATH:
        return VIDEO_FIELD
    if column.endswith(MANIFEST_SUFFIX):
        name = column[: -len(MANIFEST_SUFFIX)]
        try:
            return check_name(name)
        except ValueError as e:
            raise DatasetError(f"manifest column {column!r}: {e} (the video's column is `path`)") from None
    return None


def manifest_column(field: str) -> str:
    """The manifest column of a source field: "video" -> `path`, a modality's own file -> `<name>_path`."""
    return MANIFEST_PATH if field == VIDEO_FIELD else f"{field}{MANIFEST_SUFFIX}"


def read_manifest(csv_path: Path) -> tuple[list[Sample], list[str]]:
    """`label[,split]` plus `path` and/or `<name>_path` columns; paths relative to the CSV's folder or absolute."""
    _need(csv_path)
    base = csv_path.parent
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        try:
            fields = {c: fld for c in columns if (fld := manifest_field(c))}
        except DatasetError as e:
            raise DatasetError(f"{csv_path}: {e}") from None
        missing = [c for c in ("label",) if c not in columns] + ([] if fields else ["path (or <name>_path)"])
        if missing:
            raise DatasetError(f"{csv_path}: missing required column(s) {missing}; found {columns} (need label, "
                               f"a `path` column for the video and/or `<name>_path` columns, optionally split)")
        # the video first, then own files in column order: `Sample.key` is the video when there is one
        order = sorted(fields, key=lambda c: c != MANIFEST_PATH)
        rows = []
        for lineno, raw in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
            if not any(row.values()):
                continue   # blank line
            where = f"{csv_path}, line {lineno}"
            files = {fields[c]: _abs(base, row[c]) for c in order if row.get(c)}
            if not files or not row["label"]:
                raise DatasetError(f"{where}: empty label, or no file in {', '.join(order)}")
            rows.append((files, row["label"], _split_name(row.get("split", ""), where)))
    if not rows:
        raise DatasetError(f"{csv_path}: the manifest lists no samples")
    classes = _class_order({r[1] for r in rows})
    index = {c: i for i, c in enumerate(classes)}
    return [Sample(files, index[lab], split) for files, lab, split in rows], classes


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
            files = walk_files(class_dir)
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
    return [Sample({VIDEO_FIELD: p}, index[c], split) for c, split, p in found], classes


def cremad_speaker(path: str) -> str:
    """Actor id of a CREMA-D clip: the first field of `1001_DFA_ANG_XX`."""
    return Path(path).stem.split("_")[0]


def read_cremad(root: Path, audio_name: str | None = BUILTIN_OF_KIND["audio"]) -> tuple[list[Sample], list[str], list[str]]:
    """CREMA-D: `VideoFlash/<id>.flv` with its own audio `AudioWAV/<id>.wav`; emotion = 3rd name field.

    The wav is the own file of the audio modality `audio_name` (None: not used). Also returns
    the .flv files whose names do not parse, reported like missing files.
    """
    _need(*(root / d for d in CREMAD_DIRS))
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
        files = {VIDEO_FIELD: str(v.resolve())}
        if audio_name:
            files[audio_name] = str((root / "AudioWAV" / f"{v.stem}.wav").resolve())
        samples.append(Sample(files, classes.index(fields[2]), None))
    return samples, classes, bad


@dataclass(frozen=True)
class AveRow:
    """One row of an AVE list: `Category&VideoID&Quality&StartTime&EndTime`."""

    category: str
    video: str
    segment: str      # "StartTime&EndTime" (the annotated event; the whole video is used)
    text: str = field(default="", compare=False)   # the line as written


def _read_ave_list(path: Path) -> list[AveRow]:
    """The rows of an AVE list file (Annotations.txt has a header line, the split files do not)."""
    out = []
    with open(path, encoding="utf-8-sig") as f:   # universal newlines: LF and CRLF copies alike
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            fields = [x.strip() for x in line.split("&")]
            if len(fields) < 2 or not fields[0] or not fields[1]:
                raise DatasetError(f"{path}, line {lineno}: expected Category&VideoID&Quality&StartTime&EndTime, "
                                   f"got {line!r}")
            if lineno == 1 and fields[0].lower() == "category":
                continue   # header
            out.append(AveRow(fields[0], fields[1], "&".join(fields[3:5]), line))
    return out


def read_ave(root: Path) -> tuple[list[Sample], list[str], list[str]]:
    """AVE: `Annotations.txt` (+ `trainSet.txt` / `valSet.txt` / `testSet.txt`), videos `AVE/<VideoID>.mp4`.

    Every list row is one sample, as the AVE reference code reads the lists: a video with two
    events is two samples (one per category, key `<video>#<category>`), and one listed in two
    split files is in both splits. With split files, their rows are the samples (Annotations.txt
    rows in none of them are left out, counted in the notes); without, the Annotations.txt rows
    are, split later. The whole video is used; the annotated segment is not cut out. The DI-MML
    authors' loader differs: it keeps one sample per video per split, the first row's label.
    Returns (samples, classes, notes).
    """
    annotations = root / "Annotations.txt"
    if not annotations.is_file():
        present = [n for n in AVE_SPLIT_FILES.values() if (root / n).is_file()]
        raise LayoutIncomplete(f"{root}: looks like AVE ({', '.join(present) or 'AVE/'}) but Annotations.txt is "
                           "missing (it comes with the split files in AVE_Dataset.zip)")
    listed = _read_ave_list(annotations)
    if not listed:
        raise DatasetError(f"{annotations}: no annotations")
    split_rows = {split: _read_ave_list(root / name) for split, name in AVE_SPLIT_FILES.items()
                  if (root / name).is_file()}
    notes: list[str] = []
    if split_rows:
        rows = [(r, split) for split, rs in split_rows.items() for r in rs]
        unsplit = Counter(listed) - Counter(r for r, _ in rows)
        if unsplit:
            notes.append(f"{sum(unsplit.values())} Annotations.txt row(s) are in no split file "
                         f"({', '.join(AVE_SPLIT_FILES[s] for s in split_rows)}): left out, e.g. "
                         f"{next(iter(unsplit)).text!r}")
    else:
        rows = [(r, None) for r in listed]
    # identical rows in one split are one sample
    seen: set[tuple[AveRow, str | None]] = set()
    unique = []
    for row in rows:
        if row not in seen:
            seen.add(row)
            unique.append(row)
    if len(unique) < len(rows):
        notes.append(f"{len(rows) - len(unique)} row(s) listed twice in the same split: kept once")
    video_dir = root / "AVE" if (root / "AVE").is_dir() else root
    classes = sorted({r.category for r in listed} | {r.category for r, _ in unique})   # Annotations.txt's, at least
    index = {c: i for i, c in enumerate(classes)}
    categories: dict[str, set[str]] = {}
    splits_of: dict[str, set[str | None]] = {}
    per_label: Counter = Counter()
    for r, split in unique:
        categories.setdefault(r.video, set()).add(r.category)
        splits_of.setdefault(r.video, set()).add(split)
        per_label[(r.video, r.category)] += 1
    samples = []
    for r, split in unique:
        tag = ""
        if len(categories[r.video]) > 1 or per_label[(r.video, r.category)] > 1:
            tag = r.category if per_label[(r.video, r.category)] == 1 else f"{r.category}@{split}"
        samples.append(Sample({VIDEO_FIELD: str((video_dir / f"{r.video}.mp4").resolve())},
                              index[r.category], split, tag))
    multi = sorted(v for v, c in categories.items() if len(c) > 1)
    if multi:
        notes.append(f"{len(multi)} video(s) carry several labels (events of different categories), one sample "
                     f"per label, e.g. {multi[0]}: {', '.join(sorted(categories[multi[0]]))}")
    crossed = sorted(v for v, sp in splits_of.items() if len(sp) > 1)
    if crossed:
        notes.append(f"{len(crossed)} video(s) are in two splits (with different labels), e.g. {crossed[0]} in "
                     f"{' and '.join(sorted(str(x) for x in splits_of[crossed[0]]))}")
    return samples, classes, notes


def _ucf_list(root: Path, name: str) -> Path | None:
    for d in UCF_LIST_DIRS:
        if (root / d / name).is_file():
            return root / d / name
    return None


def is_ucf101(root: Path) -> bool:
    return any(_ucf_list(root, f"trainlist0{i}.txt") for i in UCF_SPLIT_IDS)


class CaseFolding:
    """Finds a path whose parts may differ in letter case from the name given (cached listings).

    UCF101's lists name `HandstandPushups/v_HandstandPushups_g08_c01.avi` in some copies (the
    DI-MML authors' edited lists) while the file is `v_HandStandPushups_g08_c01.avi`, and its TV-L1
    tree spells the folders `v_HandstandPushups_...`: on a case-sensitive disk an exact lookup
    loses the class.
    """

    def __init__(self) -> None:
        self._listing: dict[Path, dict[str, str]] = {}

    def _names(self, folder: Path) -> dict[str, str]:
        if folder not in self._listing:
            try:
                self._listing[folder] = {n.lower(): n for n in sorted(os.listdir(folder))}
            except OSError:
                self._listing[folder] = {}
        return self._listing[folder]

    def find(self, base: Path, rel: str) -> Path | None:
        """base/rel if it exists, else the one path under base equal to it but for case; None if neither."""
        exact = base / rel
        if exact.exists():
            return exact
        here = base
        for part in Path(rel).parts:
            real = self._names(here).get(part.lower())
            if real is None:
                return None
            here = here / real
        return here


def read_ucf101(root: Path, split_id: int = 1, flow_name: str | None = BUILTIN_OF_KIND["flow"]
                ) -> tuple[list[Sample], list[str], list[str]]:
    """UCF101: `UCF-101/<class>/<video>.avi` listed by `ucfTrainTestlist/trainlist0N.txt` / `testlist0N.txt`.

    The lists may sit in the root or `ucfTrainTestlist/` (CRLF or LF); the test list has no
    labels: every label comes from the class folder. Class order: `classInd.txt` when present,
    else sorted names. A listed video that is not there under its exact name is matched to a file
    whose name differs only in case (counted in the notes). Pre-extracted flow
    (`<root>/{flow,tvl1_flow}/u/<video stem>/`, `v/` beside `u/`; folder names matched the same
    way) becomes the own source of the flow modality `flow_name` (None: not used): files[flow_name]
    = that `u/<stem>` folder. Returns (samples, classes, notes).
    """
    if split_id not in UCF_SPLIT_IDS:
        raise DatasetError(f"UCF101 split_id must be one of {UCF_SPLIT_IDS}, got {split_id}")
    lists = {split: _ucf_list(root, f"{split}list0{split_id}.txt") for split in ("train", "test")}
    missing = [f"{split}list0{split_id}.txt" for split, p in lists.items() if p is None]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise LayoutIncomplete(f"{root}: looks like UCF101 but {' and '.join(missing)} {verb} missing (looked in "
                           f"{', '.join(str(root / d) for d in UCF_LIST_DIRS)}; the lists come in "
                           "UCF101TrainTestSplits-RecognitionTask.zip as ucfTrainTestlist/)")
    video_dir = next(root / d for d in UCF_VIDEO_DIRS if (root / d).is_dir())
    entries: list[tuple[str, str]] = []   # (relative video path, split)
    for split, path in lists.items():
        with open(path, encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, start=1):
                parts = line.split()
                if not parts:
                    continue
                rel = parts[0].replace("\\", "/")
                if "/" not in rel:
                    raise DatasetError(f"{path}, line {lineno}: expected <class>/<video>.avi, got {line.strip()!r}")
                entries.append((rel, split))
    if not entries:
        raise DatasetError(f"{root}: the split-{split_id} lists name no videos")
    names = {rel.split("/")[0] for rel, _ in entries}
    class_ind = _ucf_list(root, "classInd.txt")
    if class_ind is not None:
        ind = {}
        with open(class_ind, encoding="utf-8-sig") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2 and parts[0].isdigit():
                    ind[parts[1]] = int(parts[0])
        unknown = sorted(names - set(ind))
        if unknown:
            raise DatasetError(f"{class_ind}: the split lists name class(es) it does not: {', '.join(unknown[:LIST_MAX])}")
        classes = sorted(ind, key=ind.get)
    else:
        classes = sorted(names)
    index = {c: i for i, c in enumerate(classes)}
    folding = CaseFolding()
    flow_dirs = [root / d for d in UCF_FLOW_DIRS if flow_name and (root / d / "u").is_dir()]
    samples, by_case, flow_by_case = [], [], []
    flow_found = 0
    for rel, split in entries:
        video = folding.find(video_dir, rel)
        if video is None:
            video = video_dir / rel          # missing: the file check names it
        elif video != video_dir / rel:
            by_case.append(f"{rel} -> {video.relative_to(video_dir).as_posix()}")
        files = {VIDEO_FIELD: str(video.resolve())}
        for d in flow_dirs:
            u_dir = folding.find(d / "u", video.stem)
            if u_dir is not None and u_dir.is_dir():
                files[flow_name] = str(u_dir.resolve())
                flow_found += 1
                if u_dir.name != video.stem:
                    flow_by_case.append(f"{video.stem} -> {u_dir.name}")
                break
        samples.append(Sample(files, index[rel.split("/")[0]], split))
    notes = []
    if by_case:
        notes.append(f"{len(by_case)} list entr(y/ies) name a video only by a different letter case: matched, "
                     f"e.g. {by_case[0]}")
    if flow_by_case:
        notes.append(f"{len(flow_by_case)} pre-extracted flow folder(s) differ from their video's name in letter "
                     f"case: matched, e.g. {flow_by_case[0]}")
    if flow_dirs and flow_found < len(samples):
        notes.append(f"pre-extracted flow ({', '.join(str(d) for d in flow_dirs)}) for {flow_found} of "
                     f"{len(samples)} videos; the others' flow is computed from the video")
    return samples, classes, notes


def is_modelnet40(root: Path) -> bool:
    """Class folders holding train/ or test/ folders of `*.obj.shaded_v0XX.png` renders."""
    for class_dir in _subdirs(root)[:3]:
        for split_dir in _subdirs(class_dir):
            if split_dir.name.lower() in SPLIT_ALIASES and any(
                    MODELNET_FILE.match(p.name) for p in split_dir.iterdir()):
                return True
    return False


def read_modelnet40(root: Path, names: Sequence[str] = MODELNET_NAMES) -> tuple[list[Sample], list[str]]:
    """ModelNet40 MVCNN 12-view renders: `<class>/<split>/<object>.obj.shaded_v0XX.png`.

    Each object is one sample; names[0] gets view 1 (front) and names[1] view 7 (rear), as the
    authors' code picks them. A view the object lacks is reported as a missing file.
    """
    if not 1 <= len(names) <= len(MODELNET_VIEWS):
        raise DatasetError(f"the modelnet40 layout gives {len(MODELNET_VIEWS)} views (front = v001, rear = v007); "
                           f"the run asks for {len(names)} image modalities ({', '.join(names)})")
    found: dict[tuple[str, str, str], dict[int, str]] = {}   # (class, split, object) -> view -> path
    for class_dir in _subdirs(root):
        for split_dir in _subdirs(class_dir):
            split = SPLIT_ALIASES.get(split_dir.name.lower())
            if split is None:
                continue
            for p in sorted(split_dir.iterdir()):
                m = MODELNET_FILE.match(p.name)
                if m:
                    found.setdefault((class_dir.name, split, m["object"]), {})[int(m["view"])] = str(p.resolve())
    if not found:
        raise DatasetError(f"{root}: no <class>/<train|test>/<object>.obj.shaded_v0XX.png renders found")
    classes = _class_order({c for c, _, _ in found})
    index = {c: i for i, c in enumerate(classes)}
    samples = []
    for (cls, split, obj), views in sorted(found.items()):
        # a view the object lacks: the path it should have, so the file check names it
        base = Path(next(iter(views.values()))).parent
        files = {name: views.get(v, str(base / f"{obj}.obj.shaded_v{v:03d}.png")) for name, v in zip(names, MODELNET_VIEWS)}
        samples.append(Sample(files, index[cls], split))
    return samples, classes


UCF_VIDEO_NAME = re.compile(r"^v_[A-Za-z]+_g\d\d_c\d\d\.avi$")   # UCF101's v_<Class>_gGG_cCC.avi


def _looks_like_ucf101(data: Path) -> bool:
    """UCF101's videos (UCF-101/, or class folders of v_<Class>_gGG_cCC.avi) whatever the lists."""
    if (data / "UCF-101").is_dir():
        return True
    for class_dir in _subdirs(data)[:3]:
        if any(UCF_VIDEO_NAME.match(n) for n in sorted(os.listdir(class_dir))[:5]):
            return True
    return False


def detect_layout(data: Path) -> str:
    """Which layout a data path is, by what it contains.

    A folder holding part of a known layout (CREMA-D's VideoFlash/ without AudioWAV/, UCF101's
    videos without their split lists, AVE's split files without Annotations.txt) is an error
    naming the missing part, never class folders read by accident (a one-class "dataset").
    """
    if data.is_file():
        if data.suffix.lower() == ".csv":
            return "manifest"
        raise DatasetError(f"{data}: a data file must be a .csv manifest")
    if not data.is_dir():
        raise DatasetError(f"{data}: no such file or folder")
    if (data / "manifest.csv").is_file():
        return "manifest"
    cremad = [(data / n).is_dir() for n in CREMAD_DIRS]
    if all(cremad):
        return "cremad"
    if any(cremad):
        have, need = (CREMAD_DIRS[0], CREMAD_DIRS[1]) if cremad[0] else (CREMAD_DIRS[1], CREMAD_DIRS[0])
        raise LayoutIncomplete(f"{data}: looks like CREMA-D ({have}/) but {need}/ is missing (CREMA-D needs both "
                           f"{CREMAD_DIRS[0]}/*.flv and {CREMAD_DIRS[1]}/*.wav)")
    if (data / "Annotations.txt").is_file() or any((data / n).is_file() for n in AVE_SPLIT_FILES.values()):
        return "ave"
    if is_ucf101(data) or _looks_like_ucf101(data):
        return "ucf101"
    if _subdirs(data):
        return "modelnet40" if is_modelnet40(data) else "folders"
    raise DatasetError(f"{data}: not a dataset. Expected one of: manifest.csv (label[,split] with path and/or "
                       f"<name>_path columns); class sub-folders of videos (optionally under train/val/test); "
                       f"CREMA-D (VideoFlash/ + AudioWAV/); AVE (Annotations.txt); UCF101 (UCF-101/ with "
                       f"ucfTrainTestlist/trainlist0N.txt); ModelNet40 renders (<class>/<split>/*.obj.shaded_v0XX.png)")


def image_names(modalities: PreprocessConfig | None) -> tuple[str, ...]:
    """The run's image-file modalities in order (the modelnet40 views' names); front, rear without a config."""
    if modalities is None:
        return MODELNET_NAMES
    return tuple(s.name for s in modalities.modalities if not s.kind_obj.from_video)


def kind_name(modalities: PreprocessConfig | None, kind: str) -> str | None:
    """The name of the run's modality of a kind (a layout's own file for it goes there): the
    built-in name without a config; None when the run has none (the layout's file is not used)."""
    if modalities is None:
        return BUILTIN_OF_KIND.get(kind)
    names = [s.name for s in modalities.modalities if s.kind == kind]
    if len(names) > 1:
        raise DatasetError(f"the layout has one {kind} file per sample, the run has {len(names)} {kind} "
                           f"modalities ({', '.join(names)})")
    return names[0] if names else None


def read_layout(data: str | os.PathLike, layout: str = "auto", *, split_id: int = 1,
                modalities: PreprocessConfig | None = None) -> Layout:
    """Read a dataset's samples as its layout lists them (no file checks, no split): the one dispatcher."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    data = Path(data).expanduser().resolve()
    if layout == "auto":
        layout = detect_layout(data)
    elif not data.exists():
        raise DatasetError(f"{data}: no such file or folder")
    root, misnamed, notes = data, [], []
    if layout == "manifest":
        csv_path = data if data.is_file() else data / "manifest.csv"
        root = csv_path.parent
        samples, classes = read_manifest(csv_path)
    elif layout == "folders":
        samples, classes = read_folders(root)
    elif layout == "cremad":
        samples, classes, bad = read_cremad(root, kind_name(modalities, "audio"))
        misnamed = [f"{p} (name is not ACTOR_SENTENCE_EMOTION_LEVEL, EMOTION one of "
                    f"{'/'.join(CREMAD_EMOTIONS)})" for p in bad]
    elif layout == "ave":
        samples, classes, notes = read_ave(root)
    elif layout == "ucf101":
        samples, classes, notes = read_ucf101(root, split_id, kind_name(modalities, "flow"))
    else:
        samples, classes = read_modelnet40(root, image_names(modalities))
    return Layout(root, layout, samples, classes, misnamed, notes)


# ---------------------------------------------------------------------------------------
# splits: the one rule for how many items of a group go to test and val, and the one shuffle

def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"need 0 <= val_fraction, test_fraction and val+test < 1; "
                         f"got val={val_fraction}, test={test_fraction}")


def split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(n_test, n_val) of n items: rounded fractions, at least one for every asked-for split
    while train keeps at least one (test first), so small classes still get a test and a val item."""
    n_test = max(round(n * test_fraction), int(test_fraction > 0))
    n_val = max(round(n * val_fraction), int(val_fraction > 0))
    n_test = max(0, min(n_test, n - 1))
    n_val = max(0, min(n_val, n - 1 - n_test))
    return n_test, n_val


def _shuffle_cut(items: list[str], seed_text: str, val_fraction: float, test_fraction: float) -> dict[str, str]:
    """item -> split: the sorted items shuffled by a seed string, cut into test, val, train."""
    items = sorted(items)
    random.Random(seed_text).shuffle(items)
    n_test, n_val = split_sizes(len(items), val_fraction, test_fraction)
    return {x: "test" if i < n_test else "val" if i < n_test + n_val else "train" for i, x in enumerate(items)}


def stratified_split(keys: Sequence[str], labels: Sequence[Hashable], *, seed: int, val_fraction: float,
                     test_fraction: float) -> list[str]:
    """The split of each item: per label, a seeded shuffle of its keys cut into test / val / train.

    THE class-stratified split (datasets without one, training's validation carve-out with
    test_fraction=0, the synthetic corpus). Deterministic for a seed whatever the input order
    (keys are sorted first; they must be distinct), and each class is shuffled with its own
    seed so adding a class does not reshuffle the others.
    """
    _check_fractions(val_fraction, test_fraction)
    if len(keys) != len(labels):
        raise ValueError(f"{len(keys)} keys but {len(labels)} labels")
    by_label: dict[Hashable, list[str]] = {}
    for k, lab in zip(keys, labels):
        by_label.setdefault(lab, []).append(k)
    split_of: dict[str, str] = {}
    for lab, group in by_label.items():
        split_of.update(_shuffle_cut(group, f"{seed}:class:{lab}", val_fraction, test_fraction))
    return [split_of[k] for k in keys]


def group_split(keys: Sequence[str], group_of: Callable[[str], str], *, seed: int, val_fraction: float,
                test_fraction: float) -> list[str]:
    """The split of each item when whole groups (speakers) go to one split: a seeded shuffle of the groups."""
    _check_fractions(val_fraction, test_fraction)
    split_of = _shuffle_cut(list({group_of(k) for k in keys}), f"{seed}:speakers", val_fraction, test_fraction)
    return [split_of[group_of(k)] for k in keys]


# ---------------------------------------------------------------------------------------
# the entry point

def _report(msg: str, items: list[str], skip_bad: bool) -> None:
    """Raise DatasetError naming the items, or with skip_bad warn with the list."""
    if skip_bad:
        warnings.warn(f"{msg}; skipping them (skip_bad):\n{format_list(items)}", stacklevel=3)
    else:
        raise DatasetError(f"{msg}:\n{format_list(items)}\n(pass skip_bad / --skip-bad to skip them with a warning)")


def read_split_files(paths: Sequence[str | os.PathLike]) -> dict[str, str]:
    """Clip name (file stem) -> split, from split files (`--split-file`).

    Two formats, told apart by the first row:
    - a CSV with a header holding `split` and `name` (or `path`) columns: one clip per row,
      e.g. `name,split` / `1001_DFA_ANG_XX,train`;
    - headerless `<name>,<anything>` rows (the DI-MML authors' CREMA-D `train.csv` / `test.csv`,
      `<clip>,<label>`): every clip goes to the split named by the file's stem (train, val/valid,
      test; e.g. train.csv -> train).
    Names are compared by stem: "1001_DFA_ANG_XX", "1001_DFA_ANG_XX.flv" and "VideoFlash/1001_DFA_ANG_XX.flv"
    all name the same clip. A clip listed in two splits is an error.
    """
    out: dict[str, str] = {}
    for path in paths:
        path = Path(path)
        _need(path)
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
        if not rows:
            raise DatasetError(f"{path}: empty split file")
        head = [c.strip().lower() for c in rows[0]]
        if "split" in head:
            col = next((c for c in ("name", "path", "clip") if c in head), None)
            if col is None:
                raise DatasetError(f"{path}: a split file with a header needs a `name` (or `path`) column "
                                   f"beside `split`, got {rows[0]}")
            ni, si = head.index(col), head.index("split")
            pairs = [(r[ni], _split_name(r[si], f"{path} line {i + 2}")) for i, r in enumerate(rows[1:])]
        else:
            split = SPLIT_ALIASES.get(path.stem.lower())
            if split is None:
                raise DatasetError(f"{path}: a headerless split file must be named after its split "
                                   f"(train.csv, val.csv, test.csv), or have `name` and `split` columns")
            pairs = [(r[0], split) for r in rows]
        for name, split in pairs:
            stem = Path(name.strip().replace("\\", "/")).stem
            if not stem or split is None:
                continue
            if out.get(stem, split) != split:
                raise DatasetError(f"{path}: clip {stem!r} is listed in both {out[stem]} and {split}")
            out[stem] = split
    return out


def apply_split_files(samples: list[Sample], paths: Sequence[str | os.PathLike],
                      notes: list[str] | None = None) -> list[Sample]:
    """Samples with the split the split files give their path's stem; unlisted samples are left out
    (a warning says how many, and a line in `notes`), as are listed clips the dataset lacks."""
    splits = read_split_files(paths)
    kept, unlisted = [], []
    for s in samples:
        split = splits.get(Path(s.path).stem)
        if split is None:
            unlisted.append(s.key)
            continue
        s.split = split
        kept.append(s)
    if not kept:
        raise DatasetError(f"no sample is listed in the split file(s) {', '.join(map(str, paths))} "
                           f"(names are matched by file stem, e.g. {Path(samples[0].path).stem if samples else '?'})")
    lines = []
    if unlisted:
        warnings.warn(f"{len(unlisted)} sample(s) not listed in the split file(s), left out:\n{format_list(unlisted)}",
                      stacklevel=3)
        lines.append(f"{len(unlisted)} sample(s) in no split file ({', '.join(Path(p).name for p in paths)}): "
                     f"left out, e.g. {unlisted[0]}")
    missing = len(splits) - len({Path(s.path).stem for s in kept})
    if missing > 0:
        warnings.warn(f"{missing} clip(s) listed in the split file(s) are not in the dataset", stacklevel=3)
        lines.append(f"{missing} clip(s) listed in the split file(s) are not in the dataset")
    if notes is not None:
        notes += lines
    return kept


def _why_unusable(path: str) -> str | None:
    """Why a source path cannot be read ("missing", "empty file", "empty folder"), or None."""
    if os.path.isdir(path):
        return None if any(os.scandir(path)) else "empty folder"
    if not os.path.isfile(path):
        return "missing"
    return "empty file" if os.path.getsize(path) == 0 else None


def _select_fields(samples: list[Sample], cfg: PreprocessConfig, root: Path, layout: str) -> dict[int, str]:
    """Keep the fields the run's modalities read; sample index -> why, for samples lacking a modality's source.

    A video-derived modality reads its own file when the sample has one, else the video; any
    other kind needs its own file. A modality no sample has a source for is a DatasetError.
    """
    wanted = {VIDEO_FIELD} if any(s.kind_obj.from_video for s in cfg.modalities) else set()
    wanted |= set(cfg.names)
    lacking: dict[int, str] = {}
    sourced = Counter()
    for i, smp in enumerate(samples):
        smp.files = {f: p for f, p in smp.files.items() if f in wanted}
        for spec in cfg.modalities:
            if spec.name in smp.files or (spec.kind_obj.from_video and VIDEO_FIELD in smp.files):
                sourced[spec.name] += 1
            elif i not in lacking:
                lacking[i] = f"{smp.key if smp.files else f'sample {i + 1}'} (no source for modality {spec.name!r})"
    for spec in cfg.modalities:
        if not sourced[spec.name]:
            where = (f"a `path` column (video) or a `{spec.name}{MANIFEST_SUFFIX}` column" if spec.kind_obj.from_video
                     else f"a `{spec.name}{MANIFEST_SUFFIX}` column") if layout == "manifest" else f"the {layout} layout has none"
            raise DatasetError(f"{root}: no sample has a source for modality {spec.name!r} ({spec.kind}): {where}")
    return lacking


def load_dataset(data: str | os.PathLike, *, layout: str = "auto", split_seed: int = 0,
                 val_fraction: float = 0.1, test_fraction: float = 0.2, speaker_disjoint: bool = False,
                 skip_bad: bool = False, split_id: int = 1,
                 modalities: PreprocessConfig | None = None,
                 split_files: Sequence[str | os.PathLike] = (), min_classes: int = 2) -> DatasetSpec:
    """Read a dataset folder (or manifest CSV) into labelled, split samples; checks their files exist.

    modalities: the run's PreprocessConfig. With it, samples keep only the fields its modalities
    read, every modality must have a source in every sample, and the modelnet40 views take its
    image modalities' names. Without it, every field a layout gives is kept and checked.
    split_id: which of UCF101's three official splits (1..3).
    split_files: files that assign each clip its split (read_split_files; e.g. the DI-MML authors'
    CREMA-D train.csv and test.csv); they override the layout's splits, unlisted samples are left out.
    min_classes: fewer classes with samples is a DatasetError (2 for training: a one-class "dataset"
    is a folder read wrongly; 1 where a subset is fine, e.g. checking an exported bundle).
    """
    _check_fractions(val_fraction, test_fraction)
    found = read_layout(data, layout, split_id=split_id, modalities=modalities)
    root, samples, layout = found.root, found.samples, found.layout
    if speaker_disjoint and layout != "cremad":
        raise DatasetError(f"speaker_disjoint needs speaker ids, which only the cremad layout has "
                           f"(this dataset is {layout})")

    dupes = sorted(k for k, n in Counter(s.key for s in samples).items() if n > 1)
    if dupes:   # (a layout that lists a file several times tags its samples: only a manifest gets here)
        raise DatasetError(f"{len(dupes)} path(s) listed more than once in {root}:\n{format_list(dupes)}")

    bad: dict[int, str] = _select_fields(samples, modalities, root, layout) if modalities is not None else {}
    for i, s in enumerate(samples):
        if i not in bad:
            for p in s.files.values():
                why = _why_unusable(p)
                if why:
                    bad[i] = f"{p} ({why})"
                    break
    dropped: list[str] = []
    if bad or found.misnamed:
        total = len(samples) + len(found.misnamed)
        why = found.misnamed + [bad[i] for i in sorted(bad)]
        _report(f"{len(why)} of {total} samples of {root} are unusable (missing or empty files"
                f"{', or bad names' if found.misnamed else ''})", why, skip_bad)
        dropped = [m.rsplit(" (", 1)[0] for m in found.misnamed] + [samples[i].key for i in sorted(bad) if samples[i].files]
        samples = [s for i, s in enumerate(samples) if i not in bad]
        if not samples:
            raise DatasetError(f"{root}: no usable samples left after skipping {len(why)} bad ones")

    notes = list(found.notes)
    if split_files:
        samples = apply_split_files(samples, split_files, notes)
    todo = [s for s in samples if s.split is None]
    if speaker_disjoint:
        splits = group_split([s.key for s in todo], cremad_speaker, seed=split_seed,
                             val_fraction=val_fraction, test_fraction=test_fraction)
    else:
        splits = stratified_split([s.key for s in todo], [s.label for s in todo], seed=split_seed,
                                  val_fraction=val_fraction, test_fraction=test_fraction)
    for s, split in zip(todo, splits):
        s.split = split
    spec = DatasetSpec(root, samples, found.classes, layout, dropped, notes)
    _check_classes(spec, min_classes)
    return spec


def _check_classes(spec: DatasetSpec, min_classes: int) -> None:
    """Fewer than min_classes classes with samples is an error; a class without training samples is a note."""
    counts = spec.counts()
    present = [c for i, c in enumerate(spec.classes) if any(counts[s][i] for s in SPLITS)]
    if len(present) < min_classes:
        raise DatasetError(f"{spec.root}: read as {spec.layout!r}, the dataset has {len(present)} class(es) "
                           f"({', '.join(present) or 'none'}); a classifier needs at least two. Is this the "
                           "dataset's top folder? (`dimml inspect` shows how a folder is read)")
    untrained = [c for i, c in enumerate(spec.classes) if not counts["train"][i]]
    if untrained:
        spec.notes.append(f"{len(untrained)} class(es) have no training samples: {', '.join(untrained[:LIST_MAX])}")
    if spec.dropped:
        spec.notes.append(f"{len(spec.dropped)} sample(s) skipped as unusable (skip_bad)")


__all__ = ["Sample", "DatasetSpec", "DatasetError", "LayoutIncomplete", "Layout", "walk_files", "load_dataset",
           "read_layout", "detect_layout", "read_manifest", "read_folders", "read_split_files", "apply_split_files",
           "read_cremad", "read_ave", "read_ucf101", "read_modelnet40", "manifest_field", "manifest_column",
           "image_names", "kind_name", "stratified_split", "group_split", "split_sizes", "cremad_speaker",
           "format_list", "SPLITS", "LAYOUTS", "VIDEO_EXTS", "IMAGE_EXTS", "CREMAD_EMOTIONS", "MODELNET_VIEWS",
           "MODELNET_NAMES", "UCF_FLOW_DIRS", "PUBLIC_LAYOUTS"]
