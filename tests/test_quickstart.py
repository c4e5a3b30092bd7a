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

pytestmark = pytest.mark.slow  # the CLI in subprocesses, Ray or model builds: not in `make test-fast`


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


def _split(row: dict) -> str:
    """The split of a source row: by a hash of its picture's pixels (the sample's photos are clean RGB JPEGs,
    stored as they are)."""
    from stages.write import image_id, split_of

    picture = {"bytes": (SAMPLE_JSONL.parent / row["image"]).read_bytes(), "path": None}
    return split_of(image_id(picture), {"train": 0.75, "test": 0.25})


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

    data = quickstart / "dataset" / "data"
    files = {s: sorted(str(p) for p in data.glob(f"{s}-*-of-*.parquet")) for s in ("train", "test")}
    ds = load_dataset("parquet", data_files=files)
    source = _source_rows()
    for split in ("train", "test"):  # each row in the split its sample_id hashes to, in source order
        assert ds[split]["sample_id"] == [str(r["idx"]) for r in source if _split(r) == split]
    features = ds["train"].features
    assert isinstance(features["images"], ListFeature) and isinstance(features["images"].feature, ImageFeature)
    rows = {r["sample_id"]: r for split in ("train", "test") for r in ds[split]}
    assert len(rows) == len(source)
    for src in source:
        row = rows[str(src["idx"])]
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
    assert isinstance(features["rejected_image"], ImageFeature)
    buckets = [r["bucket"] for r in rows.values()]
    assert sorted(buckets) == sorted(["easy"] * 9 + ["medium"] * 10 + ["hard"] * 9)


@pytest.mark.ray
def test_contract(quickstart: Path):
    from contract import check

    rows, problems = check(quickstart)
    assert problems == [] and len(rows) == len(_source_rows())


def _args(quickstart: Path) -> list[str]:
    model = quickstart.parent / "tiny-llava"
    return ["--set", f"run.output_dir={quickstart}", "--set", f"stages.score.model.model={model}"]


@pytest.mark.ray
def test_card_follows_the_hub_spec_and_embeds_its_pictures(quickstart: Path):
    from datasets import Features
    from datasets.info import DatasetInfosDict
    from huggingface_hub import DatasetCard

    from pipeline.config import load_config
    from pipeline.runner import Runner

    root = quickstart / "dataset"
    card = DatasetCard.load(root / "README.md")
    data = card.data.to_dict()
    assert data["pretty_name"] == "MFPO quickstart sample" and data["license"] == "unknown"
    split_files = [{"split": s, "path": f"data/{s}-*"} for s in ("train", "test")]
    assert data["configs"] == [{"config_name": "default", "data_files": split_files}]
    assert {"mfpo", "preference", "dpo", "multimodal", "vision-language"} <= set(data["tags"])
    assert data["task_categories"] == ["image-text-to-text"] and data["size_categories"] == ["n<1K"]
    assert data["source_datasets"] == ["original"]
    # dataset_info is what `datasets` itself reads back from a card: the features are the shards' features.
    info = DatasetInfosDict.from_dataset_card_data(card.data)["default"]
    shard = sorted((root / "data").glob("*.parquet"))[0]
    assert info.features == Features.from_arrow_schema(pq.read_schema(shard))
    counts = {s: sum(_split(r) == s for r in _source_rows()) for s in ("train", "test")}
    assert counts["test"] > 0 and {s: info.splits[s].num_examples for s in counts} == counts
    # Pictures: embedded by relative path, committed next to the card.
    for picture in (
        "mfpo/sheet.png",
        "mfpo/plots/difficulty_by_bucket.png",
        "mfpo/plots/mask_area.png",
        "mfpo/plots/boxes_per_image.png",
        "mfpo/plots/key_phrases.png",
    ):
        assert f"]({picture})" in card.text and Image.open(root / picture).format == "PNG"
    body = card.text
    assert "| easy | 9 |" in body and "| medium | 10 |" in body and "| hard | 9 |" in body
    assert "t = 500 of 1000 (sigmoid betas 1e-05..0.005" in body and "`global-noise`" in body
    assert "@inproceedings{jiang2025mfpo" in body and "DPOTrainer" in body and "python -m pipeline train" in body
    assert "The reference log-probs (`ref_logp_*`) were computed with" in body and "weights `sha256:" in body
    # mfpo/pipeline.yaml is the configuration that made the dataset: loaded back, same fingerprints.
    original = Runner(
        load_config(REPO / "examples" / "quickstart.yaml", [a for a in _args(quickstart) if a != "--set"])
    )
    resolved = Runner(load_config(root / "mfpo" / "pipeline.yaml"))
    assert resolved.fingerprints() == original.fingerprints()
    summary = json.loads((root / "mfpo" / "summary.json").read_text())
    assert summary["splits"] == counts and summary["buckets"] == {"easy": 9, "medium": 10, "hard": 9}


@pytest.mark.ray
def test_preview_of_one_bucket(quickstart: Path, tmp_path: Path):
    out = tmp_path / "hard"
    cli(
        "preview",
        "examples/quickstart.yaml",
        *_args(quickstart),
        "--bucket",
        "hard",
        "--n",
        "4",
        "--out",
        str(out),
        check=True,
    )
    ids = [r["sample_id"] for r in json.loads((out / "sheet.json").read_text())["rows"]]
    buckets = {r["sample_id"]: r["bucket"] for r in pq.read_table(quickstart / "dataset" / "data").to_pylist()}
    assert len(ids) == 4 and {buckets[i] for i in ids} == {"hard"}
    bad = cli("preview", "examples/quickstart.yaml", *_args(quickstart), "--bucket", "hardest")
    assert bad.returncode == 1 and "no such bucket (this dataset has easy, hard, medium)" in bad.stderr


@pytest.mark.ray
def test_card_and_status(quickstart: Path):
    card = (quickstart / "dataset" / "README.md").read_text(encoding="utf-8")
    n = len(_source_rows())
    assert f"| ingest | {n} | {n} | 0 |" in card
    assert "| `images` | list of Image |" in card and "| `rejected_image` | Image |" in card
    args = _args(quickstart)
    status = json.loads(cli("status", "examples/quickstart.yaml", "--json", *args, check=True).stdout)
    names = ["ingest", "keywords", "ground", "segment", "perturb", "score", "bucket", "write"]
    assert [(s["name"], s["state"], s["rows_kept"]) for s in status["stages"]] == [(x, "done", n) for x in names]
    # Rows hold no absolute paths: nothing machine-specific leaks into the data.
    for f in (quickstart / "dataset" / "data").glob("*.parquet"):
        table = pq.read_table(f, columns=["meta", "source"])
        assert str(REPO) not in str(table.to_pylist()) and str(quickstart) not in str(table.to_pylist())
