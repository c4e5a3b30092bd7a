"""Masks: GrabCut finds a known shape from its box; RLE round-trips; the box backend is the box."""

from __future__ import annotations

import numpy as np
import pytest

from mfpo.masks import box_mask, clip_box, decode_mask, encode_mask
from stages.segment import GrabCutConfig, grabcut


def scene(shape: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A textured background with one coloured object of a known shape; returns (image, true mask)."""
    rng = np.random.default_rng(seed)
    h, w = 160, 200
    yy, xx = np.mgrid[0:h, 0:w]
    background = np.stack([(xx * 0.6 + 40) % 256, (yy * 0.8 + 90) % 256, np.full((h, w), 120.0)], -1)
    background += rng.normal(0, 12, background.shape)
    cy, cx = 80 + rng.integers(-10, 10), 100 + rng.integers(-15, 15)
    if shape == "ellipse":
        truth = ((yy - cy) / 40.0) ** 2 + ((xx - cx) / 60.0) ** 2 < 1
    elif shape == "triangle":
        truth = (yy > cy - 45) & (yy < cy + 45) & (np.abs(xx - cx) < (yy - (cy - 45)) * 0.7)
    else:  # an L-shaped block
        truth = ((yy > cy - 40) & (yy < cy + 40) & (xx > cx - 50) & (xx < cx - 10)) | (
            (yy > cy + 5) & (yy < cy + 40) & (xx > cx - 50) & (xx < cx + 55)
        )
    colour = rng.integers(0, 256, 3)
    obj = colour + rng.normal(0, 10, background.shape)
    img = np.where(truth[..., None], obj, background)
    return np.clip(img, 0, 255).astype(np.uint8), truth


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.mark.parametrize("shape", ["ellipse", "triangle", "l-shape"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grabcut_from_box_finds_the_object(shape: str, seed: int):
    img, truth = scene(shape, seed)
    ys, xs = np.nonzero(truth)
    box = [xs.min() - 8.0, ys.min() - 8.0, xs.max() + 9.0, ys.max() + 9.0]  # a loose detector box
    mask = grabcut(img, box, GrabCutConfig(), seed=123)
    assert iou(mask, truth) >= 0.8
    assert iou(box_mask(box, *truth.shape), truth) < iou(mask, truth)  # better than the box itself


def test_grabcut_is_deterministic_and_falls_back_to_the_box():
    img, _ = scene("ellipse", 5)
    box = [40.0, 30.0, 170.0, 130.0]
    assert np.array_equal(grabcut(img, box, GrabCutConfig(), 7), grabcut(img, box, GrabCutConfig(), 7))
    whole = [0.0, 0.0, 200.0, 160.0]  # nothing outside the box to learn the background from
    assert grabcut(img, whole, GrabCutConfig(), 7).all()


def test_rle_round_trip_and_box_helpers():
    mask = np.zeros((37, 53), bool)
    mask[3:20, 10:41] = True
    mask[30, 50] = True
    rle = encode_mask(mask)
    assert rle["size"] == [37, 53] and isinstance(rle["counts"], str)
    assert np.array_equal(decode_mask(rle), mask)
    assert box_mask([10, 3, 41, 20], 37, 53).sum() == 17 * 31
    assert clip_box([-5, -5, 10, 10], 8, 8) == [0.0, 0.0, 8.0, 8.0]
    assert clip_box([20, 20, 30, 30], 8, 8) is None
