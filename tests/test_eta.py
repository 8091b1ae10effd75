"""An ETA before the listing ends: from the expected total a counting pass (or --expected-images) gives."""

from __future__ import annotations

from pathlib import Path

from sam3_batch.contracts.accounting import account_job
from sam3_batch.contracts.jobstate import Checkpoint, PlannedCounts
from sam3_batch.contracts.jobstate_memory import MemoryJobStore
from sam3_batch.contracts.schemas import ItemOutcome, JobSpec
from sam3_batch.contracts.settings import Settings
from sam3_batch.contracts.storage import Storage
from sam3_batch.producer.expected import ExpectedTotal
from sam3_batch.producer.inputs import open_source
from sam3_batch.progress import JobStatus, describe


def _job_with_four_listed_and_two_done() -> tuple[MemoryJobStore, float]:
    store = MemoryJobStore()
    store.create(JobSpec(job_id="j1", prompts=["cat"], output_root="/tmp/out"))
    store.register_chunk("j1", "j1-0", PlannedCounts(total=4, skipped=0, failures=()), Checkpoint("d", 1))
    store.record_chunk("j1", "j1-0", [ItemOutcome(uri=f"u{i}", status="done") for i in range(2)], 0.1)
    return store, store.stats("j1").started_at


def test_no_eta_while_listing_without_an_expected_total() -> None:
    store, started = _job_with_four_listed_and_two_done()

    account = account_job(store, "j1", now=started + 10)

    assert account.eta_seconds is None and not account.eta_estimated


def test_the_expected_total_gives_an_eta_before_the_listing_completes_and_the_listed_total_wins_after() -> None:
    store, started = _job_with_four_listed_and_two_done()
    store.note_expected_total("j1", 100)

    account = account_job(store, "j1", now=started + 10)  # 2 images in 10 s: 0.2 images/s

    assert account.eta_estimated and account.eta_seconds is not None
    assert abs(account.eta_seconds - (100 - 2) / 0.2) < 1.0
    status = JobStatus.of(account)
    assert status.expected_total == 100
    assert "ETA ~490s" in describe(status) and "(listing, ~100 expected...)" in describe(status)
    store.mark_listing_complete("j1")  # the listing found 4, not 100: the listed total decides now
    final = account_job(store, "j1", now=started + 10)
    assert not final.eta_estimated and final.eta_seconds is not None and abs(final.eta_seconds - 10.0) < 1.0
    assert JobStatus.of(final).expected_total is None


def test_the_counting_pass_counts_every_entry_of_the_source_and_notes_it(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for index in range(7):
        (folder / f"{index}.jpg").write_bytes(b"not decoded here")
    (folder / "notes.txt").write_text("not an image: not listed")
    store = MemoryJobStore()
    store.create(JobSpec(job_id="j1", prompts=["cat"], output_root=str(tmp_path / "out")))
    storage = Storage(Settings())

    counter = ExpectedTotal.start(store, "j1", lambda: open_source(storage, [str(folder)], None))
    counter.join(timeout=60)

    assert counter.counted == 7 and store.stats("j1").expected_total == 7
