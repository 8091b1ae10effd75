"""Job state, round 2: the report is retried after a failed PUT, retry of nothing is a no-op, a stale chunk
is refused in the same atomic step that counts chunks, and URIs are stored in their display form only.

Runs against real Redis (and the in-memory store) and moto's S3 server behind the fault-injecting proxy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from sam3_batch.contracts.display import printable
from sam3_batch.contracts.errors import StaleGenerationError
from sam3_batch.contracts.jobstate import Checkpoint, JobStore, PlannedCounts, RedisJobStore
from sam3_batch.contracts.jobstate_memory import MemoryJobStore
from sam3_batch.contracts.redact import display_uri, redact
from sam3_batch.contracts.report import finalize_if_complete, report_uri
from sam3_batch.contracts.schemas import ItemOutcome, JobSpec
from sam3_batch.contracts.settings import Settings
from sam3_batch.contracts.storage import Storage
from tests.fixtures.faulty_proxy import FaultyProxy


@pytest.fixture(params=["redis", "memory"])
def store(request: pytest.FixtureRequest, settings_factory: Callable[..., Settings]) -> JobStore:
    if request.param == "memory":
        return MemoryJobStore()
    return RedisJobStore(settings_factory().state_redis_url())


def _complete_job(store: JobStore, output_root: str, failed: int = 0) -> None:
    store.create(JobSpec(job_id="job1", prompts=["a"], output_root=output_root))
    store.register_chunk("job1", "c0", PlannedCounts(total=2), Checkpoint("b", 1))
    outcomes = [ItemOutcome(uri="s3://b/in/a.jpg", status="done", out_key="a.jpg")]
    outcomes += [ItemOutcome(uri="s3://b/in/f.jpg", status="failed", reason="bad", out_key="f.jpg")] * failed
    outcomes += [ItemOutcome(uri="s3://b/in/c.jpg", status="done", out_key="c.jpg")] * (1 - failed)
    store.record_chunk("job1", "c0", outcomes, 0.1)
    store.mark_listing_complete("job1")


def test_a_report_whose_put_fails_is_written_by_the_next_caller(
    store: JobStore, settings_factory: Callable[..., Settings], faulty_s3: FaultyProxy, s3_client: Any,
    s3_bucket: str,
) -> None:
    storage = Storage(settings_factory(s3_endpoint_url=faulty_s3.endpoint_url, s3_max_attempts=1))
    out_root = f"s3://{s3_bucket}/out"
    _complete_job(store, out_root)
    faulty_s3.add_fault("PUT", "/report.json", "403", times=1)  # e.g. a bucket policy, then fixed

    with pytest.raises(Exception, match=r"403|AccessDenied|Forbidden"):
        finalize_if_complete(store, storage, "job1")
    report = finalize_if_complete(store, storage, "job1")  # a redelivered chunk, or the producer

    assert report is not None and report.counters.done == 2
    key = report_uri(out_root, "job1").removeprefix(f"s3://{s3_bucket}/")
    assert s3_client.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
    assert finalize_if_complete(store, storage, "job1") is None  # written once: later callers do nothing
    assert faulty_s3.count("PUT", "/report.json", faulted=False) == 1


def test_retry_of_a_job_without_failed_images_changes_nothing(store: JobStore) -> None:
    _complete_job(store, "/o")
    assert store.claim_report("job1")
    store.settle_report("job1", written=True)

    assert store.reopen_failures("job1") == []
    assert store.counters("job1").failed == 0 and not store.claim_report("job1")  # the report stays written


def test_a_chunk_of_an_older_generation_is_refused_in_the_counting_step(store: JobStore) -> None:
    _complete_job(store, "/o")
    store.start_generation("job1")  # a resume replanned the job
    stale = [ItemOutcome(uri="s3://b/in/a.jpg", status="done", out_key="a.jpg")]

    with pytest.raises(StaleGenerationError):
        store.record_chunk("job1", "c1", stale, 0.0, generation=0)
    assert store.counters("job1").done == 0 and not store.is_chunk_recorded("job1", "c1")
    assert store.record_chunk("job1", "c1", stale, 0.0, generation=1)


def test_failed_uris_are_stored_with_their_signatures_masked(store: JobStore) -> None:
    store.create(JobSpec(job_id="job1", prompts=["a"], output_root="/o"))
    signed = "https://h/x.jpg?X-Amz-Credential=AKIAXX&X-Amz-Signature=deadbeef&X-Amz-Expires=60"
    store.record_chunk("job1", "c0", [ItemOutcome(uri=signed, status="failed", reason="r", out_key="k")], 0.0)

    [failure] = store.failures("job1")
    assert failure.uri == "https://h/x.jpg?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Expires=60"


@pytest.mark.parametrize(("uri", "shown"), [
    ("s3://bucket/a b/c.jpg", "s3://bucket/a b/c.jpg"),
    ("https://h/p.jpg?token=abc&w=2", "https://h/p.jpg?token=***&w=2"),
    ("https://h/p.jpg?sv=2022&sig=abc%3D&se=2030", "https://h/p.jpg?sv=2022&sig=***&se=2030"),  # Azure SAS
    ("https://h/p.jpg?X-Goog-Signature=abc&X-Goog-Credential=c",
     "https://h/p.jpg?X-Goog-Signature=***&X-Goog-Credential=***"),
    ("https://h/p.jpg?api_key=abc&AWSAccessKeyId=A&Signature=s",
     "https://h/p.jpg?api_key=***&AWSAccessKeyId=***&Signature=***"),
    ("https://user:pw@h/p.jpg", "https://user:***@h/p.jpg"),
    ("/data/caf\udce9.png", "/data/caf\\xe9.png"),
])
def test_display_uri_masks_credentials_and_keeps_the_rest(uri: str, shown: str) -> None:
    assert display_uri(uri) == shown
    if "***" in shown:  # the same values are masked inside free text (error reasons, log lines)
        assert all(secret not in redact(f"GET {uri} failed") for secret in ("abc", "deadbeef", ":pw@"))


@pytest.mark.parametrize(("text", "shown"), [
    ("[red]x[/red] [link=file:///etc]", "[red]x[/red] [link=file:///etc]"),  # kept literally (printed as text)
    ("a\x1b[31mred\x1b[0m", "ared"),
    ("title\x1b]0;pwned\x07end", "titleend"),
    ("bell\x07 nul\x00 rtl\u202e", "bell? nul? rtl?"),
    ("caf\udce9", "caf\\xe9"),
])
def test_printable_removes_terminal_controls_and_keeps_text(text: str, shown: str) -> None:
    assert printable(text) == shown
