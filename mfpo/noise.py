"""MFPO's image perturbations as pure functions of pixels: the forward-diffusion noise q(x_t | x_0) over a
region (diffusers' DDPMScheduler, so the schedule is exactly diffusers'), the region softened at its edge, the
composite that keeps every byte outside it, and a random region of the same size for the ablation."""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from pipeline.strict import StrictModel


class NoiseConfig(StrictModel):
    timestep: int = Field(500, ge=0, description="Forward-diffusion step t (the paper's best: 500).")
    num_train_timesteps: int = Field(1000, ge=1)
    beta_schedule: Literal["sigmoid", "linear", "scaled_linear", "squaredcos_cap_v2"] = "sigmoid"
    beta_start: float = Field(1e-5, gt=0)
    beta_end: float = Field(5e-3, gt=0)
    scale: Literal["unit", "symmetric"] = Field("unit", description="Pixels in [0, 1] or [-1, 1] before noising.")

    @model_validator(mode="after")
    def _timestep_in_range(self) -> NoiseConfig:
        if self.timestep >= self.num_train_timesteps:
            raise ValueError(f"timestep must be below num_train_timesteps ({self.num_train_timesteps})")
        return self


def diffusion_noise(img: np.ndarray, eps: np.ndarray, cfg: NoiseConfig) -> np.ndarray:
    """Forward diffusion q(x_t | x_0) of an 8-bit image with the given eps, back in 0..255 (unclipped).

    The step itself is diffusers' DDPMScheduler.add_noise, so the schedule is exactly diffusers'."""
    import torch

    sched = _scheduler(cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.beta_schedule)
    x0 = img.astype(np.float32) / 255.0
    if cfg.scale == "symmetric":
        x0 = x0 * 2.0 - 1.0
    xt = sched.add_noise(torch.from_numpy(x0), torch.from_numpy(eps), torch.tensor([cfg.timestep])).numpy()
    if cfg.scale == "symmetric":
        xt = (xt + 1.0) / 2.0
    return xt * 255.0


@lru_cache(maxsize=8)
def _scheduler(steps: int, beta_start: float, beta_end: float, schedule: str) -> Any:
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=steps, beta_start=beta_start, beta_end=beta_end, beta_schedule=schedule)


def soften(region: np.ndarray, dilate_px: int, feather_px: float) -> np.ndarray:
    """Blend weights in [0, 1]: the region, optionally dilated and with a Gaussian edge."""
    import cv2

    mask = region.astype(np.uint8)
    if dilate_px > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilate_px + 1, 2 * dilate_px + 1))
        mask = cv2.dilate(mask, kernel)
    alpha = mask.astype(np.float32)
    if feather_px > 0:
        radius = int(np.ceil(3 * feather_px))
        grown = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1)))
        alpha = np.maximum(cv2.GaussianBlur(alpha, (2 * radius + 1, 2 * radius + 1), feather_px), mask)
        alpha[grown == 0] = 0.0  # the soft edge never reaches past the kernel's support
    return alpha


def composite(img: np.ndarray, changed: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Blend `changed` into `img` with weights alpha; where alpha is 0 the original bytes are kept."""
    blended = alpha[..., None] * changed + (1.0 - alpha[..., None]) * img.astype(np.float32)
    out = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return np.where(alpha[..., None] > 0, out, img)


def random_region(region: np.ndarray, rng: np.random.Generator, fraction: float | None = None) -> np.ndarray:
    """A rectangle placed at random: the region's pixel count and its bounding box's aspect ratio, or (with
    `fraction`) that share of the image with the image's aspect ratio."""
    h, w = region.shape
    if fraction is not None:
        area, aspect = fraction * h * w, w / h
    else:
        area = int(region.sum())
        ys, xs = np.nonzero(region)
        aspect = (xs.max() - xs.min() + 1) / (ys.max() - ys.min() + 1)
    rh = int(min(h, max(1, round(np.sqrt(area / aspect)))))
    rw = int(min(w, max(1, round(area / rh))))
    y0 = int(rng.integers(0, h - rh + 1))
    x0 = int(rng.integers(0, w - rw + 1))
    out = np.zeros_like(region)
    out[y0 : y0 + rh, x0 : x0 + rw] = True
    return out
