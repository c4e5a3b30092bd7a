"""The `push:` section of a pipeline config (pydantic only; nothing here talks to the Hub)."""

from __future__ import annotations

from pydantic import Field

from pipeline.registry import config_section
from pipeline.strict import StrictModel

REPO_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$"


@config_section("push")
class PushConfig(StrictModel):
    repo_id: str | None = Field(None, pattern=REPO_ID, description="Hub dataset repo, ORG/NAME (or --repo-id).")
    private: bool = Field(False, description="Create the repo private (an existing repo keeps its visibility).")
    revision: str | None = Field(None, description="Branch to push to (created from main if missing); default main.")
    create_pr: bool = Field(
        False, description="Open a pull request with the upload instead of committing to the branch."
    )
    message: str | None = Field(None, description="Commit message; default: 'Upload MFPO dataset (<rows> rows)'.")
    token_env: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Environment variable holding the Hub token; default: huggingface_hub's own order "
        "(HF_TOKEN, then the stored `hf auth login`).",
    )
    max_files_per_commit: int = Field(
        200, ge=1, description="Uploads with more files than this are split into several commits (resumable)."
    )
    max_commit_bytes: int = Field(
        20 * 1024**3, ge=1, description="Uploads larger than this many bytes are split into several commits."
    )
    retries: int = Field(5, ge=0, description="Retries of a failed Hub call (connection errors, 429, 5xx).")
    retry_wait: float = Field(2.0, ge=0, description="Seconds before the first retry; doubled each time, at most 60.")
    check_rows: int | None = Field(
        1000, ge=1, description="Rows whose pixels the contract check decodes before a push (null: every row)."
    )
