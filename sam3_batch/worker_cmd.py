"""Starts a Celery worker that holds one resident SAM 3 model for its whole life."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import TextIO

from celery.signals import worker_process_init
from celery.utils.nodenames import host_format

from sam3_batch.contracts.jobstate import RedisJobStore
from sam3_batch.contracts.registry import WorkerEntry
from sam3_batch.contracts.schemas import Thresholds
from sam3_batch.contracts.settings import Settings
from sam3_batch.logs import json_line
from sam3_batch.worker import health, metrics
from sam3_batch.worker.celery_app import configure_app
from sam3_batch.worker.liveness import Liveness
from sam3_batch.worker.pipeline import SegmentationRuntime
from sam3_batch.worker.process_context import init_worker_context

log = logging.getLogger(__name__)


def warm_up(runtime: SegmentationRuntime) -> None:
    """One small batch through the model, so the first chunk does not pay for kernel selection."""
    from PIL import Image

    image = runtime.preparer(Image.new("RGB", (64, 64), (128, 128, 128)))
    runtime.segment([image], [["object"]], Thresholds())


def _load_and_warm(settings: Settings) -> WorkerEntry:
    """Load the model, warm it, report ready; returns this worker's registry entry (its model)."""
    context = init_worker_context(settings)
    runtime = context.chunk_context.runtime
    warm_up(runtime)
    health.HEALTH.set_ready()
    log.info("model warm: worker ready")
    return WorkerEntry(hostname="", model_id=runtime.model_id, revision=runtime.revision,
                       commit=getattr(runtime, "commit", None))


def _load_and_warm_child(settings: Settings, forked: health.ForkedReadiness) -> None:
    """In a prefork child: load and warm its model, then tell the parent's /readyz through shared memory."""
    _load_and_warm(settings)
    forked.mark_ready(os.getpid())


def start_worker(settings: Settings, *, pool: str, concurrency: int, loglevel: str, hostname: str | None) -> None:
    """Run the worker until it is told to stop (SIGTERM: warm shutdown, the chunk in hand finishes)."""
    app = configure_app(settings)
    health.HEALTH.configure(settings.health_stale_s, settings.health_chunk_limit_s)
    if settings.metrics_port:  # /metrics, /healthz and /readyz answer while the model loads
        health.serve(health.HEALTH, settings.metrics_port)
    node = hostname or f"sam3@{socket.gethostname()}"
    # The one heartbeat in Redis: it tells `submit` this worker's model, and with the reaper a dead worker's
    # chunks go back on the queue in seconds (worker/liveness.py).
    entry = WorkerEntry(hostname=host_format(node), model_id=settings.model, revision=settings.model_revision)
    liveness = Liveness(app, settings, entry, reap=settings.worker_heartbeat)
    liveness.start()
    if pool == "prefork":
        # CUDA must not be touched in the forked parent: each child loads its own model after the fork.
        # The probes are served by the parent: it is ready once every child has loaded and warmed its model.
        forked = health.HEALTH.expect_children(concurrency)
        worker_process_init.connect(lambda **_: _load_and_warm_child(settings, forked), weak=False)
    else:
        entry = _load_and_warm(settings).model_copy(update={"hostname": entry.hostname})
        liveness.describe(entry)  # with the resolved commit
    # /healthz: the consumer loop's own beat, in memory (a blocked loop stops beating).
    app.steps["worker"].add(health.heartbeat_step(health.HEALTH, min(5.0, settings.health_stale_s / 4)))
    _export_gauges(settings, entry)
    argv = [
        "worker", "--queues", settings.queue, "--pool", pool, "--concurrency", str(concurrency),
        "--loglevel", loglevel, "--hostname", node, "--without-mingle", "--without-gossip",
    ]
    if settings.log_json:
        argv.insert(0, "--quiet")  # a global celery option: no banner, so every stderr line stays JSON
        _say_as_json()
    app.worker_main(argv)


def _say_as_json() -> None:
    """Celery's signal handlers write "worker: Warm shutdown" with a raw ``os.write``, bypassing logging;
    under JSON logs they write one JSON record instead (still a single lock-free write)."""
    import celery.apps.worker as celery_worker

    def say(msg: str, f: TextIO = sys.__stderr__) -> None:  # type: ignore[assignment]
        with contextlib.suppress(OSError, ValueError):
            os.write(f.fileno(), (json_line(msg, "celery.apps.worker") + "\n").encode())

    celery_worker.safe_say = say


def _export_gauges(settings: Settings, entry: WorkerEntry) -> None:
    try:
        package_version = version("sam3-batch")
    except PackageNotFoundError:  # running from a source tree
        package_version = "unknown"
    metrics.describe_build(package_version, entry.model_id, entry.revision, entry.commit)
    broker = RedisJobStore(settings.broker_url.get_secret_value(), retries=0).client

    def queue_depth() -> float:
        try:
            return float(broker.llen(settings.queue))
        except Exception:  # Redis away: the scrape still answers, the alert on the gauge's absence fires
            return float("nan")

    metrics.watch_gauges(lambda: float(health.HEALTH.chunks_running()), queue_depth)
