"""The one storage interface. Nothing outside ``contracts.storage`` knows which backend it talks to."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object. ``relative_key`` is the key relative to the listed prefix ('/'-separated)."""

    uri: str
    relative_key: str
    size: int


class Backend(Protocol):
    """A storage backend for one URI scheme. Errors are contracts.errors types (NotFoundError, ...)."""

    def read_bytes(self, uri: str) -> bytes:
        """The whole object; NotFoundError/ForbiddenError are permanent, TransientError retryable."""
        ...

    def write_bytes(self, uri: str, data: bytes, content_type: str) -> None:
        """Write atomically: a reader sees the old object, nothing, or the whole new one."""
        ...

    def exists(self, uri: str) -> bool:
        """True when the object exists."""
        ...

    def list_objects(self, prefix_uri: str, start_after: str | None = None) -> Iterator[ObjectInfo]:
        """Stream objects under a prefix in ascending key order, after ``start_after`` (a relative key)."""
        ...
