"""Held-out splits and the final files: `write.splits` puts each *picture* in one split (a hash of its decoded
pixels), so several questions about one picture never straddle train and test; each split is written as files
of at most about `write.max_shard_size` bytes, with the same bytes at any shard size and after a crash at any
point (in the stages or while the final files are written); a split that gets no rows has no file and no
place in the card, and `load_dataset` of the folder works at every row count."""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import SAMPLE_JSONL, cli, tree, write_config

import pipeline.compact

SPLITS = {"train": 0.7, "test": 0.3}
MAX = "100KB"  # the sample's rows are ~35 KB each: several files per split
NAME = re.compile(r"^(train|test)-(\d{5})-of-(\d{5})\.parquet$")


def _stages(**write) -> dict:
    return {
        "ingest": {"source": str(SAMPLE_JSONL), "format": "rlhf-v"},
        "write": {"splits": SPLITS, "card": True, "max_shard_size": MAX, **write},
    }


def _data(out: Path) -> dict[str, bytes]:
    return {k: v for k, v in tree(out / "dataset" / "data").items()}


def _column(files: dict[str, bytes], split: str, column: str) -> list:
    return [
        value
        for name, data in sorted(files.items())
        if name.startswith(f"{split}-")
        for value in pq.read_table(io.BytesIO(data), columns=[column])[column].to_pylist()
    ]


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("split")
    cfg = write_config(root / "cfg.yaml", SAMPLE_JSONL, root / "out", stages=_stages(), shard_size=5)
    cli("run", str(cfg), check=True)
    return cfg, root / "out"


def test_every_picture_is_in_one_split(first):
    _, out = first
    files = _data(out)
    train, test = _column(files, "train", "sample_id"), _column(files, "test", "sample_id")
    assert train and test and not set(train) & set(test)
    assert len(train) + len(test) == 28  # the whole sample, nothing lost or doubled
    pictures = {s: set(_column(files, s, "image_id")) for s in ("train", "test")}
    assert not pictures["train"] & pictures["test"]
    # The sample asks several questions about some pictures: 28 rows, 21 distinct images.
    assert len(pictures["train"] | pictures["test"]) == 21


def test_files_are_sized_by_bytes_and_named_consistently(first):
    _, out = first
    files = _data(out)
    record = json.loads((out / "write" / "_compact.json").read_text())
    for split in ("train", "test"):
        names = sorted(n for n in files if n.startswith(f"{split}-"))
        totals = {NAME.match(n).group(3) for n in names}
        assert totals == {f"{len(names):05d}"} and [int(NAME.match(n).group(2)) for n in names] == list(
            range(len(names))
        )
        rows = [pq.read_metadata(io.BytesIO(files[n])).num_rows for n in names]
        assert all(rows), rows  # no empty file
        # Files no more than ceil(bytes / max_shard_size): the rows' bytes, as the engine sizes them.
        sizes = sum(
            int(pipeline.compact.row_nbytes(pq.read_table(io.BytesIO(files[n]))).sum()) for n in names
        )
        assert len(names) <= math.ceil(sizes / 100_000)
        assert split == "test" or len(names) > 1  # train: several files
        assert record["plan"][split]["cuts"][-1] == sum(rows)
    assert not any(n.endswith(".parquet") for n in tree(out / "dataset") if not n.startswith("data/"))


@pytest.mark.slow
def test_the_same_bytes_at_another_shard_size(first, tmp_path):
    _, out = first
    cfg = write_config(tmp_path / "cfg.yaml", SAMPLE_JSONL, tmp_path / "out", stages=_stages(), shard_size=3)
    cli("run", str(cfg), check=True)
    assert _data(tmp_path / "out") == _data(out)


@pytest.mark.slow
def test_a_crash_while_the_final_files_are_written_resumes_to_the_same_bytes(first, tmp_path, monkeypatch):
    """In-process: the third final file's write raises (as a kill would stop it), after two files were
    renamed into place and a temporary file was left half written; the next run keeps the plan, writes the
    rest and gives the same bytes as the uninterrupted run."""
    from pipeline.config import load_config
    from pipeline.runner import Runner

    _, reference = first
    cfg = write_config(tmp_path / "cfg.yaml", SAMPLE_JSONL, tmp_path / "out", stages=_stages(), shard_size=5)
    real = pipeline.compact._write_file
    calls = []

    def crash_on_third(store, rel, *args):
        calls.append(rel)
        if len(calls) == 3:
            (store.local(rel).parent / f".{Path(rel).name}.tmp-999").write_bytes(b"PAR1 torn")
            raise KeyboardInterrupt  # what a kill looks like from here: nothing after it runs
        return real(store, rel, *args)

    monkeypatch.setattr(pipeline.compact, "_write_file", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        Runner(load_config(str(cfg), [])).run()
    assert not json.loads((tmp_path / "out" / "write" / "_compact.json").read_text())["done"]
    status = json.loads(cli("status", str(cfg), "--json", check=True).stdout)
    assert status["stages"][-1]["state"] == "partial"  # not done: training and push refuse it
    monkeypatch.setattr(pipeline.compact, "_write_file", real)
    cli("run", str(cfg), check=True)
    assert _data(tmp_path / "out") == _data(reference)


@pytest.mark.slow
def test_a_resumed_write_gives_the_same_files(first):
    cfg, out = first
    before = tree(out)
    # A crash in the middle of `write`: three shards not committed, one with its test file torn.
    for k in (0, 3, 5):
        (out / "write" / "_commits" / f"shard-{k:05d}.json").unlink()
    torn = out / "write" / "test" / "shard-00003.parquet"
    torn.write_bytes(torn.read_bytes()[:40])
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


@pytest.mark.slow
@pytest.mark.parametrize("rows", [1, 3, 12, 18])
def test_a_split_with_no_rows_is_left_out_and_the_folder_loads(tmp_path, rows):
    from datasets import load_dataset

    stages = _stages(splits={"train": 0.95, "test": 0.05})
    stages["ingest"]["limit"] = rows
    cfg = write_config(tmp_path / "cfg.yaml", SAMPLE_JSONL, tmp_path / "out", stages=stages, shard_size=2)
    proc = cli("run", str(cfg), check=True)
    files = _data(tmp_path / "out")
    present = {n.split("-", 1)[0] for n in files}
    ds = load_dataset(str(tmp_path / "out" / "dataset"))
    assert set(ds) == present and sum(len(s) for s in ds.values()) == rows
    card = (tmp_path / "out" / "dataset" / "README.md").read_text()
    assert ("data/test-*" in card) == ("test" in present)
    if "test" not in present:
        assert "final files: test has no rows: left out of the files and the card" in proc.stderr


@pytest.mark.slow
def test_split_fractions_are_checked(tmp_path):
    for write, message in (
        ({"splits": {"train": 0.9, "test": 0.2}}, "add up to 1.1, not 1"),
        ({"splits": {"dev": 0.5, "test": 0.5}}, "one split is `train`"),
        ({"splits": {"train": 1.0, "te-st": 0.0}}, "letters, digits and _"),
        ({"max_shard_size": "lots"}, "is not a size"),
    ):
        cfg = write_config(tmp_path / "cfg.yaml", SAMPLE_JSONL, tmp_path / "out", stages=_stages(**write))
        proc = cli("run", str(cfg))
        key = f"stages.write.{next(iter(write))}"
        assert proc.returncode == 2 and key in proc.stderr and message in proc.stderr, proc.stderr


def test_cut_points_are_even_in_bytes_and_never_empty():
    import numpy as np

    cut = pipeline.compact.cut_points
    assert cut(np.array([10] * 10), 30) == [0, 3, 5, 8, 10]  # ceil(100 / 30) = 4 files of about 25 bytes
    assert cut(np.array([1000, 1, 1, 1]), 10) == [0, 1, 2, 3, 4]  # at most one file per row, none empty
    assert cut(np.array([5, 5]), 1000) == [0, 2]
    assert cut(np.zeros(0, np.int64), 10) == [0]
