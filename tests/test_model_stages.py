"""Model-backed stages on tiny random-weight checkpoints of the real architectures, saved to disk and
loaded through the stages' own `from_pretrained` code: Grounding DINO, SAM, SAM 2, SD inpainting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from contract import _rgb, check
from helpers import SAMPLE_JSONL, cli, tree, write_config
from stage_runner import build_stage, run_stage
from tiny_models import (
    save_tiny_grounding_dino,
    save_tiny_inpaint_pipeline,
    save_tiny_llava,
    save_tiny_sam,
    save_tiny_sam2,
)

from mfpo.masks import decode_mask

pytestmark = pytest.mark.slow  # the CLI in subprocesses, Ray or model builds: not in `make test-fast`


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "gdino": save_tiny_grounding_dino(root / "grounding-dino"),
        "sam": save_tiny_sam(root / "sam"),
        "sam2": save_tiny_sam2(root / "sam2"),
        "inpaint": save_tiny_inpaint_pipeline(root / "inpaint"),
        "llava": save_tiny_llava(root / "llava"),
    }


def _photos(n: int = 3) -> pa.Table:
    names = ["chelsea.jpg", "coffee.jpg", "astronaut.jpg"][:n]
    return pa.table(
        {
            "sample_id": [str(i) for i in range(n)],
            "image": [{"bytes": (SAMPLE_JSONL.parent / "images" / f).read_bytes(), "path": None} for f in names],
            "meta": ["{}"] * n,
            "key_phrases": [["cat", "eye"], ["cup", "saucer", "spoon"], []][:n],
            "question": ["q"] * n,
        }
    )


def test_grounding_dino_boxes_in_pixels(models):
    stage = build_stage(
        "ground",
        {
            "model": {"model": str(models["gdino"])},
            "box_threshold": 0.0,
            "text_threshold": 0.0,
            "max_boxes": 4,
            "nms_iou": None,
        },
    )
    rows = _photos()
    out = stage.process_batch(rows).table.to_pylist()
    sizes = [_rgb(img).shape[:2] for img in rows.column("image").to_pylist()]
    for r, (h, w), phrases in zip(out, sizes, rows.column("key_phrases").to_pylist(), strict=True):
        if not phrases:
            assert r["boxes"] == []  # nothing to look for: the model is not even called
            continue
        assert len(r["boxes"]) == 4 and r["box_scores"] == sorted(r["box_scores"], reverse=True)
        for x0, y0, x1, y1 in r["boxes"]:
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
    # A threshold above every score finds nothing.
    none = build_stage("ground", {"model": {"model": str(models["gdino"])}, "box_threshold": 1.0})
    assert all(r["boxes"] == [] for r in none.process_batch(rows).table.to_pylist())


@pytest.mark.parametrize("which", ["sam", "sam2"])
def test_sam_masks_per_box_and_union(models, which: str):
    rows = _photos(2).append_column(
        "boxes", pa.array([[[20.0, 10.0, 200.0, 190.0]], [[30.0, 20.0, 150.0, 140.0], [100.0, 50.0, 300.0, 200.0]]])
    )
    out = run_stage("segment", {"model": {"model": str(models[which])}}, rows.select(["sample_id", "image", "boxes"]))
    for r, img, boxes in zip(
        out.table.to_pylist(), rows.column("image").to_pylist(), rows.column("boxes").to_pylist(), strict=True
    ):
        h, w = _rgb(img).shape[:2]
        masks = [decode_mask(m) for m in r["box_masks"]]
        assert len(masks) == len(boxes) == len(r["mask_scores"])
        assert all(m.shape == (h, w) for m in masks)
        union = decode_mask(r["mask"])
        assert np.array_equal(union, np.logical_or.reduce(masks))


def test_inpaint_changes_only_the_mask(models, capsys: pytest.CaptureFixture[str]):
    from mfpo.masks import encode_mask

    rows = _photos(2)
    h, w = _rgb(rows.column("image")[0].as_py()).shape[:2]
    mask = np.zeros((h, w), bool)
    mask[40:120, 60:200] = True
    h2, w2 = _rgb(rows.column("image")[1].as_py()).shape[:2]
    mask2 = np.zeros((h2, w2), bool)
    mask2[10:60, 10:90] = True
    rows = rows.append_column("mask", pa.array([encode_mask(mask), encode_mask(mask2)]))
    cfg = {"method": "inpaint", "inpaint": {"model": {"model": str(models["inpaint"])}, "steps": 2, "resolution": 64}}
    out = run_stage("perturb", cfg, rows).table.to_pylist()
    again = run_stage("perturb", cfg, rows).table.to_pylist()
    for r, m, img in zip(out, (mask, mask2), rows.column("image").to_pylist(), strict=True):
        original, painted = _rgb(img), _rgb(r["rejected_image"])
        assert np.array_equal(original[~m], painted[~m])
        assert np.abs(original[m].astype(int) - painted[m].astype(int)).mean() > 5
        assert r["perturbation"]["method"] == "inpaint" and r["perturbation"]["timestep"] is None
    assert [r["rejected_image"] for r in out] == [r["rejected_image"] for r in again]  # seeded per row
    assert "Loading" not in capsys.readouterr().err  # the loaders' progress bars stay off the run's terminal


@pytest.mark.ray
def test_model_stages_through_the_pipeline(tmp_path: Path, models):
    stages = {
        "ingest": {"source": str(SAMPLE_JSONL), "limit": 6},
        "keywords": {},
        "ground": {
            "model": {"model": str(models["gdino"])},
            "box_threshold": 0.0,
            "text_threshold": 0.0,
            "max_boxes": 2,
            "resources": {"gpus": 0.5, "batch_size": 4},
        },
        "segment": {"model": {"model": str(models["sam"])}, "resources": {"batch_size": 4}},
        "perturb": {},
        "score": {"model": {"model": str(models["llava"])}, "resources": {"batch_size": 4}},
        "write": {},
    }
    trees = {}
    for executor in ("local", "ray"):
        out = tmp_path / executor
        cfg = write_config(
            tmp_path / f"{executor}.yaml", SAMPLE_JSONL, out, stages=stages, shard_size=3, executor=executor
        )
        proc = cli("run", str(cfg), check=True)
        # Asked for a GPU where there is none: runs on CPU, with one warning line per run (not one per worker,
        # and no Python warning with its source line).
        assert sum("running on CPU" in line for line in proc.stderr.splitlines()) == 1, proc.stderr
        assert "UserWarning" not in proc.stderr and "warnings.warn" not in proc.stderr
        assert "\x1b[" not in proc.stderr + proc.stdout  # not a terminal: no colour codes, Ray's notes included
        assert "Loading weights" not in proc.stderr + proc.stdout  # no library bars between the run's lines
        rows, problems = check(out)
        assert problems == [] and len(rows) == 6
        for r in rows:
            if r["key_phrases"]:
                assert len(r["boxes"]) == 2 and set(r["box_phrases"]) <= set(r["key_phrases"])
                assert r["perturbation"]["fallback"] is None
        trees[executor] = tree(out)
    # Model stages (Grounding DINO, SAM, the VLM scorer) give the same bytes on both executors: torch computes on
    # the stage's resources.cpus threads in both.
    assert trees["local"] == trees["ray"]


def test_gpu_request_without_cuda_warns(models, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch):
    import torch

    import stages.common

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    monkeypatch.setattr(stages.common, "_CPU_FALLBACK_SAID", set())  # said once per process: not yet in this one
    with caplog.at_level("WARNING", logger="mfpo"):
        build_stage("segment", {"model": {"model": str(models["sam"])}, "resources": {"gpus": 1}})
    assert any("no CUDA device is visible; running on CPU" in r.getMessage() for r in caplog.records)
