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

Repo state (refs, commits, full trees, small files) lives in memory behind one lock; LFS objects are
files under ``root/lfs``. Every commit stores the whole tree ``{path: entry}``; oids are real git oids
(blob, tree and LFS pointer), so ``blob_id``/``tree_id`` compare like the Hub's.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import time
import traceback
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

_LFS_PATTERNS = """
*.7z *.arrow *.bin *.bz2 *.ckpt *.ftz *.gz *.h5 *.joblib *.lfs.* *.lz4 *.mds *.mlmodel *.model *.msgpack *.npy
*.npz *.onnx *.ot *.parquet *.pb *.pickle *.pkl *.pt *.pth *.rar *.safetensors saved_model/**/* *.tar.* *.tar
*.tflite *.tgz *.wasm *.xz *.zip *.zst *tfevents*
# Audio files - uncompressed
*.pcm *.sam *.raw
# Audio files - compressed
*.aac *.flac *.mp3 *.ogg *.wav
# Image files - uncompressed
*.bmp *.gif *.png *.tiff
# Image files - compressed
*.jpg *.jpeg *.webp
# Video files - compressed
*.mp4 *.webm
"""
# The .gitattributes the Hub puts in every new repo: it is what routes parquet/images/... to LFS.
DEFAULT_GITATTRIBUTES = "".join(
    line + "\n" if line.startswith("#") else "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in line.split())
    for line in _LFS_PATTERNS.strip().splitlines()
)
REGULAR_MAX_SIZE = 10 * 1024 * 1024  # the Hub refuses plain git blobs above 10 MB: preupload says "lfs"
TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}  # URL segment -> repo type
PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}  # web/git URL prefix per repo type
USER = "hub-user"  # the single account every valid token belongs to
_HF_VARS = ("HF_", "HUGGINGFACE_", "HUGGING_FACE_")

_REPO = r"(?P<repo>[^/]+/[^/]+)"
_API = r"/api/(?P<t>models|datasets|spaces)/" + _REPO
_GIT = r"/(?:(?P<t>datasets|spaces)/)?" + _REPO
# Revisions arrive URL-quoted as one segment ("refs%2Fpr%2F1"); accept the unquoted form too.
_REV = r"(?P<rev>refs/(?:heads|pr|convert|tags)/[^/]+|[^/]+)"


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _truthy(value) -> bool:
    return str(value).lower() in ("1", "true", "yes")


def _is_binary(sample: bytes) -> bool:
    if b"\0" in sample:
        return True
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError as e:  # a multi-byte char cut by the 512-byte sample is still text
        return e.reason != "unexpected end of data"
    return False


def _rules(text: str, keyword: str | None) -> list[tuple[str, bool]]:
    """(pattern, on) rules of a .gitattributes (keyword 'filter=lfs') or .gitignore (keyword None)."""
    out = []
    for line in text.splitlines():
        fields = line.strip().split()
        if not fields or fields[0].startswith("#"):
            continue
        if keyword is None:
            pat = fields[0]
            out.append((pat.lstrip("!").rstrip("/"), not pat.startswith("!")))
        elif keyword in fields[1:] or "-filter" in fields[1:] or "!filter" in fields[1:]:
            out.append((fields[0], keyword in fields[1:]))
    return out


def _match(rules: list[tuple[str, bool]], path: str, any_component: bool = False) -> bool:
    """git's precedence (last matching rule wins), fnmatch standing in for wildmatch. A pattern without
    '/' matches the file name (.gitattributes) or any path component (.gitignore: ignored folders)."""
    hit = False
    for pat, on in rules:
        pat = pat.lstrip("/")
        if "/" not in pat:
            names = path.split("/") if any_component else [path.rsplit("/", 1)[-1]]
            ok = any(fnmatch.fnmatchcase(name, pat) for name in names)
        else:
            ok = fnmatch.fnmatchcase(path, pat) or fnmatch.fnmatchcase(path, pat.replace("**/", ""))
        hit = on if ok else hit
    return hit


def _dir_oids(tree: dict) -> dict[str, str]:
    """Git tree oids of every directory ('' = root) of a {path: entry} tree, built bottom-up."""
    children: dict[str, dict[str, tuple[str, str]]] = {"": {}}
    for path, entry in tree.items():
        parts = path.split("/")
        for i in range(1, len(parts)):
            children.setdefault("/".join(parts[:i]), {})
        children["/".join(parts[:-1])][parts[-1]] = ("100644", entry["oid"])
    oids = {}
    for d in sorted(children, key=lambda d: d.count("/") + 1 if d else 0, reverse=True):
        items = sorted(children[d].items(), key=lambda kv: kv[0] + ("/" if kv[1][0] == "40000" else ""))
        body = b"".join(b"%s %s\0" % (m.encode(), n.encode()) + bytes.fromhex(o) for n, (m, o) in items)
        oids[d] = hashlib.sha1(b"tree %d\0" % len(body) + body).hexdigest()
        if d:
            parent, _, name = d.rpartition("/")
            children[parent][name] = ("40000", oids[d])
    return oids


class HubError(Exception):
    """An error answered the Hub's way: JSON {"error": ...} plus X-Error-Code / X-Error-Message headers,
    which is what huggingface_hub's hf_raise_for_status maps to RepositoryNotFoundError & co."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, dict(headers or {})
        self.headers["X-Error-Message"] = message
        if code:
            self.headers["X-Error-Code"] = code


class _Repo:
    def __init__(self, repo_type: str, repo_id: str, private: bool):
        self.type, self.id, self.private = repo_type, repo_id, private
        self.created = _now()
        self.refs: dict[str, str] = {}  # "refs/heads/main" / "refs/pr/1" -> commit oid
        self.commits: dict[str, dict] = {}  # oid -> commit dict, insertion order = creation order
        self.lfs_oids: set[str] = set()  # LFS objects uploaded *to this repo* (the Hub scopes them per repo)
        self.prs = 0


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
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._faults: list[dict] = []
        self._lock = threading.RLock()
        self._secret = secrets.token_bytes(16)  # signs storage URLs, like S3 pre-signed URLs
        self._servers: list[ThreadingHTTPServer] = []
        self.url = self.storage_url = ""

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> HubServer:
        (self.root / "lfs").mkdir(parents=True, exist_ok=True)
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
        with self._lock:
            self._create(repo_type, repo_id, private)

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
        with self._lock:
            repo = self._repo(repo_type, repo_id, None, check=False)
            keys = ("oid", "parent", "ref", "message", "description", "date", "paths")
            return [{k: c[k] for k in keys} for c in repo.commits.values()]

    def files(self, repo_id: str, repo_type: str = "dataset", revision: str = "main") -> dict[str, bytes]:
        with self._lock:
            repo = self._repo(repo_type, repo_id, None, check=False)
            tree = dict(repo.commits[self._resolve(repo, revision)]["tree"])
        return {p: self._read(e) for p, e in sorted(tree.items())}

    # ---- state helpers (call with the lock held) --------------------------------------------------
    def _lfs_path(self, sha256: str) -> Path:
        return self.root / "lfs" / sha256[:2] / sha256

    def _read(self, entry: dict) -> bytes:
        return entry["data"] if entry["sha256"] is None else self._lfs_path(entry["sha256"]).read_bytes()

    def _sign(self, *parts) -> str:
        return hmac.new(self._secret, ":".join(map(str, parts)).encode(), "sha256").hexdigest()

    def _create(self, repo_type: str, repo_id: str, private: bool) -> _Repo:
        repo = self._repos[(repo_type, repo_id)] = _Repo(repo_type, repo_id, private)
        data = DEFAULT_GITATTRIBUTES.encode()
        tree = {".gitattributes": {"oid": git_blob_oid(data), "size": len(data), "sha256": None, "data": data}}
        self._commit(repo, "refs/heads/main", None, tree, "initial commit", "", [".gitattributes"])
        return repo

    def _commit(self, repo, ref, parent, tree, message, description, paths) -> str:
        dirs, date = _dir_oids(tree), _now()
        # A git commit object, abridged: the author line carries a per-repo sequence number instead of a
        # timestamp, so oids are deterministic yet two identical commits on two branches still differ.
        body = f"tree {dirs['']}\n" + (f"parent {parent}\n" if parent else "")
        body += f"author {USER} <{USER}@users.noreply.huggingface.co> {len(repo.commits)} +0000\n\n{message}\n"
        oid = hashlib.sha1(f"commit {len(body.encode())}\0{body}".encode()).hexdigest()
        repo.commits[oid] = dict(
            oid=oid,
            parent=parent,
            ref=ref,
            message=message,
            description=description,
            date=date,
            paths=sorted(paths),
            tree=tree,
            dirs=dirs,
        )
        repo.refs[ref] = oid
        return oid

    def _repo(self, repo_type, repo_id, role, check=True) -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None or (check and repo.private and role is None):  # private repos hide as 404
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _resolve(self, repo: _Repo, rev: str) -> str:
        for ref in (rev, f"refs/heads/{rev}", f"refs/tags/{rev}"):
            if ref.startswith("refs/") and ref in repo.refs:
                return repo.refs[ref]
        if rev in repo.commits:
            return rev
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def _last_commit(self, repo: _Repo, head: str, path: str) -> dict:
        oid = head
        while oid:
            c = repo.commits[oid]
            if not path or any(p == path or p.startswith(path + "/") for p in c["paths"]):
                return {"id": c["oid"], "title": c["message"], "date": c["date"]}
            oid = c["parent"]
        return {"id": head, "title": "", "date": repo.commits[head]["date"]}

    def _path_info(self, repo, head, path, expand) -> dict:
        c = repo.commits[head]
        entry = c["tree"].get(path)
        if entry is None:
            info = {"type": "directory", "oid": c["dirs"][path], "size": 0, "path": path}
        else:
            info = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
            if entry["sha256"]:
                pointer = lfs_pointer(entry["sha256"], entry["size"])
                info["lfs"] = {"oid": entry["sha256"], "size": entry["size"], "pointerSize": len(pointer)}
        if expand:
            info["lastCommit"] = self._last_commit(repo, head, path)
            if entry is not None:
                info["securityFileStatus"] = {
                    "status": "safe",
                    "avScan": {"virusFound": False, "virusNames": None},
                    "pickleImportScan": None,
                }
        return info

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

    def _role(self, req) -> str | None:
        auth = req.headers.get("Authorization", "")
        if not auth:
            return None
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else None
        role = self.tokens.get(token) if token else None
        if role is None:  # an unknown token is refused even for public reads, as on the Hub
            raise HubError(401, "Invalid credentials in Authorization header")
        return role

    @staticmethod
    def _need_write(role: str | None) -> None:
        if role is None:
            raise HubError(401, "You must be authenticated to perform this action (write access needed).")
        if role != "write":
            raise HubError(403, "You don't have the rights to perform this action: this token is read-only.")

    def _route(self, req, method: str, path: str, query: dict, body: bytes):
        routes = _STORAGE_ROUTES if req.server.is_storage else _ROUTES
        for methods, regex, name in routes:
            m = regex.fullmatch(path)
            if m and method in methods:
                args = {k: unquote(v) if v is not None else None for k, v in m.groupdict().items()}
                repo_type = TYPES.get(args.pop("t", None) or ("models" if "repo" in args else ""))
                if repo_type:
                    args["repo_type"] = repo_type
                return getattr(self, name)(req, method, query, body, **args)
        raise HubError(404, f"Not found: {method} {path}")

    def _base(self, repo: _Repo) -> str:
        return f"{self.url}/{PREFIX[repo.type]}{repo.id}"

    # ---- API endpoints: each returns (status, headers, body) --------------------------------------
    def whoami(self, req, method, query, body):
        role = self._role(req)
        if role is None:
            raise HubError(401, "Invalid username or password.")
        token = {"displayName": "test-token", "role": role, "createdAt": _now()}  # never the token itself
        auth = {"type": "access_token", "accessToken": token}
        return _json({"type": "user", "id": "0" * 24, "name": USER, "fullname": "Hub User", "orgs": [], "auth": auth})

    def validate_yaml(self, req, method, query, body):
        content = json.loads(body or b"{}").get("content", "")
        if content.startswith("---") and "\n---" not in content[3:]:
            return _json({"errors": [{"message": "Unterminated YAML front matter"}], "warnings": []}, 400)
        return _json({"errors": [], "warnings": []})

    def create_repo_api(self, req, method, query, body):
        self._need_write(self._role(req))
        payload = json.loads(body or b"{}")
        repo_type = payload.get("type") or "model"
        if repo_type not in PREFIX:
            raise HubError(400, f"Invalid repo type: {repo_type}")
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        private = payload.get("visibility", "private" if payload.get("private") else "public") != "public"
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                url = f"{self.url}/{PREFIX[repo_type]}{repo_id}"
                return _json({"error": f"You already created this {repo_type} repo", "url": url}, 409)
            repo = self._create(repo_type, repo_id, private)
        return _json({"url": self._base(repo), "name": repo_id, "id": secrets.token_hex(12)})

    def delete_repo_api(self, req, method, query, body):
        self._need_write(self._role(req))
        payload = json.loads(body or b"{}")
        key = (payload.get("type") or "model", f"{payload.get('organization') or USER}/{payload['name']}")
        with self._lock:
            if self._repos.pop(key, None) is None:
                raise HubError(404, "Repository not found", "RepoNotFound")
        return _json({})

    def repo_info(self, req, method, query, body, repo_type, repo, rev=None):
        role = self._role(req)
        with self._lock:
            r = self._repo(repo_type, repo, role)
            head = self._resolve(r, rev or "main")
            c = r.commits[head]
            siblings = []
            for path, e in sorted(c["tree"].items()):
                s = {"rfilename": path}
                if _truthy(query.get("blobs", [""])[0]):
                    s.update(size=e["size"], blobId=e["oid"])
                    if e["sha256"]:
                        s["lfs"] = {
                            "sha256": e["sha256"],
                            "size": e["size"],
                            "pointerSize": len(lfs_pointer(e["sha256"], e["size"])),
                        }
                siblings.append(s)
            info = {
                "_id": hashlib.sha1(repo.encode()).hexdigest()[:24],
                "id": repo,
                "author": repo.split("/")[0],
                "sha": head,
                "lastModified": c["date"],
                "createdAt": r.created,
                "private": r.private,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
                "usedStorage": sum(e["size"] for e in c["tree"].values()),
            }
        if repo_type == "model":
            info["modelId"] = repo
        expand = query.get("expand", []) + query.get("expand[]", [])
        if expand:  # only the requested properties, like the Hub
            info = {k: v for k, v in info.items() if k in expand or k in ("_id", "id")}
        return _json(info)

    def preupload(self, req, method, query, body, repo_type, repo, rev):
        role = self._role(req)
        self._need_write(role)
        payload = json.loads(body or b"{}")
        with self._lock:
            r = self._repo(repo_type, repo, role)
            head = self._resolve(r, rev)
            tree = r.commits[head]["tree"]
            # LFS routing follows the .gitattributes of the target revision, as on the Hub.
            attrs = tree.get(".gitattributes")
            lfs_rules = _rules(self._read(attrs).decode(errors="replace"), "filter=lfs") if attrs else []
            ignore = payload.get("gitIgnore")
            if ignore is None and ".gitignore" in tree:
                ignore = self._read(tree[".gitignore"]).decode(errors="replace")
            ignore_rules = _rules(ignore or "", None)
            files = []
            for f in payload.get("files", []):
                sample = base64.b64decode(f.get("sample", ""))
                lfs = f["size"] > REGULAR_MAX_SIZE or _match(lfs_rules, f["path"]) or _is_binary(sample)
                out = {
                    "path": f["path"],
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": _match(ignore_rules, f["path"], any_component=True),
                }
                if f["path"] in tree:  # what the client compares with its local oid to skip no-op uploads
                    e = tree[f["path"]]
                    out["oid"] = e["sha256"] or e["oid"]
                files.append(out)
        return _json({"files": files, "commitOid": head})

    def lfs_batch(self, req, method, query, body, repo_type, repo):
        role = self._role(req)
        payload = json.loads(body or b"{}")
        operation = payload.get("operation")
        if operation == "upload":
            self._need_write(role)
        objects = []
        with self._lock:
            r = self._repo(repo_type, repo, role)
            for obj in payload.get("objects", []):
                oid, size = obj.get("oid", ""), obj.get("size")
                out = {"oid": oid, "size": size}
                if not re.fullmatch(r"[0-9a-f]{64}", oid) or not isinstance(size, int) or size < 0:
                    out["error"] = {"code": 422, "message": "Invalid object oid or size"}
                elif operation == "download":
                    if oid not in r.lfs_oids:
                        out["error"] = {"code": 404, "message": "Object does not exist"}
                    else:
                        out["actions"] = {"download": {"href": self._download_href(oid)}}
                elif oid not in r.lfs_oids:  # present objects get no "actions": the client skips them
                    sig = self._sign("put", repo_type, repo, oid, size)
                    href = f"{self.storage_url}/lfs-storage/{oid}?" + _qs(t=repo_type, repo=repo, size=size, sig=sig)
                    verify = f"{self._base(r)}.git/info/lfs/objects/verify"
                    out["actions"] = {"upload": {"href": href}, "verify": {"href": verify}}
                if "error" not in out:
                    out["authenticated"] = True
                objects.append(out)
        return _json(
            {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
            headers={"Content-Type": "application/vnd.git-lfs+json"},
        )

    def lfs_verify(self, req, method, query, body, repo_type, repo):
        role = self._role(req)
        self._need_write(role)
        payload = json.loads(body or b"{}")
        with self._lock:
            r = self._repo(repo_type, repo, role)
            oid = payload.get("oid", "")
            if oid not in r.lfs_oids or self._lfs_path(oid).stat().st_size != payload.get("size"):
                raise HubError(404, f"LFS object {oid} not found or of another size")
        return _json({"message": "Verified"})

    def commit(self, req, method, query, body, repo_type, repo, rev):
        role = self._role(req)
        self._need_write(role)
        try:
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        except ValueError as e:
            raise HubError(400, f"Invalid NDJSON payload: {e}") from None
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first line of the payload must be the commit header")
        header = lines[0]["value"]
        with self._lock:
            r = self._repo(repo_type, repo, role)
            base = rev[len("refs/heads/") :] if rev.startswith("refs/heads/") else rev
            ref = base if base.startswith("refs/pr/") else f"refs/heads/{base}"
            create_pr = _truthy(query.get("create_pr", [""])[0])
            if create_pr:  # a new refs/pr/N, branched from the target revision
                head = self._resolve(r, base)
            elif ref not in r.refs:  # commits only go to existing branches (or PR refs)
                raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            else:
                head = r.refs[ref]
            if header.get("parentCommit") and header["parentCommit"] != head:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            tree, changed = dict(r.commits[head]["tree"]), set()
            for line in lines[1:]:
                key, v = line.get("key"), line.get("value", {})
                path = v.get("path", "").strip("/")
                if key == "file":
                    data = base64.b64decode(v["content"]) if v.get("encoding") == "base64" else v["content"].encode()
                    tree[path] = {"oid": git_blob_oid(data), "size": len(data), "sha256": None, "data": data}
                elif key == "lfsFile":
                    oid = v.get("oid", "")
                    if oid not in r.lfs_oids:  # the Hub refuses pointers to objects it never received
                        raise HubError(422, f"Your push was rejected: LFS object {oid} for {path} was never uploaded")
                    size = self._lfs_path(oid).stat().st_size
                    if v.get("size", size) != size:
                        raise HubError(422, f"LFS object {oid} for {path} has size {size}, not {v['size']}")
                    tree[path] = {
                        "oid": git_blob_oid(lfs_pointer(oid, size)),
                        "size": size,
                        "sha256": oid,
                        "data": None,
                    }
                elif key == "deletedFile":
                    if tree.pop(path, None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                elif key == "deletedFolder":
                    gone = [p for p in tree if p.startswith(path + "/")]
                    if not gone:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in gone:
                        del tree[p]
                    changed.update(gone)
                    continue
                else:
                    raise HubError(400, f"Unknown commit operation: {key}")
                changed.add(path)
            changed = {p for p in changed if tree.get(p) != r.commits[head]["tree"].get(p)}
            if create_pr:
                r.prs += 1
                ref = f"refs/pr/{r.prs}"
            oid = self._commit(r, ref, head, tree, header.get("summary", ""), header.get("description", ""), changed)
            out = {"success": True, "commitOid": oid, "commitUrl": f"{self._base(r)}/commit/{oid}", "hookOutput": ""}
            if create_pr:
                out["pullRequestUrl"] = f"{self._base(r)}/discussions/{ref.rsplit('/', 1)[1]}"
        return _json(out)

    def tree(self, req, method, query, body, repo_type, repo, rev, path=None):
        role = self._role(req)
        path = (path or "").strip("/")
        recursive = _truthy(query.get("recursive", [""])[0])
        expand = _truthy(query.get("expand", [""])[0])
        with self._lock:
            r = self._repo(repo_type, repo, role)
            head = self._resolve(r, rev)
            c = r.commits[head]
            if path and path not in c["dirs"]:
                raise HubError(404, f"{path} does not exist on {rev}", "EntryNotFound")
            prefix = path + "/" if path else ""
            names = [p for p in list(c["tree"]) + list(c["dirs"]) if p and p.startswith(prefix)]
            names = [p for p in names if recursive or "/" not in p[len(prefix) :]]
            # Folders first, then files, each sorted: the Hub's listing order.
            names.sort(key=lambda p: (p not in c["dirs"], p))
            out = [self._path_info(r, head, p, expand) for p in names]
        return _json(out)

    def paths_info(self, req, method, query, body, repo_type, repo, rev):
        role = self._role(req)
        if req.headers.get("Content-Type", "").startswith("application/json"):
            payload = json.loads(body or b"{}")
            paths, expand = payload.get("paths", []), _truthy(payload.get("expand", False))
        else:  # huggingface_hub posts a form: paths=a&paths=b&expand=false
            form = parse_qs(body.decode(), keep_blank_values=True)
            paths, expand = form.get("paths", []), _truthy(form.get("expand", [""])[0])
        with self._lock:
            r = self._repo(repo_type, repo, role)
            head = self._resolve(r, rev)
            c = r.commits[head]
            wanted = [p.strip("/") for p in paths]
            out = [self._path_info(r, head, p, expand) for p in wanted if p in c["tree"] or (p and p in c["dirs"])]
        return _json(out)

    def branch(self, req, method, query, body, repo_type, repo, branch):
        role = self._role(req)
        self._need_write(role)
        payload = json.loads(body or b"{}")
        with self._lock:
            r = self._repo(repo_type, repo, role)
            ref = f"refs/heads/{branch}"
            if method == "DELETE":
                if branch == "main" or ref not in r.refs:
                    raise HubError(403 if branch == "main" else 404, f"Cannot delete branch {branch}")
                del r.refs[ref]
                return _json({})
            if ref in r.refs:
                raise HubError(409, "Reference already exists")
            r.refs[ref] = self._resolve(r, payload.get("startingPoint") or "main")
        return _json({})

    def refs(self, req, method, query, body, repo_type, repo):
        role = self._role(req)
        with self._lock:
            r = self._repo(repo_type, repo, role)

            def refs_of(prefix):
                return [
                    {"name": ref[len(prefix) :] if prefix != "refs/pr/" else ref, "ref": ref, "targetCommit": oid}
                    for ref, oid in sorted(r.refs.items())
                    if ref.startswith(prefix)
                ]

            out = {
                "branches": refs_of("refs/heads/"),
                "converts": refs_of("refs/convert/"),
                "tags": refs_of("refs/tags/"),
            }
            if _truthy(query.get("include_prs", [""])[0]):
                out["pullRequests"] = refs_of("refs/pr/")
        return _json(out)

    def list_commits(self, req, method, query, body, repo_type, repo, rev):
        role = self._role(req)
        with self._lock:
            r = self._repo(repo_type, repo, role)
            oid, out = self._resolve(r, rev), []
            while oid:
                c = r.commits[oid]
                out.append(
                    {
                        "id": oid,
                        "title": c["message"],
                        "message": c["description"],
                        "date": c["date"],
                        "authors": [{"user": USER}],
                    }
                )
                oid = c["parent"]
        return _json(out)

    def resolve(self, req, method, query, body, repo_type, repo, rev, path):
        role = self._role(req)
        with self._lock:
            r = self._repo(repo_type, repo, role)
            head = self._resolve(r, rev)
            entry = r.commits[head]["tree"].get(path)
        headers = {"X-Repo-Commit": head, "Accept-Ranges": "bytes"}
        if entry is None:
            raise HubError(404, "Entry not found", "EntryNotFound", headers)
        if entry["sha256"]:
            # LFS: redirect to the object store (another origin) with a signed URL, carrying the real
            # size/etag in X-Linked-*, as the Hub does with its CDN.
            location = self._download_href(entry["sha256"])
            headers.update(
                {
                    "ETag": f'"{entry["oid"]}"',
                    "X-Linked-Etag": f'"{entry["sha256"]}"',
                    "X-Linked-Size": str(entry["size"]),
                    "Location": location,
                }
            )
            return 302, headers, f"Found. Redirecting to {location}".encode()
        headers["ETag"] = f'"{entry["oid"]}"'
        return _ranged(req, entry["data"], headers)

    # ---- object store (the other origin) ----------------------------------------------------------
    def _download_href(self, oid: str) -> str:
        return f"{self.storage_url}/lfs-storage/{oid}?" + _qs(sig=self._sign("get", oid))

    def storage_put(self, req, method, query, body, oid):
        q = {k: v[0] for k, v in query.items()}
        size = int(q.get("size", -1))
        if not hmac.compare_digest(q.get("sig", ""), self._sign("put", q.get("t"), q.get("repo"), oid, size)):
            return 403, {"Content-Type": "application/xml"}, b"<Error><Code>SignatureDoesNotMatch</Code></Error>"
        if len(body) != size or hashlib.sha256(body).hexdigest() != oid:
            return 400, {"Content-Type": "application/xml"}, b"<Error><Code>BadDigest</Code></Error>"
        dest = self._lfs_path(oid)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f"{oid}.{threading.get_ident()}.tmp")
        tmp.write_bytes(body)
        os.replace(tmp, dest)
        with self._lock:
            if (q["t"], q["repo"]) in self._repos:
                self._repos[(q["t"], q["repo"])].lfs_oids.add(oid)
            self.lfs_uploads.append(oid)
        return 200, {"ETag": f'"{hashlib.md5(body).hexdigest()}"'}, b""

    def storage_get(self, req, method, query, body, oid):
        if (
            not hmac.compare_digest(query.get("sig", [""])[0], self._sign("get", oid))
            or not self._lfs_path(oid).exists()
        ):
            return 403, {"Content-Type": "application/xml"}, b"<Error><Code>AccessDenied</Code></Error>"
        return _ranged(req, self._lfs_path(oid).read_bytes(), {"ETag": f'"{oid}"', "Accept-Ranges": "bytes"})


def _qs(**params) -> str:
    return "&".join(f"{k}={quote(str(v), safe='')}" for k, v in params.items())


def _json(obj, status: int = 200, headers: dict | None = None):
    return status, {"Content-Type": "application/json; charset=utf-8", **(headers or {})}, json.dumps(obj).encode()


def _ranged(req, data: bytes, headers: dict):
    """200 with the whole body, or 206 for a single 'bytes=a-b' / 'bytes=a-' / 'bytes=-n' Range."""
    headers = {"Content-Type": "application/octet-stream", **headers}
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", req.headers.get("Range", "") or "")
    if not m or not (m[1] or m[2]):
        return 200, headers, data
    size = len(data)
    start, end = (int(m[1]), int(m[2] or size - 1)) if m[1] else (max(size - int(m[2]), 0), size - 1)
    if start >= size or start > end:
        return 416, {**headers, "Content-Range": f"bytes */{size}"}, b""
    end = min(end, size - 1)
    return 206, {**headers, "Content-Range": f"bytes {start}-{end}/{size}"}, data[start : end + 1]


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
                status, headers, data = _json(
                    {"error": msg}, fault["status"], {"X-Error-Message": msg, **fault["headers"]}
                )
            else:
                status, headers, data = hub._route(self, method, path, parse_qs(split.query), body)
        except HubError as e:
            status, headers, data = _json({"error": e.message}, e.status, e.headers)
        except Exception:
            hub.errors.append(traceback.format_exc())
            status, headers, data = _json({"error": "Internal Error - We're working hard to fix this."}, 500)
        hub.log.append((method, path, status))
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(data)), "X-Request-Id": secrets.token_hex(8)}.items():
            self.send_header(key, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(data)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _handle
