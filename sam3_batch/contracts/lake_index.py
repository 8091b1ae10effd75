"""Compacts a job's per-chunk Parquet parts into a few large files (``pyarrow.dataset.write_dataset``).

Run automatically when a job completes (``report.finalize_if_complete``) and by ``sam3-batch index``.
Idempotent: file names are deterministic, a rerun replaces them, and files an earlier, larger run left
behind are emptied (storage has no delete). One row per image: a done row beats a failed row of the same
image (a retry that succeeded), and an image a redelivered chunk wrote twice is kept once. Each part is
read once (one GET: in the chunk layout the parts are the shards); failed rows are written after the done
ones. Memory holds one row group per open file, an 8-byte hash per image and the failed rows (no
instances); each file is uploaded as soon as it is complete.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from sam3_batch.contracts.errors import Sam3BatchError
from sam3_batch.contracts.lake import (
    PARQUET_COMPRESSION,
    PARQUET_CONTENT_TYPE,
    PARTITION_COLUMNS,
    RESULTS_SCHEMA,
    table_to_parquet,
)
from sam3_batch.contracts.layout import PARQUET_SUFFIX, JobLayout, join_uri
from sam3_batch.contracts.prompt_tally import PromptTally
from sam3_batch.contracts.storage import ObjectInfo, Storage

ROW_GROUP_ROWS = 10_000  # rows carry masks (RLE strings): a few KB each


class IndexPartError(Sam3BatchError):
    """A part could not be read as results of this project's schema."""


@dataclass
class IndexSummary:
    """What a compaction read and wrote."""

    job_id: str
    parts_read: int = 0
    images: int = 0
    done: int = 0
    failed: int = 0
    instances: int = 0
    duplicate_rows_dropped: int = 0
    files_written: int = 0
    index_dir: str = ""
    model_commits: list[str] = field(default_factory=list)  # distinct resolved commits the rows name
    uris: list[str] = field(default_factory=list)
    stale_files_emptied: list[str] = field(default_factory=list)
    prompts: PromptTally = field(default_factory=PromptTally)

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready dict (for ``sam3-batch index --json``)."""
        return {**self.__dict__, "prompts": self.prompts.counts().model_dump()}


def _hash(out_key: str) -> int:
    return int.from_bytes(hashlib.blake2b(out_key.encode("utf-8", "surrogatepass"), digest_size=8).digest())


def _read_part(storage: Storage, info: ObjectInfo, columns: Sequence[str] | None = None) -> pa.Table:
    try:
        table = pq.read_table(pa.BufferReader(storage.read_bytes(info.uri)), columns=columns)
        if columns is not None:
            return table
        return table.select(RESULTS_SCHEMA.names).cast(RESULTS_SCHEMA)
    except (pa.ArrowException, KeyError, ValueError) as exc:
        raise IndexPartError(f"{info.uri}: not a results part ({exc})") from exc


def _list_parts(storage: Storage, layout: JobLayout) -> list[ObjectInfo]:
    return [
        info for info in storage.list_objects(layout.parts_dir)
        if info.relative_key.endswith(PARQUET_SUFFIX) and "/" not in info.relative_key
    ]


class _Deduplicator:
    """Keeps one row per image: its first done row, else its first failed row.

    Done rows go out as their part is read; failed rows (few, and small: no instances) wait until every
    part was read, since a later part may hold the same image done (a retry). So each part is read once.
    """

    def __init__(self) -> None:
        self._done: set[int] = set()
        self._failed: list[pa.Table] = []

    def done_rows(self, table: pa.Table) -> pa.Table:
        """The part's done rows of images not seen done before; its failed rows are held back."""
        is_done = pc.equal(table.column("status"), "done")
        self._failed.append(table.filter(pc.invert(is_done)))
        done = table.filter(is_done)
        mask = [self._first(self._done, _hash(key)) for key in done.column("out_key").to_pylist()]
        return done if all(mask) else done.filter(pa.array(mask, pa.bool_()))

    def failed_rows(self) -> pa.Table:
        """The held failed rows of images that never had a done row, one per image."""
        failed = pa.concat_tables(self._failed) if self._failed else RESULTS_SCHEMA.empty_table()
        self._failed = []
        seen: set[int] = set()
        mask = [
            _hash(key) not in self._done and self._first(seen, _hash(key))
            for key in failed.column("out_key").to_pylist()
        ]
        return failed.filter(pa.array(mask, pa.bool_()))

    @staticmethod
    def _first(seen: set[int], digest: int) -> bool:
        if digest in seen:
            return False
        seen.add(digest)
        return True


@dataclass
class _Target:
    """Where the compacted files go and how they are named."""

    storage: Storage
    base_uri: str
    prefix: str  # file name prefix: empty in the job's own index dir, the job id in a shared lake folder

    @property
    def template(self) -> str:
        return f"{self.prefix}part-{{i}}{PARQUET_SUFFIX}"

    def pattern(self) -> re.Pattern[str]:
        return re.compile(rf"(?:.*/)?{re.escape(self.prefix)}part-\d+{re.escape(PARQUET_SUFFIX)}")


def _count(kept: pa.Table, summary: IndexSummary) -> Iterator[pa.RecordBatch]:
    summary.images += kept.num_rows
    done = int(pc.sum(pc.equal(kept.column("status"), "done")).as_py() or 0)
    summary.done += done
    summary.failed += kept.num_rows - done
    summary.instances += int(pc.sum(kept.column("instance_count")).as_py() or 0)
    summary.prompts.add(kept)
    for commit in pc.unique(kept.column("model_commit").drop_null()).to_pylist():
        if commit not in summary.model_commits:
            summary.model_commits.append(commit)
    yield from kept.to_batches()


def _batches(storage: Storage, parts: list[ObjectInfo], dedup: _Deduplicator,
             summary: IndexSummary) -> Iterator[pa.RecordBatch]:
    """Every part read once (one GET each): done rows as they come, then the failed rows left."""
    rows_read = 0
    for info in parts:
        table = _read_part(storage, info)
        summary.parts_read += 1
        rows_read += table.num_rows
        yield from _count(dedup.done_rows(table), summary)
    yield from _count(dedup.failed_rows(), summary)
    summary.duplicate_rows_dropped = rows_read - summary.images


def _write(target: _Target, batches: Iterator[pa.RecordBatch], partition_by: Sequence[str],
           max_rows_per_file: int) -> list[str]:
    written: list[str] = []
    with tempfile.TemporaryDirectory(prefix="sam3-index-") as workdir:

        def upload(file: ds.WrittenFile) -> None:  # as soon as a file is complete: disk holds one file at a time
            path = Path(file.path)
            uri = join_uri(target.base_uri, path.relative_to(workdir).as_posix())
            target.storage.write_bytes(uri, path.read_bytes(), PARQUET_CONTENT_TYPE)
            path.unlink()
            written.append(uri)

        ds.write_dataset(
            batches, workdir, schema=RESULTS_SCHEMA, format="parquet", basename_template=target.template,
            partitioning=list(partition_by) or None, partitioning_flavor="hive" if partition_by else None,
            max_rows_per_file=max_rows_per_file, max_rows_per_group=min(ROW_GROUP_ROWS, max_rows_per_file),
            min_rows_per_group=min(ROW_GROUP_ROWS, max_rows_per_file), preserve_order=True,
            file_options=ds.ParquetFileFormat().make_write_options(compression=PARQUET_COMPRESSION),
            file_visitor=upload, existing_data_behavior="overwrite_or_ignore",
        )
    if not written:  # an index with no rows still gets one file, so readers see the schema
        uri = join_uri(target.base_uri, target.template.format(i=0))
        target.storage.write_bytes(uri, table_to_parquet(RESULTS_SCHEMA.empty_table()), PARQUET_CONTENT_TYPE)
        written.append(uri)
    return sorted(written)


def _empty_stale_files(target: _Target, written: list[str]) -> list[str]:
    """Files of an earlier, larger compaction are overwritten with empty ones (storage has no delete)."""
    empty = table_to_parquet(RESULTS_SCHEMA.empty_table())
    pattern, kept = target.pattern(), set(written)
    stale: list[str] = []
    for info in target.storage.list_objects(target.base_uri):
        if pattern.fullmatch(info.relative_key) and info.uri not in kept and info.size != len(empty):
            target.storage.write_bytes(info.uri, empty, PARQUET_CONTENT_TYPE)
            stale.append(info.uri)
    return stale


def compact_index(
    storage: Storage, output_root: str, job_id: str, *, max_rows_per_file: int = 1_000_000,
    partition_by: Sequence[str] = (), dest: str | None = None,
) -> IndexSummary:
    """Compact a job's parts into ``<job dir>/index/`` (or ``dest``, a shared lake folder); reruns replace.

    ``partition_by`` names columns (of ``PARTITION_COLUMNS``) for hive-style folders such as
    ``status=done/``. In ``dest`` the files are named ``<job_id>-part-N.parquet`` so jobs never collide.
    """
    if max_rows_per_file < 1:
        raise ValueError(f"max_rows_per_file must be at least 1, got {max_rows_per_file}")
    unknown = [c for c in partition_by if c not in PARTITION_COLUMNS]
    if unknown:
        raise ValueError(f"cannot partition by {', '.join(unknown)}: choose from {', '.join(PARTITION_COLUMNS)}")
    layout = JobLayout(output_root, job_id)
    target = _Target(storage, dest or layout.index_dir, f"{job_id}-" if dest else "")
    summary = IndexSummary(job_id=job_id, index_dir=target.base_uri)
    parts = _list_parts(storage, layout)
    dedup = _Deduplicator()
    summary.uris = _write(target, _batches(storage, parts, dedup, summary), partition_by, max_rows_per_file)
    summary.files_written = len(summary.uris)
    summary.stale_files_emptied = _empty_stale_files(target, summary.uris)
    return summary
