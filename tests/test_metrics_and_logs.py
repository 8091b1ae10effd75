"""A real worker's Prometheus metrics and JSON logs, read the way a scraper and a log shipper read them."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from sam3_batch.contracts.jobstate import RedisJobStore
from sam3_batch.contracts.settings import Settings
from tests.fixtures.metrics import sample_value, scrape
from tests.fixtures.services import AWS_SECRET_ACCESS_KEY, free_port
from tests.fixtures.workers import run_cli, wait_for_job, wait_until

REDIS_PASSWORD = "redis-sentinel-pw-5d1c"  # distinctive, so finding it in a log cannot be a coincidence
IMAGES = {"a.jpg": "jpeg", "b.png": "png_rgba", "c.webp": "webp"}
STAGES = ("download", "decode", "model", "encode_upload")
# A log record in a plain (non-JSON) format: ours ("2026-01-01 10:00:00,123 INFO ...") or Celery's ("[... INFO/...]").
PLAIN_RECORD = re.compile(r"^\[?\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d[,.]\d+\]? ?:? ?(DEBUG|INFO|WARNING|ERROR|CRITICAL)")


@pytest.fixture
def password_redis_url(redis_server_factory: Callable[..., Any]) -> str:
    """A fresh redis-server that requires a password; its URL carries the password."""
    server = redis_server_factory()
    client = redis.Redis.from_url(server.url)
    client.config_set("requirepass", REDIS_PASSWORD)
    client.close()
    return str(server.url).replace("redis://", f"redis://:{REDIS_PASSWORD}@")


@pytest.mark.slow
def test_worker_metrics_count_every_image_stage_batch_and_model_load(
    settings_factory: Callable[..., Settings], tiny_checkpoint: Path, s3_client: Any, s3_bucket: str,
    image_bytes_factory: Callable[[str], bytes], worker_factory: Any, password_redis_url: str,
) -> None:
    port = free_port()
    settings = settings_factory(model=str(tiny_checkpoint), device="cpu", chunk_size=2, batch_size=2,
                                metrics_port=port, log_json=True, broker_url=password_redis_url)
    for name, kind in IMAGES.items():
        s3_client.put_object(Bucket=s3_bucket, Key=f"in/{name}", Body=image_bytes_factory(kind))
    worker = worker_factory(settings)
    submitted = run_cli(["submit", f"s3://{s3_bucket}/in/", "--out", f"s3://{s3_bucket}/out/", "-p", "cat",
                         "--threshold", "0", "--json"], settings)
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["job_id"]
    counters = wait_for_job(RedisJobStore(settings.state_redis_url()), job_id, workers=[worker])
    assert counters.done == len(IMAGES)

    def idle_scrape() -> Any:
        found = scrape(port)
        return found if sample_value(found, "sam3_chunks_in_flight") == 0 else None

    # The last chunk's task still compacts the index and writes the report after the job counts as done.
    samples = wait_until(idle_scrape, 60, "the last chunk's task to end")

    assert sample_value(samples, "sam3_images_total", status="done") == len(IMAGES)
    for stage in STAGES:
        assert sample_value(samples, "sam3_stage_seconds_count", stage=stage) == len(IMAGES), stage
        assert sample_value(samples, "sam3_stage_seconds_sum", stage=stage) > 0, stage
    # Chunks of 2 and 1 images, batch size 2: one batch per chunk, every image in exactly one batch.
    assert sample_value(samples, "sam3_batch_images_count") == 2
    assert sample_value(samples, "sam3_batch_images_sum") == len(IMAGES)
    assert sample_value(samples, "sam3_chunks_total", result="counted") == 2
    assert sample_value(samples, "sam3_model_load_seconds") > 0
    instances = RedisJobStore(settings.state_redis_url()).stats(job_id).instances
    assert sample_value(samples, "sam3_instances_total") == instances > 0
    assert sample_value(samples, "sam3_read_bytes_total") == sum(
        len(image_bytes_factory(kind)) for kind in IMAGES.values())
    stored = s3_client.list_objects_v2(Bucket=s3_bucket, Prefix="out/")["Contents"]
    outputs = sum(o["Size"] for o in stored if "/_jobs/" not in f"/{o['Key']}")
    parts = sum(o["Size"] for o in stored if "/parts/" in o["Key"])
    assert outputs > 0 and parts > 0
    assert sample_value(samples, "sam3_written_bytes_total", kind="output") == outputs  # counted in writers
    assert sample_value(samples, "sam3_written_bytes_total", kind="part") == parts
    assert 0 < time.time() - sample_value(samples, "sam3_last_chunk_finished_timestamp_seconds") < 600
    assert (sample_value(samples, "sam3_queue_chunks"), sample_value(samples, "sam3_chunks_in_flight")) == (0, 0)
    build = next(labels for (name, labels) in samples if name == "sam3_build_info")
    assert ("model", str(tiny_checkpoint)) in build and ("commit", "") in build


@pytest.mark.slow
def test_worker_json_logs_parse_line_by_line_and_carry_no_credentials(
    settings_factory: Callable[..., Settings], tiny_checkpoint: Path, s3_client: Any, s3_bucket: str,
    image_bytes_factory: Callable[[str], bytes], worker_factory: Any, password_redis_url: str,
) -> None:
    settings = settings_factory(model=str(tiny_checkpoint), device="cpu", log_json=True,
                                broker_url=password_redis_url)
    s3_client.put_object(Bucket=s3_bucket, Key="in/a.jpg", Body=image_bytes_factory("jpeg"))
    s3_client.put_object(Bucket=s3_bucket, Key="in/broken.jpg", Body=image_bytes_factory("truncated"))
    worker = worker_factory(settings)
    submitted = run_cli(["submit", f"s3://{s3_bucket}/in/", "--out", f"s3://{s3_bucket}/out/", "-p", "cat",
                         "--json"], settings)
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["job_id"]
    counters = wait_for_job(RedisJobStore(settings.state_redis_url()), job_id, workers=[worker])
    assert (counters.done, counters.failed) == (1, 1)
    assert worker.terminate() == 0  # warm shutdown: everything it logged is in the file

    log = worker.log()

    non_json = [line for line in log.splitlines() if not line.startswith("{")]
    assert non_json == [], non_json  # no banner, no progress bars, no bare warnings: a log shipper parses all
    records = [json.loads(line) for line in log.splitlines()]
    assert all({"ts", "level", "logger", "message"} <= set(r) for r in records)
    messages = [r["message"] for r in records]
    assert any(m.endswith("ready.") for m in messages), messages
    assert any(r["logger"] == "celery.app.trace" and "succeeded" in r["message"] for r in records), messages
    assert [line for line in log.splitlines() if PLAIN_RECORD.match(line)] == []
    for secret in (AWS_SECRET_ACCESS_KEY, REDIS_PASSWORD):
        assert secret not in log
    cli_records = [json.loads(line) for line in submitted.stderr.splitlines()]  # the CLI's lines too
    assert any(r.get("job_id") == job_id and "submitted" in r["message"] for r in cli_records), cli_records
    assert any(r["message"].startswith("image failed: s3://") and "broken.jpg" in r["message"] for r in records)
    for text in (submitted.stdout, submitted.stderr):
        assert AWS_SECRET_ACCESS_KEY not in text and REDIS_PASSWORD not in text

