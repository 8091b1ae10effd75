"""Local filesystem storage (file:// URIs and plain paths) and the scheme router."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sam3_batch.contracts.errors import BadUriError, NotFoundError
from sam3_batch.contracts.settings import Settings
from sam3_batch.contracts.storage import Storage
from sam3_batch.contracts.storage.local import TMP_SUFFIX


@pytest.fixture
def storage() -> Storage:
    return Storage(Settings())


def _keys(storage: Storage, prefix: str, start_after: str | None = None) -> list[str]:
    return [info.relative_key for info in storage.list_objects(prefix, start_after)]


def test_bytes_written_to_a_plain_path_read_back_through_a_file_uri(storage: Storage, tmp_path: Path) -> None:
    storage.write_bytes(str(tmp_path / "a.bin"), b"\x00payload\xff")

    assert storage.read_bytes(f"file://{tmp_path}/a.bin") == b"\x00payload\xff"
    assert (tmp_path / "a.bin").read_bytes() == b"\x00payload\xff"


def test_write_creates_missing_parent_directories(storage: Storage, tmp_path: Path) -> None:
    storage.write_bytes(f"file://{tmp_path}/x/y/z/meta.json", b"{}", "application/json")

    assert (tmp_path / "x" / "y" / "z" / "meta.json").read_bytes() == b"{}"


def test_rewriting_an_object_replaces_it(storage: Storage, tmp_path: Path) -> None:
    uri = str(tmp_path / "k")
    storage.write_bytes(uri, b"first, longer content")
    storage.write_bytes(uri, b"second")

    assert storage.read_bytes(uri) == b"second"


def test_a_failed_write_keeps_the_old_object_and_leaves_no_temp_file(
    storage: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = str(tmp_path / "meta.json")
    storage.write_bytes(uri, b"old")

    def crash(src: object, dst: object) -> None:
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        storage.write_bytes(uri, b"new")

    assert storage.read_bytes(uri) == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]


def test_reading_a_missing_file_raises_not_found(storage: Storage, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no such file"):
        storage.read_bytes(str(tmp_path / "missing.jpg"))


def test_reading_a_directory_raises_not_found(storage: Storage, tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()

    with pytest.raises(NotFoundError):
        storage.read_bytes(f"file://{tmp_path}/d")


def test_exists_is_true_only_for_files(storage: Storage, tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    storage.write_bytes(str(tmp_path / "f"), b"1")

    assert storage.exists(str(tmp_path / "f"))
    assert not storage.exists(str(tmp_path / "d"))
    assert not storage.exists(str(tmp_path / "nope"))


def test_listing_is_recursive_and_in_s3_key_order(storage: Storage, tmp_path: Path) -> None:
    # 'a-b' sorts before 'a/...' ('-' < '/'), as S3 orders keys; a naive sorted walk gets this wrong.
    keys = ["a/x", "a-b", "a/b/c", "b", "B", "a0", "z/é", "z/e", "z/ü/1"]
    for key in keys:
        storage.write_bytes(f"{tmp_path}/{key}", key.encode())

    assert _keys(storage, f"file://{tmp_path}") == sorted(keys)


def test_listing_reports_sizes_and_readable_uris(storage: Storage, tmp_path: Path) -> None:
    storage.write_bytes(f"{tmp_path}/in/one.jpg", b"12345")

    [info] = list(storage.list_objects(f"file://{tmp_path}/in/"))

    assert (info.relative_key, info.size) == ("one.jpg", 5)
    assert info.uri == f"file://{tmp_path}/in/one.jpg"
    assert storage.read_bytes(info.uri) == b"12345"


def test_listing_starts_strictly_after_start_after(storage: Storage, tmp_path: Path) -> None:
    keys = ["a/1", "a/2", "b/1", "b/2/x", "c"]
    for key in keys:
        storage.write_bytes(f"{tmp_path}/{key}", b"")

    assert _keys(storage, str(tmp_path), start_after="a/2") == ["b/1", "b/2/x", "c"]
    assert _keys(storage, str(tmp_path), start_after="b/1") == ["b/2/x", "c"]
    assert _keys(storage, str(tmp_path), start_after="b/15") == ["b/2/x", "c"]
    assert _keys(storage, str(tmp_path), start_after="c") == []


def test_listing_is_a_lazy_stream(storage: Storage, tmp_path: Path) -> None:
    storage.write_bytes(f"{tmp_path}/a/1", b"")
    storage.write_bytes(f"{tmp_path}/c/1", b"")
    listing = storage.list_objects(str(tmp_path))

    assert next(listing).relative_key == "a/1"
    storage.write_bytes(f"{tmp_path}/c/2", b"")  # directory c has not been read yet

    assert [info.relative_key for info in listing] == ["c/1", "c/2"]


def test_listing_skips_temp_files_of_writes_in_flight(storage: Storage, tmp_path: Path) -> None:
    storage.write_bytes(f"{tmp_path}/done.json", b"{}")
    (tmp_path / f".half.json.0123{TMP_SUFFIX}").write_bytes(b"{")

    assert _keys(storage, str(tmp_path)) == ["done.json"]


def test_listing_a_missing_directory_yields_nothing(storage: Storage, tmp_path: Path) -> None:
    assert _keys(storage, f"{tmp_path}/never-created") == []


def test_keys_with_spaces_and_unicode_round_trip(storage: Storage, tmp_path: Path) -> None:
    key = "photos 2024/été/猫 #1 %20.jpg"
    storage.write_bytes(f"file://{tmp_path}/{key}", b"meow")

    assert storage.read_bytes(f"file://{tmp_path}/{key}") == b"meow"
    assert _keys(storage, f"file://{tmp_path}") == [key]


def test_file_uri_with_a_remote_host_is_rejected(storage: Storage) -> None:
    with pytest.raises(BadUriError, match="remote host"):
        storage.read_bytes("file://fileserver/share/a.jpg")


def test_file_uri_with_localhost_authority_is_a_local_path(storage: Storage, tmp_path: Path) -> None:
    storage.write_bytes(str(tmp_path / "a"), b"1")

    assert storage.read_bytes(f"file://localhost{tmp_path}/a") == b"1"


@pytest.mark.parametrize("uri", ["gs://bucket/key", "ftp://host/file", "S4://x/y"])
def test_unknown_schemes_are_rejected_naming_the_scheme(storage: Storage, uri: str) -> None:
    scheme = uri.split("://")[0].lower()

    with pytest.raises(BadUriError, match=f"unsupported URI scheme '{scheme}'"):
        storage.read_bytes(uri)


def test_an_empty_uri_is_rejected(storage: Storage) -> None:
    with pytest.raises(BadUriError, match="empty"):
        storage.exists("")
