"""Compacts a job's per-chunk Parquet parts into a few large files a data lake (DuckDB, Spark) reads well.

Streams part by part: memory holds one row group being built, one output file, and an 8-byte hash
per indexed image (to drop an image a duplicated chunk put into two parts).
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sam3_batch.contracts.errors import Sam3BatchError
from sam3_batch.contracts.keys import job_dir_uri, join_uri
from sam3_batch.contracts.storage import ObjectInfo, Storage
from sam3_batch.worker.parquet_parts import (
    PARQUET_COMPRESSION,
    PARQUET_SUFFIX,
    RESULTS_SCHEMA,
    parts_dir_uri,
    table_to_parquet,
)

INDEX_DIR = "index"
ROW_GROUP_ROWS = 100_000
ROW_GROUP_BYTES = 128 * 1024 * 1024  # Arrow bytes; masks make rows large, so bytes bound a group too
MAX_FILE_BYTES = 1024 * 1024 * 1024  # Arrow bytes per output file (a file is uploaded whole)
_INDEX_FILE = re.compile(r"part-\d{5,}\.parquet")


class IndexPartError(Sam3BatchError):
    """A part could not be read as results of this project's schema."""


@dataclass
class IndexSummary:
    """What a compaction read and wrote."""

    job_id: str
    parts_read: int = 0
    rows: int = 0
    images: int = 0
    instances: int = 0
    duplicate_rows_dropped: int = 0
    files_written: int = 0
    uris: list[str] = field(default_factory=list)
    stale_files_emptied: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready dict (for ``sam3-batch index --json``)."""
        return dict(self.__dict__)


def index_dir_uri(output_root: str, job_id: str) -> str:
    """The folder holding a job's compacted index files."""
    return join_uri(job_dir_uri(output_root, job_id), INDEX_DIR)


def index_file_uri(output_root: str, job_id: str, number: int) -> str:
    """The n-th compacted file: deterministic, so a rerun replaces it."""
    return join_uri(index_dir_uri(output_root, job_id), f"part-{number:05d}{PARQUET_SUFFIX}")


def _read_part(storage: Storage, info: ObjectInfo) -> pa.Table:
    try:
        table = pq.read_table(pa.BufferReader(storage.read_bytes(info.uri)))
        return table.select(RESULTS_SCHEMA.names).cast(RESULTS_SCHEMA)
    except (pa.ArrowException, KeyError, ValueError) as exc:
        raise IndexPartError(f"{info.uri}: not a results part ({exc})") from exc


def _instances(table: pa.Table) -> int:
    total = pc.sum(table.column("instance_count")).as_py()
    return int(total or 0)


def _list_parts(storage: Storage, output_root: str, job_id: str) -> Iterator[ObjectInfo]:
    for info in storage.list_objects(parts_dir_uri(output_root, job_id)):
        if info.relative_key.endswith(PARQUET_SUFFIX) and "/" not in info.relative_key:
            yield info


class _SeenImages:
    """Images already indexed, as 8-byte hashes of their URIs (~60 B each in a Python set)."""

    def __init__(self) -> None:
        self._hashes: set[int] = set()

    @staticmethod
    def _hash(uri: str) -> int:
        return int.from_bytes(hashlib.blake2b(uri.encode("utf-8", "surrogatepass"), digest_size=8).digest())

    def keep_new(self, table: pa.Table) -> pa.Table:
        """The rows of images not seen in an earlier part (all rows of one image stay together)."""
        hashes = [self._hash(uri) for uri in table.column("uri").to_pylist()]
        keep = [h not in self._hashes for h in hashes]
        self._hashes.update(hashes)
        return table if all(keep) else table.filter(pa.array(keep))

    def __len__(self) -> int:
        return len(self._hashes)


class _IndexWriter:
    """Buffers rows into row groups and rolls over to a new file every ``target_rows`` rows."""

    def __init__(self, storage: Storage, output_root: str, job_id: str, target_rows: int, workdir: Path) -> None:
        self.storage, self.output_root, self.job_id = storage, output_root, job_id
        self.target_rows, self.workdir = target_rows, workdir
        self.uris: list[str] = []
        self._buffer: list[pa.Table] = []
        self._buffered_rows = self._buffered_bytes = 0
        self._writer: pq.ParquetWriter | None = None
        self._file_rows = self._file_bytes = 0

    def add(self, table: pa.Table) -> None:
        """Append rows; a file never holds more than ``target_rows``."""
        while table.num_rows:
            room = self.target_rows - self._file_rows - self._buffered_rows
            head, table = table.slice(0, room), table.slice(room)
            self._buffer.append(head)
            self._buffered_rows += head.num_rows
            self._buffered_bytes += head.nbytes
            file_full = self._file_rows + self._buffered_rows >= self.target_rows
            if file_full or self._buffered_rows >= ROW_GROUP_ROWS or self._buffered_bytes >= ROW_GROUP_BYTES:
                self._write_row_group()

    def _write_row_group(self) -> None:
        if not self._buffer:
            return
        group = pa.concat_tables(self._buffer).combine_chunks()
        self._buffer, self._buffered_rows, self._buffered_bytes = [], 0, 0
        if self._writer is None:
            self._writer = pq.ParquetWriter(self._path, RESULTS_SCHEMA, compression=PARQUET_COMPRESSION)
        self._writer.write_table(group, row_group_size=group.num_rows)
        self._file_rows += group.num_rows
        self._file_bytes += group.nbytes
        if self._file_rows >= self.target_rows or self._file_bytes >= MAX_FILE_BYTES:
            self._upload_file()

    @property
    def _path(self) -> Path:
        return self.workdir / "current.parquet"

    def _upload_file(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._writer, self._file_rows, self._file_bytes = None, 0, 0
        uri = index_file_uri(self.output_root, self.job_id, len(self.uris))
        self.storage.write_bytes(uri, self._path.read_bytes(), "application/vnd.apache.parquet")
        self._path.unlink()
        self.uris.append(uri)

    def finish(self) -> list[str]:
        """Write what is buffered; an index with no rows still gets one (empty) file with the schema."""
        self._write_row_group()
        self._upload_file()
        if not self.uris:
            uri = index_file_uri(self.output_root, self.job_id, 0)
            self.storage.write_bytes(uri, table_to_parquet(RESULTS_SCHEMA.empty_table()))
            self.uris.append(uri)
        return self.uris


def _empty_stale_files(storage: Storage, output_root: str, job_id: str, written: list[str]) -> list[str]:
    """Files of an earlier, larger compaction are overwritten with empty ones (storage has no delete)."""
    empty = table_to_parquet(RESULTS_SCHEMA.empty_table())
    written_names = {uri.rsplit("/", 1)[-1] for uri in written}
    stale: list[str] = []
    for info in storage.list_objects(index_dir_uri(output_root, job_id)):
        is_stale = _INDEX_FILE.fullmatch(info.relative_key) and info.relative_key not in written_names
        if is_stale and info.size != len(empty):
            storage.write_bytes(info.uri, empty, "application/vnd.apache.parquet")
            stale.append(info.uri)
    return stale


def compact_index(storage: Storage, output_root: str, job_id: str, target_rows: int = 1_000_000) -> IndexSummary:
    """Read every part of a job and write ``<job dir>/index/part-00000.parquet, ...``; a rerun replaces them."""
    if target_rows < 1:
        raise ValueError(f"target_rows must be at least 1, got {target_rows}")
    summary = IndexSummary(job_id=job_id)
    seen = _SeenImages()
    with tempfile.TemporaryDirectory(prefix="sam3-index-") as workdir:
        writer = _IndexWriter(storage, output_root, job_id, target_rows, Path(workdir))
        for info in _list_parts(storage, output_root, job_id):
            table = _read_part(storage, info)
            kept = seen.keep_new(table)
            summary.parts_read += 1
            summary.duplicate_rows_dropped += table.num_rows - kept.num_rows
            summary.rows += kept.num_rows
            summary.instances += _instances(kept)
            writer.add(kept)
        summary.uris = writer.finish()
    summary.files_written = len(summary.uris)
    summary.images = len(seen)
    summary.stale_files_emptied = _empty_stale_files(storage, output_root, job_id, summary.uris)
    return summary

