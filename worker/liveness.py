"""The worker heartbeat (the only one in Redis: keys in ``contracts/registry.py``), and the return of a
dead worker's chunks to the queue within seconds.

Kombu's Redis transport keeps every delivered, unacked message in the ``unacked`` hash (and its delivery
time in ``unacked_index``) until the worker acks it; a worker that dies leaves its chunks there until the
visibility timeout (an hour by default). Here each worker process

- publishes a heartbeat: ``sam3b:worker:<id>:alive`` (its queue and model, which `submit` checks) with a
  TTL, refreshed by its own thread (the model never delays it), and records every delivery tag it
  receives, with the time, in ``…:holds``;
- runs a reaper thread: for every known worker whose heartbeat has expired, it puts the chunks that worker
  still holds back on their queue, in one Lua step that re-checks, atomically, that the worker is still
  silent, the message is still unacked and was delivered no later than that worker recorded it (so a
  chunk since handed to a live worker is never taken from it).

A live-but-slow worker keeps its heartbeat, so its chunks are never touched; the visibility timeout stays
the safety net (e.g. a worker killed between receiving a message and recording it).
"""

from __future__ import annotations

import json
import logging
import os
import random
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from celery import Celery
from celery.signals import task_received, worker_shutdown

from sam3_batch.contracts.errors import reason_of
from sam3_batch.contracts.jobstate import RedisJobStore
from sam3_batch.contracts.registry import (
    HEARTBEAT_INTERVAL_S,
    HEARTBEAT_TTL_S,
    WORKERS_KEY,
    WorkerEntry,
    alive_key,
    holds_key,
)
from sam3_batch.contracts.registry import beat as publish_beat
from sam3_batch.contracts.settings import Settings

__all__ = ["HEARTBEAT_INTERVAL_S", "HEARTBEAT_TTL_S", "REAP_INTERVAL_S", "WORKERS_KEY", "Liveness", "alive_key",
           "holds_key"]

log = logging.getLogger(__name__)

REAP_INTERVAL_S = 4.0


# KEYS: alive, holds, unacked, unacked_index, queue list(s); ARGV: tag, recorded-at, unacked entry, payload.
_RESTORE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
local entry = redis.call('HGET', KEYS[3], ARGV[1])
local delivered = redis.call('ZSCORE', KEYS[4], ARGV[1])
if (not entry) or entry ~= ARGV[3] or (not delivered) or tonumber(delivered) > tonumber(ARGV[2]) then
  redis.call('HDEL', KEYS[2], ARGV[1])
  return 0
end
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
for i = 5, #KEYS do redis.call('RPUSH', KEYS[i], ARGV[4]) end
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
"""

# Forget tags the worker no longer holds (acked, or put back by kombu): they can never be restored.
_PRUNE = """
local tags = redis.call('HKEYS', KEYS[1])
for _, tag in ipairs(tags) do
  if redis.call('HEXISTS', KEYS[2], tag) == 0 then redis.call('HDEL', KEYS[1], tag) end
end
return #tags
"""


class Liveness:
    """One worker process's heartbeat and reaper threads (start once, before the worker consumes).

    With ``reap`` off (``worker_heartbeat`` setting) it still beats, so `submit` sees the worker's model,
    but records no deliveries and puts back no one's chunks: the visibility timeout alone covers them.
    """

    def __init__(self, app: Celery, settings: Settings, entry: WorkerEntry, worker_id: str | None = None,
                 *, reap: bool = True) -> None:
        self.app, self.settings, self.reaps = app, settings, reap
        self.entry = entry.model_copy(update={"queue": settings.queue, "pid": os.getpid()})
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.redis: redis.Redis = RedisJobStore(settings.broker_url.get_secret_value()).client
        self._restore = self.redis.register_script(_RESTORE)
        self._prune = self.redis.register_script(_PRUNE)
        self._stop = threading.Event()

    def start(self) -> None:
        """Keep beating and reaping in daemon threads (the first beat at once; never blocks the worker's start).

        A worker is reaped only once it is in the workers set, which its first beat adds together with its
        heartbeat key, so a delivery recorded before that beat is never taken from a live worker.
        """
        worker_shutdown.connect(self._on_shutdown, weak=False)
        steps: list[tuple[str, float, Callable[[], object]]] = [("heartbeat", HEARTBEAT_INTERVAL_S, self.beat)]
        if self.reaps:
            task_received.connect(self._on_received, weak=False)
            steps.append(("reaper", REAP_INTERVAL_S, self.reap))
        for name, period, step in steps:
            threading.Thread(target=self._every, args=(period, step), name=f"sam3-{name}", daemon=True).start()

    def describe(self, entry: WorkerEntry) -> None:
        """What the next beats publish (e.g. the model's resolved commit, once the model is loaded)."""
        self.entry = entry.model_copy(update={"queue": self.settings.queue, "pid": self.entry.pid})

    def beat(self) -> None:
        """Refresh this worker's heartbeat and forget the tags it no longer holds."""
        publish_beat(self.redis, self.worker_id, self.entry)
        if self.reaps:
            self._prune(keys=[holds_key(self.worker_id), _unacked_key()])

    def hold(self, delivery_tag: str) -> None:
        """Record a delivery this worker holds (after kombu recorded it as unacked, with an earlier time)."""
        self.redis.hset(holds_key(self.worker_id), delivery_tag, repr(time.time()))

    def reap(self) -> int:
        """Put back the chunks of every worker whose heartbeat expired; returns how many were put back."""
        returned = 0
        members: set[bytes] = self.redis.smembers(WORKERS_KEY)  # type: ignore[assignment]
        for raw_id in members:
            worker_id = raw_id.decode()
            if worker_id == self.worker_id or self.redis.exists(alive_key(worker_id)):
                continue
            returned += self._reap_worker(worker_id)
        return returned

    def _reap_worker(self, worker_id: str) -> int:
        returned = 0
        held: dict[bytes, bytes] = self.redis.hgetall(holds_key(worker_id))  # type: ignore[assignment]
        with self.app.connection_for_write() as connection:
            channel = connection.default_channel
            for tag, recorded_at in held.items():
                returned += self._restore_one(channel, worker_id, tag.decode(), recorded_at.decode())
        if not self.redis.hlen(holds_key(worker_id)):
            self.redis.srem(WORKERS_KEY, worker_id)
        if returned:
            log.warning("worker %s stopped beating: %d chunk(s) it held are back on the queue", worker_id, returned)
        return returned

    def _restore_one(self, channel: Any, worker_id: str, tag: str, recorded_at: str) -> int:
        entry: bytes | None = self.redis.hget(_unacked_key(), tag)  # type: ignore[assignment]
        if entry is None:
            self.redis.hdel(holds_key(worker_id), tag)
            return 0
        queues, payload = _requeue_targets(channel, entry)
        keys = [alive_key(worker_id), holds_key(worker_id), _unacked_key(), _unacked_index_key(), *queues]
        return max(int(self._restore(keys=keys, args=[tag, recorded_at, entry, payload])), 0)

    def _on_received(self, request: Any = None, **_: Any) -> None:
        tag = getattr(getattr(request, "message", None), "delivery_tag", None)
        if tag:
            try:
                self.hold(str(tag))
            except redis.RedisError as exc:  # the visibility timeout still covers this chunk
                log.warning("could not record delivery %s: %s", tag, reason_of(exc))

    def _on_shutdown(self, **_: Any) -> None:
        # Warm shutdown: chunks in hand are finished and the rest put back by kombu; nothing is held.
        self._stop.set()
        try:
            self.redis.delete(alive_key(self.worker_id), holds_key(self.worker_id))
            self.redis.srem(WORKERS_KEY, self.worker_id)
        except redis.RedisError as exc:
            log.warning("could not deregister worker %s: %s", self.worker_id, reason_of(exc))

    def _every(self, period: float, step: Callable[[], object]) -> None:
        while not self._stop.is_set():
            try:
                step()
            except Exception as exc:  # Redis down for a while: try again next period
                log.warning("%s failed: %s", getattr(step, "__name__", "liveness step"), reason_of(exc))
            self._stop.wait(period * random.uniform(0.8, 1.0))


def _requeue_targets(channel: Any, entry: bytes) -> tuple[list[str], str]:
    """The queue list(s) and body kombu itself would restore an unacked entry to (see ``restore_by_tag``)."""
    message, exchange, routing_key = json.loads(entry)
    try:
        message["headers"]["redelivered"] = True
        message["properties"]["delivery_info"]["redelivered"] = True
    except (KeyError, TypeError):
        pass
    priority = channel._get_message_priority(message, reverse=False)
    queues = [channel._q_for_pri(queue, priority) for queue in channel._lookup(exchange, routing_key)]
    return queues, json.dumps(message)


def _unacked_key() -> str:
    return "unacked"  # kombu's Redis transport defaults (no global_keyprefix is configured)


def _unacked_index_key() -> str:
    return "unacked_index"
