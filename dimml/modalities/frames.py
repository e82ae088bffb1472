"""Kind `frames`: N RGB frames of the video track, at the centres of N equal segments, resized."""
from __future__ import annotations

from dataclasses import dataclass

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
        raise NotImplementedError("filled by the media layer")
