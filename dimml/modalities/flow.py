"""Kind `flow`: optical flow of the video track, computed while decoding or read from a pre-extracted tree.

One convention for both sources, the one of the UCF101 TV-L1 trees users train on
(Feichtenhofer's `tvl1_flow/{u,v}/<video>/frame%06d.jpg`, made by his gpu_flow tool):

  1. the frames are converted to grey and resized (bicubic) so that their short side is
     `measure_side` px (320x240 -> 340x256: factor max(S/w, S/h), sizes floored to even numbers);
  2. the flow of each consecutive pair is measured at that size (`algorithm`: OpenCV's DIS, or
     TV-L1 as the trees were made), so displacements are in the tree's pixels;
  3. the displacement is clipped to +-bound px and quantised to uint8,
     round((d + bound) * 255 / (2 * bound)) (0 = -bound, 255 = +bound, 128 = no motion);
  4. the u and v planes are resized (bilinear) to H x W.

A tree's JPEGs are the output of step 3, so reading a tree is step 4 alone: the same function
resizes both, and a model trained on a tree sees the same values from a video (up to JPEG loss
and the flow algorithm; tests/test_flow_convention.py measures both). Array [K, H, W, 2] uint8
(u = horizontal, v = vertical). Encoder: a ResNet with a 2-channel stem per flow frame, averaged
over time and space (the authors' UCF101 model).

`measure_side = 0` measures at H x W (dimml before this convention: bundles whose manifest has
no `measure_side` decode so, see `legacy_params`). DIS (MEDIUM preset, deterministic for a given
OpenCV build) is the default: TV-L1 on a CPU takes about 1.5 s per 340x256 pair against DIS's
20 ms (BENCHMARKS.md), so it is for matching a distributed tree's algorithm, not for serving.

Choices:
  * the K + 1 frames are the consecutive decoded frames starting with the one on screen at
    duration / 2 - (K + 1) / (2 fps), so the window is centred on the clip (from the start when
    the clip is shorter than the window); a tree's K images are the middle ones of its folder;
  * a video with fewer than K + 1 frames repeats its last frame: the pairs past the end are
    "no motion" (128).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from dimml.modalities import Kind, register_kind

EXTRACTED_FRAME = re.compile(r"frame(\d+)\.jpg$")   # a pre-extracted flow image's name
ALGORITHMS = ("dis", "tvl1")


@dataclass(frozen=True)
class FlowParams:
    num_pairs: int = 10           # K: the paper's 2 x 10 x 224 x 224 input
    height: int = 224
    width: int = 224
    bound: float = 20.0           # displacement clipped to +-bound pixels before quantising
    measure_side: int = 256       # short side the displacement is measured at (the trees' 256); 0: at H x W
    algorithm: str = "dis"        # dis | tvl1 (the trees' algorithm; slow on a CPU)

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"flow algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        if self.measure_side < 0:
            raise ValueError(f"flow measure_side must be >= 0 (0: measure at height x width), got {self.measure_side}")


def measure_size(width: int, height: int, p: FlowParams) -> tuple[int, int]:
    """(w, h) the flow of a width x height video is measured at: short side measure_side, even sizes."""
    if not p.measure_side or not width or not height:
        return p.width, p.height
    factor = max(p.measure_side / width, p.measure_side / height)
    even = lambda x: max(2, int(x * factor) // 2 * 2)
    return even(width), even(height)


@register_kind
class Flow(Kind):
    name = "flow"
    params_cls = FlowParams
    legacy_params = {"measure_side": 0}   # saved before the tree convention: measured at H x W
    from_video = True
    dtype = cache_dtype = "uint8"
    encoder = "stack"
    pixel_mean, pixel_std = (127.5, 127.5), (127.5, 127.5)   # uint8 -> [-1, 1]
    augment = False      # a flip would have to negate u; the authors do not augment flow
    onnx_input = "flow"
    missing_cause = "no_video"

    def shape(self, p: FlowParams) -> tuple[int, ...]:
        return (p.num_pairs, p.height, p.width, 2)

    def decode(self, src, p: FlowParams, limits, name: str):
        """A video (path, bytes, file) -> flow of K frame pairs; a `u/<video>` folder -> its images."""
        if isinstance(src, (str, os.PathLike)) and os.path.isdir(src):
            return read_extracted(Path(src), p, limits, name)
        from dimml import media
        with media.opened_video(src, name, limits) as (c, info, stream, tally):
            count = p.num_pairs + 1
            v = info.first("video")
            start = media.video_duration(info) / 2 - (count / (2 * v.fps) if v.fps else 0.0)
            frames = media.some_frames(media.consecutive_frames(c, stream, max(0.0, start), count, tally), name)
            w, h = measure_size(v.width, v.height, p)
            grey: dict[int, np.ndarray] = {}   # by frame identity: a repeated last frame is converted once
            for f in frames:
                if id(f) not in grey:
                    # contiguous: PyAV returns a view into padded rows for some widths, the flow needs dense ones
                    grey[id(f)] = np.ascontiguousarray(media.frame_array(
                        f, format="gray", width=w, height=h, interpolation="BICUBIC" if p.measure_side else "BILINEAR"))
        return fit_planes(flow_stack([grey[id(f)] for f in frames], p.bound, p.algorithm), p), info

    def source_files(self, path: str) -> list[str]:
        """A pre-extracted `u/<video>` folder is read with its `v/<video>` sibling: both folders' files."""
        if os.path.isdir(path) and Path(path).parent.name == "u":
            v_dir = Path(path).parent.parent / "v" / Path(path).name
            return super().source_files(path) + (super().source_files(str(v_dir)) if v_dir.is_dir() else [])
        return super().source_files(path)


def quantise(d: np.ndarray, bound: float) -> np.ndarray:
    """Displacement (pixels) -> uint8 as the UCF101 distribution: round((clip(d) + bound) * 255 / (2 bound))."""
    scaled = (np.clip(d, -bound, bound) + bound) * (255.0 / (2.0 * bound))
    return np.rint(scaled).astype(np.uint8)


def flow_method(algorithm: str):
    """An OpenCV optical-flow object: DIS (MEDIUM preset) or Dual TV-L1 (OpenCV's defaults)."""
    import cv2  # imported on use: only the flow kind needs OpenCV
    if algorithm == "dis":
        return cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    if not hasattr(cv2, "optflow"):
        raise RuntimeError("TV-L1 flow needs OpenCV's contrib build: pip install opencv-contrib-python-headless "
                           "(dimml's own dependency; a plain opencv-python installed over it hides it)")
    return cv2.optflow.DualTVL1OpticalFlow_create()


def flow_stack(grey: list[np.ndarray], bound: float, algorithm: str = "dis") -> np.ndarray:
    """K + 1 grey frames [h, w] uint8 -> quantised flow [K, h, w, 2] uint8 of each consecutive pair."""
    method = flow_method(algorithm)
    h, w = grey[0].shape
    out = np.empty((len(grey) - 1, h, w, 2), np.uint8)
    still = quantise(np.zeros(2, np.float32), bound)
    for k in range(len(grey) - 1):
        if grey[k + 1] is grey[k]:
            out[k] = still      # a repeated frame (past the clip's end): no motion, exactly
        else:
            out[k] = quantise(method.calc(grey[k], grey[k + 1], None), bound)
    return out


def fit_planes(flow: np.ndarray, p: FlowParams) -> np.ndarray:
    """Quantised flow [K, h, w, 2] uint8 -> [K, H, W, 2] (bilinear): the one resize of both sources."""
    if flow.shape[1:3] == (p.height, p.width):
        return flow
    import cv2
    return np.stack([cv2.resize(f, (p.width, p.height), interpolation=cv2.INTER_LINEAR) for f in flow])


def read_extracted(u_dir: Path, p: FlowParams, limits, name: str):
    """Pre-extracted flow `<root>/u/<video>/frame%06d.jpg` + `<root>/v/<video>/...` -> [K, H, W, 2] uint8.

    The K consecutive frames around the middle (the last repeated when there are fewer), read at
    their own size, then resized by `fit_planes` as computed flow is.
    """
    from dimml import media
    if u_dir.parent.name != "u":
        raise media.MediaError(name, "not_media", "a folder, but not pre-extracted flow: expected "
                               "<root>/u/<video> holding frame%06d.jpg (and <root>/v/<video>)")
    v_dir = u_dir.parent.parent / "v" / u_dir.name
    if not v_dir.is_dir():
        raise media.MediaError(name, "missing", f"no v folder {v_dir} next to the u folder")
    numbered = sorted((int(m.group(1)), f) for f in os.listdir(u_dir) if (m := EXTRACTED_FRAME.match(f)))
    if not numbered:
        raise media.MediaError(name, "empty", "flow folder holds no frame%06d.jpg images")
    names = [f for _, f in numbered]
    start = max(0, (len(names) - p.num_pairs) // 2)
    chosen = names[start:start + p.num_pairs]
    chosen += chosen[-1:] * (p.num_pairs - len(chosen))
    planes: list[list[np.ndarray]] = []
    info = None
    for fname in chosen:
        pair = []
        for folder in (u_dir, v_dir):
            frame, frame_info = media.decode_still(folder / fname, str(folder / fname), limits)
            info = info or frame_info
            try:
                pair.append(media.frame_array(frame, format="gray"))
            except av.FFmpegError as e:
                raise media.MediaError(str(folder / fname), "undecodable",
                                       f"image cannot be converted ({e.strerror or e})") from None
        if pair[0].shape != pair[1].shape or (planes and pair[0].shape != planes[0][0].shape):
            raise media.MediaError(name, "undecodable", f"flow images of different sizes in {u_dir} / {v_dir}")
        planes.append(pair)
    flow = np.stack([np.stack(pair, axis=-1) for pair in planes])
    return fit_planes(np.ascontiguousarray(flow), p), media.MediaInfo(name, "flow_images", None, info.streams)
