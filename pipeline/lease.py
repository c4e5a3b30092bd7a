"""The run lock on an object store: a lease record renewed by a background thread (the local lock is an
`fcntl.flock`, in `pipeline.storage.RunLayout.lock`)."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from pipeline.store import Store

log = logging.getLogger("mfpo")

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
