"""The producer at scale, in small numbers: backpressure bounds the queue, and a killed producer resumes
from its checkpoint without enqueuing anything twice (real Redis, SeaweedFS S3, real subprocesses)."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import compression

from sam3_batch.contracts.jobstate import RedisJobStore
from sam3_batch.contracts.schemas import ChunkMessage
from sam3_batch.contracts.settings import Settings
from sam3_batch.contracts.storage import Storage
from sam3_batch.jobs import JobRequest, build_spec, celery_dispatcher
from sam3_batch.producer.feed import ProducerSummary, run_producer
from sam3_batch.producer.inputs import open_source
from tests.fixtures.workers import REPO_ROOT, run_cli, settings_env, wait_for_job, wait_until

ZLIB = "application/x-gzip"  # kombu's content type for zlib (task_compression = "zlib")


def queued_chunks(client: redis.Redis, queue: str) -> list[ChunkMessage]:
    """Decode every task message waiting in the queue LIST (kombu envelope -> base64 -> zlib -> JSON)."""
    raw: list[bytes] = client.lrange(queue, 0, -1)  # type: ignore[assignment]
    return [_decode(message) for message in raw]


def _decode(message: bytes | str) -> ChunkMessage:
    envelope = json.loads(message)
    assert envelope["properties"]["body_encoding"] == "base64"
    assert envelope["headers"]["compression"] == ZLIB
    body = compression.decompress(base64.b64decode(envelope["body"]), ZLIB)  # type: ignore[no-untyped-call]
    args, _kwargs, _embed = json.loads(body)  # Celery message protocol 2
    return ChunkMessage.model_validate(args[0])


def _upload_images(s3_client: Any, bucket: str, count: int, data: bytes) -> list[str]:
    keys = [f"in/{index:04d}.png" for index in range(count)]
    for key in keys:
        s3_client.put_object(Bucket=bucket, Key=key, Body=data)
    return [f"s3://{bucket}/{key}" for key in keys]


def _uris_of(chunks: list[ChunkMessage]) -> list[str]:
    return [item.uri for chunk in chunks for item in chunk.items]


def test_backpressure_holds_the_queue_at_high_water_until_drained_then_the_producer_finishes(
    settings_factory: Any, s3_client: Any, s3_bucket: str, image_bytes_factory: Any,
) -> None:
    settings: Settings = settings_factory(chunk_size=2, queue_high_water=4, queue_low_water=1)
    uris = _upload_images(s3_client, s3_bucket, 40, image_bytes_factory("png"))
    store = RedisJobStore(settings.state_redis_url())
    request = JobRequest(inputs=[f"s3://{s3_bucket}/in/"], prompts=["cat"], output_root=f"s3://{s3_bucket}/out/")
    spec = build_spec(request, settings)
    store.create(spec)
    storage = Storage(settings)
    source = open_source(storage, request.inputs)
    dispatcher = celery_dispatcher(settings, store)
    finished: list[ProducerSummary] = []

    def produce() -> None:
        finished.append(run_producer(spec, source, store, storage, dispatcher, settings.chunk_size))

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    client = store.client
    try:
        # No consumer: the producer fills the queue to the high-water mark and stops there.
        wait_until(lambda: _checkpoint_seq(store, spec.job_id) == 4, timeout=60, what="4 chunks registered")
        assert client.llen(settings.queue) == 4 and producer.is_alive()
        producer.join(timeout=2.0)  # it stays blocked: more time changes nothing
        assert client.llen(settings.queue) == 4 and _checkpoint_seq(store, spec.job_id) == 4
        assert dispatcher.backpressure.pauses >= 1

        taken, deepest = _drain_until_done(client, settings.queue, producer)
    finally:
        store.cancel(spec.job_id)  # a producer left blocked by a failure stops instead of feeding later tests
        producer.join(timeout=10)

    assert deepest <= 4
    assert sorted(_uris_of(taken)) == uris  # every image exactly once
    assert finished and finished[0].listing_complete and finished[0].chunks_sent == 20
    assert store.counters(spec.job_id).total == 40


def _checkpoint_seq(store: RedisJobStore, job_id: str) -> int:
    checkpoint = store.checkpoint(job_id)
    return checkpoint.next_seq if checkpoint else 0


def _drain_until_done(client: redis.Redis, queue: str, producer: threading.Thread) -> tuple[list[ChunkMessage], int]:
    """Consume like a worker would (oldest first), recording the deepest queue seen, until the producer is
    done and the queue is empty."""
    taken: list[ChunkMessage] = []
    deepest = 0
    while producer.is_alive() or client.llen(queue):
        deepest = max(deepest, int(client.llen(queue)))
        popped = client.brpop([queue], timeout=1)
        if popped is not None:
            taken.append(_decode(popped[1]))
    producer.join()
    return taken, deepest


@pytest.mark.slow
def test_a_producer_killed_mid_listing_and_resumed_enqueues_every_image_exactly_once(
    settings_factory: Any, s3_client: Any, s3_bucket: str, image_bytes_factory: Any, tiny_checkpoint: Path,
    worker_factory: Any, tmp_path: Path,
) -> None:
    model = {"model": str(tiny_checkpoint), "device": "cpu", "batch_size": 4}
    blocking: Settings = settings_factory(chunk_size=3, queue_high_water=4, queue_low_water=1, **model)
    uris = _upload_images(s3_client, s3_bucket, 40, image_bytes_factory("png"))
    store = RedisJobStore(blocking.state_redis_url())
    command = [sys.executable, "-m", "sam3_batch", "submit", f"s3://{s3_bucket}/in/", "--out",
               f"s3://{s3_bucket}/out/", "--prompt", "cat", "--json"]
    log = (tmp_path / "producer.log").open("wb")
    producer = subprocess.Popen(command, env=settings_env(blocking), cwd=REPO_ROOT, stdout=log, stderr=log)
    try:
        # With no worker the producer blocks at the high-water mark, having checkpointed every chunk it sent.
        job_id = wait_until(lambda: next(iter(store.job_ids()), None), timeout=60, what="the job to be created")
        wait_until(lambda: _checkpoint_seq(store, job_id) == 4, timeout=60, what="4 chunks registered")
        assert producer.poll() is None, (tmp_path / "producer.log").read_text()
    finally:
        producer.send_signal(signal.SIGKILL)
        producer.wait(timeout=30)
        log.close()
    before = store.counters(job_id)
    assert (before.total, before.listing_complete) == (12, False)

    unblocked = blocking.model_copy(update={"queue_high_water": 1000})
    resumed = run_cli(["submit", "--resume", job_id, "--json"], unblocked)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["images_enqueued"] == 28

    chunks = queued_chunks(store.client, blocking.queue)
    assert sorted(_uris_of(chunks)) == uris  # each image in exactly one queued chunk
    assert sorted(c.chunk_id for c in chunks) == [f"{job_id}-g0-{seq:09d}" for seq in range(14)]
    worker = worker_factory(blocking)
    counters = wait_for_job(store, job_id, workers=[worker])
    assert (counters.total, counters.done, counters.failed, counters.skipped) == (40, 40, 0, 0)
