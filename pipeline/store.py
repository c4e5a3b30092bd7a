"""`Store`: a root folder on a local disk or an object store, the one place that knows about filesystems
(fsspec). Stages never see a path, and workers open the store from its URI. A remote store is read and written
through a local mirror, kept in step by `pull` / `push` with a sync manifest (what was last seen of each file),
so that only what changed moves."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.files import (
    _json_text,
    atomic_write,
    filesystem,
    is_uri,
    local_path,
    mirror_dir,
    parquet_bytes,
    write_json,
)

log = logging.getLogger("mfpo")

SYNC_MANIFEST = ".mfpo-sync.json"
_LOCAL_ONLY = {".lock", SYNC_MANIFEST, "_cache", "run.log", "train.log"}


def _local_only(rel: str) -> bool:
    return rel.split("/", 1)[0] in _LOCAL_ONLY or ".tmp-" in rel.rsplit("/", 1)[-1]


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _version(info: dict[str, Any]) -> str:
    """What changes when an object is rewritten (S3 ETag, GCS md5 or generation, else a modification time)."""
    for key in ("ETag", "etag", "md5Hash", "generation", "mtime", "LastModified", "last_modified", "updated"):
        if info.get(key):
            return str(info[key])
    return ""


def _prune_empty(folder: Path) -> None:
    if folder.is_dir():
        for d in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                d.rmdir()  # only succeeds when empty




def _snapshot(root: Path, folders: tuple[str, ...] | list[str]) -> dict[str, tuple[int, int]]:
    """rel path -> (size, mtime_ns) of the files under `folders` of a local folder ("": all of it)."""
    out: dict[str, tuple[int, int]] = {}
    for folder in folders:
        if (root / folder).is_dir():
            for f in (root / folder).rglob("*"):
                if f.is_file() and ".tmp-" not in f.name:
                    st = f.stat()
                    out[f.relative_to(root).as_posix()] = (st.st_size, st.st_mtime_ns)
    return out


class Store:
    """A root folder on a local disk or an object store; every path below it is relative ("a/b.parquet").

    Picklable as its location only: a Ray worker re-opens the store itself, with its own credentials."""

    def __init__(self, location: str | Path) -> None:
        self.remote = is_uri(location)
        if self.remote:
            self.location = str(location).rstrip("/")
            self.fs, self._root = filesystem(self.location)
            self._root = self._root.rstrip("/")
            self.root = None
        else:
            self.root: Path | None = local_path(location).resolve()
            self.location = str(self.root)
            self.fs = None

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (Store, (self.location,))

    def __repr__(self) -> str:
        return f"Store({self.location!r})"

    def _path(self, rel: str) -> str:
        return f"{self._root}/{rel}" if rel else self._root

    def local(self, rel: str = "") -> Path:
        assert self.root is not None, "local() on a remote store"
        return self.root / rel if rel else self.root

    def mirror(self) -> Path:
        """A local folder standing for this store: the store itself when local, else a cache folder keyed by
        the URI (logs, and the copies that publishing and training read)."""
        return self.root if self.root is not None else mirror_dir(self.location)

    # ------------------------------------------------------------------ bytes
    def read_bytes(self, rel: str) -> bytes:
        if self.root is not None:
            return (self.root / rel).read_bytes()
        return self.fs.cat_file(self._path(rel))

    def read_text(self, rel: str) -> str | None:
        """The text of a file, or None when it is missing or unreadable (a torn or absent record)."""
        try:
            return self.read_bytes(rel).decode("utf-8")
        except (OSError, UnicodeDecodeError):
            return None

    def write_bytes(self, rel: str, data: bytes) -> None:
        if self.root is not None:
            atomic_write(self.root / rel, lambda tmp: tmp.write_bytes(data))
        else:
            self.fs.pipe_file(self._path(rel), data)

    def write_json(self, rel: str, data: Any) -> None:
        self.write_bytes(rel, _json_text(data).encode("utf-8"))

    def read_json(self, rel: str) -> Any:
        text = self.read_text(rel)
        if text is None:
            return None
        try:
            return json.loads(text)
        except ValueError:
            return None

    def exists(self, rel: str) -> bool:
        if self.root is not None:
            return (self.root / rel).exists()
        return self.fs.exists(self._path(rel))

    def remove(self, rel: str) -> None:
        if self.root is not None:
            (self.root / rel).unlink(missing_ok=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self._path(rel))

    def remove_tree(self, rel: str) -> None:
        if not rel.strip("/."):
            raise ValueError(f"refusing to delete the whole of {self.location}")
        if self.root is not None:
            shutil.rmtree(self.root / rel, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self._path(rel), recursive=True)
            self.fs.invalidate_cache()

    def glob(self, pattern: str) -> list[str]:
        """Relative paths matching a glob below the root, sorted."""
        if self.root is not None:
            return sorted(str(p.relative_to(self.root)) for p in self.root.glob(pattern))
        prefix = len(self._root) + 1
        self.fs.invalidate_cache()
        return sorted(p[prefix:] for p in self.fs.glob(self._path(pattern)))

    @contextlib.contextmanager
    def local_view(self, folders: tuple[str, ...] | list[str]) -> Iterator[Path]:
        """A local folder holding `folders` of this store, for code that reads files (the card, preview,
        push). Local stores: the folder itself. Object stores: the mirror, brought up to date (`pull`); files
        the caller adds or changes there are uploaded when the block ends without error."""
        if self.root is not None:
            yield self.root
            return
        mirror = self.pull(folders)
        yield mirror
        self.push(folders, delete=False)

    # ------------------------------------------------------------------ mirror sync
    # fsspec has no folder sync that compares versions (its `get`/`put` copy everything, and a same-sized
    # rewrite of a small record looks unchanged by size alone): the mirror keeps a manifest of what it last
    # saw on each side, so a sync moves only what changed, in either direction.
    def _listing(self, folders: tuple[str, ...] | list[str]) -> dict[str, list[Any]]:
        """rel path -> [size, version] of the store's files under `folders` (version: ETag, md5, mtime...)."""
        self.fs.invalidate_cache()
        found: dict[str, list[Any]] = {}
        for folder in folders:
            try:
                entries = self.fs.find(self._path(folder), detail=True)
            except FileNotFoundError:
                continue
            for path, info in entries.items():
                rel = path[len(self._root) + 1 :]
                if info.get("type") != "directory" and not _local_only(rel):
                    found[rel] = [int(info.get("size") or 0), _version(info)]
        return found

    def _manifest(self) -> dict[str, dict[str, list[Any]]]:
        try:
            return json.loads((self.mirror() / SYNC_MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def _save_manifest(self, manifest: dict[str, Any]) -> None:
        write_json(self.mirror() / SYNC_MANIFEST, manifest)

    def pull(self, folders: tuple[str, ...] | list[str] = ("",), only: Callable[[str], bool] | None = None) -> Path:
        """Make the mirror's `folders` ("": everything) equal to the store's: files that are new or changed on
        either side since the last sync are downloaded, files the store no longer has are removed (with
        their empty folders). `only(rel)` limits it to some files (e.g. the small records). Returns the
        mirror (for a local store: the store's own folder, untouched)."""
        mirror = self.mirror()
        if self.root is not None:
            return mirror
        wanted = only or (lambda rel: True)
        manifest = self._manifest()
        remote = {rel: v for rel, v in self._listing(folders).items() if wanted(rel)}
        for rel in _snapshot(mirror, folders):
            if rel not in remote and wanted(rel) and not _local_only(rel):
                (mirror / rel).unlink()
                manifest.pop(rel, None)
        for folder in folders:
            _prune_empty(mirror / folder)
        for rel, version in remote.items():
            target = mirror / rel
            entry = manifest.get(rel)
            if target.is_file() and entry == {"remote": version, "local": _stamp(target)}:
                continue
            atomic_write(target, lambda tmp, rel=rel: self.fs.get_file(self._path(rel), str(tmp)))
            manifest[rel] = {"remote": version, "local": _stamp(target)}
        self._save_manifest(manifest)
        return mirror

    def push(
        self, folders: tuple[str, ...] | list[str] = ("",), last: tuple[str, ...] = (), delete: bool = True
    ) -> None:
        """Make the store's `folders` equal to the mirror's: files new or changed in the mirror are uploaded,
        and (delete=True) files the mirror no longer has are deleted. Files named in `last` (commit markers)
        are uploaded after, and deleted before, everything else, so a marker in the store always has its
        files beside it, even if the push is cut off half way."""
        if self.root is not None:
            return
        mirror = self.mirror()
        manifest = self._manifest()
        remote = self._listing(folders)
        local = {rel: list(stamp) for rel, stamp in _snapshot(mirror, folders).items() if not _local_only(rel)}

        def is_marker(rel: str) -> bool:
            return rel.rsplit("/", 1)[-1] in last

        if delete:
            for rel in sorted((r for r in remote if r not in local), key=lambda r: not is_marker(r)):
                self.remove(rel)
                manifest.pop(rel, None)
        for rel in sorted(local, key=is_marker):
            entry = manifest.get(rel)
            if entry == {"remote": remote.get(rel), "local": local[rel]}:
                continue
            self.fs.put_file(str(mirror / rel), self._path(rel))
            info = self.fs.info(self._path(rel))
            manifest[rel] = {"remote": [int(info.get("size") or 0), _version(info)], "local": local[rel]}
        self._save_manifest(manifest)

    # ------------------------------------------------------------------ Parquet
    def read_parquet(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        if self.root is not None:
            return pq.read_table(self.root / rel, columns=columns)
        return pq.read_table(self._path(rel), columns=columns, filesystem=self.fs)

    def read_parquet_schema(self, rel: str) -> pa.Schema:
        if self.root is not None:
            return pq.read_schema(self.root / rel)
        return pq.read_schema(self._path(rel), filesystem=self.fs)

    def write_parquet(self, rel: str, table: pa.Table) -> str:
        """Write a Parquet file (atomically); returns the sha256 of its bytes."""
        data = parquet_bytes(table)
        self.write_bytes(rel, data)
        return hashlib.sha256(data).hexdigest()

    # ------------------------------------------------------------------ conditional writes (the lease)
    # Object stores only: a local run is locked with flock (RunLayout.lock).
    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Create a file only if it does not exist (a conditional PUT, If-None-Match, where the store has one).
        True: created."""
        try:
            self.fs.pipe_file(self._path(rel), data, mode="create")
        except FileExistsError:
            return False
        except TypeError:  # a filesystem without exclusive create: check, then write (not atomic)
            if self.fs.exists(self._path(rel)):
                return False
            self.fs.pipe_file(self._path(rel), data)
        return True

    def version(self, rel: str) -> str | None:
        """An opaque version of a file (ETag or generation); None when missing."""
        try:
            info = self.fs.info(self._path(rel), refresh=True)
        except FileNotFoundError:
            return None
        return str(info.get("ETag") or info.get("generation") or info.get("mtime") or info.get("LastModified"))

    def replace_if(self, rel: str, data: bytes, version: str) -> bool:
        """Overwrite a file only if it is still at `version`: S3's If-Match, elsewhere a compare and write."""
        if "s3" in self.fs.protocol:
            try:
                self.fs.pipe_file(self._path(rel), data, IfMatch=version)
            except (FileExistsError, OSError) as err:
                if isinstance(err, FileExistsError) or "pre-condition" in str(err) or "PreconditionFailed" in str(err):
                    return False
                raise
            return True
        if self.version(rel) != version:
            return False
        self.write_bytes(rel, data)
        return True
