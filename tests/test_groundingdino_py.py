"""The original GroundingDINO package as a ground backend, in its own environment (transformers < 5),
driven through the worker process with a random-weight checkpoint of the published SwinT-OGC shape."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pyarrow as pa
import pytest
from contract import _rgb
from helpers import REPO, SAMPLE_JSONL
from stage_runner import build_stage

from pipeline.errors import PipelineError

PYTHON = Path(os.environ.get("MFPO_GROUNDINGDINO_PYTHON", REPO / ".venv-groundingdino" / "bin" / "python"))
pytestmark = [
    pytest.mark.skipif(not PYTHON.exists(), reason="no groundingdino-py environment: make groundingdino-env"),
    pytest.mark.slow,  # a worker process in an environment of its own
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gdino")
    subprocess.run(
        [str(PYTHON), str(REPO / "tests" / "build_groundingdino_checkpoint.py"), str(out)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return out


def test_boxes_from_the_original_package(checkpoint: Path):
    stage = build_stage(
        "ground",
        {
            "backend": "groundingdino-py",
            "box_threshold": 0.0,
            "text_threshold": 0.0,
            "max_boxes": 3,
            "groundingdino_py": {
                "python": str(PYTHON),
                "checkpoint": str(checkpoint / "groundingdino_random.pth"),
                "text_encoder_type": str(checkpoint / "bert"),
            },
        },
    )
    images = [(SAMPLE_JSONL.parent / "images" / f).read_bytes() for f in ("chelsea.jpg", "coffee.jpg")]
    rows = pa.table(
        {
            "sample_id": ["a", "b", "c"],
            "image": [{"bytes": b, "path": None} for b in [*images, images[0]]],
            "meta": ["{}"] * 3,
            "key_phrases": [["cat", "eye"], ["cup"], []],
        }
    )
    out = stage.process_batch(rows).table.to_pylist()
    for r, img in zip(out[:2], images, strict=True):
        h, w = _rgb({"bytes": img}).shape[:2]
        assert len(r["boxes"]) == 3
        for x0, y0, x1, y1 in r["boxes"]:
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
    assert set(out[0]["box_phrases"]) <= {"cat", "eye"} and set(out[1]["box_phrases"]) <= {"cup"}
    assert out[2]["boxes"] == []
    worker = stage.worker.proc
    assert worker.poll() is None  # the package's worker process lives while the stage does
    stage.teardown()
    assert worker.poll() is not None  # and is closed by teardown()


def test_missing_environment_names_the_make_target(tmp_path: Path):
    with pytest.raises(PipelineError, match="make groundingdino-env"):
        build_stage(
            "ground",
            {
                "backend": "groundingdino-py",
                "groundingdino_py": {"python": str(tmp_path / "nope" / "python"), "checkpoint": "x.pth"},
            },
        )
