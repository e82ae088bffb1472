"""What to score: INPUT folders, files or manifests -> one Job per sample, with known labels.

A sample is one source file per field of the model (`video` for its video-derived modalities,
a modality's name for a file of its own). What an INPUT yields depends on those fields:
  * a folder holding a public dataset as distributed (CREMA-D, AVE, UCF101, ModelNet40), or class
    folders with no media files of their own at the top: exactly what its layout lists, with its
    own files (e.g. CREMA-D's separate audio) and its labels (every label of a file that the layout
    lists under several: an AVE video with two events is one sample, right if either);
  * another folder: walked for media files (videos, or images for a model without a video field;
    sub-folders with --recursive; symlinked folders are followed), each one sample; its layout (a
    manifest.csv, class folders) adds labels and own files;
  * a model reading own files only (e.g. front/rear images): a folder must be a dataset layout
    that names them (manifest.csv with `<name>_path` columns, ModelNet40 renders), or, for a
    model with a single field, is walked for its files;
  * a manifest .csv (`path` for the video and/or `<name>_path` columns, `label`): its rows;
  * a single media file: one sample of the model's only field.

Path rule (the `path` column of the output): the sample's key file (its video, else its first
file), and every other file of it in messages:
  * one INPUT: paths are relative to it (a folder or a manifest's folder); a single file is its name;
  * several INPUTs: each path is prefixed with its INPUT's name (`a/x.mp4` for `INPUT=data/a`;
    a single file stays its bare name), so rows from different roots never collide. Two INPUTs
    whose paths would clash (same folder name twice) are refused.
A sample reached from two INPUTs is scored once, under the first.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dimml.datasets import (
    IMAGE_EXTS,
    PUBLIC_LAYOUTS,
    VIDEO_EXTS,
    DatasetError,
    LayoutIncomplete,
    detect_layout,
    read_layout,
    read_manifest,
    walk_files,
)
from dimml.modalities import VIDEO_FIELD, PreprocessConfig

DEFAULT_EXTS = tuple(sorted(e.lstrip(".") for e in VIDEO_EXTS))
IMAGE_DEFAULT_EXTS = tuple(sorted(e.lstrip(".") for e in IMAGE_EXTS))


class InputError(ValueError):
    """An INPUT that cannot be scored as given (missing, empty, clashing names)."""


@dataclass(frozen=True)
class Job:
    """One sample to score."""

    key: str                                # the output's `path`: relative, '/'-separated, unique
    files: dict[str, str]                   # source field -> absolute path
    truth: tuple[str, ...] = ()             # the class(es) the dataset layout gives the sample (several: any is right)
    names: dict[str, str] = field(default_factory=dict)   # field -> display name (path rule)


def parse_exts(text: str | Sequence[str] | None, default: Sequence[str] = DEFAULT_EXTS) -> tuple[str, ...]:
    """'mp4,.FLV' -> ('flv', 'mp4'); None -> default."""
    if text is None:
        return tuple(default)
    items = text.split(",") if isinstance(text, str) else list(text)
    exts = sorted({e.strip().lstrip(".").lower() for e in items if e.strip()})
    if not exts:
        raise InputError("--ext lists no extension")
    return tuple(exts)


def default_exts(cfg: PreprocessConfig) -> tuple[str, ...]:
    """What a folder is walked for: videos for a model reading them, else image files."""
    return DEFAULT_EXTS if VIDEO_FIELD in cfg.fields else IMAGE_DEFAULT_EXTS


def walk_media(folder: Path, exts: Iterable[str], recursive: bool) -> list[Path]:
    """Media files under folder (dimml.datasets.walk_files: sorted, hidden skipped, symlinks followed)."""
    return walk_files(folder, {"." + e for e in exts}, recursive)


def _key_field(files: dict[str, str]) -> str:
    """The field that names a sample: its video, else its first file."""
    return VIDEO_FIELD if VIDEO_FIELD in files else next(iter(files))


def _wanted(files: dict[str, str], cfg: PreprocessConfig) -> dict[str, str]:
    """The fields of a layout's sample that the model reads (video, its modalities' own files)."""
    keep = {*cfg.fields, *cfg.names}
    return {f: p for f, p in files.items() if f in keep}


Found = list[tuple[dict[str, str], tuple[str, ...]]]   # [(files by field, true classes)]


def layout_samples(root: Path, cfg: PreprocessConfig) -> tuple[Found, str | None]:
    """The folder's dataset layout: its samples (files by field, classes) and the layout's name.

    A file the layout lists several times (an AVE video with two events) is one sample with every
    label. A folder that is no dataset has none ([], None); one holding part of a public dataset's
    layout (VideoFlash/ without AudioWAV/, ...), or whose layout cannot be read, is an InputError.
    """
    try:
        layout = detect_layout(root)
    except LayoutIncomplete as e:
        raise InputError(str(e)) from None
    except DatasetError:
        return [], None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # e.g. "class folders without videos": irrelevant here
            found = read_layout(root, layout, modalities=cfg)
    except DatasetError as e:
        if layout in PUBLIC_LAYOUTS or layout == "manifest":
            raise InputError(str(e)) from None
        return [], None
    return _by_file(found.samples, found.classes, cfg), found.layout


def _by_file(samples, classes: Sequence[str], cfg: PreprocessConfig) -> Found:
    """One entry per key file with every class the samples of it carry (in order), its model fields only."""
    by_file: dict[str, tuple[dict[str, str], list[str]]] = {}
    for s in samples:
        files = _wanted(s.files, cfg)
        if files:
            entry = by_file.setdefault(os.path.realpath(files[_key_field(files)]), (files, []))
            if classes[s.label] not in entry[1]:
                entry[1].append(classes[s.label])
    return [(f, tuple(t)) for f, t in by_file.values()]


def _root_jobs(src: Path, cfg: PreprocessConfig, exts: Sequence[str], recursive: bool) -> tuple[Path, Found]:
    """(root the keys are relative to, [(files by field, truth)]) for one INPUT."""
    fields = cfg.fields
    if src.is_dir():
        samples, layout = layout_samples(src, cfg)
        if layout == "folders":   # class folders of any video: only the asked-for extensions
            samples = [(f, t) for f, t in samples if Path(f[_key_field(f)]).suffix.lower().lstrip(".") in exts]
        if samples and (layout in PUBLIC_LAYOUTS or (layout == "folders" and not walk_media(src, exts, False))):
            return src, samples   # a dataset: what its layout lists
        if VIDEO_FIELD in fields:
            # every video of the folder; the layout adds labels and own files (by the video's real path)
            by_video = {os.path.realpath(f[VIDEO_FIELD]): (f, t) for f, t in samples if VIDEO_FIELD in f}
            videos = walk_media(src, exts, recursive)
            if not videos:
                hint = ""
                if not recursive and walk_media(src, exts, True):
                    hint = "; its sub-folders hold some: pass --recursive"
                raise InputError(f"{src}: no media files ({', '.join(exts)}){hint}")
            out = []
            for v in videos:
                files, truth = by_video.get(os.path.realpath(v), ({}, ()))
                out.append(({**files, VIDEO_FIELD: str(v)}, truth))
            return src, out
        if samples:   # a model without a video field: what the layout lists (manifest.csv, ModelNet40 renders)
            return src, samples
        if len(fields) == 1:
            found = walk_media(src, exts, recursive)
            if found:
                return src, [({fields[0]: str(p)}, ()) for p in found]
        raise InputError(f"{src}: this model reads {', '.join(fields)} per sample: give a dataset folder whose "
                         f"layout names them (manifest.csv with {', '.join(f'{f}_path' for f in fields)} columns, "
                         f"ModelNet40 renders){' or a folder of ' + '/'.join(exts) + ' files' if len(fields) == 1 else ''}")
    if src.suffix.lower() == ".csv":
        try:
            samples, classes = read_manifest(src)
        except DatasetError as e:
            raise InputError(str(e)) from None
        return src.parent, _by_file(samples, classes, cfg)
    if len(fields) != 1:
        raise InputError(f"{src}: this model reads {', '.join(fields)} per sample; a single file is one of "
                         "them: give a manifest .csv naming each sample's files")
    return src.parent, [({fields[0]: str(src)}, ())]


def find_jobs(inputs: Sequence[str | os.PathLike], cfg: PreprocessConfig | None = None, *,
              recursive: bool = False, exts: Sequence[str] | None = None) -> list[Job]:
    """Every sample of the INPUTs (folders, media files, manifest .csv files), keyed by the path rule.

    cfg: the model's preprocessing (its source fields decide what a sample is); default audio,visual.
    """
    if not inputs:
        raise InputError("no INPUT given")
    cfg = cfg or PreprocessConfig()
    exts = tuple(exts) if exts else default_exts(cfg)
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
        root, found = _root_jobs(src, cfg, exts, recursive)
        prefix = src.name if (many and (src.is_dir() or src.suffix.lower() == ".csv")) else ""
        if prefix and src.suffix.lower() == ".csv":
            prefix = src.parent.name

        def rel(path: str, root: Path = root, prefix: str = prefix) -> str:   # (bound now: one INPUT's)
            r = Path(os.path.relpath(path, root)).as_posix()
            return f"{prefix}/{r}" if prefix else r

        for files, truth in found:
            kf = _key_field(files)
            real = os.path.realpath(files[kf])
            if real in seen_paths:
                continue
            key = rel(files[kf])
            if key in owner:
                raise InputError(f"{key!r} names a file under both {owner[key]} and {src}: give INPUTs "
                                 f"with distinct names (see the path rule in `score --help`)")
            owner[key] = src
            seen_paths.add(real)
            jobs.append(Job(key, {f: os.path.abspath(p) for f, p in files.items()}, truth,
                            {f: rel(p) for f, p in files.items()}))
    return jobs


__all__ = ["Job", "InputError", "find_jobs", "walk_media", "layout_samples", "parse_exts", "default_exts",
           "DEFAULT_EXTS", "IMAGE_DEFAULT_EXTS"]
