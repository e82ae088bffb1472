"""What to score: INPUT folders, files or manifests -> one Job per media file, with known labels.

Path rule (the `path` column of the output):
  * one INPUT: paths are relative to it (a folder or a manifest's folder); a single file is its name;
  * several INPUTs: each path is prefixed with its INPUT's name (`a/x.mp4` for `INPUT=data/a`;
    a single file stays its bare name), so rows from different roots never collide. Two INPUTs
    whose paths would clash (same folder name twice) are refused.
A file reached from two INPUTs is scored once, under the first.

Labels (for accuracy and the confusion matrix) and separate audio tracks come from the
dataset layout of a folder INPUT, read by training.datasets: a manifest.csv
(path,label[,audio_path][,split]), CREMA-D (VideoFlash/ + AudioWAV/), AVE, or class sub-folders.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from dimml.datasets import (VIDEO_EXTS, DatasetError, detect_layout, read_ave, read_cremad, read_folders,
                            read_manifest)

DEFAULT_EXTS = tuple(sorted(e.lstrip(".") for e in VIDEO_EXTS))


class InputError(ValueError):
    """An INPUT that cannot be scored as given (missing, empty, clashing names)."""


@dataclass(frozen=True)
class Job:
    """One file to score."""

    key: str                        # the output's `path`: relative, '/'-separated, unique
    path: str                       # absolute path of the media file
    audio_path: str | None = None   # separate audio track (CREMA-D, manifests with audio_path)
    truth: str | None = None        # the class the dataset layout gives the file, if any


def parse_exts(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """'mp4,.FLV' -> ('flv', 'mp4'); None -> DEFAULT_EXTS."""
    if text is None:
        return DEFAULT_EXTS
    items = text.split(",") if isinstance(text, str) else list(text)
    exts = sorted({e.strip().lstrip(".").lower() for e in items if e.strip()})
    if not exts:
        raise InputError("--ext lists no extension")
    return tuple(exts)


def walk_media(folder: Path, exts: Iterable[str], recursive: bool) -> list[Path]:
    """Media files under folder (sorted; hidden files and folders skipped, e.g. a dataset cache)."""
    suffixes = {"." + e for e in exts}
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if recursive else []
        out += [Path(dirpath, n) for n in sorted(filenames)
                if not n.startswith(".") and Path(n).suffix.lower() in suffixes]
    return out


def layout_labels(root: Path) -> tuple[dict[str, tuple[str, str | None]], str | None]:
    """{real path: (class name, audio path)} from the folder's dataset layout, and the layout name.

    Best effort: a folder that is no dataset simply has no labels (returns {}, None).
    """
    try:
        layout = detect_layout(root)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # e.g. "class folders without videos": irrelevant here
            if layout == "manifest":
                samples, classes = read_manifest(root / "manifest.csv" if root.is_dir() else root)
            elif layout == "cremad":
                samples, classes, _ = read_cremad(root)
            elif layout == "ave":
                samples, classes = read_ave(root)
            else:
                samples, classes = read_folders(root)
    except DatasetError:
        return {}, None
    return {os.path.realpath(s.path): (classes[s.label], s.audio_path) for s in samples}, layout


def _root_jobs(src: Path, exts: Sequence[str], recursive: bool) -> tuple[Path, list[tuple[Path, str | None, str | None]]]:
    """(root the keys are relative to, [(media path, audio path, truth)]) for one INPUT."""
    if src.is_dir():
        labels, _ = layout_labels(src)
        files = walk_media(src, exts, recursive)
        if not files:
            hint = ""
            if not recursive and walk_media(src, exts, True):
                hint = "; its sub-folders hold some: pass --recursive"
            raise InputError(f"{src}: no media files ({', '.join(exts)}){hint}")
        out = []
        for f in files:
            truth, audio = labels.get(os.path.realpath(f), (None, None))
            out.append((f, audio, truth))
        return src, out
    if src.suffix.lower() == ".csv":
        try:
            samples, classes = read_manifest(src)
        except DatasetError as e:
            raise InputError(str(e)) from None
        return src.parent, [(Path(s.path), s.audio_path, classes[s.label]) for s in samples]
    return src.parent, [(src, None, None)]


def find_jobs(inputs: Sequence[str | os.PathLike], *, recursive: bool = False,
              exts: Sequence[str] = DEFAULT_EXTS) -> list[Job]:
    """Every media file of the INPUTs (folders, media files, manifest .csv files), keyed by the path rule."""
    if not inputs:
        raise InputError("no INPUT given")
    roots = []
    for raw in inputs:
        src = Path(raw).expanduser()
        if not src.exists():
            raise InputError(f"{raw}: no such file or folder")
        roots.append(src.absolute())
    many = len(roots) > 1
    jobs: list[Job] = []
    seen_paths: set[str] = set()
    owner: dict[str, Path] = {}
    for src in roots:
        root, found = _root_jobs(src, exts, recursive)
        prefix = src.name if (many and (src.is_dir() or src.suffix.lower() == ".csv")) else ""
        if prefix and src.suffix.lower() == ".csv":
            prefix = src.parent.name
        for path, audio, truth in found:
            real = os.path.realpath(path)
            if real in seen_paths:
                continue
            rel = Path(os.path.relpath(path, root)).as_posix()
            key = f"{prefix}/{rel}" if prefix else rel
            if key in owner:
                raise InputError(f"{key!r} names a file under both {owner[key]} and {src}: give INPUTs "
                                 f"with distinct names (see the path rule in `score --help`)")
            owner[key] = src
            seen_paths.add(real)
            jobs.append(Job(key, os.path.abspath(path), audio, truth))
    return jobs


__all__ = ["Job", "InputError", "find_jobs", "walk_media", "layout_labels", "parse_exts", "DEFAULT_EXTS"]
