"""Where a job stands: a snapshot for scripts (JSON), a live rich bar on a terminal, plain lines elsewhere."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from sam3_batch.contracts.accounting import JobAccount, account_job
from sam3_batch.contracts.jobstate import JobStore
from sam3_batch.producer.feed import ProducerSummary

EXIT_OK, EXIT_TOO_MANY_FAILED, EXIT_NOT_COMPLETED = 0, 2, 3


@dataclass(frozen=True)
class JobStatus:
    """The JSON shape of `status`/`jobs`: a job's counters with its throughput and an ETA."""

    job_id: str
    state: str
    total: int
    done: int
    failed: int
    skipped: int
    listing_complete: bool
    images_per_second: float
    eta_seconds: float | None
    error: str | None = None
    # While listing: the total a counting pass (or --expected-images) expects; the ETA rests on it.
    expected_total: int | None = None

    @classmethod
    def of(cls, account: JobAccount) -> JobStatus:
        c = account.counters
        eta = None if account.eta_seconds is None else round(account.eta_seconds, 1)
        expected = None if c.listing_complete else account.stats.expected_total
        return cls(account.job_id, account.state, c.total, c.done, c.failed, c.skipped, c.listing_complete,
                   round(account.images_per_second, 3), eta, account.stats.error, expected)

    @property
    def ended(self) -> bool:
        return self.state != "running"

    @property
    def failed_fraction(self) -> float:
        ended = self.done + self.failed
        return self.failed / ended if ended else 0.0

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def job_status(store: JobStore, job_id: str) -> JobStatus:
    """A snapshot of a job (state, counters, rate, ETA), from the one accounting function."""
    return JobStatus.of(account_job(store, job_id))


def exit_code(status: JobStatus, max_failed_fraction: float = 0.0) -> int:
    """What `submit --wait` and `status --watch` exit with: 0 complete with failures within the allowed
    fraction, 2 complete with more failed images than that, 3 cancelled or failed as a whole."""
    if status.state != "complete":
        return EXIT_NOT_COMPLETED
    return EXIT_OK if status.failed_fraction <= max_failed_fraction else EXIT_TOO_MANY_FAILED


def describe(status: JobStatus) -> str:
    """The progress part of a status line (plain text, one line)."""
    estimated = "~" if not status.listing_complete else ""
    eta = f"ETA {estimated}{status.eta_seconds:.0f}s" if status.eta_seconds is not None else "ETA -"
    expected = f", ~{status.expected_total} expected" if status.expected_total is not None else ""
    listing = "" if status.listing_complete else f" (listing{expected}...)"
    error = f"  error: {status.error}" if status.error else ""
    return (f"done {status.done}  failed {status.failed}  skipped {status.skipped}  "
            f"{status.images_per_second:.1f} img/s  {eta}{listing}{error}")


def status_line(status: JobStatus) -> str:
    """One plain line for a job: id, state, total and progress."""
    return f"{status.job_id}  {status.state}  total {status.total}  " + describe(status)


def write_line(stream: TextIO, line: str) -> None:
    """A whole line at once, flushed: readable through pipes, `tee` and `kubectl logs` as it happens."""
    stream.write(line + "\n")
    stream.flush()


def _watch_bar(poll: Callable[[], JobStatus], console: Console, poll_s: float, expired: Callable[[], bool]
               ) -> JobStatus:
    columns = (TextColumn("[bold]{task.fields[job]}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[detail]}", markup=False), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        bar = None
        while True:
            status = poll()
            if bar is None:
                bar = progress.add_task("job", total=None, job=status.job_id, detail="")
            progress.update(bar, total=status.total or None, completed=status.done + status.failed + status.skipped,
                            detail=describe(status))
            if status.ended or expired():
                return status
            time.sleep(poll_s)


def _watch_lines(poll: Callable[[], JobStatus], stream: TextIO, poll_s: float, every_s: float,
                 expired: Callable[[], bool], as_json: bool) -> JobStatus:
    next_line = 0.0
    while True:
        status = poll()
        if status.ended or expired() or time.monotonic() >= next_line:
            write_line(stream, json.dumps(status.as_dict()) if as_json else status_line(status))
            next_line = time.monotonic() + every_s
        if status.ended or expired():
            return status
        time.sleep(poll_s)


def watch(store: JobStore, job_id: str, console: Console, *, stream: TextIO, poll_s: float = 1.0,
          line_every_s: float = 10.0, as_json: bool = False, timeout_s: float | None = None) -> JobStatus:
    """Follow a job until it ends (or the timeout passes): a live bar on a terminal, else one plain (or
    JSON) line on ``stream`` every ``line_every_s`` seconds and a last one when it ends."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s

    def expired() -> bool:
        return deadline is not None and time.monotonic() > deadline

    def poll() -> JobStatus:
        return job_status(store, job_id)

    if console.is_terminal and not as_json:
        return _watch_bar(poll, console, poll_s, expired)
    return _watch_lines(poll, stream, min(poll_s, line_every_s), line_every_s, expired, as_json)


class FeedProgress:
    """While a producer lists and enqueues: one line every ``every_s`` seconds on ``stream`` (JSON when
    ``as_json``) with what was listed and enqueued and what workers have done so far."""

    def __init__(self, store: JobStore, stream: TextIO, every_s: float, as_json: bool) -> None:
        self.store, self.stream, self.every_s, self.as_json = store, stream, every_s, as_json
        self._next = time.monotonic() + every_s

    def __call__(self, summary: ProducerSummary) -> None:
        if time.monotonic() < self._next:
            return
        self._next = time.monotonic() + self.every_s
        status = job_status(self.store, summary.job_id)
        listed = summary.images_enqueued + summary.skipped + summary.problems
        fields = {"job_id": summary.job_id, "event": "feeding", "listed": listed,
                  "enqueued": summary.images_enqueued, "chunks": summary.chunks_sent, "done": status.done,
                  "failed": status.failed, "images_per_second": status.images_per_second,
                  "expected_total": status.expected_total, "eta_seconds": status.eta_seconds}
        expected = "" if status.expected_total is None else f" of ~{status.expected_total}"
        eta = "ETA -" if status.eta_seconds is None else f"ETA ~{status.eta_seconds:.0f}s"
        line = json.dumps(fields) if self.as_json else (
            f"{summary.job_id}  feeding  listed {listed}{expected}  enqueued {summary.images_enqueued} "
            f"({summary.chunks_sent} chunks)  done {status.done}  failed {status.failed}  "
            f"{status.images_per_second:.1f} img/s  {eta}")
        write_line(self.stream, line)
