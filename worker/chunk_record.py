"""After a chunk is processed: its Parquet part is written, then the chunk is counted (Celery task and embedded)."""

from __future__ import annotations

from sam3_batch.contracts.jobstate import JobStore
from sam3_batch.contracts.schemas import ChunkMessage
from sam3_batch.contracts.storage import Storage
from sam3_batch.worker.parquet_parts import write_chunk_part
from sam3_batch.worker.pipeline import ChunkResult


def record_chunk(store: JobStore, storage: Storage, output_root: str, chunk: ChunkMessage, result: ChunkResult) -> bool:
    """Write the chunk's part, then count the chunk once; False if it had been counted already.

    The part must exist before the chunk counts as done: a crash in between redelivers the chunk, whose
    part (named by the chunk id) is then written again, never twice.
    """
    write_chunk_part(storage, output_root, chunk.job_id, chunk.chunk_id, result.metadata)
    return store.record_chunk(chunk.job_id, chunk.chunk_id, result.outcomes, result.model_seconds)
