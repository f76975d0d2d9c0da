"""The project's exceptions: each carries a reason code that is safe to log and audit."""

from __future__ import annotations


class S3RollupError(Exception):
    """Base error; ``code`` is a stable, value-free reason code."""

    code = "ERROR"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code:
            self.code = code


def reason_code(exc: BaseException) -> str:
    """What logs and audit records say about a failure: its code, or its type's name (never
    its message, which may quote data)."""
    return exc.code if isinstance(exc, S3RollupError) else type(exc).__name__


class ConfigError(S3RollupError):
    """Settings are missing or invalid."""

    code = "CONFIG"


class AwsError(S3RollupError):
    """An AWS call failed after its retries."""

    code = "AWS"


class AuditError(S3RollupError):
    """The audit chain could not be appended to or does not verify."""

    code = "AUDIT"


class LaunchError(S3RollupError):
    """A job could not be started."""

    code = "LAUNCH"
