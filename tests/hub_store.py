"""Repository storage of the fake Hub (tests/hub_server.py): repos, refs, commits, trees and LFS objects,
and git's rules over them: what a .gitattributes sends to LFS, what a .gitignore leaves out.

This is the git side of the fake, kept apart from the HTTP side (hub_server.py: listeners, handler, routing;
hub_api.py: what each endpoint answers) so that either can be read and changed without the other: nothing
here parses a request, checks a token or builds a URL. Failures are still raised as :class:`HubError`, the
Hub's own answer, so that a missing repo, revision or file reads the same whichever endpoint asked.

Repo state (refs, commits, full trees, small files) lives in memory behind one lock; LFS objects are files
under ``root/lfs``. Every commit stores the whole tree ``{path: entry}``; oids are real git oids (blob, tree
and LFS pointer), so ``blob_id``/``tree_id`` compare like the Hub's. An entry is ``{"oid", "size", "sha256",
"data"}``: a plain git blob has ``sha256`` None and its bytes in ``data``; an LFS file the reverse.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import os
import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

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
USER = "hub-user"  # the single account every valid token belongs to; the author of every commit

Entry = dict  # one file of a tree: {"oid", "size", "sha256", "data"}
Tree = dict[str, Entry]


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def timestamp() -> str:
    """Now, the way the Hub writes dates: ISO 8601, UTC, milliseconds."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


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


def _dir_oids(tree: Tree) -> dict[str, str]:
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


class Repo:
    def __init__(self, repo_type: str, repo_id: str, private: bool):
        self.type, self.id, self.private = repo_type, repo_id, private
        self.created = timestamp()
        self.refs: dict[str, str] = {}  # "refs/heads/main" / "refs/pr/1" -> commit oid
        self.commits: dict[str, dict] = {}  # oid -> commit dict, insertion order = creation order
        self.lfs_oids: set[str] = set()  # LFS objects uploaded *to this repo* (the Hub scopes them per repo)
        self.prs = 0


class RepoStore:
    """Every repo of the fake Hub, and the LFS objects on disk.

    Methods that read or change repo state expect :attr:`lock` held: an endpoint takes it once around all
    it does, so that what it checks still holds when it writes. The test-hook snapshots take it themselves.
    """

    def __init__(self, root: Path):
        self.lfs_root = Path(root) / "lfs"
        self.lock = threading.RLock()
        self._repos: dict[tuple[str, str], Repo] = {}

    def makedirs(self) -> None:
        self.lfs_root.mkdir(parents=True, exist_ok=True)

    # ---- repos -----------------------------------------------------------------------------------
    def create(self, repo_type: str, repo_id: str, private: bool) -> Repo:
        """A new repo with the Hub's initial commit (its .gitattributes) on main."""
        repo = self._repos[(repo_type, repo_id)] = Repo(repo_type, repo_id, private)
        data = DEFAULT_GITATTRIBUTES.encode()
        tree = {".gitattributes": {"oid": git_blob_oid(data), "size": len(data), "sha256": None, "data": data}}
        self.commit(repo, "refs/heads/main", None, tree, "initial commit", "", [".gitattributes"])
        return repo

    def exists(self, repo_type: str, repo_id: str) -> bool:
        return (repo_type, repo_id) in self._repos

    def delete(self, repo_type: str, repo_id: str) -> bool:
        """Forget the repo; False if there was none."""
        return self._repos.pop((repo_type, repo_id), None) is not None

    def get(self, repo_type: str, repo_id: str) -> Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    # ---- commits and refs ------------------------------------------------------------------------
    def commit(
        self, repo: Repo, ref: str, parent: str | None, tree: Tree, message: str, description: str, paths: Iterable[str]
    ) -> str:
        """Record a commit of the whole `tree` on top of `parent` and point `ref` at it; its oid."""
        dirs, date = _dir_oids(tree), timestamp()
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

    def resolve(self, repo: Repo, rev: str) -> str:
        """The commit oid a branch, tag, full ref or commit oid names."""
        for ref in (rev, f"refs/heads/{rev}", f"refs/tags/{rev}"):
            if ref.startswith("refs/") and ref in repo.refs:
                return repo.refs[ref]
        if rev in repo.commits:
            return rev
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def apply(self, repo: Repo, base: Tree, operations: list[dict]) -> tuple[Tree, set[str]]:
        """`base` with the commit payload's operations (its NDJSON lines after the header) applied, and
        the paths whose entry they really changed. `base` itself is left as it is."""
        tree, changed = dict(base), set()
        for line in operations:
            key, v = line.get("key"), line.get("value", {})
            path = v.get("path", "").strip("/")
            if key == "file":
                data = base64.b64decode(v["content"]) if v.get("encoding") == "base64" else v["content"].encode()
                tree[path] = {"oid": git_blob_oid(data), "size": len(data), "sha256": None, "data": data}
            elif key == "lfsFile":
                oid = v.get("oid", "")
                if oid not in repo.lfs_oids:  # the Hub refuses pointers to objects it never received
                    raise HubError(422, f"Your push was rejected: LFS object {oid} for {path} was never uploaded")
                size = self.lfs_path(oid).stat().st_size
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
        # A file written back with the same content, say, is no change: it is left out of the commit's paths.
        return tree, {p for p in changed if tree.get(p) != base.get(p)}

    # ---- reading a revision ----------------------------------------------------------------------
    def last_commit(self, repo: Repo, head: str, path: str) -> dict:
        """The newest commit from `head` back that touched `path` (a file, or anything under a folder)."""
        oid = head
        while oid:
            c = repo.commits[oid]
            if not path or any(p == path or p.startswith(path + "/") for p in c["paths"]):
                return {"id": c["oid"], "title": c["message"], "date": c["date"]}
            oid = c["parent"]
        return {"id": head, "title": "", "date": repo.commits[head]["date"]}

    def path_info(self, repo: Repo, head: str, path: str, expand: bool) -> dict:
        """A file or folder of the revision as the Hub lists it: type, oid, size, its LFS object if any,
        and with `expand` the last commit that touched it."""
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
            info["lastCommit"] = self.last_commit(repo, head, path)
        return info

    def listing(self, repo: Repo, head: str, folder: str, recursive: bool) -> list[str]:
        """The paths in `folder` ('' = the root) of the revision, and with `recursive` all below it."""
        c = repo.commits[head]
        prefix = folder + "/" if folder else ""
        names = [p for p in list(c["tree"]) + list(c["dirs"]) if p and p.startswith(prefix)]
        names = [p for p in names if recursive or "/" not in p[len(prefix) :]]
        # Folders first, then files, each sorted: the Hub's listing order.
        names.sort(key=lambda p: (p not in c["dirs"], p))
        return names

    def upload_modes(self, tree: Tree, files: list[dict], git_ignore: str | None) -> list[dict]:
        """How the Hub would take each of `files` ({"path", "size", "sample"}) into `tree`: as an LFS object
        or a plain blob, whether it is ignored (by `git_ignore` if given, else the tree's .gitignore),
        and the oid it already has there."""
        # LFS routing follows the .gitattributes of the target revision, as on the Hub.
        attrs = tree.get(".gitattributes")
        lfs_rules = _rules(self.read(attrs).decode(errors="replace"), "filter=lfs") if attrs else []
        if git_ignore is None and ".gitignore" in tree:
            git_ignore = self.read(tree[".gitignore"]).decode(errors="replace")
        ignore_rules = _rules(git_ignore or "", None)
        out = []
        for f in files:
            sample = base64.b64decode(f.get("sample", ""))
            lfs = f["size"] > REGULAR_MAX_SIZE or _match(lfs_rules, f["path"]) or _is_binary(sample)
            mode = {
                "path": f["path"],
                "uploadMode": "lfs" if lfs else "regular",
                "shouldIgnore": _match(ignore_rules, f["path"], any_component=True),
            }
            if f["path"] in tree:  # what the client compares with its local oid to skip no-op uploads
                e = tree[f["path"]]
                mode["oid"] = e["sha256"] or e["oid"]
            out.append(mode)
        return out

    # ---- files and LFS objects -------------------------------------------------------------------
    def lfs_path(self, sha256: str) -> Path:
        return self.lfs_root / sha256[:2] / sha256

    def read(self, entry: Entry) -> bytes:
        return entry["data"] if entry["sha256"] is None else self.lfs_path(entry["sha256"]).read_bytes()

    def write_lfs(self, oid: str, data: bytes) -> None:
        """Store an LFS object (no lock needed): written aside and renamed, so a reader never sees half."""
        dest = self.lfs_path(oid)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f"{oid}.{threading.get_ident()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, dest)

    def attach_lfs(self, repo_type: str, repo_id: str, oid: str) -> None:
        """Make a stored LFS object usable by the repo's commits (if the repo still exists)."""
        if (repo_type, repo_id) in self._repos:
            self._repos[(repo_type, repo_id)].lfs_oids.add(oid)

    # ---- test hooks ------------------------------------------------------------------------------
    def commits(self, repo_type: str, repo_id: str) -> list[dict]:
        """All commits of the repo (every branch/PR), oldest first, without their trees."""
        with self.lock:
            repo = self.get(repo_type, repo_id)
            keys = ("oid", "parent", "ref", "message", "description", "date", "paths")
            return [{k: c[k] for k in keys} for c in repo.commits.values()]

    def files(self, repo_type: str, repo_id: str, revision: str) -> dict[str, bytes]:
        """Every file of the revision, sorted by path, with its content."""
        with self.lock:
            repo = self.get(repo_type, repo_id)
            tree = dict(repo.commits[self.resolve(repo, revision)]["tree"])
        return {p: self.read(e) for p, e in sorted(tree.items())}
