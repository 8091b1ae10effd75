"""Job accounting, once: state, times, rate and ETA of a job, for `status` and for the job report alike."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

from sam3_batch.contracts.jobstate import JobStats, JobStore
from sam3_batch.contracts.schemas import JobCounters

JobState = Literal["running", "complete", "cancelled", "failed"]
ENDED_STATES: frozenset[str] = frozenset({"complete", "cancelled", "failed"})


@dataclass(frozen=True)
class JobAccount:
    """Where a job stands, with the figures derived from its counters and stats."""

    job_id: str
    state: JobState
    counters: JobCounters
    stats: JobStats
    started_at: float
    finished_at: float  # the last recorded change for an ended job; now for a running one
    wall_seconds: float
    images_per_second: float  # images processed (done + failed) per wall-clock second
    # Before the listing completes, from the expected total (a counting pass) if one is known, else None.
    eta_seconds: float | None

    @property
    def eta_estimated(self) -> bool:
        """The ETA rests on an expected total, not the listed one (the listing is still going)."""
        return self.eta_seconds is not None and not self.counters.listing_complete

    @property
    def ended(self) -> bool:
        return self.state in ENDED_STATES

    @property
    def failed_fraction(self) -> float:
        """Failed images over images that ended (done or failed); 0 before any ended."""
        ended = self.counters.done + self.counters.failed
        return self.counters.failed / ended if ended else 0.0


def job_state(counters: JobCounters, stats: JobStats, cancelled: bool) -> JobState:
    """One rule for a job's state: a fatal error, then a cancel, then complete counters."""
    if stats.error is not None:
        return "failed"
    if cancelled:
        return "cancelled"
    return "complete" if counters.complete else "running"


def account_job(store: JobStore, job_id: str, now: float | None = None) -> JobAccount:
    """Read a job's counters and stats once and derive its state, wall time, rate and ETA."""
    counters, stats = store.counters(job_id), store.stats(job_id)
    state = job_state(counters, stats, store.is_cancelled(job_id))
    now = time.time() if now is None else now
    finished = stats.last_update if state != "running" and stats.last_update is not None else now
    wall = max(finished - stats.started_at, 1e-9)
    rate = (counters.done + counters.failed) / wall
    remaining = max(_expected_total(counters, stats) - counters.finished, 0)
    known = counters.listing_complete or stats.expected_total is not None
    eta = remaining / rate if state == "running" and rate > 0 and known else None
    return JobAccount(job_id=job_id, state=state, counters=counters, stats=stats, started_at=stats.started_at,
                      finished_at=finished, wall_seconds=wall, images_per_second=rate, eta_seconds=eta)


def _expected_total(counters: JobCounters, stats: JobStats) -> int:
    """The listed total once the listing is complete; before, the larger of the expected and listed totals."""
    if counters.listing_complete or stats.expected_total is None:
        return counters.total
    return max(stats.expected_total, counters.total)
