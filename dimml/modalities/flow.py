"""Kind `flow`: optical flow computed from the video track while decoding (no pre-extracted flow needed).

K consecutive frame pairs around the clip centre, OpenCV's DIS optical flow on grey frames,
quantised as the standard UCF101 flow distribution is: displacement clipped to +-bound px and
mapped linearly to uint8, round((d + bound) * 255 / (2 * bound)) (0 = -bound, 255 = +bound,
128 = no motion). Array [K, H, W, 2] uint8 (u = horizontal, v = vertical).
Encoder: a ResNet with a 2-channel stem per flow frame, averaged over time and space (the
authors' UCF101 model).

Choices:
  * the K + 1 frames are the consecutive decoded frames starting with the one on screen at
    duration / 2 - (K + 1) / (2 fps), so the window is centred on the clip (from the start when
    the clip is shorter than the window);
  * frames are converted to grey (luma) and resized to H x W (bilinear, no crop) *before* the
    flow, so displacements are in pixels of the H x W frame and cost does not grow with the
    video's resolution;
  * a video with fewer than K + 1 frames repeats its last frame: the pairs past the end are
    "no motion" (128).
  * DIS with OpenCV's MEDIUM preset (deterministic for a given OpenCV build).

Pre-extracted flow is read too: a folder `<root>/u/<video>` of `frame%06d.jpg` files (with the
same names in `<root>/v/<video>`), the common UCF101 layout, given as the modality's source
(a manifest's `flow_path` column). The K consecutive u/v images around the middle are resized
(bilinear) and stacked; their values are taken as they are (quantised with the same bound).
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


@dataclass(frozen=True)
class FlowParams:
    num_pairs: int = 10           # K: the paper's 2 x 10 x 224 x 224 input
    height: int = 224
    width: int = 224
    bound: float = 20.0           # displacement clipped to +-bound pixels before quantising


@register_kind
class Flow(Kind):
    name = "flow"
    params_cls = FlowParams
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
        """A video (path, bytes, file) -> DIS flow of K frame pairs; a `u/<video>` folder -> its images."""
        if isinstance(src, (str, os.PathLike)) and os.path.isdir(src):
            return read_extracted(Path(src), p, limits, name)
        from dimml import media
        with media.opened_video(src, name, limits) as (c, info, stream):
            count = p.num_pairs + 1
            fps = info.first("video").fps
            start = media.video_duration(info) / 2 - (count / (2 * fps) if fps else 0.0)
            frames = media.some_frames(media.consecutive_frames(c, stream, max(0.0, start), count), name)
            grey: dict[int, np.ndarray] = {}   # by frame identity: a repeated last frame is converted once
            for f in frames:
                if id(f) not in grey:
                    # contiguous: PyAV returns a view into padded rows for some widths, DIS needs dense ones
                    grey[id(f)] = np.ascontiguousarray(f.to_ndarray(format="gray", width=p.width,
                                                                    height=p.height, interpolation="BILINEAR"))
        return flow_stack([grey[id(f)] for f in frames], p.bound), info

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


def flow_stack(grey: list[np.ndarray], bound: float) -> np.ndarray:
    """K + 1 grey frames [H, W] uint8 -> quantised DIS flow [K, H, W, 2] uint8 of each consecutive pair."""
    import cv2   # imported on use: only the flow kind needs OpenCV
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    h, w = grey[0].shape
    out = np.empty((len(grey) - 1, h, w, 2), np.uint8)
    still = quantise(np.zeros(2, np.float32), bound)
    for k in range(len(grey) - 1):
        if grey[k + 1] is grey[k]:
            out[k] = still      # a repeated frame (past the clip's end): no motion, exactly
        else:
            out[k] = quantise(dis.calc(grey[k], grey[k + 1], None), bound)
    return out


def read_extracted(u_dir: Path, p: FlowParams, limits, name: str):
    """Pre-extracted flow `<root>/u/<video>/frame%06d.jpg` + `<root>/v/<video>/...` -> [K, H, W, 2] uint8.

    The K consecutive frames around the middle (the last repeated when there are fewer).
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
    out = np.empty((p.num_pairs, p.height, p.width, 2), np.uint8)
    info = None
    for k, fname in enumerate(chosen):
        for c, folder in enumerate((u_dir, v_dir)):
            frame, frame_info = media.decode_still(folder / fname, str(folder / fname), limits)
            info = info or frame_info
            try:
                out[k, :, :, c] = frame.to_ndarray(format="gray", width=p.width, height=p.height,
                                                   interpolation="BILINEAR")
            except av.FFmpegError as e:
                raise media.MediaError(str(folder / fname), "undecodable",
                                       f"image cannot be converted ({e.strerror or e})") from None
    return out, media.MediaInfo(name, "flow_images", None, info.streams)
