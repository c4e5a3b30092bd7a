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
  special token's text is kept, and tokenised as text by the model helpers (stages.vlm);
- every planned row carries a digest of what was read; a worker that reads another row (the source changed
  after planning) stops the run;
- Parquet parts with different extra columns are read as the union of their columns.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import errno
import hashlib
import json
import posixpath
import re
import unicodedata
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, field_validator, model_validator

from pipeline.errors import PipelineError, RowError, first_line
from pipeline.images import DEFAULT_FORMATS, ImageLimits, validate_image
from pipeline.registry import register
from pipeline.stage import IMAGE_TYPE, BatchResult, Rejection, SourceStage, StageConfig, StrictModel, describe_value
from pipeline.storage import file_sha256, filesystem, is_uri, local_path

Format = Literal["auto", "rlhf-v", "rlaif-v", "trl", "flat"]
_LOCAL_TEXT = (".jsonl", ".ndjson", ".json")
_ID_COLUMNS = {"rlhf-v": ("idx",), "rlaif-v": ("idx",), "flat": ("id", "sample_id", "idx"), "trl": ("id",)}
_CONSUMED = {
    "rlhf-v": {"image", "text"},
    "rlaif-v": {"image", "question", "chosen", "rejected"},
    "flat": {"image", "question", "chosen", "rejected"},
    "trl": {"images", "prompt", "chosen", "rejected"},
}
_MAX_DEPTH = 64  # JSON nesting no real row needs; deeper rows would exhaust the recursion limit later
_CONTROL = re.compile(r"[\x01-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # control characters but NUL, \t, \n, \r
# Invisible format characters (Unicode category Cf, less the visible prepended marks such as U+0600): zero-width
# space and joiners, bidi marks and embeddings, word joiner, BOM, soft hyphen, tags, ... A reader sees none.
_INVISIBLE = (
    "\u00ad\u061c\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb"
    "\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f"
)
_INVISIBLE_RUN = re.compile(f"[{_INVISIBLE}]")
# Kept where they shape what a reader sees: a joiner between two visible characters (emoji sequences such as
# U+1F9D1 U+200D U+1F680, Persian and Indic words), tag characters spelling a flag after U+1F3F4.
_SHAPING = re.compile(
    f"(?<=[^\\s{_INVISIBLE}])[\u200c\u200d](?=[^\\s{_INVISIBLE}])|(?<=\U0001f3f4)[\U000e0020-\U000e007f]+\U000e007f"
)
# The LLaVA convention: the human turn begins (or ends) with the image's own marker. The row has one image, so
# the marker is dropped; any other `<image>` is text, which the model helpers tokenise as text (stages.vlm).
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


# ----------------------------------------------------------------------------------------- sources
class _JsonSource:
    """Local JSONL (or JSON array). Read line by line, by hand, because a reader that parses the whole
    file (pyarrow, datasets) fails on one bad line; here a bad line becomes one quarantined row."""

    allow_paths = True

    def __init__(self, data: bytes, name: str) -> None:
        if data.startswith(codecs.BOM_UTF8):
            data = data[len(codecs.BOM_UTF8) :]  # written by some editors; not part of the first row
        self.records: list[tuple[int, bytes]] = []
        if name.lower().endswith(".json") and data.lstrip()[:1] == b"[":
            try:
                items = json.loads(data)
            except (ValueError, RecursionError) as err:  # one array: no row can be told from the next
                raise PipelineError(f"stages.ingest.source: {name} is not a valid JSON array ({_short(err)})") from None
            self.records = [(i + 1, json.dumps(item).encode()) for i, item in enumerate(items)]
        else:
            for lineno, line in enumerate(data.split(b"\n"), start=1):
                if line.strip():
                    self.records.append((lineno, line))

    def __len__(self) -> int:
        return len(self.records)

    def columns(self) -> set[str]:
        for i in range(min(len(self), 50)):
            fields, _ = self.row(i)
            if fields is not None:
                return set(fields)
        return set()

    def row(self, i: int) -> tuple[dict[str, Any] | None, str | None]:
        lineno, line = self.records[i]
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            return None, f"text: line {lineno} is not valid UTF-8 (byte {err.start})"
        try:
            fields = json.loads(text)
        except RecursionError:
            return None, f"bad row: line {lineno} nests deeper than {_MAX_DEPTH} levels"
        except json.JSONDecodeError as err:
            return None, f"bad row: line {lineno} is not valid JSON ({err.msg} at column {err.colno})"
        except ValueError as err:  # valid JSON Python will not convert, e.g. an integer of 5000 digits
            return None, f"bad row: line {lineno} is not usable JSON ({_short(err)})"
        if not isinstance(fields, dict):
            return None, f"bad row: line {lineno} is not a JSON object (got {type(fields).__name__})"
        if _depth(fields) > _MAX_DEPTH:
            return None, f"bad row: line {lineno} nests deeper than {_MAX_DEPTH} levels"
        return fields, None

    def raw(self, i: int) -> dict[str, Any]:
        lineno, line = self.records[i]
        return {"line": lineno, "raw": line.decode("utf-8", errors="replace")[:2000]}

    def rows(self, indices: list[int], columns: list[str] | None = None) -> list[tuple[dict | None, str | None]]:
        return [self.row(i) for i in indices]

    def digest(self, i: int, fields: dict | None) -> str:
        """What the row is, byte for byte: the plan records it, and a worker checks what it read against it."""
        return hashlib.sha256(self.records[i][1]).hexdigest()[:32]


class _DatasetsSource:
    """Hub dataset, local Parquet, or a save_to_disk folder, through `datasets` (memory-mapped Arrow).
    Rows are read as raw Arrow, so images stay encoded bytes until this stage validates them."""

    def __init__(self, ds: Any, allow_paths: bool) -> None:
        self.ds = ds
        self.allow_paths = allow_paths

    def __len__(self) -> int:
        return len(self.ds)

    def columns(self) -> set[str]:
        return set(self.ds.column_names)

    def rows(self, indices: list[int], columns: list[str] | None = None) -> list[tuple[dict | None, str | None]]:
        ds = self.ds.select_columns(columns) if columns else self.ds
        table = ds.select(indices).with_format("arrow")[:]
        return [(r, None) for r in table.to_pylist()]

    def raw(self, i: int) -> dict[str, Any]:
        return {}

    def digest(self, i: int, fields: dict | None) -> str:
        return hashlib.sha256(_canonical(fields or {})).hexdigest()[:32]


class _ImageFolder:
    """Where relative image paths are read: the source's folder (on disk, or beside it in the same bucket or
    repo) or `image_root`. A path may not leave the folder, and is size-checked before it is read."""

    def __init__(self, location: str | Path) -> None:
        self.remote = is_uri(location)
        if self.remote:
            self.fs, root = filesystem(str(location))
            self.root = root.rstrip("/")
        else:
            self.root_path = local_path(location).resolve()

    def read(self, ref: str, max_bytes: int) -> bytes:
        if "\x00" in ref:
            raise RowError(f"image: path {_clip(ref)!r} contains a NUL byte")
        return self._read_remote(ref, max_bytes) if self.remote else self._read_local(ref, max_bytes)

    def _read_local(self, ref: str, max_bytes: int) -> bytes:
        try:
            path = (self.root_path / ref).resolve()
            if not path.is_relative_to(self.root_path):
                raise RowError(f"image: path {_clip(ref)!r} is outside the image folder")
            if not path.exists():
                raise RowError(f"image: file not found: {_clip(ref)}")
            if path.is_dir():
                raise RowError(f"image: path {_clip(ref)!r} is a folder, not a file")
            if not path.is_file():
                raise RowError(f"image: path {_clip(ref)!r} is not a regular file")
            _check_size(path.stat().st_size, max_bytes)
            return path.read_bytes()
        except OSError as err:
            if err.errno == errno.ENAMETOOLONG:
                raise RowError(
                    f"image: path is too long for the file system ({len(ref)} characters; image data given as "
                    "text must be a data:image/...;base64, URI)"
                ) from None
            raise RowError(f"image: cannot read {_clip(ref)!r} ({err.strerror or _short(err)})") from None

    def _read_remote(self, ref: str, max_bytes: int) -> bytes:
        relative = posixpath.normpath(ref)
        if "://" in ref or relative.startswith(("/", "..")):
            raise RowError(f"image: path {_clip(ref)!r} is outside the image folder")
        key = f"{self.root}/{relative}"
        try:
            info = self.fs.info(key)
            if info.get("type") == "directory":
                raise RowError(f"image: path {_clip(ref)!r} is a folder, not a file")
            _check_size(int(info.get("size") or 0), max_bytes)
            return self.fs.cat_file(key)
        except FileNotFoundError:
            raise RowError(f"image: file not found: {_clip(ref)}") from None
        except PermissionError as err:
            raise RowError(f"image: cannot read {_clip(ref)!r} ({first_line(err)})") from None
        except RowError:
            raise
        except Exception as err:  # connection errors, throttling, 5xx after the filesystem's own retries
            raise RowError(f"transient: image: cannot read {_clip(ref)!r} ({_short(err)})") from None


def _check_size(size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise RowError(f"image: {size} bytes exceeds image.max_bytes={max_bytes}")


def _open_source(cfg: IngestConfig) -> tuple[Any, _ImageFolder | None]:
    """The source and the folder relative image paths are resolved in (None: the rows may not name files)."""
    if is_uri(cfg.source):
        return _open_remote(cfg)
    path = local_path(cfg.source)
    if path.exists():
        if path.is_file() and path.suffix.lower() in _LOCAL_TEXT:
            return _JsonSource(path.read_bytes(), path.name), _ImageFolder(path.parent)
        import datasets

        if path.is_dir() and (path / "state.json").exists():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[cfg.split]
            return _DatasetsSource(ds, allow_paths=True), _ImageFolder(path)
        files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
        if not files or any(f.suffix.lower() != ".parquet" for f in files):
            raise PipelineError(f"stages.ingest.source: {cfg.source} {_NOT_A_SOURCE}")
        named = [(str(f.relative_to(path)) if path.is_dir() else f.name, pq.read_schema(f)) for f in files]
        features = _union_features(named)
        ds = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train", features=features)
        return _DatasetsSource(ds, allow_paths=True), _ImageFolder(path if path.is_dir() else path.parent)
    if cfg.source.startswith((".", "/", "~", "file://")) or cfg.source.endswith((*_LOCAL_TEXT, ".parquet")):
        raise PipelineError(f"stages.ingest.source: file not found: {cfg.source}")
    import datasets

    try:
        ds = datasets.load_dataset(cfg.source, name=cfg.subset, split=cfg.split, revision=cfg.revision)
    except Exception as err:
        raise PipelineError(f"stages.ingest.source: cannot load Hub dataset {cfg.source!r}: {err}") from err
    # Rows from the Hub may carry image *paths*; never read local files on their behalf.
    return _DatasetsSource(ds, allow_paths=False), None


_NOT_A_SOURCE = "is not a .jsonl/.json/.parquet file or a folder of Parquet files"


def _remote_files(uri: str) -> tuple[Any, str, list[str]]:
    """(filesystem, path, files) of a source URI: the file itself, or every file under the folder."""
    fs, path = filesystem(uri)
    try:
        info = fs.info(path)
        if info.get("type") == "directory":
            return fs, path.rstrip("/"), sorted(fs.find(path))
        return fs, path, [path]
    except FileNotFoundError:
        raise PipelineError(f"stages.ingest.source: not found: {uri}") from None
    except PipelineError:
        raise
    except Exception as err:  # no credentials, no such bucket, unreachable endpoint
        reason = f"{type(err).__name__}: {first_line(err)}"
        raise PipelineError(f"stages.ingest.source: cannot open {uri}: {reason}") from None


def _open_remote(cfg: IngestConfig) -> tuple[Any, _ImageFolder | None]:
    """A source file or folder in an object store or a Hub repo, read by whoever opens it (driver or worker)."""
    fs, path, files = _remote_files(cfg.source)
    folder = cfg.source.rstrip("/") if files != [path] else cfg.source.rsplit("/", 1)[0]
    if files == [path] and path.lower().endswith(_LOCAL_TEXT):
        return _JsonSource(fs.cat_file(path), posixpath.basename(path)), _ImageFolder(folder)
    import datasets

    if f"{path}/state.json" in files:
        ds = datasets.load_from_disk(cfg.source, storage_options=fs.storage_options)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[cfg.split]
        return _DatasetsSource(ds, allow_paths=True), _ImageFolder(folder)
    parquet = [f for f in files if f.lower().endswith(".parquet")]
    if not parquet:
        hint = "; for a whole Hub dataset give its id (<org>/<name>)" if cfg.source.startswith("hf://") else ""
        raise PipelineError(f"stages.ingest.source: {cfg.source} {_NOT_A_SOURCE}{hint}")
    uris = [fs.unstrip_protocol(f) for f in parquet]
    schemas = []
    for f in parquet:
        with fs.open(f, "rb") as fh:
            name = posixpath.relpath(f, path) if files != [path] else posixpath.basename(f)
            schemas.append((name, pq.read_schema(fh)))
    ds = datasets.load_dataset(
        "parquet", data_files=uris, split="train", storage_options=fs.storage_options, features=_union_features(schemas)
    )
    return _DatasetsSource(ds, allow_paths=True), _ImageFolder(folder)


def _union_features(schemas: list[tuple[str, pa.Schema]]) -> Any:
    """None when every Parquet part has the same columns; else the union of their columns (a part without a
    column reads it as null), as `datasets` features. Parts that give one column two types are refused, naming
    both files and the column."""
    import datasets

    first = schemas[0][1]
    if all(schema.equals(first) for _, schema in schemas[1:]):
        return None
    seen: dict[str, tuple[str, pa.DataType]] = {}
    for name, schema in schemas:
        for field in schema:
            other = seen.setdefault(field.name, (name, field.type))
            if other[1] != field.type and not pa.types.is_null(other[1]) and not pa.types.is_null(field.type):
                raise PipelineError(
                    f"stages.ingest.source: {other[0]} and {name} give column {field.name!r} different types "
                    f"({other[1]} vs {field.type}); make the Parquet parts agree, or give one of them as the source"
                )
    unified = pa.unify_schemas([schema.remove_metadata() for _, schema in schemas])
    return datasets.Features.from_arrow_schema(unified)


def _dataset_name(source: str) -> str:
    """The name recorded in each row's `source`: a file or folder's own name (the same wherever it is
    stored), or the Hub id."""
    if is_uri(source):
        return posixpath.basename(source.rstrip("/"))
    path = local_path(source)
    return path.name if path.exists() else source


def _detect_format(columns: set[str]) -> str:
    if {"text", "image"} <= columns:
        return "rlhf-v"
    if {"images", "prompt", "chosen", "rejected"} <= columns:
        return "trl"
    if {"image", "question", "chosen", "rejected"} <= columns:
        return "rlaif-v" if "idx" in columns else "flat"
    raise PipelineError(
        f"stages.ingest.format: cannot detect the layout from columns {sorted(columns)}; expected "
        "rlhf-v (image, text), trl (images, prompt, chosen, rejected) or flat (image, question, chosen, "
        "rejected); set stages.ingest.format"
    )


# ----------------------------------------------------------------------------------------- the stage
@register
class Ingest(SourceStage):
    name: ClassVar[str] = "ingest"
    Config = IngestConfig
    version: ClassVar[int] = 3  # 3: NFC and invisible characters, the LLaVA image marker, planned row digests
    outputs: ClassVar[tuple[str, ...]] = ("image", "question", "chosen", "rejected", "meta", "source")
    config: IngestConfig

    def setup(self) -> None:
        self.source, self.images = _open_source(self.config)
        if self.config.image_root is not None and self.images is not None:
            self.images = _ImageFolder(self.config.image_root)
        self.format = self.config.format
        if self.format == "auto":
            columns = self.source.columns()
            # No row to read a layout from (an empty source, or only unreadable rows): every row, if any, is
            # quarantined with its own reason and the run ends with `run produced no rows`, not a layout error.
            self.format = _detect_format(columns) if columns else "flat"
        self.limits = ImageLimits(
            self.config.image.max_bytes,
            self.config.image.max_pixels,
            self.config.image.min_side,
            tuple(f.upper() for f in self.config.image.formats),
        )
        self.dataset_name = _dataset_name(self.config.source)

    def fingerprint_extra(self) -> Any:
        """The content of the source files: editing the data invalidates the run, moving it does not. Remote
        files count by their store's checksum (an S3 ETag, ...), so nothing is downloaded to fingerprint."""
        if is_uri(self.config.source):
            fs, path, files = _remote_files(self.config.source)
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
        if id_col is not None and isinstance(self.source, _DatasetsSource) and id_col not in self.source.columns():
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
            return "h" + hashlib.sha256(_canonical(fields)).hexdigest()[:16], None
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
        image_ref, question, chosen, rejected = _normalise(self.format, fields)
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
                data = _inline_bytes(ref["bytes"])
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
            return _inline_bytes(ref)
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
        cleaned = _CONTROL.sub("", value)  # stray control characters are extraction noise
        if len(cleaned) != len(value):
            note["control_removed"] = len(value) - len(cleaned)
        value = unicodedata.normalize("NFC", cleaned)
        if value != cleaned:
            note["nfc"] = True
        value, invisible = _without_invisible(value)
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


def reader_view(text: str) -> str:
    """What a reader sees of a text, for equality and emptiness: no invisible characters, whitespace runs as one
    space."""
    return " ".join(_INVISIBLE_RUN.sub("", text).split())


def _without_invisible(text: str) -> tuple[str, int]:
    """The text without invisible format characters, but the joiners and tags that shape a visible character;
    and how many characters were removed."""
    parts, removed, pos = [], 0, 0
    for m in [*_SHAPING.finditer(text), None]:
        end = len(text) if m is None else m.start()
        segment = _INVISIBLE_RUN.sub("", text[pos:end])
        removed += end - pos - len(segment)
        parts.append(segment)
        if m is not None:
            parts.append(m.group())
            pos = m.end()
    return "".join(parts), removed


def _normalise(fmt: str, fields: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    """(image reference, question, chosen, rejected) from one source row of the given layout."""
    if fmt == "rlhf-v":
        text = fields.get("text")
        if text is None:
            raise RowError("missing field: text")
        if isinstance(text, str):
            try:
                text = json.loads(text)
            except RecursionError:
                raise RowError(f"bad field: text nests deeper than {_MAX_DEPTH} levels") from None
            except json.JSONDecodeError as err:
                raise RowError(f"bad field: text is not valid JSON ({err.msg})") from None
            except ValueError as err:  # e.g. an integer of 5000 digits
                raise RowError(f"bad field: text is not usable JSON ({_short(err)})") from None
        if not isinstance(text, dict):
            raise RowError("bad field: text must be a JSON object with question, chosen, rejected")
        return fields.get("image"), text.get("question"), text.get("chosen"), text.get("rejected")
    if fmt == "trl":
        images = fields.get("images")
        if not isinstance(images, list) or not images:
            raise RowError("missing field: images")
        if len(images) != 1:
            raise RowError(f"bad field: images has {len(images)} images; MFPO rows need exactly one")
        return (
            images[0],
            _message_text(fields.get("prompt"), "user", "prompt"),
            _message_text(fields.get("chosen"), "assistant", "chosen"),
            _message_text(fields.get("rejected"), "assistant", "rejected"),
        )
    return fields.get("image"), fields.get("question"), fields.get("chosen"), fields.get("rejected")


def _message_text(messages: Any, role: str, field: str) -> str | None:
    """Text of the last `role` turn of a conversational field (TRL layout); plain strings pass."""
    if messages is None or isinstance(messages, str):
        return messages
    if not isinstance(messages, list):
        raise RowError(f"bad field: {field} must be a list of messages")
    turns = [m for m in messages if isinstance(m, dict) and m.get("role") == role]
    if not turns:
        raise RowError(f"bad field: {field} has no {role} turn")
    content = turns[-1].get("content")
    if isinstance(content, str):
        parts = [content]
    elif isinstance(content, list):
        parts = [c.get("text") or "" for c in content if isinstance(c, dict) and c.get("type") == "text"]
    else:
        raise RowError(f"bad field: {field} content must be text or a list of parts")
    return "\n".join(p.replace("<image>", "").strip() for p in parts if p is not None).strip() or None


def _canonical(fields: dict[str, Any]) -> bytes:
    def norm(v: Any) -> Any:
        if isinstance(v, bytes | bytearray):
            return {"sha256": hashlib.sha256(v).hexdigest()}
        if isinstance(v, dict):
            return {k: norm(x) for k, x in v.items()}
        if isinstance(v, list):
            return [norm(x) for x in v]
        return v

    return json.dumps(norm(fields), sort_keys=True, ensure_ascii=True, default=str).encode()


def _inline_bytes(data: Any) -> bytes:
    """Image bytes carried in the row: binary, or text (JSON has no bytes) that is a data:image/...;base64,
    URI or plain base64. Text that is neither is refused, not guessed at."""
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    if not isinstance(data, str):
        raise RowError(f"bad field: image bytes must be binary or base64 text, got {type(data).__name__}")
    body = data.strip()
    what = "valid plain base64"
    if body.startswith("data:"):
        header, sep, body = body.partition(",")
        mime, _, params = header[len("data:") :].partition(";")
        if not sep or "base64" not in params.lower().split(";"):
            raise RowError("image: data URI is not base64-encoded (expected data:image/...;base64,...)")
        if not mime.strip().lower().startswith("image/"):
            raise RowError(f"image: data URI holds {mime.strip() or 'untyped data'!r}, not an image")
        what = "a data URI with valid base64"
    try:
        return base64.b64decode("".join(body.split()), validate=True)
    except (binascii.Error, ValueError):
        raise RowError(
            f"image: image bytes given as text are not {what} (only data:image/...;base64, URIs and plain "
            "base64 are decoded)"
        ) from None


def _depth(value: Any) -> int:
    """How deep lists and objects nest (iteratively: the point is to refuse rows that recursion cannot take)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if deepest > _MAX_DEPTH:
            break
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _clip(text: str, limit: int = 120) -> str:
    """A user-supplied string short enough for a one-line reason."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _short(err: BaseException) -> str:
    return " ".join(str(err).split())[:200] or type(err).__name__
