"""Local filesystem backend for ``file://`` URIs and plain paths.

URIs are taken literally (no percent-decoding), like s3:// keys, so ``join_uri(root, key)`` round-trips.
"""

from __future__ import annotations

import os
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

from sam3_batch.contracts.errors import BadUriError, ForbiddenError, ItemError, NotFoundError
from sam3_batch.contracts.redact import display_uri
from sam3_batch.contracts.storage.base import ObjectInfo

# Temp files of in-flight atomic writes end with this and start with '.'; listings skip them.
TMP_SUFFIX = ".sam3-tmp"
_FILE_PREFIX = "file://"


def local_path(uri: str) -> Path:
    """The filesystem path of a ``file://`` URI (empty or ``localhost`` authority) or a plain path."""
    if not uri.startswith(_FILE_PREFIX):
        if not uri:
            raise BadUriError("empty path")
        return Path(uri)
    rest = uri[len(_FILE_PREFIX) :]
    authority, slash, path = rest.partition("/")
    if authority not in ("", "localhost"):
        raise BadUriError(f"file URI with a remote host is not supported: {uri!r}")
    if not slash:
        raise BadUriError(f"file URI without a path: {uri!r}")
    return Path("/" + path)


class LocalBackend:
    """Objects are files; keys are '/'-separated paths relative to the listed directory."""

    def read_bytes(self, uri: str) -> bytes:
        """The whole file; only regular files are read (a FIFO or a device would block or never end)."""
        path = local_path(uri)
        shown = display_uri(uri)
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused just below.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise NotFoundError(f"{shown}: no such file") from exc
        except PermissionError as exc:
            raise ForbiddenError(f"{shown}: permission denied") from exc
        except OSError as exc:  # a symlink loop (ELOOP), a name too long, an I/O error ...
            raise ItemError(f"{shown}: cannot open: {exc.strerror or exc}") from exc
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            if stat.S_ISDIR(mode):
                raise NotFoundError(f"{shown}: a folder, not a file")
            raise ItemError(f"{shown}: not a regular file (FIFO, socket or device); only regular files are read")
        with os.fdopen(fd, "rb") as handle:
            os.set_blocking(handle.fileno(), True)
            try:
                return handle.read()
            except OSError as exc:
                raise ItemError(f"{shown}: cannot read: {exc.strerror or exc}") from exc

    def write_bytes(self, uri: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Write to a temp file in the same directory, then rename over the target (atomic on POSIX)."""
        path = local_path(uri)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except PermissionError as exc:
            raise ForbiddenError(f"{uri}: cannot create the parent directory") from exc
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")
        try:
            _write_new_file(tmp, data)
            os.replace(tmp, path)
        except PermissionError as exc:
            raise ForbiddenError(f"{uri}: permission denied") from exc
        finally:
            tmp.unlink(missing_ok=True)

    def exists(self, uri: str) -> bool:
        """True when a regular file exists at the URI."""
        return local_path(uri).is_file()

    def list_objects(self, prefix_uri: str, start_after: str | None = None) -> Iterator[ObjectInfo]:
        """Files below the directory ``prefix_uri``, recursively, in ascending key order, lazily.

        A regular file given as the prefix is listed as its only object (a source of one image).
        """
        root = local_path(prefix_uri)
        if root.is_file():
            if root.name > (start_after or ""):
                yield ObjectInfo(uri=prefix_uri, relative_key=root.name, size=root.stat().st_size)
            return
        base_uri = prefix_uri.rstrip("/")
        for relative_key, size in _walk_sorted(root, "", start_after or ""):
            yield ObjectInfo(uri=f"{base_uri}/{relative_key}", relative_key=relative_key, size=size)


def _write_new_file(path: Path, data: bytes) -> None:
    # O_EXCL: never clobber another writer's temp file; mode 0o666 lets the umask decide permissions.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        # The rename publishes the file (it may be a done marker): its bytes must be on disk first.
        os.fsync(handle.fileno())


def _sorted_entries(directory: Path) -> list[tuple[str, os.DirEntry[str]]]:
    """Entries sorted as their keys sort: a directory 'a' as 'a/', so 'a-b' < 'a/x' as in S3."""
    try:
        with os.scandir(directory) as scan:
            entries = list(scan)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except PermissionError as exc:
        raise ForbiddenError(f"{directory}: permission denied") from exc
    keyed = [(e.name + "/" if e.is_dir(follow_symlinks=False) else e.name, e) for e in entries]
    keyed.sort(key=lambda pair: pair[0])
    return keyed


def _walk_sorted(directory: Path, prefix: str, start_after: str) -> Iterator[tuple[str, int]]:
    """Depth-first walk yielding (relative key, size) in ascending key order; one directory in memory."""
    for sort_key, entry in _sorted_entries(directory):
        key = prefix + sort_key
        if sort_key.endswith("/"):
            # Every key below starts with `key`; skip the subtree when all of them are <= start_after.
            if start_after >= key and not start_after.startswith(key):
                continue
            yield from _walk_sorted(Path(entry.path), key, start_after)
        elif key > start_after and not _is_temp_file(entry.name):
            size = _file_size(entry)
            if size is not None:
                yield key, size


def _file_size(entry: os.DirEntry[str]) -> int | None:
    """Size of a regular file (symlinks followed); None for a FIFO, socket, device or a file deleted meanwhile.

    An entry that cannot even be inspected (a symlink loop, a dangling link, no permission) is listed with
    size 0: reading it then fails that one image with the reason, instead of stopping the listing.
    """
    try:
        if entry.is_file():
            return entry.stat().st_size
    except FileNotFoundError:
        return None
    except OSError:
        return 0
    dangling = entry.is_symlink() and not os.path.lexists(os.path.realpath(entry.path))
    return 0 if dangling else None


def _is_temp_file(name: str) -> bool:
    return name.startswith(".") and name.endswith(TMP_SUFFIX)
