"""Resuming after crashes and cancels: only images without a complete output are processed, counts stay exact.

Real producer and worker processes, real Redis servers, SeaweedFS S3 (behind the fault proxy where a test must
hold a worker mid-chunk). Every wait is on real state: Redis keys, proxy request counts, S3 objects.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis

from sam3_batch.contracts.jobstate import RedisJobStore
from sam3_batch.contracts.layout import shard_name, shard_of_jobs_key
from sam3_batch.contracts.report import report_uri
from sam3_batch.contracts.schemas import ImageMetadata, JobReport
from sam3_batch.contracts.settings import Settings
from sam3_batch.results import metadata_of_row
from tests.fixtures.faulty_proxy import FaultyProxy
from tests.fixtures.workers import run_cli, start_cli, unacked_ages, wait_for_job, wait_until

pytestmark = pytest.mark.slow

PROMPT_ARGS = ["-p", "cat", "--threshold", "0"]


def _settings(settings_factory: Callable[..., Settings], tiny_checkpoint: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"model": str(tiny_checkpoint), "device": "cpu", "chunk_size": 2, "batch_size": 2,
                              "visibility_timeout_s": 10, "s3_read_timeout_s": 300.0}
    values.update(overrides)
    return settings_factory(**values)


def _upload(s3_client: Any, bucket: str, names: list[str], image_bytes: Callable[[str], bytes]) -> None:
    for name in names:
        s3_client.put_object(Bucket=bucket, Key=f"in/{name}", Body=image_bytes("jpeg"))


def _cli_json(args: list[str], settings: Settings, **env: str) -> Any:
    done = run_cli([*args, "--json"], settings, **env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _metadata(s3_client: Any, bucket: str, layout: str = "image") -> dict[str, ImageMetadata]:
    """out_key -> metadata of every image with a complete output: its K.json, or its row in a shard."""
    pages = s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="out/")
    keys = [e["Key"] for page in pages for e in page.get("Contents", [])]

    def read(key: str) -> bytes:
        return bytes(s3_client.get_object(Bucket=bucket, Key=key)["Body"].read())

    if layout == "image":
        return {
            key.removeprefix("out/").removesuffix(".json"): ImageMetadata.model_validate_json(read(key))
            for key in keys if key.endswith(".jpg.json")
        }
    found: dict[str, ImageMetadata] = {}
    for key in keys:
        if key.startswith("out/_jobs/") and shard_of_jobs_key(key.removeprefix("out/_jobs/")):
            for row in pq.read_table(pa.BufferReader(read(key))).to_pylist():
                assert row["out_key"] not in found, f"{row['out_key']} is in two shards"
                found[row["out_key"]] = metadata_of_row(row)
    return found


def _wait_idle(settings: Settings) -> None:
    """Wait until no chunk is queued or in a worker's hands (every delivery acked)."""
    broker = redis.Redis.from_url(settings.broker_url.get_secret_value())
    wait_until(lambda: broker.llen(settings.queue) == 0 and not unacked_ages(broker), 120,
               "the queue to drain and every delivery to be acked")
    broker.close()


def test_a_producer_killed_mid_listing_and_again_between_send_and_register_resumes_without_losing_an_image(
    settings_factory: Callable[..., Settings], tiny_checkpoint: Path, s3_client: Any, s3_bucket: str,
    image_bytes_factory: Callable[[str], bytes], worker_factory: Any, redis_server_factory: Callable[..., Any],
) -> None:
    # Queue and job state on two Redis servers, so job-state writes can be paused while the queue works.
    broker, state = redis_server_factory(), redis_server_factory()
    settings = _settings(settings_factory, tiny_checkpoint, broker_url=broker.url, state_url=state.url,
                         queue_high_water=1, queue_low_water=0)
    names = [f"i{n}.jpg" for n in range(8)]  # four chunks of two
    _upload(s3_client, s3_bucket, names, image_bytes_factory)
    queue, state_client = redis.Redis.from_url(broker.url), redis.Redis.from_url(state.url)
    store = RedisJobStore(state.url)
    submit = ["submit", f"s3://{s3_bucket}/in/", "--out", f"s3://{s3_bucket}/out", *PROMPT_ARGS]

    # Crash 1: no worker yet, so the producer sends chunk 0 and then waits for room; kill it there.
    first = start_cli(submit, settings)
    [job_id] = wait_until(store.job_ids, 60, "the job to be created")
    wait_until(lambda: (c := store.checkpoint(job_id)) is not None and c.next_seq == 1, 60, "chunk 0's checkpoint")
    assert queue.llen(settings.queue) == 1
    first.kill()
    first.wait()

    # Crash 2: the resumed producer sends chunk 1 but cannot register it (job-state writes are paused).
    state_client.execute_command("CLIENT", "PAUSE", "120000", "WRITE")
    second = start_cli(["submit", "--resume", job_id], settings, SAM3_BATCH_QUEUE_HIGH_WATER="100")
    wait_until(lambda: queue.llen(settings.queue) == 2, 60, "the resumed producer to send chunk 1")
    second.kill()
    second.wait()
    state_client.execute_command("CLIENT", "UNPAUSE")
    assert store.checkpoint(job_id).next_seq == 1  # type: ignore[union-attr]  # chunk 1 sent, never registered

    worker = worker_factory(settings)
    wait_until(lambda: store.chunks_marked(job_id, "recorded") == 2, 120, "chunks 0 and 1 to be done")
    summary = _cli_json(["submit", "--resume", job_id], settings)
    counters = wait_for_job(store, job_id, workers=[worker])
    _wait_idle(settings)

    # The resumed listing re-sends chunk 1 with the same images (a worker drops it as done) and goes on.
    assert (summary["chunks_sent"], summary["images_enqueued"], summary["skipped"]) == (3, 6, 0)
    counters = store.counters(job_id)
    assert (counters.total, counters.done, counters.failed, counters.skipped) == (8, 8, 0, 0)
    assert store.chunks_marked(job_id, "planned") == 4
    assert sorted(_metadata(s3_client, s3_bucket)) == names


@pytest.mark.parametrize("layout", ["image", "chunk"])
def test_resume_after_cancel_processes_only_unfinished_images_and_a_chunk_in_flight_is_not_counted(
    settings_factory: Callable[..., Settings], tiny_checkpoint: Path, faulty_s3: FaultyProxy, s3_client: Any,
    s3_bucket: str, image_bytes_factory: Callable[[str], bytes], worker_factory: Any, layout: str,
) -> None:
    settings = _settings(settings_factory, tiny_checkpoint, s3_endpoint_url=faulty_s3.endpoint_url)
    names = ["a0.jpg", "a1.jpg", "b0.jpg", "b1.jpg", "c0.jpg", "c1.jpg"]
    _upload(s3_client, s3_bucket, names, image_bytes_factory)
    faulty_s3.add_fault("GET", f"/{s3_bucket}/in/b0.jpg", "delay", times=1)
    worker = worker_factory(settings)
    store = RedisJobStore(settings.state_redis_url())
    submitted = _cli_json(["submit", f"s3://{s3_bucket}/in/", "--out", f"s3://{s3_bucket}/out", *PROMPT_ARGS,
                           "--layout", layout], settings)
    job_id = submitted["job_id"]
    wait_until(lambda: faulty_s3.count("GET", "/in/b0.jpg", faulted=True), 180, "the worker to be inside chunk 1")
    assert store.counters(job_id).done == 2  # chunk 0 is finished

    cancelled = run_cli(["cancel", job_id], settings)
    assert cancelled.returncode == 0, cancelled.stderr
    resumed = _cli_json(["submit", "--resume", job_id], settings)
    faulty_s3.release()  # the old chunk 1 goes on after its job was cancelled and replanned
    counters = wait_for_job(store, job_id, workers=[worker])
    _wait_idle(settings)

    assert (resumed["skipped"], resumed["images_enqueued"]) == (2, 4)
    counters = store.counters(job_id)
    assert (counters.total, counters.done, counters.failed, counters.skipped) == (6, 4, 0, 2)
    metadata = _metadata(s3_client, s3_bucket, layout)
    assert sorted(metadata) == names
    assert {metadata[n].chunk_id for n in ("a0.jpg", "a1.jpg")} == {f"{job_id}-g0-000000000"}  # not redone
    assert all("-g1-" in metadata[n].chunk_id for n in names[2:])
    assert faulty_s3.count("GET", "/in/a0.jpg") == 1  # a done image is not downloaded again
    report = JobReport.model_validate_json(
        s3_client.get_object(Bucket=s3_bucket, Key=report_uri("out", job_id))["Body"].read())
    assert report.state == "complete" and report.counters == counters


# The image layout's done marker is per image (b1.jpg survives the crash); the chunk layout's is the
# chunk's shard, so the whole chunk b0+b1 is redone.
SKIP_CASES = {
    "image": ("/out/b0.jpg.json", {"b0.jpg", "c0.jpg", "c1.jpg"}),
    "chunk": (f"/parts/{shard_name(2, ['b0.jpg', 'b1.jpg'])}", {"b0.jpg", "b1.jpg", "c0.jpg", "c1.jpg"}),
}


@pytest.mark.parametrize("layout", ["image", "chunk"])
def test_skip_existing_after_a_crashed_and_cancelled_job_processes_only_images_without_a_complete_output(
    settings_factory: Callable[..., Settings], tiny_checkpoint: Path, faulty_s3: FaultyProxy, s3_client: Any,
    s3_bucket: str, image_bytes_factory: Callable[[str], bytes], worker_factory: Any, layout: str,
) -> None:
    settings = _settings(settings_factory, tiny_checkpoint, s3_endpoint_url=faulty_s3.endpoint_url)
    names = ["a0.jpg", "a1.jpg", "b0.jpg", "b1.jpg", "c0.jpg", "c1.jpg"]
    marker, redone = SKIP_CASES[layout]
    _upload(s3_client, s3_bucket, names, image_bytes_factory)
    faulty_s3.add_fault("PUT", marker, "delay", times=1)
    crashed = worker_factory(settings, "crashed")
    args = ["submit", f"s3://{s3_bucket}/in/", "--out", f"s3://{s3_bucket}/out", *PROMPT_ARGS, "--layout", layout]
    first_job = _cli_json(args, settings)["job_id"]
    wait_until(lambda: faulty_s3.count("PUT", marker, faulted=True), 180,
               "the worker to write chunk 1's first done marker")
    if layout == "image":
        wait_until(lambda: "b1.jpg" in _metadata(s3_client, s3_bucket), 60, "b1.jpg to be done")
    crashed.kill()  # chunk 1 was segmented, but without its done marker it has no complete output
    cancelled = run_cli(["cancel", first_job], settings)
    assert cancelled.returncode == 0, cancelled.stderr

    second = _cli_json([*args, "--skip-existing"], settings)
    worker = worker_factory(settings, "fresh")
    counters = wait_for_job(RedisJobStore(settings.state_redis_url()), second["job_id"], workers=[worker])

    done_now = len(redone)
    assert (counters.total, counters.done, counters.failed, counters.skipped) == (6, done_now, 0, 6 - done_now)
    metadata = _metadata(s3_client, s3_bucket, layout)
    assert sorted(metadata) == names
    assert {n for n, m in metadata.items() if m.job_id == second["job_id"]} == redone
    for name in set(names) - redone:
        assert faulty_s3.count("GET", f"/in/{name}") == 1, name  # downloaded by the first job only
