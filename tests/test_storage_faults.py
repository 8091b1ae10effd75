"""S3 failures injected by a proxy in front of SeaweedFS: what is retried, what fails at once, what is said."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from sam3_batch.contracts.errors import ForbiddenError, NotFoundError, TransientError, is_transient, reason_of
from sam3_batch.contracts.settings import Settings
from sam3_batch.contracts.storage import Storage
from tests.fixtures.faulty_proxy import FaultyProxy
from tests.fixtures.services import free_port

SettingsFactory = Callable[..., Settings]
SENTINEL_SECRET = "SENTINEL-secret-key-0123456789abcdef"


@pytest.fixture
def storage(settings_factory: SettingsFactory, faulty_s3: FaultyProxy) -> Storage:
    settings = settings_factory(
        s3_endpoint_url=faulty_s3.endpoint_url, s3_retry_mode="standard", s3_max_attempts=3
    )
    return Storage(settings)


@pytest.mark.parametrize("kind", ["slowdown", "500", "reset"])
def test_a_put_that_fails_twice_succeeds_on_botos_third_attempt(
    storage: Storage, faulty_s3: FaultyProxy, s3_bucket: str, kind: str
) -> None:
    faulty_s3.add_fault("PUT", "/flaky.json", kind, times=2)  # type: ignore[arg-type]

    storage.write_bytes(f"s3://{s3_bucket}/flaky.json", b"{}")

    assert faulty_s3.count("PUT", "/flaky.json") == 3
    assert faulty_s3.count("PUT", "/flaky.json", faulted=True) == 2
    assert storage.read_bytes(f"s3://{s3_bucket}/flaky.json") == b"{}"


@pytest.mark.parametrize("kind", ["slowdown", "500", "reset"])
def test_a_get_that_fails_twice_succeeds_on_botos_third_attempt(
    storage: Storage, faulty_s3: FaultyProxy, s3_bucket: str, kind: str
) -> None:
    storage.write_bytes(f"s3://{s3_bucket}/img.jpg", b"jpeg bytes")
    faulty_s3.add_fault("GET", "/img.jpg", kind, times=2)  # type: ignore[arg-type]

    assert storage.read_bytes(f"s3://{s3_bucket}/img.jpg") == b"jpeg bytes"
    assert faulty_s3.count("GET", "/img.jpg") == 3
    assert faulty_s3.count("GET", "/img.jpg", faulted=True) == 2


def test_exists_survives_transient_failures(storage: Storage, faulty_s3: FaultyProxy, s3_bucket: str) -> None:
    storage.write_bytes(f"s3://{s3_bucket}/done.json", b"{}")
    faulty_s3.add_fault("HEAD", "/done.json", "slowdown", times=2)

    assert storage.exists(f"s3://{s3_bucket}/done.json")
    assert faulty_s3.count("HEAD", "/done.json") == 3


def test_listing_survives_a_transient_failure(storage: Storage, faulty_s3: FaultyProxy, s3_bucket: str) -> None:
    storage.write_bytes(f"s3://{s3_bucket}/in/a.jpg", b"1")
    faulty_s3.add_fault("GET", f"/{s3_bucket}", "500", times=1)

    assert [i.relative_key for i in storage.list_objects(f"s3://{s3_bucket}/in/")] == ["a.jpg"]


def test_a_throttled_request_that_never_recovers_raises_transient_after_max_attempts(
    storage: Storage, faulty_s3: FaultyProxy, s3_bucket: str
) -> None:
    faulty_s3.add_fault("GET", "/hot.jpg", "slowdown")

    with pytest.raises(TransientError, match="SlowDown") as caught:
        storage.read_bytes(f"s3://{s3_bucket}/hot.jpg")

    assert is_transient(caught.value)
    assert faulty_s3.count("GET", "/hot.jpg") == 3  # s3_max_attempts counts the first request


def test_access_denied_fails_at_once_with_forbidden(
    storage: Storage, faulty_s3: FaultyProxy, s3_bucket: str
) -> None:
    faulty_s3.add_fault("GET", "/secret.jpg", "403")

    with pytest.raises(ForbiddenError, match="AccessDenied") as caught:
        storage.read_bytes(f"s3://{s3_bucket}/secret.jpg")

    assert not is_transient(caught.value)
    assert faulty_s3.count("GET", "/secret.jpg") == 1


def test_access_denied_on_write_fails_at_once_with_forbidden(
    storage: Storage, faulty_s3: FaultyProxy, s3_bucket: str
) -> None:
    faulty_s3.add_fault("PUT", "/readonly/", "403")

    with pytest.raises(ForbiddenError):
        storage.write_bytes(f"s3://{s3_bucket}/readonly/a.json", b"{}")

    assert faulty_s3.count("PUT", "/readonly/") == 1


def test_access_denied_on_head_is_forbidden_not_absent(
    storage: Storage, faulty_s3: FaultyProxy, s3_bucket: str
) -> None:
    faulty_s3.add_fault("HEAD", "/locked.json", "403")

    with pytest.raises(ForbiddenError):
        storage.exists(f"s3://{s3_bucket}/locked.json")

    assert faulty_s3.count("HEAD", "/locked.json") == 1


def test_not_found_fails_at_once(storage: Storage, faulty_s3: FaultyProxy, s3_bucket: str) -> None:
    storage.write_bytes(f"s3://{s3_bucket}/gone.jpg", b"1")
    faulty_s3.add_fault("GET", "/gone.jpg", "404")

    with pytest.raises(NotFoundError) as caught:
        storage.read_bytes(f"s3://{s3_bucket}/gone.jpg")

    assert not is_transient(caught.value)
    assert faulty_s3.count("GET", "/gone.jpg") == 1


def test_a_secret_echoed_by_the_server_is_masked_in_the_error(
    settings_factory: SettingsFactory,
    faulty_s3: FaultyProxy,
    s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SENTINEL_SECRET)
    storage = Storage(settings_factory(s3_endpoint_url=faulty_s3.endpoint_url))
    faulty_s3.add_fault("GET", "/x.jpg", "403", message=f"signature for key {SENTINEL_SECRET} rejected")

    with pytest.raises(ForbiddenError) as caught:
        storage.read_bytes(f"s3://{s3_bucket}/x.jpg")

    assert SENTINEL_SECRET not in str(caught.value)
    assert SENTINEL_SECRET not in reason_of(caught.value)
    assert "signature for key *** rejected" in str(caught.value)


def test_an_unreachable_endpoint_is_transient_and_names_no_credentials(
    settings_factory: SettingsFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SENTINEL_SECRET)
    closed = f"http://127.0.0.1:{free_port()}"
    storage = Storage(settings_factory(s3_endpoint_url=closed, s3_retry_mode="standard", s3_max_attempts=2))

    with pytest.raises(TransientError, match=r"127\.0\.0\.1") as caught:
        storage.write_bytes("s3://bucket/key.json", b"{}")

    assert SENTINEL_SECRET not in str(caught.value)
