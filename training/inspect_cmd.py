"""`python -m training inspect [FILE] [--source NAME=FILE ...] [--modalities M] [--json]`: show what the model would see."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

from dimml.media import MediaError, decode_sample
from dimml.modalities import DEFAULT_MODALITIES, KIND_PRESETS, VIDEO_FIELD, PreprocessConfig, preprocess_for


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="decode a sample's files and print streams and model-input shapes")
    p.add_argument("file", nargs="?", help="the video (with or without an audio track), or an audio-only file")
    p.add_argument("--source", action="append", default=[], metavar="NAME=FILE",
                   help="a modality's own file (an image; or e.g. audio=speech.wav instead of FILE's track)")
    p.add_argument("--modalities", default=DEFAULT_MODALITIES,
                   help=f"the modalities, e.g. visual,flow or front:image,rear:image (default {DEFAULT_MODALITIES})")
    p.add_argument("--preset", default="resnet18", choices=sorted(KIND_PRESETS),
                   help="preprocessing preset (default: resnet18, the papers' setting)")
    p.add_argument("--max-duration", type=float, help="maximum duration in seconds (default 600)")
    p.add_argument("--max-pixels", type=int, help="maximum frame pixel count (default 4096*4096)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def describe(files: dict[str, str], cfg: PreprocessConfig) -> dict:
    """Decode like training and serving do; report each source's streams, the arrays and timing."""
    t0 = time.perf_counter()
    clip = decode_sample(files, cfg, allow_missing=True)
    ms = (time.perf_counter() - t0) * 1000
    return {
        "sources": {f: {"file": files[f], "format": i.format, "duration_s": i.duration_s,
                        "streams": [dataclasses.asdict(s) for s in i.streams]} for f, i in clip.infos.items()},
        "modalities": list(clip.modalities),
        "arrays": {s.name: ({"shape": list(clip.arrays[s.name].shape), "dtype": str(clip.arrays[s.name].dtype)}
                            if s.name in clip.arrays else None) for s in cfg.modalities},
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
    print(f"  decoded in {d['decode_ms']} ms")


def run(args: argparse.Namespace) -> int:
    try:
        cfg = preprocess_for(args.preset, args.modalities)
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
    except (MediaError, ValueError) as e:
        cause = e.cause if isinstance(e, MediaError) else "usage"
        msg = {"error": str(e), "cause": cause} if args.json else f"error: {e}"
        print(json.dumps(msg) if args.json else msg, file=sys.stdout if args.json else sys.stderr)
        return 1
    if args.json:
        print(json.dumps(d))
    else:
        _print_text(d)
    return 0
