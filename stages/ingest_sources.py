"""ingest's sources: JSON/JSONL files, Parquet files and folders, `save_to_disk` folders and Hub datasets (through
`datasets`), local or behind a URI (fsspec), and the folder image paths are resolved in. Each reads rows by
position, as `Ingest.plan` ordered them; the stage itself validates what they return."""

from __future__ import annotations

import codecs
import errno
import hashlib
import json
import posixpath
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import PipelineError, RowError, first_line
from pipeline.storage import filesystem, is_uri, local_path
from stages.ingest_rows import MAX_DEPTH, canonical_bytes, clip, json_depth, short_error

if TYPE_CHECKING:
    from stages.ingest import IngestConfig

LOCAL_TEXT = (".jsonl", ".ndjson", ".json")


class JsonSource:
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
                raise PipelineError(
                    f"stages.ingest.source: {name} is not a valid JSON array ({short_error(err)})"
                ) from None
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
            return None, f"bad row: line {lineno} nests deeper than {MAX_DEPTH} levels"
        except json.JSONDecodeError as err:
            return None, f"bad row: line {lineno} is not valid JSON ({err.msg} at column {err.colno})"
        except ValueError as err:  # valid JSON Python will not convert, e.g. an integer of 5000 digits
            return None, f"bad row: line {lineno} is not usable JSON ({short_error(err)})"
        if not isinstance(fields, dict):
            return None, f"bad row: line {lineno} is not a JSON object (got {type(fields).__name__})"
        if json_depth(fields) > MAX_DEPTH:
            return None, f"bad row: line {lineno} nests deeper than {MAX_DEPTH} levels"
        return fields, None

    def raw(self, i: int) -> dict[str, Any]:
        lineno, line = self.records[i]
        return {"line": lineno, "raw": line.decode("utf-8", errors="replace")[:2000]}

    def rows(self, indices: list[int], columns: list[str] | None = None) -> list[tuple[dict | None, str | None]]:
        return [self.row(i) for i in indices]

    def digest(self, i: int, fields: dict | None) -> str:
        """What the row is, byte for byte: the plan records it, and a worker checks what it read against it."""
        return hashlib.sha256(self.records[i][1]).hexdigest()[:32]


class DatasetsSource:
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
        return hashlib.sha256(canonical_bytes(fields or {})).hexdigest()[:32]


class ImageFolder:
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
            raise RowError(f"image: path {clip(ref)!r} contains a NUL byte")
        return self._read_remote(ref, max_bytes) if self.remote else self._read_local(ref, max_bytes)

    def _read_local(self, ref: str, max_bytes: int) -> bytes:
        try:
            path = (self.root_path / ref).resolve()
            if not path.is_relative_to(self.root_path):
                raise RowError(f"image: path {clip(ref)!r} is outside the image folder")
            if not path.exists():
                raise RowError(f"image: file not found: {clip(ref)}")
            if path.is_dir():
                raise RowError(f"image: path {clip(ref)!r} is a folder, not a file")
            if not path.is_file():
                raise RowError(f"image: path {clip(ref)!r} is not a regular file")
            check_size(path.stat().st_size, max_bytes)
            return path.read_bytes()
        except OSError as err:
            if err.errno == errno.ENAMETOOLONG:
                raise RowError(
                    f"image: path is too long for the file system ({len(ref)} characters; image data given as "
                    "text must be a data:image/...;base64, URI)"
                ) from None
            raise RowError(f"image: cannot read {clip(ref)!r} ({err.strerror or short_error(err)})") from None

    def _read_remote(self, ref: str, max_bytes: int) -> bytes:
        relative = posixpath.normpath(ref)
        if "://" in ref or relative.startswith(("/", "..")):
            raise RowError(f"image: path {clip(ref)!r} is outside the image folder")
        key = f"{self.root}/{relative}"
        try:
            info = self.fs.info(key)
            if info.get("type") == "directory":
                raise RowError(f"image: path {clip(ref)!r} is a folder, not a file")
            check_size(int(info.get("size") or 0), max_bytes)
            return self.fs.cat_file(key)
        except FileNotFoundError:
            raise RowError(f"image: file not found: {clip(ref)}") from None
        except PermissionError as err:
            raise RowError(f"image: cannot read {clip(ref)!r} ({first_line(err)})") from None
        except RowError:
            raise
        except Exception as err:  # connection errors, throttling, 5xx after the filesystem's own retries
            raise RowError(f"transient: image: cannot read {clip(ref)!r} ({short_error(err)})") from None


def check_size(size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise RowError(f"image: {size} bytes exceeds image.max_bytes={max_bytes}")


def open_source(cfg: IngestConfig) -> tuple[Any, ImageFolder | None]:
    """The source and the folder relative image paths are resolved in (None: the rows may not name files)."""
    if is_uri(cfg.source):
        return open_remote(cfg)
    path = local_path(cfg.source)
    if path.exists():
        if path.is_file() and path.suffix.lower() in LOCAL_TEXT:
            return JsonSource(path.read_bytes(), path.name), ImageFolder(path.parent)
        import datasets

        if path.is_dir() and (path / "state.json").exists():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[cfg.split]
            return DatasetsSource(ds, allow_paths=True), ImageFolder(path)
        files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
        if not files or any(f.suffix.lower() != ".parquet" for f in files):
            raise PipelineError(f"stages.ingest.source: {cfg.source} {NOT_A_SOURCE}")
        named = [(str(f.relative_to(path)) if path.is_dir() else f.name, pq.read_schema(f)) for f in files]
        features = union_features(named)
        ds = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train", features=features)
        return DatasetsSource(ds, allow_paths=True), ImageFolder(path if path.is_dir() else path.parent)
    if cfg.source.startswith((".", "/", "~", "file://")) or cfg.source.endswith((*LOCAL_TEXT, ".parquet")):
        raise PipelineError(f"stages.ingest.source: file not found: {cfg.source}")
    import datasets

    try:
        ds = datasets.load_dataset(cfg.source, name=cfg.subset, split=cfg.split, revision=cfg.revision)
    except Exception as err:
        raise PipelineError(f"stages.ingest.source: cannot load Hub dataset {cfg.source!r}: {err}") from err
    # Rows from the Hub may carry image *paths*; never read local files on their behalf.
    return DatasetsSource(ds, allow_paths=False), None


NOT_A_SOURCE = "is not a .jsonl/.json/.parquet file or a folder of Parquet files"


def remote_files(uri: str) -> tuple[Any, str, list[str]]:
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


def open_remote(cfg: IngestConfig) -> tuple[Any, ImageFolder | None]:
    """A source file or folder in an object store or a Hub repo, read by whoever opens it (driver or worker)."""
    fs, path, files = remote_files(cfg.source)
    folder = cfg.source.rstrip("/") if files != [path] else cfg.source.rsplit("/", 1)[0]
    if files == [path] and path.lower().endswith(LOCAL_TEXT):
        return JsonSource(fs.cat_file(path), posixpath.basename(path)), ImageFolder(folder)
    import datasets

    if f"{path}/state.json" in files:
        ds = datasets.load_from_disk(cfg.source, storage_options=fs.storage_options)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[cfg.split]
        return DatasetsSource(ds, allow_paths=True), ImageFolder(folder)
    parquet = [f for f in files if f.lower().endswith(".parquet")]
    if not parquet:
        hint = "; for a whole Hub dataset give its id (<org>/<name>)" if cfg.source.startswith("hf://") else ""
        raise PipelineError(f"stages.ingest.source: {cfg.source} {NOT_A_SOURCE}{hint}")
    uris = [fs.unstrip_protocol(f) for f in parquet]
    schemas = []
    for f in parquet:
        with fs.open(f, "rb") as fh:
            name = posixpath.relpath(f, path) if files != [path] else posixpath.basename(f)
            schemas.append((name, pq.read_schema(fh)))
    ds = datasets.load_dataset(
        "parquet", data_files=uris, split="train", storage_options=fs.storage_options, features=union_features(schemas)
    )
    return DatasetsSource(ds, allow_paths=True), ImageFolder(folder)


def union_features(schemas: list[tuple[str, pa.Schema]]) -> Any:
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


def source_dataset_name(source: str) -> str:
    """The name recorded in each row's `source`: a file or folder's own name (the same wherever it is
    stored), or the Hub id."""
    if is_uri(source):
        return posixpath.basename(source.rstrip("/"))
    path = local_path(source)
    return path.name if path.exists() else source


def detect_format(columns: set[str]) -> str:
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
