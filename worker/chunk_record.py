"""After a chunk is processed: its Parquet part is written, then the chunk is counted (Celery task and embedded)."""

from __future__ import annotations

from sam3_batch.contracts.jobstate import JobStore
from sam3_batch.contracts.lake import PARQUET_CONTENT_TYPE, encode_chunk_part
from sam3_batch.contracts.schemas import ChunkMessage, JobSpec
from sam3_batch.contracts.storage import Storage
from sam3_batch.worker import metrics
from sam3_batch.worker.pipeline import ChunkResult


def record_chunk(store: JobStore, storage: Storage, spec: JobSpec, chunk: ChunkMessage, result: ChunkResult, *,
                 commit: str | None = None, generation: int | None = None) -> bool:
    """Write the chunk's part, then count the chunk once; False if it had been counted already.

    The part must exist before the chunk counts as done: a crash in between redelivers the chunk, whose
    part (named by the chunk id, or in the chunk layout by its content) is then written again, never twice;
    in the chunk layout the part is the shard, the chunk's done marker, written after every image's files.
    ``commit`` is the model commit that made the outputs; with ``generation``, a chunk of an older plan
    raises StaleGenerationError instead.
    """
    if not result.from_existing_shard:  # a redelivery counted from its shard: the shard is already there
        part = encode_chunk_part(spec, chunk.chunk_id, result.outcomes, result.metadata,
                                 [item.out_key for item in chunk.items])
        if part is not None:
            storage.write_bytes(part[0], part[1], PARQUET_CONTENT_TYPE)
            metrics.BYTES_WRITTEN.labels(kind="part").inc(len(part[1]))
    if commit:
        store.note_model_commit(chunk.job_id, commit)
    return store.record_chunk(chunk.job_id, chunk.chunk_id, result.outcomes, result.model_seconds,
                              generation=generation)
