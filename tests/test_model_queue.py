"""Model and queue: submit refuses a model no live worker serves; outputs name the commit that made them."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from sam3_batch.contracts.jobstate import RedisJobStore
from sam3_batch.contracts.registry import live_workers
from sam3_batch.contracts.report import report_uri
from sam3_batch.contracts.schemas import ImageMetadata, JobReport
from sam3_batch.contracts.settings import Settings
from tests.fixtures.workers import run_cli, wait_for_job, wait_until

HUB_MODEL = "example-org/tiny-sam3"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def offline_hub_cache(tiny_checkpoint: Path, home: Path) -> Path:
    """An HF cache holding the tiny checkpoint as ``HUB_MODEL`` at ``COMMIT``, with ``main`` pointing to it."""
    repo = home / "hub" / f"models--{HUB_MODEL.replace('/', '--')}"
    shutil.copytree(tiny_checkpoint, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return home


def _get_json(s3_client: Any, bucket: str, key: str) -> Any:
    return json.loads(s3_client.get_object(Bucket=bucket, Key=key)["Body"].read())


@pytest.mark.slow
def test_submit_checks_the_model_against_live_workers_of_its_queue_and_outputs_record_the_commit(
    settings_factory: Callable[..., Settings], tiny_checkpoint: Path, tmp_path: Path, s3_client: Any,
    s3_bucket: str, image_bytes_factory: Callable[[str], bytes], worker_factory: Any,
) -> None:
    settings = settings_factory(model=HUB_MODEL, device="cpu", queue="tiny-models")
    home = offline_hub_cache(tiny_checkpoint, tmp_path / "hf-home")
    worker = worker_factory(settings, HF_HOME=str(home), HF_HUB_OFFLINE="1")
    broker = redis.Redis.from_url(settings.broker_url.get_secret_value())  # where workers beat
    # The heartbeat starts before the model loads (commit unknown); once loaded it names the resolved commit.
    [entry] = wait_until(lambda: [e for e in live_workers(broker, "tiny-models") if e.commit], 180,
                         "the worker's heartbeat with its loaded model's commit",
                         details=lambda: worker.log()[-3000:])
    assert (entry.model_id, entry.revision, entry.commit) == (HUB_MODEL, None, COMMIT)
    s3_client.put_object(Bucket=s3_bucket, Key="in/a.jpg", Body=image_bytes_factory("jpeg"))
    args = ["submit", f"s3://{s3_bucket}/in/", "--out", f"s3://{s3_bucket}/out", "-p", "cat"]

    refused = run_cli([*args, "--model", "facebook/sam3", "--queue", "tiny-models"], settings)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "no live worker on queue 'tiny-models' serves model facebook/sam3" in refused.stderr
    assert refused.stdout == "" and RedisJobStore(settings.state_redis_url()).job_ids() == []
    other_queue = run_cli([*args, "--model", "facebook/sam3", "--queue", "sam3", "--dry-run"], settings)
    assert other_queue.returncode == 0  # no worker registered there (e.g. scaled to zero): not refused

    accepted = run_cli([*args, "--queue", "tiny-models"], settings)
    assert accepted.returncode == 0, accepted.stderr
    job_id = accepted.stdout.splitlines()[0]
    counters = wait_for_job(RedisJobStore(settings.state_redis_url()), job_id, workers=[worker])
    assert counters.done == 1
    metadata = ImageMetadata.model_validate(_get_json(s3_client, s3_bucket, "out/a.jpg.json"))
    assert (metadata.model.id, metadata.model.revision, metadata.model.commit) == (HUB_MODEL, None, COMMIT)
    report_key = report_uri("out", job_id)
    report = wait_until(lambda: _report_or_none(s3_client, s3_bucket, report_key), 30, "the report")
    assert report.model.commit == COMMIT


def _report_or_none(s3_client: Any, bucket: str, key: str) -> JobReport | None:
    try:
        return JobReport.model_validate(_get_json(s3_client, bucket, key))
    except s3_client.exceptions.NoSuchKey:
        return None
