"""segment: a mask per box and their union.

Backends:
- `sam` (default): transformers' SAM or SAM 2 (`facebook/sam-vit-huge`, `facebook/sam2.1-hiera-large`,
  or a local copy; the architecture is read from the checkpoint's config), every box of an image
  prompted in one batch, the candidate mask with the highest predicted IoU kept.
- `segment-anything` / `sam2`: the original packages (`pip install 'mfpo-pipeline[sam]'`), a local
  checkpoint file loaded with `torch.load(weights_only=True)`.
- `grabcut`: OpenCV GrabCut initialised from the box; no weights.
- `box`: the box itself.

Masks are stored as COCO RLE (`pycocotools`): `mask` is the union, `box_masks` one per box,
`mask_area` the union's fraction of the image. A row without boxes gets a null mask and area 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from mfpo.masks import box_mask, encode_mask
from mfpo.models import ModelConfig, loading, select_dtype
from pipeline.errors import PipelineError
from pipeline.images import decode_rgb
from pipeline.registry import register
from pipeline.stage import BatchResult, Stage, StageConfig
from pipeline.strict import StrictModel
from stages.common import FLOATS_TYPE, MASK_TYPE, missing_package, require, select_device


class GrabCutConfig(StrictModel):
    iterations: int = Field(5, ge=1, description="GrabCut iterations.")
    min_fraction: float = Field(
        0.05, ge=0, le=1, description="A cut smaller than this fraction of its box falls back to the box."
    )


class PackageCheckpoint(StrictModel):
    checkpoint: str | None = Field(None, description="Local checkpoint file of the original package.")
    model_type: str = Field("vit_h", description="segment-anything: vit_h | vit_l | vit_b.")
    config: str = Field("configs/sam2.1/sam2.1_hiera_l.yaml", description="sam2: the model's Hydra config.")


class SegmentConfig(StageConfig):
    backend: Literal["sam", "segment-anything", "sam2", "grabcut", "box"] = "sam"
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(model="facebook/sam-vit-huge"))
    package: PackageCheckpoint = Field(default_factory=PackageCheckpoint)
    multimask: bool = Field(True, description="Ask for 3 candidate masks per box and keep the best-scored one.")
    grabcut: GrabCutConfig = Field(default_factory=GrabCutConfig)

    @model_validator(mode="after")
    def _checkpoint_for_packages(self) -> SegmentConfig:
        if self.backend in ("segment-anything", "sam2") and not self.package.checkpoint:
            raise ValueError(f"backend {self.backend} needs package.checkpoint (a local checkpoint file)")
        return self


@register
class Segment(Stage):
    name: ClassVar[str] = "segment"
    Config = SegmentConfig
    inputs: ClassVar[tuple[str, ...]] = ("image", "boxes")
    outputs: ClassVar[tuple[str, ...]] = ("mask", "mask_area", "box_masks", "mask_scores")
    config: SegmentConfig

    @property
    def loads_model(self) -> bool:
        return self.config.backend not in ("grabcut", "box")

    def check(self) -> list[str]:
        cfg = self.config
        if cfg.backend == "sam":
            return cfg.model.missing_local("stages.segment.model.model")
        if cfg.backend in ("segment-anything", "sam2"):
            module = "segment_anything" if cfg.backend == "segment-anything" else "sam2"
            problems = missing_package(module, "'mfpo-pipeline[sam]'")
            if cfg.package.checkpoint and not Path(cfg.package.checkpoint).is_file():
                problems.append(f"stages.segment.package.checkpoint: {cfg.package.checkpoint} not found")
            return problems
        return missing_package("cv2", "opencv-contrib-python-headless") if cfg.backend == "grabcut" else []

    def setup(self) -> None:
        cfg = self.config
        if cfg.backend in ("grabcut", "box"):
            return
        self.device = select_device(self.resources, self.name)
        if cfg.backend == "sam":
            from transformers import AutoConfig, AutoModel, AutoProcessor

            kwargs = cfg.model.pretrained_kwargs()
            self.dtype = select_dtype(self.device, cfg.model.precision)
            with loading(cfg.model.model, "stages.segment.model.model"):
                self.model_type = AutoConfig.from_pretrained(cfg.model.model, **kwargs).model_type
            if self.model_type not in ("sam", "sam2"):
                raise PipelineError(
                    f"stages.segment.model: {cfg.model.model} is a {self.model_type!r} model, not SAM or SAM 2"
                )
            with loading(cfg.model.model, "stages.segment.model.model"):
                self.processor = AutoProcessor.from_pretrained(cfg.model.model, **kwargs)
                self.model = AutoModel.from_pretrained(cfg.model.model, dtype=self.dtype, **kwargs).to(self.device)
            self.model.eval()
        elif cfg.backend == "segment-anything":
            sa = require("segment_anything", "'mfpo-pipeline[sam]'")
            model = sa.sam_model_registry[cfg.package.model_type]()
            model.load_state_dict(_load_state_dict(cfg.package.checkpoint))
            self.predictor = sa.SamPredictor(model.to(self.device).eval())
        else:
            require("sam2", "'mfpo-pipeline[sam]'")
            from sam2.build_sam import build_sam2
            from sam2.sam2_image_predictor import SAM2ImagePredictor

            model = build_sam2(cfg.package.config, ckpt_path=None, device=str(self.device))
            model.load_state_dict(_load_state_dict(cfg.package.checkpoint, key="model"))
            self.predictor = SAM2ImagePredictor(model.eval())

    def output_schema(self, input_schema: pa.Schema) -> pa.Schema:
        return pa.schema(
            [
                ("sample_id", pa.string()),
                ("mask", MASK_TYPE),
                ("mask_area", pa.float64()),
                ("box_masks", pa.list_(MASK_TYPE)),
                ("mask_scores", FLOATS_TYPE),
            ]
        )

    def process_batch(self, table: pa.Table) -> BatchResult:
        rows = table.to_pylist()
        images = [decode_rgb(r["image"]) for r in rows]
        if self.config.backend == "sam":
            per_row = self._sam(images, [r["boxes"] or [] for r in rows])
        else:
            per_row = [self._one(img, r["boxes"] or [], r["sample_id"]) for img, r in zip(images, rows, strict=True)]
        out = []
        for row, img, (masks, scores) in zip(rows, images, per_row, strict=True):
            union = np.zeros(img.shape[:2], dtype=bool)
            for m in masks:
                union |= m
            out.append(
                {
                    "sample_id": row["sample_id"],
                    "mask": encode_mask(union) if masks else None,
                    "mask_area": round(float(union.mean()), 6),
                    "box_masks": [encode_mask(m) for m in masks],
                    "mask_scores": scores,
                }
            )
        return BatchResult(pa.Table.from_pylist(out, schema=self.output_schema(table.schema)))

    # ------------------------------------------------------------------ backends
    def _sam(
        self, images: list[np.ndarray], boxes: list[list[list[float]]]
    ) -> list[tuple[list[np.ndarray], list[float | None]]]:
        import torch

        results: list[tuple[list[np.ndarray], list[float | None]]] = [([], []) for _ in images]
        # The processor needs the same number of boxes per image in a batch: group rows by box count.
        groups: dict[int, list[int]] = {}
        for i, b in enumerate(boxes):
            if b:
                groups.setdefault(len(b), []).append(i)
        for idx in groups.values():
            inputs = self.processor(
                images=[images[i] for i in idx], input_boxes=[boxes[i] for i in idx], return_tensors="pt"
            )
            inputs = {
                k: (v.to(self.device, self.dtype) if torch.is_floating_point(v) else v.to(self.device))
                for k, v in inputs.items()
            }
            with torch.inference_mode():
                outputs = self.model(**inputs, multimask_output=self.config.multimask)
            pred = outputs.pred_masks.float().cpu()
            if self.model_type == "sam":
                masks = self.processor.image_processor.post_process_masks(
                    pred, inputs["original_sizes"].cpu(), inputs["reshaped_input_sizes"].cpu()
                )
            else:
                masks = self.processor.image_processor.post_process_masks(pred, inputs["original_sizes"].cpu())
            iou = outputs.iou_scores.float().cpu()  # (images, boxes, candidates)
            for j, i in enumerate(idx):
                best = iou[j].argmax(dim=-1)
                results[i] = (
                    [masks[j][b, best[b]].numpy().astype(bool) for b in range(len(boxes[i]))],
                    [round(float(iou[j][b, best[b]]), 6) for b in range(len(boxes[i]))],
                )
        return results

    def _one(
        self, img: np.ndarray, boxes: list[list[float]], sample_id: str
    ) -> tuple[list[np.ndarray], list[float | None]]:
        h, w = img.shape[:2]
        if self.config.backend == "box":
            return [box_mask(b, h, w) for b in boxes], [None] * len(boxes)
        if self.config.backend == "grabcut":
            seed = grabcut_seed(self.context.rng(sample_id))
            return [grabcut(img, b, self.config.grabcut, seed) for b in boxes], [None] * len(boxes)
        masks, scores = [], []
        if boxes:
            self.predictor.set_image(img)
        for b in boxes:
            candidates, quality, _ = self.predictor.predict(box=np.asarray(b), multimask_output=self.config.multimask)
            best = int(np.argmax(quality))
            masks.append(np.asarray(candidates[best]).astype(bool))
            scores.append(round(float(quality[best]), 6))
        return masks, scores


def grabcut_seed(rng: np.random.Generator) -> int:
    """The OpenCV seed of a row's GrabCut, from the row's generator (`StageContext.rng`)."""
    return int(rng.integers(0, 2**31 - 1))


def grabcut(img: np.ndarray, box: list[float], cfg: GrabCutConfig, seed: int) -> np.ndarray:
    """GrabCut initialised from the box. Falls back to the box where GrabCut cannot work: a box that
    leaves no background to learn from, or a cut that keeps almost nothing of the box."""
    import cv2

    h, w = img.shape[:2]
    rect_mask = box_mask(box, h, w)
    x0, y0 = int(np.floor(box[0])), int(np.floor(box[1]))
    x1, y1 = int(np.ceil(box[2])), int(np.ceil(box[3]))
    if rect_mask.all() or (x1 - x0) < 2 or (y1 - y0) < 2:
        return rect_mask
    cv2.setRNGSeed(seed)  # GrabCut's k-means draws from OpenCV's global RNG: seed it per row
    mask = np.zeros((h, w), np.uint8)
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    try:
        cv2.grabCut(
            np.ascontiguousarray(img[..., ::-1]),
            mask,
            (x0, y0, x1 - x0, y1 - y0),
            bgd,
            fgd,
            cfg.iterations,
            cv2.GC_INIT_WITH_RECT,
        )
    except cv2.error:
        return rect_mask
    fg = (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)
    if fg.sum() < cfg.min_fraction * rect_mask.sum():
        return rect_mask
    return fg


def _load_state_dict(path: str | None, key: str | None = None) -> dict[str, Any]:
    import torch

    if path is None or not Path(path).is_file():
        raise PipelineError(f"stages.segment.package.checkpoint: file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)  # no pickled code
    return state[key] if key and isinstance(state, dict) and key in state else state
