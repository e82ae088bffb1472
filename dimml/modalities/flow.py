"""Kind `flow`: optical flow computed from the video track while decoding (no pre-extracted flow needed).

K consecutive frame pairs around the clip centre, OpenCV's DIS optical flow on grey frames,
quantised as the standard UCF101 flow distribution is: displacement clipped to +-bound px and
mapped linearly to uint8 (0 = -bound, 255 = +bound). Array [K, H, W, 2] uint8 (u, v).
Encoder: a ResNet with a 2-channel stem per flow frame, averaged over time and space (the
authors' UCF101 model).
"""
from __future__ import annotations

from dataclasses import dataclass

from dimml.modalities import Kind, register_kind


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
        raise NotImplementedError("filled by the media layer")
