"""Job state is O(1) per image: planned chunks are bits, not ids, and they still count exactly once.

Runs against a real Redis (and the in-memory twin, which must behave the same).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from sam3_batch.contracts.chunk_ids import ChunkSlot, chunk_id_for, chunk_slot
from sam3_batch.contracts.errors import StaleGenerationError
from sam3_batch.contracts.jobstate import JOB_PARTS, Checkpoint, JobStore, PlannedCounts, RedisJobStore, job_key
from sam3_batch.contracts.jobstate_memory import MemoryJobStore
from sam3_batch.contracts.schemas import ItemOutcome, JobSpec
from sam3_batch.contracts.settings import Settings

JOB = "20261129-160000-abc123"  # job ids contain dashes, as new_job_id makes them


@pytest.fixture(params=["redis", "memory"])
def store(request: pytest.FixtureRequest, settings_factory: Callable[..., Settings]) -> JobStore:
    if request.param == "memory":
        return MemoryJobStore()
    return RedisJobStore(settings_factory().state_redis_url())


def _done(n: int) -> list[ItemOutcome]:
    return [ItemOutcome(uri=f"s3://b/{i}.jpg", status="done", out_key=f"{i}.jpg") for i in range(n)]


def test_planned_chunk_ids_map_to_their_sequence_number_and_other_ids_to_none() -> None:
    assert chunk_slot(JOB, chunk_id_for(JOB, 41, generation=3)) == ChunkSlot(generation=3, bit=41)
    assert chunk_slot(JOB, f"{JOB}-retry0a1b2c3d-000000032") is None  # retry-failed chunks
    assert chunk_slot(JOB, "c0") is None
    assert chunk_slot("other-job", chunk_id_for(JOB, 1)) is None
    assert chunk_slot(JOB[:-1], chunk_id_for(JOB, 1)) is None  # a job id that is a prefix of another


def test_a_redelivered_planned_chunk_counts_once_and_a_retry_chunk_counts_beside_it(store: JobStore) -> None:
    store.create(JobSpec(job_id=JOB, prompts=["a"], output_root="/o"))
    first, retry = chunk_id_for(JOB, 0), f"{JOB}-retry0a1b2c3d-000000000"
    assert store.register_chunk(JOB, first, PlannedCounts(total=3), Checkpoint("c", 1))
    assert not store.register_chunk(JOB, first, PlannedCounts(total=3), Checkpoint("c", 1))
    assert store.mark_chunk_started(JOB, first) and not store.mark_chunk_started(JOB, first)
    assert store.record_chunk(JOB, first, _done(3), 0.0, generation=0)
    assert not store.record_chunk(JOB, first, _done(3), 0.0, generation=0)  # redelivered
    assert store.is_chunk_recorded(JOB, first) and not store.is_chunk_recorded(JOB, chunk_id_for(JOB, 1))
    assert store.record_chunk(JOB, retry, _done(1), 0.0) and not store.record_chunk(JOB, retry, _done(1), 0.0)
    assert store.counters(JOB).done == 4
    assert (store.chunks_marked(JOB, "planned"), store.chunks_marked(JOB, "recorded")) == (1, 2)


def test_a_chunk_id_of_an_older_generation_never_takes_the_new_plans_bit(store: JobStore) -> None:
    store.create(JobSpec(job_id=JOB, prompts=["a"], output_root="/o"))
    old = chunk_id_for(JOB, 0, generation=0)
    store.record_chunk(JOB, old, _done(2), 0.0)
    assert store.start_generation(JOB) == 1

    with pytest.raises(StaleGenerationError):  # even without the worker's generation: the id carries it
        store.record_chunk(JOB, old, _done(2), 0.0)
    assert not store.is_chunk_recorded(JOB, old)
    assert store.mark_chunk_started(JOB, old) and store.chunks_marked(JOB, "started") == 0
    assert not store.register_chunk(JOB, old, PlannedCounts(total=2), Checkpoint("b", 1))
    new = chunk_id_for(JOB, 0, generation=1)
    assert store.register_chunk(JOB, new, PlannedCounts(total=2), Checkpoint("b", 1))
    assert store.record_chunk(JOB, new, _done(2), 0.0, generation=1)
    assert store.counters(JOB).done == 2 and store.counters(JOB).total == 2


def test_job_state_left_in_redis_is_at_most_half_a_byte_per_image(settings_factory: Callable[..., Settings]) -> None:
    store = RedisJobStore(settings_factory().state_redis_url())
    store.create(JobSpec(job_id=JOB, prompts=["a"], output_root="/o"))
    chunks, chunk_size = 3000, 32
    outcomes = _done(chunk_size)
    for seq in range(chunks):
        chunk_id = chunk_id_for(JOB, seq)
        store.register_chunk(JOB, chunk_id, PlannedCounts(total=chunk_size), Checkpoint(f"k{seq}", seq + 1))
        store.mark_chunk_started(JOB, chunk_id)
        store.record_chunk(JOB, chunk_id, outcomes, 0.01, generation=0)
    store.mark_listing_complete(JOB)

    images = chunks * chunk_size
    assert store.counters(JOB).done == images
    sizes = {part: int(store.client.memory_usage(job_key(JOB, part), samples=0) or 0) for part in JOB_PARTS}
    assert sum(sizes.values()) / images <= 0.5, sizes
    for mark in ("planned", "started", "recorded"):  # a bit per chunk, not a string per chunk
        assert store.client.strlen(job_key(JOB, mark)) == (chunks + 7) // 8
        assert sizes[mark] <= 2 * chunks / 8 + 100, sizes
