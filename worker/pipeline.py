"""``process_chunk``: fetch+decode in threads -> batched model -> encode+upload in threads.

The Celery task and the embedded runner both call this one function.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL import Image

from contracts.errors import JobCancelledError, is_transient, reason_of
from contracts.keys import OutputLayout
from contracts.schemas import ChunkMessage, ImageMetadata, ItemOutcome, JobSpec, Thresholds, WorkItem
from contracts.settings import Settings
from contracts.storage import Storage
from worker import metrics
from worker.decode import decode_image
from worker.detections import PromptDetections
from worker.writer import ImageJob, write_image_outputs


class SegmentationRuntime(Protocol):
    """What the pipeline needs of a resident model (worker.runtime.Sam3Runtime, or a bench stand-in)."""

    model_id: str
    revision: str | None

    def prepare(self, image: Image.Image) -> Any: ...

    def segment(
        self, images: list[Any], prompts: list[list[str]], thresholds: Thresholds
    ) -> list[list[PromptDetections]]: ...


@dataclass
class ChunkContext:
    """Per-worker resources, created once and reused by every chunk."""

    runtime: SegmentationRuntime
    storage: Storage
    settings: Settings
    io_pool: ThreadPoolExecutor
    out_pool: ThreadPoolExecutor

    @classmethod
    def create(cls, runtime: SegmentationRuntime, storage: Storage, settings: Settings) -> ChunkContext:
        # One pixel limit for the process: Pillow's own bomb check then agrees with decode_image's.
        Image.MAX_IMAGE_PIXELS = settings.max_image_pixels
        if settings.batch_size == 0:  # automatic: what the runtime finds fits (free GPU memory)
            settings = settings.model_copy(update={"batch_size": _automatic_batch_size(runtime)})
        return cls(
            runtime=runtime, storage=storage, settings=settings,
            io_pool=ThreadPoolExecutor(settings.io_threads, thread_name_prefix="sam3-fetch"),
            out_pool=ThreadPoolExecutor(settings.io_threads, thread_name_prefix="sam3-write"),
        )

    def close(self) -> None:
        self.io_pool.shutdown(wait=True)
        self.out_pool.shutdown(wait=True)


def _automatic_batch_size(runtime: SegmentationRuntime) -> int:
    # Optional in the protocol: a stand-in runtime without a memory probe gets the old default.
    suggest = getattr(runtime, "suggest_batch_size", None)
    return int(suggest()) if callable(suggest) else 8


@dataclass
class ChunkResult:
    """How every item of a chunk ended, plus the items worth another attempt later."""

    outcomes: list[ItemOutcome] = field(default_factory=list)
    retry_later: list[ItemOutcome] = field(default_factory=list)
    metadata: list[ImageMetadata] = field(default_factory=list)  # every done image's, for the index
    model_seconds: float = 0.0


@dataclass
class _Loaded:
    item: WorkItem
    image: Image.Image
    prepared: Any
    prompts: list[str]
    timings_ms: dict[str, float]


@dataclass(frozen=True)
class _AlreadyDone:
    item: WorkItem
    metadata: ImageMetadata


def _timed(timings: dict[str, float], stage: str, start: float) -> float:
    now = time.perf_counter()
    timings[stage] = (now - start) * 1000.0
    metrics.observe_stage(stage, now - start)
    return now


def _load(item: WorkItem, spec: JobSpec, ctx: ChunkContext, check_done: bool) -> _Loaded | _AlreadyDone:
    if check_done:
        done = _existing_result(item, spec, ctx.storage)
        if done is not None:
            return done
    timings: dict[str, float] = {}
    start = time.perf_counter()
    data = ctx.storage.read_bytes(item.uri)
    start = _timed(timings, "download", start)
    image = decode_image(data, max_pixels=ctx.settings.max_image_pixels)
    start = _timed(timings, "decode", start)
    prepared = ctx.runtime.prepare(image)
    _timed(timings, "preprocess", start)
    return _Loaded(item, image, prepared, list(item.prompts or spec.prompts), timings)


def _existing_result(item: WorkItem, spec: JobSpec, storage: Storage) -> _AlreadyDone | None:
    """On a retry or redelivery, an image whose metadata already exists is done: do not redo it."""
    uri = OutputLayout(spec.output_root, item.out_key).metadata_uri
    if not storage.exists(uri):
        return None
    metadata = ImageMetadata.model_validate_json(storage.read_bytes(uri))
    if metadata.job_id != spec.job_id:
        return None
    return _AlreadyDone(item, metadata)


def _failure(item: WorkItem, exc: BaseException, result: ChunkResult, final_attempt: bool) -> None:
    outcome = ItemOutcome(uri=item.uri, status="failed", reason=reason_of(exc), out_key=item.out_key)
    if is_transient(exc) and not final_attempt:
        result.retry_later.append(outcome)
        return
    result.outcomes.append(outcome)
    metrics.count_image("failed", reason_class=type(exc).__name__)


def _batches(loaded: Iterable[_Loaded], size: int) -> Iterator[list[_Loaded]]:
    batch: list[_Loaded] = []
    for entry in loaded:
        batch.append(entry)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class _ChunkRun:
    """The state of one chunk while it flows through the stages."""

    def __init__(self, chunk: ChunkMessage, spec: JobSpec, ctx: ChunkContext, final_attempt: bool) -> None:
        self.chunk, self.spec, self.ctx, self.final_attempt = chunk, spec, ctx, final_attempt
        self.result = ChunkResult()
        self.writes: list[tuple[WorkItem, Future[ImageMetadata]]] = []

    def loaded_images(self, check_done: bool) -> Iterator[_Loaded]:
        """Images as their fetch+decode finishes (any order); failures and done ones are recorded here."""
        futures = {
            self.ctx.io_pool.submit(_load, item, self.spec, self.ctx, check_done): item
            for item in self.chunk.items
        }
        for future in as_completed(futures):
            item = futures[future]
            try:
                loaded = future.result()
            except Exception as exc:
                _failure(item, exc, self.result, self.final_attempt)
                continue
            if isinstance(loaded, _AlreadyDone):
                self.done(item, loaded.metadata)
            else:
                yield loaded

    def done(self, item: WorkItem, metadata: ImageMetadata) -> None:
        instances = len(metadata.annotations)
        self.result.outcomes.append(ItemOutcome(uri=item.uri, status="done", instances=instances, out_key=item.out_key))
        self.result.metadata.append(metadata)

    def run_batch(self, batch: list[_Loaded]) -> None:
        """One model call for the batch; if it fails, each image alone so one bad image fails alone."""
        start = time.perf_counter()
        try:
            found = self.ctx.runtime.segment(
                [b.prepared for b in batch], [b.prompts for b in batch], self.spec.thresholds
            )
        except Exception:
            if len(batch) == 1:
                raise
            for single in batch:
                self.run_single(single)
            return
        elapsed = time.perf_counter() - start
        self.result.model_seconds += elapsed
        metrics.BATCH_SIZE.observe(len(batch))
        for entry, detections in zip(batch, found, strict=True):
            entry.timings_ms["model"] = elapsed * 1000.0 / len(batch)
            metrics.observe_stage("model", elapsed / len(batch))
            self.submit_write(entry, detections)

    def run_single(self, entry: _Loaded) -> None:
        try:
            self.run_batch([entry])
        except Exception as exc:
            _failure(entry.item, exc, self.result, self.final_attempt)

    def submit_write(self, entry: _Loaded, detections: list[PromptDetections]) -> None:
        job = ImageJob(self.spec, self.chunk.chunk_id, entry.item, entry.image, detections, entry.timings_ms)
        self.writes.append((entry.item, self.ctx.out_pool.submit(_write, job, self.ctx.storage)))

    def collect_writes(self) -> None:
        for item, future in self.writes:
            try:
                metadata = future.result()
            except Exception as exc:
                _failure(item, exc, self.result, self.final_attempt)
                continue
            self.done(item, metadata)
            metrics.count_image("done", len(metadata.annotations))


def _write(job: ImageJob, storage: Storage) -> ImageMetadata:
    start = time.perf_counter()
    metadata = write_image_outputs(job, storage)
    metrics.observe_stage("encode_upload", time.perf_counter() - start)
    return metadata


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

    ``check_done`` (retries, redeliveries) skips images whose metadata already exists. With
    ``final_attempt`` false, transient failures are returned in ``retry_later`` instead of failing.
    Raises JobCancelledError when ``should_stop`` turns true; nothing new is written after that.
    """
    run = _ChunkRun(chunk, spec, ctx, final_attempt)
    try:
        for batch in _batches(run.loaded_images(check_done), ctx.settings.batch_size):
            if should_stop():
                raise JobCancelledError(f"job {spec.job_id} was cancelled")
            try:
                run.run_batch(batch)
            except Exception as exc:
                for entry in batch:
                    _failure(entry.item, exc, run.result, final_attempt)
    finally:
        run.collect_writes()
    return run.result
