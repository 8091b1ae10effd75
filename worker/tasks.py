"""The chunk task: a thin Celery wrapper over ``process_chunk`` plus idempotent counting."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from celery import Task
from celery.exceptions import Reject
from celery.utils.time import get_exponential_backoff_interval
from pydantic import ValidationError

from sam3_batch.contracts.errors import JobCancelledError, StaleGenerationError, is_transient, reason_of
from sam3_batch.contracts.jobstate import UnknownJobError
from sam3_batch.contracts.queue import TASK_NAME
from sam3_batch.contracts.report import finalize_if_complete
from sam3_batch.contracts.schemas import ChunkMessage, ItemOutcome
from sam3_batch.worker import metrics
from sam3_batch.worker.celery_app import app
from sam3_batch.worker.chunk_record import record_chunk
from sam3_batch.worker.health import HEALTH
from sam3_batch.worker.pipeline import ChunkResult, TransientFailure, process_chunk
from sam3_batch.worker.process_context import WorkerContext, worker_context

log = logging.getLogger(__name__)


TRANSIENT_LOG_LINES_PER_CHUNK = 5
RETRY_BACKOFF_FACTOR_S = 2
RETRY_BACKOFF_MAX_S = 60


def retry_countdown(retries: int) -> float:
    """Exponential backoff with full jitter between task retries (Celery's own ``retry_backoff`` +
    ``retry_jitter`` rule): a random 0..2, 0..4, 0..8 ... seconds, at most 60, so a fleet hit by the same
    outage does not retry in lockstep."""
    return float(get_exponential_backoff_interval(
        RETRY_BACKOFF_FACTOR_S, retries, RETRY_BACKOFF_MAX_S, full_jitter=True))


def _log_transient(chunk: ChunkMessage, found: list[TransientFailure]) -> None:
    """Each transient error with its image, operation and (redacted) cause; a few lines per chunk at most."""
    for failure in found[:TRANSIENT_LOG_LINES_PER_CHUNK]:
        log.warning("chunk %s: transient error in %s of %s: %s", chunk.chunk_id, failure.operation, failure.uri,
                    failure.reason, extra={**_ids(chunk), "uri": failure.uri})
    if len(found) > TRANSIENT_LOG_LINES_PER_CHUNK:
        log.warning("chunk %s: %d more transient errors", chunk.chunk_id,
                    len(found) - TRANSIENT_LOG_LINES_PER_CHUNK, extra=_ids(chunk))


def _ids(chunk: ChunkMessage) -> dict[str, str]:
    """Log extras so JSON log lines carry the job and chunk ids."""
    return {"job_id": chunk.job_id, "chunk_id": chunk.chunk_id}


def _whole_chunk_failed(chunk: ChunkMessage, reason: str) -> ChunkResult:
    outcomes = [ItemOutcome(uri=i.uri, status="failed", reason=reason, out_key=i.out_key) for i in chunk.items]
    return ChunkResult(outcomes=outcomes)


def _record(worker: WorkerContext, chunk: ChunkMessage, result: ChunkResult) -> None:
    if chunk.generation != worker.store.generation(chunk.job_id):  # cheap early exit; record_chunk decides
        raise StaleGenerationError(f"chunk {chunk.chunk_id} belongs to an older plan of job {chunk.job_id}")
    counted = record_chunk(worker.store, worker.chunk_context.storage, worker.spec(chunk.job_id), chunk, result,
                           commit=getattr(worker.chunk_context.runtime, "commit", None), generation=chunk.generation)
    metrics.CHUNKS.labels(result="counted" if counted else "duplicate").inc()
    metrics.LAST_CHUNK_FINISHED.set_to_current_time()
    failed_outcomes = [o for o in result.outcomes if o.status == "failed"]
    for outcome in failed_outcomes if counted else []:  # once per image: a duplicate chunk logs nothing
        log.warning("image failed: %s: %s", outcome.uri, outcome.reason, extra={**_ids(chunk), "uri": outcome.uri})
    failed = len(failed_outcomes)
    log.info("chunk %s finished: %d done, %d failed, model %.2fs", chunk.chunk_id, len(result.outcomes) - failed,
             failed, result.model_seconds, extra=_ids(chunk))
    finalize_if_complete(worker.store, worker.chunk_context.storage, chunk.job_id)
    metrics.record_gpu_memory()


def _reason_to_skip(worker: WorkerContext, chunk: ChunkMessage) -> str | None:
    """Why this chunk needs no work at all, or None when it must be processed."""
    if worker.store.is_chunk_recorded(chunk.job_id, chunk.chunk_id):
        _finalize_quietly(worker, chunk)  # its report write may have failed: this redelivery retries it
        return "duplicate"  # a redelivery of a chunk that already finished
    try:
        worker.spec(chunk.job_id)
    except UnknownJobError:
        log.error("dropping chunk %s: unknown job %s", chunk.chunk_id, chunk.job_id, extra=_ids(chunk))
        return "unknown-job"
    if chunk.generation != worker.store.generation(chunk.job_id):
        return "stale"  # planned before a resume replanned the job: the new plan covers its images
    if worker.store.is_cancelled(chunk.job_id):
        metrics.CHUNKS.labels(result="cancelled").inc()
        return "cancelled"
    return None


def _finalize_quietly(worker: WorkerContext, chunk: ChunkMessage) -> None:
    try:
        finalize_if_complete(worker.store, worker.chunk_context.storage, chunk.job_id)
    except Exception as exc:  # the claim was released: the next caller that sees the job complete retries
        log.warning("job %s: could not write the report (%s)", chunk.job_id, reason_of(exc), extra=_ids(chunk))


def _superseded(worker: WorkerContext, chunk: ChunkMessage) -> bool:
    """True once the job was cancelled, or replanned by a resume, after this chunk was planned."""
    return worker.store.is_cancelled(chunk.job_id) or worker.store.generation(chunk.job_id) != chunk.generation


def _checked_at_most_every(seconds: float, check: Callable[[], bool]) -> Callable[[], bool]:
    """``check`` asked at most once per period (it costs Redis round trips before every batch)."""
    last_checked, answer = -seconds, False

    def cached() -> bool:
        nonlocal last_checked, answer
        if not answer and time.monotonic() - last_checked >= seconds:
            last_checked, answer = time.monotonic(), check()
        return answer

    return cached


def _model_mismatch(worker: WorkerContext, chunk: ChunkMessage) -> str | None:
    """Masks must come from the model the job asked for: a worker serving another one refuses the chunk."""
    spec, runtime = worker.spec(chunk.job_id), worker.chunk_context.runtime
    if (spec.model_id, spec.model_revision) == (runtime.model_id, runtime.revision):
        return None
    return (f"this worker serves model {runtime.model_id} (revision {runtime.revision}) but the job asks for "
            f"{spec.model_id} (revision {spec.model_revision}): run such jobs on their own queue")


def _process(task: Task, worker: WorkerContext, chunk: ChunkMessage) -> ChunkResult:
    """Run the pipeline; transient trouble becomes a task retry until the last attempt."""
    mismatch = _model_mismatch(worker, chunk)
    if mismatch:
        log.error("chunk %s: %s", chunk.chunk_id, mismatch, extra=_ids(chunk))
        return _whole_chunk_failed(chunk, mismatch)
    first_start = worker.store.mark_chunk_started(chunk.job_id, chunk.chunk_id)
    retries = int(task.request.retries or 0)
    final_attempt = retries >= worker.settings.task_retries
    try:
        result = process_chunk(
            chunk, worker.spec(chunk.job_id), worker.chunk_context,
            check_done=not first_start or retries > 0, final_attempt=final_attempt,
            should_stop=_checked_at_most_every(1.0, lambda: _superseded(worker, chunk)),
        )
    except JobCancelledError:
        raise
    except Exception as exc:
        if is_transient(exc) and not final_attempt:
            metrics.TRANSIENT_ERRORS.labels(operation="chunk").inc()
            metrics.TASK_RETRIES.inc()
            log.warning("chunk %s: transient error: %s; retrying", chunk.chunk_id, reason_of(exc), extra=_ids(chunk))
            raise task.retry(exc=exc, countdown=retry_countdown(retries)) from exc
        log.exception("chunk %s failed as a whole", chunk.chunk_id, extra=_ids(chunk))
        return _whole_chunk_failed(chunk, f"internal error: {reason_of(exc)}")
    _log_transient(chunk, result.transient)
    if result.retry_later:
        countdown = retry_countdown(retries)
        log.warning("chunk %s: %d items hit transient errors; retry %d in %.1fs", chunk.chunk_id,
                    len(result.retry_later), retries + 1, countdown, extra=_ids(chunk))
        metrics.TASK_RETRIES.inc()
        raise task.retry(countdown=countdown)
    return result


def run_chunk_task(task: Task, message: dict[str, Any]) -> str:
    """Process one chunk message; returns how it ended (for logs and tests)."""
    worker = worker_context()
    try:
        chunk = ChunkMessage.model_validate(message)
    except ValidationError as exc:
        log.error("dropping a malformed chunk message: %s", reason_of(exc))
        return "invalid"
    skip = _reason_to_skip(worker, chunk)
    if skip:
        return skip
    try:
        result = _process(task, worker, chunk)
    except JobCancelledError:
        return "cancelled"
    try:
        _record(worker, chunk, result)
    except StaleGenerationError:
        return "stale"  # a resume replanned the job while this chunk ran: the new plan counts its images
    except Exception as exc:
        # Outputs are written; put the message back so a later run (which skips done images) counts it.
        log.warning("chunk %s: could not record its outcome (%s); requeueing", chunk.chunk_id, reason_of(exc),
                    extra=_ids(chunk))
        raise Reject(reason_of(exc), requeue=True) from exc
    return "done"


@app.task(bind=True, name=TASK_NAME, max_retries=None)  # type: ignore[untyped-decorator]
def process_chunk_task(self: Task, message: dict[str, Any]) -> str:
    """Celery entry point for one chunk message."""
    with HEALTH.chunk(str(self.request.id)):  # /healthz fails if this one chunk runs past its limit
        return run_chunk_task(self, message)
