"""Job state in process memory, for embedded runs (no Redis)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from sam3_batch.contracts.chunk_ids import chunk_slot
from sam3_batch.contracts.errors import StaleGenerationError
from sam3_batch.contracts.jobstate import Checkpoint, JobStats, PlannedCounts, UnknownJobError
from sam3_batch.contracts.redact import display_uri
from sam3_batch.contracts.schemas import Failure, ItemOutcome, JobCounters, JobSpec


@dataclass
class _Job:
    spec: JobSpec
    counters: dict[str, int] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)
    # Chunk marks, keyed like RedisJobStore's: a planned chunk by its bit, any other chunk by its id.
    planned: set[int | str] = field(default_factory=set)
    recorded: set[int | str] = field(default_factory=set)
    started: set[int | str] = field(default_factory=set)
    failures: list[Failure] = field(default_factory=list)
    listing_complete: bool = False
    cancelled: bool = False
    error: str | None = None
    model_commit: str | None = None
    expected_total: int | None = None
    report_claimed: bool = False
    checkpoint: Checkpoint | None = None
    generation: int = 0


def _mark_of(job_id: str, chunk_id: str) -> int | str:
    slot = chunk_slot(job_id, chunk_id)
    return chunk_id if slot is None else slot.bit


def _stale(job: _Job, job_id: str, chunk_id: str) -> bool:
    """A planned chunk of an older generation: its bit belongs to the current plan's chunk now."""
    slot = chunk_slot(job_id, chunk_id)
    return slot is not None and slot.generation != job.generation


class MemoryJobStore:
    """The same contract as RedisJobStore, held in a dict behind a lock."""

    def __init__(self) -> None:
        self._jobs: dict[str, _Job] = {}
        self._lock = threading.Lock()

    def _job(self, job_id: str) -> _Job:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise UnknownJobError(job_id) from None

    def create(self, spec: JobSpec) -> None:
        with self._lock:
            job = self._jobs.setdefault(spec.job_id, _Job(spec=spec))
            job.stats.setdefault("started_at", time.time())

    def spec(self, job_id: str) -> JobSpec:
        return self._job(job_id).spec

    def register_chunk(self, job_id: str, chunk_id: str, plan: PlannedCounts, checkpoint: Checkpoint) -> bool:
        with self._lock:
            job = self._job(job_id)
            mark = _mark_of(job_id, chunk_id)
            if _stale(job, job_id, chunk_id) or mark in job.planned:
                return False
            job.planned.add(mark)
            for name, value in (("total", plan.total), ("skipped", plan.skipped), ("failed", len(plan.failures))):
                job.counters[name] = job.counters.get(name, 0) + value
            job.failures.extend(plan.failures)
            job.checkpoint = checkpoint
            return True

    def record_chunk(
        self, job_id: str, chunk_id: str, outcomes: Sequence[ItemOutcome], model_seconds: float,
        generation: int | None = None,
    ) -> bool:
        with self._lock:
            job = self._job(job_id)
            if (generation is not None and generation != job.generation) or _stale(job, job_id, chunk_id):
                raise StaleGenerationError(f"chunk {chunk_id} belongs to an older plan of job {job_id}")
            mark = _mark_of(job_id, chunk_id)
            if mark in job.recorded:
                return False
            job.recorded.add(mark)
            for outcome in outcomes:
                job.counters[outcome.status] = job.counters.get(outcome.status, 0) + 1
                if outcome.status == "failed":
                    reason = outcome.reason or "unknown"
                    job.failures.append(
                        Failure(uri=display_uri(outcome.uri), reason=reason, chunk_id=chunk_id,
                                out_key=outcome.out_key)
                    )
            job.stats["instances"] = job.stats.get("instances", 0.0) + sum(o.instances for o in outcomes)
            job.stats["model_seconds"] = job.stats.get("model_seconds", 0.0) + model_seconds
            job.stats["last_update"] = time.time()
            return True

    def is_chunk_recorded(self, job_id: str, chunk_id: str) -> bool:
        job = self._job(job_id)
        return not _stale(job, job_id, chunk_id) and _mark_of(job_id, chunk_id) in job.recorded

    def mark_chunk_started(self, job_id: str, chunk_id: str) -> bool:
        with self._lock:
            job = self._job(job_id)
            if _stale(job, job_id, chunk_id):
                return True
            mark = _mark_of(job_id, chunk_id)
            first = mark not in job.started
            job.started.add(mark)
            return first

    def chunks_marked(self, job_id: str, mark: str) -> int:
        marks: set[int | str] = getattr(self._job(job_id), mark)
        return len(marks)

    def mark_listing_complete(self, job_id: str) -> None:
        self._job(job_id).listing_complete = True

    def counters(self, job_id: str) -> JobCounters:
        job = self._job(job_id)
        c = job.counters
        return JobCounters(
            total=c.get("total", 0), done=c.get("done", 0), failed=c.get("failed", 0),
            skipped=c.get("skipped", 0), listing_complete=job.listing_complete,
        )

    def stats(self, job_id: str) -> JobStats:
        job = self._job(job_id)
        return JobStats(
            started_at=job.stats.get("started_at", time.time()), last_update=job.stats.get("last_update"),
            model_seconds=job.stats.get("model_seconds", 0.0), instances=int(job.stats.get("instances", 0)),
            error=job.error, model_commit=job.model_commit, expected_total=job.expected_total,
        )

    def note_model_commit(self, job_id: str, commit: str) -> None:
        job = self._job(job_id)
        job.model_commit = job.model_commit or commit

    def note_expected_total(self, job_id: str, total: int) -> None:
        self._job(job_id).expected_total = total

    def set_error(self, job_id: str, reason: str | None) -> None:
        job = self._job(job_id)
        job.error = reason
        if reason is None:
            job.report_claimed = False
        else:
            job.stats["last_update"] = time.time()

    def failures(self, job_id: str, limit: int | None = None) -> list[Failure]:
        failures = self._job(job_id).failures
        return list(failures if limit is None else failures[:limit])

    def checkpoint(self, job_id: str) -> Checkpoint | None:
        return self._job(job_id).checkpoint

    def cancel(self, job_id: str) -> None:
        self._job(job_id).cancelled = True

    def is_cancelled(self, job_id: str) -> bool:
        return self._job(job_id).cancelled

    def claim_report(self, job_id: str) -> bool:
        with self._lock:
            job = self._job(job_id)
            claimed, job.report_claimed = job.report_claimed, True
            return not claimed

    def settle_report(self, job_id: str, written: bool) -> None:
        if not written:
            with self._lock:
                self._job(job_id).report_claimed = False

    def reopen_failures(self, job_id: str) -> list[Failure]:
        with self._lock:
            job = self._job(job_id)
            taken = [f for f in job.failures if f.out_key is not None]
            if not taken:
                return []
            job.failures = [f for f in job.failures if f.out_key is None]
            job.counters["failed"] = job.counters.get("failed", 0) - len(taken)
            job.report_claimed = False
            return taken

    def job_ids(self) -> list[str]:
        return list(self._jobs)

    def expire(self, job_id: str, seconds: int | None) -> None:
        """Nothing to do: the store lives only as long as its process."""

    def delete(self, job_id: str) -> None:
        with self._lock:
            self._jobs.pop(job_id, None)

    def generation(self, job_id: str) -> int:
        return self._job(job_id).generation

    def start_generation(self, job_id: str) -> int:
        with self._lock:
            old = self._job(job_id)
            fresh = _Job(spec=old.spec, stats={"started_at": time.time()}, generation=old.generation + 1)
            self._jobs[job_id] = fresh
            return fresh.generation
