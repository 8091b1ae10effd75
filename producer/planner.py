"""Packs source entries into chunk messages with deterministic ids (a restarted producer makes the same ones)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from pydantic import ValidationError

from sam3_batch.contracts.chunk_ids import chunk_id_for
from sam3_batch.contracts.redact import display_uri, redact
from sam3_batch.contracts.schemas import ChunkMessage, Failure, WorkItem
from sam3_batch.producer.sources import SourceEntry, SourceItem, SourceProblem

# A long run of skipped or bad entries still moves the checkpoint forward every this many entries.
_FLUSH_NON_ITEMS = 1024


@dataclass
class PlannedChunk:
    """A chunk ready to send, the position to resume after it, and entries that were skipped or bad."""

    message: ChunkMessage | None  # None when every entry was skipped or bad
    seq: int
    last_position: str
    skipped: int = 0
    problems: list[Failure] = field(default_factory=list)


def plan_chunks(
    entries: Iterable[SourceEntry],
    job_id: str,
    chunk_size: int,
    start_seq: int = 0,
    is_done: Callable[[str], bool] = lambda out_key: False,
    generation: int = 0,
) -> Iterator[PlannedChunk]:
    """Group entries into chunks of ``chunk_size`` images; done images are counted as skipped."""
    seq, items, skipped, problems, position = start_seq, [], 0, [], ""
    for entry in entries:
        position = entry.position
        item = entry if isinstance(entry, SourceProblem) else _work_item(entry)
        if isinstance(item, SourceProblem):
            chunk_id = chunk_id_for(job_id, seq, generation)
            problems.append(Failure(uri=display_uri(item.where), reason=redact(item.reason), chunk_id=chunk_id))
        elif is_done(item.out_key):
            skipped += 1
        else:
            items.append(item)
        if len(items) == chunk_size or skipped + len(problems) >= _FLUSH_NON_ITEMS:
            yield PlannedChunk(_message(job_id, seq, generation, items), seq, position, skipped, problems)
            seq, items, skipped, problems = seq + 1, [], 0, []
    if items or skipped or problems:
        yield PlannedChunk(_message(job_id, seq, generation, items), seq, position, skipped, problems)


def _has_credentials(uri: str) -> bool:
    if "@" not in uri:  # userinfo needs an "@": most URIs are settled without parsing (the producer's hot path)
        return False
    try:
        parts = urlsplit(uri)
    except ValueError:  # malformed: the storage layer says why when it reads it
        return False
    return parts.username is not None or parts.password is not None


def _work_item(entry: SourceItem) -> WorkItem | SourceProblem:
    if _has_credentials(entry.uri):
        # Refused before it becomes a work item: its password would reach queue messages, output keys,
        # failures and the job report.
        return SourceProblem(redact(entry.uri), "credentials in URLs are not supported: give the worker "
                             "access to the source instead", entry.position)
    try:
        return WorkItem.model_validate(
            {"uri": entry.uri, "out_key": entry.out_key, "prompts": entry.prompts, "objects": entry.objects}
        )
    except ValidationError as exc:
        reasons = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return SourceProblem(entry.uri, f"invalid item: {reasons}", entry.position)


def _message(job_id: str, seq: int, generation: int, items: list[WorkItem]) -> ChunkMessage | None:
    if not items:
        return None
    chunk_id = chunk_id_for(job_id, seq, generation)
    return ChunkMessage(job_id=job_id, chunk_id=chunk_id, generation=generation, items=items)
