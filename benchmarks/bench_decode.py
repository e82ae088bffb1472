"""Decode time of one clip through dimml.media.decode_clip (the train/serve preprocessing).

Usage: taskset -c 0 python benchmarks/bench_decode.py [--repeat 30] [--fmt mp4|flv]
Writes a 3 s 480x360 30 fps clip (h264/aac or flv1/mp3) with PyAV, then times decode_clip.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from dimml.config import PREPROCESS_PRESETS
from dimml.media import decode_clip
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
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        path = make_clip(Path(d) / f"clip.{args.fmt}")
        for preset in ("resnet18", "tiny"):
            cfg = PREPROCESS_PRESETS[preset]
            decode_clip(path, cfg)  # warm-up
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                decode_clip(path, cfg)
                times.append((time.perf_counter() - t0) * 1000)
            times.sort()
            print(f"{args.fmt} 480x360 30fps 3s, preset {preset}: median {statistics.median(times):.1f} ms, "
                  f"p90 {times[int(0.9 * len(times)) - 1]:.1f} ms over {args.repeat}")


if __name__ == "__main__":
    main()
