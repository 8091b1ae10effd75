"""A dead worker's chunk is back on the queue in seconds (heartbeats), never a live-but-slow worker's.

Real worker processes, real Redis, moto's S3 server behind the fault-injecting proxy. The visibility
timeout is an hour here, so only the heartbeat path can bring the chunk back within the test.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from sam3_batch.contracts.jobstate import RedisJobStore
from sam3_batch.contracts.settings import Settings
from sam3_batch.worker.liveness import HEARTBEAT_TTL_S, REAP_INTERVAL_S, WORKERS_KEY, alive_key, holds_key
from tests.fixtures.faulty_proxy import FaultyProxy
from tests.fixtures.workers import WorkerProcess, run_cli, wait_for_job, wait_until

pytestmark = pytest.mark.slow

IMAGES = {"in/a0.jpg": "jpeg", "in/a1.png": "png"}  # one chunk of two


def _held_tags(client: redis.Redis) -> dict[str, set[str]]:
    """Delivery tags each registered worker holds, as recorded in its heartbeat hash."""
    members: set[bytes] = client.smembers(WORKERS_KEY)  # type: ignore[assignment]
    held: dict[str, set[str]] = {}
    for raw in members:
        tags: list[bytes] = client.hkeys(holds_key(raw.decode()))  # type: ignore[assignment]
        held[raw.decode()] = {t.decode() for t in tags}
    return held


def _live_workers(client: redis.Redis) -> set[str]:
    members: set[bytes] = client.smembers(WORKERS_KEY)  # type: ignore[assignment]
    return {m.decode() for m in members if client.exists(alive_key(m.decode()))}


def _holder_of(client: redis.Redis, tag: str) -> str | None:
    return next((worker for worker, tags in _held_tags(client).items() if tag in tags), None)


def test_killed_worker_chunk_is_back_within_seconds_and_a_slow_live_worker_keeps_its_chunk(
    settings_factory: Callable[..., Settings], tiny_checkpoint: Path, faulty_s3: FaultyProxy, s3_client: Any,
    s3_bucket: str, image_bytes_factory: Callable[[str], bytes], worker_factory: Callable[..., WorkerProcess],
) -> None:
    settings = settings_factory(model=str(tiny_checkpoint), device="cpu", chunk_size=2, batch_size=2,
                                visibility_timeout_s=3600, s3_endpoint_url=faulty_s3.endpoint_url,
                                s3_read_timeout_s=300.0)
    for key, kind in IMAGES.items():
        s3_client.put_object(Bucket=s3_bucket, Key=key, Body=image_bytes_factory(kind))
    faulty_s3.add_fault("GET", f"/{s3_bucket}/in/a0.jpg", "delay", times=1, hold_s=280)
    broker = redis.Redis.from_url(settings.broker_url.get_secret_value())
    holder = worker_factory(settings, "holder")
    holder.wait_for_log("ready")
    submitted = run_cli(["submit", f"s3://{s3_bucket}/in/", "--out", f"s3://{s3_bucket}/out", "-p", "cat",
                         "--threshold", "0", "--json"], settings)
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["job_id"]
    wait_until(lambda: faulty_s3.count("GET", "/in/a0.jpg", faulted=True), 180, "the holder to be mid-chunk")
    [holder_id] = _live_workers(broker)
    [tag] = _held_tags(broker)[holder_id]
    assert broker.hexists("unacked", tag)

    live = worker_factory(settings, "live")
    live.wait_for_log("ready")
    wait_until(lambda: len(_live_workers(broker)) == 2, 60, "the second worker's heartbeat")
    # Slow but alive: several reaper rounds of the live worker pass after the holder's TTL would have run out.
    slow_since = time.monotonic()
    wait_until(lambda: time.monotonic() - slow_since > HEARTBEAT_TTL_S + 3 * REAP_INTERVAL_S, 60,
               "the holder to stay busy past its heartbeat TTL", poll=1.0)
    assert _holder_of(broker, tag) == holder_id and broker.hexists("unacked", tag)
    assert broker.llen(settings.queue) == 0 and "] received" not in live.log()

    holder.kill_with_children()  # kill -9: no warm shutdown, nothing acked or put back by kombu
    killed_at = time.monotonic()
    live_id = next(iter(_live_workers(broker) - {holder_id}))
    wait_until(lambda: _holder_of(broker, tag) == live_id, HEARTBEAT_TTL_S + 6 * REAP_INTERVAL_S,
               "the live worker to receive the dead worker's chunk", poll=0.1)
    recovered_s = time.monotonic() - killed_at
    counters = wait_for_job(RedisJobStore(settings.state_redis_url()), job_id, workers=[live])
    print(f"\nkilled worker's chunk back with a live worker after {recovered_s:.1f} s "
          f"(job complete after {time.monotonic() - killed_at:.1f} s; visibility timeout 3600 s)")

    assert recovered_s < HEARTBEAT_TTL_S + 3 * REAP_INTERVAL_S
    assert (counters.total, counters.done, counters.failed) == (2, 2, 0)
    assert "stopped beating: 1 chunk(s) it held are back on the queue" in live.log()
    assert holder_id not in _live_workers(broker)
    wait_until(lambda: not broker.hexists("unacked", tag), 30, "the live worker to ack the chunk")
    assert broker.hlen("unacked") == 0 and broker.llen(settings.queue) == 0
