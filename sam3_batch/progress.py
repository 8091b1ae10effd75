"""Where a job stands: a snapshot for scripts (JSON) and a live rich progress bar for people."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from sam3_batch.contracts.jobstate import JobStore


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    state: str
    total: int
    done: int
    failed: int
    skipped: int
    listing_complete: bool
    images_per_second: float
    eta_seconds: float | None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def job_status(store: JobStore, job_id: str) -> JobStatus:
    """A snapshot of a job's counters with its throughput and an ETA."""
    counters, stats = store.counters(job_id), store.stats(job_id)
    started = stats.get("started_at", time.time())
    end = stats.get("last_update", time.time()) if counters.complete else time.time()
    processed = counters.done + counters.failed
    rate = processed / max(end - started, 1e-9)
    remaining = max(counters.total - counters.finished, 0)
    eta = remaining / rate if rate > 0 and counters.listing_complete else None
    state = "cancelled" if store.is_cancelled(job_id) else ("complete" if counters.complete else "running")
    return JobStatus(job_id, state, counters.total, counters.done, counters.failed, counters.skipped,
                     counters.listing_complete, round(rate, 3), None if eta is None else round(eta, 1))


def _describe(status: JobStatus) -> str:
    eta = f"ETA {status.eta_seconds:.0f}s" if status.eta_seconds is not None else "ETA -"
    listing = "" if status.listing_complete else " (listing...)"
    return (f"done {status.done}  failed {status.failed}  skipped {status.skipped}  "
            f"{status.images_per_second:.1f} img/s  {eta}{listing}")


def watch(store: JobStore, job_id: str, console: Console, poll_s: float = 1.0,
          timeout_s: float | None = None) -> JobStatus:
    """Draw a live progress bar until the job is complete or cancelled (or the timeout passes)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    columns = (TextColumn("[bold]{task.fields[job]}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[detail]}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task("job", total=None, job=job_id, detail="")
        while True:
            status = job_status(store, job_id)
            progress.update(bar, total=status.total or None, completed=status.done + status.failed + status.skipped,
                            detail=_describe(status))
            if status.state != "running" or (deadline is not None and time.monotonic() > deadline):
                return status
            time.sleep(poll_s)


def print_status(status: JobStatus, console: Console) -> None:
    """One human-readable line per field."""
    console.print(f"[bold]{status.job_id}[/bold]  {status.state}  total {status.total}  " + _describe(status))
