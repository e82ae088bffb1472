"""Flow computed from a video and flow read from a pre-extracted tree are on one scale.

A texture moves at a known speed through a UCF101-like video (320x240, xvid); its tree is written
by the convention of the distributed TV-L1 trees (displacement in 340x256 pixels, +-20 px,
round(255 (d + 20) / 40), JPEG), straight from the known speed. Decoding the video (DIS or TV-L1)
and reading the tree must give the same values within TOLERANCE quantisation units.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from dimml.media import decode_sample
from dimml.modalities import preprocess_for

from public_layouts import moving_video

SPEED = (2, 1)                    # px per frame in the 320x240 video: right and down
TREE_SIZE = (340, 256)            # 320x240 at short side 256, even sizes
TOLERANCE = 2.0                   # mean |video - tree| over the interior, in uint8 units (0.31 px of 340x256)
K, OUT = 3, 112                   # flow pairs, and the model's H = W


def tree_value(d_video: float, video_side: int, tree_side: int) -> int:
    """A displacement of d px in the video, in the tree's pixels, quantised (+-20 px -> 0..255)."""
    d = d_video * tree_side / video_side
    return int(np.rint((np.clip(d, -20, 20) + 20) * 255 / 40))


def write_tree(root: Path, stem: str, pairs: int) -> Path:
    """A tree of a uniform translation at SPEED: constant u and v images at the tree's size."""
    u = tree_value(SPEED[0], 320, TREE_SIZE[0])
    v = tree_value(SPEED[1], 240, TREE_SIZE[1])
    for comp, value in (("u", u), ("v", v)):
        folder = root / "tvl1_flow" / comp / stem
        folder.mkdir(parents=True, exist_ok=True)
        plane = np.full(TREE_SIZE[::-1], value, np.uint8)
        for k in range(1, pairs + 1):
            ok, buf = cv2.imencode(".jpg", plane)
            assert ok
            (folder / f"frame{k:06d}.jpg").write_bytes(buf.tobytes())
    return root / "tvl1_flow" / "u" / stem


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("flowtree")
    video = moving_video(root / "v_X_g01_c01.avi", SPEED, frames=12, seed=3, video_codec="mpeg4", codec_tag="XVID")
    return video, write_tree(root, video.stem, pairs=11)


def interior(flow: np.ndarray) -> np.ndarray:
    m = OUT // 6
    return flow[:, m:-m, m:-m].astype(np.float64)


@pytest.mark.parametrize("algorithm", ["dis", "tvl1"])
def test_video_flow_matches_the_tree(clip, algorithm):
    video, u_dir = clip
    cfg = preprocess_for("resnet18", "flow", {"flow.num_pairs": K, "flow.height": OUT, "flow.width": OUT,
                                              "flow.algorithm": algorithm})
    from_video = decode_sample({"video": str(video)}, cfg).arrays["flow"]
    from_tree = decode_sample({"flow": str(u_dir)}, cfg).arrays["flow"]
    assert from_video.shape == from_tree.shape == (K, OUT, OUT, 2)
    expected = [tree_value(SPEED[0], 320, 340), tree_value(SPEED[1], 240, 256)]   # 141, 134
    assert interior(from_tree).mean(axis=(0, 1, 2)).tolist() == expected            # JPEG of a flat image: exact
    gap = np.abs(interior(from_video) - interior(from_tree)).mean(axis=(0, 1, 2))
    assert (gap <= TOLERANCE).all(), (algorithm, gap, interior(from_video).mean(axis=(0, 1, 2)), expected)


def test_flow_measured_at_the_model_size_is_on_another_scale(clip):
    """The old convention (measure_side 0: displacement in the 112x112 model frame) disagrees with
    the tree by far more than the tolerance: the test above can fail."""
    video, u_dir = clip
    cfg = preprocess_for("resnet18", "flow", {"flow.num_pairs": K, "flow.height": OUT, "flow.width": OUT,
                                              "flow.measure_side": 0})
    gap = np.abs(interior(decode_sample({"video": str(video)}, cfg).arrays["flow"])
                 - interior(decode_sample({"flow": str(u_dir)}, cfg).arrays["flow"])).mean(axis=(0, 1, 2))
    assert gap[0] > 3 * TOLERANCE, gap


def test_bundles_without_the_convention_keep_decoding_as_trained():
    """A flow spec saved before `measure_side` existed measured at H x W: it still does."""
    from dimml.modalities import ModalitySpec
    old = ModalitySpec.from_dict({"name": "flow", "kind": "flow",
                                  "params": {"num_pairs": 2, "height": 64, "width": 64, "bound": 20.0}})
    assert old.params.measure_side == 0 and old.params.algorithm == "dis"
    assert preprocess_for("tiny", "flow").spec("flow").params.measure_side == 256   # new runs: the trees' scale
