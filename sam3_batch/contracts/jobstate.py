"""Job state: spec, idempotent per-chunk counters, failures, cancel flag and producer checkpoint.

Every key of a job shares the hash tag ``{job_id}`` so a Redis Cluster keeps a job on one slot.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from sam3_batch.contracts.chunk_ids import ChunkSlot, chunk_slot
from sam3_batch.contracts.errors import RequestError, StaleGenerationError
from sam3_batch.contracts.redact import display_uri, redact
from sam3_batch.contracts.schemas import Failure, ItemOutcome, JobCounters, JobSpec

KEY_PREFIX = "sam3b"
REPORT_CLAIM_TTL_S = 600
JOBS_INDEX = f"{KEY_PREFIX}:jobs"
# "planned", "recorded" and "started" are bitmaps indexed by chunk number (contracts.chunk_ids); the
# "*_ids" sets hold only chunks made outside the plan (retry-failed), so a job's state stays O(1) per image.
CHUNK_MARKS = ("planned", "recorded", "started")
JOB_PARTS = ("spec", "counters", *CHUNK_MARKS, *(f"{m}_ids" for m in CHUNK_MARKS), "failures", "checkpoint",
             "cancelled", "report_claim")


def job_key(job_id: str, part: str) -> str:
    """The Redis key of one part of a job's state."""
    return f"{KEY_PREFIX}:{{{job_id}}}:{part}"


@dataclass(frozen=True)
class JobStats:
    """A job's extras beside its counters: when it started and last moved, model time, and a fatal error."""

    started_at: float
    last_update: float | None = None
    model_seconds: float = 0.0
    instances: int = 0
    error: str | None = None  # set when the job as a whole failed (e.g. its source could not be opened)
    model_commit: str | None = None  # the hub commit the first worker to record a chunk had loaded
    expected_total: int | None = None  # images the listing is expected to give (a counting pass, --expected-images)


@dataclass(frozen=True)
class Checkpoint:
    """Where a producer stopped: the last listed position and the next chunk number."""

    position: str
    next_seq: int


class JobStore(Protocol):
    """Job state, in Redis for distributed jobs or in memory for embedded runs."""

    def create(self, spec: JobSpec) -> None: ...
    def spec(self, job_id: str) -> JobSpec: ...
    def register_chunk(self, job_id: str, chunk_id: str, plan: PlannedCounts, checkpoint: Checkpoint) -> bool: ...
    def record_chunk(
        self, job_id: str, chunk_id: str, outcomes: Sequence[ItemOutcome], model_seconds: float,
        generation: int | None = None,
    ) -> bool: ...
    def is_chunk_recorded(self, job_id: str, chunk_id: str) -> bool: ...
    def mark_chunk_started(self, job_id: str, chunk_id: str) -> bool: ...
    def chunks_marked(self, job_id: str, mark: str) -> int: ...
    def mark_listing_complete(self, job_id: str) -> None: ...
    def counters(self, job_id: str) -> JobCounters: ...
    def stats(self, job_id: str) -> JobStats: ...
    def set_error(self, job_id: str, reason: str | None) -> None: ...
    def note_model_commit(self, job_id: str, commit: str) -> None: ...
    def note_expected_total(self, job_id: str, total: int) -> None: ...
    def failures(self, job_id: str, limit: int | None = None) -> list[Failure]: ...
    def checkpoint(self, job_id: str) -> Checkpoint | None: ...
    def cancel(self, job_id: str) -> None: ...
    def is_cancelled(self, job_id: str) -> bool: ...
    def claim_report(self, job_id: str) -> bool: ...
    def settle_report(self, job_id: str, written: bool) -> None: ...
    def reopen_failures(self, job_id: str) -> list[Failure]: ...
    def job_ids(self) -> list[str]: ...
    def expire(self, job_id: str, seconds: int | None) -> None: ...
    def delete(self, job_id: str) -> None: ...
    def generation(self, job_id: str) -> int: ...
    def start_generation(self, job_id: str) -> int: ...


@dataclass(frozen=True)
class PlannedCounts:
    """What one planned chunk adds: all its entries to ``total``, some to ``skipped`` or ``failed``."""

    total: int
    skipped: int = 0
    failures: tuple[Failure, ...] = ()


def _slot_args(slot: ChunkSlot | None) -> tuple[int | str, int | str]:
    """A chunk's bit and generation as script arguments; empty strings for a chunk outside the plan."""
    return ("", "") if slot is None else (slot.bit, slot.generation)


class UnknownJobError(KeyError):
    """No job with this id exists in the store."""


# Counting and failure recording happen in one atomic script, only the first time a chunk is seen, so a
# redelivered or duplicated chunk never counts twice. A planned chunk is marked by its bit (ARGV[8]) in a
# bitmap, any other chunk by its id in a set. ARGV[7] is the generation the worker was given and ARGV[9] the
# one in the chunk id: a chunk planned before a resume replanned the job is refused (-1) in the same atomic
# step, so a resume landing between a check and the count can never count it (its bit now means another chunk).
_MARK = """
local function mark(bitmap, ids, bit, id)
  if bit ~= '' then return redis.call('SETBIT', bitmap, bit, 1) == 0 end
  return redis.call('SADD', ids, id) == 1
end
"""

_RECORD_CHUNK = _MARK + """
local generation = tonumber(redis.call('HGET', KEYS[3], 'generation') or '0')
if ARGV[7] ~= '' and tonumber(ARGV[7]) ~= generation then return -1 end
if ARGV[9] ~= '' and tonumber(ARGV[9]) ~= generation then return -1 end
if not mark(KEYS[1], KEYS[2], ARGV[8], ARGV[1]) then return 0 end
redis.call('HINCRBY', KEYS[3], 'done', ARGV[2])
redis.call('HINCRBY', KEYS[3], 'failed', ARGV[3])
redis.call('HINCRBY', KEYS[3], 'instances', ARGV[4])
redis.call('HINCRBYFLOAT', KEYS[3], 'model_seconds', ARGV[5])
redis.call('HSET', KEYS[3], 'last_update', ARGV[6])
for i = 10, #ARGV do redis.call('RPUSH', KEYS[4], ARGV[i]) end
return 1
"""

# A planned chunk adds to the counters once (its images, skipped ones and bad entries), and the
# producer checkpoint moves in the same atomic step. A producer still planning an older generation
# registers nothing: its chunk numbers belong to the new plan now.
_REGISTER_CHUNK = _MARK + """
if ARGV[7] ~= '' and tonumber(ARGV[7]) ~= tonumber(redis.call('HGET', KEYS[3], 'generation') or '0') then
  return 0
end
if not mark(KEYS[1], KEYS[2], ARGV[6], ARGV[1]) then return 0 end
redis.call('HINCRBY', KEYS[3], 'total', ARGV[2])
redis.call('HINCRBY', KEYS[3], 'skipped', ARGV[5])
redis.call('HINCRBY', KEYS[3], 'failed', #ARGV - 7)
redis.call('HSET', KEYS[4], 'position', ARGV[3], 'next_seq', ARGV[4])
for i = 8, #ARGV do redis.call('RPUSH', KEYS[5], ARGV[i]) end
return 1
"""

# 1 the first time a chunk starts in the current generation; a chunk of an older one marks nothing.
_MARK_STARTED = _MARK + """
if ARGV[3] ~= '' and tonumber(ARGV[3]) ~= tonumber(redis.call('HGET', KEYS[3], 'generation') or '0') then
  return 1
end
if mark(KEYS[1], KEYS[2], ARGV[2], ARGV[1]) then return 1 end
return 0
"""

# A resume that replans starts a new generation: counters and per-chunk sets start afresh.
_START_GENERATION = """
local gen = redis.call('HINCRBY', KEYS[1], 'generation', 1)
for _, field in ipairs({'total', 'done', 'failed', 'skipped', 'instances'}) do
  redis.call('HSET', KEYS[1], field, 0)
end
redis.call('HDEL', KEYS[1], 'listing_complete', 'error')
for i = 2, #KEYS do redis.call('DEL', KEYS[i]) end
return gen
"""

# Takes out the failures that name an output key (images); bad input entries stay failed.
_REOPEN_FAILURES = """
local items = redis.call('LRANGE', KEYS[1], 0, -1)
local taken, kept = {}, {}
for _, raw in ipairs(items) do
  local key = cjson.decode(raw)['out_key']
  if type(key) == 'string' then table.insert(taken, raw) else table.insert(kept, raw) end
end
if #taken == 0 then return taken end
redis.call('DEL', KEYS[1])
for _, raw in ipairs(kept) do redis.call('RPUSH', KEYS[1], raw) end
redis.call('HINCRBY', KEYS[2], 'failed', tostring(-#taken))
redis.call('DEL', KEYS[3])
return taken
"""


class RedisJobStore:
    """Job state in Redis (one client, safe to share between threads)."""

    def __init__(self, url: str, *, client: redis.Redis | None = None, retries: int = 20) -> None:
        # Reconnect with backoff for about a minute so a Redis restart does not fail the work in hand.
        retry = Retry(ExponentialBackoff(cap=5.0, base=0.1), retries=retries)
        self._redis: redis.Redis = client or redis.Redis.from_url(
            url, socket_timeout=30, socket_connect_timeout=10, health_check_interval=30,
            retry=retry, retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        )
        self._record = self._redis.register_script(_RECORD_CHUNK)
        self._register = self._redis.register_script(_REGISTER_CHUNK)
        self._reopen = self._redis.register_script(_REOPEN_FAILURES)
        self._start_generation = self._redis.register_script(_START_GENERATION)
        self._mark_started = self._redis.register_script(_MARK_STARTED)

    @classmethod
    def interactive(cls, url: str, timeout_s: float = 3.0) -> RedisJobStore:
        """A store for commands a person waits on: Redis down, a wrong password or a bad URL fail in seconds."""
        try:
            client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s * 3,
                                          retry=Retry(NoBackoff(), retries=0))
        except ValueError as exc:
            raise RequestError(redact(f"malformed Redis URL {url!r}: {exc}")) from exc
        client.ping()
        return cls(url, client=client)

    @property
    def client(self) -> redis.Redis:
        return self._redis

    def create(self, spec: JobSpec) -> None:
        """Store the spec once; a second create with the same id keeps the first spec (resume)."""
        self._redis.set(job_key(spec.job_id, "spec"), spec.model_dump_json(), nx=True)
        self._redis.hsetnx(job_key(spec.job_id, "counters"), "started_at", str(time.time()))
        self._redis.zadd(JOBS_INDEX, {spec.job_id: spec.created_at or time.time()}, nx=True)

    def spec(self, job_id: str) -> JobSpec:
        raw = self._redis.get(job_key(job_id, "spec"))
        if raw is None:
            raise UnknownJobError(job_id)
        return JobSpec.model_validate_json(raw)

    def _mark_keys(self, job_id: str, mark: str) -> list[str]:
        return [job_key(job_id, mark), job_key(job_id, f"{mark}_ids"), job_key(job_id, "counters")]

    def register_chunk(self, job_id: str, chunk_id: str, plan: PlannedCounts, checkpoint: Checkpoint) -> bool:
        """Count a planned chunk once and move the checkpoint, atomically; False if already registered."""
        keys = [*self._mark_keys(job_id, "planned"), job_key(job_id, "checkpoint"), job_key(job_id, "failures")]
        failures = [f.model_dump_json() for f in plan.failures]
        args: list[Any] = [chunk_id, plan.total, checkpoint.position, checkpoint.next_seq, plan.skipped,
                           *_slot_args(chunk_slot(job_id, chunk_id))]
        return bool(self._register(keys=keys, args=[*args, *failures]))

    def record_chunk(
        self, job_id: str, chunk_id: str, outcomes: Sequence[ItemOutcome], model_seconds: float,
        generation: int | None = None,
    ) -> bool:
        """Count a chunk once (False for a duplicate); StaleGenerationError if a resume replanned the job."""
        done = sum(1 for o in outcomes if o.status == "done")
        failures = [
            Failure(uri=display_uri(o.uri), reason=o.reason or "unknown", chunk_id=chunk_id,
                    out_key=o.out_key).model_dump_json()
            for o in outcomes
            if o.status == "failed"
        ]
        instances = sum(o.instances for o in outcomes)
        keys = [*self._mark_keys(job_id, "recorded"), job_key(job_id, "failures")]
        bit, slot_generation = _slot_args(chunk_slot(job_id, chunk_id))
        args: list[Any] = [chunk_id, done, len(failures), instances, f"{model_seconds:.6f}", time.time(),
                           "" if generation is None else generation, bit, slot_generation]
        counted = int(self._record(keys=keys, args=[*args, *failures]))
        if counted < 0:
            raise StaleGenerationError(f"chunk {chunk_id} belongs to an older plan of job {job_id}")
        return counted == 1

    def is_chunk_recorded(self, job_id: str, chunk_id: str) -> bool:
        slot = chunk_slot(job_id, chunk_id)
        if slot is None:
            return bool(self._redis.sismember(job_key(job_id, "recorded_ids"), chunk_id))
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.getbit(job_key(job_id, "recorded"), slot.bit)
            pipe.hget(job_key(job_id, "counters"), "generation")
            bit, generation = pipe.execute()
        return bool(bit) and slot.generation == int(generation or 0)

    def mark_chunk_started(self, job_id: str, chunk_id: str) -> bool:
        """True the first time a chunk starts; False on a redelivery, a retry or a duplicate."""
        args = [chunk_id, *_slot_args(chunk_slot(job_id, chunk_id))]
        return bool(self._mark_started(keys=self._mark_keys(job_id, "started"), args=args))

    def chunks_marked(self, job_id: str, mark: str) -> int:
        """How many chunks are ``planned``, ``started`` or ``recorded`` in the current generation."""
        with self._redis.pipeline(transaction=False) as pipe:
            pipe.bitcount(job_key(job_id, mark))
            pipe.scard(job_key(job_id, f"{mark}_ids"))
            return sum(int(n) for n in pipe.execute())

    def mark_listing_complete(self, job_id: str) -> None:
        self._redis.hset(job_key(job_id, "counters"), "listing_complete", "1")

    def _counter_hash(self, job_id: str) -> dict[str, str]:
        raw: dict[bytes, bytes] = self._redis.hgetall(job_key(job_id, "counters"))  # type: ignore[assignment]
        if not raw:
            raise UnknownJobError(job_id)
        return {k.decode(): v.decode() for k, v in raw.items()}

    def counters(self, job_id: str) -> JobCounters:
        values = self._counter_hash(job_id)
        return JobCounters(
            total=int(values.get("total", 0)), done=int(values.get("done", 0)),
            failed=int(values.get("failed", 0)), skipped=int(values.get("skipped", 0)),
            listing_complete=values.get("listing_complete") == "1",
        )

    def stats(self, job_id: str) -> JobStats:
        values = self._counter_hash(job_id)
        last_update = values.get("last_update")
        return JobStats(
            started_at=float(values.get("started_at", time.time())),
            last_update=None if last_update is None else float(last_update),
            model_seconds=float(values.get("model_seconds", 0.0)), instances=int(values.get("instances", 0)),
            error=values.get("error"), model_commit=values.get("model_commit"),
            expected_total=int(values["expected_total"]) if "expected_total" in values else None,
        )

    def note_model_commit(self, job_id: str, commit: str) -> None:
        """Remember the model commit that made the job's outputs (the first one noted stays)."""
        self._redis.hsetnx(job_key(job_id, "counters"), "model_commit", commit)

    def note_expected_total(self, job_id: str, total: int) -> None:
        """How many images the listing is expected to give, known before it ends (for an early ETA)."""
        self._redis.hset(job_key(job_id, "counters"), "expected_total", total)

    def set_error(self, job_id: str, reason: str | None) -> None:
        """The job as a whole cannot go on: it ends in state ``failed``; None clears it (a resume)."""
        if reason is None:
            self._redis.hdel(job_key(job_id, "counters"), "error")
            self._redis.delete(job_key(job_id, "report_claim"))
        else:
            self._redis.hset(job_key(job_id, "counters"), mapping={"error": reason, "last_update": time.time()})

    def failures(self, job_id: str, limit: int | None = None) -> list[Failure]:
        end = -1 if limit is None else limit - 1
        raw: list[bytes] = self._redis.lrange(job_key(job_id, "failures"), 0, end)  # type: ignore[assignment]
        return [Failure.model_validate_json(r) for r in raw]

    def checkpoint(self, job_id: str) -> Checkpoint | None:
        raw: dict[bytes, bytes] = self._redis.hgetall(job_key(job_id, "checkpoint"))  # type: ignore[assignment]
        if not raw:
            return None
        return Checkpoint(position=raw[b"position"].decode(), next_seq=int(raw[b"next_seq"]))

    def cancel(self, job_id: str) -> None:
        self._redis.set(job_key(job_id, "cancelled"), "1")

    def is_cancelled(self, job_id: str) -> bool:
        return bool(self._redis.exists(job_key(job_id, "cancelled")))

    def claim_report(self, job_id: str) -> bool:
        """True for one caller at a time: it writes the report, then calls ``settle_report``.

        The claim expires after ``REPORT_CLAIM_TTL_S`` so that a caller that died while writing does not
        keep the report from ever being written.
        """
        return bool(self._redis.set(job_key(job_id, "report_claim"), "writing", nx=True, ex=REPORT_CLAIM_TTL_S))

    def settle_report(self, job_id: str, written: bool) -> None:
        """Keep the claim for good once the report is written; release it after a failed write (retried)."""
        key = job_key(job_id, "report_claim")
        if written:
            self._redis.set(key, "written")
        else:
            self._redis.delete(key)

    def reopen_failures(self, job_id: str) -> list[Failure]:
        """Take the failed images out (uncounting them) so they can be submitted again (the job is kept)."""
        self.expire(job_id, None)
        keys = [job_key(job_id, "failures"), job_key(job_id, "counters"), job_key(job_id, "report_claim")]
        raw: list[bytes] = self._reopen(keys=keys, args=[])
        return [Failure.model_validate_json(r) for r in raw]

    def job_ids(self) -> list[str]:
        """Jobs newest first; jobs whose state expired are dropped from the index as they are seen."""
        raw: list[bytes] = self._redis.zrevrange(JOBS_INDEX, 0, -1)  # type: ignore[assignment]
        ids = [r.decode() for r in raw]
        with self._redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.exists(job_key(job_id, "spec"))
            present = pipe.execute()
        gone = [job_id for job_id, exists in zip(ids, present, strict=True) if not exists]
        if gone:
            self._redis.zrem(JOBS_INDEX, *gone)
        return [job_id for job_id in ids if job_id not in gone]

    def expire(self, job_id: str, seconds: int | None) -> None:
        """Let every key of the job expire after ``seconds`` (None: keep them until deleted)."""
        with self._redis.pipeline(transaction=False) as pipe:
            for part in JOB_PARTS:
                if seconds is None:
                    pipe.persist(job_key(job_id, part))
                else:
                    pipe.expire(job_key(job_id, part), seconds)
            pipe.execute()

    def delete(self, job_id: str) -> None:
        """Remove the job's state from Redis (its outputs in storage stay)."""
        self._redis.delete(*(job_key(job_id, part) for part in JOB_PARTS))
        self._redis.zrem(JOBS_INDEX, job_id)

    def generation(self, job_id: str) -> int:
        raw = self._redis.hget(job_key(job_id, "counters"), "generation")
        return int(raw) if raw else 0

    def start_generation(self, job_id: str) -> int:
        """Reset counters and chunk sets for a full replan; chunks of older generations become stale."""
        parts = [p for p in JOB_PARTS if p not in ("spec", "counters")]
        keys = [job_key(job_id, "counters"), *(job_key(job_id, p) for p in parts)]
        return int(self._start_generation(keys=keys, args=[]))

