"""S3 Inventory as an input source: a billion-key bucket is read from its inventory, not LISTed.

The input is an inventory ``manifest.json`` (``sourceBucket``, ``destinationBucket``, ``fileFormat``
CSV or Parquet, ``fileSchema``, ``files[].key``). Its data files are read one at a time (one file's
compressed bytes in memory, rows streamed), so no listing of millions of keys is ever held.

* Items are ``s3://<bucket>/<key>`` for keys under ``prefix`` (a folder, as for an S3 prefix input)
  with an image extension; delete markers and non-current versions are left out.
* ``out_key`` is the key relative to ``prefix``, made safe with ``safe_relative_key``: the same
  output keys a LIST of ``s3://<sourceBucket>/<prefix>`` gives, so either source finds the other's outputs.
* CSV inventories URL-encode keys (form encoding: a space is ``+``); they are decoded here. Parquet
  keys are plain.
* Positions are ``"<file index>:<row index>"``, zero-padded so they sort as the files are read;
  ``entries(start_after)`` resumes after one (rows before it are read again but not yielded).
"""

from __future__ import annotations

import csv
import gzip
import io
import posixpath
from collections.abc import Iterator
from typing import Any, NamedTuple
from urllib.parse import unquote_plus

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sam3_batch.contracts.errors import BadUriError, ItemError
from sam3_batch.contracts.keys import IMAGE_EXTENSIONS, safe_relative_key
from sam3_batch.contracts.storage import Storage
from sam3_batch.producer.sources import SourceEntry, SourceItem, SourceProblem

INVENTORY_MANIFEST_NAME = "manifest.json"
_FILE_DIGITS, _ROW_DIGITS = 6, 12
_PARQUET_BATCH_ROWS = 16_384
_ARN_PREFIX = "arn:aws:s3:::"
_GZIP_MAGIC = b"\x1f\x8b"
# Parquet inventory column names for the CSV fileSchema names we read.
_PARQUET_COLUMNS = {"Bucket": "bucket", "Key": "key", "IsLatest": "is_latest", "IsDeleteMarker": "is_delete_marker"}


def is_inventory_manifest(uri: str) -> bool:
    """True for a URI naming an S3 Inventory ``manifest.json``."""
    return posixpath.basename(uri.rstrip("/")) == INVENTORY_MANIFEST_NAME


def inventory_position(file_index: int, row_index: int) -> str:
    """The sortable position of one inventory row."""
    return f"{file_index:0{_FILE_DIGITS}d}:{row_index:0{_ROW_DIGITS}d}"


def _parse_position(position: str) -> tuple[int, int]:
    file_part, _, row_part = position.partition(":")
    if not (file_part.isdigit() and row_part.isdigit()):
        raise ItemError(f"not an inventory position: {position!r}")
    return int(file_part), int(row_part)


class _ManifestFile(BaseModel):
    model_config = ConfigDict(extra="ignore")
    key: str = Field(min_length=1)


class InventoryManifest(BaseModel):
    """The fields of an S3 Inventory ``manifest.json`` that a reader needs."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    source_bucket: str = Field(alias="sourceBucket", min_length=1)
    destination_bucket: str | None = Field(None, alias="destinationBucket")
    file_format: str = Field(alias="fileFormat")
    file_schema: str = Field("", alias="fileSchema")
    files: list[_ManifestFile]

    def csv_columns(self) -> list[str]:
        """CSV data files have no header: their columns are the comma-separated ``fileSchema``."""
        return [name.strip() for name in self.file_schema.split(",")]

    def data_uris(self, manifest_uri: str) -> list[str]:
        """Where the data files are: ``files[].key`` in the destination bucket (the manifest's, if unnamed)."""
        bucket = (self.destination_bucket or "").removeprefix(_ARN_PREFIX)
        if not bucket and manifest_uri.startswith("s3://"):
            bucket = manifest_uri.removeprefix("s3://").split("/", 1)[0]
        if not bucket:
            raise ItemError(f"{manifest_uri}: no destinationBucket, so its data files cannot be located")
        return [f"s3://{bucket}/{f.key}" for f in self.files]


class InventoryRow(NamedTuple):
    """One object of the inventory (keys already decoded)."""

    bucket: str
    key: str
    current: bool = True  # False for delete markers and non-latest versions


def _flag(value: Any) -> bool:
    """Inventory booleans: Parquet bools, CSV 'true'/'false', or absent (None)."""
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


def _csv_text(data: bytes) -> io.TextIOWrapper:
    """The text of a CSV data file, gunzipped as it is read when it is gzip (as inventories write it)."""
    if data.startswith(_GZIP_MAGIC):
        return io.TextIOWrapper(gzip.GzipFile(fileobj=io.BytesIO(data)), encoding="utf-8", errors="replace",
                                newline="")
    return io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors="replace", newline="")


def csv_rows(data: bytes, columns: list[str], default_bucket: str) -> Iterator[InventoryRow | str]:
    """Rows of a CSV (optionally gzip) data file; a row that cannot be read is yielded as its reason."""
    if "Key" not in columns:
        raise ItemError(f"CSV inventory fileSchema has no Key column: {columns}")
    where = {name: columns.index(name) for name in ("Bucket", "Key", "IsLatest", "IsDeleteMarker") if name in columns}
    with _csv_text(data) as text:
        for record in csv.reader(text):
            if len(record) != len(columns):
                yield f"expected {len(columns)} CSV fields, got {len(record)}"
                continue
            latest = record[where["IsLatest"]] if "IsLatest" in where else "true"
            deleted = record[where["IsDeleteMarker"]] if "IsDeleteMarker" in where else "false"
            bucket = record[where["Bucket"]] if "Bucket" in where else default_bucket
            yield InventoryRow(bucket, unquote_plus(record[where["Key"]]), _flag(latest) and not _flag(deleted))


def parquet_rows(data: bytes, default_bucket: str) -> Iterator[InventoryRow | str]:
    """Rows of a Parquet data file, read a batch of columns at a time."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(io.BytesIO(data))
    present = [c for c in _PARQUET_COLUMNS.values() if c in parquet.schema_arrow.names]
    if "key" not in present:
        raise ItemError(f"Parquet inventory has no 'key' column: {parquet.schema_arrow.names}")
    for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=present):
        values = batch.to_pydict()
        count = batch.num_rows
        buckets = values.get("bucket") or [default_bucket] * count
        latest = values.get("is_latest") or [True] * count
        deleted = values.get("is_delete_marker") or [False] * count
        for bucket, key, is_latest, is_deleted in zip(buckets, values["key"], latest, deleted, strict=True):
            if not key:
                yield "empty key"
                continue
            current = (is_latest is None or _flag(is_latest)) and not _flag(is_deleted)
            yield InventoryRow(bucket or default_bucket, key, current)


class InventorySource:
    """Every image under ``prefix`` of the bucket an S3 Inventory describes (see the module docstring).

    ``prefix`` is a key prefix (``images/2024``) or an ``s3://<sourceBucket>/<prefix>`` URI; empty means
    the whole inventory.
    """

    def __init__(self, storage: Storage, manifest_uri: str, prefix: str = "",
                 extensions: frozenset[str] = IMAGE_EXTENSIONS) -> None:
        self.storage, self.manifest_uri, self.extensions = storage, manifest_uri, extensions
        self._prefix_bucket, self.prefix = _split_prefix(prefix)

    def manifest(self) -> InventoryManifest:
        """The parsed manifest (read on every call: a resumed producer sees the same file)."""
        try:
            manifest = InventoryManifest.model_validate_json(self.storage.read_bytes(self.manifest_uri))
        except ValidationError as exc:
            raise ItemError(f"{self.manifest_uri}: not an S3 Inventory manifest: {exc.errors()[0]['msg']}") from exc
        if manifest.file_format not in ("CSV", "Parquet"):
            raise ItemError(f"{self.manifest_uri}: inventory format {manifest.file_format!r} is not supported "
                            "(configure the inventory as CSV or Parquet)")
        if self._prefix_bucket not in (None, manifest.source_bucket):
            raise BadUriError(f"prefix bucket {self._prefix_bucket!r} is not the inventory's source bucket "
                              f"{manifest.source_bucket!r}")
        return manifest

    def entries(self, start_after: str | None) -> Iterator[SourceEntry]:
        manifest = self.manifest()
        first_file, last_done_row = _parse_position(start_after) if start_after else (0, -1)
        for file_index, data_uri in enumerate(manifest.data_uris(self.manifest_uri)):
            if file_index < first_file:
                continue
            skip_through = last_done_row if file_index == first_file else -1
            for row_index, row in enumerate(self._rows(manifest, data_uri)):
                if row_index > skip_through:
                    entry = self._entry(row, inventory_position(file_index, row_index), data_uri)
                    if entry is not None:
                        yield entry

    def _rows(self, manifest: InventoryManifest, data_uri: str) -> Iterator[InventoryRow | str]:
        data = self.storage.read_bytes(data_uri)
        if manifest.file_format == "CSV":
            return csv_rows(data, manifest.csv_columns(), manifest.source_bucket)
        return parquet_rows(data, manifest.source_bucket)

    def _entry(self, row: InventoryRow | str, position: str, data_uri: str) -> SourceEntry | None:
        if isinstance(row, str):
            return SourceProblem(f"{data_uri} row {position}", f"unreadable inventory row: {row}", position)
        if not (row.current and row.key.startswith(self.prefix)):
            return None
        if posixpath.splitext(row.key)[1].lower() not in self.extensions:
            return None
        uri = f"s3://{row.bucket}/{row.key}"
        try:
            return SourceItem(uri=uri, out_key=safe_relative_key(row.key[len(self.prefix):]), position=position)
        except BadUriError as exc:
            return SourceProblem(uri, str(exc), position)


def _split_prefix(prefix: str) -> tuple[str | None, str]:
    """(bucket or None, key prefix as a folder: '' or ending in '/')."""
    bucket: str | None = None
    if prefix.startswith("s3://"):
        bucket, _, prefix = prefix.removeprefix("s3://").partition("/")
    elif "://" in prefix:
        raise BadUriError(f"an inventory prefix is a key prefix or an s3:// URI, not {prefix!r}")
    prefix = prefix.lstrip("/")
    return bucket, prefix if not prefix or prefix.endswith("/") else prefix + "/"
