"""On-disk layout of a run, atomic shard writes and completion records (the commit point).

    <output_dir>/
      run.log                              the run log (tracebacks, timings)
      <stage>/_stage.json                  fingerprint and shard count of the stage's current outputs
      <stage>/_plan.parquet                source stages: the ordered input rows
      <stage>/shard-00000.parquet          sample_id + the columns the stage adds
      <stage>/_commits/shard-00000.json    completion record: the shard exists iff this exists
      quarantine/<stage>/shard-00000.parquet   rows the stage rejected, with reasons
      dataset/                             the final dataset (written by the `write` stage)

A shard file is written under a temporary name, fsynced and renamed; then the driver writes the
completion record the same way. A crash before the record leaves at most an orphan file that resume
overwrites; resume never reads a shard without a record.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

QUARANTINE_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("fields", pa.string()),  # JSON of the row's original fields (binary values summarised)
        ("payload", pa.binary()),  # e.g. the bytes of an image that failed to decode
    ]
)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through `write(tmp_path)`, fsync, then rename onto `path` (atomic on POSIX)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def write_parquet(path: Path, table: pa.Table) -> str:
    """Atomically write a Parquet file; returns the sha256 of its bytes."""
    # Fixed writer options so that the same table gives the same bytes on every machine.
    options = {"compression": "zstd", "write_statistics": True, "store_schema": True}

    def write(tmp: Path) -> None:
        with pq.ParquetWriter(tmp, table.schema, **options) as writer:
            # An empty table gets no row group at all: readers that size their batches from the first
            # row group (datasets' parquet loader) fail on a zero-row group.
            if table.num_rows:
                writer.write_table(table, row_group_size=64)

    atomic_write(path, write)
    return file_sha256(path)


def write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class CommitRecord:
    shard: int
    fingerprint: str
    rows_in: int
    rows_out: int
    rows_quarantined: int
    data_sha256: str
    reasons: dict[str, int] = field(default_factory=dict)  # quarantine reason kind -> count

    @classmethod
    def read(cls, path: Path) -> CommitRecord | None:
        try:
            return cls(**json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            return None  # missing or torn: the shard is not committed


@dataclass
class StageState:
    """`_stage.json`: which configuration the stage's files on disk belong to."""

    fingerprint: str
    num_shards: int | None = None

    @classmethod
    def read(cls, path: Path) -> StageState | None:
        try:
            return cls(**json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            return None


class RunLayout:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def log_path(self) -> Path:
        return self.root / "run.log"

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def state_path(self, stage: str) -> Path:
        return self.stage_dir(stage) / "_stage.json"

    def plan_path(self, stage: str) -> Path:
        return self.stage_dir(stage) / "_plan.parquet"

    def commit_path(self, stage: str, shard: int) -> Path:
        return self.stage_dir(stage) / "_commits" / f"shard-{shard:05d}.json"

    def quarantine_dir(self, stage: str) -> Path:
        return self.root / "quarantine" / stage

    def quarantine_path(self, stage: str, shard: int) -> Path:
        return self.quarantine_dir(stage) / f"shard-{shard:05d}.parquet"

    @contextlib.contextmanager
    def lock(self, what: str = "run", shared: bool = False) -> Iterator[None]:
        """One writer per output directory at a time: two runs would commit the same shards, and a push
        while a run rewrites the dataset would publish a mix. `shared`: a reader (a training) that only needs
        no writer. Released when the process ends, however it ends."""
        from pipeline.errors import PipelineError

        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as fh:
            try:
                fcntl.flock(fh, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                raise PipelineError(
                    f"another run, push or train is using {self.root}; wait for it to finish before this {what}"
                ) from None
            yield

    def read_state(self, stage: str) -> StageState | None:
        return StageState.read(self.state_path(stage))

    def committed(self, stage: str, fingerprint: str, num_shards: int) -> dict[int, CommitRecord]:
        out: dict[int, CommitRecord] = {}
        for k in range(num_shards):
            rec = CommitRecord.read(self.commit_path(stage, k))
            if rec is not None and rec.fingerprint == fingerprint:
                out[k] = rec
        return out

    def commit(self, stage: str, record: CommitRecord) -> None:
        write_json(self.commit_path(stage, record.shard), asdict(record))

    def reset_stage(self, stage: str, data_root: str) -> None:
        """Remove every file of a stage: records, shards, quarantine (before redoing it)."""
        for path in {self.stage_dir(stage), self.root / data_root, self.quarantine_dir(stage)}:
            if path.resolve() == self.root.resolve():
                raise ValueError(f"refusing to delete the whole output directory for stage {stage}")
            shutil.rmtree(path, ignore_errors=True)

    def sweep_temp_files(self, stage: str, data_root: str) -> None:
        """Remove temporary files a killed run left behind (they were never committed)."""
        for folder in {self.stage_dir(stage), self.root / data_root, self.quarantine_dir(stage)}:
            if folder.is_dir():
                for tmp in folder.rglob(".*.tmp-*"):
                    tmp.unlink(missing_ok=True)
