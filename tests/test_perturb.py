"""Region perturbation: the noise follows the forward-diffusion formula, only the region changes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import alpha_bar, quantised_moments

from mfpo.noise import NoiseConfig, composite, diffusion_noise, random_region, soften


@pytest.mark.parametrize(("t", "gray"), [(100, 128), (500, 128), (500, 40), (900, 200)])
def test_noise_matches_formula(t: int, gray: int):
    img = np.full((256, 256, 3), gray, np.uint8)
    rng = np.random.default_rng(t)
    eps = rng.standard_normal(img.shape).astype(np.float32)
    noised = diffusion_noise(img, eps, NoiseConfig(timestep=t))
    region = np.zeros(img.shape[:2], bool)
    region[32:224, 32:224] = True
    out = composite(img, noised, soften(region, 0, 0))
    abar = alpha_bar(t)
    mean, var = quantised_moments(math.sqrt(abar) * gray / 255, math.sqrt(1 - abar))
    inside = out[region].astype(float)
    n = inside.size
    assert abs(inside.mean() - mean) < 4 * math.sqrt(var / n) + 0.05
    assert abs(inside.var() - var) / var < 0.03
    assert np.array_equal(out[~region], img[~region])  # outside: the original bytes


def test_noise_without_clipping_is_the_closed_form():
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8)
    eps = np.random.default_rng(1).standard_normal(img.shape).astype(np.float32)
    for scale in ("unit", "symmetric"):
        cfg = NoiseConfig(timestep=500, scale=scale)
        got = diffusion_noise(img, eps, cfg)
        x0 = img / 255.0 if scale == "unit" else img / 127.5 - 1
        xt = math.sqrt(alpha_bar(500)) * x0 + math.sqrt(1 - alpha_bar(500)) * eps
        expected = xt * 255 if scale == "unit" else (xt + 1) * 127.5
        np.testing.assert_allclose(got, expected, atol=1e-3)


def test_dilate_and_feather_stay_inside_their_support():
    region = np.zeros((64, 64), bool)
    region[20:40, 20:40] = True
    hard = soften(region, 0, 0)
    assert set(np.unique(hard)) == {0.0, 1.0} and np.array_equal(hard > 0, region)
    dilated = soften(region, 3, 0)
    assert dilated[17, 30] == 1 and dilated[16, 30] == 0 and (dilated > 0).sum() > region.sum()
    soft = soften(region, 0, 2.0)
    assert np.all(soft[region] == 1.0)  # the region itself is fully replaced
    assert 0 < soft[19, 30] < 1 and soft[0, 0] == 0
    img = np.full((64, 64, 3), 100, np.uint8)
    out = composite(img, np.full(img.shape, 250.0, np.float32), soft)
    assert np.array_equal(out[soft == 0], img[soft == 0])


def test_random_region_has_the_same_area():
    region = np.zeros((100, 120), bool)
    region[10:30, 40:90] = True  # 20 x 50 = 1000 pixels
    moved = random_region(region, np.random.default_rng(3))
    assert abs(int(moved.sum()) - 1000) <= 25
    assert not np.array_equal(moved, region)
