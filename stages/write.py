"""write: every column so far -> the final dataset under `<output_dir>/dataset/`.

Shards `data/<split>-XXXXX-of-YYYYY.parquet` (one per input shard) carry the Hugging Face `datasets`
feature metadata, so `load_dataset("parquet", ...)` decodes images as `datasets.Image`. Columns: the TRL
vision-preference ones (`images`, conversational `prompt`/`chosen`/`rejected`), the plain texts
(`question`, `chosen_text`, `rejected_text`) and every other column earlier stages produced. Image
columns (stored as datasets Image structs by the stages) become Image features. A README.md dataset
card with counts, schema, source and configuration is written once all shards are done.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from pydantic import Field

from pipeline.registry import register
from pipeline.stage import ALL_COLUMNS, IMAGE_TYPE, BatchResult, Stage, StageConfig
from pipeline.storage import write_text

CONTENT_TYPE = pa.list_(pa.struct([("type", pa.string()), ("text", pa.string())]))
MESSAGES_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", CONTENT_TYPE)]))
# Columns of earlier stages that the final layout renames or reshapes.
_RESHAPED = {"image", "question", "chosen", "rejected"}


class WriteConfig(StageConfig):
    split: str = Field("train", pattern=r"^[A-Za-z0-9_]+$", description="Split name in the shard names.")
    card: bool = Field(True, description="Write dataset/README.md (a Hub dataset card).")
    pretty_name: str | None = Field(None, description="Title of the dataset card; default: run name.")
    license: str | None = Field(None, description="License tag for the card, e.g. cc-by-4.0.")


@register
class Write(Stage):
    name: ClassVar[str] = "write"
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
        return features.arrow_schema

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

    def finalize(self, output_dir: str, run_summary: dict[str, Any]) -> None:
        if self.config.card:
            root = Path(output_dir) / "dataset"
            write_text(root / "README.md", dataset_card(root, self.config, run_summary))


def dataset_card(root: Path, cfg: WriteConfig, summary: dict[str, Any]) -> str:
    """A Hub dataset card. Deterministic: no dates or machine paths, so reruns give the same bytes."""
    config = summary["config"]
    stages = summary["stages"]
    shards = sorted((root / "data").glob(f"{cfg.split}-*.parquet"))
    rows = sum(pq.ParquetFile(s).metadata.num_rows for s in shards)
    schema = pq.read_schema(shards[0]) if shards else pa.schema([])
    features = json.loads(schema.metadata[b"huggingface"])["info"]["features"] if schema.metadata else {}
    name = cfg.pretty_name or config["run"]["name"]
    front = {
        "pretty_name": name,
        "configs": [{"config_name": "default", "data_files": [{"split": cfg.split, "path": f"data/{cfg.split}-*"}]}],
        "task_categories": ["image-text-to-text"],
        "tags": ["mfpo", "preference", "dpo", "multimodal", "hallucination"],
    }
    if cfg.license:
        front["license"] = cfg.license
    ingest = config["stages"].get(next(iter(config["stages"])), {})
    source = ingest.get("source", "?")
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {name}",
        "",
        "An MFPO (Modality-Fair Preference Optimization, arXiv 2410.15334) preference dataset made with "
        "mfpo-pipeline: each row pairs an image and a question with a chosen and a rejected answer, in "
        "the TRL vision-preference layout, plus the columns of every pipeline stage.",
        "",
        f"- rows: {rows} in {len(shards)} shard(s)",
        f"- source: `{Path(source).name if '/' in source and Path(source).suffix else source}` "
        f"(format `{ingest.get('format', 'auto')}`, split `{ingest.get('split', 'train')}`)",
        "",
        "## Rows per stage",
        "",
        "| stage | rows in | kept | quarantined | reasons |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for s in stages:
        reasons = ", ".join(f"{k}: {v}" for k, v in s["reasons"].items()) or "-"
        lines.append(f"| {s['name']} | {s['rows_in']} | {s['rows_kept']} | {s['rows_quarantined']} | {reasons} |")
    lines += ["", "## Columns", "", "| column | type |", "| --- | --- |"]
    for field in schema:
        kind = features.get(field.name, {}).get("_type", "")
        shown = {"Image": "Image", "List": "list"}.get(kind, "")
        if kind == "List" and features[field.name].get("feature", {}).get("_type") == "Image":
            shown = "list of Image"
        lines.append(f"| `{field.name}` | {shown or str(field.type)} |")
    lines += [
        "",
        "## Loading",
        "",
        "```python",
        "from datasets import load_dataset",
        f'ds = load_dataset("parquet", data_files="data/{cfg.split}-*.parquet", split="train")',
        "```",
        "",
        "## Configuration",
        "",
        "```yaml",
        yaml.safe_dump(config, sort_keys=False).strip(),
        "```",
        "",
    ]
    return "\n".join(lines)
