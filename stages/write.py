"""write: every column so far -> the final dataset under `<output_dir>/dataset/`.

Shards `data/<split>-XXXXX-of-YYYYY.parquet` (one per input shard) carry the Hugging Face `datasets`
feature metadata, so `load_dataset("parquet", ...)` decodes images as `datasets.Image`. Columns: the TRL
vision-preference ones (`images`, conversational `prompt`/`chosen`/`rejected`), the plain texts
(`question`, `chosen_text`, `rejected_text`) and every other column earlier stages produced. Image
columns (stored as datasets Image structs by the stages) become Image features. The dataset card and
its pictures are made at the end of the run, from the finished shards (mfpo_publish).
"""

from __future__ import annotations

from typing import Any, ClassVar

import pyarrow as pa
from pydantic import Field

from pipeline.registry import register
from pipeline.stage import ALL_COLUMNS, IMAGE_TYPE, PROVENANCE_PREFIX, BatchResult, Stage, StageConfig

CONTENT_TYPE = pa.list_(pa.struct([("type", pa.string()), ("text", pa.string())]))
MESSAGES_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", CONTENT_TYPE)]))
# Columns of earlier stages that the final layout renames or reshapes.
_RESHAPED = {"image", "question", "chosen", "rejected"}


# The card's settings change the card, not the shards: they stay out of the fingerprint.
CARD_FIELDS = {"card", "pretty_name", "license"}


class WriteConfig(StageConfig):
    split: str = Field("train", pattern=r"^[A-Za-z0-9_]+$", description="Split name in the shard names.")
    card: bool = Field(True, description="Write dataset/README.md (a Hub dataset card) and its pictures.")
    pretty_name: str | None = Field(None, description="Title of the dataset card; default: run name.")
    license: str | None = Field(
        None, description="License tag for the card (a Hub license id, e.g. cc-by-nc-4.0); default: unknown."
    )

    def fingerprint_fields(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"resources", *CARD_FIELDS})


@register
class Write(Stage):
    name: ClassVar[str] = "write"
    version: ClassVar[int] = 2  # 2: carries the provenance metadata of earlier stages
    Config = WriteConfig
    inputs: ClassVar[str] = ALL_COLUMNS
    outputs: ClassVar[tuple[str, ...]] = ()
    config: WriteConfig

    def output_path(self, shard: int, num_shards: int) -> str:
        return f"dataset/data/{self.config.split}-{shard:05d}-of-{num_shards:05d}.parquet"

    def output_root(self) -> str:
        return "dataset"

    def output_schema(self, input_schema: pa.Schema) -> pa.Schema:
        import datasets

        fields = [
            pa.field("sample_id", pa.string()),
            pa.field("images", pa.list_(IMAGE_TYPE)),
            pa.field("prompt", MESSAGES_TYPE),
            pa.field("chosen", MESSAGES_TYPE),
            pa.field("rejected", MESSAGES_TYPE),
            pa.field("question", pa.string()),
            pa.field("chosen_text", pa.string()),
            pa.field("rejected_text", pa.string()),
        ]
        fields += [f for f in input_schema if f.name not in _RESHAPED and f.name != "sample_id"]
        schema = pa.schema(fields)
        features = datasets.Features.from_arrow_schema(schema)
        for f in schema:
            if f.type == IMAGE_TYPE:
                features[f.name] = datasets.Image()
        features["images"] = datasets.List(datasets.Image())
        out = features.arrow_schema
        # Provenance recorded by earlier stages (e.g. the score stage's reference model) stays with the data.
        carried = {k: v for k, v in (input_schema.metadata or {}).items() if k.startswith(PROVENANCE_PREFIX)}
        return out.with_metadata({**(out.metadata or {}), **carried}) if carried else out

    def process_batch(self, table: pa.Table) -> BatchResult:
        schema = self.output_schema(table.schema)
        rows = []
        for r in table.to_pylist():
            rows.append(
                {
                    **r,
                    "images": [r["image"]],
                    "prompt": [
                        {
                            "role": "user",
                            "content": [{"type": "image", "text": None}, {"type": "text", "text": r["question"]}],
                        }
                    ],
                    "chosen": [{"role": "assistant", "content": [{"type": "text", "text": r["chosen"]}]}],
                    "rejected": [{"role": "assistant", "content": [{"type": "text", "text": r["rejected"]}]}],
                    "chosen_text": r["chosen"],
                    "rejected_text": r["rejected"],
                }
            )
        return BatchResult(pa.Table.from_pylist(rows, schema=schema))
