"""One worker heartbeat in Redis: the liveness beat carries the worker's queue and model, which `submit` reads."""

from __future__ import annotations

from collections.abc import Callable

import redis

from sam3_batch.contracts.registry import WORKERS_KEY, WorkerEntry, alive_key, beat, live_workers, model_refusal
from sam3_batch.contracts.settings import Settings
from sam3_batch.worker.celery_app import configure_app
from sam3_batch.worker.liveness import Liveness
from tests.fixtures.workers import wait_until


def test_the_liveness_beat_is_the_registry_entry_submit_reads_and_the_only_worker_key_family(
    settings_factory: Callable[..., Settings],
) -> None:
    settings = settings_factory(queue="gpu-a")
    client = redis.Redis.from_url(settings.broker_url.get_secret_value())
    loading = WorkerEntry(hostname="sam3@host-1", model_id="facebook/sam3", revision=None)
    liveness = Liveness(configure_app(settings), settings, loading, worker_id="host-1:42:abc")

    liveness.beat()
    [entry] = live_workers(client, "gpu-a")
    assert (entry.hostname, entry.queue, entry.model_id) == ("sam3@host-1", "gpu-a", "facebook/sam3")
    assert entry.commit is None  # still loading
    liveness.describe(loading.model_copy(update={"commit": "0123abcd"}))  # the model loaded: its commit is known
    liveness.beat()
    assert [e.commit for e in live_workers(client, "gpu-a")] == ["0123abcd"]
    assert live_workers(client, "gpu-b") == []  # another queue's submit does not see this worker
    worker_keys = {k.decode() for k in client.scan_iter("sam3b:worker*")}
    assert worker_keys == {WORKERS_KEY, alive_key("host-1:42:abc")}  # one key family, written by one beat


def test_an_expired_heartbeat_drops_the_worker_from_the_model_check(settings_factory: Callable[..., Settings]) -> None:
    settings = settings_factory()
    client = redis.Redis.from_url(settings.broker_url.get_secret_value())
    other = WorkerEntry(hostname="sam3@old", model_id="other/model", revision=None, queue="sam3")
    beat(client, "old:1:x", other, ttl_s=1)
    workers = live_workers(client, "sam3")
    assert model_refusal(workers, "sam3", "facebook/sam3", None) is not None  # a live worker of another model

    wait_until(lambda: not live_workers(client, "sam3"), 30, "the heartbeat to expire")
    assert model_refusal(live_workers(client, "sam3"), "sam3", "facebook/sam3", None) is None
