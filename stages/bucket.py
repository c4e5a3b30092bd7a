"""bucket: the curriculum's buckets, by rank of difficulty over the whole dataset.

Rows are sorted by (difficulty, sample_id) — ties broken by id, so the order never depends on shards,
workers or executors — and cut into consecutive buckets: `easy` / `medium` / `hard` thirds by default;
`names` and `fractions` set their number and sizes. Ranking needs every row's difficulty, so this stage
reads the `difficulty` column of all shards once (`global_inputs`) before labelling any shard.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import pyarrow as pa
from pydantic import Field, model_validator

from pipeline.registry import register
from pipeline.stage import RowStage, StageConfig


class BucketConfig(StageConfig):
    names: list[str] = Field(
        default_factory=lambda: ["easy", "medium", "hard"],
        min_length=1,
        description="Buckets from easiest to hardest; training follows this order.",
    )
    fractions: list[float] | None = Field(None, description="Share of rows per bucket (default: equal).")

    @model_validator(mode="after")
    def _fractions_match(self) -> BucketConfig:
        if len(set(self.names)) != len(self.names):
            raise ValueError("bucket names must be distinct")
        if self.fractions is not None:
            if len(self.fractions) != len(self.names) or any(f <= 0 for f in self.fractions):
                raise ValueError("fractions needs one positive number per bucket name")
            if not math.isclose(sum(self.fractions), 1.0, abs_tol=1e-6):
                raise ValueError(f"fractions must sum to 1 (got {sum(self.fractions)})")
        return self


def assign_buckets(
    sample_ids: list[str], difficulty: list[float], names: list[str], fractions: list[float] | None
) -> dict[str, str]:
    """sample_id -> bucket, by rank of (difficulty, sample_id)."""
    n = len(sample_ids)
    fractions = fractions or [1.0 / len(names)] * len(names)
    order = sorted(range(n), key=lambda i: (difficulty[i], sample_ids[i]))
    bounds, total = [], 0.0
    for f in fractions:
        total += f
        bounds.append(round(total * n))
    bounds[-1] = n
    out: dict[str, str] = {}
    bucket = 0
    for rank, i in enumerate(order):
        while rank >= bounds[bucket]:
            bucket += 1
        out[sample_ids[i]] = names[bucket]
    return out


@register
class Bucket(RowStage):
    name: ClassVar[str] = "bucket"
    Config = BucketConfig
    inputs: ClassVar[tuple[str, ...]] = ()
    global_inputs: ClassVar[tuple[str, ...]] = ("difficulty",)
    outputs: ClassVar[tuple[str, ...]] = ("bucket",)
    config: BucketConfig

    def prepare(self, table: pa.Table) -> dict[str, str]:
        return assign_buckets(
            table["sample_id"].to_pylist(), table["difficulty"].to_pylist(), self.config.names, self.config.fractions
        )

    def output_schema(self, input_schema: pa.Schema) -> pa.Schema:
        return pa.schema([("sample_id", pa.string()), ("bucket", pa.string())])

    def process_row(self, row: dict[str, Any]) -> dict[str, Any]:
        return {"bucket": self.prepared[row["sample_id"]]}
