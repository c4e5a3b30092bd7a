"""A small, faithful stand-in for the Hugging Face Hub HTTP API, for tests.

The *real* ``huggingface_hub`` client (``HfApi``, ``hf_hub_download``, ``HfFileSystem``) and
``datasets.load_dataset("org/name")`` talk to it when ``HF_ENDPOINT`` points at :attr:`HubServer.url`
and ``HF_HUB_DISABLE_XET=1`` (Xet storage cannot be emulated; with it disabled the client uses the
documented git-LFS "basic" transfer). Use :meth:`HubServer.client_env` for a subprocess environment.

Standard library only. Two listeners on 127.0.0.1, both served by one handler:

* the Hub itself (``url``): the ``/api/...`` JSON API, the git-LFS batch API and ``/resolve/`` downloads;
* an object store (``storage_url``), a *different origin*, standing in for S3/the CDN: LFS uploads are
  PUT to it and LFS downloads are redirected to it with signed URLs, exactly like the Hub does. Being a
  different origin matters: the client stops at the 302 of a HEAD to read ``X-Linked-*`` and never sends
  the token there.

This module is the server: the listeners and their start/stop, the HTTP handler and the routing of a
request to its endpoint, injected faults, the object store (its signed URLs and its two endpoints) and the
test hooks. What each endpoint of the Hub itself answers is in hub_api.py; the repos (refs, commits, trees,
LFS objects) are in hub_store.py, which knows nothing of HTTP. Tests import only from here.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

from hub_api import HubApi, Query, Request, Response, json_response, ranged_response
from hub_store import HubError, RepoStore, git_blob_oid, lfs_pointer

# What tests import from here; the last three live in hub_store.py.
__all__ = ["HubError", "HubServer", "git_blob_oid", "lfs_pointer"]

TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}  # URL segment -> repo type
_HF_VARS = ("HF_", "HUGGINGFACE_", "HUGGING_FACE_")

_REPO = r"(?P<repo>[^/]+/[^/]+)"
_API = r"/api/(?P<t>models|datasets|spaces)/" + _REPO
_GIT = r"/(?:(?P<t>datasets|spaces)/)?" + _REPO
# Revisions arrive URL-quoted as one segment ("refs%2Fpr%2F1"); accept the unquoted form too.
_REV = r"(?P<rev>refs/(?:heads|pr|convert|tags)/[^/]+|[^/]+)"


class HubServer:
    """In-process fake of huggingface.co: ``with HubServer(tmp_path, tokens={...}) as hub: ... hub.url ...``

    ``tokens`` maps token -> "write" | "read"; all belong to one user (``hub-user``). No token reads public
    repos; an unknown token is refused (401) everywhere; writes need a "write" token (401 without, 403 read).
    Test hooks: ``log``, ``lfs_uploads``, ``errors``, ``commits()``, ``files()``, ``inject()``, ``create_repo()``.
    """

    def __init__(self, root, tokens: dict[str, str] | None = None):
        self.root = Path(root)
        self.tokens = dict(tokens if tokens is not None else {"hf_writer": "write", "hf_reader": "read"})
        self.log: list[tuple[str, str, int]] = []  # (method, path without query, status) of every request
        self.lfs_uploads: list[str] = []  # sha256 of every successful LFS PUT
        self.errors: list[str] = []  # tracebacks of server bugs (answered 500)
        self.store = RepoStore(self.root)
        self._api = HubApi(self)
        self._faults: list[dict] = []
        self._lock = threading.Lock()  # guards _faults only: the repos have the store's lock
        self._secret = secrets.token_bytes(16)  # signs storage URLs, like S3 pre-signed URLs
        self._servers: list[ThreadingHTTPServer] = []
        self.url = self.storage_url = ""

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> HubServer:
        self.store.makedirs()
        for storage in (False, True):
            srv = _Server(("127.0.0.1", 0), _Handler)
            srv.hub, srv.is_storage = self, storage
            threading.Thread(target=srv.serve_forever, name="hub-server", daemon=True).start()
            self._servers.append(srv)
        self.url, self.storage_url = (f"http://127.0.0.1:{s.server_address[1]}" for s in self._servers)
        return self

    def stop(self) -> None:
        for srv in self._servers:
            srv.shutdown()
            srv.server_close()
        self._servers = []

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def client_env(self, hf_home, token: str | None = None, base: dict | None = None) -> dict[str, str]:
        """Environment for a client subprocess: endpoint, Xet off, online, quiet, isolated HF_HOME."""
        # Every HF_* setting goes (another cache, token, endpoint, offline mode...): only what is set below counts.
        env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith(_HF_VARS)}
        env.pop("TRANSFORMERS_OFFLINE", None)
        env.update(
            HF_ENDPOINT=self.url,
            HF_HUB_DISABLE_XET="1",
            HF_HOME=str(hf_home),
            HF_HUB_OFFLINE="0",
            HF_DATASETS_OFFLINE="0",
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            NO_PROXY="127.0.0.1,localhost",
            no_proxy="127.0.0.1,localhost",
        )
        if token is not None:
            env["HF_TOKEN"] = token
        return env

    # ---- test hooks ------------------------------------------------------------------------------
    def inject(
        self,
        method: str,
        path_regex: str,
        status: int | str | None = 500,
        times: int = 1,
        headers: dict | None = None,
        delay: float = 0.0,
    ) -> None:
        """Answer the next `times` requests whose method and path (no query) match with `status`.

        status "close" drops the connection without an answer; None only applies `delay` (seconds)
        and then answers normally (a slow server). A 429 gets ``Retry-After: 0`` unless headers say
        otherwise (the client still sleeps 1 s: it waits Retry-After + 1)."""
        if status == 429 and headers is None:
            headers = {"Retry-After": "0"}
        with self._lock:
            self._faults.append(
                dict(
                    method=method.upper(),
                    regex=re.compile(path_regex),
                    status=status,
                    times=times,
                    headers=headers or {},
                    delay=delay,
                )
            )

    def clear_faults(self) -> None:
        """Forget every injected fault that has not fired yet."""
        with self._lock:
            self._faults.clear()

    def create_repo(self, repo_id: str, repo_type: str = "dataset", private: bool = False) -> None:
        """Create a repo directly (test setup), with the Hub's initial .gitattributes commit."""
        with self.store.lock:
            self.store.create(repo_type, repo_id, private)

    def upload(self, folders: dict[str, tuple[str, str | Path, str]], hf_home, base: dict | None = None) -> None:
        """Create repos and upload folders to them with the real client, as a user would (test setup):
        ``{repo_id: (repo_type, folder, path_in_repo)}``; path_in_repo "" puts the folder at the root."""
        import subprocess
        import sys

        script = (
            "import json, sys\n"
            "from huggingface_hub import HfApi\n"
            "api = HfApi()\n"
            "for repo_id, (kind, folder, where) in json.loads(sys.argv[1]).items():\n"
            "    api.create_repo(repo_id, repo_type=kind)\n"
            "    api.upload_folder(folder_path=folder, path_in_repo=where or None, repo_id=repo_id, repo_type=kind)\n"
        )
        payload = json.dumps({k: [kind, str(folder), where] for k, (kind, folder, where) in folders.items()})
        env = self.client_env(hf_home, token="hf_writer", base=base)
        subprocess.run([sys.executable, "-c", script, payload], env=env, check=True, capture_output=True)

    def commits(self, repo_id: str, repo_type: str = "dataset") -> list[dict]:
        """All commits of the repo (every branch/PR), oldest first: oid, parent, ref, message,
        description, date, paths (changed: added, modified or deleted)."""
        return self.store.commits(repo_type, repo_id)

    def files(self, repo_id: str, repo_type: str = "dataset", revision: str = "main") -> dict[str, bytes]:
        return self.store.files(repo_type, repo_id, revision)

    # ---- request routing -------------------------------------------------------------------------
    def _take_fault(self, method: str, path: str) -> dict | None:
        with self._lock:
            for fault in self._faults:
                if fault["method"] in (method, "*") and fault["regex"].search(path):
                    fault["times"] -= 1
                    if fault["times"] <= 0:
                        self._faults.remove(fault)
                    return fault
        return None

    def _route(self, req: Request, method: str, path: str, query: Query, body: bytes) -> Response:
        # The object store's endpoints are this server's own (it holds their signing key); the Hub's are HubApi's.
        storage = req.server.is_storage
        routes, endpoints = (_STORAGE_ROUTES, self) if storage else (_ROUTES, self._api)
        for methods, regex, name in routes:
            m = regex.fullmatch(path)
            if m and method in methods:
                args = {k: unquote(v) if v is not None else None for k, v in m.groupdict().items()}
                repo_type = TYPES.get(args.pop("t", None) or ("models" if "repo" in args else ""))
                if repo_type:
                    args["repo_type"] = repo_type
                return getattr(endpoints, name)(req, method, query, body, **args)
        raise HubError(404, f"Not found: {method} {path}")

    # ---- object store (the other origin) ----------------------------------------------------------
    def _sign(self, *parts: object) -> str:
        return hmac.new(self._secret, ":".join(map(str, parts)).encode(), "sha256").hexdigest()

    def download_href(self, oid: str) -> str:
        """A signed URL to GET the LFS object from the object store."""
        return f"{self.storage_url}/lfs-storage/{oid}?" + _qs(sig=self._sign("get", oid))

    def upload_href(self, repo_type: str, repo_id: str, oid: str, size: int) -> str:
        """A signed URL to PUT exactly this object (oid and size) into the object store, for this repo."""
        sig = self._sign("put", repo_type, repo_id, oid, size)
        return f"{self.storage_url}/lfs-storage/{oid}?" + _qs(t=repo_type, repo=repo_id, size=size, sig=sig)

    def storage_put(self, req: Request, method: str, query: Query, body: bytes, oid: str) -> Response:
        q = {k: v[0] for k, v in query.items()}
        size = int(q.get("size", -1))
        if not hmac.compare_digest(q.get("sig", ""), self._sign("put", q.get("t"), q.get("repo"), oid, size)):
            return 403, {"Content-Type": "application/xml"}, b"<Error><Code>SignatureDoesNotMatch</Code></Error>"
        if len(body) != size or hashlib.sha256(body).hexdigest() != oid:
            return 400, {"Content-Type": "application/xml"}, b"<Error><Code>BadDigest</Code></Error>"
        self.store.write_lfs(oid, body)
        with self.store.lock:
            self.store.attach_lfs(q["t"], q["repo"], oid)
            self.lfs_uploads.append(oid)
        return 200, {"ETag": f'"{hashlib.md5(body).hexdigest()}"'}, b""

    def storage_get(self, req: Request, method: str, query: Query, body: bytes, oid: str) -> Response:
        path = self.store.lfs_path(oid)
        if not hmac.compare_digest(query.get("sig", [""])[0], self._sign("get", oid)) or not path.exists():
            return 403, {"Content-Type": "application/xml"}, b"<Error><Code>AccessDenied</Code></Error>"
        return ranged_response(req, path.read_bytes(), {"ETag": f'"{oid}"', "Accept-Ranges": "bytes"})


def _qs(**params: object) -> str:
    return "&".join(f"{k}={quote(str(v), safe='')}" for k, v in params.items())


_ROUTES = [
    (set(m.split()), re.compile(rx), name)
    for m, rx, name in [
        ("GET", r"/api/whoami-v2", "whoami"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("POST", r"/api/repos/create", "create_repo_api"),
        ("DELETE", r"/api/repos/delete", "delete_repo_api"),
        ("GET", _API + r"(?:/revision/" + _REV + ")?", "repo_info"),
        ("POST", _API + r"/preupload/" + _REV, "preupload"),
        ("POST", _API + r"/commit/" + _REV, "commit"),
        ("GET", _API + r"/tree/" + _REV + r"(?:/(?P<path>.*))?", "tree"),
        ("POST", _API + r"/paths-info/" + _REV, "paths_info"),
        ("POST DELETE", _API + r"/branch/(?P<branch>[^/]+)", "branch"),
        ("GET", _API + r"/refs", "refs"),
        ("GET", _API + r"/commits/" + _REV, "list_commits"),
        ("POST", _GIT + r"\.git/info/lfs/objects/batch", "lfs_batch"),
        ("POST", _GIT + r"\.git/info/lfs/objects/verify", "lfs_verify"),
        ("GET HEAD", _GIT + r"/resolve/" + _REV + r"/(?P<path>.+)", "resolve"),
    ]
]
_STORAGE_ROUTES = [
    ({"PUT"}, re.compile(r"/lfs-storage/(?P<oid>[0-9a-f]{64})"), "storage_put"),
    ({"GET", "HEAD"}, re.compile(r"/lfs-storage/(?P<oid>[0-9a-f]{64})"), "storage_get"),
]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hub: HubServer  # set by HubServer.start, read by the handler
    is_storage: bool  # the object store's listener, not the Hub's

    def handle_error(self, request, client_address):  # a client hanging up is not worth a traceback
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; so every answer carries a Content-Length
    server_version = "HubServer/1.0"
    timeout = 60  # idle keep-alive connections are closed after this

    def log_message(self, format, *args):  # silence stderr: the log is hub.log (it never holds headers)
        pass

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                chunk = self.rfile.read(size + 2)[:size]
                if size == 0:
                    while self.rfile.readline().strip():  # trailers
                        pass
                    return b"".join(chunks)
                chunks.append(chunk)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self):
        hub: HubServer = self.server.hub
        split = urlsplit(self.path)
        path, method = split.path, self.command
        body = self._body()  # always drain the body, so a fault answer keeps the connection usable
        fault = hub._take_fault(method, path)
        if fault and fault["delay"]:
            time.sleep(fault["delay"])
        if fault and fault["status"] == "close":
            hub.log.append((method, path, 0))
            self.close_connection = True
            return
        try:
            if fault and fault["status"] is not None:
                msg = f"Injected fault {fault['status']}"
                status, headers, data = json_response(
                    {"error": msg}, fault["status"], {"X-Error-Message": msg, **fault["headers"]}
                )
            else:
                status, headers, data = hub._route(self, method, path, parse_qs(split.query), body)
        except HubError as e:
            status, headers, data = json_response({"error": e.message}, e.status, e.headers)
        except Exception:
            hub.errors.append(traceback.format_exc())
            status, headers, data = json_response({"error": "Internal Error - We're working hard to fix this."}, 500)
        hub.log.append((method, path, status))
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(data)), "X-Request-Id": secrets.token_hex(8)}.items():
            self.send_header(key, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(data)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _handle
