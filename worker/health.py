"""Honest probes: ``/healthz`` (liveness) and ``/readyz`` (model loaded and warm), beside ``/metrics``.

Liveness: while a chunk runs, the worker is alive until that chunk has run longer than a limit (a hung
download, a hung CUDA call); between chunks, the consumer loop (or the task path) must have beaten within
``stale_s``. Readiness: the resident model is loaded and one warm-up batch went through it. With the prefork
pool the probes are served by the parent, which never loads a model: it is ready when every pool child
has loaded and warmed its own (``ForkedReadiness``, shared memory the children inherit at the fork).
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from celery import bootsteps
from prometheus_client import make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from sam3_batch.processes import pid_alive

log = logging.getLogger(__name__)

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


class ForkedReadiness:
    """The pids of pool children whose model is loaded and warm, in shared memory made before the fork.

    A child that dies drops out by itself (its pid no longer lives), so a replacement child that is still
    loading makes the parent unready until it, too, is warm.
    """

    def __init__(self, children: int) -> None:
        self.children = children
        # Room for replacements: a dead child's slot is reused, so a few spare slots are plenty.
        self._pids = multiprocessing.Array("q", max(2 * children, children + 4))

    def mark_ready(self, pid: int) -> None:
        """Called by a child once its model is warm."""
        with self._pids.get_lock():
            slots = self._pids[:]
            if pid in slots:
                return
            free = next((i for i, held in enumerate(slots) if held == 0 or not pid_alive(held)), None)
            if free is not None:
                self._pids[free] = pid

    def ready_children(self) -> int:
        with self._pids.get_lock():
            pids: list[int] = self._pids[:]
        return len([pid for pid in pids if pid and pid_alive(pid)])


class Health:
    """What the probes answer from; the worker beats, the task path marks chunks in and out."""

    def __init__(self, stale_s: float, chunk_limit_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.stale_s, self.chunk_limit_s, self._clock = stale_s, chunk_limit_s, clock
        self._lock = threading.Lock()
        self._chunks: dict[str, float] = {}
        self._last_beat: float | None = None  # None until the consumer loop runs (the model may be loading)
        self._ready = False
        self.forked: ForkedReadiness | None = None  # set (before the fork) for the prefork pool

    def expect_children(self, children: int) -> ForkedReadiness:
        """Readiness comes from ``children`` forked pool children from now on (call before they fork)."""
        self.forked = ForkedReadiness(children)
        return self.forked

    def configure(self, stale_s: float, chunk_limit_s: float) -> None:
        self.stale_s, self.chunk_limit_s = stale_s, chunk_limit_s

    def beat(self) -> None:
        with self._lock:
            self._last_beat = self._clock()

    def set_ready(self) -> None:
        self._ready = True

    @contextmanager
    def chunk(self, chunk_key: str) -> Iterator[None]:
        """Mark a chunk as running for its duration (its end also counts as a beat)."""
        with self._lock:
            self._chunks[chunk_key] = self._clock()
        try:
            yield
        finally:
            with self._lock:
                self._chunks.pop(chunk_key, None)
                self._last_beat = self._clock()

    def chunks_running(self) -> int:
        with self._lock:
            return len(self._chunks)

    def liveness(self) -> tuple[bool, str]:
        with self._lock:
            now, oldest, beat = self._clock(), min(self._chunks.values(), default=None), self._last_beat
        if oldest is not None:
            running = now - oldest
            if running > self.chunk_limit_s:
                return False, f"one chunk has run for {running:.0f}s (limit {self.chunk_limit_s:.0f}s)"
            return True, f"in a chunk for {running:.0f}s"
        if beat is not None and now - beat > self.stale_s:
            return False, f"consumer loop silent for {now - beat:.0f}s (limit {self.stale_s:.0f}s)"
        return True, "alive"

    def readiness(self) -> tuple[bool, str]:
        if self.forked is not None:
            ready, wanted = self.forked.ready_children(), self.forked.children
            if ready >= wanted:
                return True, f"model loaded and warm in {ready} of {wanted} pool processes"
            return False, f"model loaded and warm in {ready} of {wanted} pool processes"
        return (True, "model loaded and warm") if self._ready else (False, "model not loaded yet")


def health_app(health: Health) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    """One WSGI app: /healthz, /readyz, and Prometheus' /metrics for every other path."""
    metrics = make_wsgi_app()
    probes = {"/healthz": health.liveness, "/readyz": health.readiness}

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        probe = probes.get(environ.get("PATH_INFO", ""))
        if probe is None:
            return metrics(environ, start_response)  # type: ignore[no-any-return]
        ok, why = probe()
        start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
        return [why.encode() + b"\n"]

    return app


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Probes every few seconds are not log lines."""


def serve(health: Health, port: int, addr: str = "0.0.0.0") -> WSGIServer:
    """Serve the probes and /metrics on ``port`` from a daemon thread (started before the model loads)."""
    server = make_server(addr, port, health_app(health), ThreadingWSGIServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="health-http", daemon=True).start()
    return server


def heartbeat_step(health: Health, interval_s: float) -> type[bootsteps.StartStopStep]:
    """A worker bootstep that beats from the consumer's event loop timer: a blocked loop stops beating.
    In memory only: the worker's heartbeat in Redis is ``worker/liveness.py``'s."""

    class Heartbeat(bootsteps.StartStopStep):  # type: ignore[misc]
        requires = ("celery.worker.components:Timer",)

        def start(self, worker: Any) -> None:
            health.beat()
            self.tref = worker.timer.call_repeatedly(interval_s, health.beat)

        def stop(self, worker: Any) -> None:
            tref = getattr(self, "tref", None)
            if tref is not None:
                tref.cancel()

    return Heartbeat


HEALTH = Health(stale_s=60.0, chunk_limit_s=600.0)  # limits set from settings by the worker command
