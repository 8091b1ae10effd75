"""The CLI's one error boundary: an expected error becomes one readable line and a non-zero exit code.

Unexpected errors say so in one line too; ``--debug`` (or ``SAM3_BATCH_DEBUG=1``) shows the traceback.
"""

from __future__ import annotations

import os
import sys

import redis
from pydantic import ValidationError

from sam3_batch.contracts.display import printable
from sam3_batch.contracts.errors import RequestError, Sam3BatchError, reason_of
from sam3_batch.contracts.jobstate import UnknownJobError
from sam3_batch.contracts.redact import redact

EXIT_FAILED = 1  # the command could not do what was asked (Redis down, unknown job, storage refused)
EXIT_USAGE = 2  # the request itself is invalid (as click's usage errors)
EXIT_INTERNAL = 70  # a bug: EX_SOFTWARE


def debug_requested(argv: list[str]) -> bool:
    """True when the user asked for tracebacks (``--debug`` or ``SAM3_BATCH_DEBUG``)."""
    flag = os.environ.get("SAM3_BATCH_DEBUG", "").strip().lower()
    return "--debug" in argv or flag in ("1", "true", "yes", "on")


def describe_validation(exc: ValidationError) -> str:
    """A pydantic error as one line: which value, what is wrong with it, what was given."""
    parts = []
    for error in exc.errors()[:3]:
        where = ".".join(str(p) for p in error["loc"]) or exc.title
        given = error.get("input")
        shown = f" (got {given!r})" if isinstance(given, (str, int, float)) and len(repr(given)) < 80 else ""
        parts.append(f"{where}: {error['msg']}{shown}")
    return "invalid " + "; ".join(parts)


def _storage_message(exc: BaseException) -> str | None:
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:  # pragma: no cover - boto3 is a dependency
        return None
    if isinstance(exc, (BotoCoreError, ClientError)):
        return f"object storage: {reason_of(exc)}"
    return None


def _redis_message(exc: BaseException) -> str | None:
    if isinstance(exc, redis.AuthenticationError):
        return f"Redis refused the credentials: {reason_of(exc)}"
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
        return f"cannot reach Redis (SAM3_BATCH_BROKER_URL / SAM3_BATCH_STATE_URL): {reason_of(exc)}"
    if isinstance(exc, redis.RedisError):
        return f"Redis: {reason_of(exc)}"
    return None


def one_line(exc: BaseException) -> tuple[str, int]:
    """The message and exit code for an error that reached the entry point."""
    if isinstance(exc, UnknownJobError):
        return f"unknown job {exc.args[0]}", EXIT_FAILED
    if isinstance(exc, ValidationError):
        return describe_validation(exc), EXIT_USAGE
    if isinstance(exc, RequestError):
        return " ".join(str(exc).split()), EXIT_USAGE
    if isinstance(exc, Sam3BatchError):
        return " ".join(str(exc).split()) or exc.__class__.__name__, EXIT_FAILED
    message = _redis_message(exc) or _storage_message(exc)
    if message:
        return message, EXIT_FAILED
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc.__class__.__name__}: {exc.filename or exc}", EXIT_FAILED
    return f"internal error: {reason_of(exc)} (run with --debug for the traceback)", EXIT_INTERNAL


def report_and_exit(exc: BaseException) -> None:
    """Print ``exc`` as one plain-text line on stderr and exit (never returns)."""
    message, code = one_line(exc)
    sys.stderr.write(f"error: {printable(redact(message))}\n")
    sys.stderr.flush()
    raise SystemExit(code)
