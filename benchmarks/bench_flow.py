"""DIS against TV-L1 (the UCF101 trees' algorithm) on the same clips, at the trees' 340x256.

    python benchmarks/bench_flow.py [--pairs 5] [--json out.json]

Synthetic 320x240 clips of a textured scene under known per-frame motions (translations of
several speeds, a rotation, a zoom), with sensor noise and an mpeg4 (xvid) encode as UCF101's
clips have, are decoded to grey at 340x256 as dimml.modalities.flow does,
and each consecutive pair's flow is computed by the OpenCV method dimml's flow kind runs, for both algorithms. It
prints, per clip: the mean end-point distance between DIS and TV-L1 (px of 340x256), each one's
end-point error against the true motion, the same distance after quantisation (uint8 units, what
the model sees), and the time per pair on one thread. Borders (a tenth each side) are left out:
neither method can see what enters the frame.
"""
from __future__ import annotations

import argparse
import json
import time

import cv2
import numpy as np

from dimml.modalities.flow import flow_method, quantise

VIDEO = (320, 240)
TREE = (340, 256)
MOTIONS = {   # name -> (2x3 affine per frame in video px, about the centre)
    "translate 2,1 px": ((0.0, 1.0, (2.0, 1.0))),
    "translate -4,3 px": ((0.0, 1.0, (-4.0, 3.0))),
    "translate 8,0 px": ((0.0, 1.0, (8.0, 0.0))),
    "rotate 1 deg": ((1.0, 1.0, (0.0, 0.0))),
    "zoom 2 %": ((0.0, 1.02, (0.0, 0.0))),
}


def scene(seed: int = 0) -> np.ndarray:
    """A grey texture with edges and blobs, larger than the frame so motion never shows its border."""
    rng = np.random.default_rng(seed)
    h, w = 3 * VIDEO[1], 3 * VIDEO[0]
    img = cv2.GaussianBlur((rng.random((h, w)) * 255).astype(np.uint8), (0, 0), 2.5)
    for _ in range(60):
        c = tuple(int(v) for v in rng.integers(0, 255, 1)) * 3
        cv2.circle(img, (int(rng.integers(0, w)), int(rng.integers(0, h))), int(rng.integers(5, 40)), c[:1], -1)
    return img


def affine(angle_deg: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    """3x3 matrix of one frame's motion about the video centre."""
    m = cv2.getRotationMatrix2D((VIDEO[0] / 2, VIDEO[1] / 2), angle_deg, scale)
    m[:, 2] += shift
    return np.vstack([m, [0, 0, 1]])


def clip(motion: np.ndarray, frames: int, seed: int) -> list[np.ndarray]:
    """Grey frames [240, 320]: the scene under motion^k, sampled about the scene's centre."""
    big = scene(seed)
    off = np.array([[1, 0, -VIDEO[0]], [0, 1, -VIDEO[1]], [0, 0, 1]], float)   # scene -> video coordinates
    out, m = [], np.eye(3)
    for _ in range(frames):
        out.append(cv2.warpAffine(big, (m @ off)[:2], VIDEO, flags=cv2.INTER_CUBIC))
        m = motion @ m
    return out


def through_xvid(frames: list[np.ndarray], noise: float, seed: int) -> list[np.ndarray]:
    """Sensor noise, then an mpeg4 (xvid) encode and decode at UCF101's 25 fps: the artefacts real clips have."""
    import io

    import av
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    with av.open(buf, "w", format="avi") as c:
        s = c.add_stream("mpeg4", rate=25)
        s.width, s.height, s.pix_fmt = VIDEO[0], VIDEO[1], "yuv420p"
        for f in frames:
            noisy = np.clip(f + rng.normal(0, noise, f.shape), 0, 255).astype(np.uint8)
            c.mux(s.encode(av.VideoFrame.from_ndarray(np.repeat(noisy[..., None], 3, -1), format="rgb24")))
        c.mux(s.encode(None))
    buf.seek(0)
    with av.open(buf) as c:
        return [f.to_ndarray(format="gray") for f in c.decode(video=0)]


def true_flow(motion: np.ndarray) -> np.ndarray:
    """[256, 340, 2] displacement of each 340x256 pixel from one frame to the next, in 340x256 px."""
    sx, sy = TREE[0] / VIDEO[0], TREE[1] / VIDEO[1]
    ys, xs = np.mgrid[0:TREE[1], 0:TREE[0]].astype(float)
    xv, yv = (xs + 0.5) / sx - 0.5, (ys + 0.5) / sy - 0.5
    nx = motion[0, 0] * xv + motion[0, 1] * yv + motion[0, 2]
    ny = motion[1, 0] * xv + motion[1, 1] * yv + motion[1, 2]
    return np.stack([(nx - xv) * sx, (ny - yv) * sy], axis=-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--noise", type=float, default=4.0, help="sensor noise (grey levels, sd) before the xvid encode")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cv2.setNumThreads(1)
    inner = (slice(TREE[1] // 10, -TREE[1] // 10), slice(TREE[0] // 10, -TREE[0] // 10))
    rows = []
    for i, (name, (angle, scale, shift)) in enumerate(MOTIONS.items()):
        motion = affine(angle, scale, shift)
        frames = through_xvid(clip(motion, args.pairs + 1, seed=i), args.noise, seed=i)
        grey = [cv2.resize(f, TREE, interpolation=cv2.INTER_CUBIC) for f in frames]
        truth = true_flow(motion)[inner]
        flows, seconds = {}, {}
        for algorithm in ("dis", "tvl1"):
            method = flow_method(algorithm)   # what dimml's flow kind runs (it then quantises)
            t0 = time.perf_counter()
            flows[algorithm] = np.stack([method.calc(grey[k], grey[k + 1], None) for k in range(args.pairs)])
            seconds[algorithm] = (time.perf_counter() - t0) / args.pairs
        epe = lambda a, b: float(np.linalg.norm(a - b, axis=-1).mean())
        d, t = flows["dis"][:, inner[0], inner[1]], flows["tvl1"][:, inner[0], inner[1]]
        q = np.abs(quantise(d, 20.0).astype(float) - quantise(t, 20.0).astype(float)).mean()
        rows.append({"clip": name, "dis_vs_tvl1_px": epe(d, t), "dis_epe_px": epe(d, truth[None]),
                     "tvl1_epe_px": epe(t, truth[None]), "dis_vs_tvl1_uint8": float(q),
                     "dis_ms_per_pair": 1000 * seconds["dis"], "tvl1_ms_per_pair": 1000 * seconds["tvl1"]})
        r = rows[-1]
        print(f"{name:>18}: DIS-TVL1 {r['dis_vs_tvl1_px']:.3f} px ({r['dis_vs_tvl1_uint8']:.2f} uint8); "
              f"EPE DIS {r['dis_epe_px']:.3f}, TV-L1 {r['tvl1_epe_px']:.3f} px; "
              f"{r['dis_ms_per_pair']:.0f} / {r['tvl1_ms_per_pair']:.0f} ms per pair", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
