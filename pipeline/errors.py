"""Exceptions with messages meant for users: one line that says what is wrong and what to do."""


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
    path = err.filename if err.filename is not None else None
    return f"{path}: {what}" if path else f"{type(err).__name__}: {what}"
