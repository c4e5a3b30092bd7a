"""Final files sized by bytes: a last stage's per-shard outputs republished as a few large Parquet files.

Processing shards are small (a few rows per CPU, for an even spread of work); a published dataset is a few
files of up to a few hundred MB (what `datasets`' `push_to_hub` writes). After every shard of the stage is
committed, each group (the write stage's splits) is rewritten as `ceil(bytes / max_bytes)` files (at most one
per row), cut so that each holds about the same number of bytes:

- the rows are read in shard order, which is the source's order whatever `run.shard_size` was, and the cut
  points, the row groups (`rows_per_group` rows each) and so the files' bytes depend on the rows alone;
- a group with no rows gets no file (and so no split in the card);
- memory stays flat: rows stream from one input shard at a time into the output file being written;
- crash safety follows the engine's commit protocol: the plan is recorded first (`_compact.json` in the
  stage's folder, with the stage's fingerprint), each file is written to a temporary name and renamed, and
  the record marked `done` last. A run that finds a record of the same plan keeps the files it finished and
  writes the others; files of another plan are removed first. `complete()` tells the runner whether the
  stage's final files are there.

`row_nbytes` sizes rows as Arrow's buffers would hold them, value by value (so the figure does not depend on
how the rows happen to be chunked); `datasets` sizes a whole table instead (`Table.nbytes`), which would make
the cut points follow the processing shards.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage import _PARQUET_OPTIONS, Store, file_sha256

log = logging.getLogger("mfpo")
RECORD = "_compact.json"


@dataclass(frozen=True)
class FinalFiles:
    """What a stage's committed shards become. `groups`: group name -> that group's shard files (relative to
    the run's output, in shard order); `target`: the output name, formatted with `group`, `index`, `total`."""

    groups: dict[str, list[str]]
    target: str
    max_bytes: int
    rows_per_group: int = 100  # datasets' row-group size for image datasets: the Hub viewer reads one at a time
    if_empty: dict[str, str] = field(default_factory=dict)  # group -> what its having no rows means (logged)


def row_nbytes(table: pa.Table) -> np.ndarray:
    """Bytes each row takes in Arrow's layout (values, offsets, validity), summed over every column."""
    total = np.zeros(table.num_rows, dtype=np.int64)
    for column in table.columns:
        total += _array_nbytes(column.combine_chunks() if column.num_chunks != 1 else column.chunk(0))
    return total


def _array_nbytes(arr: pa.Array) -> np.ndarray:
    n = len(arr)
    kind = arr.type
    if pa.types.is_struct(kind):
        sizes = np.zeros(n, dtype=np.int64)
        for i in range(kind.num_fields):
            sizes += _array_nbytes(arr.field(i))
        return sizes + 1
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        values = arr.values.slice(arr.offsets[0].as_py(), arr.offsets[-1].as_py() - arr.offsets[0].as_py())
        parents = np.asarray(pa.compute.list_parent_indices(arr))
        per_value = _array_nbytes(values)
        return np.bincount(parents, weights=per_value, minlength=n).astype(np.int64) + 5
    if pa.types.is_binary(kind) or pa.types.is_string(kind) or pa.types.is_large_binary(kind):
        lengths = pa.compute.binary_length(arr).fill_null(0)
        return np.asarray(lengths, dtype=np.int64) + 5
    if pa.types.is_null(kind):
        return np.zeros(n, dtype=np.int64)
    width = kind.bit_width // 8 if kind.bit_width >= 8 else 1
    return np.full(n, width + 1, dtype=np.int64)


def cut_points(sizes: np.ndarray, max_bytes: int) -> list[int]:
    """Row offsets [0, ..., len(sizes)] splitting rows into `ceil(total / max_bytes)` contiguous files of about
    equal bytes (no more files than rows, none empty)."""
    rows = len(sizes)
    if rows == 0:
        return [0]
    total = int(sizes.sum())
    files = min(rows, max(1, math.ceil(total / max_bytes)))
    before = np.concatenate([[0], np.cumsum(sizes)[:-1]])  # bytes of the rows before each row
    cuts = [0]
    for i in range(1, files):
        at = int(np.searchsorted(before, total * i / files, side="left"))
        cuts.append(min(max(at, cuts[-1] + 1), rows - (files - i)))
    cuts.append(rows)
    return cuts


def _plan(store: Store, spec: FinalFiles) -> dict[str, dict[str, list[int]]]:
    """group -> {cuts: its cut points, rows: rows per shard}, from the rows' sizes (one shard read at a time)."""
    plan = {}
    for group, paths in spec.groups.items():
        sizes = [row_nbytes(store.read_parquet(p)) for p in paths]
        every = np.concatenate(sizes) if sizes else np.zeros(0, np.int64)
        plan[group] = {"cuts": cut_points(every, spec.max_bytes), "rows": [len(s) for s in sizes]}
    return plan


def _names(spec: FinalFiles, plan: dict[str, dict[str, list[int]]]) -> dict[str, tuple[str, int, int]]:
    """output name -> (group, first row, end row)."""
    out = {}
    for group, part in plan.items():
        cuts = part["cuts"]
        total = len(cuts) - 1
        if cuts[-1] == 0:
            continue  # no rows: no file
        for i in range(total):
            out[spec.target.format(group=group, index=i, total=total)] = (group, cuts[i], cuts[i + 1])
    return out


def _rows(store: Store, paths: list[str], counts: list[int], start: int, stop: int) -> Iterator[pa.Table]:
    """Rows [start, stop) of the concatenated shards, one shard's slice at a time."""
    offset = 0
    for p, n in zip(paths, counts, strict=True):
        if offset + n > start and offset < stop:
            table = store.read_parquet(p)
            yield table.slice(max(start - offset, 0), min(stop, offset + n) - max(start, offset))
        offset += n
        if offset >= stop:
            return


def _write_file(store: Store, rel: str, schema: pa.Schema, tables: Iterator[pa.Table], rows_per_group: int) -> str:
    """Stream the rows into one Parquet file, in row groups of exactly `rows_per_group` rows (the last one
    shorter) whatever the input slices, written to a temporary name and renamed; returns its sha256."""
    local = store.root is not None
    final = store.local(rel) if local else store.mirror() / ".compact" / rel
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        with pq.ParquetWriter(tmp, schema, **_PARQUET_OPTIONS) as writer:
            pending: list[pa.Table] = []
            held = 0
            for table in tables:
                pending.append(table)
                held += table.num_rows
                while held >= rows_per_group:
                    joined = pa.concat_tables(pending)
                    writer.write_table(joined.slice(0, rows_per_group).combine_chunks())
                    rest = joined.slice(rows_per_group)
                    pending, held = [rest], rest.num_rows
            if held:
                writer.write_table(pa.concat_tables(pending).combine_chunks())
        sha = file_sha256(tmp)
        if local:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        else:
            store.fs.put_file(str(tmp), store._path(rel))
    finally:
        tmp.unlink(missing_ok=True)
    return sha


def complete(store: Store, record_dir: str, fingerprint: str) -> bool:
    record = store.read_json(f"{record_dir}/{RECORD}")
    return isinstance(record, dict) and record.get("fingerprint") == fingerprint and record.get("done") is True


def compact(store: Store, spec: FinalFiles, record_dir: str, fingerprint: str) -> None:
    """Write the final files, resuming a plan a killed run started (the caller skips this when `complete()`)."""
    rel_record = f"{record_dir}/{RECORD}"
    record = store.read_json(rel_record)
    key = {"fingerprint": fingerprint, "max_bytes": spec.max_bytes, "rows_per_group": spec.rows_per_group}
    same_plan = isinstance(record, dict) and all(record.get(k) == v for k, v in key.items())
    if same_plan:
        plan = record["plan"]
    else:
        plan = _plan(store, spec)
        store.write_json(rel_record, {**key, "plan": plan, "done": False})
    names = _names(spec, plan)
    folder = os.path.dirname(spec.target)
    for rel in store.glob(f"{folder}/*.parquet"):
        if rel not in names or not same_plan:
            store.remove(rel)  # another plan's file, or one no record vouches for
    schema = None
    files: dict[str, dict[str, int]] = {}
    for name, (group, start, stop) in names.items():
        paths = spec.groups[group]
        if schema is None:
            schema = store.read_parquet_schema(paths[0])
        if same_plan and store.exists(name):
            log.debug("final files: %s already written", name)
        else:
            rows = _rows(store, paths, plan[group]["rows"], start, stop)
            _write_file(store, name, schema, rows, spec.rows_per_group)
        files[name] = {"rows": stop - start}
    store.write_json(rel_record, {**key, "plan": plan, "done": True, "files": files})
    for group, part in plan.items():
        if part["cuts"][-1]:
            log.info("final files: %s: %d row(s) in %d file(s)", group, part["cuts"][-1], len(part["cuts"]) - 1)
        else:
            log.warning("final files: %s has no rows: %s", group, spec.if_empty.get(group, "no file for it"))
