"""S3 Inventory manifests (CSV.gz and Parquet, in SeaweedFS S3) as an input source."""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import quote_plus

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sam3_batch.contracts.errors import BadUriError, ItemError
from sam3_batch.contracts.jobstate_memory import MemoryJobStore
from sam3_batch.contracts.schemas import ChunkMessage, JobSpec
from sam3_batch.contracts.storage import Storage
from sam3_batch.producer.feed import run_producer
from sam3_batch.producer.inputs import open_source
from sam3_batch.producer.inventory import InventorySource, inventory_position
from sam3_batch.producer.sources import PrefixSource, SourceItem, SourceProblem

CSV_SCHEMA = "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, LastModifiedDate, ETag"
MANIFEST_KEY = "inventory/src/daily/2026-01-01T01-00Z/manifest.json"

# (key, is_latest, is_delete_marker), split over two data files; ``photos/`` is the prefix the tests take.
FILE_ROWS = [
    [
        ("photos/a.jpg", True, False),
        ("photos/notes.txt", True, False),  # not an image
        ("photos/sub/b.PNG", True, False),
        ("other/c.jpg", True, False),  # outside the prefix
        ("photos/old.jpg", False, False),  # a non-current version
    ],
    [
        ("photos/gone.jpg", True, True),  # a delete marker
        ("photos/my dog+1.jpg", True, False),  # CSV encodes it as photos/my+dog%2B1.jpg
        ("photos-archive/d.jpg", True, False),  # shares the string prefix, not the folder
        ("photos/ünï.webp", True, False),
    ],
]
EXPECTED_UNDER_PHOTOS = {
    "photos/a.jpg": "a.jpg",
    "photos/sub/b.PNG": "sub/b.PNG",
    "photos/my dog+1.jpg": "my dog+1.jpg",
    "photos/ünï.webp": "ünï.webp",
}


def _csv_gz(bucket: str, rows: list[tuple[str, bool, bool]]) -> bytes:
    text = io.StringIO()
    writer = csv.writer(text, quoting=csv.QUOTE_ALL, lineterminator="\n")
    for key, latest, deleted in rows:
        writer.writerow([bucket, quote_plus(key, safe="/"), "v1", str(latest).lower(), str(deleted).lower(), "70",
                         "2026-01-01T00:00:00.000Z", "0123abcd"])
    return gzip.compress(text.getvalue().encode())


def _parquet(bucket: str, rows: list[tuple[str, bool, bool]]) -> bytes:
    table = pa.table({
        "bucket": [bucket] * len(rows), "key": [r[0] for r in rows], "version_id": ["v1"] * len(rows),
        "is_latest": [r[1] for r in rows], "is_delete_marker": [r[2] for r in rows], "size": [70] * len(rows),
    })
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


InventoryWriter = Callable[..., str]


@pytest.fixture
def write_inventory(s3_client: Any, s3_bucket: str) -> InventoryWriter:
    """``write(fmt, file_rows=FILE_ROWS, **manifest_overrides) -> manifest URI``: an inventory of ``s3_bucket``
    written, as S3 writes one, to a separate destination bucket."""
    destination = f"{s3_bucket}-inventory"
    s3_client.create_bucket(Bucket=destination)

    def write(fmt: str, file_rows: list[list[tuple[str, bool, bool]]] = FILE_ROWS, **overrides: Any) -> str:
        files = []
        for index, rows in enumerate(file_rows):
            csv_file = fmt == "CSV"
            suffix, data = ("csv.gz", _csv_gz(s3_bucket, rows)) if csv_file else ("parquet", _parquet(s3_bucket, rows))
            key = f"inventory/src/daily/data/part-{index}.{suffix}"
            s3_client.put_object(Bucket=destination, Key=key, Body=data)
            files.append({"key": key, "size": len(data), "MD5checksum": "unused"})
        manifest = {
            "sourceBucket": s3_bucket, "destinationBucket": f"arn:aws:s3:::{destination}", "version": "2016-11-30",
            "creationTimestamp": "1767229200000", "fileFormat": fmt,
            "fileSchema": CSV_SCHEMA if fmt == "CSV" else "message s3.inventory { required binary key; }",
            "files": files, **overrides,
        }
        s3_client.put_object(Bucket=destination, Key=MANIFEST_KEY, Body=json.dumps(manifest).encode())
        return f"s3://{destination}/{MANIFEST_KEY}"

    return write


def _items(source: Any, start_after: str | None = None) -> list[SourceItem]:
    entries = list(source.entries(start_after))
    assert all(isinstance(e, SourceItem) for e in entries), entries
    return entries


@pytest.mark.parametrize("fmt", ["CSV", "Parquet"])
def test_inventory_yields_current_images_under_the_prefix_with_keys_relative_to_it(
    fmt: str, write_inventory: InventoryWriter, settings_factory: Any, s3_bucket: str,
) -> None:
    storage = Storage(settings_factory())
    source = InventorySource(storage, write_inventory(fmt), prefix="photos")

    items = _items(source)

    assert [i.uri for i in items] == [f"s3://{s3_bucket}/{key}" for key in EXPECTED_UNDER_PHOTOS]
    assert [i.out_key for i in items] == list(EXPECTED_UNDER_PHOTOS.values())
    assert [i.position for i in items] == [inventory_position(0, 0), inventory_position(0, 2),
                                           inventory_position(1, 1), inventory_position(1, 3)]


@pytest.mark.parametrize("fmt", ["CSV", "Parquet"])
def test_resuming_after_any_position_yields_exactly_the_rest(
    fmt: str, write_inventory: InventoryWriter, settings_factory: Any,
) -> None:
    source = InventorySource(Storage(settings_factory()), write_inventory(fmt), prefix="photos/")
    everything = _items(source)
    positions = [i.position for i in everything]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)

    for index, item in enumerate(everything):
        assert _items(source, item.position) == everything[index + 1:]
    # A position of a row that was filtered out (the delete marker, file 1 row 0) resumes just after it too.
    assert _items(source, inventory_position(1, 0)) == everything[2:]


def test_inventory_and_a_listing_of_the_same_prefix_give_the_same_items(
    write_inventory: InventoryWriter, settings_factory: Any, s3_client: Any, s3_bucket: str,
) -> None:
    for rows in FILE_ROWS:
        for key, latest, deleted in rows:
            if latest and not deleted:
                s3_client.put_object(Bucket=s3_bucket, Key=key, Body=b"x")
    storage = Storage(settings_factory())

    from_inventory = _items(InventorySource(storage, write_inventory("CSV"), prefix=f"s3://{s3_bucket}/photos"))
    listed = _items(PrefixSource(storage, f"s3://{s3_bucket}/photos"))

    assert {(i.uri, i.out_key) for i in from_inventory} == {(i.uri, i.out_key) for i in listed}


def test_open_source_routes_an_inventory_manifest_given_as_manifest_or_as_the_only_input(
    write_inventory: InventoryWriter, settings_factory: Any, s3_bucket: str,
) -> None:
    storage = Storage(settings_factory())
    manifest = write_inventory("Parquet")

    with_prefix = open_source(storage, [f"s3://{s3_bucket}/photos/"], manifest=manifest)
    whole = open_source(storage, [manifest])

    assert isinstance(with_prefix, InventorySource) and isinstance(whole, InventorySource)
    assert [i.out_key for i in _items(with_prefix)] == list(EXPECTED_UNDER_PHOTOS.values())
    assert {i.out_key for i in _items(whole)} == {
        "photos/a.jpg", "photos/sub/b.PNG", "other/c.jpg", "photos/my dog+1.jpg", "photos-archive/d.jpg",
        "photos/ünï.webp",
    }


class CollectingDispatcher:
    """Takes every chunk the producer sends, never full."""

    def __init__(self) -> None:
        self.chunks: list[ChunkMessage] = []

    def wait_for_room(self, should_stop: Callable[[], bool]) -> None:
        """Never blocks."""

    def send(self, chunk: ChunkMessage) -> None:
        self.chunks.append(chunk)


def test_producer_enqueues_each_inventory_image_once_and_counts_them(
    write_inventory: InventoryWriter, settings_factory: Any, s3_bucket: str,
) -> None:
    storage = Storage(settings_factory())
    source = open_source(storage, ["photos"], manifest=write_inventory("CSV"))
    spec = JobSpec(job_id="inventory-job", prompts=["dog"], output_root=f"s3://{s3_bucket}/out")
    store, dispatcher = MemoryJobStore(), CollectingDispatcher()
    store.create(spec)

    summary = run_producer(spec, source, store, storage, dispatcher, chunk_size=3)

    sent = [item.uri for chunk in dispatcher.chunks for item in chunk.items]
    assert sorted(sent) == sorted(f"s3://{s3_bucket}/{key}" for key in EXPECTED_UNDER_PHOTOS)
    assert summary.listing_complete and summary.chunks_sent == 2
    assert store.counters(spec.job_id).total == len(EXPECTED_UNDER_PHOTOS)


def test_an_unreadable_csv_row_becomes_a_problem_and_the_rest_still_flow(
    write_inventory: InventoryWriter, settings_factory: Any, s3_client: Any, s3_bucket: str,
) -> None:
    manifest = write_inventory("CSV")
    bad = gzip.compress(b'"only","three","fields"\n' + gzip.decompress(_csv_gz(s3_bucket, FILE_ROWS[1])))
    s3_client.put_object(Bucket=f"{s3_bucket}-inventory", Key="inventory/src/daily/data/part-1.csv.gz", Body=bad)

    entries = list(InventorySource(Storage(settings_factory()), manifest, prefix="photos").entries(None))

    problems = [e for e in entries if isinstance(e, SourceProblem)]
    assert [(p.position, p.reason) for p in problems] == [
        (inventory_position(1, 0), "unreadable inventory row: expected 8 CSV fields, got 3")]
    assert [e.out_key for e in entries if isinstance(e, SourceItem)] == list(EXPECTED_UNDER_PHOTOS.values())


@pytest.mark.parametrize(
    ("overrides", "prefix", "error", "message"),
    [
        ({"fileFormat": "ORC"}, "", ItemError, "'ORC' is not supported"),
        ({"files": "not a list"}, "", ItemError, "not an S3 Inventory manifest"),
        ({}, "s3://another-bucket/photos", BadUriError, "not the inventory's source bucket"),
    ],
)
def test_a_manifest_the_source_cannot_use_is_refused_with_the_reason(
    overrides: dict[str, Any], prefix: str, error: type[Exception], message: str,
    write_inventory: InventoryWriter, settings_factory: Any,
) -> None:
    source = InventorySource(Storage(settings_factory()), write_inventory("CSV", **overrides), prefix=prefix)

    with pytest.raises(error, match=message):
        list(source.entries(None))
