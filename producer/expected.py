"""An early total for the ETA: a counting pass over the source, beside the producer.

The producer lists only as fast as backpressure lets it enqueue, so a million-image job's total is known
only near its end. A second pass that only counts entries runs at listing speed instead (an S3 LIST
returns 1,000 keys per request: a million keys cost ~1,000 requests) and gives the job an expected total
within minutes; ``accounting`` uses it for the ETA until the listing completes. S3 Inventory sources are
not counted: that would read every inventory data file twice (pass ``--expected-images`` instead).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from sam3_batch.contracts.errors import reason_of
from sam3_batch.contracts.jobstate import JobStore
from sam3_batch.producer.inventory import InventorySource
from sam3_batch.producer.sources import Source

log = logging.getLogger(__name__)


class ExpectedTotal:
    """Counts a source's entries in a daemon thread and notes the count as the job's expected total."""

    def __init__(self, store: JobStore, job_id: str) -> None:
        self.store, self.job_id = store, job_id
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.counted: int | None = None

    @classmethod
    def start(cls, store: JobStore, job_id: str, open_source: Callable[[], Source]) -> ExpectedTotal:
        """Begin counting a fresh copy of the source (its own listing, not the producer's iterator)."""
        counter = cls(store, job_id)
        counter._thread = threading.Thread(target=counter._count, args=(open_source,), name="sam3-count",
                                           daemon=True)
        counter._thread.start()
        return counter

    def stop(self) -> None:
        """The producer is done (or gave up): a count still running is no longer worth finishing."""
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _count(self, open_source: Callable[[], Source]) -> None:
        try:
            source = open_source()
            if isinstance(source, InventorySource):
                return
            count = 0
            for _ in source.entries(None):
                if self._stop.is_set():
                    return
                count += 1
            self.counted = count
            self.store.note_expected_total(self.job_id, count)
            log.info("job %s: the source holds %d entries (counting pass)", self.job_id, count,
                     extra={"job_id": self.job_id})
        except Exception as exc:  # an estimate only: the producer's own listing still decides the total
            log.warning("job %s: counting pass stopped: %s", self.job_id, reason_of(exc))
