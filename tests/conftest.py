"""Shared test constants and fixtures (tests/ is on sys.path: `from conftest import SETTINGS`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

# The four experiment settings every layer's tests are parametrised over (DI-MML's Table 2 + DGL's three).
SETTINGS = ("audio,visual", "visual,flow", "front:image,rear:image", "audio,visual,flow")


# --- media fixtures: real files, written with PyAV (video/audio) and OpenCV (still images)

def moving_texture(n: int, h: int = 48, w: int = 64, *, seed: int = 0, step: int = 3) -> np.ndarray:
    """uint8 [n, h, w, 3]: a random blocky texture scrolling `step` px right per frame."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8).repeat(4, 0).repeat(4, 1)[:h, :w]
    return np.stack([np.roll(base, step * i, axis=1) for i in range(n)])


def sine(seconds: float, sr: int = 16000, f: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * f * t)).astype(np.float32)


def write_image(path: str | Path, rgb: np.ndarray) -> Path:
    """Encode an RGB uint8 [h, w, 3] image; the format follows the extension (png, jpg, webp...)."""
    import cv2
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(path.suffix, np.ascontiguousarray(rgb[..., ::-1]))
    assert ok, path
    path.write_bytes(buf.tobytes())
    return path


def write_sample(root: str | Path, setting: str, *, seed: int = 0, seconds: float = 1.0, fps: int = 10,
                 video_ext: str = ".mp4") -> dict[str, str]:
    """Real source files of one sample of a setting, keyed by field ("video", or the image names)."""
    from dimml.modalities import parse_modalities
    from training.synth import write_clip
    root = Path(root)
    specs = parse_modalities(setting)
    files: dict[str, str] = {}
    if any(s.kind_obj.from_video for s in specs):
        with_audio = any(s.kind == "audio" for s in specs)
        path = root / f"clip{seed}{video_ext}"
        write_clip(path, moving_texture(int(seconds * fps), seed=seed), fps=fps,
                   audio=sine(seconds, f=220.0 + 40 * seed) if with_audio else None)
        files["video"] = str(path)
    rng = np.random.default_rng(1000 + seed)
    for s in specs:
        if not s.kind_obj.from_video:
            img = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8).repeat(4, 0).repeat(4, 1)
            files[s.name] = str(write_image(root / f"{s.name}{seed}.png", img))
    return files
