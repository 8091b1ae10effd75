"""Operating a job from the command line: status, jobs, failures, retry-failed, cancel and the job report."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from sam3_batch.contracts.jobstate import RedisJobStore
from sam3_batch.contracts.report import report_uri
from sam3_batch.contracts.schemas import JobReport
from sam3_batch.contracts.settings import Settings
from tests.fixtures.metrics import scrape
from tests.fixtures.services import free_port
from tests.fixtures.workers import run_cli, wait_for_job, wait_until

PROMPTS = ["cat", "dog"]


def _put(s3_client: Any, bucket: str, key: str, data: bytes) -> str:
    s3_client.put_object(Bucket=bucket, Key=key, Body=data)
    return f"s3://{bucket}/{key}"


def _keys(s3_client: Any, bucket: str, prefix: str) -> list[str]:
    pages = s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [entry["Key"] for page in pages for entry in page.get("Contents", [])]


def _cli_json(args: list[str], settings: Settings) -> Any:
    done = run_cli([*args, "--json"], settings)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _report(s3_client: Any, out_root: str, job_id: str) -> JobReport | None:
    bucket, key = report_uri(out_root, job_id).removeprefix("s3://").split("/", 1)
    try:
        body = s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except s3_client.exceptions.NoSuchKey:
        return None
    return JobReport.model_validate_json(body)


def _submit(settings: Settings, *args: str) -> str:
    prompts = [arg for prompt in PROMPTS for arg in ("--prompt", prompt)]
    submitted = _cli_json(["submit", *args, *prompts, "--threshold", "0"], settings)
    return str(submitted["job_id"])


@pytest.mark.slow
def test_missing_image_fails_then_retry_failed_after_upload_completes_the_job(
    settings_factory: Callable[..., Settings], tiny_checkpoint: Path, s3_client: Any, s3_bucket: str,
    image_bytes_factory: Callable[[str], bytes], worker_factory: Any,
) -> None:
    settings = settings_factory(model=str(tiny_checkpoint), device="cpu", chunk_size=2, batch_size=2)
    out_root = f"s3://{s3_bucket}/out"
    present = [_put(s3_client, s3_bucket, f"in/{n}", image_bytes_factory(k))
               for n, k in (("a.jpg", "jpeg"), ("b.png", "png"))]
    missing = f"s3://{s3_bucket}/in/late.webp"
    manifest_lines = [json.dumps({"uri": uri}) for uri in [*present, missing]]
    manifest = _put(s3_client, s3_bucket, "manifest.jsonl", "\n".join(manifest_lines).encode())
    worker = worker_factory(settings)
    store = RedisJobStore(settings.state_redis_url())

    job_id = _submit(settings, "--manifest", manifest, "--out", out_root)
    counters = wait_for_job(store, job_id, workers=[worker])
    assert (counters.total, counters.done, counters.failed) == (3, 2, 1)

    status = _cli_json(["status", job_id], settings)
    assert (status["state"], status["total"], status["done"], status["failed"]) == ("complete", 3, 2, 1)
    assert status["listing_complete"] is True and status["images_per_second"] > 0
    listed = _cli_json(["jobs"], settings)
    assert [(j["job_id"], j["done"], j["failed"]) for j in listed] == [(job_id, 2, 1)]
    [failure] = _cli_json(["failures", job_id], settings)
    assert failure["uri"] == missing and "NotFoundError" in failure["reason"] and failure["out_key"]
    report = wait_until(lambda: _report(s3_client, out_root, job_id), 30, "the job report")
    assert report.state == "complete" and (report.counters.done, report.counters.failed) == (2, 1)
    assert [f.uri for f in report.failures] == [missing] and "NotFoundError" in report.failures[0].reason
    assert report.model.id == str(tiny_checkpoint) and report.prompts == PROMPTS
    assert report.wall_seconds > 0 and report.gpu_seconds >= 0 and report.source == f"manifest {manifest}"

    _put(s3_client, s3_bucket, "in/late.webp", image_bytes_factory("webp"))
    retried = run_cli(["retry-failed", job_id], settings)
    assert retried.returncode == 0, retried.stderr
    assert "resubmitted 1 " in retried.stdout

    counters = wait_for_job(store, job_id, workers=[worker])
    assert (counters.total, counters.done, counters.failed) == (3, 3, 0)
    assert _cli_json(["failures", job_id], settings) == []
    final = wait_until(lambda: (r := _report(s3_client, out_root, job_id)) and r.counters.done == 3 and r,
                       30, "the rewritten job report")
    assert final.state == "complete" and final.failures == [] and final.counters.failed == 0
    assert f"out/{s3_bucket}/in/late.webp.json" in _keys(s3_client, s3_bucket, "out/")


@pytest.mark.slow
def test_cancel_before_any_worker_runs_drops_every_queued_chunk_and_writes_nothing(
    settings_factory: Callable[..., Settings], tiny_checkpoint: Path, s3_client: Any, s3_bucket: str,
    image_bytes_factory: Callable[[str], bytes], worker_factory: Any,
) -> None:
    port = free_port()
    settings = settings_factory(model=str(tiny_checkpoint), device="cpu", chunk_size=2, metrics_port=port)
    for index in range(5):
        _put(s3_client, s3_bucket, f"in/{index}.jpg", image_bytes_factory("jpeg"))
    job_id = _submit(settings, f"s3://{s3_bucket}/in/", "--out", f"s3://{s3_bucket}/out/")
    queue = redis.Redis.from_url(settings.broker_url.get_secret_value())
    assert queue.llen(settings.queue) == 3  # 5 images in chunks of 2, nobody consuming yet

    cancelled = run_cli(["cancel", job_id], settings)
    assert cancelled.returncode == 0, cancelled.stderr
    worker = worker_factory(settings)

    def cancelled_chunks() -> float:
        try:
            return scrape(port).get(("sam3_chunks_total", frozenset({("result", "cancelled")})), 0.0)
        except OSError:  # the worker has not opened its metrics port yet
            return 0.0

    wait_until(lambda: cancelled_chunks() == 3, 120, "the worker to drop all 3 queued chunks")
    assert queue.llen(settings.queue) == 0
    assert worker.alive()
    report = _report(s3_client, f"s3://{s3_bucket}/out/", job_id)
    assert report is not None and report.state == "cancelled" and report.counters.done == 0
    assert _keys(s3_client, s3_bucket, "out/") == [report_uri("out", job_id)]  # the report, no outputs
    status = _cli_json(["status", job_id], settings)
    assert (status["state"], status["total"], status["done"], status["failed"]) == ("cancelled", 5, 0, 0)


def test_cancel_of_an_unknown_job_fails_with_a_readable_message(settings_factory: Callable[..., Settings]) -> None:
    done = run_cli(["cancel", "no-such-job"], settings_factory())

    assert done.returncode == 1
    assert "unknown job no-such-job" in done.stderr and "Traceback" not in done.stderr
