"""What a worker does with one shard: read its input, run the stage batch by batch, write the outputs.

`run_pass` runs one shard through several consecutive stages (a fused pass): each stage writes its own
shard files as usual, and the next stage takes them from memory instead of reading them back, with each
image decoded once for the whole pass. The same functions run in-process (local executor) and inside Ray
actors, so both executors produce the same bytes. The completion records are written by the driver once a
pass returns.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import PipelineError, in_stage
from pipeline.images import decode_once
from pipeline.registry import get_stage
from pipeline.stage import PROVENANCE_PREFIX, Rejection, Stage, StageConfig, StageContext
from pipeline.storage import QUARANTINE_SCHEMA, CommitRecord, Store


@dataclass(frozen=True)
class StageSpec:
    """Everything a worker needs to build a stage: picklable, no live objects."""

    name: str
    config: StageConfig
    context: StageContext
    prepared: Any = None  # the driver's prepare() result, for stages with global inputs

    def build(self) -> Stage:
        stage = get_stage(self.name)(self.config, self.context)
        stage.prepared = self.prepared
        return stage


@dataclass(frozen=True)
class PassSpec:
    """The stages a worker runs one after another on each shard it is given (see pipeline.schedule)."""

    key: int
    stages: tuple[StageSpec, ...]

    def stage(self, name: str) -> StageSpec:
        return next(s for s in self.stages if s.name == name)


@dataclass(frozen=True)
class InputPart:
    """Columns to read from one upstream stage's shard."""

    path: str  # relative to the run's store
    columns: tuple[str, ...]


@dataclass
class ShardTask:
    stage: str
    shard: int
    num_shards: int
    store: Store  # the run's output folder or bucket: the worker opens it itself
    quarantine: str  # path of the quarantine shard, relative to the store
    plan: pa.Table | None = None  # source stages: this shard's slice of the plan
    survivors: str | None = None  # previous stage's shard: its sample_ids are the rows to process
    parts: list[InputPart] = field(default_factory=list)
    columns: tuple[str, ...] = ()  # column order handed to the stage


@dataclass
class PassTask:
    """One shard for the stages of a pass that have not committed it yet, in stage order."""

    shard: int
    steps: list[ShardTask]


@dataclass
class ShardResult:
    stage: str
    shard: int
    rows_in: int
    rows_out: int
    rows_quarantined: int
    data_sha256: str
    reasons: dict[str, int]

    def record(self, fingerprint: str) -> CommitRecord:
        """The shard's commit record under its stage's fingerprint."""
        fields = asdict(self)
        del fields["stage"]  # the record's path names the stage
        return CommitRecord(fingerprint=fingerprint, **fields)


# Shard files written earlier in the same pass, by path: what `load_input` would read back from the store.
Written = dict[str, pa.Table]


def _read(task: ShardTask, path: str, columns: list[str], written: Written | None) -> pa.Table:
    if written is not None and path in written:
        return written[path].select(columns)
    return task.store.read_parquet(path, columns=columns)


def load_input(task: ShardTask, written: Written | None = None) -> pa.Table:
    """The rows a stage processes for one shard: upstream columns joined on sample_id."""
    if task.plan is not None:
        return task.plan
    assert task.survivors is not None
    ids = _read(task, task.survivors, ["sample_id"], written).column("sample_id").combine_chunks()
    columns: dict[str, pa.ChunkedArray | pa.Array] = {"sample_id": ids}
    metadata: dict[bytes, bytes] = {}
    for part in task.parts:
        table = _read(task, part.path, ["sample_id", *part.columns], written)
        # Provenance a stage recorded about its columns (`mfpo.*` schema metadata) travels with them.
        metadata.update({k: v for k, v in (table.schema.metadata or {}).items() if k.startswith(PROVENANCE_PREFIX)})
        # Every stage keeps its input order and only drops rows, so filtering an earlier stage's shard
        # by the survivors of the previous one lines the rows up.
        table = table.filter(pc.is_in(table["sample_id"], value_set=ids))
        if not table["sample_id"].combine_chunks().equals(ids):
            raise PipelineError(f"shard {task.shard}: {part.path} is out of step with {task.survivors}")
        for col in part.columns:
            columns[col] = table[col]
    ordered = ["sample_id", *[c for c in task.columns if c != "sample_id"]]
    return pa.table({c: columns[c] for c in ordered}, metadata=metadata or None)


def reason_kind(reason: str) -> str:
    """`"image: truncated file"` -> `"image"`: reasons are `kind: details`, counted by kind."""
    return reason.split(":", 1)[0].strip()[:80]


def run_pass(stages: Callable[[str], Stage], task: PassTask) -> list[ShardResult]:
    """One shard through consecutive stages, each image decoded once. `stages(name)` gives the worker's set-up
    instance of a stage. An exception names the stage it came from (`errors.failed_stage`)."""
    written: Written = {}
    results = []
    with decode_once():
        for step in task.steps:
            with in_stage(step.stage):
                results.append(run_shard(stages(step.stage), step, written=written))
    return results


def run_shard(stage: Stage, task: ShardTask, written: Written | None = None) -> ShardResult:
    table = load_input(task, written)
    schema = stage.output_schema(table.schema)
    batch_size = stage.resources.batch_size
    outputs: list[pa.Table] = []
    rejected: list[Rejection] = []
    for offset in range(0, table.num_rows, batch_size):
        batch = table.slice(offset, batch_size)
        result = stage.process_batch(batch)
        if not result.table.schema.equals(schema):
            raise PipelineError(
                f"stage {stage.name} returned schema {result.table.schema} instead of its declared {schema}"
            )
        if result.table.num_rows + len(result.rejected) != batch.num_rows:
            raise PipelineError(
                f"stage {stage.name} lost rows: {batch.num_rows} in, {result.table.num_rows} kept, "
                f"{len(result.rejected)} rejected"
            )
        outputs.append(result.table)
        rejected.extend(result.rejected)
    out = pa.concat_tables(outputs) if outputs else schema.empty_table()
    if rejected:
        task.store.write_parquet(task.quarantine, _quarantine_table(stage.name, rejected))
    else:
        task.store.remove(task.quarantine)  # left by an earlier attempt of a redone stage
    shas = []
    for path, part in stage.output_files(out.combine_chunks(), task.shard, task.num_shards):
        shas.append(task.store.write_parquet(path, part))
        if written is not None:
            written[path] = part
    # One file: its hash (what every record held before stages could split); several: a hash of their hashes.
    sha = shas[0] if len(shas) == 1 else hashlib.sha256(" ".join(shas).encode()).hexdigest()
    reasons: dict[str, int] = {}
    for r in rejected:
        kind = reason_kind(r.reason)
        reasons[kind] = reasons.get(kind, 0) + 1
    return ShardResult(
        task.stage, task.shard, table.num_rows, out.num_rows, len(rejected), sha, dict(sorted(reasons.items()))
    )


def _quarantine_table(stage: str, rejected: list[Rejection]) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "sample_id": r.sample_id,
                "stage": stage,
                "reason": r.reason,
                # ASCII JSON: the original fields may hold text that is not valid UTF-8.
                "fields": json.dumps(r.fields, sort_keys=True, ensure_ascii=True, default=repr),
                "payload": r.payload,
            }
            for r in rejected
        ],
        schema=QUARANTINE_SCHEMA,
    )
