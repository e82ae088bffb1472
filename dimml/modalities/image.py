"""Kind `image`: a still image file of its own (PNG, JPEG, WebP, ...) -> [1, H, W, 3] uint8 RGB, resized."""
from __future__ import annotations

from dataclasses import dataclass

import av

from dimml.modalities import Kind, register_kind
from dimml.modalities.frames import IMAGENET_MEAN, IMAGENET_STD


@dataclass(frozen=True)
class ImageParams:
    height: int = 224
    width: int = 224


@register_kind
class Image(Kind):
    name = "image"
    params_cls = ImageParams
    from_video = False
    dtype = cache_dtype = "uint8"
    encoder = "stack"
    pixel_mean, pixel_std = IMAGENET_MEAN, IMAGENET_STD
    augment = True
    onnx_input = "image"
    missing_cause = "not_media"

    def shape(self, p: ImageParams) -> tuple[int, ...]:
        return (1, p.height, p.width, 3)

    def decode(self, src, p: ImageParams, limits, name: str):
        """The image's (first) picture as RGB, resized (bilinear, no crop) as video frames are."""
        from dimml import media
        frame, info = media.decode_still(src, name, limits)
        try:
            rgb = media.frame_array(frame, format="rgb24", width=p.width, height=p.height, interpolation="BILINEAR")
        except av.FFmpegError as e:
            raise media.MediaError(name, "undecodable", f"image cannot be converted ({e.strerror or e})") from None
        return rgb[None], info
