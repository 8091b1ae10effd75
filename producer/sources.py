"""Input sources: a storage prefix (S3 or local folder), a manifest (JSONL/CSV), or http(s) URLs.

Each source streams items in a stable order and can restart after a saved position.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Protocol

from sam3_batch.contracts.errors import BadUriError, ItemError
from sam3_batch.contracts.keys import IMAGE_EXTENSIONS, key_from_uri, safe_relative_key
from sam3_batch.contracts.storage import Storage

_POSITION_WIDTH = 12


@dataclass(frozen=True)
class SourceItem:
    """One input image, with the key its outputs derive from and its resume position."""

    uri: str
    out_key: str
    position: str
    prompts: list[str] | None = None


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


class PrefixSource:
    """Every image under an ``s3://`` prefix or a local folder, recursively, filtered by extension."""

    def __init__(self, storage: Storage, prefix_uri: str, extensions: frozenset[str] = IMAGE_EXTENSIONS):
        self.storage, self.prefix_uri, self.extensions = storage, prefix_uri, extensions

    def entries(self, start_after: str | None) -> Iterator[SourceEntry]:
        for obj in self.storage.list_objects(self.prefix_uri, start_after=start_after):
            if PurePosixPath(obj.relative_key).suffix.lower() not in self.extensions:
                continue
            try:
                out_key = safe_relative_key(obj.relative_key)
            except BadUriError as exc:
                yield SourceProblem(obj.uri, str(exc), obj.relative_key)
                continue
            yield SourceItem(uri=obj.uri, out_key=out_key, position=obj.relative_key)


def _prompts_field(value: object) -> list[str] | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return [p for p in (s.strip() for s in value.split("|")) if p]
    if isinstance(value, list) and all(isinstance(p, str) for p in value):
        return list(value)
    raise ItemError(f"'prompts' must be a list of strings or a '|'-separated string, got {value!r}")


def _item_from_record(record: object, position: str) -> SourceItem:
    if not isinstance(record, dict):
        raise ItemError("expected an object with a 'uri' field")
    uri = record.get("uri")
    if not isinstance(uri, str) or not uri.strip():
        raise ItemError("missing or empty 'uri'")
    return SourceItem(uri=uri.strip(), out_key=key_from_uri(uri.strip()), position=position,
                      prompts=_prompts_field(record.get("prompts")))


class ManifestSource:
    """A JSONL (``{"uri": ..., "prompts": [...]}`` per line) or CSV (``uri``, ``prompts`` columns) manifest."""

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
