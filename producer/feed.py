"""The producer loop: list -> skip done -> plan chunks -> dispatch -> count + checkpoint, resumable."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from sam3_batch.contracts.chunk_ids import chunk_id_for
from sam3_batch.contracts.jobstate import Checkpoint, JobStore, PlannedCounts
from sam3_batch.contracts.report import finalize_if_complete
from sam3_batch.contracts.schemas import JobSpec
from sam3_batch.contracts.storage import Storage
from sam3_batch.producer import metrics
from sam3_batch.producer.cancel_check import CancelCheck
from sam3_batch.producer.dispatch import Dispatcher
from sam3_batch.producer.done_index import DoneIndex, ShardIndex
from sam3_batch.producer.planner import PlannedChunk, plan_chunks
from sam3_batch.producer.sources import Source

log = logging.getLogger(__name__)


def new_job_id() -> str:
    """A sortable, unique job id such as ``20261125-001603-3fa2c1``."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


@dataclass
class ProducerSummary:
    job_id: str
    chunks_sent: int = 0
    images_enqueued: int = 0
    skipped: int = 0
    problems: int = 0
    listing_complete: bool = False


def _register(store: JobStore, job_id: str, planned: PlannedChunk, generation: int) -> None:
    size = len(planned.message.items) if planned.message else 0
    counts = PlannedCounts(
        total=size + planned.skipped + len(planned.problems), skipped=planned.skipped,
        failures=tuple(planned.problems),
    )
    checkpoint = Checkpoint(position=planned.last_position, next_seq=planned.seq + 1)
    store.register_chunk(job_id, chunk_id_for(job_id, planned.seq, generation), counts, checkpoint)


def _timed_while_waiting(should_stop: Callable[[], bool]) -> Callable[[], bool]:
    """``should_stop``, also adding the time since its last call to the backpressure counter: backpressure
    asks it on every poll, so a scrape during a long wait already shows the time waited so far."""
    last = [time.monotonic()]

    def asked() -> bool:
        now = time.monotonic()
        metrics.BACKPRESSURE_SECONDS.inc(now - last[0])
        last[0] = now
        return should_stop()

    return asked


def _count(planned: PlannedChunk) -> None:
    images = len(planned.message.items) if planned.message else 0
    metrics.LISTED.inc(images + planned.skipped + len(planned.problems))
    metrics.ENQUEUED.inc(images)
    metrics.CHUNKS.inc(1 if planned.message else 0)
    metrics.SKIPPED.inc(planned.skipped)
    metrics.BAD_ENTRIES.inc(len(planned.problems))


def done_index_for(storage: Storage, output_root: str, layout: str, chunk_size: int) -> DoneIndex | ShardIndex:
    """One listing: of the ``K.json`` files (image layout) or of the shards (chunk layout)."""
    if layout == "chunk":
        return ShardIndex.from_output_root(storage, output_root, chunk_size)
    return DoneIndex.from_output_root(storage, output_root)


def skip_done_chunk(planned: PlannedChunk, done: DoneIndex | ShardIndex | None) -> PlannedChunk:
    """In the chunk layout, a chunk whose shard exists is skipped whole (its images count as skipped)."""
    if not isinstance(done, ShardIndex) or planned.message is None:
        return planned
    if not done.chunk_done([item.out_key for item in planned.message.items]):
        return planned
    return replace(planned, message=None, skipped=planned.skipped + len(planned.message.items))


def run_producer(
    spec: JobSpec,
    source: Source,
    store: JobStore,
    storage: Storage,
    dispatcher: Dispatcher,
    chunk_size: int,
    *,
    skip_existing: bool = False,
    on_progress: Callable[[ProducerSummary], None] = lambda summary: None,
) -> ProducerSummary:
    """Enqueue every image of the source once, continuing from the job's checkpoint if it has one.

    Each chunk is sent BEFORE it is registered with its checkpoint: a crash in between re-sends the
    same chunk id after a restart, which workers count once; the other order could lose a chunk.
    ``skip_existing`` applies to a listing that starts afresh; a listing continued from a checkpoint
    plans exactly the chunks it would have planned before, so that re-sent chunk has the same images.
    """
    job_id, summary = spec.job_id, ProducerSummary(spec.job_id)
    if spec.outputs.layout == "chunk" and spec.chunk_size:
        chunk_size = spec.chunk_size  # the job's chunking, kept on resume: the same chunks name the same shards
    generation = store.generation(job_id)
    checkpoint = store.checkpoint(job_id)
    start_after, seq = (checkpoint.position, checkpoint.next_seq) if checkpoint else (None, 0)
    # Skipping done images on a continued listing would change which images the re-sent chunk id holds,
    # and workers drop a chunk id they have already counted: its new images would never be processed.
    use_done_index = skip_existing and checkpoint is None
    done = done_index_for(storage, spec.output_root, spec.outputs.layout, chunk_size) if use_done_index else None
    is_done = (lambda key: key in done) if done is not None else (lambda key: False)

    is_cancelled = CancelCheck(lambda: store.is_cancelled(job_id))

    def cancelled() -> bool:
        on_progress(summary)  # also asked while backpressure holds the producer: progress stays visible
        return is_cancelled()

    for planned in plan_chunks(source.entries(start_after), job_id, chunk_size, seq, is_done, generation):
        if cancelled():
            log.warning("job %s cancelled: producer stops", job_id)
            return summary
        planned = skip_done_chunk(planned, done)
        if planned.message is not None:
            dispatcher.wait_for_room(_timed_while_waiting(cancelled))
            dispatcher.send(planned.message)
            summary.chunks_sent += 1
            summary.images_enqueued += len(planned.message.items)
        _register(store, job_id, planned, generation)
        summary.skipped += planned.skipped
        summary.problems += len(planned.problems)
        _count(planned)
    store.mark_listing_complete(job_id)
    metrics.LISTING_COMPLETE.set(1)
    summary.listing_complete = True
    finalize_if_complete(store, storage, job_id)
    return summary
