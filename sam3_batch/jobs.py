"""What the CLI commands do, as plain functions over the packages (the CLI only parses options)."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

import redis

from sam3_batch.contracts.jobstate import JobStore, RedisJobStore
from sam3_batch.contracts.jobstate_memory import MemoryJobStore
from sam3_batch.contracts.report import build_report, finalize_if_complete
from sam3_batch.contracts.schemas import ChunkMessage, JobReport, JobSpec, OutputOptions, Thresholds, WorkItem
from sam3_batch.contracts.settings import Settings
from sam3_batch.contracts.storage import Storage
from sam3_batch.embedded import InlineDispatcher
from sam3_batch.producer.backpressure import Backpressure, QueueDepth
from sam3_batch.producer.dispatch import CeleryDispatcher
from sam3_batch.producer.feed import ProducerSummary, new_job_id, run_producer
from sam3_batch.producer.inputs import open_source
from sam3_batch.producer.sources import Source


@dataclass(frozen=True)
class JobRequest:
    """A job as the user described it on the command line."""

    inputs: list[str]
    prompts: list[str]
    output_root: str
    manifest: str | None = None
    thresholds: Thresholds = field(default_factory=Thresholds)
    outputs: OutputOptions = field(default_factory=OutputOptions)
    skip_existing: bool = False


def build_spec(request: JobRequest, settings: Settings, job_id: str | None = None) -> JobSpec:
    """The job spec stored once for the whole job."""
    return JobSpec(
        job_id=job_id or new_job_id(), prompts=request.prompts, thresholds=request.thresholds,
        outputs=request.outputs, output_root=request.output_root, model_id=settings.model,
        model_revision=settings.model_revision, dtype=settings.dtype, created_at=time.time(),
        inputs=request.inputs, manifest=request.manifest,
    )


def run_embedded(request: JobRequest, settings: Settings) -> JobReport:
    """Segment everything in one process (same worker code) and write the job report."""
    from sam3_batch.worker.decode import limit_pillow_pixels
    from sam3_batch.worker.pipeline import ChunkContext
    from sam3_batch.worker.process_context import load_runtime

    limit_pillow_pixels(settings.max_image_pixels)  # this process decodes when loaders are threads
    storage = Storage(settings)
    source = open_source(storage, request.inputs, request.manifest)
    context = ChunkContext.create(load_runtime(settings), storage, settings)
    store = MemoryJobStore()
    spec = build_spec(request, settings)  # after the model load, so throughput counts the work only
    store.create(spec)
    try:
        dispatcher = InlineDispatcher(spec, store, context)
        run_producer(spec, source, store, storage, dispatcher, settings.chunk_size,
                     skip_existing=request.skip_existing)
    finally:
        context.close()
    # run_producer wrote the report when the job completed; build it again only to return it.
    return finalize_if_complete(store, storage, spec.job_id) or build_report(store, spec.job_id)


def _broker_client(settings: Settings, store: RedisJobStore) -> redis.Redis:
    """A client on the broker Redis, where the queue is (job state may live on another Redis)."""
    broker_url = settings.broker_url.get_secret_value()
    if broker_url == settings.state_redis_url():
        return store.client
    return RedisJobStore(broker_url).client  # the same reconnect-with-backoff policy as job state


def celery_dispatcher(settings: Settings, store: RedisJobStore) -> CeleryDispatcher:
    """A dispatcher onto the Celery queue, with backpressure read from the broker's queue length."""
    from sam3_batch.contracts.queue import make_celery

    app = make_celery(settings, name="sam3_batch_producer")
    depth = QueueDepth(_broker_client(settings, store), settings.queue)
    backpressure = Backpressure(depth, settings.queue_high_water, settings.queue_low_water)
    return CeleryDispatcher(app, settings.queue, backpressure)


def submit(request: JobRequest, settings: Settings, resume_job: str | None = None) -> ProducerSummary:
    """Store the spec (or reuse a resumed job's) and enqueue every image not yet done."""
    storage = Storage(settings)
    store = RedisJobStore(settings.state_redis_url())
    if resume_job:
        spec = store.spec(resume_job)
        _prepare_resume(store, resume_job)
        source = _source_of(spec, storage, request)
        skip = True
    else:
        spec = build_spec(request, settings)
        store.create(spec)
        source = open_source(storage, request.inputs, request.manifest)
        skip = request.skip_existing
    dispatcher = celery_dispatcher(settings, store)
    return run_producer(spec, source, store, storage, dispatcher, settings.chunk_size, skip_existing=skip)


def _prepare_resume(store: JobStore, job_id: str) -> None:
    """Continue an unfinished listing from its checkpoint; replan a finished or cancelled job afresh."""
    if store.is_cancelled(job_id) or store.counters(job_id).listing_complete:
        store.start_generation(job_id)


def _source_of(spec: JobSpec, storage: Storage, request: JobRequest) -> Source:
    """A resumed job lists what it listed before, unless the user names the inputs again."""
    if request.inputs or request.manifest:
        return open_source(storage, request.inputs, request.manifest)
    return open_source(storage, spec.inputs, spec.manifest)


def retry_failed(settings: Settings, job_id: str) -> int:
    """Resubmit a job's failed images as new chunks; returns how many were resubmitted."""
    store = RedisJobStore(settings.state_redis_url())
    store.spec(job_id)  # raises UnknownJobError early
    failures = store.reopen_failures(job_id)
    dispatcher = celery_dispatcher(settings, store)
    stamp = secrets.token_hex(4)  # unique per retry: chunk ids must never repeat within a job
    for start in range(0, len(failures), settings.chunk_size):
        batch = failures[start:start + settings.chunk_size]
        items = [WorkItem(uri=f.uri, out_key=f.out_key or "") for f in batch]
        chunk = ChunkMessage(job_id=job_id, chunk_id=f"{job_id}-retry{stamp}-{start:09d}",
                             generation=store.generation(job_id), items=items)
        dispatcher.send(chunk)
    return len(failures)

