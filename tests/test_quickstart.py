"""The offline recipe end to end, and the final dataset's contract (the columns users rely on)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import REPO, SAMPLE_JSONL, cli
from PIL import Image
from tiny_models import save_tiny_llava


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("quickstart")
    model = save_tiny_llava(root / "tiny-llava")
    out = root / "out"
    cli(
        "run",
        "examples/quickstart.yaml",
        "--set",
        f"run.output_dir={out}",
        "--set",
        f"stages.score.model.model={model}",
        check=True,
    )
    return out


def _source_rows() -> list[dict]:
    return [json.loads(line) for line in SAMPLE_JSONL.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_sample_data_is_rlhfv_with_boxes():
    rows = _source_rows()
    assert len(rows) >= 20
    assert len({r["image"] for r in rows}) >= 20  # at least 20 distinct photographs
    for r in rows:
        text = json.loads(r["text"])
        assert {"question", "chosen", "rejected"} <= set(text)
        w, h = Image.open(SAMPLE_JSONL.parent / r["image"]).size
        for ann in r["annotations"]:
            x0, y0, x1, y1 = ann["box"]
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h and ann["label"]


@pytest.mark.ray
def test_one_row_per_valid_input_row(quickstart: Path):
    from datasets import Image as ImageFeature
    from datasets import List as ListFeature
    from datasets import load_dataset

    files = sorted(str(p) for p in (quickstart / "dataset" / "data").glob("train-*-of-*.parquet"))
    ds = load_dataset("parquet", data_files=files, split="train")
    source = _source_rows()
    assert len(ds) == len(source)
    assert ds["sample_id"] == [str(r["idx"]) for r in source]
    assert isinstance(ds.features["images"], ListFeature) and isinstance(ds.features["images"].feature, ImageFeature)
    for row, src in zip(ds, source, strict=True):
        text = json.loads(src["text"])
        assert row["prompt"] == [
            {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": text["question"]}]}
        ]
        assert row["chosen"] == [{"role": "assistant", "content": [{"type": "text", "text": text["chosen"]}]}]
        assert row["rejected_text"] == text["rejected"]
        original = np.asarray(Image.open(SAMPLE_JSONL.parent / src["image"]).convert("RGB"))
        assert np.array_equal(np.asarray(row["images"][0]), original)
        assert json.loads(row["meta"])["annotations"] == src["annotations"]
        assert row["boxes"] == [[float(v) for v in a["box"]] for a in src["annotations"]]
        assert row["perturbation"]["method"] == "diffusion-noise" and row["perturbation"]["fallback"] is None
    assert isinstance(ds.features["rejected_image"], ImageFeature)
    assert sorted(ds["bucket"]) == sorted(["easy"] * 9 + ["medium"] * 10 + ["hard"] * 9)


@pytest.mark.ray
def test_contract(quickstart: Path):
    from contract import check

    rows, problems = check(quickstart)
    assert problems == [] and len(rows) == len(_source_rows())


@pytest.mark.ray
def test_card_and_status(quickstart: Path):
    card = (quickstart / "dataset" / "README.md").read_text(encoding="utf-8")
    n = len(_source_rows())
    assert card.startswith("---\npretty_name: MFPO quickstart sample\nconfigs:")
    assert f"- rows: {n} in " in card and f"| ingest | {n} | {n} | 0 | - |" in card
    assert "`images` | list of Image" in card
    model = quickstart.parent / "tiny-llava"
    args = ["--set", f"run.output_dir={quickstart}", "--set", f"stages.score.model.model={model}"]
    status = json.loads(cli("status", "examples/quickstart.yaml", "--json", *args, check=True).stdout)
    names = ["ingest", "keywords", "ground", "segment", "perturb", "score", "bucket", "write"]
    assert [(s["name"], s["state"], s["rows_kept"]) for s in status["stages"]] == [(x, "done", n) for x in names]
    # Rows hold no absolute paths: nothing machine-specific leaks into the data.
    for f in (quickstart / "dataset" / "data").glob("*.parquet"):
        table = pq.read_table(f, columns=["meta", "source"])
        assert str(REPO) not in str(table.to_pylist()) and str(quickstart) not in str(table.to_pylist())
