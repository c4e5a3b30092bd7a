"""Exceptions with messages meant for users: one line that says what is wrong and what to do."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class PipelineError(Exception):
    """A failure the CLI reports as one line on stderr (the traceback goes to the run log)."""


class ConfigError(PipelineError):
    """The configuration is invalid; raised before any work starts."""


class RowError(Exception):
    """A stage cannot process one row; the row is quarantined with this message as its reason."""

    def __init__(self, reason: str, *, payload: bytes | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.payload = payload


def describe_os_error(err: OSError) -> str:
    """`/path: Operation not permitted` rather than `PermissionError: [Errno 1]` with no path."""
    what = err.strerror or str(err) or type(err).__name__
    return f"{err.filename}: {what}" if err.filename else f"{type(err).__name__}: {what}"


def first_line(message: BaseException | str) -> str:
    """The first non-blank line of an error or message (errors from libraries often carry a paragraph); for an
    exception with no text, its type's name."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if lines:
        return lines[0]
    return type(message).__name__ if isinstance(message, BaseException) else ""


@contextlib.contextmanager
def in_stage(stage: str) -> Iterator[None]:
    """An exception raised inside carries the stage it came from (the innermost one), for `failed_stage`: the
    one-line error can name it wherever the exception surfaces (the driver, a Ray task's error)."""
    try:
        yield
    except Exception as err:
        if not hasattr(err, "mfpo_stage"):
            err.mfpo_stage = stage  # type: ignore[attr-defined]
        raise


def failed_stage(err: BaseException) -> str | None:
    """The stage `in_stage` recorded on an exception, if any."""
    return getattr(err, "mfpo_stage", None)
