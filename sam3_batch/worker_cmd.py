"""Starts a Celery worker that holds one resident SAM 3 model for its whole life."""

from __future__ import annotations

import logging
import socket

from celery.signals import worker_process_init

from sam3_batch.contracts.settings import Settings
from sam3_batch.worker import metrics
from sam3_batch.worker.celery_app import configure_app
from sam3_batch.worker.process_context import init_worker_context

log = logging.getLogger(__name__)


def start_worker(settings: Settings, *, pool: str, concurrency: int, loglevel: str, hostname: str | None) -> None:
    """Run the worker until it is told to stop (SIGTERM: warm shutdown, the chunk in hand finishes)."""
    app = configure_app(settings)
    if settings.metrics_port:
        metrics.serve(settings.metrics_port)
    if pool == "prefork":
        # CUDA must not be touched in the forked parent: each child loads its own model after the fork.
        worker_process_init.connect(lambda **_: init_worker_context(settings), weak=False)
    else:
        init_worker_context(settings)
    argv = [
        "worker", "--queues", settings.queue, "--pool", pool, "--concurrency", str(concurrency),
        "--loglevel", loglevel, "--hostname", hostname or f"sam3@{socket.gethostname()}",
        "--without-mingle", "--without-gossip",
    ]
    if settings.log_json:
        argv.insert(0, "--quiet")  # a global celery option: no banner, so every stderr line stays JSON
    app.worker_main(argv)
