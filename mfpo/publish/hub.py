"""`python -m pipeline push`: the finished dataset to a Hugging Face Hub dataset repo.

What goes up is the dataset folder in the Hub's layout: `data/<split>-XXXXX-of-YYYYY.parquet` from disk,
and the card with its files (`README.md`, `mfpo/pipeline.yaml`, `mfpo/summary.json`, `mfpo/sheet.png`,
`mfpo/plots/*.png`), rebuilt for this repo id. Everything goes through `huggingface_hub`'s commit API
(Xet or LFS storage, as the client and the Hub agree).

Only what differs from the remote branch is sent: each local file is compared with the remote tree
(sha256 for LFS files, the git blob id for the others), files the dataset no longer has under `data/` and
`mfpo/` are deleted, and an unchanged dataset makes no commit. An upload that fits `max_files_per_commit`
and `max_commit_bytes` is one commit; a larger one is several, data first and the card last, so an
interrupted push resumes from what the Hub already holds. Within a commit, LFS files are uploaded one by
one before the commit (the Hub keeps uploaded objects, so a re-run does not send them again).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from mfpo.publish import dataset as ds
from pipeline.errors import PipelineError

log = logging.getLogger("mfpo")
# Folders of the repo this tool owns: remote files there that the dataset no longer has are deleted.
MANAGED = ("data/", "mfpo/")
_TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}


class PushRefused(PipelineError):
    """The dataset is not ready to publish (exit 2): a stage is not done or the contract check fails."""


@dataclass
class LocalFile:
    path: str  # path in the repo
    size: int
    source: Path | bytes
    sha256: str = ""

    def __post_init__(self) -> None:
        if not self.sha256:
            self.sha256 = _sha256(self.source)

    def git_oid(self) -> str:
        """The git blob id, for comparing with a remote file stored without LFS."""
        h = hashlib.sha1(f"blob {self.size}\0".encode())
        for chunk in _chunks(self.source):
            h.update(chunk)
        return h.hexdigest()


@dataclass
class PushPlan:
    upload: list[tuple[LocalFile, str]] = field(default_factory=list)  # (file, "new" | "changed")
    unchanged: list[LocalFile] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    head: str | None = None  # the remote branch's commit, when it exists
    remote_note: str = ""  # why the remote could not be compared (dry run without access)

    @property
    def upload_bytes(self) -> int:
        return sum(f.size for f, _ in self.upload)


@dataclass
class PushResult:
    repo_id: str
    url: str
    load_line: str
    plan: PushPlan
    commits: list[str] = field(default_factory=list)  # commit urls
    pr_url: str | None = None
    dry_run: bool = False


def _chunks(source: Path | bytes) -> Iterator[bytes]:
    if isinstance(source, bytes):
        yield source
        return
    with open(source, "rb") as fh:
        yield from iter(lambda: fh.read(1 << 20), b"")


def _sha256(source: Path | bytes) -> str:
    h = hashlib.sha256()
    for chunk in _chunks(source):
        h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ readiness
def check_ready(config: Any, statuses: list[Any], settings: Any, allow_stale: bool) -> None:
    """Refuse (PushRefused) a dataset that is not done for this config or fails the contract check."""
    from mfpo.publish.contract import check_dataset
    from pipeline.runner import not_ready

    if "write" not in config.stages:
        raise PushRefused("nothing to push: this config has no `write` stage")
    why = not_ready(statuses)
    if why is not None and not allow_stale:
        raise PushRefused(f"{why}; or pass --allow-stale to push what is on disk")
    if allow_stale:
        return
    dataset_dir = Path(config.output_dir) / "dataset"
    report = check_dataset(dataset_dir, pixel_rows=settings.check_rows, seed=config.run.seed)
    if not report.ok:
        count = len(report.problems) + report.more_problems
        raise PushRefused(
            f"the dataset fails its contract check ({count} problem(s); first: {report.problems[0]}); "
            "redo the stage that made it, or pass --allow-stale"
        )


# ------------------------------------------------------------------------------------------ local files
def local_files(config: Any, statuses: list[Any], repo_id: str, revision: str | None) -> list[LocalFile]:
    """Every file of the repo, in upload order: data shards, pictures, config and summary, card last."""
    from mfpo.publish.card import dataset_files

    dataset_dir = Path(config.output_dir) / "dataset"
    shards = sorted((dataset_dir / "data").glob("*.parquet"))
    if not shards:
        raise PushRefused(f"no dataset shards under {dataset_dir / 'data'}: run the pipeline first")
    files = [LocalFile(f"data/{p.name}", p.stat().st_size, p) for p in shards]
    extras = dataset_files(config.output_dir, config, [asdict(s) for s in statuses], repo_id=repo_id, revision=revision)
    order = sorted(extras, key=lambda p: (p == "README.md", not p.endswith(".png"), p))
    files += [LocalFile(p, len(extras[p]), extras[p]) for p in order]
    return files


# ------------------------------------------------------------------------------------------ the Hub
def resolve_token(settings: Any) -> str | None:
    """The token named by `push.token_env`, else None (huggingface_hub's own order: HF_TOKEN, then the login)."""
    if settings.token_env is None:
        return None
    token = os.environ.get(settings.token_env)
    if not token:
        raise PipelineError(f"push.token_env names {settings.token_env}, which is not set in the environment")
    return token


def _status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def _causes(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def is_transient(err: BaseException) -> bool:
    """Connection errors, timeouts, 429 and 5xx: worth another try."""
    import httpx2

    for e in _causes(err):
        if isinstance(e, httpx2.TransportError | ConnectionError | TimeoutError):
            return True
        if _status(e) in _TRANSIENT_STATUS:
            return True
    return False


def _auth_error(err: BaseException) -> int | None:
    for e in _causes(err):
        if _status(e) in (401, 403):
            return _status(e)
    return None


def _retrying(settings: Any, what: str) -> Any:
    from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

    def note(state: Any) -> None:
        err = state.outcome.exception()
        log.warning(
            "push: %s failed (%s); retry %d of %d", what, _one_line(err), state.attempt_number, settings.retries
        )

    return Retrying(
        retry=retry_if_exception(is_transient),
        stop=stop_after_attempt(settings.retries + 1),
        wait=wait_exponential(multiplier=settings.retry_wait, max=60),
        before_sleep=note,
        reraise=True,
    )


def _call(settings: Any, what: str, fn: Callable[[], Any]) -> Any:
    for attempt in _retrying(settings, what):
        with attempt:
            return fn()
    raise AssertionError("unreachable")


def _one_line(err: BaseException) -> str:
    """`HTTP 503: <the server's message>` for Hub errors, the first line of the message otherwise."""
    for e in _causes(err):
        status = _status(e)
        if status is not None:
            message = " ".join((getattr(e, "server_message", None) or "").split())
            return f"HTTP {status}" + (f": {message[:200]}" if message else "")
    text = " ".join(str(err).split())
    return text[:300] or type(err).__name__


def remote_tree(api: Any, repo_id: str, revision: str) -> tuple[dict[str, Any], str | None]:
    """path -> RepoFile of the remote branch, and its head commit; empty when the repo or branch is new."""
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = api.repo_info(repo_id, repo_type="dataset", revision=revision)
    except (RepositoryNotFoundError, RevisionNotFoundError):
        return {}, None
    tree = api.list_repo_tree(repo_id, repo_type="dataset", revision=info.sha, recursive=True)
    return {e.path: e for e in tree if hasattr(e, "blob_id")}, info.sha


def plan_push(files: list[LocalFile], remote: dict[str, Any], head: str | None) -> PushPlan:
    plan = PushPlan(head=head)
    for f in files:
        entry = remote.get(f.path)
        if entry is None:
            plan.upload.append((f, "new"))
        elif (entry.lfs.sha256 == f.sha256) if entry.lfs is not None else (entry.blob_id == f.git_oid()):
            plan.unchanged.append(f)
        else:
            plan.upload.append((f, "changed"))
    local = {f.path for f in files}
    plan.delete = sorted(p for p in remote if p.startswith(MANAGED) and p not in local)
    return plan


def batches(plan: PushPlan, max_files: int, max_bytes: int) -> list[list[LocalFile]]:
    """Consecutive groups of files within both limits (a single file larger than max_bytes goes alone)."""
    out: list[list[LocalFile]] = [[]]
    size = 0
    for f, _ in plan.upload:
        if out[-1] and (len(out[-1]) >= max_files or size + f.size > max_bytes):
            out.append([])
            size = 0
        out[-1].append(f)
        size += f.size
    return out if out[-1] or plan.delete else []


def push(
    config: Any,
    statuses: list[Any],
    settings: Any,
    *,
    dry_run: bool = False,
    allow_stale: bool = False,
    echo: Callable[[str], None] = print,
) -> PushResult:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants

    if not settings.repo_id:
        raise PipelineError("push needs a repo id: pass --repo-id ORG/NAME or set push.repo_id")
    repo_id = settings.repo_id
    check_ready(config, statuses, settings, allow_stale)
    token = resolve_token(settings)
    api = HfApi(token=token)
    branch = settings.revision or constants.DEFAULT_REVISION
    files = local_files(config, statuses, repo_id, settings.revision)
    url = f"{api.endpoint}/datasets/{repo_id}" + (f"/tree/{branch}" if settings.revision else "")
    split = next(iter(ds.splits(Path(config.output_dir) / "dataset")))
    load_line = f'load_dataset("{repo_id}", split="{split}"' + (
        f', revision="{settings.revision}")' if settings.revision else ")"
    )
    result = PushResult(repo_id, url, load_line, PushPlan(), dry_run=dry_run)

    if dry_run:
        try:
            remote, head = remote_tree(api, repo_id, branch)
            result.plan = plan_push(files, remote, head)
        except Exception as err:  # a dry run lists everything when the remote cannot be read
            result.plan = plan_push(files, {}, None)
            result.plan.remote_note = f"remote not compared ({_one_line(err)})"
        return result

    try:
        _call(
            settings,
            "create repo",
            lambda: api.create_repo(repo_id, repo_type="dataset", private=settings.private, exist_ok=True),
        )
        if settings.revision and not settings.create_pr:
            _call(
                settings,
                "create branch",
                lambda: api.create_branch(repo_id, branch=branch, repo_type="dataset", exist_ok=True),
            )
        remote, head = _call(settings, "list remote files", lambda: remote_tree(api, repo_id, branch))
    except Exception as err:
        raise _failure(err, repo_id, "nothing uploaded") from err
    plan = result.plan = plan_push(files, remote, head)
    groups = batches(plan, settings.max_files_per_commit, settings.max_commit_bytes)
    if not groups:
        echo(
            f"{repo_id}@{branch} already holds this dataset ({len(plan.unchanged)} files unchanged, "
            f"commit {head[:8] if head else '?'}): no new commit"
        )
        return result

    rows = sum(s.rows_kept for s in statuses if s.name == "write")
    message = settings.message or f"Upload MFPO dataset ({rows} rows) with mfpo-pipeline"
    echo(
        f"uploading {len(plan.upload)} file(s) ({_mb(plan.upload_bytes)}) to {repo_id}@{branch} in "
        f"{len(groups)} commit(s); {len(plan.unchanged)} unchanged, {len(plan.delete)} to delete"
    )
    committed: list[LocalFile] = []
    revision, create_pr = settings.revision, settings.create_pr
    for i, group in enumerate(groups):
        uploaded = 0
        try:
            ops: list[Any] = []
            for f in group:
                op = CommitOperationAdd(
                    path_in_repo=f.path, path_or_fileobj=f.source if isinstance(f.source, bytes) else str(f.source)
                )
                # One file per call: an interrupted push knows what it had sent, and the Hub keeps it for a re-run.
                upload = partial(api.preupload_lfs_files, repo_id, repo_type="dataset", revision=revision)
                _call(settings, f"upload {f.path}", partial(upload, additions=[op], create_pr=create_pr))
                uploaded += 1
                ops.append(op)
            if i == len(groups) - 1:
                ops += [CommitOperationDelete(path_in_repo=p) for p in plan.delete]
            suffix = f" (part {i + 1} of {len(groups)})" if len(groups) > 1 else ""
            commit = partial(api.create_commit, repo_id, operations=ops, commit_message=message + suffix)
            info = _call(
                settings, "commit", partial(commit, repo_type="dataset", revision=revision, create_pr=create_pr)
            )
        except Exception as err:
            done = f"{len(committed)} of {len(plan.upload)} file(s) committed"
            if uploaded:
                done += f", {uploaded} more uploaded but not committed"
            raise _failure(err, repo_id, done) from err
        committed += group
        result.commits.append(info.commit_url)
        if info.pr_url:
            result.pr_url = info.pr_url
            revision, create_pr = info.pr_revision, False  # later parts go to the same pull request
        echo(f"commit {i + 1}/{len(groups)}: {len(group)} file(s) -> {info.commit_url}")
    return result


def _failure(err: BaseException, repo_id: str, done: str) -> PipelineError:
    status = _auth_error(err)
    if status is not None:
        return PipelineError(f"not authorised to write {repo_id}: set HF_TOKEN or run hf auth login (HTTP {status})")
    return PipelineError(
        f"push to {repo_id} failed: {_one_line(err)}; {done}; run the same push again to resume "
        "(files already on the Hub are not sent again)"
    )


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"
