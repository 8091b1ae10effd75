"""``Storage``: the one object the rest of the code uses; it picks a backend by URI scheme."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from sam3_batch.contracts.errors import BadUriError
from sam3_batch.contracts.redact import redact
from sam3_batch.contracts.settings import Settings
from sam3_batch.contracts.storage.base import Backend, ObjectInfo

_SCHEMES = ("s3", "file", "http", "https")


def scheme_of(uri: str) -> str:
    """'s3', 'http', 'https' or 'file' (plain paths are 'file'); anything else raises BadUriError."""
    if not uri:
        raise BadUriError("empty URI")
    head, sep, _ = uri.partition("://")
    if not sep:
        return "file"
    scheme = head.lower()
    if scheme not in _SCHEMES:
        raise BadUriError(
            redact(f"unsupported URI scheme {scheme!r} in {uri!r}: use s3://, file://, http(s):// or a path")
        )
    return scheme


class Storage:
    """Reads and writes ``s3://``, ``file://``/plain-path and (read-only) ``http(s)://`` URIs.

    Backends are created on first use and shared; all methods are safe to call from many threads.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._backends: dict[str, Backend] = {}
        self._lock = threading.Lock()

    def read_bytes(self, uri: str) -> bytes:
        """The whole object at ``uri``."""
        return self._backend(uri).read_bytes(uri)

    def write_bytes(self, uri: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Write ``data`` atomically; http(s) URIs raise BadUriError."""
        self._backend(uri).write_bytes(uri, data, content_type)

    def exists(self, uri: str) -> bool:
        """True when the object exists."""
        return self._backend(uri).exists(uri)

    def list_objects(self, prefix_uri: str, start_after: str | None = None) -> Iterator[ObjectInfo]:
        """Objects under the folder ``prefix_uri``, ascending by key, after relative key ``start_after``."""
        return self._backend(prefix_uri).list_objects(prefix_uri, start_after)

    def _backend(self, uri: str) -> Backend:
        scheme = scheme_of(uri)
        kind = "http" if scheme == "https" else scheme
        with self._lock:  # boto3 client creation is not thread-safe; build each backend once
            backend = self._backends.get(kind)
            if backend is None:
                backend = self._backends[kind] = _FACTORIES[kind](self._settings)
            return backend


def _local(settings: Settings) -> Backend:
    from sam3_batch.contracts.storage.local import LocalBackend

    return LocalBackend()


def _s3(settings: Settings) -> Backend:
    # Imported on first use: processes that never touch S3 do not pay for importing boto3.
    from sam3_batch.contracts.storage.s3 import S3Backend

    return S3Backend(settings)


def _http(settings: Settings) -> Backend:
    from sam3_batch.contracts.storage.http import HttpBackend

    return HttpBackend(settings)


_FACTORIES: dict[str, Callable[[Settings], Backend]] = {"file": _local, "s3": _s3, "http": _http}
