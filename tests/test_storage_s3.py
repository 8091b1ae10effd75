"""S3 storage against a SeaweedFS server over HTTP (through the real boto3/botocore stack)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import pytest

from sam3_batch.contracts.errors import BadUriError, NotFoundError
from sam3_batch.contracts.settings import Settings
from sam3_batch.contracts.storage import Storage
from sam3_batch.contracts.storage.s3 import S3Backend
from tests.fixtures.faulty_proxy import FaultyProxy

SettingsFactory = Callable[..., Settings]


@pytest.fixture
def storage(settings_factory: SettingsFactory) -> Storage:
    return Storage(settings_factory())


def _put_many(s3_client: Any, bucket: str, keys: list[str]) -> None:
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda key: s3_client.put_object(Bucket=bucket, Key=key, Body=b"x"), keys))


def _keys(storage: Storage, prefix: str, start_after: str | None = None) -> list[str]:
    return [info.relative_key for info in storage.list_objects(prefix, start_after)]


def test_bytes_round_trip_with_their_content_type(storage: Storage, s3_bucket: str, s3_client: Any) -> None:
    storage.write_bytes(f"s3://{s3_bucket}/out/a.json", b'{"ok": true}', "application/json")

    assert storage.read_bytes(f"s3://{s3_bucket}/out/a.json") == b'{"ok": true}'
    head = s3_client.head_object(Bucket=s3_bucket, Key="out/a.json")
    assert head["ContentType"] == "application/json"


def test_exists_reports_present_and_absent_objects(storage: Storage, s3_bucket: str) -> None:
    storage.write_bytes(f"s3://{s3_bucket}/here", b"1")

    assert storage.exists(f"s3://{s3_bucket}/here")
    assert not storage.exists(f"s3://{s3_bucket}/not-here")


def test_a_missing_key_raises_not_found_naming_the_uri(storage: Storage, s3_bucket: str) -> None:
    with pytest.raises(NotFoundError, match=f"s3://{s3_bucket}/nope.jpg: NoSuchKey"):
        storage.read_bytes(f"s3://{s3_bucket}/nope.jpg")


def test_a_missing_bucket_raises_not_found(storage: Storage) -> None:
    with pytest.raises(NotFoundError, match="NoSuchBucket"):
        storage.read_bytes("s3://no-such-bucket-here/a.jpg")


@pytest.mark.parametrize("uri", ["s3://", "s3:///key", "s3://bucket", "s3://bucket/dir/"])
def test_uris_that_name_no_object_are_rejected(storage: Storage, uri: str) -> None:
    with pytest.raises(BadUriError):
        storage.read_bytes(uri)


def test_keys_with_spaces_and_unicode_round_trip_and_list(storage: Storage, s3_bucket: str) -> None:
    key = "photos 2024/été/猫 #1 %20+plus?.jpg"
    storage.write_bytes(f"s3://{s3_bucket}/{key}", b"meow")

    assert storage.read_bytes(f"s3://{s3_bucket}/{key}") == b"meow"
    assert _keys(storage, f"s3://{s3_bucket}") == [key]


def test_listing_order_matches_the_local_backend_and_aws(
    settings_factory: SettingsFactory, moto_reference_s3: str, tmp_path: Path
) -> None:
    # moto, not SeaweedFS: this checks the local backend against AWS's UTF-8 binary key order.
    storage = Storage(settings_factory(s3_endpoint_url=moto_reference_s3))
    boto3.session.Session().client("s3", endpoint_url=moto_reference_s3).create_bucket(Bucket="order")
    keys = ["a/x", "a-b", "a/b/c", "b", "B", "a0", "z/é", "z/e", "z/ü/1", "sp ace/1"]
    for key in keys:
        storage.write_bytes(f"s3://order/root/{key}", b"")
        storage.write_bytes(f"{tmp_path}/root/{key}", b"")

    s3_keys = _keys(storage, "s3://order/root/")
    assert s3_keys == sorted(keys)
    assert s3_keys == _keys(storage, f"file://{tmp_path}/root/")


def test_start_after_resumes_in_the_servers_own_listing_order(storage: Storage, s3_bucket: str) -> None:
    # SeaweedFS lists folder by folder ('a/x' before 'a-b', unlike AWS): resuming must follow that order.
    keys = ["a/x", "a-b", "a/b/c", "a.jpg", "a0", "B", "z/é", "z/e"]
    for key in keys:
        storage.write_bytes(f"s3://{s3_bucket}/root/{key}", b"")

    listed = _keys(storage, f"s3://{s3_bucket}/root/")

    assert sorted(listed) == sorted(keys)
    for index, key in enumerate(listed):
        assert _keys(storage, f"s3://{s3_bucket}/root/", start_after=key) == listed[index + 1 :], key


def test_listing_reports_sizes_and_readable_uris(storage: Storage, s3_bucket: str) -> None:
    storage.write_bytes(f"s3://{s3_bucket}/in/one.jpg", b"12345")

    [info] = list(storage.list_objects(f"s3://{s3_bucket}/in"))

    assert (info.uri, info.relative_key, info.size) == (f"s3://{s3_bucket}/in/one.jpg", "one.jpg", 5)
    assert storage.read_bytes(info.uri) == b"12345"


def test_a_prefix_is_a_folder_not_a_string_prefix(storage: Storage, s3_bucket: str, s3_client: Any) -> None:
    _put_many(s3_client, s3_bucket, ["img/1.jpg", "img2/2.jpg", "img/sub/3.jpg"])

    assert _keys(storage, f"s3://{s3_bucket}/img") == ["1.jpg", "sub/3.jpg"]


def test_folder_markers_are_not_listed(storage: Storage, s3_bucket: str, s3_client: Any) -> None:
    _put_many(s3_client, s3_bucket, ["in/", "in/sub/", "in/sub/a.jpg"])

    assert _keys(storage, f"s3://{s3_bucket}/in/") == ["sub/a.jpg"]


def test_listing_starts_strictly_after_start_after(storage: Storage, s3_bucket: str, s3_client: Any) -> None:
    _put_many(s3_client, s3_bucket, ["p/a/1", "p/a/2", "p/b/1", "p/c", "q/a"])

    assert _keys(storage, f"s3://{s3_bucket}/p", start_after="a/2") == ["b/1", "c"]
    assert _keys(storage, f"s3://{s3_bucket}/p", start_after="c") == []


def test_small_pages_are_followed_to_the_end(
    settings_factory: SettingsFactory, s3_bucket: str, s3_client: Any, faulty_s3: FaultyProxy
) -> None:
    keys = [f"many/{i:03d}.jpg" for i in range(30)]
    _put_many(s3_client, s3_bucket, keys)
    backend = S3Backend(settings_factory(s3_endpoint_url=faulty_s3.endpoint_url), page_size=7)

    listed = [info.relative_key for info in backend.list_objects(f"s3://{s3_bucket}/many/")]

    assert listed == [key.removeprefix("many/") for key in keys]
    assert faulty_s3.count("GET", s3_bucket, query_contains="list-type=2") == 5  # ceil(30 / 7) pages


def test_more_than_a_thousand_keys_are_listed_across_server_pages(
    settings_factory: SettingsFactory, s3_bucket: str, s3_client: Any, faulty_s3: FaultyProxy
) -> None:
    keys = sorted(f"big/{i:05d}" for i in range(1005))
    _put_many(s3_client, s3_bucket, keys)
    storage = Storage(settings_factory(s3_endpoint_url=faulty_s3.endpoint_url))

    listed = _keys(storage, f"s3://{s3_bucket}/big/")

    assert listed == [key.removeprefix("big/") for key in keys]
    assert faulty_s3.count("GET", s3_bucket, query_contains="list-type=2") == 2


def test_listing_pages_are_fetched_lazily(
    settings_factory: SettingsFactory, s3_bucket: str, s3_client: Any, faulty_s3: FaultyProxy
) -> None:
    _put_many(s3_client, s3_bucket, [f"lazy/{i}" for i in range(10)])
    backend = S3Backend(settings_factory(s3_endpoint_url=faulty_s3.endpoint_url), page_size=3)

    listing = backend.list_objects(f"s3://{s3_bucket}/lazy/")
    next(listing)

    assert faulty_s3.count("GET", s3_bucket, query_contains="list-type=2") == 1


def test_one_storage_serves_many_threads_at_once(storage: Storage, s3_bucket: str) -> None:
    uris = [f"s3://{s3_bucket}/threads/{i}" for i in range(64)]

    def round_trip(uri: str) -> bytes:
        storage.write_bytes(uri, uri.encode())
        return storage.read_bytes(uri)

    with ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(round_trip, uris))

    assert results == [uri.encode() for uri in uris]
