"""Where a run's files live, atomic writes, completion records (the commit point) and the run lock.

    <output_dir>/                          a local folder or an object-store URI (s3://, gs://, ...)
      run.log                              the run log (tracebacks, timings)
      <stage>/_stage.json                  fingerprint and shard count of the stage's current outputs
      <stage>/_plan.parquet                source stages: the ordered input rows
      <stage>/shard-00000.parquet          sample_id + the columns the stage adds
      <stage>/_commits/shard-00000.json    completion record: the shard exists iff this exists
      quarantine/<stage>/shard-00000.parquet   rows the stage rejected, with reasons
      dataset/                             the final dataset (written by the `write` stage)

Commit protocol, the same on every store: a worker writes its shard (and quarantine shard) itself; the
driver then writes the completion record. Local files are written under a temporary name, fsynced and
renamed; an object-store PUT is atomic by itself (the object appears whole or not at all). A crash
before the record leaves at most an orphan object that resume overwrites; nothing reads a shard
without a record.

`Store` (pipeline.store) is the one place that knows about filesystems (fsspec): stages never see a path, and
workers open the store from its URI, so nothing they touch is a path resolved on the driver's disk. Paths and
atomic writes are in pipeline.files, the object-store lease in pipeline.lease; this module keeps the run's
layout, its records and its lock, and re-exports the others' names for the modules that import them from here.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.files import (  # noqa: F401  (re-exported: callers import them from pipeline.storage)
    _PARQUET_OPTIONS,
    atomic_write,
    cache_dir,
    file_sha256,
    filesystem,
    is_uri,
    local_folder,
    local_path,
    mirror_dir,
    nested,
    parquet_bytes,
    write_json,
    write_text,
)
from pipeline.lease import LEASE_TTL_S, _Lease  # noqa: F401
from pipeline.store import SYNC_MANIFEST, Store  # noqa: F401

log = logging.getLogger("mfpo")

QUARANTINE_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("fields", pa.string()),  # JSON of the row's original fields (binary values summarised)
        ("payload", pa.binary()),  # e.g. the bytes of an image that failed to decode
    ]
)


# ---------------------------------------------------------------------------------------------- records
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
    def parse(cls, data: Any) -> CommitRecord | None:
        try:
            return cls(**data)
        except TypeError:
            return None  # missing or torn: the shard is not committed


@dataclass
class StageState:
    """`_stage.json`: which configuration the stage's files on disk belong to."""

    fingerprint: str
    num_shards: int | None = None
    shard_size: int | None = None  # source stages: rows per shard, as chosen when the rows were planned
    inputs: dict[str, Any] | None = None  # what the fingerprint hashed (so `status` can say what changed)

    @classmethod
    def parse(cls, data: Any) -> StageState | None:
        try:
            return cls(**data)
        except TypeError:
            return None


class RunLayout:
    """The files of one run, on its store."""

    def __init__(self, location: str | Path | Store) -> None:
        self.store = location if isinstance(location, Store) else Store(location)

    @property
    def location(self) -> str:
        return self.store.location

    @property
    def root(self) -> Path:
        """A local folder for this run: the output folder itself, or (object stores) its local mirror."""
        return self.store.mirror()

    @property
    def log_path(self) -> Path:
        return self.root / "run.log"

    def state_path(self, stage: str) -> str:
        return f"{stage}/_stage.json"

    def plan_path(self, stage: str) -> str:
        return f"{stage}/_plan.parquet"

    def commit_path(self, stage: str, shard: int) -> str:
        return f"{stage}/_commits/shard-{shard:05d}.json"

    def quarantine_dir(self, stage: str) -> str:
        return f"quarantine/{stage}"

    def quarantine_path(self, stage: str, shard: int) -> str:
        return f"{self.quarantine_dir(stage)}/shard-{shard:05d}.parquet"

    @contextlib.contextmanager
    def lock(self, what: str = "run", shared: bool = False) -> Iterator[None]:
        """One writer per output directory at a time: two runs would commit the same shards, and a push
        while a run rewrites the dataset would publish a mix. `shared`: a reader (a training) that only needs
        no writer. Local: flock, released when the process ends, however it ends. Object stores: a lease
        (see _Lease); a reader checks that no writer holds it but takes none."""
        from pipeline.errors import PipelineError

        if self.store.remote:
            lease = _Lease(self.store, what)
            try:  # the first request to the store: missing credentials or bucket show up here
                record, _ = lease.holder() if shared else (None, None)
                if not shared:
                    lease.acquire()
            except PipelineError:
                raise
            except Exception as err:
                from pipeline.errors import first_line

                raise PipelineError(f"{self.location}: {type(err).__name__}: {first_line(err)}") from err
            if shared:
                if record is not None:
                    lease.refuse(record, what)
                yield
                return
            try:
                yield
            finally:
                lease.release()
            return
        root = self.store.local()
        root.mkdir(parents=True, exist_ok=True)
        with open(root / ".lock", "a") as fh:
            try:
                fcntl.flock(fh, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                raise PipelineError(
                    f"another run, push, train or eval is using {root}; wait for it to finish before this {what}"
                ) from None
            yield

    def read_state(self, stage: str) -> StageState | None:
        return StageState.parse(self.store.read_json(self.state_path(stage)))

    def write_state(self, stage: str, state: StageState) -> None:
        data = asdict(state)
        for optional in ("shard_size", "inputs"):
            if data[optional] is None:
                del data[optional]
        self.store.write_json(self.state_path(stage), data)

    def committed(self, stage: str, fingerprint: str, num_shards: int) -> dict[int, CommitRecord]:
        out: dict[int, CommitRecord] = {}
        names = set(self.store.glob(f"{stage}/_commits/shard-*.json"))
        for k in range(num_shards):
            if self.commit_path(stage, k) not in names:
                continue
            rec = CommitRecord.parse(self.store.read_json(self.commit_path(stage, k)))
            if rec is not None and rec.fingerprint == fingerprint:
                out[k] = rec
        return out

    def commit(self, stage: str, record: CommitRecord) -> None:
        self.store.write_json(self.commit_path(stage, record.shard), asdict(record))

    def reset_stage(self, stage: str, data_root: str) -> None:
        """Remove every file of a stage: records, shards, quarantine (before redoing it)."""
        for rel in {stage, data_root, self.quarantine_dir(stage)}:
            self.store.remove_tree(rel)

    def sweep_run_temp_files(self) -> None:
        """Temporary files of the run's own top-level files (summary.json) that a killed run left behind."""
        if not self.store.remote:
            for tmp in self.store.local().glob(".*.tmp-*"):
                tmp.unlink(missing_ok=True)

    def sweep_temp_files(self, stage: str, data_root: str) -> None:
        """Remove temporary files a killed run left behind (they were never committed). Object stores have
        none: a PUT that did not finish left nothing."""
        if self.store.remote:
            return
        for rel in {stage, data_root, self.quarantine_dir(stage)}:
            folder = self.store.local(rel)
            if folder.is_dir():
                for tmp in folder.rglob(".*.tmp-*"):
                    tmp.unlink(missing_ok=True)
