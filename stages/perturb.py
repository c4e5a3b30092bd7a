"""perturb: the dispreferred image m', different from m only inside the key region.

Methods:
- `diffusion-noise` (default, the paper's): forward diffusion to step `noise.timestep` of a diffusers
  DDPM schedule (default 1000-step sigmoid, betas 1e-5..5e-3), only inside the mask:
      m'_R = sqrt(abar_t) * m_R + sqrt(1 - abar_t) * eps,  eps ~ N(0, I)
  on pixels scaled to [0, 1] (`noise.scale: unit`, as POVID/VCD) or [-1, 1] (`symmetric`), then
  clipped and quantised to 8 bits. eps is drawn from numpy's PCG64 seeded with `perturbation.seed`,
  which is derived from (run seed, sample_id, stage): `np.random.default_rng(seed).standard_normal((h, w, 3))`
  reproduces it.
- `inpaint`: diffusers Stable Diffusion inpainting over the mask (prompt templates, steps, guidance,
  strength), composited so pixels outside the mask keep their bytes.
- ablations: `global-noise` (the whole image), `random-region` (noise in a random rectangle of the
  mask's area, or with `random_region.size: fraction` of a fixed share of the image, 20% by default: the
  paper's Table 8 variant), `blur` (Gaussian blur inside the mask), `blackout` (a constant colour inside the mask).

`dilate_px` grows the region, `feather_px` blends its edge. Rows without a region take `fallback`:
`global-noise` (the paper's choice), `skip` (no dispreferred image: the row keeps its text preference
only) or `quarantine`. Outputs: `rejected_image` (PNG, lossless), `mask` / `mask_area` of the pixels that
were allowed to change, and `perturbation` {method, timestep, fallback, seed}.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from PIL import Image
from pydantic import Field

from mfpo.masks import decode_mask, encode_mask
from mfpo.models import ModelConfig, loading, select_dtype
from mfpo.noise import NoiseConfig, composite, diffusion_noise, random_region, soften
from pipeline.determinism import row_seed
from pipeline.errors import RowError
from pipeline.images import decode_rgb, encode_png
from pipeline.registry import register
from pipeline.stage import IMAGE_TYPE, BatchResult, Rejection, Stage, StageConfig
from pipeline.strict import StrictModel
from stages.common import MASK_TYPE, select_device

PERTURBATION_TYPE = pa.struct(
    [("method", pa.string()), ("timestep", pa.int32()), ("fallback", pa.string()), ("seed", pa.int64())]
)
Method = Literal["diffusion-noise", "inpaint", "global-noise", "random-region", "blur", "blackout"]


class InpaintConfig(StrictModel):
    model: ModelConfig = Field(
        default_factory=lambda: ModelConfig(model="stable-diffusion-v1-5/stable-diffusion-inpainting")
    )
    prompt: str = Field("empty background, nothing there", description="Template; {phrases}, {question}.")
    negative_prompt: str = Field("{phrases}", description="Template; by default the key objects themselves.")
    steps: int = Field(30, ge=1)
    guidance_scale: float = Field(7.5, ge=0)
    strength: float = Field(1.0, gt=0, le=1)
    resolution: int = Field(512, ge=64, multiple_of=8, description="Square size the model runs at.")


class RandomRegionConfig(StrictModel):
    size: Literal["mask", "fraction"] = Field(
        "mask",
        description="mask: a rectangle of the key region's area and aspect; fraction: a rectangle of `fraction` "
        "of the image with its aspect (the paper's Table 8 variant).",
    )
    fraction: float = Field(0.2, gt=0, le=1, description="Share of the image noised when size is fraction.")


class PerturbConfig(StageConfig):
    method: Method = "diffusion-noise"
    noise: NoiseConfig = Field(default_factory=NoiseConfig)
    fallback: Literal["global-noise", "skip", "quarantine"] = Field(
        "global-noise", description="What to do when a row has no key region."
    )
    min_mask_area: float = Field(0.0, ge=0, le=1, description="Smaller masks count as no region.")
    dilate_px: int = Field(0, ge=0, description="Grow the region by this many pixels.")
    feather_px: float = Field(0.0, ge=0, description="Gaussian sigma of a soft edge (grows the region).")
    blur_sigma: float = Field(8.0, gt=0, description="blur method: Gaussian sigma in pixels.")
    blackout_color: list[int] = Field(default_factory=lambda: [0, 0, 0], min_length=3, max_length=3)
    random_region: RandomRegionConfig = Field(default_factory=RandomRegionConfig)
    inpaint: InpaintConfig = Field(default_factory=InpaintConfig)


@register
class Perturb(Stage):
    name: ClassVar[str] = "perturb"
    Config = PerturbConfig
    inputs: ClassVar[tuple[str, ...]] = ("image", "mask", "key_phrases", "question")
    outputs: ClassVar[tuple[str, ...]] = ("rejected_image", "mask", "mask_area", "perturbation")
    config: PerturbConfig

    @property
    def loads_model(self) -> bool:
        return self.config.method == "inpaint"

    def check(self) -> list[str]:
        if self.config.method == "inpaint":
            return self.config.inpaint.model.missing_local("stages.perturb.inpaint.model.model")
        return []

    def setup(self) -> None:
        if self.config.method == "inpaint":
            from diffusers import AutoPipelineForInpainting

            cfg = self.config.inpaint.model
            self.device = select_device(self.resources, self.name)
            dtype = select_dtype(self.device, cfg.precision)
            with loading(cfg.model, "stages.perturb.inpaint.model.model"):
                self.pipe = AutoPipelineForInpainting.from_pretrained(
                    cfg.model,
                    torch_dtype=dtype,
                    safety_checker=None,
                    requires_safety_checker=False,
                    use_safetensors=True,
                    **cfg.pretrained_kwargs(),
                ).to(self.device)
            self.pipe.set_progress_bar_config(disable=True)

    def output_schema(self, input_schema: pa.Schema) -> pa.Schema:
        return pa.schema(
            [
                ("sample_id", pa.string()),
                ("rejected_image", IMAGE_TYPE),
                ("mask", MASK_TYPE),
                ("mask_area", pa.float64()),
                ("perturbation", PERTURBATION_TYPE),
            ]
        )

    def process_batch(self, table: pa.Table) -> BatchResult:
        cfg = self.config
        kept: list[dict[str, Any]] = []
        rejected: list[Rejection] = []
        inpaint_jobs: list[tuple[dict[str, Any], np.ndarray, np.ndarray, int]] = []
        for row in table.to_pylist():
            sid = row["sample_id"]
            seed = row_seed(self.context.seed, sid, self.name) & (2**63 - 1)
            rng = np.random.default_rng(seed)
            img = decode_rgb(row["image"])
            region = self._region(row, img.shape[:2])
            method, fallback = cfg.method, None
            if region is None and cfg.method != "global-noise":
                if cfg.fallback == "quarantine":
                    rejected.append(
                        Rejection(
                            sid,
                            "no region: nothing was grounded for the key phrases",
                            {"key_phrases": row["key_phrases"]},
                        )
                    )
                    continue
                fallback = cfg.fallback
                if fallback == "skip":
                    kept.append(self._row(sid, None, None, method, fallback, seed))
                    continue
                method = "global-noise"
            if method == "global-noise":
                region = np.ones(img.shape[:2], dtype=bool)
            elif method == "random-region":
                fraction = cfg.random_region.fraction if cfg.random_region.size == "fraction" else None
                region = random_region(region, rng, fraction)
            assert region is not None
            alpha = soften(region, cfg.dilate_px, cfg.feather_px)
            if method == "inpaint":
                inpaint_jobs.append((row, img, alpha, seed))
                continue
            changed = self._apply(method, img, rng)
            kept.append(self._row(sid, composite(img, changed, alpha), alpha > 0, method, fallback, seed))
        if inpaint_jobs:
            for (row, img, alpha, seed), painted in zip(inpaint_jobs, self._inpaint(inpaint_jobs), strict=True):
                kept.append(
                    self._row(row["sample_id"], composite(img, painted, alpha), alpha > 0, "inpaint", None, seed)
                )
            order = {sid: i for i, sid in enumerate(table.column("sample_id").to_pylist())}
            kept.sort(key=lambda r: order[r["sample_id"]])
        return BatchResult(pa.Table.from_pylist(kept, schema=self.output_schema(table.schema)), rejected)

    # ------------------------------------------------------------------ pieces
    def _region(self, row: dict[str, Any], shape: tuple[int, int]) -> np.ndarray | None:
        if row.get("mask") is None:
            return None
        mask = decode_mask(row["mask"])
        if mask.shape != shape:
            raise RowError(f"mask: shape {mask.shape} does not match the image {shape}")
        if not mask.any() or mask.mean() < self.config.min_mask_area:
            return None
        return mask

    def _apply(self, method: str, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The perturbed version of the whole image (float, 0..255); composite() keeps it to the region."""
        cfg = self.config
        if method in ("diffusion-noise", "global-noise", "random-region"):
            eps = rng.standard_normal(img.shape).astype(np.float32)
            return diffusion_noise(img, eps, cfg.noise)
        if method == "blur":
            import cv2

            return cv2.GaussianBlur(img, (0, 0), cfg.blur_sigma).astype(np.float32)
        if method == "blackout":
            return np.broadcast_to(np.asarray(cfg.blackout_color, np.float32), img.shape).copy()
        raise ValueError(method)

    def _inpaint(self, jobs: list[tuple[dict[str, Any], np.ndarray, np.ndarray, int]]) -> list[np.ndarray]:
        import torch

        cfg = self.config.inpaint
        size = cfg.resolution
        prompts, negatives, images, masks, generators = [], [], [], [], []
        for row, img, alpha, seed in jobs:
            phrases = ", ".join(row["key_phrases"] or [])
            prompts.append(cfg.prompt.format(phrases=phrases, question=row["question"]))
            negatives.append(cfg.negative_prompt.format(phrases=phrases, question=row["question"]))
            images.append(Image.fromarray(img).resize((size, size), Image.Resampling.LANCZOS))
            masks.append(
                Image.fromarray(((alpha > 0) * 255).astype(np.uint8)).resize((size, size), Image.Resampling.NEAREST)
            )
            generators.append(torch.Generator(device=self.device).manual_seed(seed))
        result = self.pipe(
            prompt=prompts,
            negative_prompt=negatives,
            image=images,
            mask_image=masks,
            num_inference_steps=cfg.steps,
            guidance_scale=cfg.guidance_scale,
            strength=cfg.strength,
            height=size,
            width=size,
            generator=generators,
            output_type="pil",
        )
        out = []
        for (_, img, _, _), painted in zip(jobs, result.images, strict=True):
            h, w = img.shape[:2]
            out.append(np.asarray(painted.convert("RGB").resize((w, h), Image.Resampling.LANCZOS), np.float32))
        return out

    def _row(
        self,
        sid: str,
        image: np.ndarray | None,
        region: np.ndarray | None,
        method: str,
        fallback: str | None,
        seed: int,
    ) -> dict[str, Any]:
        timestep = (
            self.config.noise.timestep if method in ("diffusion-noise", "global-noise", "random-region") else None
        )
        return {
            "sample_id": sid,
            "rejected_image": None if image is None else {"bytes": encode_png(Image.fromarray(image)), "path": None},
            "mask": None if region is None else encode_mask(region),
            "mask_area": 0.0 if region is None else round(float(region.mean()), 6),
            "perturbation": {"method": method, "timestep": timestep, "fallback": fallback, "seed": seed},
        }
