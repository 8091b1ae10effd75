"""The small set of error types, and the one place that decides what is worth retrying."""

from __future__ import annotations

import socket

import redis

from sam3_batch.contracts.redact import redact


class Sam3BatchError(Exception):
    """Base class for errors this project raises on purpose."""


class ItemError(Sam3BatchError):
    """A permanent problem with one image: it fails with this message as its reason."""


class BadImageError(ItemError):
    """The bytes are not a decodable image we accept (corrupt, bomb, unsupported)."""


class NotFoundError(ItemError):
    """The input object does not exist (404 / missing file)."""


class ForbiddenError(ItemError):
    """The input cannot be read with our credentials or policy (403, refused address)."""


class BadUriError(ItemError):
    """The URI has an unknown scheme or an unsafe shape."""


class TransientError(Sam3BatchError):
    """A failure worth retrying (5xx, throttling, resets, timeouts)."""


class JobCancelledError(Sam3BatchError):
    """The job was cancelled; stop without writing anything new."""


class RequestError(Sam3BatchError):
    """The command line asks for something that cannot work (checked before anything is loaded)."""


class ModelLoadError(Sam3BatchError):
    """The model could not be loaded (missing path, corrupt checkpoint, missing weights, no access)."""


class StaleGenerationError(Sam3BatchError):
    """A chunk planned before a resume replanned its job: the new plan counts its images."""


def is_transient(exc: BaseException) -> bool:
    """True when retrying the same operation later may succeed."""
    if isinstance(exc, TransientError):
        return True
    if isinstance(exc, ItemError):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError, socket.timeout)):
        return True
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)):
        return True
    return _is_transient_botocore(exc)


_TRANSIENT_S3_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
    "InternalError", "ServiceUnavailable", "503", "500", "502", "504",
}


def _is_transient_botocore(exc: BaseException) -> bool:
    try:
        from botocore.exceptions import ClientError, HTTPClientError, ReadTimeoutError
        from botocore.exceptions import ConnectionError as BotoConnectionError
    except ImportError:  # pragma: no cover - boto3 is a dependency
        return False
    if isinstance(exc, (BotoConnectionError, HTTPClientError, ReadTimeoutError)):
        return True
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return code in _TRANSIENT_S3_CODES or status >= 500 or status == 429
    return False


def reason_of(exc: BaseException) -> str:
    """A one-line reason a user can read in the job report (no tracebacks, no secrets)."""
    text = " ".join(str(exc).split()) or exc.__class__.__name__
    return redact(f"{exc.__class__.__name__}: {text}")[:500]
