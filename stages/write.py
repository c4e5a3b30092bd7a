"""write: every column so far -> the final dataset under `<output_dir>/dataset/`.

Each shard's rows go to `write/<split>/shard-XXXXX.parquet`; once every shard is committed, the engine
rewrites each split as `dataset/data/<split>-XXXXX-of-YYYYY.parquet` files of at most about
`max_shard_size` bytes (pipeline.compact): the same files whatever `run.shard_size` or the cluster, no empty
file, and a split with no rows has none. The files carry the Hugging Face `datasets` feature metadata, so
`load_dataset("parquet", ...)` decodes images as `datasets.Image`. Columns: the TRL
vision-preference ones (`images`, conversational `prompt`/`chosen`/`rejected`), the plain texts
(`question`, `chosen_text`, `rejected_text`) and every other column earlier stages produced. Image
columns (stored as datasets Image structs by the stages) become Image features. The dataset card and
its pictures are made at the end of the run, from the finished shards (mfpo.publish).

`splits: {train: 0.95, test: 0.05}` holds rows out by *picture*: a row's split is fixed by a hash of its
image's decoded pixels (`image_id`, a column of the dataset), so several questions about one picture land in
the same split and no picture is in two; the split is the same in every run, resume and shard size. A split
that gets no rows (12 rows rarely give a 5% split one) is left out of the files and the card, and the run
log says so. Training reads `train`; `python -m pipeline eval` reads `test`.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator, model_validator

from pipeline.compact import FinalFiles
from pipeline.images import decode_rgb
from pipeline.registry import register
from pipeline.stage import ALL_COLUMNS, IMAGE_TYPE, PROVENANCE_PREFIX, BatchResult, Stage, StageConfig

CONTENT_TYPE = pa.list_(pa.struct([("type", pa.string()), ("text", pa.string())]))
MESSAGES_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", CONTENT_TYPE)]))
# Columns of earlier stages that the final layout renames or reshapes.
_RESHAPED = {"image", "question", "chosen", "rejected", "image_id"}


# The card's settings change the card, not the shards: they stay out of the fingerprint.
CARD_FIELDS = {"card", "pretty_name", "license"}


class WriteConfig(StageConfig):
    split: str = Field("train", pattern=r"^[A-Za-z0-9_]+$", description="Split name of an unsplit dataset.")
    splits: dict[str, float] | None = Field(
        None,
        description="Split name -> fraction of the pictures, e.g. {train: 0.95, test: 0.05}, by a hash of each image.",
    )
    max_shard_size: int | str = Field(
        "500MB",
        description="Largest size of a final dataset file (bytes of its rows in memory), e.g. 500MB as `datasets`' "
        "push_to_hub; a split is written as ceil(bytes / max_shard_size) files.",
    )
    card: bool = Field(True, description="Write dataset/README.md (a Hub dataset card) and its pictures.")
    pretty_name: str | None = Field(None, description="Title of the dataset card; default: run name.")
    license: str | None = Field(
        None, description="License tag for the card (a Hub license id, e.g. cc-by-nc-4.0); default: unknown."
    )

    def fingerprint_fields(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"resources", *CARD_FIELDS, *(() if self.splits else ("splits",))})

    @field_validator("splits")
    @classmethod
    def _fractions(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return None
        bad = [name for name in value if not name.replace("_", "").isalnum() or not name.isascii()]
        if bad:
            raise ValueError(f"split names are letters, digits and _ (got {bad[0]!r})")
        if not value or any(not 0 < f <= 1 for f in value.values()):
            raise ValueError("each split's fraction is in (0, 1], e.g. {train: 0.95, test: 0.05}")
        if abs(sum(value.values()) - 1) > 1e-6:
            raise ValueError(f"the fractions add up to {sum(value.values()):g}, not 1")
        if "train" not in value:
            raise ValueError("one split is `train` (what training reads)")
        return value

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, value: int | str) -> int:
        from datasets.utils.py_utils import convert_file_size_to_int

        try:
            size = convert_file_size_to_int(value)
        except ValueError:
            raise ValueError("the value is not a size: bytes, or a number with KB, MB or GB (e.g. 500MB)") from None
        if size < 1024:
            raise ValueError("below 1KB: each row would be a file of its own")
        return size

    @model_validator(mode="after")
    def _one_way(self) -> WriteConfig:
        if self.splits is not None and self.split != "train":
            raise ValueError("set either `split` (one split) or `splits` (fractions), not both")
        return self


def image_id(image: dict[str, Any]) -> str:
    """A picture's identity: a hash of its decoded pixels and shape, so two rows showing the same picture share
    it even when their files were encoded differently."""
    pixels = decode_rgb(image)
    digest = hashlib.sha256(repr(pixels.shape).encode())
    digest.update(pixels.tobytes())
    return digest.hexdigest()[:16]


def split_of(key: str, splits: dict[str, float]) -> str:
    """The split a row belongs to: where a hash of its key (the image_id) falls among the cumulative fractions
    (in the order given). The hash, not the row's position, decides: stable across runs, resumes and shard
    sizes."""
    point = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64
    edge = 0.0
    for name, fraction in splits.items():
        edge += fraction
        if point < edge:
            return name
    return next(reversed(splits))  # rounding: the last split takes the top of [0, 1)


@register
class Write(Stage):
    name: ClassVar[str] = "write"
    # 2: carries the provenance metadata of earlier stages; 3: image_id, splits by picture, files sized by bytes
    version: ClassVar[int] = 3
    Config = WriteConfig
    inputs: ClassVar[str] = ALL_COLUMNS
    outputs: ClassVar[tuple[str, ...]] = ()
    config: WriteConfig

    @property
    def split_names(self) -> list[str]:
        return list(self.config.splits) if self.config.splits else [self.config.split]

    def shard_path(self, split: str, shard: int) -> str:
        return f"write/{split}/shard-{shard:05d}.parquet"

    def output_path(self, shard: int, num_shards: int) -> str:
        return self.shard_path(self.split_names[0], shard)

    def output_root(self) -> str:
        return "dataset"  # the final files: cleared with the stage's own folder when it is redone

    def output_files(self, table: pa.Table, shard: int, num_shards: int) -> list[tuple[str, pa.Table]]:
        if not self.config.splits:
            return [(self.output_path(shard, num_shards), table)]
        which = pa.array([split_of(key, self.config.splits) for key in table.column("image_id").to_pylist()])
        return [(self.shard_path(name, shard), table.filter(pc.equal(which, name))) for name in self.config.splits]

    def final_files(self, num_shards: int) -> FinalFiles:
        return FinalFiles(
            groups={name: [self.shard_path(name, k) for k in range(num_shards)] for name in self.split_names},
            target="dataset/data/{group}-{index:05d}-of-{total:05d}.parquet",
            max_bytes=int(self.config.max_shard_size),
            if_empty={
                name: f"left out of the files and the card (stages.write.splits gives it {f:g} of the pictures: "
                f"about {math.ceil(1 / f)} distinct pictures give it one)"
                for name, f in (self.config.splits or {}).items()
            },
        )

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
            pa.field("image_id", pa.string()),
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
                    "image_id": image_id(r["image"]),
                }
            )
        return BatchResult(pa.Table.from_pylist(rows, schema=schema))
