"""Which models the live workers of a queue serve: a Redis hash each worker refreshes while it runs.

``submit`` reads it to refuse a job no live worker could run (its every image would fail at once).
"""

from __future__ import annotations

import time

import redis
from pydantic import BaseModel, ConfigDict

from sam3_batch.contracts.jobstate import KEY_PREFIX

LIVE_WITHIN_S = 120.0  # a worker refreshes its entry every few seconds; older entries are gone workers


def registry_key(queue: str) -> str:
    return f"{KEY_PREFIX}:workers:{queue}"


class WorkerEntry(BaseModel):
    """One worker's model, as it loaded it (``commit``: the resolved hub commit, when known)."""

    model_config = ConfigDict(frozen=True)

    hostname: str
    model_id: str
    revision: str | None
    commit: str | None = None
    seen_at: float = 0.0

    def serves(self, model_id: str, revision: str | None) -> bool:
        return (self.model_id, self.revision) == (model_id, revision)

    def describe(self) -> str:
        return f"{self.model_id} (revision {self.revision})"


def register_worker(client: redis.Redis, queue: str, entry: WorkerEntry) -> None:
    """Add or refresh this worker's entry (called at start-up and then every few seconds)."""
    fresh = entry.model_copy(update={"seen_at": time.time()})
    client.hset(registry_key(queue), entry.hostname, fresh.model_dump_json())


def unregister_worker(client: redis.Redis, queue: str, hostname: str) -> None:
    client.hdel(registry_key(queue), hostname)


def live_workers(client: redis.Redis, queue: str, within_s: float = LIVE_WITHIN_S) -> list[WorkerEntry]:
    """Entries refreshed within ``within_s``; stale ones are removed."""
    raw: dict[bytes, bytes] = client.hgetall(registry_key(queue))  # type: ignore[assignment]
    entries = [WorkerEntry.model_validate_json(v) for v in raw.values()]
    stale = [e.hostname for e in entries if time.time() - e.seen_at > within_s]
    if stale:
        client.hdel(registry_key(queue), *stale)
    return [e for e in entries if e.hostname not in stale]


def model_refusal(workers: list[WorkerEntry], queue: str, model_id: str, revision: str | None) -> str | None:
    """Why a job for this model should not be queued here, or None (no live worker yet: it may scale up)."""
    if not workers or any(w.serves(model_id, revision) for w in workers):
        return None
    served = ", ".join(sorted({w.describe() for w in workers}))
    return (f"no live worker on queue {queue!r} serves model {model_id} (revision {revision}); they serve "
            f"{served}: start workers for it with `sam3-batch worker --queue NAME` and submit with --queue NAME")
