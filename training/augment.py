"""Training-time image augmentation: random resized crop + horizontal flip, batched, on any device.

The papers' visual pipeline (torchvision RandomResizedCrop + RandomHorizontalFlip per frame)
done for a whole batch at once with one `grid_sample`, so on CUDA it runs on the GPU next to
the model instead of in DataLoader workers. Applied to the modalities whose kind says
`augment` (frames, image; not flow, where a flip would have to negate u). One crop and flip per
sample (all N images of a clip move together, as a video should). Never used at inference:
evaluation, export and serving see the arrays exactly as decoded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    """torchvision's RandomResizedCrop defaults, and a flip with probability 1/2."""

    scale: tuple[float, float] = (0.08, 1.0)     # crop area as a fraction of the frame
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio (width / height, in pixels)
    flip: float = 0.5


def crop_params(batch: int, height: int, width: int, cfg: AugmentConfig,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Per clip affine [B, 2, 3] mapping output to input coordinates (normalised to [-1, 1]).

    Drawn on the CPU (so a seeded generator gives the same crops on any device). Instead of
    torchvision's rejection loop, a crop larger than the frame is clamped to it.
    """
    u = torch.rand(batch, 5, generator=generator, dtype=torch.float64)
    area = cfg.scale[0] + (cfg.scale[1] - cfg.scale[0]) * u[:, 0]
    log_r = math.log(cfg.ratio[0]) + (math.log(cfg.ratio[1]) - math.log(cfg.ratio[0])) * u[:, 1]
    aspect = torch.exp(log_r)
    # crop size as a fraction of the frame's width / height: w*h = area*W*H, w/h = aspect
    fw = torch.sqrt(area * aspect * height / width).clamp(max=1.0)
    fh = torch.sqrt(area * width / (aspect * height)).clamp(max=1.0)
    cx = (2 * u[:, 2] - 1) * (1 - fw)               # crop centre, keeping the crop inside
    cy = (2 * u[:, 3] - 1) * (1 - fh)
    sign = torch.where(u[:, 4] < cfg.flip, -1.0, 1.0).to(torch.float64)
    theta = torch.zeros(batch, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 2] = fw * sign, cx
    theta[:, 1, 1], theta[:, 1, 2] = fh, cy
    return theta.float()


def augment_frames(frames: torch.Tensor, cfg: AugmentConfig = AugmentConfig(),
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Images [B, N, H, W, C] (uint8) -> float32 [B, N, H, W, C] in pixel units, cropped and flipped.

    The output keeps the input layout and value range, so it goes into the model exactly where
    the uint8 images would (StackEncoder normalises whatever dtype it gets).
    """
    b, n, h, w, c = frames.shape
    theta = crop_params(b, h, w, cfg, generator).to(frames.device)
    theta = theta.repeat_interleave(n, dim=0)                          # same crop for a clip's frames
    x = frames.permute(0, 1, 4, 2, 3).reshape(b * n, c, h, w).float()  # channels_last in memory
    grid = F.affine_grid(theta, [b * n, c, h, w], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    # channels_last memory makes the result a plain contiguous [B, N, H, W, C] again
    out = out.contiguous(memory_format=torch.channels_last)
    return out.unflatten(0, (b, n)).permute(0, 1, 3, 4, 2)
