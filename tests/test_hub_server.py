"""The fake Hub (tests/hub_server.py) against the *real* huggingface_hub client and datasets.

Every client runs in a subprocess whose environment points HF_ENDPOINT at the fake (huggingface_hub reads
it at import time) with Xet disabled, as the project's own `python -m pipeline push` tests do.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from hub_server import HubServer, git_blob_oid, lfs_pointer

WRITER, READER, BAD = "hf_writer_0123456789", "hf_reader_0123456789", "hf_not_a_valid_token_987654"
REPO = "mfpo-org/mfpo-test"
README = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: "data/train-*"
---
# MFPO test dataset
"""

# Shared by the client scripts below: argv[1] is the repo id, argv[2] (optional) a local folder to push.
PRELUDE = """
import json, os, sys
from huggingface_hub import HfApi, CommitOperationAdd, CommitOperationDelete, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError
api = HfApi()
REPO = sys.argv[1]
FOLDER = sys.argv[2] if len(sys.argv) > 2 else None
def ops():
    return [CommitOperationAdd(os.path.relpath(os.path.join(d, f), FOLDER).replace(os.sep, "/"), os.path.join(d, f))
            for d, _, files in os.walk(FOLDER) for f in files]
def status(fn):
    try:
        fn()
        return 200
    except HfHubHTTPError as e:
        return [e.response.status_code, type(e).__name__, str(e)]
"""

PUSH = """
url = api.create_repo(REPO, repo_type="dataset", exist_ok=True)
again = api.create_repo(REPO, repo_type="dataset", exist_ok=True)  # the 409 is handled by the client
info = api.create_commit(REPO, ops(), commit_message="push", repo_type="dataset")
listing = list(api.list_repo_tree(REPO, repo_type="dataset", recursive=True))
tree = {f.path: {"oid": f.blob_id, "size": f.size, "lfs": f.lfs and f.lfs["sha256"]}
        for f in listing if hasattr(f, "blob_id")}
paths = api.get_paths_info(REPO, ["README.md", "mfpo/preview.png", "data/train-00000-of-00002.parquet", "nope"],
                           repo_type="dataset")
cache = os.path.join(os.getcwd(), "download_cache")
dinfo = api.dataset_info(REPO, files_metadata=True)
# A second, identical push: the client compares the oids that preupload returns and commits nothing.
second = api.create_commit(REPO, ops(), commit_message="push again", repo_type="dataset")
print(json.dumps(dict(
    url=str(url), repo_id=url.repo_id, oid=info.oid, commit_url=info.commit_url, second=second.oid, sha=dinfo.sha,
    tree=tree, dirs=sorted(f.path for f in listing if not hasattr(f, "blob_id")),
    top=sorted(f.path for f in api.list_repo_tree(REPO, repo_type="dataset")),
    paths={f.path: {"oid": f.blob_id, "lfs": f.lfs and f.lfs["sha256"]} for f in paths},
    last=api.get_paths_info(REPO, "README.md", repo_type="dataset", expand=True)[0].last_commit.oid,
    downloads={p: open(hf_hub_download(REPO, p, repo_type="dataset", cache_dir=cache), "rb").read().hex()
               for p in tree},
    siblings={s.rfilename: s.blob_id for s in dinfo.siblings},
)))
"""

LOAD = """
import datasets
ds = datasets.load_dataset(REPO, split="train")
print(json.dumps([{"id": r["id"], "question": r["question"],
                   "image": [type(r["image"]).__module__, r["image"].size, r["image"].getpixel((0, 0))]} for r in ds]))
"""

UPLOAD_ONE = """
info = api.upload_file(path_or_fileobj=bytes.fromhex(sys.argv[2]), path_in_repo="x/a.png", repo_id=REPO,
                       repo_type="dataset")
print(json.dumps({"oid": info.oid}))
"""

INTERRUPTED = """
first = status(lambda: api.create_commit(REPO, ops(), commit_message="push", repo_type="dataset"))
info = api.create_commit(REPO, ops(), commit_message="push", repo_type="dataset")
print(json.dumps({"first": first, "oid": info.oid}))
"""

AUTH = """
print(json.dumps({
    "create": status(lambda: api.create_repo("mfpo-org/other", repo_type="dataset")),
    "upload": status(lambda: api.upload_file(path_or_fileobj=b"hi", path_in_repo="a.txt", repo_id=REPO,
                                             repo_type="dataset")),
    "whoami": status(lambda: api.whoami()),
    "public": status(lambda: api.dataset_info(REPO, token=False)),
    "private_anon": status(lambda: api.dataset_info("mfpo-org/secret", token=False)),
    "private_read": status(lambda: api.dataset_info("mfpo-org/secret")),
}))
"""

BRANCHES = """
main0 = api.dataset_info(REPO).sha
pr = api.create_commit(REPO, [CommitOperationAdd("pr.txt", b"from a PR")], commit_message="a PR",
                       repo_type="dataset", create_pr=True)
# A follow-up commit to the same PR, as a multi-part push does: pr_revision is "refs/pr/1".
follow = api.create_commit(REPO, [CommitOperationAdd("pr2.txt", b"more"), CommitOperationDelete("pr.txt")],
                           commit_message="PR part 2", repo_type="dataset", revision=pr.pr_revision)
api.create_branch(REPO, branch="dev", repo_type="dataset")
api.create_branch(REPO, branch="dev", repo_type="dataset", exist_ok=True)  # the 409 is handled by the client
dev = api.create_commit(REPO, [CommitOperationAdd("dev.bin", b"\\0dev")], commit_message="on dev",
                        repo_type="dataset", revision="dev")
refs = api.list_repo_refs(REPO, repo_type="dataset", include_pull_requests=True)
ls = lambda rev: sorted(api.list_repo_files(REPO, repo_type="dataset", revision=rev))
print(json.dumps({
    "main0": main0, "pr_url": pr.pr_url, "pr_num": pr.pr_num, "pr_revision": pr.pr_revision,
    "follow": follow.oid, "dev_oid": dev.oid, "dev_sha": api.dataset_info(REPO, revision="dev").sha,
    "branches": {b.name: b.target_commit for b in refs.branches},
    "prs": {p.ref: p.target_commit for p in refs.pull_requests},
    "files": {rev: ls(rev) for rev in ("main", "dev", "refs/pr/1")},
    "pr_file": open(hf_hub_download(REPO, "pr2.txt", repo_type="dataset", revision="refs/pr/1")).read(),
    "missing_branch": status(lambda: api.create_commit(REPO, [CommitOperationAdd("x", b"x")], commit_message="x",
                                                       repo_type="dataset", revision="nope")),
}))
"""


@pytest.fixture
def hub(tmp_path):
    with HubServer(tmp_path / "hub", tokens={WRITER: "write", READER: "read"}) as server:
        yield server
    assert not server.errors, server.errors[0]


def run_client(hub, tmp_path, code, *args, token=WRITER, home="hf_home") -> tuple[dict | list, str]:
    """Run a client script in a fresh interpreter wired to the fake Hub: (its last JSON line, its output)."""
    proc = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(code), REPO, *map(str, args)],
        env=hub.client_env(tmp_path / home, token=token),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, f"client failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stdout + proc.stderr


def png(color) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(buf, format="PNG")
    return buf.getvalue()


def make_folder(root: Path) -> dict[str, bytes]:
    """Two real parquet shards with an image column, a README with `configs`, and a PNG under mfpo/."""
    import datasets

    features = datasets.Features(
        {"id": datasets.Value("int64"), "question": datasets.Value("string"), "image": datasets.Image()}
    )
    (root / "data").mkdir(parents=True)
    for shard in range(2):
        images = [{"bytes": png((shard * 90, 40, 200)), "path": None}, {"bytes": png((10, 90, 60)), "path": None}]
        rows = {"id": [shard * 2, shard * 2 + 1], "question": [f"q{shard}a", f"q{shard}b"], "image": images}
        shard_path = root / f"data/train-0000{shard}-of-00002.parquet"
        datasets.Dataset.from_dict(rows, features=features).to_parquet(shard_path)
    (root / "README.md").write_text(README)
    (root / "mfpo").mkdir()
    (root / "mfpo" / "preview.png").write_bytes(png((255, 0, 0)))
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_push_then_load_dataset_list_and_download(hub, tmp_path):
    local = make_folder(tmp_path / "folder")
    sha = {p: hashlib.sha256(b).hexdigest() for p, b in local.items()}
    out, _ = run_client(hub, tmp_path, PUSH, tmp_path / "folder")
    assert out["url"] == f"{hub.url}/datasets/{REPO}" and out["repo_id"] == REPO
    assert out["commit_url"] == f"{hub.url}/datasets/{REPO}/commit/{out['oid']}"

    # Server state: the initial commit plus exactly one push, holding exactly the local bytes.
    commits = hub.commits(REPO)
    assert [c["message"] for c in commits] == ["initial commit", "push"]
    assert commits[-1]["oid"] == out["oid"] == out["second"] == out["sha"] == out["last"]
    assert commits[-1]["paths"] == sorted(local)
    files = hub.files(REPO)
    assert files.pop(".gitattributes").startswith(b"*.7z filter=lfs")
    assert files == local

    # Tree, paths-info and siblings: LFS files carry their sha256 and the git oid of their pointer.
    for path, data in local.items():
        entry = out["tree"][path]
        assert entry["size"] == len(data) and out["siblings"][path] == entry["oid"]
        if path.endswith((".parquet", ".png")):
            assert entry["lfs"] == sha[path] and entry["oid"] == git_blob_oid(lfs_pointer(sha[path], len(data)))
        else:
            assert entry["lfs"] is None and entry["oid"] == git_blob_oid(data)
        assert bytes.fromhex(out["downloads"][path]) == data
    assert sorted(out["paths"]) == ["README.md", "data/train-00000-of-00002.parquet", "mfpo/preview.png"]
    assert out["paths"]["README.md"] == {"oid": git_blob_oid(local["README.md"]), "lfs": None}
    assert out["paths"]["mfpo/preview.png"]["lfs"] == sha["mfpo/preview.png"]
    assert out["dirs"] == ["data", "mfpo"] and out["top"] == [".gitattributes", "README.md", "data", "mfpo"]

    # The identical second push uploaded nothing and never reached the commit endpoint.
    assert sorted(hub.lfs_uploads) == sorted(sha[p] for p in local if p != "README.md")
    assert [e for e in hub.log if "/commit/" in e[1]] == [("POST", f"/api/datasets/{REPO}/commit/main", 200)]

    # A consumer (empty cache, no token) loads it with `datasets`: README configs, both shards, PIL images.
    pushed = len(hub.log)
    rows, _ = run_client(hub, tmp_path, LOAD, token=None, home="consumer_home")
    assert [(r["id"], r["question"]) for r in rows] == [(0, "q0a"), (1, "q0b"), (2, "q1a"), (3, "q1b")]
    assert rows[2]["image"] == ["PIL.PngImagePlugin", [8, 6], [90, 40, 200]]
    consumer = hub.log[pushed:]
    assert ("GET", f"/datasets/{REPO}/resolve/main/README.md", 200) in consumer
    fetched = {p.rsplit("/", 1)[1] for _, p, s in consumer if p.startswith("/lfs-storage/") and s in (200, 206)}
    assert fetched == {sha[p] for p in local if p.endswith(".parquet")}


def test_lfs_put_500_and_preupload_429_are_retried(hub, tmp_path):
    hub.create_repo(REPO)
    hub.inject("PUT", r"^/lfs-storage/", 500)
    hub.inject("POST", r"/preupload/", 429)  # with Retry-After: 0
    data = b"\x89PNG fake image bytes" * 100
    out, _ = run_client(hub, tmp_path, UPLOAD_ONE, data.hex())
    assert [s for m, _, s in hub.log if m == "PUT"] == [500, 200]
    assert [s for _, p, s in hub.log if "/preupload/" in p] == [429, 200]
    assert hub.lfs_uploads == [hashlib.sha256(data).hexdigest()]
    assert hub.files(REPO)["x/a.png"] == data and hub.commits(REPO)[-1]["oid"] == out["oid"]


def test_interrupted_commit_resumes_without_reuploading(hub, tmp_path):
    local = make_folder(tmp_path / "folder")
    hub.create_repo(REPO)
    hub.inject("POST", r"/commit/main$", 503)  # the commit call itself is not retried by the client
    out, _ = run_client(hub, tmp_path, INTERRUPTED, tmp_path / "folder")
    assert out["first"][0] == 503
    lfs = sorted(hashlib.sha256(b).hexdigest() for p, b in local.items() if p != "README.md")
    assert sorted(hub.lfs_uploads) == lfs  # each object PUT exactly once, over both attempts
    assert [s for _, p, s in hub.log if p.endswith("/info/lfs/objects/batch")] == [200, 200]
    assert [c["message"] for c in hub.commits(REPO)] == ["initial commit", "push"]
    assert hub.commits(REPO)[-1]["oid"] == out["oid"] and hub.files(REPO)["README.md"] == local["README.md"]


def test_bad_token_read_token_and_private_repo(hub, tmp_path, capfd):
    hub.create_repo(REPO)
    hub.create_repo("mfpo-org/secret", private=True)
    bad, bad_output = run_client(hub, tmp_path, AUTH, token=BAD)
    read, _ = run_client(hub, tmp_path, AUTH, token=READER)
    assert bad["create"][:2] == [401, "HfHubHTTPError"] and bad["upload"][0] == 401 and bad["whoami"][0] == 401
    assert "Invalid credentials in Authorization header" in bad["create"][2]
    assert read["create"][0] == 403 and read["upload"][0] == 403 and read["whoami"] == 200
    for result in (bad, read):
        assert result["public"] == 200
        assert result["private_anon"][:2] == [404, "RepositoryNotFoundError"]
    assert read["private_read"] == 200
    assert [c["message"] for c in hub.commits(REPO)] == ["initial commit"]
    assert BAD not in bad_output and BAD not in repr(hub.log) and BAD not in "".join(capfd.readouterr())


def test_create_pr_and_commit_to_new_branch(hub, tmp_path):
    hub.create_repo(REPO)
    out, _ = run_client(hub, tmp_path, BRANCHES)
    assert out["pr_url"] == f"{hub.url}/datasets/{REPO}/discussions/1" and out["pr_num"] == 1
    assert out["pr_revision"] == "refs/pr/1" and out["prs"] == {"refs/pr/1": out["follow"]}
    assert out["branches"] == {"main": out["main0"], "dev": out["dev_oid"]} and out["dev_sha"] == out["dev_oid"]
    assert out["files"] == {
        "main": [".gitattributes"],
        "dev": [".gitattributes", "dev.bin"],
        "refs/pr/1": [".gitattributes", "pr2.txt"],
    }
    assert out["pr_file"] == "more" and out["missing_branch"][:2] == [404, "RevisionNotFoundError"]
    commits = {c["message"]: c for c in hub.commits(REPO)}
    assert commits["a PR"]["ref"] == commits["PR part 2"]["ref"] == "refs/pr/1"
    assert commits["PR part 2"]["parent"] == commits["a PR"]["oid"]
    assert commits["PR part 2"]["paths"] == ["pr.txt", "pr2.txt"]
    assert commits["on dev"]["ref"] == "refs/heads/dev"
    assert commits["on dev"]["parent"] == out["main0"] == commits["a PR"]["parent"]
    assert hub.files(REPO, revision="dev")["dev.bin"] == b"\0dev"
    assert hub.lfs_uploads == [hashlib.sha256(b"\0dev").hexdigest()]  # a binary sample goes to LFS


def test_raw_http_shapes(hub):
    """What the client relies on without saying so: keep-alive with Content-Length, HEAD, ranges, errors."""
    hub.create_repo(REPO)
    url = urlsplit(hub.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)  # one connection for every call

    def call(method, path, headers=None, body=None):
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()

    commit = hub.commits(REPO)[0]["oid"]
    status, headers, body = call("GET", f"/datasets/{REPO}/resolve/main/.gitattributes")
    assert status == 200 and headers["X-Repo-Commit"] == commit and int(headers["Content-Length"]) == len(body)
    assert headers["ETag"] == f'"{git_blob_oid(body)}"'
    status, headers, part = call("GET", f"/datasets/{REPO}/resolve/{commit}/.gitattributes", {"Range": "bytes=2-5"})
    assert status == 206 and part == body[2:6] and headers["Content-Range"] == f"bytes 2-5/{len(body)}"
    status, headers, empty = call("HEAD", f"/datasets/{REPO}/resolve/main/.gitattributes")
    assert status == 200 and empty == b"" and int(headers["Content-Length"]) == len(body)
    status, headers, _ = call("HEAD", f"/datasets/{REPO}/resolve/main/missing.txt")
    assert status == 404 and headers["X-Error-Code"] == "EntryNotFound" and headers["X-Repo-Commit"] == commit
    status, headers, _ = call("GET", f"/api/datasets/{REPO}/revision/nope")
    assert status == 404 and headers["X-Error-Code"] == "RevisionNotFound"
    status, headers, body = call("GET", "/api/datasets/mfpo-org/absent")
    assert status == 404 and headers["X-Error-Code"] == "RepoNotFound" and json.loads(body)["error"]
    status, _, body = call("POST", "/api/repos/create", {"Content-Type": "application/json"}, b'{"name": "x"}')
    assert status == 401 and json.loads(body)["error"]  # no token at all
    status, _, body = call("GET", "/no/such/route")
    assert status == 404 and json.loads(body)["error"]
    hub.inject("GET", r"/tree/", "close")
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        call("GET", f"/api/datasets/{REPO}/tree/main")
    assert hub.log[-1] == ("GET", f"/api/datasets/{REPO}/tree/main", 0)
    conn.close()
