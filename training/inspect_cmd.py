"""`python -m training inspect FILE [--audio FILE] [--json]`: show what the model would see."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

from dimml.config import PREPROCESS_PRESETS, PreprocessConfig
from dimml.media import MediaError, decode_clip


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="decode a media file and print streams and model-input shapes")
    p.add_argument("file", help="video (with or without an audio track) or audio-only file")
    p.add_argument("--audio", help="separate audio file, used instead of FILE's audio track")
    p.add_argument("--preset", default="resnet18", choices=sorted(PREPROCESS_PRESETS),
                   help="preprocessing preset (default: resnet18, the papers' setting)")
    p.add_argument("--max-duration", type=float, help="maximum duration in seconds (default 600)")
    p.add_argument("--max-pixels", type=int, help="maximum frame pixel count (default 4096*4096)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def describe(file: str, audio: str | None, cfg: PreprocessConfig) -> dict:
    """Decode like training and serving do; report streams, duration, shapes and timing."""
    t0 = time.perf_counter()
    clip = decode_clip(file, cfg, audio=audio, allow_missing=True)
    ms = (time.perf_counter() - t0) * 1000
    out = {
        "file": file,
        "format": clip.info.format,
        "duration_s": clip.info.duration_s,
        "streams": [dataclasses.asdict(s) for s in clip.info.streams],
        "modalities": list(clip.modalities),
        "spectrogram": list(clip.spectrogram.shape) if clip.spectrogram is not None else None,
        "frames": list(clip.frames.shape) if clip.frames is not None else None,
        "decode_ms": round(ms, 1),
    }
    if clip.audio_info is not None:
        out["audio_file"] = audio
        out["audio_streams"] = [dataclasses.asdict(s) for s in clip.audio_info.streams]
    return out


def _print_text(d: dict) -> None:
    dur = f"{d['duration_s']:.2f} s" if d["duration_s"] is not None else "unknown"
    print(f"{d['file']}  [{d['format']}, {dur}]")
    for s in d["streams"] + d.get("audio_streams", []):
        if s["kind"] == "video":
            fps = f"{s['fps']:.2f} fps" if s["fps"] else "? fps"
            print(f"  stream {s['index']}: video {s['codec']} {s['width']}x{s['height']} {fps}")
        else:
            print(f"  stream {s['index']}: audio {s['codec']} {s['sample_rate']} Hz, {s['channels']} ch")
    print(f"  spectrogram: {d['spectrogram'] or 'none (no audio)'}  float32")
    print(f"  frames:      {d['frames'] or 'none (no video)'}  uint8")
    print(f"  decoded in {d['decode_ms']} ms")


def run(args: argparse.Namespace) -> int:
    cfg = PREPROCESS_PRESETS[args.preset]
    if args.max_duration is not None:
        cfg = cfg.replace(max_duration_s=args.max_duration)
    if args.max_pixels is not None:
        cfg = cfg.replace(max_pixels=args.max_pixels)
    try:
        d = describe(args.file, args.audio, cfg)
    except MediaError as e:
        msg = {"error": str(e), "cause": e.cause} if args.json else f"error: {e}"
        print(json.dumps(msg) if args.json else msg, file=sys.stdout if args.json else sys.stderr)
        return 1
    if args.json:
        print(json.dumps(d))
    else:
        _print_text(d)
    return 0
