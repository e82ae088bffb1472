"""Decode time of one clip through dimml.media.decode_clip (the train/serve preprocessing).

Usage: taskset -c 0 python benchmarks/bench_decode.py [--repeat 30] [--fmt mp4|flv] [--size 480x360]
           [--modalities audio,visual] [--modalities flow ...] [--preset resnet18 --preset tiny]
Writes a 3 s 30 fps clip (h264/aac or flv1/mp3, moving texture, stereo 44.1 kHz) with PyAV, then
times decode_clip for every (preset, modalities) pair, all in one run, interleaved round by
round so that a change in machine load hits every configuration alike.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from dimml.media import decode_clip
from dimml.modalities import preprocess_for
from training.synth import write_clip


def make_clip(path: Path, seconds: float = 3.0, w: int = 480, h: int = 360, fps: int = 30) -> Path:
    rng = np.random.default_rng(0)
    n = int(seconds * fps)
    base = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    frames = np.stack([np.roll(base, 4 * i, axis=1) for i in range(n)])   # moving texture
    t = np.arange(int(seconds * 44100)) / 44100
    audio = np.stack([0.3 * np.sin(2 * np.pi * 440 * t), 0.3 * np.sin(2 * np.pi * 660 * t)]).astype(np.float32)
    return write_clip(path, frames, fps=fps, audio=audio, sample_rate=44100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--fmt", default="mp4", choices=["mp4", "flv"])
    ap.add_argument("--size", default="480x360", help="WIDTHxHEIGHT of the written clip")
    ap.add_argument("--modalities", action="append",
                    help="modalities to decode (repeatable: each is timed; default audio,visual)")
    ap.add_argument("--preset", action="append", help="preprocessing preset(s) (default: resnet18 and tiny)")
    args = ap.parse_args()
    w, h = (int(x) for x in args.size.split("x"))
    configs = {(p, m): preprocess_for(p, m) for p in args.preset or ["resnet18", "tiny"]
               for m in args.modalities or ["audio,visual"]}
    with tempfile.TemporaryDirectory() as d:
        path = make_clip(Path(d) / f"clip.{args.fmt}", w=w, h=h)
        for cfg in configs.values():
            decode_clip(path, cfg)  # warm-up
        times: dict[tuple[str, str], list[float]] = {k: [] for k in configs}
        for _ in range(args.repeat):
            for key, cfg in configs.items():
                t0 = time.perf_counter()
                decode_clip(path, cfg)
                times[key].append((time.perf_counter() - t0) * 1000)
        for (preset, mods), ts in times.items():
            ts.sort()
            shapes = ", ".join(f"{s.name} {list(s.shape)}" for s in configs[(preset, mods)].modalities)
            print(f"{args.fmt} {w}x{h} 30fps 3s, preset {preset}, {mods} ({shapes}): median "
                  f"{statistics.median(ts):.1f} ms, p90 {ts[int(0.9 * len(ts)) - 1]:.1f} ms over {args.repeat}")


if __name__ == "__main__":
    main()
