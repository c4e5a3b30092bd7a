"""A held-out split: `write.splits` puts each row in one split by a hash of its sample_id, so the split is
the same in every run, after a crash and resume, and at any shard size; no row is in two splits, and
`load_dataset` on the finished folder sees every split."""

from __future__ import annotations

import io

import pyarrow.parquet as pq
import pytest
from helpers import SAMPLE_JSONL, cli, tree, write_config

SPLITS = {"train": 0.7, "test": 0.3}


def _stages() -> dict:
    return {
        "ingest": {"source": str(SAMPLE_JSONL), "format": "rlhf-v"},
        "write": {"splits": SPLITS, "card": True},
    }


def _ids(files: dict[str, bytes], split: str) -> list[str]:
    return [
        sid
        for name, data in sorted(files.items())
        if name.startswith(f"dataset/data/{split}-")
        for sid in pq.read_table(io.BytesIO(data), columns=["sample_id"])["sample_id"].to_pylist()
    ]


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("split")
    cfg = write_config(root / "cfg.yaml", SAMPLE_JSONL, root / "out", stages=_stages(), shard_size=5)
    cli("run", str(cfg), check=True)
    return cfg, root / "out"


def test_every_row_is_in_exactly_one_split_and_runs_agree(first, tmp_path):
    _, out = first
    files = tree(out / "dataset")
    files = {f"dataset/{k}": v for k, v in files.items()}
    train, test = _ids(files, "train"), _ids(files, "test")
    assert train and test and not set(train) & set(test)
    assert len(train) + len(test) == 28  # the whole sample, nothing lost or doubled
    shards = sorted(k for k in files if k.startswith("dataset/data/"))
    assert len(shards) == 2 * 6  # every shard writes both splits (6 shards of <= 5 rows)
    # Another run, another shard size: the same rows in each split.
    cfg = write_config(tmp_path / "cfg.yaml", SAMPLE_JSONL, tmp_path / "out", stages=_stages(), shard_size=3)
    cli("run", str(cfg), check=True)
    other = {f"dataset/{k}": v for k, v in tree(tmp_path / "out" / "dataset").items()}
    assert sorted(_ids(other, "train")) == sorted(train) and sorted(_ids(other, "test")) == sorted(test)


def test_a_resumed_write_gives_the_same_files(first):
    cfg, out = first
    before = tree(out)
    # A crash in the middle of `write`: three shards not committed, one with its test file torn, one with
    # its train file missing.
    for k in (0, 3, 5):
        (out / "write" / "_commits" / f"shard-{k:05d}.json").unlink()
    torn = out / "dataset" / "data" / "test-00003-of-00006.parquet"
    torn.write_bytes(torn.read_bytes()[:40])
    (out / "dataset" / "data" / "train-00005-of-00006.parquet").unlink()
    cli("run", str(cfg), check=True)
    after = tree(out)
    changed = sorted(k for k in before if before[k] != after.get(k) and k != "summary.json")
    assert changed == [], changed


def test_load_dataset_sees_both_splits(first):
    from datasets import load_dataset

    _, out = first
    ds = load_dataset(str(out / "dataset"))
    assert set(ds) == {"train", "test"}
    assert len(ds["train"]) + len(ds["test"]) == 28
    assert not set(ds["train"]["sample_id"]) & set(ds["test"]["sample_id"])


def test_split_fractions_are_checked(tmp_path):
    for splits, message in (
        ({"train": 0.9, "test": 0.2}, "add up to 1.1, not 1"),
        ({"dev": 0.5, "test": 0.5}, "one split is `train`"),
        ({"train": 1.0, "te-st": 0.0}, "letters, digits and _"),
    ):
        stages = {**_stages(), "write": {"splits": splits}}
        cfg = write_config(tmp_path / "cfg.yaml", SAMPLE_JSONL, tmp_path / "out", stages=stages)
        proc = cli("run", str(cfg))
        assert proc.returncode == 2 and "stages.write.splits" in proc.stderr and message in proc.stderr, proc.stderr
