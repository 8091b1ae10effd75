"""Embedded mode: the producer and the worker code in one process, no Redis, no S3 needed."""

from __future__ import annotations

from collections.abc import Callable

from sam3_batch.contracts.jobstate import JobStore
from sam3_batch.contracts.schemas import ChunkMessage, JobSpec
from sam3_batch.worker.chunk_record import record_chunk
from sam3_batch.worker.pipeline import ChunkContext, process_chunk


class InlineDispatcher:
    """Processes each chunk as soon as the producer plans it, and records it like a worker would."""

    def __init__(self, spec: JobSpec, store: JobStore, context: ChunkContext) -> None:
        self.spec, self.store, self.context = spec, store, context

    def wait_for_room(self, should_stop: Callable[[], bool]) -> None:
        """Never full: each chunk is processed before the next one is planned."""

    def send(self, chunk: ChunkMessage) -> None:
        result = process_chunk(chunk, self.spec, self.context)
        record_chunk(self.store, self.context.storage, self.spec, chunk, result)
