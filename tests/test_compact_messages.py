"""Queued chunk messages are compact JSON (≤ 40 bytes of Redis per image at 32 images a chunk), and a real
Celery worker runs them: a redelivered copy, in the compact or the previous (full Celery) envelope, counts once.

Runs a real Redis and a real worker process with the tiny checkpoint; inputs and outputs are local files.
"""

from __future__ import annotations

import base64
import json
import zlib
from pathlib import Path
from typing import Any

import redis
from PIL import Image

from sam3_batch.contracts.jobstate import RedisJobStore
from sam3_batch.contracts.queue import TASK_NAME, make_celery
from sam3_batch.contracts.schemas import ChunkMessage, WorkItem
from sam3_batch.contracts.settings import Settings
from sam3_batch.producer.backpressure import Backpressure
from sam3_batch.producer.dispatch import CeleryDispatcher
from tests.fixtures.workers import run_cli, wait_for_job, wait_until

BYTES_PER_IMAGE_GOAL = 40


def _chunk(images: int) -> ChunkMessage:
    job_id = "20261129-160000-abc123"
    items = [WorkItem(uri=f"s3://bucket/images/{n // 1000:04d}/{n:07d}.jpg", out_key=f"{n // 1000:04d}/{n:07d}.jpg")
             for n in range(images)]
    return ChunkMessage(job_id=job_id, chunk_id=f"{job_id}-g0-000000007", items=items)


def _dispatcher(settings: Settings) -> CeleryDispatcher:
    return CeleryDispatcher(make_celery(settings), settings.queue, Backpressure(lambda: 0, high=10, low=1))


def _body(raw: bytes) -> Any:
    envelope = json.loads(raw)
    return json.loads(zlib.decompress(base64.b64decode(envelope["body"])))


def test_a_queued_chunk_of_32_images_takes_at_most_40_bytes_per_image_and_is_plain_json(
    settings_factory: Any,
) -> None:
    settings = settings_factory()
    client = redis.Redis.from_url(settings.broker_url.get_secret_value())
    chunk = _chunk(32)
    _dispatcher(settings).send(chunk)

    [raw] = client.lrange(settings.queue, 0, -1)
    envelope = json.loads(raw)
    assert envelope["content-type"] == "application/json"  # never pickle
    assert envelope["headers"]["task"] == TASK_NAME and envelope["headers"]["id"] == chunk.chunk_id
    args, kwargs, _ = _body(raw)
    assert ChunkMessage.model_validate(args[0]) == chunk and kwargs == {}
    stored = int(client.memory_usage(settings.queue, samples=0) or 0)
    assert stored / 32 <= BYTES_PER_IMAGE_GOAL, (stored, len(raw))


def test_a_chunk_queued_again_in_either_envelope_is_processed_and_counted_once(
    settings_factory: Any, tiny_checkpoint: Path, worker_factory: Any, tmp_path: Path,
) -> None:
    settings = settings_factory(model=str(tiny_checkpoint), device="cpu", chunk_size=2, batch_size=2)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for n in range(3):
        Image.new("RGB", (32, 24), (40 * n, 80, 120)).save(inputs / f"{n}.png")
    submitted = run_cli(["submit", str(inputs), "--out", str(tmp_path / "out"), "-p", "cat", "--json"], settings)
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["job_id"]
    client = redis.Redis.from_url(settings.broker_url.get_secret_value())
    queued = client.lrange(settings.queue, 0, -1)
    assert len(queued) == 2  # no worker yet: both chunks wait in the queue
    first = ChunkMessage.model_validate(_body(queued[-1])[0][0])  # LPUSH: the oldest is last
    # Redelivery puts the same serialized message back; a queue from before the upgrade holds Celery's own.
    client.lpush(settings.queue, queued[-1])
    make_celery(settings).send_task(TASK_NAME, args=[first.model_dump(mode="json")], queue=settings.queue)

    worker = worker_factory(settings)
    store = RedisJobStore(settings.state_redis_url())
    counters = wait_for_job(store, job_id, workers=[worker])
    wait_until(lambda: worker.log().count("succeeded") >= 4, 120, "all four messages to be run",
               details=worker.log)

    assert (counters.total, counters.done, counters.failed) == (3, 3, 0)
    assert store.counters(job_id) == counters and store.chunks_marked(job_id, "recorded") == 2
    assert client.llen(settings.queue) == 0
    assert sorted(p.name for p in (tmp_path / "out").glob("*.json")) == ["0.png.json", "1.png.json", "2.png.json"]
