"""Input sources: a storage prefix (S3 or local folder), a manifest (JSONL/CSV), or http(s) URLs.

Each source streams items in a stable order and can restart after a saved position.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Protocol

from sam3_batch.contracts.errors import BadUriError, ItemError
from sam3_batch.contracts.keys import IMAGE_EXTENSIONS, key_from_uri, safe_relative_key
from sam3_batch.contracts.layout import JOB_DIR
from sam3_batch.contracts.redact import display_uri
from sam3_batch.contracts.storage import Storage

_POSITION_WIDTH = 12


@dataclass(frozen=True)
class SourceItem:
    """One input image, with the key its outputs derive from and its resume position."""

    uri: str
    out_key: str
    position: str
    prompts: list[str | dict[str, object]] | None = None  # text, or concept objects (checked by WorkItem)
    objects: list[dict[str, object]] | None = None
    size: int | None = None  # bytes, where the listing gives them (for `submit --dry-run`)


@dataclass(frozen=True)
class SourceProblem:
    """An input that cannot become a work item (e.g. a malformed manifest line)."""

    where: str
    reason: str
    position: str


SourceEntry = SourceItem | SourceProblem


class Source(Protocol):
    """Streams entries after a position (exclusive); positions sort in listing order."""

    def entries(self, start_after: str | None) -> Iterator[SourceEntry]: ...


def _line_position(number: int) -> str:
    return str(number).zfill(_POSITION_WIDTH)


def _within(root: str, prefix: str) -> str | None:
    """Where ``root`` lies below ``prefix``, as a relative key ('' when equal); None when it is not below it."""
    remote = ("s3://", "http://", "https://")
    if root.startswith(remote) != prefix.startswith(remote):
        return None
    root, prefix = root.rstrip("/"), prefix.rstrip("/")
    if not root.startswith(remote):  # two local paths: compare where they really are
        root = os.path.realpath(root.removeprefix("file://"))
        prefix = os.path.realpath(prefix.removeprefix("file://"))
    if root == prefix:
        return ""
    return root[len(prefix) + 1:] + "/" if root.startswith(prefix + "/") else None


def is_output_key(relative_key: str) -> bool:
    """True for objects this project writes under an output root (masks, masked images, job folders)."""
    parts = relative_key.split("/")
    name = parts[-1]
    return (parts[0] == JOB_DIR or any(p.endswith(".masks") for p in parts[:-1])
            or name.endswith((".masked.png", ".masked.jpg")))


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a name read from the filesystem with surrogate escapes
        return False
    return True


class PrefixSource:
    """Every image under an ``s3://`` prefix or a local folder, recursively, filtered by extension.

    An output root inside the listed folder is left out (a second run must not segment the first run's
    masks): all of it when it is a sub-folder, and the objects this project writes when it is the folder.
    """

    def __init__(self, storage: Storage, prefix_uri: str, extensions: frozenset[str] = IMAGE_EXTENSIONS,
                 exclude_root: str | None = None):
        self.storage, self.prefix_uri, self.extensions = storage, prefix_uri, extensions
        self._output_at = _within(exclude_root, prefix_uri) if exclude_root else None

    def _is_output(self, relative_key: str) -> bool:
        if self._output_at is None:
            return False
        # Masks and masked images beside the inputs (an earlier run with --out at the folder) are outputs too.
        return is_output_key(relative_key) or (bool(self._output_at) and relative_key.startswith(self._output_at))

    def entries(self, start_after: str | None) -> Iterator[SourceEntry]:
        for obj in self.storage.list_objects(self.prefix_uri, start_after=start_after):
            if PurePosixPath(obj.relative_key).suffix.lower() not in self.extensions:
                continue
            if self._is_output(obj.relative_key):
                continue
            if not _is_utf8(obj.uri):
                yield SourceProblem(display_uri(obj.uri), "the file name is not valid UTF-8 (shown with \\x "
                                    "escapes): rename it to process it", obj.relative_key)
                continue
            try:
                out_key = safe_relative_key(obj.relative_key)
            except BadUriError as exc:
                yield SourceProblem(display_uri(obj.uri), str(exc), obj.relative_key)
                continue
            yield SourceItem(uri=obj.uri, out_key=out_key, position=obj.relative_key, size=obj.size)


def _json_cell(value: object) -> object:
    """A CSV cell holding a JSON list (visual prompts) is parsed; anything else is returned as is."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        return json.loads(value)
    return value


def _prompts_field(value: object) -> list[str | dict[str, object]] | None:
    value = _json_cell(value)
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return [p for p in (s.strip() for s in value.split("|")) if p]
    if isinstance(value, list) and all(isinstance(p, (str, dict)) for p in value):
        return list(value)
    raise ItemError(f"'prompts' must be a list of strings and prompt objects or a '|'-separated string, "
                    f"got {value!r}")


def _objects_field(value: object) -> list[dict[str, object]] | None:
    value = _json_cell(value)
    if value is None or value == "":
        return None
    if isinstance(value, list) and all(isinstance(o, dict) for o in value):
        return list(value)
    raise ItemError(f"'objects' must be a list of objects with 'points' and/or 'box', got {value!r}")


def _item_from_record(record: object, position: str) -> SourceItem:
    if not isinstance(record, dict):
        raise ItemError("expected an object with a 'uri' field")
    uri = record.get("uri")
    if not isinstance(uri, str) or not uri.strip():
        raise ItemError("missing or empty 'uri'")
    return SourceItem(uri=uri.strip(), out_key=key_from_uri(uri.strip()), position=position,
                      prompts=_prompts_field(record.get("prompts")), objects=_objects_field(record.get("objects")))


class ManifestSource:
    """A JSONL (``{"uri": ..., "prompts": [...], "objects": [...]}`` per line) or CSV manifest.

    CSV columns: ``uri``, optional ``prompts`` (``a|b``, or a JSON list) and ``objects`` (a JSON list).
    """

    def __init__(self, storage: Storage, manifest_uri: str) -> None:
        self.storage, self.manifest_uri = storage, manifest_uri

    def _records(self) -> Iterator[tuple[int, object]]:
        text = self.storage.read_bytes(self.manifest_uri).decode("utf-8-sig", errors="replace")
        if self.manifest_uri.lower().endswith(".csv"):
            reader = csv.DictReader(io.StringIO(text))
            if not reader.fieldnames or "uri" not in reader.fieldnames:
                raise ItemError(f"{self.manifest_uri}: CSV manifest needs a 'uri' column")
            for row in reader:
                yield reader.line_num, row
            return
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                yield number, line

    def entries(self, start_after: str | None) -> Iterator[SourceEntry]:
        for number, record in self._records():
            position = _line_position(number)
            if start_after is not None and position <= start_after:
                continue
            try:
                parsed = json.loads(record) if isinstance(record, str) else record
                yield _item_from_record(parsed, position)
            except (ValueError, ItemError) as exc:
                yield SourceProblem(f"{self.manifest_uri} line {number}", f"malformed manifest line: {exc}",
                                    position)


class UrlSource:
    """Plain http(s) image URLs, as the hosted SAM 3 image API takes them."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls

    def entries(self, start_after: str | None) -> Iterator[SourceEntry]:
        for index, url in enumerate(self.urls):
            position = _line_position(index)
            if start_after is not None and position <= start_after:
                continue
            try:
                yield SourceItem(uri=url, out_key=key_from_uri(url), position=position)
            except BadUriError as exc:
                yield SourceProblem(url, str(exc), position)
