"""Prometheus metrics of a producer (``submit --metrics-port``): what it listed and enqueued, what it
skipped, and how long backpressure held it. Rates are PromQL's ``rate()`` over the counters."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, start_http_server

LISTED = Counter("sam3_producer_listed_images_total", "Source entries listed (enqueued, skipped or bad)")
ENQUEUED = Counter("sam3_producer_enqueued_images_total", "Images enqueued for workers")
CHUNKS = Counter("sam3_producer_enqueued_chunks_total", "Chunk messages enqueued")
SKIPPED = Counter("sam3_producer_skipped_images_total", "Images skipped because their outputs already exist")
BAD_ENTRIES = Counter("sam3_producer_bad_entries_total", "Source entries that cannot be images (counted as failed)")
BACKPRESSURE_SECONDS = Counter(
    "sam3_producer_backpressure_wait_seconds_total", "Seconds the producer waited for the queue to drain"
)
LISTING_COMPLETE = Gauge("sam3_producer_listing_complete", "1 once the producer has listed its whole source")


def serve(port: int, addr: str = "0.0.0.0") -> None:
    """Serve /metrics from a daemon thread for as long as the producer process runs."""
    start_http_server(port, addr)
