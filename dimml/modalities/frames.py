"""Kind `frames`: N RGB frames of the video track, at the centres of N equal segments, resized."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dimml.modalities import Kind, register_kind

# ImageNet statistics (uint8 units), as the reference code's torchvision transforms use.
IMAGENET_MEAN = tuple(255.0 * m for m in (0.485, 0.456, 0.406))
IMAGENET_STD = tuple(255.0 * s for s in (0.229, 0.224, 0.225))


@dataclass(frozen=True)
class FramesParams:
    num_frames: int = 3
    height: int = 224
    width: int = 224


@register_kind
class Frames(Kind):
    name = "frames"
    params_cls = FramesParams
    from_video = True
    dtype = cache_dtype = "uint8"
    encoder = "stack"
    pixel_mean, pixel_std = IMAGENET_MEAN, IMAGENET_STD
    augment = True
    onnx_input = "frames"
    missing_cause = "no_video"

    def shape(self, p: FramesParams) -> tuple[int, ...]:
        return (p.num_frames, p.height, p.width, 3)

    def decode(self, src, p: FramesParams, limits, name: str):
        """The frames on screen at the centres of N equal segments, RGB, resized (bilinear, no crop)."""
        from dimml import media
        with media.opened_video(src, name, limits) as (c, stream_info, stream, tally):
            # unknown duration: every target at t=0 -> the first frame N times
            targets = media.frame_times(media.video_duration(stream_info), p.num_frames)
            frames = media.some_frames(media.pick_frames(c, stream, targets, tally), name)
            out = np.stack([media.frame_array(f, format="rgb24", width=p.width, height=p.height,
                                              interpolation="BILINEAR") for f in frames])
        return out, stream_info
