"""``process_chunk``: load in the loader pool -> batched model -> write in the writer pool.

The model runs here, in the calling thread; loading (read, decode, prepare) and writing (encode, upload)
are steps (``worker.io_stages``) run by stage pools (``worker.stage_pools``: processes by default). The
Celery task and the embedded runner both call this one function.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from typing import Protocol, TypeVar

from sam3_batch.contracts.errors import ItemError, JobCancelledError
from sam3_batch.contracts.lake import existing_shard_outcomes
from sam3_batch.contracts.schemas import ChunkMessage, ImageMetadata, ItemOutcome, JobSpec, Thresholds, WorkItem
from sam3_batch.contracts.settings import Settings
from sam3_batch.contracts.storage import Storage
from sam3_batch.worker import metrics
from sam3_batch.worker.detections import MaskDelivery, PromptDetections
from sam3_batch.worker.device_post import defer_to_writer
from sam3_batch.worker.io_stages import (
    AlreadyDone,
    DoneCheck,
    LoadedImage,
    Loader,
    LoaderSetup,
    LoadResult,
    StageFailure,
    WriteResult,
    WriterSetup,
    WrittenImage,
    load_image,
    pixel_slots_for,
    write_image,
)
from sam3_batch.worker.model_input import PreparedImage, Preparer
from sam3_batch.worker.stage_pools import StagePool, StageProcessDied
from sam3_batch.worker.visual_prompts import (
    VisualRequest,
    VisualResult,
    fit_objects,
    fit_prompts,
    has_visual_prompts,
)
from sam3_batch.worker.writer import WriteRequest, masks_for_writer

T = TypeVar("T")


class SegmentationRuntime(Protocol):
    """What the pipeline needs of a resident model (worker.runtime.Sam3Runtime, or a bench stand-in).

    Optional: ``stage`` and ``start_segment`` (a batch's model part apart from the host's copy before it and
    the assembling after it, so the model is free meanwhile) and ``segment_visual`` (exemplar boxes, objects).
    """

    model_id: str
    revision: str | None

    @property
    def preparer(self) -> Preparer:
        """Image -> model input; picklable, because loader processes run it."""
        ...

    def segment(
        self, images: list[PreparedImage], prompts: list[list[str]], thresholds: Thresholds,
        masks: MaskDelivery = "full",
    ) -> list[list[PromptDetections]]: ...


@dataclass
class ChunkContext:
    """Per-worker resources, created once and reused by every chunk."""

    runtime: SegmentationRuntime
    storage: Storage
    settings: Settings
    loaders: StagePool[Loader]
    writers: StagePool[Storage]
    # One slot per image whose detections (full-size masks) wait in host RAM for their write, shared by
    # every chunk in flight: when all are taken the model waits for the writers instead of piling up masks.
    write_slots: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(16))
    # One batch on the model at a time; model time is measured inside it, so chunks waiting do not count.
    model_turn: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def create(cls, runtime: SegmentationRuntime, storage: Storage, settings: Settings) -> ChunkContext:
        if settings.batch_size == 0:  # automatic: what the runtime finds fits (free GPU memory)
            settings = settings.model_copy(update={"batch_size": _automatic_batch_size(runtime)})
        preparer = runtime.preparer
        # The stage processes import the steps and the preparer's module once, in the forkserver.
        preload = [name for name in ("sam3_batch.worker.io_stages", getattr(preparer, "__module__", None)) if name]
        mode, workers = settings.io_mode, settings.io_worker_count()
        loader_setup = LoaderSetup(settings, preparer, slots=pixel_slots_for(settings, preparer, mode))
        return cls(
            runtime=runtime, storage=storage, settings=settings,
            loaders=StagePool("loader", loader_setup, mode=mode, workers=workers, preload=preload),
            writers=StagePool("writer", WriterSetup(settings), mode=mode, workers=workers, preload=preload),
            write_slots=threading.Semaphore(pending_writes_limit(settings)),
        )

    def close(self) -> None:
        self.loaders.close()
        self.writers.close()


def pending_writes_limit(settings: Settings) -> int:
    """Images whose masks may wait for a writer at once: the setting, or two batches' worth."""
    return settings.max_pending_writes or 2 * max(settings.batch_size, 1)


def _automatic_batch_size(runtime: SegmentationRuntime) -> int:
    # Optional in the protocol: a stand-in runtime without a memory probe gets the old default.
    suggest = getattr(runtime, "suggest_batch_size", None)
    return int(suggest()) if callable(suggest) else 8


@dataclass(frozen=True)
class TransientFailure:
    """One transient error as it happened: which image, in which operation (load, model, write), why."""

    uri: str
    operation: str
    reason: str


@dataclass
class ChunkResult:
    """How every item of a chunk ended, plus the items worth another attempt later."""

    outcomes: list[ItemOutcome] = field(default_factory=list)
    retry_later: list[ItemOutcome] = field(default_factory=list)
    transient: list[TransientFailure] = field(default_factory=list)  # this attempt's, for the logs
    metadata: list[ImageMetadata] = field(default_factory=list)  # every done image's, for the index
    model_seconds: float = 0.0  # the model's time on this chunk's batches (while it had the model's turn)
    from_existing_shard: bool = False  # chunk layout: read back from the chunk's shard; nothing to write


def _failure(item: WorkItem, failure: StageFailure, result: ChunkResult, final_attempt: bool,
             operation: str) -> None:
    outcome = ItemOutcome(uri=item.uri, status="failed", reason=failure.reason, out_key=item.out_key)
    if failure.transient:
        metrics.TRANSIENT_ERRORS.labels(operation=operation).inc()
        result.transient.append(TransientFailure(item.uri, operation, failure.reason))
    if failure.transient and not final_attempt:
        result.retry_later.append(outcome)
        return
    result.outcomes.append(outcome)
    metrics.count_image("failed", reason_class=failure.error_class)


def _batches(loaded: Iterable[LoadedImage], size: int) -> Iterator[list[LoadedImage]]:
    batch: list[LoadedImage] = []
    for entry in loaded:
        batch.append(entry)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _outcome_of(future: Future[T]) -> T | StageFailure:
    """A stage future's result; a dead stage process is re-raised, anything else becomes a StageFailure."""
    try:
        return future.result()
    except BrokenProcessPool:
        raise
    except Exception as exc:  # the task could not even be handed over (e.g. pickling)
        return StageFailure.of(exc)


def _alone(run_isolated: Callable[[], T]) -> T | StageFailure:
    """The result of a step run alone (``StagePool.run_isolated``), or a failure if its process died every time."""
    try:
        return run_isolated()
    except StageProcessDied as exc:
        return StageFailure.of(exc)


@dataclass
class _PendingWrite:
    """A started write; its request (masks and pixels) is kept only until the write is done."""

    item: WorkItem
    request: WriteRequest | None
    future: Future[WriteResult]
    slot: threading.Semaphore

    def release_request(self, future: Future[WriteResult]) -> None:
        if not isinstance(future.exception(), BrokenProcessPool):  # kept to redo the write if its process died
            self.request = None
        self.slot.release()


class _ChunkRun:
    """The state of one chunk while it flows through the stages."""

    def __init__(self, chunk: ChunkMessage, spec: JobSpec, ctx: ChunkContext, final_attempt: bool) -> None:
        self.chunk, self.spec, self.ctx, self.final_attempt = chunk, spec, ctx, final_attempt
        self.result = ChunkResult()
        self.writes: list[_PendingWrite] = []

    def loaded_images(self, check_done: bool) -> Iterator[LoadedImage]:
        """Images as their loading finishes (any order); failures and done ones are recorded here.

        If a loader process dies, every load in flight fails with it: those images are loaded again
        one at a time in a fresh pool, so that only an image that kills its process every time fails.
        """
        keep_pixels = self.spec.outputs.masked_image
        # Without K.json (the chunk layout's default) there is nothing per image to look for.
        per_image = check_done and self.spec.outputs.writes_per_image_json
        done_check = DoneCheck(self.spec.output_root, self.spec.job_id) if per_image else None
        loaders = self.ctx.loaders
        futures = {loaders.start(load_image, item, keep_pixels, done_check): item for item in self.chunk.items}
        orphans: list[WorkItem] = []
        for future in as_completed(futures):
            try:
                loaded = _outcome_of(future)
            except BrokenProcessPool:
                orphans.append(futures[future])
                continue
            yield from self._accept_load(futures[future], loaded)
        for item in orphans:
            alone = _alone(lambda: loaders.run_isolated(load_image, item, keep_pixels, done_check))  # noqa: B023
            yield from self._accept_load(item, alone)

    def _accept_load(self, item: WorkItem, loaded: LoadResult) -> Iterator[LoadedImage]:
        if isinstance(loaded, StageFailure):
            _failure(item, loaded, self.result, self.final_attempt, "load")
        elif isinstance(loaded, AlreadyDone):
            self.done(item, loaded.metadata)
        else:
            try:
                fitted = _with_fitted_prompts(replace(loaded, prompts=list(item.prompts or self.spec.prompts)))
            except Exception as exc:
                _failure(item, StageFailure.of(exc), self.result, self.final_attempt, "load")
                return
            for stage, ms in loaded.timings_ms.items():
                metrics.observe_stage(stage, ms / 1000.0)
            metrics.BYTES_READ.inc(loaded.bytes_read)
            yield fitted

    def done(self, item: WorkItem, metadata: ImageMetadata) -> None:
        instances = len(metadata.annotations)
        self.result.outcomes.append(ItemOutcome(uri=item.uri, status="done", instances=instances, out_key=item.out_key))
        self.result.metadata.append(metadata)

    def run_batch(self, batch: list[LoadedImage]) -> None:
        """One model call for the batch; if it fails, each image alone so one bad image fails alone."""
        try:
            found, elapsed = self._segment(batch)
        except Exception:
            if len(batch) == 1:
                raise
            for single in batch:
                self.run_single(single)
            return
        self.result.model_seconds += elapsed
        metrics.BATCH_IMAGES.observe(len(batch))
        for entry, (detections, objects) in zip(batch, found, strict=True):
            entry.timings_ms["model"] = elapsed * 1000.0 / len(batch)
            metrics.observe_stage("model", elapsed / len(batch))
            self.start_write(entry, detections, objects)

    def _segment(self, batch: list[LoadedImage]) -> tuple[Segmented, float]:
        """The model's detections and the seconds they took: timed once this chunk has the model's turn.

        The turn is held for the model's part only: this batch's pixels are stacked on the device before it,
        and its results assembled on the host after it, while another chunk's batch has the model.
        """
        staged = _staged(self.ctx.runtime, batch)
        with self.ctx.model_turn:
            start = time.perf_counter()
            finish = _start_by_prompt_kind(self.ctx.runtime, batch, self.spec, staged)
            on_model = time.perf_counter() - start
        start = time.perf_counter()
        found = finish()
        return found, on_model + time.perf_counter() - start

    def run_single(self, entry: LoadedImage) -> None:
        try:
            self.run_batch([entry])
        except Exception as exc:
            _failure(entry.item, StageFailure.of(exc), self.result, self.final_attempt, "model")

    def start_write(
        self, entry: LoadedImage, detections: list[PromptDetections], objects: list[PromptDetections]
    ) -> None:
        request = WriteRequest(
            self.spec, self.chunk.chunk_id, entry.item, entry.size_wh, entry.rgb, detections, entry.timings_ms,
            prompts=entry.prompts, objects=entry.objects, object_detections=objects,
            model_commit=getattr(self.ctx.runtime, "commit", None),
        )
        self.ctx.write_slots.acquire()  # released when the write is done (failed or lost included)
        try:
            future = self.ctx.writers.start(write_image, request)
        except BaseException:
            self.ctx.write_slots.release()
            raise
        pending = _PendingWrite(entry.item, request, future, self.ctx.write_slots)
        pending.future.add_done_callback(pending.release_request)
        self.writes.append(pending)

    def collect_writes(self) -> None:
        """Wait for every write; writes lost with a dead writer process are redone one at a time."""
        orphans: list[tuple[WorkItem, WriteRequest]] = []
        for pending in self.writes:
            try:
                written = _outcome_of(pending.future)
            except BrokenProcessPool:
                assert pending.request is not None  # kept by release_request for exactly this
                orphans.append((pending.item, pending.request))
                continue
            self._accept_write(pending.item, written)
        writers = self.ctx.writers
        for item, request in orphans:
            self._accept_write(item, _alone(lambda: writers.run_isolated(write_image, request)))  # noqa: B023

    def _accept_write(self, item: WorkItem, written: WriteResult) -> None:
        if isinstance(written, StageFailure):
            _failure(item, written, self.result, self.final_attempt, "write")
            return
        assert isinstance(written, WrittenImage)
        metrics.observe_stage("encode_upload", written.seconds)
        metrics.BYTES_WRITTEN.labels(kind="output").inc(written.bytes_written)
        self.done(item, written.metadata)
        metrics.count_image("done", len(written.metadata.annotations))


def _with_fitted_prompts(loaded: LoadedImage) -> LoadedImage:
    """The image with its visual prompts checked against its size (boxes clipped); raises if one does not fit."""
    objects = loaded.item.objects or []
    if not loaded.prompts and not objects:
        raise ItemError("the image has no prompts: give the job --prompt, or 'prompts'/'objects' in the manifest")
    if not has_visual_prompts(loaded.prompts, objects):
        return loaded
    return replace(loaded, prompts=fit_prompts(loaded.prompts, loaded.size_wh),
                   objects=fit_objects(objects, loaded.size_wh))


Segmented = list[tuple[list[PromptDetections], list[PromptDetections]]]  # per image: concepts, objects


def _text_only(batch: list[LoadedImage]) -> bool:
    return not any(has_visual_prompts(b.prompts, b.objects) for b in batch)


def _staged(runtime: SegmentationRuntime, batch: list[LoadedImage]) -> object | None:
    """A text-only batch's pixels stacked on the device (``stage``), if the runtime splits its work so."""
    stage = getattr(runtime, "stage", None)
    if not callable(stage) or not callable(getattr(runtime, "start_segment", None)) or not _text_only(batch):
        return None
    staged: object = stage([b.prepared for b in batch])
    return staged


def _start_by_prompt_kind(
    runtime: SegmentationRuntime, batch: list[LoadedImage], spec: JobSpec, staged: object | None = None
) -> Callable[[], Segmented]:
    """The model's part of a batch now; what returns its detections once they are on the host.

    Text prompts alone go through ``start_segment`` (or ``segment``, for a runtime without it), with the
    pixels ``_staged`` if they were; a batch with visual prompts through ``segment_visual``.
    """
    thresholds, masks = spec.thresholds, masks_for_writer(spec)
    if _text_only(batch):
        texts = [[p for p in b.prompts if isinstance(p, str)] for b in batch]
        start = getattr(runtime, "start_segment", None)
        with defer_to_writer():  # every detection goes to a writer, which materialises deferred masks
            if callable(start):
                more = {"staged": staged} if staged is not None else {}
                finish: Callable[[], list[list[PromptDetections]]] = start(
                    [b.prepared for b in batch], texts, thresholds, masks, **more)
            else:
                found = runtime.segment([b.prepared for b in batch], texts, thresholds, masks)
                finish = lambda: found  # noqa: E731
        return lambda: [(detections, []) for detections in finish()]
    segment_visual = getattr(runtime, "segment_visual", None)
    if not callable(segment_visual):
        raise ItemError("this runtime does not support visual prompts (exemplar boxes, objects)")
    requests = [VisualRequest(b.prompts, b.objects) for b in batch]
    results: list[VisualResult] = segment_visual([b.prepared for b in batch], requests, thresholds, masks)
    return lambda: [(result.concepts, result.objects) for result in results]


def process_chunk(
    chunk: ChunkMessage,
    spec: JobSpec,
    ctx: ChunkContext,
    *,
    check_done: bool = False,
    final_attempt: bool = True,
    should_stop: Callable[[], bool] = lambda: False,
) -> ChunkResult:
    """Segment every image of a chunk and write its outputs; every item ends done, failed or retry_later.

    ``check_done`` (retries, redeliveries) skips images whose metadata already exists, and in the chunk
    layout a whole chunk whose shard exists (its outcomes are read back from the shard). With
    ``final_attempt`` false, transient failures are returned in ``retry_later`` instead of failing.
    Raises JobCancelledError when ``should_stop`` turns true; nothing new is written after that.
    """
    if check_done:
        shard = existing_shard_outcomes(ctx.storage, spec, chunk.chunk_id, [item.out_key for item in chunk.items])
        if shard is not None:
            return ChunkResult(outcomes=shard, from_existing_shard=True)
    run = _ChunkRun(chunk, spec, ctx, final_attempt)
    try:
        for batch in _batches(run.loaded_images(check_done), ctx.settings.batch_size):
            if should_stop():
                raise JobCancelledError(f"job {spec.job_id} was cancelled")
            try:
                run.run_batch(batch)
            except Exception as exc:
                for entry in batch:
                    _failure(entry.item, StageFailure.of(exc), run.result, final_attempt, "model")
    finally:
        run.collect_writes()
    return run.result
