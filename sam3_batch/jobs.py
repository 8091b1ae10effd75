"""What the CLI commands do, as plain functions over the packages (the CLI only parses options)."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import redis

from sam3_batch.contracts.accounting import account_job
from sam3_batch.contracts.errors import RequestError, Sam3BatchError, reason_of
from sam3_batch.contracts.jobstate import JobStore, RedisJobStore
from sam3_batch.contracts.jobstate_memory import MemoryJobStore
from sam3_batch.contracts.registry import live_workers, model_refusal
from sam3_batch.contracts.report import build_report, finalize_if_complete
from sam3_batch.contracts.schemas import (
    ChunkMessage,
    ConceptPrompt,
    JobReport,
    JobSpec,
    OutputOptions,
    Thresholds,
    WorkItem,
)
from sam3_batch.contracts.settings import Settings
from sam3_batch.contracts.storage import Storage
from sam3_batch.extras import require_worker_extra
from sam3_batch.producer.backpressure import Backpressure, QueueDepth
from sam3_batch.producer.dispatch import CeleryDispatcher
from sam3_batch.producer.expected import ExpectedTotal
from sam3_batch.producer.feed import ProducerSummary, done_index_for, new_job_id, run_producer, skip_done_chunk
from sam3_batch.producer.inputs import open_source
from sam3_batch.producer.item_prompts import WithPrompts
from sam3_batch.producer.planner import plan_chunks
from sam3_batch.producer.sources import Source, SourceEntry, SourceItem
from sam3_batch.request_checks import check_model_path, check_output_root

log = logging.getLogger(__name__)


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
    expected_images: int | None = None  # e.g. the `--dry-run` count: the ETA needs no counting pass
    exemplar: ConceptPrompt | None = None  # `run --box`: applied to every image without its own prompts


def build_spec(request: JobRequest, settings: Settings, job_id: str | None = None) -> JobSpec:
    """The job spec stored once for the whole job."""
    return JobSpec(
        job_id=job_id or new_job_id(), prompts=request.prompts, thresholds=request.thresholds,
        outputs=request.outputs, output_root=request.output_root, model_id=settings.model,
        model_revision=settings.model_revision, dtype=settings.dtype, created_at=time.time(),
        inputs=request.inputs, manifest=request.manifest, state_ttl_s=settings.finished_job_ttl_s or None,
        exemplar=request.exemplar,
        chunk_size=settings.chunk_size,
    )


def validate_request(request: JobRequest, settings: Settings) -> JobSpec:
    """Everything about a request that can be checked before loading anything; returns its spec."""
    check_output_root(request.output_root)
    if not request.prompts and not request.manifest and request.exemplar is None:
        raise RequestError("give at least one --prompt (or a --manifest whose lines carry prompts or objects)")
    return build_spec(request, settings)  # raises pydantic's ValidationError for bad prompts


def run_embedded(request: JobRequest, settings: Settings) -> JobReport:
    """Segment everything in one process (same worker code) and write the job report."""
    require_worker_extra()  # before the imports below: one readable line, not an ImportError
    from sam3_batch.embedded import InlineDispatcher
    from sam3_batch.worker.decode import limit_pillow_pixels
    from sam3_batch.worker.pipeline import ChunkContext
    from sam3_batch.worker.process_context import load_runtime, warm_up_compiled

    spec = validate_request(request, settings)
    check_model_path(settings.model)
    limit_pillow_pixels(settings.max_image_pixels)  # this process decodes when loaders are threads
    storage = Storage(settings)
    source: Source = open_source(storage, request.inputs, request.manifest, exclude_root=request.output_root)
    if spec.exemplar is not None:
        source = WithPrompts(source, [*spec.prompts, spec.exemplar])
    context = ChunkContext.create(load_runtime(settings), storage, settings)
    warm_up_compiled(context)
    store = MemoryJobStore()
    spec = spec.model_copy(update={"created_at": time.time()})  # after the model load: throughput counts work
    store.create(spec)
    commit = getattr(context.runtime, "commit", None)
    if commit:
        store.note_model_commit(spec.job_id, commit)
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


def submit(request: JobRequest, settings: Settings, resume_job: str | None = None, *,
           on_started: Callable[[JobSpec], None] = lambda spec: None,
           on_progress: Callable[[ProducerSummary], None] = lambda summary: None) -> ProducerSummary:
    """Store the spec (or reuse a resumed job's), announce it through ``on_started`` before anything is
    listed, then enqueue every image not yet done. A source that fails ends the job in state ``failed``."""
    RedisJobStore.interactive(settings.state_redis_url())  # Redis down: one line in seconds
    if settings.broker_url.get_secret_value() != settings.state_redis_url():
        RedisJobStore.interactive(settings.broker_url.get_secret_value())
    store = RedisJobStore(settings.state_redis_url())
    spec = store.spec(resume_job) if resume_job else validate_request(request, settings)
    # Workers beat on the broker's Redis (contracts/registry.py), next to the queue they serve.
    refusal = model_refusal(live_workers(_broker_client(settings, store), settings.queue), settings.queue,
                            spec.model_id, spec.model_revision)
    if refusal:
        raise Sam3BatchError(refusal)
    if resume_job:
        _prepare_resume(store, resume_job)
    else:
        store.create(spec)
    on_started(spec)
    storage = Storage(settings)
    counting: ExpectedTotal | None = None
    try:
        def opened() -> Source:
            return _source_of(spec, storage, request) if resume_job else open_source(
                storage, request.inputs, request.manifest, exclude_root=spec.output_root)

        source = opened()
        if request.expected_images is not None:
            store.note_expected_total(spec.job_id, request.expected_images)
        elif not store.counters(spec.job_id).listing_complete:
            counting = ExpectedTotal.start(store, spec.job_id, opened)
        dispatcher = celery_dispatcher(settings, store)
        return run_producer(spec, source, store, storage, dispatcher, settings.chunk_size,
                            skip_existing=bool(resume_job) or request.skip_existing, on_progress=on_progress)
    except Exception as exc:  # the job cannot go on without its source; Ctrl-C leaves it resumable
        fail_job(store, storage, spec.job_id, reason_of(exc))
        raise
    finally:
        if counting is not None:
            counting.stop()


def fail_job(store: JobStore, storage: Storage, job_id: str, reason: str) -> None:
    """End a job in state ``failed`` with a reason, and write its report."""
    store.set_error(job_id, reason)
    _write_final_report(store, storage, job_id)


def finalize_ended(store: JobStore, settings: Settings, job_id: str) -> None:
    """Write the report of a job that just ended by hand (a cancel)."""
    _write_final_report(store, Storage(settings), job_id)


def _write_final_report(store: JobStore, storage: Storage, job_id: str) -> None:
    try:
        finalize_if_complete(store, storage, job_id)
    except Exception as exc:  # the output root may be what failed; the state in Redis says it all
        log.warning("job %s: could not write its report: %s", job_id, reason_of(exc))


def _prepare_resume(store: JobStore, job_id: str) -> None:
    """Continue an unfinished listing from its checkpoint; replan a finished or cancelled job afresh."""
    account = account_job(store, job_id)  # reads only: a plain resume writes nothing before it sends
    if account.ended:
        store.expire(job_id, None)  # an ended job's state was set to expire: it is running again
    if account.state == "failed":
        store.set_error(job_id, None)  # e.g. its listing broke off: it goes on from its checkpoint
    if store.is_cancelled(job_id) or store.counters(job_id).listing_complete:
        store.start_generation(job_id)


def _source_of(spec: JobSpec, storage: Storage, request: JobRequest) -> Source:
    """A resumed job lists what it listed before, unless the user names the inputs again."""
    if request.inputs or request.manifest:
        return open_source(storage, request.inputs, request.manifest, exclude_root=spec.output_root)
    return open_source(storage, spec.inputs, spec.manifest, exclude_root=spec.output_root)


def retry_failed(settings: Settings, job_id: str) -> int:
    """Resubmit a job's failed images as new chunks; returns how many were resubmitted."""
    RedisJobStore.interactive(settings.state_redis_url())
    store = RedisJobStore(settings.state_redis_url())
    store.spec(job_id)  # raises UnknownJobError early
    failures = store.reopen_failures(job_id)
    if not failures:
        return 0
    dispatcher = celery_dispatcher(settings, store)
    stamp = secrets.token_hex(4)  # unique per retry: chunk ids must never repeat within a job
    for start in range(0, len(failures), settings.chunk_size):
        batch = failures[start:start + settings.chunk_size]
        items = [WorkItem(uri=f.uri, out_key=f.out_key or "") for f in batch]
        chunk = ChunkMessage(job_id=job_id, chunk_id=f"{job_id}-retry{stamp}-{start:09d}",
                             generation=store.generation(job_id), items=items)
        dispatcher.send(chunk)
    return len(failures)



@dataclass(frozen=True)
class PlanEstimate:
    """What `submit --dry-run` found: the job's size and its estimated GPU time, nothing enqueued."""

    images: int
    chunks: int
    skipped: int
    problems: int
    bytes: int | None  # None when the listing gives no sizes (manifests, URLs)
    seconds_per_image: float | None  # GPU-seconds per image used for the estimate
    estimate_from: str  # "--rate", "job <id>" or "none"
    gpu_hours: float | None

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def dry_run(request: JobRequest, settings: Settings, rate: float | None = None) -> PlanEstimate:
    """List and plan a job without creating it: counts, bytes, chunks and GPU-hours at ``rate`` images/s
    per GPU (or at the GPU-seconds per image of the newest complete job)."""
    storage = Storage(settings)
    source = open_source(storage, request.inputs, request.manifest)
    done = done_index_for(storage, request.output_root, request.outputs.layout,
                          settings.chunk_size) if request.skip_existing else None
    sizes: list[int | None] = []

    def sized(entries: Iterator[SourceEntry]) -> Iterator[SourceEntry]:
        for entry in entries:
            if isinstance(entry, SourceItem):
                sizes.append(entry.size)
            yield entry

    images = chunks = skipped = problems = 0
    is_done = (lambda key: key in done) if done is not None else (lambda key: False)
    for planned in plan_chunks(sized(source.entries(None)), "dry-run", settings.chunk_size, 0, is_done, 0):
        planned = skip_done_chunk(planned, done)
        chunks += planned.message is not None
        images += len(planned.message.items) if planned.message else 0
        skipped, problems = skipped + planned.skipped, problems + len(planned.problems)
    per_image, origin = (1.0 / rate, "--rate") if rate else _last_job_seconds_per_image(settings)
    known = [s for s in sizes if s is not None]
    return PlanEstimate(
        images=images, chunks=chunks, skipped=skipped, problems=problems,
        bytes=sum(known) if known and len(known) == len(sizes) else None, seconds_per_image=per_image,
        estimate_from=origin, gpu_hours=None if per_image is None else images * per_image / 3600,
    )


def _last_job_seconds_per_image(settings: Settings) -> tuple[float | None, str]:
    """GPU-seconds per image of the newest complete job in Redis, if there is one and Redis answers."""
    try:
        store = RedisJobStore(settings.state_redis_url(), retries=0)
        for job_id in store.job_ids():
            counters, stats = store.counters(job_id), store.stats(job_id)
            if counters.complete and counters.done and stats.model_seconds > 0:
                return stats.model_seconds / counters.done, f"job {job_id}"
    except redis.RedisError:
        pass  # no Redis to learn from: the plan is still worth printing
    return None, "none"
