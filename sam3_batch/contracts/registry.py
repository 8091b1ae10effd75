"""The one worker heartbeat in Redis (on the broker's Redis), and what it tells: which workers live, on
which queue, serving which model.

One key family, one writer (``worker/liveness.py``'s heartbeat thread, one per worker):

- ``sam3b:worker:<id>:alive``: this worker's ``WorkerEntry`` as JSON, with a TTL the beat refreshes;
- ``sam3b:workers``: the ids of the workers that have beaten (the reaper removes dead ones);
- ``sam3b:worker:<id>:holds``: the delivery tags it holds, for the reaper to put back if it dies.

``submit`` reads the live entries of its queue to refuse a job no live worker could run (every image
would fail at once); the reaper reads the same keys to find dead workers.
"""

from __future__ import annotations

import redis
from pydantic import BaseModel, ConfigDict

from sam3_batch.contracts.jobstate import KEY_PREFIX

HEARTBEAT_INTERVAL_S = 3.0
HEARTBEAT_TTL_S = 12  # four missed beats: a worker silent this long is dead
WORKERS_KEY = f"{KEY_PREFIX}:workers"


def alive_key(worker_id: str) -> str:
    return f"{KEY_PREFIX}:worker:{worker_id}:alive"


def holds_key(worker_id: str) -> str:
    return f"{KEY_PREFIX}:worker:{worker_id}:holds"


class WorkerEntry(BaseModel):
    """One worker's heartbeat: where it runs, its queue, and its model as it loaded it (``commit``: the
    resolved hub commit, when known)."""

    model_config = ConfigDict(frozen=True)

    hostname: str
    model_id: str
    revision: str | None
    commit: str | None = None
    queue: str = ""
    pid: int = 0

    def serves(self, model_id: str, revision: str | None) -> bool:
        return (self.model_id, self.revision) == (model_id, revision)

    def describe(self) -> str:
        return f"{self.model_id} (revision {self.revision})"


def beat(client: redis.Redis, worker_id: str, entry: WorkerEntry, ttl_s: int = HEARTBEAT_TTL_S) -> None:
    """Refresh one worker's heartbeat (its entry, with a TTL) and its membership of the workers set."""
    with client.pipeline() as pipe:
        pipe.set(alive_key(worker_id), entry.model_dump_json(), ex=ttl_s)
        pipe.sadd(WORKERS_KEY, worker_id)
        pipe.execute()


def live_workers(client: redis.Redis, queue: str) -> list[WorkerEntry]:
    """The entries of the workers of ``queue`` whose heartbeat has not expired."""
    members: set[bytes] = client.smembers(WORKERS_KEY)  # type: ignore[assignment]
    ids = sorted(m.decode() for m in members)
    if not ids:
        return []
    raw: list[bytes | None] = client.mget([alive_key(i) for i in ids])  # type: ignore[assignment]
    entries = [WorkerEntry.model_validate_json(value) for value in raw if value is not None]
    return [entry for entry in entries if entry.queue == queue]


def model_refusal(workers: list[WorkerEntry], queue: str, model_id: str, revision: str | None) -> str | None:
    """Why a job for this model should not be queued here, or None (no live worker yet: it may scale up)."""
    if not workers or any(w.serves(model_id, revision) for w in workers):
        return None
    served = ", ".join(sorted({w.describe() for w in workers}))
    return (f"no live worker on queue {queue!r} serves model {model_id} (revision {revision}); they serve "
            f"{served}: start workers for it with `sam3-batch worker --queue NAME` and submit with --queue NAME")
