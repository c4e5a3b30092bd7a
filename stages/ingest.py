"""ingest: a text-preference dataset (image, question, chosen, rejected) -> validated rows.

Sources: a Hugging Face Hub dataset id (via `datasets`), a Parquet file or folder, a folder written by
`save_to_disk`, or a JSONL/JSON file whose images are paths (relative to the file, or to `image_root`) or
bytes. Files and folders may be local or URIs (`s3://`, `gs://`, `hf://datasets/<org>/<name>/<path>`,
through fsspec): every worker reads them itself, so a cluster needs no shared disk. Layouts ("format"):

- `rlhf-v`  openbmb/RLHF-V-Dataset: `image`, and `text` = JSON string {question, chosen, rejected}
- `rlaif-v` openbmb/RLAIF-V-Dataset: `image`, `question`, `chosen`, `rejected` (id column `idx`)
- `trl`     TRL vision preference: `images` (one image), conversational `prompt`/`chosen`/`rejected`
- `flat`    any table with `image`, `question`, `chosen`, `rejected` (optional id column `id`)
- `auto`    detected from the columns

`plan()` fixes the order (seeded shuffle, `limit`), the `sample_id` of every row (the id column, or a
content hash) and which rows repeat an id. Each shard then reads its rows, decodes and validates every
image (pipeline.images), checks every text field, and stores the image once, as a datasets Image struct.
Everything else the source row carries goes to `meta` (JSON), untouched.

Hostile input is a quarantined row with a `kind: details` reason, never a failed stage. The choices:
- a UTF-8 byte-order mark at the start of a JSON/JSONL file is dropped (the first row is kept);
- a line that nests deeper than 64 levels, or that JSON cannot turn into numbers (an integer of more than
  4300 digits), is a `bad row`;
- an id must be text or an integer (an integral float such as 3.0 counts as 3);
- image bytes given as text (JSON has no bytes: `{"bytes": "..."}`) are decoded when they are a
  `data:image/...;base64,` URI or plain base64 (RFC 4648, no line-break rules), else quarantined; an
  image field that is a string is a path, unless it is such a data URI;
- empty image bytes are an empty image, even when a `path` sits beside them: the path is not read in
  their place (a same-named file on disk may be anything);
- paths with a NUL byte, too long for the file system, naming a folder or leaving the image folder (also
  through a symlink) are refused;
- a NUL character in a text field quarantines the row; other control characters (ESC, form feed, ...,
  but not tab and newlines) are removed;
- text is NFC-normalised and invisible format characters (zero-width, bidi, BOM, soft hyphen, tags) are
  removed, but joiners between visible characters and a flag's tags; what changed is counted in
  meta["_ingest"]; emptiness, `max_text_chars` and the next rule see the cleaned text;
- chosen and rejected answers that are identical after that and whitespace normalisation are not a preference
  pair;
- `<image>` at the start or end of a question is the LLaVA convention's image marker and is dropped; any other
  special token's text is kept, and tokenised as text by the model helpers (mfpo.vlm);
- every planned row carries a digest of what was read; a worker that reads another row (the source changed
  after planning) stops the run;
- Parquet parts with different extra columns are read as the union of their columns.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import unicodedata
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from pipeline.errors import PipelineError, RowError
from pipeline.images import DEFAULT_FORMATS, ImageLimits, validate_image
from pipeline.registry import register
from pipeline.stage import IMAGE_TYPE, BatchResult, Rejection, SourceStage, StageConfig, describe_value
from pipeline.storage import file_sha256, is_uri, local_path
from pipeline.strict import StrictModel
from stages.ingest_rows import CONTROL, canonical_bytes, inline_bytes, normalise_fields, reader_view, without_invisible
from stages.ingest_sources import (
    DatasetsSource,
    ImageFolder,
    detect_format,
    open_source,
    remote_files,
    source_dataset_name,
)

Format = Literal["auto", "rlhf-v", "rlaif-v", "trl", "flat"]
_ID_COLUMNS = {"rlhf-v": ("idx",), "rlaif-v": ("idx",), "flat": ("id", "sample_id", "idx"), "trl": ("id",)}
_CONSUMED = {
    "rlhf-v": {"image", "text"},
    "rlaif-v": {"image", "question", "chosen", "rejected"},
    "flat": {"image", "question", "chosen", "rejected"},
    "trl": {"images", "prompt", "chosen", "rejected"},
}
# The LLaVA convention: the human turn begins (or ends) with the image's own marker. The row has one image, so
# the marker is dropped; any other `<image>` is text, which the model helpers tokenise as text (mfpo.vlm).
_NOTES_KEY = "_ingest"  # meta key of what ingest changed in the text fields (reserved)
_IMAGE_MARKER = re.compile(r"^\s*<image>\s*|\s*<image>\s*$")
SOURCE_TYPE = pa.struct([("dataset", pa.string()), ("split", pa.string()), ("index", pa.int64())])



class ImageLimitsConfig(StrictModel):
    max_bytes: int = Field(32 * 1024 * 1024, ge=1, description="Larger encoded images are quarantined.")
    max_pixels: int = Field(40_000_000, ge=1, description="Width*height bound, checked before decoding.")
    min_side: int = Field(16, ge=1, description="Smaller images are quarantined.")
    formats: list[str] = Field(default_factory=lambda: list(DEFAULT_FORMATS))

    @field_validator("formats")
    @classmethod
    def _known_formats(cls, value: list[str]) -> list[str]:
        from PIL import Image

        Image.init()
        unknown = [f for f in value if f.upper() not in Image.OPEN]
        if unknown:
            raise ValueError(f"unknown image format(s) {unknown}; Pillow can open {sorted(Image.OPEN)}")
        return [f.upper() for f in value]


class IngestConfig(StageConfig):
    source: str = Field(
        description="Hub dataset id, or a .jsonl/.json/.parquet file or folder: a local path or a URI "
        "(s3://, gs://, hf://datasets/<org>/<name>/<path>)."
    )
    format: Format = "auto"
    split: str = "train"
    subset: str | None = Field(None, description="Hub dataset configuration name.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    limit: int | None = Field(None, ge=1, description="Keep the first N rows (after shuffling).")
    shuffle: bool = False
    id_column: str | None = Field(None, description="Column holding a unique row id; default per format.")
    image_root: str | None = Field(
        None, description="Folder (local path or URI) that relative image paths are resolved in."
    )
    image: ImageLimitsConfig = Field(default_factory=ImageLimitsConfig)
    max_text_chars: int = Field(20_000, ge=1)

    @model_validator(mode="after")
    def _source_not_empty(self) -> IngestConfig:
        if not self.source.strip():
            raise ValueError("source is empty: give a Hub dataset id or a local file")
        return self


# ----------------------------------------------------------------------------------------- the stage
@register
class Ingest(SourceStage):
    name: ClassVar[str] = "ingest"
    Config = IngestConfig
    version: ClassVar[int] = 3  # 3: NFC and invisible characters, the LLaVA image marker, planned row digests
    outputs: ClassVar[tuple[str, ...]] = ("image", "question", "chosen", "rejected", "meta", "source")
    config: IngestConfig

    def setup(self) -> None:
        self.source, self.images = open_source(self.config)
        if self.config.image_root is not None and self.images is not None:
            self.images = ImageFolder(self.config.image_root)
        self.format = self.config.format
        if self.format == "auto":
            columns = self.source.columns()
            # No row to read a layout from (an empty source, or only unreadable rows): every row, if any, is
            # quarantined with its own reason and the run ends with `run produced no rows`, not a layout error.
            self.format = detect_format(columns) if columns else "flat"
        self.limits = ImageLimits(
            self.config.image.max_bytes,
            self.config.image.max_pixels,
            self.config.image.min_side,
            tuple(f.upper() for f in self.config.image.formats),
        )
        self.dataset_name = source_dataset_name(self.config.source)

    def fingerprint_extra(self) -> Any:
        """The content of the source files: editing the data invalidates the run, moving it does not. Remote
        files count by their store's checksum (an S3 ETag, ...), so nothing is downloaded to fingerprint."""
        if is_uri(self.config.source):
            fs, path, files = remote_files(self.config.source)
            base = posixpath.dirname(path)
            return [
                {"file": posixpath.relpath(f, base), "size": fs.size(f), "checksum": str(fs.checksum(f))} for f in files
            ]
        path = local_path(self.config.source)
        if not path.exists():
            return {"hub": self.config.source}
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        return [{"file": str(f.relative_to(path.parent)), "sha256": file_sha256(f)} for f in files]

    def reads_from(self) -> list[str]:
        """The source file or folder (a Hub dataset id is not a location of this machine). Images named by
        relative path are not listed: they are read one by one, by name, never by walking a folder."""
        source = self.config.source
        return [source] if is_uri(source) or local_path(source).exists() else []

    def output_schema(self, input_schema: pa.Schema) -> pa.Schema:
        return pa.schema(
            [
                ("sample_id", pa.string()),
                ("image", IMAGE_TYPE),
                ("question", pa.string()),
                ("chosen", pa.string()),
                ("rejected", pa.string()),
                ("meta", pa.string()),
                ("source", SOURCE_TYPE),
            ]
        )

    # ------------------------------------------------------------------ plan (driver, once)
    def plan(self) -> pa.Table:
        n = len(self.source)
        order = np.arange(n)
        if self.config.shuffle:
            order = np.random.default_rng(self.context.seed).permutation(n)
        if self.config.limit is not None:
            order = order[: self.config.limit]
        id_col = self._id_column()
        if id_col is not None and isinstance(self.source, DatasetsSource) and id_col not in self.source.columns():
            raise PipelineError(
                f"stages.ingest.id_column: {id_col!r} is not a column of the source "
                f"({', '.join(sorted(self.source.columns()))})"
            )
        ids: list[str] = []
        errors: list[str | None] = []
        digests: list[str] = []
        # Whole rows are read, not just ids: each row's digest is planned, so a worker that reads a source
        # changed since (rewritten, re-ordered, a new Hub commit) stops instead of pairing ids with other rows.
        for start in range(0, len(order), 256):
            chunk = [int(i) for i in order[start : start + 256]]
            for i, (fields, err) in zip(chunk, self.source.rows(chunk), strict=True):
                sample_id, problem = self._sample_id(i, fields, err, id_col)
                ids.append(sample_id)
                errors.append(problem)
                digests.append(self.source.digest(i, fields))
        first_seen: dict[str, int] = {}
        duplicate_of: list[int | None] = []
        for pos, sid in enumerate(ids):
            duplicate_of.append(first_seen.get(sid) if errors[pos] is None else None)
            if errors[pos] is None:
                first_seen.setdefault(sid, int(order[pos]))
        return pa.table(
            {
                "sample_id": pa.array(ids, pa.string()),
                "source_index": pa.array(order.astype(np.int64), pa.int64()),
                "duplicate_of": pa.array(duplicate_of, pa.int64()),
                "plan_error": pa.array(errors, pa.string()),
                "row_digest": pa.array(digests, pa.string()),
            }
        )

    def _id_column(self) -> str | None:
        if self.config.id_column is not None:
            return self.config.id_column
        columns = self.source.columns()
        return next((c for c in _ID_COLUMNS[self.format] if c in columns), None)

    def _sample_id(
        self, index: int, fields: dict | None, err: str | None, id_col: str | None
    ) -> tuple[str, str | None]:
        if fields is None:
            return f"row-{index}", err
        if id_col is None:
            # No id column: a hash of the row's content, so re-ordering the source keeps the ids.
            return "h" + hashlib.sha256(canonical_bytes(fields)).hexdigest()[:16], None
        value = fields.get(id_col)
        if value is None or (isinstance(value, str) and not value.strip()):
            return f"row-{index}", f"missing field: id column {id_col!r}"
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # e.g. an integer id column that a null turned into floats
        if isinstance(value, bool) or not isinstance(value, str | int):
            shown = type(value).__name__ if not isinstance(value, float) else repr(value)
            return f"row-{index}", f"bad field: id column {id_col!r} must be text or an integer, got {shown}"
        text = str(value)
        if len(text) > 128 or not text.isprintable():
            text = "h" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        return text, None

    # ------------------------------------------------------------------ rows (workers)
    def process_batch(self, table: pa.Table) -> BatchResult:
        plan = table.to_pylist()
        indices = [p["source_index"] for p in plan]
        if indices and max(indices) >= len(self.source):
            raise self._changed(f"it has {len(self.source)} rows, the plan reads row {max(indices)}")
        raws = self.source.rows(indices)
        for p, (fields, _) in zip(plan, raws, strict=True):
            if self.source.digest(p["source_index"], fields) != p["row_digest"]:
                raise self._changed(f"source row {p['source_index']} is not the row planned")
        kept: list[dict[str, Any]] = []
        rejected: list[Rejection] = []
        for p, (fields, err) in zip(plan, raws, strict=True):
            try:
                if p["plan_error"]:
                    raise RowError(p["plan_error"])
                if err:
                    raise RowError(err)
                assert fields is not None
                if p["duplicate_of"] is not None:
                    raise RowError(
                        f"duplicate: sample_id {p['sample_id']!r} already used by source row {p['duplicate_of']}"
                    )
                kept.append({"sample_id": p["sample_id"], **self._row(p["source_index"], fields)})
            except RowError as e:
                original = describe_value(fields) if fields is not None else self.source.raw(p["source_index"])
                rejected.append(
                    Rejection(p["sample_id"], e.reason, {"source_index": p["source_index"], **original}, e.payload)
                )
        return BatchResult(pa.Table.from_pylist(kept, schema=self.output_schema(table.schema)), rejected)

    def _changed(self, detail: str) -> PipelineError:
        # Nothing of this shard is committed; the next run sees the new content in the fingerprint and re-plans.
        return PipelineError(
            f"stages.ingest.source: {self.config.source} changed after the rows were planned ({detail}); "
            "nothing read from the changed source was kept: run again to re-plan"
        )

    def _row(self, index: int, fields: dict[str, Any]) -> dict[str, Any]:
        image_ref, question, chosen, rejected = normalise_fields(self.format, fields)
        data = self._image_bytes(image_ref)
        clean = validate_image(data, self.limits)
        notes: dict[str, dict[str, Any]] = {}
        texts = {
            "question": self._text(question, "question", notes),
            "chosen": self._text(chosen, "chosen", notes),
            "rejected": self._text(rejected, "rejected", notes),
        }
        if reader_view(texts["chosen"]) == reader_view(texts["rejected"]):
            raise RowError(
                "bad pair: chosen and rejected are identical (after NFC, invisible-character and whitespace "
                "normalisation)"
            )
        meta = {k: describe_value(v) for k, v in fields.items() if k not in _CONSUMED[self.format]}
        if notes:
            meta[_NOTES_KEY] = notes
        try:
            meta_json = json.dumps(meta, sort_keys=True, ensure_ascii=False, default=str)
            meta_json.encode("utf-8")
        except UnicodeEncodeError:
            raise RowError("text: a metadata field is not valid UTF-8") from None
        return {
            "image": {"bytes": clean.data, "path": None},
            **texts,
            "meta": meta_json,
            "source": {"dataset": self.dataset_name, "split": self.config.split, "index": index},
        }

    def _image_bytes(self, ref: Any) -> bytes:
        if isinstance(ref, dict):
            if ref.get("bytes") is not None:
                # Empty bytes are an empty image: the `path` beside them may name any file, never read it instead.
                data = inline_bytes(ref["bytes"])
                if not data:
                    raise RowError("image: empty bytes (0 bytes); the path beside them is not read instead")
                return data
            ref = ref.get("path")
        if isinstance(ref, bytes | bytearray | memoryview):
            return bytes(ref)
        if ref is None or (isinstance(ref, str) and not ref.strip()):
            raise RowError("missing field: image")
        if not isinstance(ref, str):
            raise RowError(f"bad field: image must be bytes, a data URI or a path, got {type(ref).__name__}")
        if ref.lstrip().startswith("data:"):
            return inline_bytes(ref)
        return self._read_path(ref)

    def _read_path(self, ref: str) -> bytes:
        if not self.source.allow_paths or self.images is None:
            raise RowError("image: the row gives only a path and this source may not read local files")
        return self.images.read(ref, self.limits.max_bytes)

    def _text(self, value: Any, field: str, notes: dict[str, dict[str, Any]]) -> str:
        """The field as a model and a person see it: NFC, without control or invisible format characters (what
        was changed is counted in `notes`, which goes to meta["_ingest"]); emptiness is judged on that."""
        if value is None:
            raise RowError(f"missing field: {field}")
        if isinstance(value, bytes | bytearray):
            try:
                value = bytes(value).decode("utf-8")
            except UnicodeDecodeError as err:
                raise RowError(f"text: {field} is not valid UTF-8 (byte {err.start})") from None
        if not isinstance(value, str):
            raise RowError(f"bad field: {field} must be text, got {type(value).__name__}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise RowError(f"text: {field} is not valid UTF-8 (lone surrogate)") from None
        if "\x00" in value:
            raise RowError(f"text: {field} contains a NUL character (binary data?)")
        note: dict[str, Any] = {}
        cleaned = CONTROL.sub("", value)  # stray control characters are extraction noise
        if len(cleaned) != len(value):
            note["control_removed"] = len(value) - len(cleaned)
        value = unicodedata.normalize("NFC", cleaned)
        if value != cleaned:
            note["nfc"] = True
        value, invisible = without_invisible(value)
        if invisible:
            note["invisible_removed"] = invisible
        if field == "question":
            unmarked = _IMAGE_MARKER.sub("", value)
            if unmarked != value:
                note["image_marker_removed"] = True
                value = unmarked
        value = value.strip()
        if not reader_view(value):
            only_invisible = " (only invisible characters)" if cleaned.strip() else ""
            raise RowError(f"missing field: {field} is empty{only_invisible}")
        if len(value) > self.config.max_text_chars:
            raise RowError(f"text: {field} has {len(value)} characters (max_text_chars={self.config.max_text_chars})")
        if note:
            notes[field] = note
        return value
