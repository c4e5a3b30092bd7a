"""The tiny random-weight checkpoints of tiny_models.py reload with from_pretrained and run like the real ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import photo
from PIL import Image
from tiny_models import save_tiny_grounding_dino, save_tiny_inpaint_pipeline, save_tiny_sam, save_tiny_sam2

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
# two images of different sizes and aspect ratios, (height, width)
SIZES = [(48, 64), (60, 80)]


def images() -> list[Image.Image]:
    return [photo(w, h, seed=i) for i, (h, w) in enumerate(SIZES)]


def assert_safetensors_only(path: Path) -> None:
    files = [p for p in path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files), files
    assert not [p for p in files if p.suffix in PICKLE_SUFFIXES], files


def assert_loads_cleanly(model_cls: type, path: Path) -> torch.nn.Module:
    model, info = model_cls.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def test_grounding_dino(tmp_path: Path) -> None:
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor, GroundingDinoForObjectDetection
    from transformers.models.grounding_dino.modeling_grounding_dino import SPECIAL_TOKENS

    path = save_tiny_grounding_dino(tmp_path / "gdino")
    assert path == tmp_path / "gdino"
    assert_safetensors_only(path)
    processor = AutoProcessor.from_pretrained(path)
    model = assert_loads_cleanly(GroundingDinoForObjectDetection, path)
    assert type(AutoModelForZeroShotObjectDetection.from_pretrained(path)) is GroundingDinoForObjectDetection

    tokenizer = processor.tokenizer
    # the model splits phrases at these hard-coded ids: [CLS], [SEP], ".", "?"
    assert tokenizer.convert_tokens_to_ids(["[CLS]", "[SEP]", ".", "?"]) == SPECIAL_TOKENS
    assert tokenizer.pad_token_id == 0
    for phrase in ("a cat . a dog .", "helmet . rocket . flag . clock . coin .", "a zebra crossing ."):
        assert tokenizer.unk_token_id not in tokenizer(phrase)["input_ids"], phrase
    assert tokenizer.decode(tokenizer("a red car.")["input_ids"], skip_special_tokens=True) == "a red car."

    imgs = images()
    n_queries = model.config.num_queries
    for text in (["a cat. a dog.", "a cat. a dog."], [["a cat", "a dog"], ["person"]]):
        inputs = processor(images=imgs, text=text, return_tensors="pt", padding=True)
        assert inputs["pixel_values"].shape[0] == 2 and max(inputs["pixel_values"].shape[-2:]) == 256
        with torch.inference_mode():
            outputs = model(**inputs)
        assert outputs.pred_boxes.shape == (2, n_queries, 4)
        results = processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], threshold=0.0, text_threshold=0.0, target_sizes=SIZES
        )
        assert len(results) == 2
        for result in results:
            assert result["boxes"].shape == (n_queries, 4)
            assert result["scores"].shape == (n_queries,)
            assert len(result["text_labels"]) == n_queries
            assert torch.isfinite(result["boxes"]).all()
        # a threshold above every score keeps nothing
        none = processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], threshold=1.01, text_threshold=0.25, target_sizes=SIZES
        )
        assert [len(r["boxes"]) for r in none] == [0, 0]


@pytest.mark.parametrize("version", ["sam", "sam2"])
def test_sam(tmp_path: Path, version: str) -> None:
    from transformers import AutoModel, AutoProcessor, SamModel

    if version == "sam":
        path, model_cls = save_tiny_sam(tmp_path / "sam"), SamModel
    else:
        transformers = pytest.importorskip("transformers")
        if not hasattr(transformers, "Sam2Model"):
            pytest.skip(f"transformers {transformers.__version__} has no SAM 2")
        from transformers import Sam2Model

        path, model_cls = save_tiny_sam2(tmp_path / "sam2"), Sam2Model
    assert_safetensors_only(path)
    processor = AutoProcessor.from_pretrained(path)
    model = assert_loads_cleanly(model_cls, path)
    assert type(AutoModel.from_pretrained(path)) is model_cls

    imgs = images()
    # one and two boxes per image; within a batch every image needs the same number of boxes
    for boxes in (
        [[[4, 4, 40, 30]], [[0, 0, 79, 59]]],
        [[[4, 4, 40, 30], [10, 10, 60, 44]], [[0, 0, 79, 59], [20, 5, 50, 50]]],
    ):
        inputs = processor(images=imgs, input_boxes=boxes, return_tensors="pt")
        with torch.inference_mode():
            outputs = model(**inputs, multimask_output=True)
        n_boxes = len(boxes[0])
        assert outputs.iou_scores.shape == (2, n_boxes, 3)
        assert outputs.pred_masks.shape[:3] == (2, n_boxes, 3)
        if version == "sam":
            masks = processor.image_processor.post_process_masks(
                outputs.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"]
            )
        else:
            masks = processor.image_processor.post_process_masks(outputs.pred_masks, inputs["original_sizes"])
        assert [tuple(m.shape) for m in masks] == [(n_boxes, 3, h, w) for h, w in SIZES]
        assert all(m.dtype == torch.bool for m in masks)

    # the same fixed seed gives the same weights
    again = (save_tiny_sam if version == "sam" else save_tiny_sam2)(tmp_path / "again")
    assert (again / "model.safetensors").read_bytes() == (path / "model.safetensors").read_bytes()


def test_inpaint_pipeline(tmp_path: Path) -> None:
    from diffusers import AutoPipelineForInpainting, StableDiffusionInpaintPipeline

    path = save_tiny_inpaint_pipeline(tmp_path / "inpaint")
    assert_safetensors_only(path)
    assert {p.name for p in path.iterdir()} >= {"model_index.json", "unet", "vae", "text_encoder", "tokenizer"}
    pipe = StableDiffusionInpaintPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.in_channels == 9 and pipe.safety_checker is None

    image = photo(64, 64, seed=0)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    generator = torch.Generator().manual_seed(0)
    result = pipe(
        prompt="a cat", image=image, mask_image=mask, num_inference_steps=2, height=64, width=64, generator=generator
    )
    assert [im.size for im in result.images] == [(64, 64)]
    assert np.asarray(result.images[0]).shape == (64, 64, 3)

    # the way the perturb stage loads it
    auto = AutoPipelineForInpainting.from_pretrained(
        path, safety_checker=None, requires_safety_checker=False, use_safetensors=True
    )
    auto.set_progress_bar_config(disable=True)
    assert type(auto) is StableDiffusionInpaintPipeline
    batch = auto(
        prompt=["a cat", "a dog"],
        negative_prompt=["blurry", "blurry"],
        image=[image, image],
        mask_image=[mask, mask],
        num_inference_steps=2,
        strength=0.75,
        height=64,
        width=64,
    )
    assert [im.size for im in batch.images] == [(64, 64), (64, 64)]
