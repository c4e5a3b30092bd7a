"""The original SAM packages as segment backends: random-weight checkpoints saved to disk, loaded
through the stage's own safe loading code (weights_only / safetensors), box prompts on a real photo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from helpers import SAMPLE_JSONL
from stage_runner import run_stage

from mfpo.masks import decode_mask

pytestmark = pytest.mark.slow  # the CLI in subprocesses, Ray or model builds: not in `make test-fast`


def _rows() -> pa.Table:
    data = (SAMPLE_JSONL.parent / "images" / "chelsea.jpg").read_bytes()
    return pa.table(
        {
            "sample_id": ["a", "b"],
            "image": [{"bytes": data, "path": None}] * 2,
            "boxes": [[[10.0, 5.0, 200.0, 180.0], [150.0, 20.0, 300.0, 120.0]], []],
        }
    )


def _check(result, height: int = 213, width: int = 320) -> None:
    a, b = result.table.to_pylist()
    assert len(a["box_masks"]) == 2 and len(a["mask_scores"]) == 2
    union = decode_mask(a["mask"])
    assert union.shape == (height, width)
    masks = [decode_mask(m) for m in a["box_masks"]]
    assert np.array_equal(union, masks[0] | masks[1])
    assert abs(a["mask_area"] - union.mean()) < 1e-6
    assert b["mask"] is None and b["box_masks"] == [] and b["mask_area"] == 0.0


def test_sam2_package_backend(tmp_path: Path):
    import torch
    from sam2.build_sam import build_sam2

    config = "configs/sam2.1/sam2.1_hiera_t.yaml"
    torch.manual_seed(0)
    model = build_sam2(config, ckpt_path=None, device="cpu")
    ckpt = tmp_path / "sam2_random.pt"
    torch.save({"model": model.state_dict()}, ckpt)  # the layout of the published checkpoints
    result = run_stage("segment", {"backend": "sam2", "package": {"checkpoint": str(ckpt), "config": config}}, _rows())
    _check(result)


@pytest.mark.slow
def test_segment_anything_package_backend(tmp_path: Path):
    import segment_anything as sa
    from safetensors.torch import save_file

    model = sa.sam_model_registry["vit_b"]()
    ckpt = tmp_path / "sam_vit_b_random.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    rows = _rows().slice(0, 1)
    result = run_stage(
        "segment", {"backend": "segment-anything", "package": {"checkpoint": str(ckpt), "model_type": "vit_b"}}, rows
    )
    [a] = result.table.to_pylist()
    assert decode_mask(a["mask"]).shape == (213, 320) and len(a["box_masks"]) == 2


def test_missing_checkpoint_is_a_config_error():
    from pipeline.config import parse_config
    from pipeline.errors import ConfigError

    raw = {
        "stages": {
            "ingest": {"source": "x.jsonl"},
            "keywords": {},
            "ground": {"backend": "annotations"},
            "segment": {"backend": "sam2"},
            "write": {},
        }
    }
    with pytest.raises(ConfigError, match=r"stages\.segment: Value error, backend sam2 needs package\.checkpoint"):
        parse_config(raw)
