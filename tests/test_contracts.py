"""The shared contracts: output keys, idempotent job state (real Redis and in memory), planning, done index."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from pydantic import ValidationError

from sam3_batch.contracts.errors import BadUriError, TransientError, is_transient, reason_of
from sam3_batch.contracts.jobstate import Checkpoint, JobStore, PlannedCounts, RedisJobStore
from sam3_batch.contracts.jobstate_memory import MemoryJobStore
from sam3_batch.contracts.keys import OutputLayout, key_from_uri, out_key_of_metadata, safe_relative_key
from sam3_batch.contracts.redact import redact, register_secret
from sam3_batch.contracts.schemas import ChunkMessage, Failure, ItemOutcome, JobSpec
from sam3_batch.contracts.settings import Settings
from sam3_batch.contracts.storage import Storage
from sam3_batch.producer.done_index import DoneIndex
from sam3_batch.producer.planner import plan_chunks
from sam3_batch.producer.sources import SourceItem, SourceProblem


@pytest.mark.parametrize("raw", ["../../etc/passwd", "/abs/x.png", "a/../../b.jpg", "a\\..\\b.jpg", "./x/./y.png",
                                 "_jobs/evil/report.json", "ctrl\x00\x1fchars.jpg"])
def test_output_keys_never_escape_the_root_and_stay_distinct(raw: str) -> None:
    key = safe_relative_key(raw)
    assert not key.startswith("/") and ".." not in key.split("/") and "." not in key.split("/")
    assert not key.startswith("_jobs/")
    assert all(ch.isprintable() for ch in key)
    assert key != safe_relative_key(raw + "x")
    layout = OutputLayout("/out/root", key)
    assert Path(layout.metadata_uri).resolve().is_relative_to(Path("/out/root"))


def test_clean_keys_are_kept_as_they_are_and_unicode_is_normalised() -> None:
    assert safe_relative_key("a b/ü.jpg") == "a b/ü.jpg"
    assert safe_relative_key("cafe\u0301.jpg").startswith("café.jpg~")  # NFD -> NFC, hashed (it changed)
    assert key_from_uri("s3://bucket/dir/x.png") == "bucket/dir/x.png"
    assert key_from_uri("https://example.com/a.jpg?sig=1").startswith("example.com/a.jpg_")
    with pytest.raises(BadUriError, match="unsupported URI scheme 'ftp'"):
        key_from_uri("ftp://host/a.jpg")


def test_metadata_keys_map_back_to_out_keys_and_job_files_are_not_images() -> None:
    layout = OutputLayout("s3://b/out", "dir/a.jpg")
    assert layout.metadata_uri == "s3://b/out/dir/a.jpg.json"
    assert out_key_of_metadata("dir/a.jpg.json") == "dir/a.jpg"
    assert out_key_of_metadata("_jobs/j/report.json") is None
    assert out_key_of_metadata("dir/a.jpg.masks/p00_i000.png") is None


def test_prompts_are_validated_and_normalised() -> None:
    spec = JobSpec(job_id="j1", prompts=["  a   dog ", "a dog", "cat"], output_root="/o")
    assert spec.prompts == ["a dog", "cat"]
    for bad in ([], ["   "], ["x" * 257]):
        with pytest.raises(ValidationError):
            JobSpec(job_id="j1", prompts=bad, output_root="/o")
    with pytest.raises(ValidationError):
        JobSpec(job_id="../x", prompts=["a"], output_root="/o")


@pytest.fixture(params=["redis", "memory"])
def store(request: pytest.FixtureRequest, settings_factory: Callable[..., Settings]) -> JobStore:
    if request.param == "memory":
        return MemoryJobStore()
    return RedisJobStore(settings_factory().state_redis_url())


def _spec() -> JobSpec:
    return JobSpec(job_id="job1", prompts=["a"], output_root="/o")


def _outcomes(done: int, failed: int) -> list[ItemOutcome]:
    return [ItemOutcome(uri=f"u{i}", status="done", instances=2) for i in range(done)] + [
        ItemOutcome(uri=f"f{i}", status="failed", reason="bad", out_key=f"f{i}") for i in range(failed)]


def test_a_chunk_counts_once_however_often_it_is_recorded(store: JobStore) -> None:
    store.create(_spec())
    assert store.register_chunk("job1", "c0", PlannedCounts(total=3), Checkpoint("k3", 1))
    assert not store.register_chunk("job1", "c0", PlannedCounts(total=3), Checkpoint("k3", 1))
    assert store.record_chunk("job1", "c0", _outcomes(2, 1), 0.5)
    assert not store.record_chunk("job1", "c0", _outcomes(2, 1), 0.5)  # redelivered / duplicate
    store.mark_listing_complete("job1")
    counters = store.counters("job1")
    assert (counters.total, counters.done, counters.failed, counters.complete) == (3, 2, 1, True)
    assert [f.uri for f in store.failures("job1")] == ["f0"]
    assert store.checkpoint("job1") == Checkpoint("k3", 1)
    assert store.claim_report("job1") and not store.claim_report("job1")


def test_planned_skips_and_bad_entries_count_in_total_and_only_images_reopen(store: JobStore) -> None:
    store.create(_spec())
    bad = Failure(uri="manifest line 3", reason="malformed", chunk_id="c0")
    store.register_chunk("job1", "c0", PlannedCounts(total=4, skipped=1, failures=(bad,)), Checkpoint("3", 1))
    store.record_chunk("job1", "c0", _outcomes(1, 1), 0.0)
    counters = store.counters("job1")
    assert (counters.total, counters.skipped, counters.failed, counters.done) == (4, 1, 2, 1)
    reopened = store.reopen_failures("job1")
    assert [f.uri for f in reopened] == ["f0"]
    assert [f.uri for f in store.failures("job1")] == ["manifest line 3"]
    assert store.counters("job1").failed == 1


def test_a_new_generation_resets_counts_and_chunk_sets(store: JobStore) -> None:
    store.create(_spec())
    store.register_chunk("job1", "c0", PlannedCounts(total=2), Checkpoint("b", 1))
    store.record_chunk("job1", "c0", _outcomes(2, 0), 0.0)
    store.cancel("job1")
    assert store.generation("job1") == 0 and store.is_cancelled("job1")
    assert store.start_generation("job1") == 1
    assert not store.is_cancelled("job1") and store.checkpoint("job1") is None
    assert store.counters("job1").total == 0 and not store.is_chunk_recorded("job1", "c0")
    assert store.mark_chunk_started("job1", "c0") and not store.mark_chunk_started("job1", "c0")


def _item(n: int) -> SourceItem:
    return SourceItem(uri=f"s3://b/{n:03d}.jpg", out_key=f"{n:03d}.jpg", position=f"{n:03d}.jpg")


def test_planner_packs_chunks_with_deterministic_ids_skips_done_and_reports_bad_entries() -> None:
    entries = [_item(n) for n in range(7)]
    entries.insert(3, SourceProblem("manifest line 4", "malformed", "003b"))
    entries.append(SourceItem(uri="s3://b/x.jpg", out_key="x.jpg", position="zz", prompts=["   "]))
    chunks = list(plan_chunks(entries, "job1", 3, is_done=lambda key: key == "001.jpg"))
    assert [c.message.chunk_id for c in chunks if c.message] == [f"job1-g0-{n:09d}" for n in range(2)]
    assert [[i.out_key for i in c.message.items] for c in chunks if c.message] == [
        ["000.jpg", "002.jpg", "003.jpg"], ["004.jpg", "005.jpg", "006.jpg"]]
    assert sum(c.skipped for c in chunks) == 1
    problems = [p for c in chunks for p in c.problems]
    assert [p.uri for p in problems] == ["manifest line 4", "s3://b/x.jpg"]
    assert "prompts" in problems[1].reason
    assert chunks[-1].last_position == "zz"
    again = list(plan_chunks(entries, "job1", 3, is_done=lambda key: key == "001.jpg"))
    assert [c.message for c in again] == [c.message for c in chunks]


def test_done_index_finds_done_images_from_one_listing(tmp_path: Path) -> None:
    storage = Storage(Settings())
    for key in ("a.jpg.json", "d/b.png.json", "_jobs/j/report.json", "c.jpg.masks/p00_i000.png"):
        storage.write_bytes(str(tmp_path / key), b"{}", "application/json")
    index = DoneIndex.from_output_root(storage, str(tmp_path))
    assert len(index) == 2
    assert "a.jpg" in index and "d/b.png" in index
    assert "c.jpg" not in index and "_jobs/j/report" not in index
    assert "x" not in DoneIndex.from_output_root(storage, str(tmp_path / "missing"))


def test_chunk_messages_are_compact_json() -> None:
    chunk = ChunkMessage(job_id="j", chunk_id="j-g0-000000000",
                         items=[{"uri": f"s3://bucket/images/{n:06d}.jpg", "out_key": f"{n:06d}.jpg"}
                                for n in range(32)])  # type: ignore[misc]
    body = chunk.model_dump_json(exclude_defaults=True)
    assert "prompts" not in body and "generation" not in body
    assert len(body) / 32 < 70


def test_transient_errors_are_told_apart_and_reasons_carry_no_secrets() -> None:
    assert is_transient(TransientError("503")) and is_transient(redis.ConnectionError("reset"))
    assert not is_transient(BadUriError("nope")) and not is_transient(ValueError("bug"))
    register_secret("sentinel-SECRET-123")
    reason = reason_of(RuntimeError("failed with key sentinel-SECRET-123 at redis://:pw123@host:6379/0"))
    assert "sentinel-SECRET-123" not in reason and "pw123" not in reason
    assert redact("https://b.s3/x?X-Amz-Signature=abc&x=1") == "https://b.s3/x?X-Amz-Signature=***&x=1"
