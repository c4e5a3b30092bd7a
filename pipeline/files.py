"""Local and object-store locations, and writing files so that a crash leaves the old version or the new one:
`is_uri`, `filesystem` (fsspec, with the `pip install` line of a missing store), atomic writes, deterministic
Parquet and JSON bytes, and where object-store locations are mirrored on this machine (`mirror_dir`,
`local_folder`)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

# Fixed Parquet writer options so that the same table gives the same bytes on every machine and store.
_PARQUET_OPTIONS: dict[str, Any] = {"compression": "zstd", "write_statistics": True, "store_schema": True}
# fsspec protocol -> the extra that installs its filesystem
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}


def is_uri(location: str | Path) -> bool:
    """An object-store or remote URI (`s3://`, `gs://`, `hf://`, ...); `file://` and plain paths are local."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def local_path(location: str | Path) -> Path:
    return Path(str(location).removeprefix("file://")).expanduser()


def nested(a: str | Path, b: str | Path) -> str | None:
    """"inside" when location `a` is `b` or lies inside it, "around" when `b` lies inside `a`, else None.
    Local paths compare resolved (symlinks followed), URIs by their text (`s3://bucket/x/` holds `s3://bucket/x/y`)."""
    if is_uri(a) != is_uri(b):
        return None
    if is_uri(a):
        x, y = str(a).rstrip("/") + "/", str(b).rstrip("/") + "/"
    else:
        x, y = str(local_path(a).resolve()) + "/", str(local_path(b).resolve()) + "/"
    if x.startswith(y):
        return "inside"
    if y.startswith(x):
        return "around"
    return None


def filesystem(uri: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for a URI; a missing filesystem package is a one-line error with
    the exact install command. Credentials come from each store's usual environment and config files
    (AWS_* variables and ~/.aws for s3, GOOGLE_APPLICATION_CREDENTIALS for gs, HF_TOKEN for hf)."""
    import fsspec

    from pipeline.errors import PipelineError

    protocol = uri.split("://", 1)[0]
    try:
        return fsspec.core.url_to_fs(uri)
    except ImportError as err:
        extra = _EXTRAS.get(protocol)
        hint = f"pip install 'mfpo-pipeline[{extra}]'" if extra else f"install the fsspec filesystem for {protocol}://"
        raise PipelineError(f"{uri}: {protocol}:// storage needs a package that is not installed: {hint}") from err
    except ValueError as err:  # unknown protocol
        raise PipelineError(f"{uri}: {err}") from err


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through `write(tmp_path)`, fsync, then rename onto `path` (atomic on POSIX)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    with pq.ParquetWriter(sink, table.schema, **_PARQUET_OPTIONS) as writer:
        # An empty table gets no row group at all: readers that size their batches from the first
        # row group (datasets' parquet loader) fail on a zero-row group.
        if table.num_rows:
            writer.write_table(table, row_group_size=64)
    return sink.getvalue()


def _json_text(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_json(path: Path, data: Any) -> None:
    text = _json_text(data)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_dir() -> Path:
    """Local working folder of this machine (logs and views of runs that live on object stores)."""
    base = os.environ.get("MFPO_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "mfpo-pipeline")
    return Path(base).expanduser()


def mirror_dir(location: str) -> Path:
    """The local folder standing for an object-store location (logs, and the copies that publishing and
    training read): derived from the URI alone, so no filesystem is opened to name it."""
    return cache_dir() / "runs" / hashlib.sha256(location.rstrip("/").encode()).hexdigest()[:16]


# Files of a mirror that stay on their machine: the lease, the sync manifest, per-machine caches, logs


def local_folder(location: str | Path) -> Path:
    """The folder on this machine that stands for a location: the folder itself, or an object store's mirror."""
    return mirror_dir(str(location)) if is_uri(location) else local_path(location)
