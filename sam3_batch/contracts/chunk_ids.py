"""Chunk ids, and where a chunk is marked in the job state: a bit for a planned chunk, a set member otherwise.

The producer numbers a job's chunks 0, 1, 2 ... within a generation, so "planned", "started" and "recorded"
are bitmaps indexed by that number: a billion images in chunks of 32 take 31 M bits (about 4 MB) per
bitmap instead of ~35 bytes per chunk id in a set. Chunks made outside the plan (``retry-failed``) carry
other ids; there are only as many as failed images / chunk size, so they stay members of small sets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Redis bitmaps address at most 2^32 bits; the planner's 9 digits stay far below that.
MAX_SEQ = 2**32 - 1
_PLANNED = re.compile(r"-g(\d{1,9})-(\d{9,10})$")


@dataclass(frozen=True)
class ChunkSlot:
    """A planned chunk's generation and its bit (its sequence number) in the job-state bitmaps."""

    generation: int
    bit: int


def chunk_id_for(job_id: str, seq: int, generation: int = 0) -> str:
    """Chunk ids are the job id plus a sequence number, so replanning after a restart gives the same ids."""
    return f"{job_id}-g{generation}-{seq:09d}"


def chunk_slot(job_id: str, chunk_id: str) -> ChunkSlot | None:
    """The bit of a chunk the producer planned for ``job_id``; None for any other id (e.g. a retry chunk)."""
    if not chunk_id.startswith(job_id):
        return None
    found = _PLANNED.fullmatch(chunk_id, len(job_id))
    if found is None:
        return None
    seq = int(found.group(2))
    return ChunkSlot(generation=int(found.group(1)), bit=seq) if seq <= MAX_SEQ else None
