"""Faults a running job survives: killed and stopped workers, a chunk run twice, a Redis restart, S3 faults.

Every test runs real worker processes against real Redis and a SeaweedFS S3 server behind a fault-injecting
proxy. A ``delay`` fault holds one request, so the test knows a worker is in the middle of a chunk when
it strikes; every wait is on real state (Redis keys, proxy request counts, files, logs).
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis
from PIL import Image

from sam3_batch.contracts.jobstate import RedisJobStore
from sam3_batch.contracts.layout import shard_name, shard_of_jobs_key
from sam3_batch.contracts.schemas import ImageMetadata, JobCounters
from sam3_batch.contracts.settings import Settings
from sam3_batch.results import metadata_of_row
from sam3_batch.worker.encode import decode_rle
from tests.fixtures.faulty_proxy import FaultyProxy
from tests.fixtures.workers import (
    WorkerProcess,
    run_cli,
    start_cli,
    unacked_ages,
    wait_for_job,
    wait_until,
)

pytestmark = pytest.mark.slow

VISIBILITY_S = 10  # the smallest the settings allow; a chunk unacked this long is redelivered
# Five images in chunks of two: a0+a1, b0+b1, c0.
IMAGES = {"in/a0.jpg": "jpeg", "in/a1.png": "png", "in/b0.webp": "webp", "in/b1.jpg": "cmyk_jpeg", "in/c0.png": "gray"}
# The key every test kills or watches: chunk a0+a1's done marker in each layout (the shard's name does not
# depend on the job id, so a fault can be set before the job exists).
LAYOUTS = ["image", "chunk"]
A_CHUNK_MARKER = {"image": "/out/a0.jpg.json", "chunk": f"/parts/{shard_name(2, ['a0.jpg', 'a1.png'])}"}


def _settings(settings_factory: Callable[..., Settings], tiny_checkpoint: Path, proxy: FaultyProxy,
              **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "model": str(tiny_checkpoint), "device": "cpu", "chunk_size": 2, "batch_size": 2,
        "visibility_timeout_s": VISIBILITY_S, "s3_endpoint_url": proxy.endpoint_url,
        # A held request must outlast the scenario rather than time out and be retried by boto.
        "s3_read_timeout_s": 300.0,
    }
    values.update(overrides)
    return settings_factory(**values)


def _upload(s3_client: Any, bucket: str, images: dict[str, str], image_bytes: Callable[[str], bytes]) -> None:
    for key, kind in images.items():
        s3_client.put_object(Bucket=bucket, Key=key, Body=image_bytes(kind))


def _submit(settings: Settings, bucket: str, *extra: str) -> str:
    done = run_cli(["submit", f"s3://{bucket}/in/", "--out", f"s3://{bucket}/out", "-p", "cat",
                    "--threshold", "0", "--json", *extra], settings)
    assert done.returncode == 0, done.stderr
    return str(json.loads(done.stdout)["job_id"])


def _keys(s3_client: Any, bucket: str, prefix: str) -> set[str]:
    pages = s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {entry["Key"] for page in pages for entry in page.get("Contents", [])}


def _read(s3_client: Any, bucket: str, key: str) -> bytes:
    return bytes(s3_client.get_object(Bucket=bucket, Key=key)["Body"].read())


def _shard_keys(keys: set[str]) -> list[str]:
    """The chunk layout's shards among the listed keys."""
    return sorted(k for k in keys if k.startswith("out/_jobs/") and shard_of_jobs_key(k[len("out/_jobs/"):]))


def _metadata_documents(s3_client: Any, bucket: str, keys: set[str], layout: str) -> dict[str, ImageMetadata]:
    """out_key -> metadata of each done image: its K.json (image layout) or its shard row (chunk layout)."""
    if layout == "image":
        return {
            key.removeprefix("out/").removesuffix(".json"): ImageMetadata.model_validate_json(
                _read(s3_client, bucket, key))
            for key in sorted(k for k in keys if k.endswith(".json") and not k.startswith("out/_jobs/"))
        }
    found: dict[str, ImageMetadata] = {}
    for key in _shard_keys(keys):
        for row in pq.read_table(pa.BufferReader(_read(s3_client, bucket, key))).to_pylist():
            assert row["out_key"] not in found, f"{row['out_key']} is in two shards: a chunk was written twice"
            if row["status"] == "done":
                found[row["out_key"]] = metadata_of_row(row)
    return found


def _done_images(s3_client: Any, bucket: str, layout: str = "image") -> dict[str, ImageMetadata]:
    """What a reader sees as done (metadata present), checked whole: every mask it names exists and matches."""
    keys = _keys(s3_client, bucket, "out/")
    found: dict[str, ImageMetadata] = {}
    for out_key, metadata in _metadata_documents(s3_client, bucket, keys, layout).items():
        key = f"out/{out_key}"
        for annotation in metadata.annotations:
            assert annotation.mask_png is not None, key
            png_key = annotation.mask_png.removeprefix(f"s3://{bucket}/")
            assert png_key in keys, f"{key} names {png_key}, which is missing: a half result"
            png = np.array(Image.open(io.BytesIO(_read(s3_client, bucket, png_key))).convert("L")) > 0
            assert np.array_equal(png, decode_rle(annotation.segmentation)), png_key
        found[out_key] = metadata
    return found


def _assert_one_complete_output_per_image(s3_client: Any, bucket: str, images: dict[str, str],
                                          layout: str = "image") -> None:
    done = _done_images(s3_client, bucket, layout)
    assert sorted(done) == sorted(k.removeprefix("in/") for k in images)
    for out_key, metadata in done.items():
        assert metadata.image.uri == f"s3://{bucket}/in/{out_key}"
        assert metadata.annotations, f"{out_key}: threshold 0 keeps every query, so masks are expected"
    # Rewrites reuse the same keys, so nothing is duplicated and no mask is left over from a dead run.
    pngs = {k for k in _keys(s3_client, bucket, "out/") if k.endswith(".png") and ".masks/" in k}
    named = {a.mask_png.removeprefix(f"s3://{bucket}/") for m in done.values() for a in m.annotations if a.mask_png}
    assert pngs == named


def _assert_exact(counters: JobCounters, total: int, failed: int = 0) -> None:
    assert (counters.total, counters.done, counters.failed, counters.skipped) == (total, total - failed, failed, 0)


def _wait_held(proxy: FaultyProxy, method: str, key: str, times: int = 1) -> None:
    wait_until(lambda: proxy.count(method, key, faulted=True) >= times, 180,
               f"a worker to be held on {method} {key} (#{times})")


def _kill_pool_child(worker: WorkerProcess) -> int:
    """SIGKILL the prefork pool's task process (as the kernel's OOM killer would); returns its pid."""
    [child] = wait_until(worker.child_pids, 60, "the pool's task process")
    worker_lost = worker.log().count("WorkerLostError")
    os.kill(child, signal.SIGKILL)
    worker.wait_for_log("WorkerLostError", count=worker_lost + 1)
    return int(child)


def _wait_redeliverable(broker_url: str) -> None:
    """Wait until kombu would put the dead worker's delivery back: older than the visibility timeout."""
    client = redis.Redis.from_url(broker_url)
    wait_until(lambda: (ages := unacked_ages(client)) and min(ages) > VISIBILITY_S + 0.5, 60,
               "the dead worker's delivery to pass the visibility timeout", poll=0.5)
    client.close()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_worker_killed_three_times_mid_chunk_redelivers_it_and_every_image_has_one_complete_output(
    settings_factory: Callable[..., Settings], tiny_checkpoint: Path, faulty_s3: FaultyProxy, s3_client: Any,
    s3_bucket: str, image_bytes_factory: Callable[[str], bytes], worker_factory: Any, layout: str,
) -> None:
    settings = _settings(settings_factory, tiny_checkpoint, faulty_s3)
    _upload(s3_client, s3_bucket, IMAGES, image_bytes_factory)
    # Three moments inside chunk a0+a1: downloading, writing a mask, writing the done marker (last).
    moments = [("GET", f"/{s3_bucket}/in/a0.jpg"), ("PUT", f"/{s3_bucket}/out/a0.jpg.masks/p00_i001.png"),
               ("PUT", A_CHUNK_MARKER[layout])]
    for method, key in moments:
        faulty_s3.add_fault(method, key, "delay", times=1)
    first = worker_factory(settings, "w1", pool="prefork")
    job_id = _submit(settings, s3_bucket, "--png-masks", "--layout", layout)
    store = RedisJobStore(settings.state_redis_url())

    # Kills 1 and 2: the pool process dies; its parent sees the worker lost and requeues the chunk at once.
    for method, key in moments[:2]:
        _wait_held(faulty_s3, method, key)
        _kill_pool_child(first)
    # Kill 3: the whole worker dies (a lost node) while the done marker is being written.
    _wait_held(faulty_s3, *moments[2])
    assert "a0.jpg" not in _done_images(s3_client, s3_bucket, layout)  # masks exist, but a reader sees no result
    first.kill_with_children()
    _wait_redeliverable(settings.broker_url.get_secret_value())
    second = worker_factory(settings, "w2")  # its start-up sweep puts the chunk back on the queue

    counters = wait_for_job(store, job_id, workers=[first, second])

    _assert_exact(counters, total=len(IMAGES))
    assert store.chunks_marked(job_id, "recorded") == 3  # each chunk counted once
    assert [faulty_s3.dropped(method, key) for method, key in moments] == [1, 1, 1]  # died mid-request
    _assert_one_complete_output_per_image(s3_client, s3_bucket, IMAGES, layout)
    if layout == "chunk":
        assert len(_shard_keys(_keys(s3_client, s3_bucket, "out/"))) == 3  # one shard per chunk


def test_sigterm_mid_chunk_finishes_the_chunk_in_hand_and_loses_nothing(
    settings_factory: Callable[..., Settings], tiny_checkpoint: Path, faulty_s3: FaultyProxy, s3_client: Any,
    s3_bucket: str, image_bytes_factory: Callable[[str], bytes], worker_factory: Any,
) -> None:
    settings = _settings(settings_factory, tiny_checkpoint, faulty_s3)
    _upload(s3_client, s3_bucket, IMAGES, image_bytes_factory)
    faulty_s3.add_fault("GET", f"/{s3_bucket}/in/a0.jpg", "delay", times=1)
    worker = worker_factory(settings)
    job_id = _submit(settings, s3_bucket, "--png-masks")
    store = RedisJobStore(settings.state_redis_url())
    broker = redis.Redis.from_url(settings.broker_url.get_secret_value())
    _wait_held(faulty_s3, "GET", "/in/a0.jpg")

    worker.process.send_signal(signal.SIGTERM)  # as Kubernetes does on scale-down or a spot reclaim
    worker.wait_for_log("Warm shutdown")
    faulty_s3.release()

    assert worker.process.wait(timeout=120) == 0
    in_hand = f"{job_id}-g0-000000000"
    assert store.is_chunk_recorded(job_id, in_hand)  # finished and counted by the stopping worker itself
    assert store.counters(job_id).done == 2
    assert sorted(_done_images(s3_client, s3_bucket)) == ["a0.jpg", "a1.png"]
    # Nothing is lost: nothing waits unacked for a timeout, and the other chunks wait whole on the queue.
    assert broker.hlen("unacked") == 0
    queued = _queued_chunks(broker, settings.queue)
    assert sorted(c["chunk_id"] for c in queued) == [f"{job_id}-g0-000000001", f"{job_id}-g0-000000002"]
    assert sorted(i["uri"] for c in queued for i in c["items"]) == sorted(
        f"s3://{s3_bucket}/{k}" for k in IMAGES if not k.startswith("in/a"))


def _queued_chunks(broker: redis.Redis, queue: str) -> list[dict[str, Any]]:
    """The chunk messages waiting on a Celery queue (kombu envelope, base64, zlib, JSON task args)."""
    raw: list[bytes] = broker.lrange(queue, 0, -1)  # type: ignore[assignment]
    bodies = [json.loads(zlib.decompress(base64.b64decode(json.loads(r)["body"]))) for r in raw]
    return [body[0][0] for body in bodies]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_chunk_run_by_two_workers_at_once_counts_once_and_its_outputs_stay_whole(
    settings_factory: Callable[..., Settings], tiny_checkpoint: Path, faulty_s3: FaultyProxy, s3_client: Any,
    s3_bucket: str, image_bytes_factory: Callable[[str], bytes], worker_factory: Any, layout: str,
) -> None:
    settings = _settings(settings_factory, tiny_checkpoint, faulty_s3)
    images = {"in/a0.jpg": "jpeg", "in/a1.png": "png"}  # one chunk
    _upload(s3_client, s3_bucket, images, image_bytes_factory)
    faulty_s3.add_fault("GET", f"/{s3_bucket}/in/a0.jpg", "delay", times=1, hold_s=280)
    slow = worker_factory(settings, "slow")
    job_id = _submit(settings, s3_bucket, "--png-masks", "--layout", layout)
    store = RedisJobStore(settings.state_redis_url())
    _wait_held(faulty_s3, "GET", "/in/a0.jpg")
    # The slow worker is alive but its chunk outlives the visibility timeout: Redis hands it out again.
    _wait_redeliverable(settings.broker_url.get_secret_value())
    fast = worker_factory(settings, "fast")

    counters = wait_for_job(store, job_id, workers=[slow, fast])
    _assert_exact(counters, total=2)
    assert "a0.jpg" in _done_images(s3_client, s3_bucket, layout)
    faulty_s3.release()  # the slow run goes on and rewrites the same keys
    slow.wait_for_log("succeeded")

    assert faulty_s3.count("PUT", A_CHUNK_MARKER[layout], faulted=False) == 2  # written by both runs
    assert store.counters(job_id) == counters  # the second finish of the chunk is not counted
    assert "succeeded" in fast.log()
    done = _done_images(s3_client, s3_bucket, layout)
    assert {m.chunk_id for m in done.values()} == {f"{job_id}-g0-000000000"}
    _assert_one_complete_output_per_image(s3_client, s3_bucket, images, layout)
    if layout == "chunk":
        assert len(_shard_keys(_keys(s3_client, s3_bucket, "out/"))) == 1  # the same shard key, twice


def test_redis_restart_mid_job_reconnects_worker_and_producer_and_the_job_completes(
    settings_factory: Callable[..., Settings], tiny_checkpoint: Path, faulty_s3: FaultyProxy, s3_client: Any,
    s3_bucket: str, image_bytes_factory: Callable[[str], bytes], worker_factory: Any,
    redis_server_factory: Callable[..., Any],
) -> None:
    server = redis_server_factory(persist=True)  # queue and job state are on disk, as in production
    # High water 1: the producer sends a chunk only when the queue is empty, so it is mid-listing below.
    settings = _settings(settings_factory, tiny_checkpoint, faulty_s3, broker_url=server.url,
                         queue_high_water=1, queue_low_water=0)
    _upload(s3_client, s3_bucket, IMAGES, image_bytes_factory)
    faulty_s3.add_fault("GET", f"/{s3_bucket}/in/a0.jpg", "delay", times=1)
    worker = worker_factory(settings)
    producer = start_cli(["submit", f"s3://{s3_bucket}/in/", "--out", f"s3://{s3_bucket}/out", "-p", "cat",
                          "--threshold", "0", "--png-masks", "--json"], settings)
    store = RedisJobStore(settings.state_redis_url())
    client = redis.Redis.from_url(server.url)
    [job_id] = wait_until(store.job_ids, 60, "the job to be created")
    _wait_held(faulty_s3, "GET", "/in/a0.jpg")  # the worker is inside chunk 0 ...
    wait_until(lambda: (c := store.checkpoint(job_id)) and c.next_seq == 2 and client.llen(settings.queue) == 1,
               60, "the producer to send chunk 1 and wait for room")  # ... and the producer in its listing
    run_id = client.info("server")["run_id"]

    server.stop()
    server.start()
    assert client.info("server")["run_id"] != run_id
    faulty_s3.release()

    counters = wait_for_job(store, job_id, workers=[worker])
    out, err = producer.communicate(timeout=120)
    assert producer.returncode == 0, err
    assert json.loads(out)["chunks_sent"] == 3
    _assert_exact(counters, total=len(IMAGES))
    assert worker.alive() and "Connection to broker lost" in worker.log()
    _assert_one_complete_output_per_image(s3_client, s3_bucket, IMAGES)


def test_transient_s3_faults_are_retried_and_permanent_ones_fail_only_their_image_at_once(
    settings_factory: Callable[..., Settings], tiny_checkpoint: Path, faulty_s3: FaultyProxy, s3_client: Any,
    s3_bucket: str, image_bytes_factory: Callable[[str], bytes], worker_factory: Any,
) -> None:
    # boto makes at most 3 requests per call (adaptive mode); beyond that the task retries the chunk.
    settings = _settings(settings_factory, tiny_checkpoint, faulty_s3, s3_max_attempts=3, s3_retry_mode="adaptive")
    images = {f"in/{n}": "jpeg" for n in ("a1.jpg", "a2.jpg", "b1.jpg", "b2.jpg", "c1.jpg", "c2.jpg",
                                          "d1.jpg", "d2.jpg")}
    _upload(s3_client, s3_bucket, images, image_bytes_factory)
    b = f"/{s3_bucket}"
    faults: list[tuple[str, str, Any, int]] = [
        ("GET", f"{b}/in/a1.jpg", "500", 2),  # boto's third request succeeds
        ("GET", f"{b}/in/a2.jpg", "reset", 2),
        ("GET", f"{b}/in/b1.jpg", "slowdown", 4),  # boto gives up; the task retry gets through
        ("PUT", f"{b}/out/b2.jpg.json", "500", 3),  # the done marker cannot be written at first
        ("PUT", f"{b}/out/c1.jpg.json", "slowdown", 2),
        ("GET", f"{b}/in/d1.jpg", "403", 1),
        ("GET", f"{b}/in/d2.jpg", "404", 1),
    ]
    for method, key, kind, times in faults:
        faulty_s3.add_fault(method, key, kind, times=times)
    worker = worker_factory(settings)

    job_id = _submit(settings, s3_bucket)
    counters = wait_for_job(RedisJobStore(settings.state_redis_url()), job_id, workers=[worker])

    _assert_exact(counters, total=8, failed=2)
    requests = {key: faulty_s3.count(method, key) for method, key, _, _ in faults}
    assert requests == {
        f"{b}/in/a1.jpg": 3, f"{b}/in/a2.jpg": 3,
        f"{b}/in/b1.jpg": 5,  # 3 in the first run of the chunk, 2 in its retry
        f"{b}/out/b2.jpg.json": 4,  # 3 in the first run, 1 in the retry
        f"{b}/out/c1.jpg.json": 3,
        f"{b}/in/d1.jpg": 1, f"{b}/in/d2.jpg": 1,  # permanent: never retried
    }
    reasons = {f.uri.rsplit("/", 1)[-1]: f.reason for f in RedisJobStore(settings.state_redis_url()).failures(job_id)}
    assert sorted(reasons) == ["d1.jpg", "d2.jpg"]
    assert reasons["d1.jpg"].startswith("ForbiddenError") and "AccessDenied" in reasons["d1.jpg"]
    assert reasons["d2.jpg"].startswith("NotFoundError")
    done = {k.removeprefix("out/") for k in _keys(s3_client, s3_bucket, "out/") if k.endswith(".jpg.json")}
    assert done == {f"{n}.jpg.json" for n in ("a1", "a2", "b1", "b2", "c1", "c2")}
