"""Reading a finished dataset for pictures and cards: only the columns and rows asked for, shard by shard,
so memory follows the sample shown, not the dataset's size."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mfpo.publish.contract import shard_files
from pipeline.determinism import stable_hash
from pipeline.errors import PipelineError

SHARD_NAME = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-(?P<index>\d{5})-of-(?P<total>\d{5})\.parquet$")
# What the sheet, the page and the plots read; image columns are read only for the rows shown.
SUMMARY_COLUMNS = ("sample_id", "bucket", "difficulty", "mask_area", "boxes", "key_phrases", "perturbation")


def shards(dataset_dir: Path) -> list[Path]:
    files = shard_files(dataset_dir)
    if not files:
        raise PipelineError(f"no dataset shards under {Path(dataset_dir) / 'data'}: run the pipeline first")
    return files


def splits(dataset_dir: Path) -> dict[str, list[Path]]:
    """Split name -> its shards, from the `<split>-XXXXX-of-YYYYY.parquet` names; `train` first (the split the
    Hub's viewer and `load_dataset` users meet first), the others by name."""
    out: dict[str, list[Path]] = {}
    for f in shards(dataset_dir):
        m = SHARD_NAME.match(f.name)
        out.setdefault(m.group("split") if m else "train", []).append(f)
    return dict(sorted(out.items(), key=lambda item: (item[0] != "train", item[0])))


def column_names(dataset_dir: Path) -> list[str]:
    return pq.read_schema(shards(dataset_dir)[0]).names


def read_columns(dataset_dir: Path, columns: Iterable[str]) -> pa.Table:
    """The named columns that exist, for every row, in shard order."""
    names = column_names(dataset_dir)
    wanted = [c for c in columns if c in names]
    return pa.concat_tables(pq.read_table(f, columns=wanted) for f in shards(dataset_dir))


def pick_samples(dataset_dir: Path, n: int, seed: int, bucket: str | None = None) -> list[str]:
    """`n` sample_ids chosen by a hash of (seed, sample_id): the same rows for the same dataset and seed.
    Shown easiest first (by difficulty where the dataset has it, then by id)."""
    table = read_columns(dataset_dir, ("sample_id", "bucket", "difficulty"))
    if bucket is not None:
        if "bucket" not in table.column_names:
            raise PipelineError("--bucket: this dataset has no `bucket` column (add the bucket stage)")
        present = sorted(set(table["bucket"].to_pylist()))
        if bucket not in present:
            raise PipelineError(f"--bucket {bucket}: no such bucket (this dataset has {', '.join(present)})")
        table = table.filter(pc.equal(table["bucket"], bucket))
    rows = table.to_pylist()
    chosen = sorted(rows, key=lambda r: stable_hash(seed, r["sample_id"], "preview"))[:n]
    return [r["sample_id"] for r in sorted(chosen, key=lambda r: (r.get("difficulty") or 0.0, r["sample_id"]))]


def load_rows(dataset_dir: Path, sample_ids: list[str], columns: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """The rows with these ids (every column unless `columns`), in the order of `sample_ids`."""
    wanted = set(sample_ids)
    found: dict[str, dict[str, Any]] = {}
    names = column_names(dataset_dir)
    cols = None if columns is None else [c for c in columns if c in names]
    ids_filter = pa.array(sorted(wanted), pa.string())
    for f in shards(dataset_dir):
        table = pq.read_table(f, columns=cols)
        table = table.filter(pc.is_in(table["sample_id"], value_set=ids_filter))
        for row in table.to_pylist():
            found[row["sample_id"]] = row
    return [found[sid] for sid in sample_ids if sid in found]


def bucket_counts(dataset_dir: Path) -> dict[str, int]:
    """Rows per bucket, in the order buckets first appear by difficulty (easy first)."""
    table = read_columns(dataset_dir, ("bucket", "difficulty"))
    if "bucket" not in table.column_names:
        return {}
    rows = table.to_pylist()
    counts = Counter(r["bucket"] for r in rows)
    order = sorted(counts, key=lambda b: min(r.get("difficulty") or 0.0 for r in rows if r["bucket"] == b))
    return {b: counts[b] for b in order}


def key_object_counts(dataset_dir: Path) -> dict[str, Any] | None:
    """Where each row's top key phrase came from (`key_phrase_sources`) and how many rows' top phrase got a box;
    None for a dataset made without those columns."""
    table = read_columns(dataset_dir, ("key_phrases", "key_phrase_sources", "unboxed_phrases"))
    if not {"key_phrases", "key_phrase_sources", "unboxed_phrases"} <= set(table.column_names):
        return None
    rows = table.to_pylist()
    with_top = [r for r in rows if r["key_phrases"]]
    sources = Counter((r["key_phrase_sources"] or ["?"])[0] for r in with_top)
    grounded = sum(r["key_phrases"][0] not in (r["unboxed_phrases"] or []) for r in with_top)
    return {
        "rows": len(rows),
        "rows_with_key_phrase": len(with_top),
        "top_phrase_grounded": grounded,
        "top_phrase_sources": dict(sources.most_common()),
    }


def quarantined(output_dir: Path, stages: Iterable[str], limit: int | None = None) -> tuple[list[dict[str, Any]], int]:
    """Quarantined rows of these stages, in stage order: ({stage, sample_id, reason, fields, payload}, total)."""
    rows: list[dict[str, Any]] = []
    total = 0
    for stage in stages:
        for f in sorted((Path(output_dir) / "quarantine" / stage).glob("shard-*.parquet")):
            table = pq.read_table(f)
            total += table.num_rows
            room = None if limit is None else max(limit - len(rows), 0)
            if room == 0:
                continue
            for row in table.slice(0, room).to_pylist():
                row["fields"] = json.loads(row["fields"] or "{}")
                rows.append(row)
    return rows, total


def source_images(output_dir: Path, sample_ids: set[str], stage: str = "ingest") -> dict[str, dict[str, Any]]:
    """sample_id -> the stored `image` struct from the source stage's shards (for quarantine thumbnails of rows
    that failed after ingest)."""
    out: dict[str, dict[str, Any]] = {}
    if not sample_ids:
        return out
    ids_filter = pa.array(sorted(sample_ids), pa.string())
    for f in sorted((Path(output_dir) / stage).glob("shard-*.parquet")):
        if "image" not in pq.read_schema(f).names:
            return out
        table = pq.read_table(f, columns=["sample_id", "image"])
        for row in table.filter(pc.is_in(table["sample_id"], value_set=ids_filter)).to_pylist():
            out[row["sample_id"]] = row["image"]
    return out
