"""`dimml inspect`: show what the model would see, before anyone starts a long run.

    dimml inspect FILE [--source NAME=FILE ...] [--modalities M] [--json]     one sample's files
    dimml inspect DATASET [--modalities M] [--preset P] [--split-file F ...] [--no-decode] [--json]

A dataset (a folder or a manifest .csv) is read exactly as `dimml train` reads it (the same
flags): its layout, its classes with their counts per split, and what is unusual about it (videos
with several labels, videos in two splits, names matched by letter case, rows in no split file,
classes without training samples). Then every sample is decoded into the training cache (so a
later `dimml train` with the same options starts from it), listing files that cannot be decoded
and files that decode with damage. Exit status: 0; 1 when the dataset cannot be read, when some
file cannot be decoded (unless --skip-bad), or with --strict when some decodes with damage.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import warnings
from pathlib import Path

from dimml.datasets import SPLITS, DatasetError, format_list
from dimml.media import MediaError, decode_sample
from dimml.modalities import DEFAULT_MODALITIES, VIDEO_FIELD, PreprocessConfig, preprocess_for
from dimml.presets import PRESETS


def register(sub: argparse._SubParsersAction) -> None:
    from training.config import DATA_FIELDS
    from training.fit_cmd import add_config_flags

    p = sub.add_parser("inspect", help="show what a media file, or a whole dataset, decodes to (or why it cannot)",
                       description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", nargs="?", help="a video (with or without an audio track), an audio-only file, "
                                           "or a dataset: a folder or a manifest .csv")
    p.add_argument("--source", action="append", default=[], metavar="NAME=FILE",
                   help="a modality's own file (an image; or e.g. audio=speech.wav instead of FILE's track)")
    p.add_argument("--modalities", default=DEFAULT_MODALITIES,
                   help=f"the modalities, e.g. visual,flow or front:image,rear:image (default {DEFAULT_MODALITIES})")
    p.add_argument("--preset", default="resnet18", choices=list(PRESETS),
                   help="preprocessing preset (default: resnet18, the papers' setting)")
    p.add_argument("--max-duration", type=float, help="maximum duration in seconds (default 600)")
    p.add_argument("--max-pixels", type=int, help="maximum frame pixel count (default 4096*4096)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="preprocess.MODALITY.PARAM=VALUE",
                   help="a preprocessing parameter, as `dimml train --set` (datasets)")
    p.add_argument("--no-decode", action="store_true", help="datasets: read the layout only, decode nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_config_flags(p, only=DATA_FIELDS)
    p.set_defaults(func=run)


# ---------------------------------------------------------------------------------------
# one sample

def describe(files: dict[str, str], cfg: PreprocessConfig) -> dict:
    """Decode like training and serving do; report each source's streams, the arrays, damage and timing."""
    t0 = time.perf_counter()
    clip = decode_sample(files, cfg, allow_missing=True)
    ms = (time.perf_counter() - t0) * 1000
    return {
        "sources": {f: {"file": files[f], "format": i.format, "duration_s": i.duration_s,
                        "streams": [dataclasses.asdict(s) for s in i.streams]} for f, i in clip.infos.items()},
        "modalities": list(clip.modalities),
        "arrays": {s.name: ({"shape": list(clip.arrays[s.name].shape), "dtype": str(clip.arrays[s.name].dtype)}
                            if s.name in clip.arrays else None) for s in cfg.modalities},
        "warnings": clip.warnings,
        "decode_ms": round(ms, 1),
    }


def _print_text(d: dict) -> None:
    for src in d["sources"].values():
        dur = f"{src['duration_s']:.2f} s" if src["duration_s"] is not None else "no duration"
        print(f"{src['file']}  [{src['format']}, {dur}]")
        for s in src["streams"]:
            if s["kind"] == "video":
                fps = f" {s['fps']:.2f} fps" if s["fps"] else ""
                print(f"  stream {s['index']}: video {s['codec']} {s['width']}x{s['height']}{fps}")
            else:
                print(f"  stream {s['index']}: audio {s['codec']} {s['sample_rate']} Hz, {s['channels']} ch")
    width = max(len(n) for n in d["arrays"])
    for name, a in d["arrays"].items():
        print(f"  {name + ':':<{width + 1}} " + (f"{a['shape']}  {a['dtype']}" if a else "none (not in the files)"))
    for w in d["warnings"]:
        print(f"  warning: damaged: {w}")
    print(f"  decoded in {d['decode_ms']} ms")


def _one_sample(args: argparse.Namespace, cfg: PreprocessConfig) -> tuple[dict, int]:
    files = {VIDEO_FIELD: args.file} if args.file else {}
    for item in args.source:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--source expects NAME=FILE, got {item!r}")
        files[name] = path
    if not files:
        raise ValueError("give FILE and/or --source NAME=FILE")
    limits = {k: v for k, v in (("max_duration_s", args.max_duration), ("max_pixels", args.max_pixels))
              if v is not None}
    d = describe(files, cfg.override(limits))
    return d, 1 if args.strict and d["warnings"] else 0


# ---------------------------------------------------------------------------------------
# a dataset

def is_dataset(path: str | None) -> bool:
    """A folder or a manifest .csv (anything else is one sample's file)."""
    return bool(path) and (os.path.isdir(path) or path.lower().endswith(".csv"))


def inspect_dataset(args: argparse.Namespace) -> tuple[dict, int]:
    """Read the dataset as `dimml train` would (and decode it into the training cache); the summary and exit code."""
    from training.config import DATA_FIELDS, TrainConfig
    from training.fit_cmd import config_flags, parse_sets

    _, preprocess = parse_sets(args.sets)
    cfg = TrainConfig(data=args.file, out="", preset=args.preset, modalities=args.modalities, preprocess=preprocess,
                      **{k: v for k, v in config_flags(args, DATA_FIELDS).items() if v is not None})
    run_cfg = cfg.preprocess_config()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the summary says all of it
        spec = cfg.load_dataset(run_cfg)
    out = spec.summary()
    out["modalities"] = list(run_cfg.names)
    status = 0
    if not args.no_decode:
        from training.cache import build_cache, default_cache_dir
        cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir(spec.root)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cache = build_cache(spec.samples, run_cfg, cache_dir, workers=cfg.decode_workers, skip_bad=True,
                                progress=not args.no_progress)
        out["media"] = {"cache": str(cache.directory), "decoded": len(spec.samples) - len(cache.skipped),
                        "undecodable": [{"sample": k, "error": e} for k, e in cache.skipped],
                        "damaged": [{"sample": k, "warnings": w} for k, w in cache.damaged]}
        if (cache.skipped and not cfg.skip_bad) or (cache.damaged and cfg.strict):
            status = 1
    return out, status


def _print_dataset(d: dict) -> None:
    print(f"{d['root']}: {d['layout']} layout, {d['samples']} samples, {len(d['classes'])} classes "
          f"(modalities {', '.join(d['modalities'])})")
    width = max([len("class")] + [len(c) for c in d["classes"]])
    print(f"  {'class':<{width}}  " + "  ".join(f"{s:>6}" for s in SPLITS))
    for c, counts in d["classes"].items():
        print(f"  {c:<{width}}  " + "  ".join(f"{counts[s]:>6}" for s in SPLITS))
    print(f"  {'total':<{width}}  " + "  ".join(f"{d['splits'][s]:>6}" for s in SPLITS))
    for note in d["notes"]:
        print(f"  note: {note}")
    media = d.get("media")
    if media is None:
        print("  media: not decoded (--no-decode)")
        return
    print(f"  media: {media['decoded']} of {d['samples']} decoded into {media['cache']}")
    if media["undecodable"]:
        print(f"  {len(media['undecodable'])} cannot be decoded (training stops unless --skip-bad):")
        print(format_list([f"{x['sample']} ({x['error']})" for x in media["undecodable"]], limit=20))
    if media["damaged"]:
        print(f"  {len(media['damaged'])} decode with damage (trained on with a warning each; --strict refuses):")
        print(format_list([w for x in media["damaged"] for w in x["warnings"]], limit=20))


def run(args: argparse.Namespace) -> int:
    try:
        if is_dataset(args.file):
            if args.source:
                raise ValueError("--source is for one sample's files, not a dataset")
            d, status = inspect_dataset(args)
        else:
            d, status = _one_sample(args, preprocess_for(args.preset, args.modalities))
    except (MediaError, ValueError, OSError) as e:   # DatasetError is a ValueError
        cause = e.cause if isinstance(e, MediaError) else "dataset" if isinstance(e, DatasetError) else "usage"
        msg = " ".join(str(e).split()) if args.json else str(e)
        print(json.dumps({"error": msg, "cause": cause}) if args.json else f"error: {msg}",
              file=sys.stdout if args.json else sys.stderr)
        return 1
    if args.json:
        print(json.dumps(d))
    elif "layout" in d:
        _print_dataset(d)
    else:
        _print_text(d)
    return status
