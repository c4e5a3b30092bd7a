"""The stage interface: one small class per stage, in the `stages` package.

A stage declares the columns it reads (`inputs`) and adds (`outputs`), its resources, and a pydantic
config model. The engine builds one instance per worker, calls `setup()` once (load models there), then
`process_batch()` on Arrow tables, and `teardown()` at the end. A stage never sees Ray, shard files or the
output directory.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from pipeline.determinism import row_rng
from pipeline.errors import RowError
from pipeline.strict import StrictModel  # re-exported: stages and sections import it from here

if TYPE_CHECKING:
    from pipeline.compact import FinalFiles

# Images travel between stages in the storage layout of `datasets.Image`, so the final dataset can
# declare them as Image features without copying bytes around.
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
ALL_COLUMNS = "*"
# Schema metadata keys with this prefix are provenance a stage records about its columns (e.g. which
# reference model computed them): the engine carries them to every later stage that reads those columns.
PROVENANCE_PREFIX = b"mfpo."
# Set in a worker the executor started without the GPUs its stages asked for, after telling the user once for
# the run: a stage need not repeat that it runs on CPU.
NO_GPU_REPORTED = "MFPO_NO_GPU_REPORTED"


class ResourcesConfig(StrictModel):
    """How a stage is scheduled. Not part of the stage fingerprint: it changes speed, not results."""

    cpus: float = Field(0.5, gt=0, description="CPUs reserved per worker (fractional is fine).")
    gpus: float = Field(0.0, ge=0, description="GPUs per worker; fractional shares one GPU.")
    batch_size: int = Field(32, ge=1, description="Rows per process_batch call.")
    workers: int | Literal["auto"] = Field(
        "auto", description="Ray actor-pool size; auto = as many as the cluster's free CPUs/GPUs allow."
    )


class StageConfig(StrictModel):
    """Base of every stage's config. Fields other than `resources` are fingerprinted."""

    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)

    def fingerprint_fields(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"resources"})


@dataclass(frozen=True)
class Resources:
    cpus: float = 0.5
    gpus: float = 0.0
    batch_size: int = 32
    workers: int | None = None  # None: decided by the executor

    @classmethod
    def from_config(cls, cfg: ResourcesConfig) -> Resources:
        return cls(cfg.cpus, cfg.gpus, cfg.batch_size, None if cfg.workers == "auto" else cfg.workers)


@dataclass(frozen=True)
class StageContext:
    """What a stage may know about the run. Picklable: it travels to Ray workers."""

    stage: str
    seed: int
    run_name: str

    def rng(self, sample_id: str) -> np.random.Generator:
        """Randomness for one row, derived from (seed, sample_id, stage) only."""
        return row_rng(self.seed, sample_id, self.stage)


@dataclass
class Rejection:
    """A row a stage could not process, with the reason and the original fields."""

    sample_id: str
    reason: str
    fields: dict[str, Any] = field(default_factory=dict)
    payload: bytes | None = None  # e.g. the undecodable image bytes, kept for inspection


@dataclass
class BatchResult:
    table: pa.Table
    rejected: list[Rejection] = field(default_factory=list)


class Stage(ABC):
    """Base class. Subclasses set the class attributes and implement `process_batch`."""

    name: ClassVar[str]
    Config: ClassVar[type[StageConfig]] = StageConfig
    version: ClassVar[int] = 1  # bump when the output changes for the same config
    inputs: ClassVar[tuple[str, ...] | str] = ()  # columns read; ALL_COLUMNS for every column so far
    outputs: ClassVar[tuple[str, ...]] = ()  # columns added (sample_id is implicit)
    is_source: ClassVar[bool] = False  # source stages plan their input rows (see SourceStage)
    # Columns this stage must see for *every* row before it can process any shard (e.g. to rank rows):
    # the engine reads them from all committed upstream shards and hands them to `prepare()`.
    global_inputs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: StageConfig, context: StageContext) -> None:
        self.config = config
        self.context = context
        self.prepared: Any = None  # what prepare() returned, on every worker

    @property
    def resources(self) -> Resources:
        return Resources.from_config(self.config.resources)

    @property
    def loads_model(self) -> bool:
        """Whether setup() loads model weights: the engine fuses at most one such stage into a worker pass, so a
        worker never holds two models at once."""
        return False

    def setup(self) -> None:  # noqa: B027 - optional hook
        """Load models or open sources, once per worker."""

    def check(self) -> list[str]:
        """Driver side, before any worker starts: problems setup() would hit on every worker (a missing
        optional package, a local model directory that does not exist), each one line naming the config key
        and the fix. Nothing slow: no model is loaded here."""
        return []

    def prepare(self, table: pa.Table) -> Any:
        """Driver side, once, for stages with `global_inputs`: `table` holds sample_id and those columns
        for every row. Return something picklable; workers find it in `self.prepared`."""
        return None

    def fingerprint_extra(self) -> Any:
        """Anything besides the config that determines the output (e.g. the source file's hash)."""
        return None

    def reads_from(self) -> list[str]:
        """Files and folders outside the run that this stage reads (local paths or URIs). The engine refuses a
        run whose output folder lies inside one of them, or holds one: it would read its own output, or
        delete its input when a stage is redone."""
        return []

    @abstractmethod
    def output_schema(self, input_schema: pa.Schema) -> pa.Schema:
        """Schema of the table `process_batch` returns: sample_id plus `outputs`."""

    @abstractmethod
    def process_batch(self, table: pa.Table) -> BatchResult:
        """Process rows; return the kept rows (same order) and the rejected ones."""

    # Where a shard of this stage is written, relative to the run's output directory.
    def output_path(self, shard: int, num_shards: int) -> str:
        return f"{self.name}/shard-{shard:05d}.parquet"

    def output_root(self) -> str:
        """Folder holding this stage's data shards (wiped when the stage is redone)."""
        return self.name

    def output_files(self, table: pa.Table, shard: int, num_shards: int) -> list[tuple[str, pa.Table]]:
        """The files a shard's kept rows are written as: (path relative to the run's output, rows). One file,
        `output_path`, by default; a stage may spread its rows over several (the write stage's splits). The
        same files must be written whatever the rows (empty ones too), so a redone shard leaves none behind.
        Later stages read `output_path`: only a last stage may split."""
        return [(self.output_path(shard, num_shards), table)]

    def final_files(self, num_shards: int) -> FinalFiles | None:
        """A last stage's rows republished, once every shard is committed, as files sized by bytes instead of
        one per shard (pipeline.compact); None: the shards are the output."""
        return None

    def teardown(self) -> None:  # noqa: B027 - optional hook
        """Release what setup() opened (worker processes, sockets), once per worker when its work is done."""


class RowStage(Stage):
    """A stage that maps rows one at a time; raise RowError to quarantine a row."""

    @abstractmethod
    def process_row(self, row: dict[str, Any]) -> dict[str, Any]:
        """Return the output columns for one row (without sample_id)."""

    def process_batch(self, table: pa.Table) -> BatchResult:
        return map_rows(self, table.to_pylist(), self.process_row, table.schema)


def map_rows(stage: Stage, rows: Iterable[dict[str, Any]], fn: Any, input_schema: pa.Schema) -> BatchResult:
    kept: list[dict[str, Any]] = []
    rejected: list[Rejection] = []
    for row in rows:
        try:
            out = fn(row)
        except RowError as err:
            rejected.append(Rejection(row["sample_id"], err.reason, _describe(row), err.payload))
            continue
        kept.append({"sample_id": row["sample_id"], **out})
    schema = stage.output_schema(input_schema)
    return BatchResult(pa.Table.from_pylist(kept, schema=schema), rejected)


def _describe(row: dict[str, Any]) -> dict[str, Any]:
    """Row fields for the quarantine record; binary values are summarised, not copied."""
    return {k: describe_value(v) for k, v in row.items()}


def describe_value(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return {"bytes": len(value)}
    if isinstance(value, dict):
        return {k: describe_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [describe_value(v) for v in value]
    return value


class SourceStage(Stage):
    """The first stage: it reads rows from outside the run.

    `plan()` runs once on the driver and returns one row per input row, in output order, with at least
    `sample_id`; the engine stores the plan and cuts it into shards of `run.shard_size` rows (or the
    size it chose for `auto`). Each
    shard's slice of the plan is then the `table` handed to `process_batch`, which reads the rows it
    names from the source.
    """

    is_source: ClassVar[bool] = True

    @abstractmethod
    def plan(self) -> pa.Table:
        """The ordered input rows (at least a `sample_id` column)."""
