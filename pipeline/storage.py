"""Where a run's files live, atomic writes, completion records (the commit point) and the run lock.

    <output_dir>/                          a local folder or an object-store URI (s3://, gs://, ...)
      run.log                              the run log (tracebacks, timings)
      <stage>/_stage.json                  fingerprint and shard count of the stage's current outputs
      <stage>/_plan.parquet                source stages: the ordered input rows
      <stage>/shard-00000.parquet          sample_id + the columns the stage adds
      <stage>/_commits/shard-00000.json    completion record: the shard exists iff this exists
      quarantine/<stage>/shard-00000.parquet   rows the stage rejected, with reasons
      dataset/                             the final dataset (written by the `write` stage)

Commit protocol, the same on every store: a worker writes its shard (and quarantine shard) itself; the
driver then writes the completion record. Local files are written under a temporary name, fsynced and
renamed; an object-store PUT is atomic by itself (the object appears whole or not at all). A crash
before the record leaves at most an orphan object that resume overwrites; nothing reads a shard
without a record.

`Store` is the one place that knows about filesystems (fsspec): stages never see a path, and workers
open the store from its URI, so nothing they touch is a path resolved on the driver's disk.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger("mfpo")

QUARANTINE_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("fields", pa.string()),  # JSON of the row's original fields (binary values summarised)
        ("payload", pa.binary()),  # e.g. the bytes of an image that failed to decode
    ]
)
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
# (uploaded by whoever writes them) and temporary files.
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


def local_folder(location: str | Path) -> Path:
    """The folder on this machine that stands for a location: the folder itself, or an object store's mirror."""
    return mirror_dir(str(location)) if is_uri(location) else local_path(location)


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


# ---------------------------------------------------------------------------------------------- the lock
LEASE_TTL_S = float(os.environ.get("MFPO_LOCK_TTL_S", "60"))


def _alive_here(record: dict[str, Any]) -> bool:
    """False when the holder ran on this machine and its process is gone (a killed run)."""
    if record.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(record.get("pid", 0)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    return True


class _Lease:
    """The run lock on an object store: a lease record `.lock` created with a conditional PUT, renewed every
    ttl/3 seconds by a background thread, taken over only once it has expired (or its holder ran on this
    machine and is dead), with a conditional overwrite so that two take-overs cannot both win."""

    def __init__(self, store: Store, what: str, ttl: float = LEASE_TTL_S) -> None:
        self.store, self.what, self.ttl = store, what, ttl
        self.token = uuid.uuid4().hex
        self.version: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        record = {
            "owner": self.token,
            "what": self.what,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "expires_at": time.time() + self.ttl,
        }
        return json.dumps(record).encode()

    def holder(self) -> tuple[dict[str, Any] | None, str | None]:
        """The live lease record and its version, or (None, version) when there is none or it is stale."""
        version = self.store.version(".lock")
        record = self.store.read_json(".lock")
        if not isinstance(record, dict):
            return None, version
        live = float(record.get("expires_at", 0)) > time.time() and _alive_here(record)
        return (record if live else None), version

    def refuse(self, record: dict[str, Any], what: str) -> None:
        from pipeline.errors import PipelineError

        left = max(0, int(float(record.get("expires_at", 0)) - time.time()))
        raise PipelineError(
            f"another {record.get('what', 'run')} (host {record.get('host')}, pid {record.get('pid')}) is using "
            f"{self.store.location}; wait for it to finish before this {what} (if it died, its lease expires in "
            f"{left} s)"
        )

    def acquire(self) -> None:
        for _ in range(5):
            if self.store.create_exclusive(".lock", self._record()):
                break
            record, version = self.holder()
            if record is not None:
                self.refuse(record, self.what)
            if version is None:
                continue  # released meanwhile: try to create it again
            if self.store.replace_if(".lock", self._record(), version):
                log.info("took over the expired lock of %s", self.store.location)
                break
        else:
            from pipeline.errors import PipelineError

            raise PipelineError(f"could not take the lock of {self.store.location}: another run keeps racing for it")
        self.version = self.store.version(".lock")
        self._thread = threading.Thread(target=self._renew, name="mfpo-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if self.version is None or not self.store.replace_if(".lock", self._record(), self.version):
                    log.error("lost the lock of %s: another run took it over", self.store.location)
                    return
                self.version = self.store.version(".lock")
            except Exception as err:  # a transient store error: try again at the next beat
                log.warning("could not renew the lock of %s: %s", self.store.location, err)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        record = self.store.read_json(".lock")
        if isinstance(record, dict) and record.get("owner") == self.token:
            self.store.remove(".lock")


# ---------------------------------------------------------------------------------------------- records
@dataclass
class CommitRecord:
    shard: int
    fingerprint: str
    rows_in: int
    rows_out: int
    rows_quarantined: int
    data_sha256: str
    reasons: dict[str, int] = field(default_factory=dict)  # quarantine reason kind -> count

    @classmethod
    def parse(cls, data: Any) -> CommitRecord | None:
        try:
            return cls(**data)
        except TypeError:
            return None  # missing or torn: the shard is not committed


@dataclass
class StageState:
    """`_stage.json`: which configuration the stage's files on disk belong to."""

    fingerprint: str
    num_shards: int | None = None
    shard_size: int | None = None  # source stages: rows per shard, as chosen when the rows were planned
    inputs: dict[str, Any] | None = None  # what the fingerprint hashed (so `status` can say what changed)

    @classmethod
    def parse(cls, data: Any) -> StageState | None:
        try:
            return cls(**data)
        except TypeError:
            return None


class RunLayout:
    """The files of one run, on its store."""

    def __init__(self, location: str | Path | Store) -> None:
        self.store = location if isinstance(location, Store) else Store(location)

    @property
    def location(self) -> str:
        return self.store.location

    @property
    def root(self) -> Path:
        """A local folder for this run: the output folder itself, or (object stores) its local mirror."""
        return self.store.mirror()

    @property
    def log_path(self) -> Path:
        return self.root / "run.log"

    def state_path(self, stage: str) -> str:
        return f"{stage}/_stage.json"

    def plan_path(self, stage: str) -> str:
        return f"{stage}/_plan.parquet"

    def commit_path(self, stage: str, shard: int) -> str:
        return f"{stage}/_commits/shard-{shard:05d}.json"

    def quarantine_dir(self, stage: str) -> str:
        return f"quarantine/{stage}"

    def quarantine_path(self, stage: str, shard: int) -> str:
        return f"{self.quarantine_dir(stage)}/shard-{shard:05d}.parquet"

    @contextlib.contextmanager
    def lock(self, what: str = "run", shared: bool = False) -> Iterator[None]:
        """One writer per output directory at a time: two runs would commit the same shards, and a push
        while a run rewrites the dataset would publish a mix. `shared`: a reader (a training) that only needs
        no writer. Local: flock, released when the process ends, however it ends. Object stores: a lease
        (see _Lease); a reader checks that no writer holds it but takes none."""
        from pipeline.errors import PipelineError

        if self.store.remote:
            lease = _Lease(self.store, what)
            try:  # the first request to the store: missing credentials or bucket show up here
                record, _ = lease.holder() if shared else (None, None)
                if not shared:
                    lease.acquire()
            except PipelineError:
                raise
            except Exception as err:
                from pipeline.errors import first_line

                raise PipelineError(f"{self.location}: {type(err).__name__}: {first_line(err)}") from err
            if shared:
                if record is not None:
                    lease.refuse(record, what)
                yield
                return
            try:
                yield
            finally:
                lease.release()
            return
        root = self.store.local()
        root.mkdir(parents=True, exist_ok=True)
        with open(root / ".lock", "a") as fh:
            try:
                fcntl.flock(fh, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                raise PipelineError(
                    f"another run, push, train or eval is using {root}; wait for it to finish before this {what}"
                ) from None
            yield

    def read_state(self, stage: str) -> StageState | None:
        return StageState.parse(self.store.read_json(self.state_path(stage)))

    def write_state(self, stage: str, state: StageState) -> None:
        data = asdict(state)
        for optional in ("shard_size", "inputs"):
            if data[optional] is None:
                del data[optional]
        self.store.write_json(self.state_path(stage), data)

    def committed(self, stage: str, fingerprint: str, num_shards: int) -> dict[int, CommitRecord]:
        out: dict[int, CommitRecord] = {}
        names = set(self.store.glob(f"{stage}/_commits/shard-*.json"))
        for k in range(num_shards):
            if self.commit_path(stage, k) not in names:
                continue
            rec = CommitRecord.parse(self.store.read_json(self.commit_path(stage, k)))
            if rec is not None and rec.fingerprint == fingerprint:
                out[k] = rec
        return out

    def commit(self, stage: str, record: CommitRecord) -> None:
        self.store.write_json(self.commit_path(stage, record.shard), asdict(record))

    def reset_stage(self, stage: str, data_root: str) -> None:
        """Remove every file of a stage: records, shards, quarantine (before redoing it)."""
        for rel in {stage, data_root, self.quarantine_dir(stage)}:
            self.store.remove_tree(rel)

    def sweep_run_temp_files(self) -> None:
        """Temporary files of the run's own top-level files (summary.json) that a killed run left behind."""
        if not self.store.remote:
            for tmp in self.store.local().glob(".*.tmp-*"):
                tmp.unlink(missing_ok=True)

    def sweep_temp_files(self, stage: str, data_root: str) -> None:
        """Remove temporary files a killed run left behind (they were never committed). Object stores have
        none: a PUT that did not finish left nothing."""
        if self.store.remote:
            return
        for rel in {stage, data_root, self.quarantine_dir(stage)}:
            folder = self.store.local(rel)
            if folder.is_dir():
                for tmp in folder.rglob(".*.tmp-*"):
                    tmp.unlink(missing_ok=True)
