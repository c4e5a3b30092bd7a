"""The fake Hub's endpoints (tests/hub_server.py): what each URL of the Hub itself answers.

One method per endpoint, each taking ``(req, method, query, body, **groups of its route)`` and returning
``(status, headers, body)``. They sit between the server (hub_server.py: listeners, HTTP handler, routing,
fault injection, the object store's signed URLs, test hooks), which only has to find the method, and the
storage (hub_store.py: repos, refs, commits, LFS objects), which knows nothing of HTTP: this module is the
translation between the two, plus what only a request has: its token, a repo's visibility, the JSON shapes.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from hub_store import USER, HubError, Repo, lfs_pointer, timestamp

if TYPE_CHECKING:  # only for hints: the server imports this module
    from hub_server import HubServer

PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}  # web/git URL prefix per repo type

Request = BaseHTTPRequestHandler
Query = dict[str, list[str]]
Response = tuple[int, dict[str, str], bytes]


def _truthy(value: object) -> bool:
    return str(value).lower() in ("1", "true", "yes")


def json_response(obj: object, status: int = 200, headers: dict | None = None) -> Response:
    return status, {"Content-Type": "application/json; charset=utf-8", **(headers or {})}, json.dumps(obj).encode()


def ranged_response(req: Request, data: bytes, headers: dict) -> Response:
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


class HubApi:
    """The endpoints of one :class:`~hub_server.HubServer`, whose tokens, URLs and records they use."""

    def __init__(self, hub: HubServer):
        self.hub = hub  # read at each request: its url and storage_url are only known once it started
        self.store = hub.store

    # ---- what every endpoint needs ---------------------------------------------------------------
    def _role(self, req: Request) -> str | None:
        auth = req.headers.get("Authorization", "")
        if not auth:
            return None
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else None
        role = self.hub.tokens.get(token) if token else None
        if role is None:  # an unknown token is refused even for public reads, as on the Hub
            raise HubError(401, "Invalid credentials in Authorization header")
        return role

    @staticmethod
    def _need_write(role: str | None) -> None:
        if role is None:
            raise HubError(401, "You must be authenticated to perform this action (write access needed).")
        if role != "write":
            raise HubError(403, "You don't have the rights to perform this action: this token is read-only.")

    def _repo(self, repo_type: str, repo_id: str, role: str | None) -> Repo:
        repo = self.store.get(repo_type, repo_id)
        if repo.private and role is None:  # private repos hide as 404
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _base(self, repo: Repo) -> str:
        return f"{self.hub.url}/{PREFIX[repo.type]}{repo.id}"

    def _path_info(self, repo: Repo, head: str, path: str, expand: bool) -> dict:
        info = self.store.path_info(repo, head, path, expand)
        if expand and info["type"] == "file":  # the Hub's scan verdict: nothing stored here is unsafe
            info["securityFileStatus"] = {
                "status": "safe",
                "avScan": {"virusFound": False, "virusNames": None},
                "pickleImportScan": None,
            }
        return info

    # ---- the Hub's API: each returns (status, headers, body) --------------------------------------
    def whoami(self, req: Request, method: str, query: Query, body: bytes) -> Response:
        role = self._role(req)
        if role is None:
            raise HubError(401, "Invalid username or password.")
        token = {"displayName": "test-token", "role": role, "createdAt": timestamp()}  # never the token itself
        auth = {"type": "access_token", "accessToken": token}
        return json_response(
            {"type": "user", "id": "0" * 24, "name": USER, "fullname": "Hub User", "orgs": [], "auth": auth}
        )

    def validate_yaml(self, req: Request, method: str, query: Query, body: bytes) -> Response:
        content = json.loads(body or b"{}").get("content", "")
        if content.startswith("---") and "\n---" not in content[3:]:
            return json_response({"errors": [{"message": "Unterminated YAML front matter"}], "warnings": []}, 400)
        return json_response({"errors": [], "warnings": []})

    def create_repo_api(self, req: Request, method: str, query: Query, body: bytes) -> Response:
        self._need_write(self._role(req))
        payload = json.loads(body or b"{}")
        repo_type = payload.get("type") or "model"
        if repo_type not in PREFIX:
            raise HubError(400, f"Invalid repo type: {repo_type}")
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        private = payload.get("visibility", "private" if payload.get("private") else "public") != "public"
        with self.store.lock:
            if self.store.exists(repo_type, repo_id):
                url = f"{self.hub.url}/{PREFIX[repo_type]}{repo_id}"
                return json_response({"error": f"You already created this {repo_type} repo", "url": url}, 409)
            repo = self.store.create(repo_type, repo_id, private)
        return json_response({"url": self._base(repo), "name": repo_id, "id": secrets.token_hex(12)})

    def delete_repo_api(self, req: Request, method: str, query: Query, body: bytes) -> Response:
        self._need_write(self._role(req))
        payload = json.loads(body or b"{}")
        repo_type, repo_id = payload.get("type") or "model", f"{payload.get('organization') or USER}/{payload['name']}"
        with self.store.lock:
            if not self.store.delete(repo_type, repo_id):
                raise HubError(404, "Repository not found", "RepoNotFound")
        return json_response({})

    def repo_info(
        self, req: Request, method: str, query: Query, body: bytes, repo_type: str, repo: str, rev: str | None = None
    ) -> Response:
        role = self._role(req)
        with self.store.lock:
            r = self._repo(repo_type, repo, role)
            head = self.store.resolve(r, rev or "main")
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
        return json_response(info)

    def preupload(
        self, req: Request, method: str, query: Query, body: bytes, repo_type: str, repo: str, rev: str
    ) -> Response:
        role = self._role(req)
        self._need_write(role)
        payload = json.loads(body or b"{}")
        with self.store.lock:
            r = self._repo(repo_type, repo, role)
            head = self.store.resolve(r, rev)
            tree, ignore = r.commits[head]["tree"], payload.get("gitIgnore")
            files = self.store.upload_modes(tree, payload.get("files", []), ignore)
        return json_response({"files": files, "commitOid": head})

    def lfs_batch(self, req: Request, method: str, query: Query, body: bytes, repo_type: str, repo: str) -> Response:
        role = self._role(req)
        payload = json.loads(body or b"{}")
        operation = payload.get("operation")
        if operation == "upload":
            self._need_write(role)
        objects = []
        with self.store.lock:
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
                        out["actions"] = {"download": {"href": self.hub.download_href(oid)}}
                elif oid not in r.lfs_oids:  # present objects get no "actions": the client skips them
                    href = self.hub.upload_href(repo_type, repo, oid, size)
                    verify = f"{self._base(r)}.git/info/lfs/objects/verify"
                    out["actions"] = {"upload": {"href": href}, "verify": {"href": verify}}
                if "error" not in out:
                    out["authenticated"] = True
                objects.append(out)
        return json_response(
            {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
            headers={"Content-Type": "application/vnd.git-lfs+json"},
        )

    def lfs_verify(self, req: Request, method: str, query: Query, body: bytes, repo_type: str, repo: str) -> Response:
        role = self._role(req)
        self._need_write(role)
        payload = json.loads(body or b"{}")
        with self.store.lock:
            r = self._repo(repo_type, repo, role)
            oid = payload.get("oid", "")
            if oid not in r.lfs_oids or self.store.lfs_path(oid).stat().st_size != payload.get("size"):
                raise HubError(404, f"LFS object {oid} not found or of another size")
        return json_response({"message": "Verified"})

    def commit(
        self, req: Request, method: str, query: Query, body: bytes, repo_type: str, repo: str, rev: str
    ) -> Response:
        role = self._role(req)
        self._need_write(role)
        try:
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        except ValueError as e:
            raise HubError(400, f"Invalid NDJSON payload: {e}") from None
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first line of the payload must be the commit header")
        header = lines[0]["value"]
        with self.store.lock:
            r = self._repo(repo_type, repo, role)
            base = rev[len("refs/heads/") :] if rev.startswith("refs/heads/") else rev
            ref = base if base.startswith("refs/pr/") else f"refs/heads/{base}"
            create_pr = _truthy(query.get("create_pr", [""])[0])
            if create_pr:  # a new refs/pr/N, branched from the target revision
                head = self.store.resolve(r, base)
            elif ref not in r.refs:  # commits only go to existing branches (or PR refs)
                raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            else:
                head = r.refs[ref]
            if header.get("parentCommit") and header["parentCommit"] != head:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            tree, changed = self.store.apply(r, r.commits[head]["tree"], lines[1:])
            if create_pr:
                r.prs += 1
                ref = f"refs/pr/{r.prs}"
            summary, description = header.get("summary", ""), header.get("description", "")
            oid = self.store.commit(r, ref, head, tree, summary, description, changed)
            out = {"success": True, "commitOid": oid, "commitUrl": f"{self._base(r)}/commit/{oid}", "hookOutput": ""}
            if create_pr:
                out["pullRequestUrl"] = f"{self._base(r)}/discussions/{ref.rsplit('/', 1)[1]}"
        return json_response(out)

    def tree(
        self,
        req: Request,
        method: str,
        query: Query,
        body: bytes,
        repo_type: str,
        repo: str,
        rev: str,
        path: str | None = None,
    ) -> Response:
        role = self._role(req)
        path = (path or "").strip("/")
        recursive = _truthy(query.get("recursive", [""])[0])
        expand = _truthy(query.get("expand", [""])[0])
        with self.store.lock:
            r = self._repo(repo_type, repo, role)
            head = self.store.resolve(r, rev)
            c = r.commits[head]
            if path and path not in c["dirs"]:
                raise HubError(404, f"{path} does not exist on {rev}", "EntryNotFound")
            out = [self._path_info(r, head, p, expand) for p in self.store.listing(r, head, path, recursive)]
        return json_response(out)

    def paths_info(
        self, req: Request, method: str, query: Query, body: bytes, repo_type: str, repo: str, rev: str
    ) -> Response:
        role = self._role(req)
        if req.headers.get("Content-Type", "").startswith("application/json"):
            payload = json.loads(body or b"{}")
            paths, expand = payload.get("paths", []), _truthy(payload.get("expand", False))
        else:  # huggingface_hub posts a form: paths=a&paths=b&expand=false
            form = parse_qs(body.decode(), keep_blank_values=True)
            paths, expand = form.get("paths", []), _truthy(form.get("expand", [""])[0])
        with self.store.lock:
            r = self._repo(repo_type, repo, role)
            head = self.store.resolve(r, rev)
            c = r.commits[head]
            wanted = [p.strip("/") for p in paths]
            out = [self._path_info(r, head, p, expand) for p in wanted if p in c["tree"] or (p and p in c["dirs"])]
        return json_response(out)

    def branch(
        self, req: Request, method: str, query: Query, body: bytes, repo_type: str, repo: str, branch: str
    ) -> Response:
        role = self._role(req)
        self._need_write(role)
        payload = json.loads(body or b"{}")
        with self.store.lock:
            r = self._repo(repo_type, repo, role)
            ref = f"refs/heads/{branch}"
            if method == "DELETE":
                if branch == "main" or ref not in r.refs:
                    raise HubError(403 if branch == "main" else 404, f"Cannot delete branch {branch}")
                del r.refs[ref]
                return json_response({})
            if ref in r.refs:
                raise HubError(409, "Reference already exists")
            r.refs[ref] = self.store.resolve(r, payload.get("startingPoint") or "main")
        return json_response({})

    def refs(self, req: Request, method: str, query: Query, body: bytes, repo_type: str, repo: str) -> Response:
        role = self._role(req)
        with self.store.lock:
            r = self._repo(repo_type, repo, role)

            def refs_of(prefix: str) -> list[dict]:
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
        return json_response(out)

    def list_commits(
        self, req: Request, method: str, query: Query, body: bytes, repo_type: str, repo: str, rev: str
    ) -> Response:
        role = self._role(req)
        with self.store.lock:
            r = self._repo(repo_type, repo, role)
            oid, out = self.store.resolve(r, rev), []
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
        return json_response(out)

    def resolve(
        self, req: Request, method: str, query: Query, body: bytes, repo_type: str, repo: str, rev: str, path: str
    ) -> Response:
        role = self._role(req)
        with self.store.lock:
            r = self._repo(repo_type, repo, role)
            head = self.store.resolve(r, rev)
            entry = r.commits[head]["tree"].get(path)
        headers = {"X-Repo-Commit": head, "Accept-Ranges": "bytes"}
        if entry is None:
            raise HubError(404, "Entry not found", "EntryNotFound", headers)
        if entry["sha256"]:
            # LFS: redirect to the object store (another origin) with a signed URL, carrying the real
            # size/etag in X-Linked-*, as the Hub does with its CDN.
            location = self.hub.download_href(entry["sha256"])
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
        return ranged_response(req, entry["data"], headers)
